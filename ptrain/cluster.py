"""Ray clusters: ``ptrain submit`` / ``ptrain jobs`` (the Ray Jobs API) and the Ray Train launcher of the recipes.

    ptrain submit [--address http://HEAD:8265] [--follow] [--resubmit] VERB [CONFIG.yaml] [key=value ...]
    ptrain jobs [--address URL]                         # ptrain's jobs on the cluster with their status
    ptrain jobs logs ID [--follow]                      # a job's output so far (or streamed to its end)
    ptrain jobs stop ID
    ptrain pretrain CONFIG.yaml ray.enabled=true ray.num_workers=8 ray.use_gpu=true ray.max_failures=3

With ``sharding/job.py`` this is the one module that imports ray (lazily: ``ptrain submit --help`` stays instant).

Submission: the config is loaded here first, so a bad key fails before anything reaches the cluster. Every path
of the config (``PATH_KEYS``) becomes absolute, resolved against this directory, because a job runs in a
directory of Ray's; an input that is relative and missing here is refused (give the path as the nodes see it). The
config file and every file it ``include:``s travel in the job's runtime environment (its ``working_dir``). The
submission id is ``ptrain-VERB-HASH`` of the verb and the resolved config: the same work submitted again is
refused with the existing job's id and status, unless ``--resubmit`` (ids ``...-2``, ``-3``, ...). ``shard`` jobs
join the job's cluster (``ray.address=auto``); ``pretrain`` / ``finetune`` jobs run under Ray Train
(``ray.enabled=true``). The dashboard's token (Ray's token authentication) is read as Ray's own tools read it:
``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``; ``RAY_AUTH_MODE=disabled``
sends none.

Ray Train (``ray.enabled=true``, docs/ray.md): :func:`train_on_ray` runs a recipe's ``train(cfg, on_checkpoint)``
in ``ray.num_workers`` TorchTrainer workers; Ray sets up the process group and ``ptrain.distributed.init`` uses it,
DeepSpeed runs inside each worker. The run directory (on a filesystem every node sees) is the checkpoint store:
once a checkpoint is COMPLETE on every rank, rank 0 reports a pointer to it to Ray. After a lost worker Ray restarts
the group (``ray.max_failures``) and every worker resumes from the newest complete checkpoint, at least the last
reported one: the same data cursor and steps as a rerun of the same command.

Exit status of ``ptrain submit`` / ``ptrain jobs``: 0 done, 1 a followed job did not succeed, 2 a bad command or
config, 3 the same work was already submitted, 4 the cluster could not be reached or refused the request.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from ptrain.config import ConfigError, config_files, config_to_dict, load_config
from ptrain.data.format import PROGRESS

SUBMITTABLE = ("shard", "pretrain", "finetune", "eval")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXIT_FAILED, EXIT_USAGE, EXIT_DUPLICATE, EXIT_CLUSTER = 1, 2, 3, 4
ACTIVE = ("PENDING", "RUNNING")  # job states in which a resubmission would run the same work twice at once
META = "ptrain_key"  # job metadata: the submission key (ptrain's jobs are the ones that carry it)
POINTER = "ptrain_checkpoint.json"  # the file of a checkpoint reported to Ray: where the real one is

# Where a verb's config names files: "out" resolves against this directory; "in" must exist to be resolved (a
# relative input that is missing here is refused); "maybe" is a path only when it exists here (else a name, e.g.
# model.clip=ViT-B/32). Values may be a string, a list of strings or a list of {path, weight} sources.
_TRAIN_PATHS = {"run_dir": "out", "data.sources": "in", "data.eval_sources": "in", "checkpoint.resume": "in",
                "model.clip": "maybe", "model.tokenizer": "in"}
PATH_KEYS: dict[str, dict[str, str]] = {
    "shard": {"videos": "in", "captions": "in", "video_list": "in", "annotations": "in", "out": "out"},
    "pretrain": _TRAIN_PATHS,
    "finetune": {**_TRAIN_PATHS, "init": "maybe", "test": "in"},
    "eval": {"export": "in", "shards": "in", "qb_norm_bank": "in", "out": "out", "probe.sample_meta": "in"},
}
_NOT_PATHS = ("", "auto", "none")  # checkpoint.resume's words, and unset values
_OUTPUT_KEYS = {"shard": "out", "pretrain": "run_dir", "finetune": "run_dir", "eval": "out"}


class ClusterError(RuntimeError):
    """The cluster could not be reached, or refused; the message names the address and the fix."""


class UsageError(ValueError):
    """A bad command line or config for ``ptrain submit`` / ``ptrain jobs``; the message says what to write."""


# ----------------------------------------------------------------------------------------------
# paths


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not hasattr(cfg, part):
            return None
        cfg = getattr(cfg, part)
    return cfg


def _set(cfg: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        cfg = getattr(cfg, part)
    setattr(cfg, last, value)


def _is_remote(value: str) -> bool:
    return "://" in value or value.startswith("pipe:")


def _absolute(key: str, kind: str, value: str, cwd: Path, refusals: list[str] | None) -> str:
    """``value`` made absolute against ``cwd`` when it is a relative path of this kind; refusals collect the
    relative inputs that do not exist here (when given)."""
    if not isinstance(value, str) or value in _NOT_PATHS or _is_remote(value) or Path(value).expanduser().is_absolute():
        return str(Path(value).expanduser()) if isinstance(value, str) and value.startswith("~") else value
    here = cwd / value
    pattern = any(c in value for c in "*?[{")  # a glob / brace pattern of shards: its files are not one path
    if kind == "maybe" and not here.exists():
        return value  # a name (model.clip=ViT-B/32, an HF id), not a path
    if kind == "in" and not pattern and not here.exists() and refusals is not None:
        refusals.append(f"{key}={value}: a relative path that does not exist here ({here}); on the cluster it would "
                        f"resolve against the job's own directory. Give it as an absolute path as the cluster's nodes "
                        f"see it ({key}=/shared/...)")
        return value
    return os.path.normpath(here)


def absolute_paths(verb: str, cfg: Any, cwd: Path, refusals: list[str] | None = None) -> dict[str, Any]:
    """The path values of ``cfg`` (``PATH_KEYS[verb]``) that change when made absolute: ``{dotted key: new value}``."""
    changes = {}
    for key, kind in PATH_KEYS.get(verb, {}).items():
        value = _get(cfg, key)
        if isinstance(value, str):
            new: Any = _absolute(key, kind, value, cwd, refusals)
        elif isinstance(value, list):
            new = [dict(v, path=_absolute(key, kind, v["path"], cwd, refusals))
                   if isinstance(v, dict) and isinstance(v.get("path"), str) else _absolute(key, kind, v, cwd, refusals)
                   for v in value]
        else:
            continue
        if new != value:
            changes[key] = new
    return changes


def with_absolute_paths(verb: str, cfg: Any, cwd: Path | None = None) -> Any:
    """A copy of ``cfg`` whose relative paths are absolute (against ``cwd``, default this directory)."""
    out = copy.deepcopy(cfg)
    for key, value in absolute_paths(verb, cfg, cwd or Path.cwd()).items():
        _set(out, key, value)
    return out


def _override(key: str, value: Any) -> str:
    """``key=value`` as ``ptrain.config.parse_overrides`` reads it back (a string field keeps the raw text)."""
    if isinstance(value, str):
        return f"{key}={value}"
    import yaml

    return f"{key}={yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()}"


def submission_key(verb: str, cfg: Any) -> str:
    """``ptrain-VERB-HASH``: the same verb and resolved config give the same id, on any machine."""
    text = json.dumps({"verb": verb, "config": config_to_dict(cfg)}, sort_keys=True, default=str)
    return f"ptrain-{verb}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


# ----------------------------------------------------------------------------------------------
# the Jobs API client


def auth_token() -> tuple[str | None, str]:
    """(token, where it came from) as Ray's own tools look for it; (None, why) when there is none to send."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None, "RAY_AUTH_MODE=disabled"
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "")
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token file ({e.strerror or e}); fix the "
                               "path or unset it") from None
        if not token:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path}: the token file is empty; put the cluster's token in it "
                               "(`ray get-auth-token` on the head prints it)")
        return token, f"RAY_AUTH_TOKEN_PATH={path}"
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        token = default.read_text().strip()
        if token:
            return token, str(default)
    return None, f"no token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH and {default} are all unset or empty)"


def default_address() -> str:
    """--address, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS when it is the dashboard's http(s) URL, else loopback."""
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(name, "")
        if value.startswith(("http://", "https://")):
            return value
    return DEFAULT_ADDRESS


def _unreachable(address: str, timeout: float = 5.0) -> str | None:
    """Why nothing answers at the dashboard URL (within seconds, where an HTTP client can wait much longer)."""
    from urllib.parse import urlsplit

    try:
        url = urlsplit(address)
        host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    except ValueError as e:
        return f"not a URL ({e})"
    if url.scheme not in ("http", "https") or not host:
        return "not an http(s)://HOST:PORT URL"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"nothing answers at {host}:{port} ({e.strerror or e})"


def _refused(address: str, error: Exception, source: str, sent: bool) -> ClusterError:
    what = (f"the token from {source} was rejected" if sent else f"no token was sent: {source}")
    return ClusterError(
        f"the Ray dashboard at {address} refused the request ({what}).\n  The cluster uses token authentication: "
        "run `ray get-auth-token` on the head node and give that token as RAY_AUTH_TOKEN=... (or put it in "
        f"~/.ray/auth_token, or name a file with RAY_AUTH_TOKEN_PATH). Ray said: {str(error).splitlines()[0]}")


class Jobs:
    """ptrain's view of one cluster's Jobs API (``JobSubmissionClient``) with errors that say what to do."""

    def __init__(self, address: str):
        self.address = address.rstrip("/")
        why = _unreachable(self.address)
        if why:
            raise ClusterError(
                f"cannot reach the Ray dashboard at {self.address}: {why}.\n  Start a cluster (`ray start --head "
                "--dashboard-host 127.0.0.1` on the head; README 'Running on a Ray cluster'), or give its dashboard "
                "with --address http://HEAD:8265 (or RAY_ADDRESS); over SSH, forward the port: ssh -L 8265:localhost:8265 HEAD")
        token, self.token_source = auth_token()
        self.sent_token = token is not None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        from ray.job_submission import JobSubmissionClient

        self.client = self._call(lambda: JobSubmissionClient(self.address, headers=headers))

    def _call(self, fn: Callable[[], Any]) -> Any:
        from ray.exceptions import AuthenticationError

        try:
            return fn()
        except AuthenticationError as e:
            raise _refused(self.address, e, self.token_source, self.sent_token) from None
        except ConnectionError as e:
            raise ClusterError(f"lost the Ray dashboard at {self.address}: {e}; check that the head is up "
                               "(`ray status` on it)") from None

    def ptrain_jobs(self) -> list:
        jobs = self._call(self.client.list_jobs)
        return sorted((j for j in jobs if (j.metadata or {}).get(META)), key=lambda j: j.start_time or 0)

    def attempts(self, key: str) -> list:
        """The jobs of one submission key, oldest first (the first, then ``-2``, ``-3`` ... of --resubmit)."""
        return [j for j in self.ptrain_jobs() if j.metadata.get(META) == key]

    def info(self, job_id: str):
        try:
            return self._call(lambda: self.client.get_job_info(job_id))
        except RuntimeError as e:
            if "does not exist" in str(e) or "404" in str(e):
                return None
            raise

    def submit(self, **kwargs) -> str:
        return self._call(lambda: self.client.submit_job(**kwargs))

    def follow(self, job_id: str, out=None) -> str:
        """Stream the job's output until it ends (Ctrl-C stops following, not the job); returns its status."""
        import asyncio

        out = out or sys.stdout

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()

        try:
            self._call(lambda: asyncio.run(tail()))
        except KeyboardInterrupt:
            print(f"\nstopped following; the job goes on (`ptrain jobs logs {job_id} --follow`, "
                  f"`ptrain jobs stop {job_id}`)", file=sys.stderr)
            return "RUNNING"
        # the log stream can close a moment before the status is final
        deadline = time.monotonic() + 60
        while True:
            status = str(self._call(lambda: self.client.get_job_status(job_id)).value)
            if status not in ACTIVE or time.monotonic() > deadline:
                return status
            time.sleep(0.5)


# ----------------------------------------------------------------------------------------------
# ptrain submit / ptrain jobs


SUBMIT_USAGE = """usage: ptrain submit [--address http://HEAD:8265] [--follow] [--resubmit] VERB [CONFIG.yaml] [key=value ...]

Submit `ptrain VERB` (shard, pretrain, finetune, eval) to a Ray cluster as a job (the Ray Jobs API).
  --address URL   the head's dashboard (default: RAY_ADDRESS when it is http(s)://..., else http://127.0.0.1:8265)
  --follow        stream the job's output until it ends; the exit status is the job's (0 when it succeeded)
  --resubmit      run it again although the same work was submitted before (refused while that job still runs)

Relative paths are resolved against this directory (an input missing here is refused: give the path as the
cluster's nodes see it); the config file and the files it includes travel with the job. ptrain must be installed
on every node. `shard` joins the cluster (ray.address=auto); `pretrain` / `finetune` run under Ray Train
(ray.enabled=true, ray.num_workers, ray.use_gpu, ray.max_failures: docs/ray.md). Token authentication: the token
is read from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, as Ray's own tools do.
Exit status: 0 submitted (or succeeded with --follow), 1 the followed job failed, 2 a bad command or config,
3 already submitted, 4 the cluster could not be reached or refused."""

JOBS_USAGE = """usage: ptrain jobs [--address URL]              list ptrain's jobs on the cluster (id, status, verb, progress,
                                          outputs; a shard job's progress is read from its out/progress.json)
       ptrain jobs logs ID [--follow]     a job's output (--follow: until it ends)
       ptrain jobs stop ID                stop a job (its workers are stopped too)

--address: the head's dashboard (default: RAY_ADDRESS when it is http(s)://..., else http://127.0.0.1:8265)."""


def _parse(argv: list[str], flags: dict[str, bool], usage: str) -> tuple[dict[str, Any], list[str]]:
    """Our own ``--flags`` (``flags``: name -> takes a value), anywhere on the line; the other arguments in order.
    Raises UsageError for an unknown flag."""
    opts: dict[str, Any] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        name, eq, value = a.partition("=")
        if a.startswith("-") and name in flags:
            if flags[name]:
                if not eq:
                    if i + 1 >= len(argv):
                        raise UsageError(f"{name} needs a value\n\n{usage}")
                    value, i = argv[i + 1], i + 1
                opts[name] = value
            else:
                opts[name] = True
        elif a.startswith("--"):
            raise UsageError(f"unknown flag {a!r}; config values are given as key=value\n\n{usage}")
        else:
            rest.append(a)
        i += 1
    return opts, rest


def prepare(verb: str, rest: list[str], cwd: Path) -> dict[str, Any]:
    """Everything a submission is made of, checked here: the resolved config, its key, the files to carry, the
    command the job runs. Raises UsageError."""
    from ptrain.cli import config_class

    if verb not in SUBMITTABLE:
        raise UsageError(f"`ptrain submit` runs {', '.join(SUBMITTABLE)}, not {verb!r}\n\n{SUBMIT_USAGE}")
    path, overrides = (rest[0], rest[1:]) if rest and "=" not in rest[0] else (None, list(rest))
    cls = config_class(verb)
    try:
        cfg = load_config(cls, path, overrides)
    except ConfigError as e:
        raise UsageError(f"ptrain {verb}: {e}") from None
    added: list[str] = []
    if verb == "shard" and not _get(cfg, "ray.address"):
        added.append("ray.address=auto")  # the tasks run on the job's cluster, not a Ray of their own
    if verb in ("pretrain", "finetune") and not cfg.ray.enabled:
        added.append("ray.enabled=true")  # the job's entrypoint is the driver; the ranks are Ray Train workers
    refusals: list[str] = []
    changes = absolute_paths(verb, cfg, cwd, refusals)
    if refusals:
        raise UsageError("ptrain submit: " + "\n  ".join(refusals))
    kept = [o for o in overrides if o.partition("=")[0].strip() not in changes]
    final = kept + added + [_override(k, v) for k, v in changes.items()]
    cfg = load_config(cls, path, final)
    files = config_files(path) if path else []
    return {"verb": verb, "cfg": cfg, "key": submission_key(verb, cfg), "files": files, "overrides": final,
            "resolved": changes, "output": _get(cfg, _OUTPUT_KEYS[verb])}


def _working_dir(files: list[Path], into: Path) -> str | None:
    """Copy the config files under ``into/config`` with their relative layout; returns the main file's path there."""
    if not files:
        return None
    root = Path(os.path.commonpath([f.parent for f in files]))
    for f in files:
        target = into / "config" / f.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
    return (Path("config") / files[0].relative_to(root)).as_posix()


def _describe(job) -> str:
    return f"{job.submission_id} ({job.status.value if hasattr(job.status, 'value') else job.status})"


def submit_main(argv: list[str]) -> int:
    from ptrain.cli import print_help

    try:
        opts, rest = _parse(argv, {"--address": True, "--follow": False, "--resubmit": False, "--help": False,
                                   "-h": False}, SUBMIT_USAGE)
        if opts.get("--help") or opts.get("-h"):
            print_help(SUBMIT_USAGE)
            return 0
        if not rest:
            raise UsageError(f"which verb?\n\n{SUBMIT_USAGE}")
        plan = prepare(rest[0], rest[1:], Path.cwd())
    except UsageError as e:
        print(f"ptrain submit: {e}" if not str(e).startswith("ptrain ") else str(e), file=sys.stderr)
        return EXIT_USAGE
    address = opts.get("--address") or default_address()
    verb, key = plan["verb"], plan["key"]
    try:
        jobs = Jobs(address)
        attempts = jobs.attempts(key)
        if attempts and not opts.get("--resubmit"):
            last = attempts[-1]
            print(f"ptrain submit: this {verb} job was already submitted as {_describe(last)}; the same verb and "
                  f"resolved config give the same id, so it is not run twice.\n  `ptrain jobs logs "
                  f"{last.submission_id}` shows its output; --resubmit runs it again.", file=sys.stderr)
            return EXIT_DUPLICATE
        if attempts and str(attempts[-1].status.value) in ACTIVE:
            print(f"ptrain submit: --resubmit refused: {_describe(attempts[-1])} is still running the same work; "
                  f"stop it first (`ptrain jobs stop {attempts[-1].submission_id}`)", file=sys.stderr)
            return EXIT_DUPLICATE
        job_id = key if not attempts else f"{key}-{1 + max(_attempt_number(key, j.submission_id) for j in attempts)}"
        with tempfile.TemporaryDirectory(prefix="ptrain-submit-") as tmp:
            config_path = _working_dir(plan["files"], Path(tmp))
            entry = ["ptrain", verb] + ([config_path] if config_path else []) + plan["overrides"]
            metadata = {META: key, "ptrain_verb": verb, "ptrain_output": str(plan["output"] or ""),
                        "ptrain_config": str(plan["files"][0]) if plan["files"] else ""}
            try:
                jobs.submit(entrypoint=shlex.join(entry), submission_id=job_id, metadata=metadata,
                            runtime_env={"working_dir": tmp} if config_path else None)
            except RuntimeError as e:
                if "already exists" not in str(e):
                    raise
                existing = jobs.info(job_id)  # a concurrent `ptrain submit` of the same work won the race
                print(f"ptrain submit: this {verb} job was already submitted as {job_id} "
                      f"({existing.status.value if existing else '?'})", file=sys.stderr)
                return EXIT_DUPLICATE
        for k, v in plan["resolved"].items():
            print(f"ptrain submit: {k} resolved to {v}", file=sys.stderr)
        print(f"submitted {job_id} to {jobs.address}: {shlex.join(entry)}")
        print(f"  outputs: {plan['output']}\n  watch: ptrain jobs logs {job_id} --follow   stop: ptrain jobs stop {job_id}")
        if not opts.get("--follow"):
            return 0
        status = jobs.follow(job_id)
        print(f"job {job_id}: {status}")
        return 0 if status == "SUCCEEDED" else EXIT_FAILED
    except ClusterError as e:
        print(f"ptrain submit: {e}", file=sys.stderr)
        return EXIT_CLUSTER
    except RuntimeError as e:  # the Jobs API's own refusals (a runtime env it cannot set up, a server error)
        print(f"ptrain submit: the Ray dashboard at {address} refused the job: {str(e).strip()}", file=sys.stderr)
        return EXIT_CLUSTER


def _attempt_number(key: str, job_id: str) -> int:
    """1 for ``key`` itself, N for ``key-N`` (--resubmit's ids)."""
    suffix = job_id[len(key) + 1:]
    return int(suffix) if job_id.startswith(key + "-") and suffix.isdigit() else 1


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _progress(metadata: dict) -> str:
    """A shard job's progress as its output directory (the submission's ``ptrain_output``) shows it: shards
    committed, clips done, failures, ETA; "-" for other verbs, or when the directory is not visible from here."""
    out = metadata.get("ptrain_output", "")
    if metadata.get("ptrain_verb") != "shard" or not out:
        return "-"
    try:
        p = json.loads((Path(out) / PROGRESS).read_text())
        text = (f"{p['shards_committed']}/{p['shards_total']} shards, {p['clips_in_done_groups']}/{p['clips_total']} "
                f"clips, {sum(p['failures_by_class'].values())} failures")
        if p["state"] == "running":
            text += f", ETA {_duration(p['eta_s'])}"
        return f"{text} ({p['state']})"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "-"  # not written yet, not on this machine's filesystem, or another version's


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def jobs_main(argv: list[str]) -> int:
    from ptrain.cli import print_help

    try:
        opts, rest = _parse(argv, {"--address": True, "--follow": False, "--help": False, "-h": False}, JOBS_USAGE)
        if opts.get("--help") or opts.get("-h"):
            print_help(JOBS_USAGE)
            return 0
        action, ids = (rest[0], rest[1:]) if rest else ("list", [])
        if action not in ("list", "logs", "stop") or (action != "list" and len(ids) != 1) or (action == "list" and ids):
            raise UsageError(JOBS_USAGE)
    except UsageError as e:
        print(f"ptrain jobs: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        jobs = Jobs(opts.get("--address") or default_address())
        if action == "list":
            rows = [(j.submission_id, str(j.status.value), j.metadata.get("ptrain_verb", ""), _when(j.start_time),
                     _when(j.end_time), _progress(j.metadata), j.metadata.get("ptrain_output", ""))
                    for j in jobs.ptrain_jobs()]
            if not rows:
                print(f"no ptrain jobs on {jobs.address}")
                return 0
            rows.insert(0, ("ID", "STATUS", "VERB", "STARTED", "ENDED", "PROGRESS", "OUTPUTS"))
            widths = [max(len(r[i]) for r in rows) for i in range(6)]
            for r in rows:
                print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[6])
            return 0
        job_id = ids[0]
        info = jobs.info(job_id)
        if info is None:
            print(f"ptrain jobs: no job {job_id!r} on {jobs.address}; `ptrain jobs` lists ptrain's jobs",
                  file=sys.stderr)
            return EXIT_USAGE
        if action == "logs":
            if opts.get("--follow"):
                status = jobs.follow(job_id)
                print(f"job {job_id}: {status}")
                return 0 if status == "SUCCEEDED" else EXIT_FAILED
            sys.stdout.write(jobs._call(lambda: jobs.client.get_job_logs(job_id)))
            return 0
        if str(info.status.value) not in ACTIVE:
            print(f"job {job_id} already ended: {info.status.value}")
            return 0
        jobs._call(lambda: jobs.client.stop_job(job_id))
        deadline = time.monotonic() + 60
        status = str(info.status.value)
        while status in ACTIVE and time.monotonic() < deadline:
            time.sleep(0.5)
            status = str(jobs._call(lambda: jobs.client.get_job_status(job_id)).value)
        print(f"job {job_id}: {status}" + (" (still stopping: check again with `ptrain jobs`)" if status in ACTIVE else ""))
        return 0
    except ClusterError as e:
        print(f"ptrain jobs: {e}", file=sys.stderr)
        return EXIT_CLUSTER
    except RuntimeError as e:
        print(f"ptrain jobs: the Ray dashboard refused the request: {str(e).strip()}", file=sys.stderr)
        return EXIT_CLUSTER


# ----------------------------------------------------------------------------------------------
# Ray Train


class RecipeExit(RuntimeError):
    """A recipe returned a non-zero exit status in a Ray Train worker (Ray sees it as a worker failure)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code

    def __reduce__(self):  # why: it crosses processes; the default pickling would drop ``code``
        return (RecipeExit, (str(self), self.code))


def _resume_from_report(cfg: Any, reported_dir: str | None, verb: str) -> Any:
    """``cfg`` resuming from the newest complete checkpoint of its run_dir when Ray restarted the group after a
    report (``reported_dir``: the restored checkpoint's directory, holding our pointer); ``cfg`` otherwise."""
    if reported_dir is None:
        return cfg
    from ptrain import checkpoint as ckpt

    pointer = json.loads((Path(reported_dir) / POINTER).read_text())
    reported = Path(pointer["checkpoint"])
    if not (reported / ckpt.COMPLETE).is_file():
        raise RuntimeError(
            f"Ray Train restarted this run from {reported} (reported complete at step {pointer['step']}), but this "
            f"worker on {socket.gethostname()} does not see it: run_dir ({cfg.run_dir}) must be on a filesystem every "
            "node sees (NFS, a cluster filesystem); if the checkpoint was deleted, start the run again")
    newest = ckpt.latest_complete(cfg.run_dir) or reported
    print(f"ptrain {verb}: restarted by Ray Train after a failure; resuming from {newest} (last reported: "
          f"{reported.name})", file=sys.stderr, flush=True)
    out = copy.deepcopy(cfg)
    out.checkpoint.resume = str(newest)
    return out


def _train_worker(config: dict) -> None:
    """One Ray Train worker = one rank: the recipe's ``train`` with a checkpoint hook that reports to Ray."""
    import ray.train

    from ptrain.cli import resolve

    cfg, verb = config["cfg"], config["verb"]
    if not cfg.ray.use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # why: DeepSpeed picks CUDA whenever torch sees a GPU
    restored = ray.train.get_checkpoint()
    if restored is None:
        cfg = _resume_from_report(cfg, None, verb)
    else:
        with restored.as_directory() as d:
            cfg = _resume_from_report(cfg, d, verb)
    rank = ray.train.get_context().get_world_rank()

    def report(path: Path, pos) -> None:
        # every rank reports (Ray's report is a barrier); rank 0 attaches the pointer, after COMPLETE is written
        metrics = {"step": pos.step, "samples_seen": pos.samples_seen}
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="ptrain-report-") as d:
            Path(d, POINTER).write_text(json.dumps({"checkpoint": str(Path(path).resolve()), **metrics}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=Path(path).name)

    code = resolve(config["recipe"])(cfg, on_checkpoint=report)
    if code:
        raise RecipeExit(f"ptrain {verb} exited with status {code} on rank {rank}", int(code))


def _exit_code(error: BaseException) -> int:
    """The recipe's exit status inside a Ray Train failure (1 when it was not a recipe's exit)."""
    failures = getattr(error, "worker_failures", None) or {}
    for e in failures.values():
        while e is not None:
            if isinstance(e, RecipeExit):
                return e.code
            e = getattr(e, "cause", None) or e.__cause__
    return 1


def single_machine_ray():
    """``ray`` in its single-machine mode, for a Ray of our own on this machine: every port on loopback. In its
    multi-node default Ray replaces 127.0.0.1 by the machine's address, so a Ray that ``ray.init()`` starts listens
    on all interfaces, and a driver cannot reach a GCS that listens on loopback only (it retries for many minutes;
    docs/ray.md). Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when it is first imported: where an earlier
    import (the caller's, a library's, another test's) read it unset, the mode is set on the imported module too."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    return ray


def _init_ray(address: str | None):
    joining = bool(address or os.environ.get("RAY_ADDRESS"))
    if joining:
        import ray
    else:
        ray = single_machine_ray()

    if ray.is_initialized():
        return ray
    if joining:
        ray.init(address=address or None, logging_level="WARNING")
    else:
        # the dashboard (on loopback) serves the state API that Ray Train's placement group cleaner polls
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
                 logging_level="WARNING")
    return ray


def train_on_ray(cfg: Any, recipe: str, verb: str) -> int:
    """The driver of ``ptrain pretrain|finetune ray.enabled=true``: check the inputs, then run ``recipe``
    (``module:function``, ``train(cfg, on_checkpoint)``) in Ray Train workers; returns the exit status."""
    from ptrain import checkpoint as ckpt
    from ptrain.data import discover_sources

    # paths are made absolute here: the workers may run in another directory, on another node
    cfg = with_absolute_paths(verb, cfg)
    try:
        discover_sources(cfg.data)
        ckpt.resolve_resume(cfg.run_dir, cfg.checkpoint)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"ptrain {verb}: {e}", file=sys.stderr, flush=True)
        return 2
    if cfg.checkpoint.resume == "none":  # checked empty just now: a restart must find this run's own checkpoints
        cfg.checkpoint.resume = "auto"
    rc = cfg.ray
    try:
        ray = _init_ray(rc.address)
    except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError, ...: all mean "no Ray to run on"
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"ptrain {verb}: cannot start or join Ray (ray.address={rc.address!r}): {why}\n  Submit it with "
              "`ptrain submit`, start a cluster (`ray start --head`) and set ray.address=auto, or leave ray.address "
              "unset to start a local Ray", file=sys.stderr, flush=True)
        return 2
    # Ray Train would also send every print of a worker through its logger, which doubles each line in the logs
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": rc.cpus_per_worker, **({"GPU": rc.gpus_per_worker} if rc.use_gpu else {})}
    missing = {k: v * rc.num_workers for k, v in resources.items()
               if v * rc.num_workers > ray.cluster_resources().get(k, 0)}
    if missing:
        # why: Ray Train would wait for these resources without saying so; a cluster may still grow (autoscaling)
        have = {k: ray.cluster_resources().get(k, 0) for k in missing}
        print(f"ptrain {verb}: {rc.num_workers} worker(s) need {missing} in all, the cluster has {have} now; lower "
              "ray.num_workers / ray.cpus_per_worker / ray.gpus_per_worker, or add nodes"
              + (" (waiting for them)" if rc.address or os.environ.get("RAY_ADDRESS") else ""), file=sys.stderr,
              flush=True)
        if not (rc.address or os.environ.get("RAY_ADDRESS")):  # a Ray of our own never grows
            ray.shutdown()
            return 2
    name = f"{verb}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"  # Ray's own restore stays within one invocation
    storage = Path(cfg.run_dir) / "ray"
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"cfg": cfg, "recipe": recipe, "verb": verb},
        scaling_config=ScalingConfig(num_workers=rc.num_workers, use_gpu=rc.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(timeout_s=cfg.engine.dist_timeout_s),
        run_config=RunConfig(name=name, storage_path=str(storage), failure_config=FailureConfig(max_failures=rc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    print(f"ptrain {verb}: Ray Train, {rc.num_workers} worker(s) x {resources}, max_failures={rc.max_failures}, "
          f"run_dir {cfg.run_dir} (Ray's records: {storage / name})", file=sys.stderr, flush=True)
    from ray.train import TrainingFailedError

    try:
        trainer.fit()
    except TrainingFailedError as e:
        code = _exit_code(e)
        latest = ckpt.latest_complete(cfg.run_dir)
        where = f"newest complete checkpoint: {latest}; rerun the same command to resume from it" if latest else \
            "no complete checkpoint yet: a rerun starts over"
        print(f"ptrain {verb}: Ray Train failed (exit {code}) after {rc.max_failures} allowed restart(s): "
              f"{str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}\n  {where}",
              file=sys.stderr, flush=True)
        return code
    finally:
        if not os.environ.get("RAY_ADDRESS") and not rc.address:
            ray.shutdown()
    return 0

