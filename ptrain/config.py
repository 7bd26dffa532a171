"""Typed configs: dataclass defaults < YAML file < ``dotted.key=value`` overrides.

Every verb declares one root dataclass whose fields are values or nested section dataclasses. A YAML file may
build on others with a top-level ``include: base.yaml`` (or a list; paths relative to the file): the included keys
come first, the file's own keys override them, key by key (``model.head`` replaces only that key of ``model``).
A field's one-line doc and its choices live in ``field(metadata=...)`` via :func:`opt`.

    cfg = load_config(ShardConfig, "configs/shard/howto100m.yaml", ["num_frames=8", "ray.address=auto"])

Values are coerced to the declared type (PyYAML reads ``1e-4`` as a string and ``no`` as False, so a
``float`` field accepts the string ``"1e-4"`` and a ``str`` field refuses a bare ``no``). Unknown keys,
type errors, malformed overrides and ``__post_init__`` failures are collected into ONE :class:`ConfigError`
whose lines name the dotted path, where the value came from and, for unknown keys, the closest valid key. A
``__post_init__`` raises structured problems: :class:`Invalid` (the key, the sentence, the other keys it is about),
several at once with :class:`InvalidValues`; the loader places each at its dotted path and names where the values
of those keys came from. (A plain ``ValueError`` is placed at the key its sentence starts with, if any.)

This module imports only the standard library and PyYAML, so ``ptrain VERB --help`` is instant.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """All problems found while loading a config, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid config:\n  " + "\n  ".join(self.problems))


class Invalid(ValueError):
    """One problem of a config value: ``Invalid("num_frames", "num_frames must be at least 1, got 0")``.

    ``key`` is the field (a dotted path below the dataclass that raises), ``message`` the sentence (it may start
    with the key), ``also`` the other keys the sentence is about: the loader names where each value came from."""

    def __init__(self, key: str, message: str, also: tuple[str, ...] = ()):
        self.key, self.message, self.also = key, message, tuple(also)
        super().__init__(message)


class InvalidValues(ValueError):
    """Raised by a config's ``__post_init__`` to report several problems at once (:class:`Invalid` each)."""

    def __init__(self, problems: list[Invalid | str]):
        self.problems = list(problems)
        super().__init__("; ".join(str(p) for p in self.problems))


class Problems(list):
    """The problems a ``__post_init__`` finds, all of them: ``check`` each rule, then ``raise_any``.

        p = Problems()
        p.check(self.lr > 0, "lr", f"lr must be positive, got {self.lr}")
        p.check(lo <= hi, "min_seconds", "min_seconds is larger than max_seconds", also=("max_seconds",))
        p.raise_any()
    """

    def check(self, ok: bool, key: str, message: str, also: tuple[str, ...] = ()) -> None:
        if not ok:
            self.append(Invalid(key, message, also))

    def raise_any(self) -> None:
        if self:
            raise InvalidValues(list(self))


def opt(default: Any = _MISSING, doc: str = "", *, factory: Any = _MISSING) -> Any:
    """A dataclass field with a one-line doc (shown by ``ptrain VERB --help``)."""
    if factory is not _MISSING:
        return dataclasses.field(default_factory=factory, metadata={"doc": doc})
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda d=default: dataclasses.replace(d), metadata={"doc": doc})
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


def section(cls: type, doc: str = "") -> Any:
    """A nested config section field."""
    return dataclasses.field(default_factory=cls, metadata={"doc": doc})


# ----------------------------------------------------------------------------------------------
# type coercion


class _CoerceError(Exception):
    pass


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        inner = " or ".join(_type_name(a) for a in args)
        return f"{inner} or null" if len(args) < len(get_args(tp)) else inner
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value in choices and type(value) in {type(c) for c in choices}:
            return value
        if isinstance(value, bool) and str(value).lower() in choices:
            return str(value).lower()  # a choice spelt 'true'/'false', which YAML and the command line read as a bool
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [str(c) for c in choices], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise _CoerceError(f"{value!r} is not {_type_name(tp)}{hint}")
        raise _CoerceError(f"{value!r} is not {_type_name(tp)}")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except _CoerceError as e:
                errors.append(str(e))
        raise _CoerceError(f"{value!r} is not {_type_name(tp)}")
    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        if isinstance(value, str) and origin is list:
            value = [value] if value else []
        if not isinstance(value, (list, tuple)):
            raise _CoerceError(f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        items = [_coerce(v, item_tp) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _CoerceError(f"expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise _CoerceError(f"expected true or false, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise _CoerceError(f"expected an integer, got bool {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise _CoerceError(f"expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise _CoerceError(f"expected a number, got bool {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                raise _CoerceError(f"expected a number, got str {value!r}") from None
            if math.isnan(out):
                raise _CoerceError("expected a number, got NaN")
            return out
        raise _CoerceError(f"expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        why = " (YAML reads unquoted yes/no/on/off as booleans: quote the value)" if isinstance(value, bool) else ""
        raise _CoerceError(f"expected a string, got {type(value).__name__} {value!r}{why}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _CoerceError(f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


# ----------------------------------------------------------------------------------------------
# loading


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _leaf_paths(cls: type, prefix: str = "") -> list[str]:
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.append(prefix + f.name)
            out.extend(_leaf_paths(tp, prefix + f.name + "."))
        else:
            out.append(prefix + f.name)
    return out


def _nest(dotted: dict[str, tuple[Any, str]]) -> dict[str, Any]:
    """{'a.b': leaf} -> {'a': {'b': leaf}}; leaves are (value, source, raw text or None) tuples."""
    root: dict[str, Any] = {}
    for key, leaf in dotted.items():
        parts = key.split(".")
        node = root
        for p in parts[:-1]:
            child = node.get(p)
            if not isinstance(child, dict):
                child = {}
                node[p] = child
            node = child
        node[parts[-1]] = leaf
    return root


def _flatten(data: Any, source: str, prefix: str = "") -> dict[str, tuple[Any, str]]:
    out: dict[str, tuple[Any, str]] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                out.update(_flatten(v, source, key + "."))
            else:
                out[key] = (v, source, None)
    return out


def _build(cls: type, values: dict[str, Any], prefix: str, problems: list[str], all_paths: list[str]) -> Any:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    failed_section = False
    for key, leaf in values.items():
        path = prefix + key
        if key not in fields:
            src = _source_of(leaf)
            # the same key in another section first (a key that moved: fps -> plan.fps), else the closest path
            moved = [p for p in all_paths if p.rsplit(".", 1)[-1] == key and p != path]
            close = moved[:1] if len(moved) == 1 else difflib.get_close_matches(path, all_paths, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else f"; valid keys here: {', '.join(fields)}"
            problems.append(f"{path}: unknown key (from {src}){hint}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if isinstance(leaf, dict):
                kwargs[key] = _build(tp, leaf, path + ".", problems, all_paths)
                if kwargs[key] is None:  # the section's problems are recorded; this level's own checks still
                    failed_section = True  # run, on the section's defaults, and the level is reported as failed
                    try:
                        kwargs[key] = tp()
                    except (ValueError, TypeError):
                        del kwargs[key]
            elif isinstance(leaf, tuple) and leaf[0] is None:
                continue  # `section:` with no body in YAML
            else:
                problems.append(f"{path}: is a section, set its keys as {path}.KEY=VALUE (from {_source_of(leaf)})")
            continue
        if isinstance(leaf, dict):
            problems.append(f"{path}: expected {_type_name(tp)}, got a mapping (from {_source_of(leaf)})")
            continue
        value, src, raw = leaf
        if raw is not None and _takes_str(tp) and not (value is None and _takes_none(tp)):
            value = raw  # a path like 0123 or 1_000 stays the text that was typed, not the YAML number
        elif raw is None and _takes_str(tp) and isinstance(value, (int, float)) and not isinstance(value, bool):
            problems.append(f"{path}: expected a string, got {type(value).__name__} {value!r}; quote it in YAML "
                            f"('{value}') so it is read as text (from {src})")
            continue
        try:
            kwargs[key] = _coerce(value, tp)
        except _CoerceError as e:
            problems.append(f"{path}: {e} (from {src})")
    required = [name for name, f in fields.items()
                if name not in kwargs and f.default is _MISSING and f.default_factory is _MISSING]
    for name in required:
        problems.append(f"{prefix}{name}: required, set it in the YAML file or as {prefix}{name}=VALUE")
    if required or (failed_section and any(dataclasses.is_dataclass(hints[k]) and k not in kwargs for k in values
                                           if k in fields)):
        return None
    try:
        built = cls(**kwargs)
        return None if failed_section else built
    except (ValueError, TypeError) as e:  # __post_init__'s sentences, each placed at the key it names
        found = e.problems if isinstance(e, InvalidValues) else [e]
        problems.extend(_place(p, cls, values, prefix) for p in found)
        return None


def _place(problem: Invalid | ValueError | str, cls: type, values: dict[str, Any], prefix: str) -> str:
    """The error line of a ``__post_init__`` problem: at its dotted key, with where its values came from."""
    if isinstance(problem, Invalid):
        key, sentence, keys = problem.key, problem.message, (problem.key, *problem.also)
    else:  # a plain sentence: it is about the key it starts with, if it starts with one
        sentence = str(problem)
        first = re.match(r"[\w.]+", sentence)
        key = first.group(0).rstrip(".") if first and first.group(0).rstrip(".") in _leaf_paths(cls) else ""
        keys = (key,) if key else ()
    sentence = sentence.rstrip(".")
    if not key:
        return f"{prefix.rstrip('.') or cls.__name__}: {sentence}"
    line = prefix + sentence if sentence.startswith(key) else f"{prefix}{key}: {sentence}"
    sources = {k: _source_at(values, k) for k in keys}
    if all(src is None for src in sources.values()):
        return line  # only defaults: nothing was given
    named = {k: src or "the default" for k, src in sources.items()}
    if len(set(named.values())) == 1:
        return f"{line} (from {next(iter(named.values()))})"
    return f"{line} (" + ", ".join(f"{prefix}{k} from {src}" for k, src in named.items()) + ")"


def _source_at(values: dict[str, Any], path: str) -> str | None:
    """Where the value at ``path`` (dotted, relative to ``values``) came from; None when it was not given."""
    node: Any = values
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return _source_of(node)


def _takes_str(tp: Any) -> bool:
    return tp is str or (get_origin(tp) in (Union, types.UnionType) and str in get_args(tp))


def _takes_none(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)


def _source_of(leaf: Any) -> str:
    if isinstance(leaf, tuple):
        return leaf[1]
    if isinstance(leaf, dict):
        for v in leaf.values():
            return _source_of(v)
    return "?"


_YAML_SUFFIXES = (".yaml", ".yml")


def parse_overrides(overrides: list[str], problems: list[str] | None = None,
                    valid_keys: list[str] = ()) -> dict[str, tuple[Any, str]]:
    """``["a.b=1", "c=[1,2]"]`` -> ``{"a.b": (1, "command line", "1"), ...}``: values parsed as YAML, the raw
    text kept for string fields. Malformed items are appended to ``problems`` (raised as one ConfigError when
    ``problems`` is not given), each naming the item and the fix."""
    collect = problems is not None
    problems = problems if collect else []
    out: dict[str, tuple[Any, str]] = {}
    for item in overrides:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq:
            if item.lower().endswith(_YAML_SUFFIXES) or Path(item).is_file():
                fix = "a config file goes first: ptrain VERB CONFIG.yaml [dotted.key=value ...]"
            else:
                close = difflib.get_close_matches(item, list(valid_keys), n=1, cutoff=0.6)
                fix = f"did you mean {close[0]}=VALUE?" if close else "write it as dotted.key=value"
            problems.append(f"{item!r}: not a key=value override (from command line); {fix}")
            continue
        if not key or any(not part for part in key.split(".")):
            problems.append(f"{item!r}: {key!r} is not a dotted key (from command line); write it as "
                            "dotted.key=value, e.g. ray.num_cpus=2")
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out[key] = (value, "command line", raw)
    if not collect and problems:
        raise ConfigError(problems)
    return out


def _read_yaml(p: Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file; a ConfigError naming the file and the fix otherwise."""
    fix = "pass an existing YAML config file first, then dotted.key=value overrides (or only overrides)"
    if p.is_dir():
        raise ConfigError([f"{p}: is a directory, not a config file; {fix}"])
    if not p.is_file():
        hint = f"; or, if {p.name!r} is meant as an override, write it as KEY=VALUE" \
            if not p.name.lower().endswith(_YAML_SUFFIXES) else ""
        raise ConfigError([f"{p}: config file not found; {fix}{hint}"])
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{p}: not a text (UTF-8) file ({e.reason} at byte {e.start}); pass a YAML config "
                           "file"]) from None
    except OSError as e:
        raise ConfigError([f"{p}: cannot be read ({e.strerror}); check the path and its permissions"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError([f"{p}: not valid YAML{where}: {what}; fix the file (or pass the keys as overrides)"]) \
            from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{p}: the top level must be a mapping of keys, got {type(data).__name__}"])
    return data


INCLUDE = "include"  # the reserved top-level key of a YAML config: the files it builds on


def _read_with_includes(p: Path, chain: tuple[Path, ...] = ()) -> dict[str, tuple[Any, str]]:
    """The dotted keys of ``p`` on top of those of the files it includes (``include: base.yaml`` or a list,
    relative to ``p``; later files and ``p`` itself win), each with the file that set it."""
    data = _read_yaml(p)
    includes = data.pop(INCLUDE, None)
    if includes is None:
        includes = []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) and i for i in includes):
        raise ConfigError([f"{p}: {INCLUDE} must be a file name or a list of file names (relative to {p.parent}), "
                           f"got {includes!r}"])
    out: dict[str, tuple[Any, str]] = {}
    for name in includes:
        target = (p.parent / name).resolve()
        if target in chain or target == p.resolve():
            cycle = " -> ".join(str(c) for c in (*chain, p.resolve(), target))
            raise ConfigError([f"{p}: includes form a cycle ({cycle}); remove one {INCLUDE}"])
        if not target.is_file():
            raise ConfigError([f"{p}: {INCLUDE} {name!r}: {target} not found; includes are relative to the including "
                               "file"])
        out.update(_read_with_includes(target, (*chain, p.resolve())))
    out.update(_flatten(data, str(p)))
    return out


def config_files(path: str | Path) -> list[Path]:
    """The YAML files a config is built from: ``path`` and, recursively, every file it includes (absolute paths,
    each once, ``path`` first). Errors as :func:`load_config` raises them."""
    out: list[Path] = []

    def visit(p: Path) -> None:
        if p in out:
            return
        out.append(p)
        includes = _read_yaml(p).get(INCLUDE) or []
        for name in [includes] if isinstance(includes, str) else includes:
            if isinstance(name, str) and name:
                visit((p.parent / name).resolve())

    _read_with_includes(Path(path))  # every check of loading (a cycle, a missing include) first
    visit(Path(path).resolve())
    return out


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Build ``cls`` from its defaults, then the YAML file at ``path`` (after the files it includes), then
    ``overrides``."""
    problems: list[str] = []
    dotted: dict[str, tuple[Any, str]] = {}
    if path is not None:
        dotted.update(_read_with_includes(Path(path)))
    all_paths = _leaf_paths(cls)
    dotted.update(parse_overrides(overrides or [], problems, all_paths))
    cfg = _build(cls, _nest(dotted), "", problems, all_paths)
    if problems:
        raise ConfigError(problems)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def dump_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (what a run actually used); ``load_config`` reads it back."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(p)


def config_help(cls: type, prefix: str = "") -> list[str]:
    """One line per key: ``dotted.key: TYPE = DEFAULT  — doc``; a section's keys follow all plain keys of its
    parent, under a ``section.*`` heading after a blank line, so no key reads as if it belonged to a section."""
    lines, sections = [], []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        doc = f.metadata.get("doc", "")
        if dataclasses.is_dataclass(tp):
            sections.append((f.name, tp, doc))
            continue
        if f.default is not _MISSING:
            default = f.default
        elif f.default_factory is not _MISSING:
            default = f.default_factory()
        else:
            default = "REQUIRED"
        lines.append(f"  {prefix}{f.name}: {_type_name(tp)} = {default!r}  — {doc}")
    for name, tp, doc in sections:
        lines += ["", f"{prefix}{name}.*  ({doc})" if doc else f"{prefix}{name}.*"]
        lines.extend(config_help(tp, prefix + name + "."))
    return lines
