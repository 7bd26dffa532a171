"""What the benchmark annotation readers share: the annotations=DIR + split=NAME settings, the files a split needs
(a missing one is an error that says what to download), and reading split lists, CSV/TSV and JSON with errors that
name the file, the row or key, and the problem.

A benchmark reader subclasses ``BenchmarkSource``, declares its splits and the files each reads, and writes
``_read()``; ``from_config``, ``records()`` and ``describe()`` come from here:

    class VATEX(BenchmarkSource):
        name = "vatex"
        splits = {"train": ("train_list.txt", "vatex_data.json"), ...}
        download = "..."                                 # where the files come from, quoted in missing-file errors
        def _read(self) -> list[VideoRecord]: ...

Every file is read as UTF-8 (a BOM is accepted) and nothing in it is executed: JSON, CSV and plain text only here;
MSVD's one pickle has its own restricted reader in ``msvd.py``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, ClassVar, Iterator

from sharding.sources import VideoRecord


class AnnotationError(ValueError):
    """A missing or malformed annotation file: names the file, the split or the entry, and the fix."""


class BenchmarkSource:
    """One benchmark split read from the directory the user unpacked the benchmark's annotation files into."""

    name: ClassVar[str]
    splits: ClassVar[dict[str, tuple[str, ...]]]  # split -> the files it needs, relative to annotations=DIR
    optional: ClassVar[dict[str, tuple[str, ...]]] = {}  # split -> files read only when present
    download: ClassVar[str]  # where the files come from (quoted when one is missing)

    def __init__(self, annotations: str | Path, split: str):
        if split not in self.splits:
            raise AnnotationError(f"{self.name}: unknown split {split!r}; pass split= one of {', '.join(self.splits)}")
        if not annotations:
            raise AnnotationError(f"{self.name}: annotations is required: pass annotations=DIR, the directory holding "
                                  f"{', '.join(self.splits[split])}; {self.download}")
        self.root = Path(annotations)
        if not self.root.is_dir():
            raise AnnotationError(f"{self.root}: annotations directory not found; pass annotations=DIR, the directory "
                                  f"you unpacked the {self.name} annotation files into; {self.download}")
        self.split = split

    @classmethod
    def from_config(cls, cfg: Any) -> BenchmarkSource:
        """From any object with ``annotations`` and ``split`` attributes (the ShardConfig, or a namespace)."""
        return cls(getattr(cfg, "annotations", ""), getattr(cfg, "split", ""))

    def records(self) -> Iterator[VideoRecord]:
        """Every video of the split, in the annotation files' order; the files are read and checked first."""
        yield from self._read()

    def describe(self) -> dict[str, Any]:
        """The files this split reads (size in bytes, mtime) and the settings."""
        files = {}
        for p in self.files():
            st = p.stat()
            files[str(p)] = {"size": st.st_size, "mtime": st.st_mtime}
        return {"source": self.name, "annotations": str(self.root), "split": self.split, "files": files}

    def files(self) -> list[Path]:
        """The files this split reads: every required one (an error names any that is missing), then the optional
        ones that are present."""
        required = [self.path(n) for n in self.splits[self.split]]
        return required + [p for n in self.optional.get(self.split, ()) if (p := self.optional_path(n))]

    def path(self, filename: str) -> Path:
        """``annotations/filename``, which must exist."""
        p = self.root / filename
        if not p.is_file():
            raise AnnotationError(f"{p}: not found; split {self.split!r} of {self.name} needs {filename}; "
                                  f"{self.download}")
        return p

    def optional_path(self, filename: str) -> Path | None:
        p = self.root / filename
        return p if p.is_file() else None

    def _read(self) -> list[VideoRecord]:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# readers


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not valid UTF-8 ({e}); is this the file the benchmark ships?") from None


def read_id_list(path: Path) -> list[str]:
    """A split list: one id per line, surrounding whitespace stripped, blank lines skipped, repeats dropped (the
    first one kept, as the reference loaders do), file order kept."""
    ids = [line.strip() for line in read_text(path).splitlines()]
    return list(dict.fromkeys(i for i in ids if i))


def read_json(path: Path, expect: type, shape: str) -> Any:
    """A JSON file whose top level must be ``expect`` (dict or list); ``shape`` describes it for the error."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: not valid JSON ({e}); expected {shape}") from None
    if not isinstance(data, expect):
        raise AnnotationError(f"{path}: the top level must be {shape}, got a JSON {_json_type(data)}")
    return data


def read_csv(path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """``[(line number, row)]`` of a comma-separated file with a header holding at least ``columns``."""
    rows = []
    with path.open(newline="", encoding="utf-8-sig") as f:
        try:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in columns if c not in header]
            if missing:
                raise AnnotationError(f"{path}: the header must name the column(s) {', '.join(columns)}; missing "
                                      f"{', '.join(missing)} (header: {','.join(header) or 'none'})")
            for row in reader:
                if None in row or any(row[c] is None for c in columns):
                    raise AnnotationError(f"{path}: line {reader.line_num}: expected the {len(header)} columns of the "
                                          f"header ({','.join(header)}), got another count")
                rows.append((reader.line_num, {c: row[c].strip() for c in columns}))
        except UnicodeDecodeError as e:
            raise AnnotationError(f"{path}: not valid UTF-8 ({e})") from None
        except csv.Error as e:
            raise AnnotationError(f"{path}: line {reader.line_num}: not valid CSV ({e})") from None
    return rows


def read_tsv(path: Path, num_fields: int, layout: str) -> list[tuple[int, list[str]]]:
    """``[(line number, fields)]`` of a tab-separated file without a header, blank lines skipped; every line must
    have exactly ``num_fields`` fields (``layout`` names them for the error)."""
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != num_fields:
            raise AnnotationError(f"{path}: line {n}: expected {num_fields} tab-separated fields ({layout}), "
                                  f"got {len(fields)}")
        rows.append((n, fields))
    return rows


def text_list(value: Any, where: str, what: str) -> list[str]:
    """``value`` as a list of strings, or an error saying where it is and what was expected."""
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise AnnotationError(f"{where}: {what} must be a list of strings, got {_describe(value)}")
    return value


def number(value: Any, where: str, what: str) -> float:
    """``value`` as a finite, non-negative float, or an error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < float("inf")):
        raise AnnotationError(f"{where}: {what} must be a non-negative number, got {value!r}")
    return float(value)


def group_in_order(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """``{id: [text, ...]}`` from ``(id, text)`` pairs, ids in first-appearance order, texts in file order."""
    out: dict[str, list[str]] = {}
    for vid, text in pairs:
        out.setdefault(vid, []).append(text)
    return out


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
