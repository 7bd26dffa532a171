"""``ptrain VERB [CONFIG.yaml] [dotted.key=value ...]`` — dispatch only.

Each verb names its root config dataclass and its ``run(cfg)`` function as import strings, so that
``ptrain``, ``ptrain --version`` and ``ptrain VERB --help`` never import torch, ray or deepspeed. The cluster
commands (``ptrain submit``, ``ptrain jobs``) take flags of their own: they name a ``main(argv)`` instead. A
``--local_rank=N`` that a launcher puts among the arguments (``deepspeed --module ptrain ...``, or
``deepspeed launch/pretrain.sh ...``, which runs that file with Python) is taken out: ranks read
``LOCAL_RANK`` from the environment. A config class with ``POSITIONAL = "key"`` takes its bare arguments as that
list key instead of a config file (``ptrain report RUN_A RUN_B`` = ``ptrain report runs=[RUN_A,RUN_B]``).
"""

from __future__ import annotations

import importlib
import json
import os
import sys

from ptrain.config import ConfigError, config_help, load_config

# verb -> (config class, run function, one-line summary)
VERBS: dict[str, tuple[str, str, str]] = {
    "sample-data": (
        "ptrain_demo.corpus:SampleDataConfig",
        "ptrain_demo.corpus:run",
        "generate a HowTo100M-style corpus of moving-shape videos + ASR captions",
    ),
    "shard": (
        "sharding.config:ShardConfig",
        "sharding.job:run",
        "videos + timestamped captions -> WebDataset shards of JPEG frames (Ray)",
    ),
    "pretrain": (
        "ptrain.configs:PretrainConfig",
        "ptrain.pretrain:run",
        "contrastive post-pretraining with DeepSpeed ZeRO on shards (one process per rank; see launch/pretrain.sh)",
    ),
    "finetune": (
        "ptrain.configs:FinetuneConfig",
        "ptrain.finetune:run",
        "fine-tune on a benchmark from an export or a CLIP: select on validation, test once (see launch/finetune.sh)",
    ),
    "eval": (
        "ptrain_demo.eval:EvalWithProbeConfig",
        "ptrain_demo.eval:run",
        "embed held-out shards with an export and report R@1/5/10, MdR, MnR (+ the sample-data direction probe)",
    ),
    "convert": (
        "ptrain.model.config:ConvertConfig",
        "ptrain.model.convert:run",
        "import a CLIP4Clip / CLIP2Video checkpoint (or OpenAI/HF CLIP) into a ptrain export directory",
    ),
    "report": (
        "ptrain.report:ReportConfig",
        "ptrain.report:run",
        "runs' results side by side with the papers' numbers (report.md) + training curves (PNG)",
    ),
}

# command -> (main(argv) -> exit status, one-line summary): commands with --flags of their own, no config class
COMMANDS: dict[str, tuple[str, str]] = {
    "submit": (
        "ptrain.cluster:submit_main",
        "[--address URL] [--follow] [--resubmit] VERB [CONFIG] [key=value ...]: run a verb as a Ray cluster job",
    ),
    "jobs": ("ptrain.cluster:jobs_main", "ptrain's jobs on a Ray cluster: list, `logs ID [--follow]`, `stop ID`"),
}


def resolve(ref: str):
    """The object an import string ``module:attr`` names (imports the module)."""
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)




def config_class(verb: str) -> type:
    """The root config dataclass of ``verb`` (imports only stdlib-only config modules)."""
    return resolve(VERBS[verb][0])


def usage() -> str:
    width = max(len(v) for v in [*VERBS, *COMMANDS])
    lines = ["usage: ptrain VERB [CONFIG.yaml] [dotted.key=value ...]   (ptrain --version)", "", "verbs:"]
    lines += [f"  {v.ljust(width)}  {VERBS[v][2]}" for v in VERBS]
    lines += ["", "on a Ray cluster (README: Running on a Ray cluster):"]
    lines += [f"  {v.ljust(width)}  {COMMANDS[v][1]}" for v in COMMANDS]
    lines += ["", "`ptrain VERB --help` lists the verb's keys with their defaults (or the command's flags)."]
    return "\n".join(lines)


def print_help(text: str) -> None:
    """Print to stdout; a reader that closed the pipe early (``ptrain shard --help | head``) is not an error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # what Python's docs advise: point stdout at devnull so the interpreter's final flush cannot fail too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def strip_local_rank(argv: list[str]) -> list[str]:
    """``argv`` without the ``--local_rank=N`` / ``--local_rank N`` a launcher inserts (its value goes to the
    ``LOCAL_RANK`` environment variable when that is unset, as torch's launchers do)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        name, eq, value = a.partition("=")
        if name in ("--local_rank", "--local-rank"):
            if not eq and i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            os.environ.setdefault("LOCAL_RANK", value)
        else:
            out.append(a)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print_help(usage())
        return 0
    if argv[0] in ("--version", "-V", "version"):
        from ptrain.version import __version__

        print_help(f"ptrain {__version__}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb in COMMANDS:
        return int(resolve(COMMANDS[verb][0])(rest))
    if verb not in VERBS:
        import difflib

        close = difflib.get_close_matches(verb, [*VERBS, *COMMANDS], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"ptrain: unknown verb {verb!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    cfg_ref, run_ref, summary = VERBS[verb]
    cfg_cls = resolve(cfg_ref)
    listed = getattr(cfg_cls, "POSITIONAL", "")
    if any(a in ("-h", "--help") for a in rest):
        inputs = f"{listed.upper()}..." if listed else "[CONFIG.yaml]"
        print_help("\n".join([f"ptrain {verb} {inputs} [dotted.key=value ...]", "", summary, "", "keys:",
                                *config_help(cfg_cls)]))
        return 0
    stray = [a for a in rest if a.startswith("--")]
    if stray:
        launched = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        why = (" This process is a rank that a launcher started: launch settings such as --gpus belong to the "
               "launcher's own command line (or to launch/pretrain.sh run from a plain shell), not to a rank."
               if launched else "")
        print(f"ptrain {verb}: unexpected flag {stray[0]!r}; config values are given as key=value.{why}",
              file=sys.stderr)
        return 2
    path = None
    if listed:  # a verb whose bare arguments are its inputs (`ptrain report RUN...`), not a config file
        bare = [a for a in rest if "=" not in a]
        rest = [a for a in rest if "=" in a] + ([f"{listed}={json.dumps(bare)}"] if bare else [])
    elif rest and "=" not in rest[0]:
        path, rest = rest[0], rest[1:]
    try:
        cfg = load_config(cfg_cls, path, rest)
    except ConfigError as e:
        print(f"ptrain {verb}: {e}", file=sys.stderr)
        return 2
    result = resolve(run_ref)(cfg)
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
