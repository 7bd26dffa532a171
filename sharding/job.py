"""`ptrain shard`: Ray orchestration of plan -> decode -> shard writing. The only module that imports ray.

    ptrain shard videos=DIR|LIST captions=caption.json out=SHARDS [video_list=HowTo100M_v1.csv] [dry_run=true] ...
    ptrain shard configs/shard/msvd.yaml annotations=DIR videos=DIR split=test out=SHARDS     # a benchmark split
    ray job submit --address http://127.0.0.1:8265 -- ptrain shard ... ray.address=auto

1. The driver plans, streaming: the source yields one video at a time, its clips are packed into shard groups, and
   each group is written to ``OUT/.ptrain_shard/plans/<plan_hash>/`` as soon as it is full (``sharding/planstore``).
   A rerun with the same inputs (files by size and mtime) and settings reuses the stored plan.
2. Resume: a group whose record says it is done, and whose shards' tars and sidecars have the sizes and mtimes
   the record states, is skipped without reading a byte of it (``verify`` re-hashes on request).
3. Each pending group runs as decode tasks (``videos_per_decode_task`` videos each; they read their slice of the
   group's plan file and return the JPEG-encoded samples through the object store) and one writer task that
   receives them, writes the group's shards atomically and leaves the group's record (its failures, its shards'
   sizes and mtimes). At most ``ray.window`` tasks are in flight; the next ones are submitted only as tasks
   finish, in plan order, so decoded frames wait in the object store for at most the groups in the window.
   Each task is placed on the node with the fewest of the job's tasks in flight per CPU (soft node affinity: a
   node that is gone falls back to any other), so every node works from the first window on; ``progress.json``
   counts the finished tasks of each node.
4. ``progress.json``, ``errors.jsonl`` and ``manifest.json`` are written as groups finish (watchable while the job
   runs) and rewritten whole, in plan order, at the end: a rerun never duplicates a line.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import secrets
import socket
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from ptrain.data.format import ERRORS, MANIFEST, PROGRESS, shard_stem
from sharding.config import ShardConfig
from sharding.plan import index_videos, planned_clip
from sharding.planstore import (
    StoredPlan,
    build_plan,
    discard,
    inputs_key,
    read_group,
    reusable_plan,
    videos_facts,
)
from sharding.sources import CaptionError, open_source
from sharding.sources.benchmark import AnnotationError
from sharding.write import (
    ForeignShardsError,
    caption_counts,
    clip_sample,
    foreign_plan_message,
    resume_scan,
    shard_facts,
    summary,
    write_atomic,
    write_shard,
)

STATE_DIR = ".ptrain_shard"  # plan marker, stored plans, lock, group records and the ledger
LOCK_WAIT_S = 20.0  # a killed run's local Ray holds the lock until it is gone (a few seconds)


def _versions() -> dict:
    import numpy
    import simplejpeg

    import ptrain
    from sharding.decode import pyav

    return {"ptrain": ptrain.__version__, "av": pyav.version(), "simplejpeg": simplejpeg.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def _error(video_id, stage, cls, message, clip_index=None, key=None, clips=None) -> dict:
    e = {"video_id": video_id, "clip_index": clip_index, "key": key, "stage": stage, "class": cls,
         "message": message}
    if clips is not None:
        e["clips"] = clips
    return e


# ----------------------------------------------------------------------------------------------
# Ray task bodies (plain functions: testable without Ray)

_WORKER = None


def _node_id() -> str | None:
    """The Ray node this task runs on; None outside Ray (the task bodies are plain functions)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


def _decode_worker():
    """One decoder child per Ray worker process, reused across tasks (Ray reuses its workers): the child's
    start-up cost is paid once, and a hung child is killed and replaced by DecodeWorker itself."""
    global _WORKER
    if _WORKER is None:
        from sharding.decode.worker import DecodeWorker

        _WORKER = DecodeWorker()
    return _WORKER


def decode_videos(group_file: str, start: int, stop: int, opts: dict, skip_shards: list[int]):
    """Decode videos ``start:stop`` of a group's plan file, each once for all its clips. Returns ``(summary,
    samples)`` (two Ray objects: the driver reads only the small summary, the writer takes the samples)."""
    from sharding.decode.video import ExtractError

    from sharding.decode.worker import decode_planned

    worker = _decode_worker()
    skip = set(skip_shards)
    samples: dict[int, list] = defaultdict(list)
    errors: list[dict] = []
    clips_seen = 0
    for vid, path, rows in read_group(group_file)[start:stop]:
        clips = [planned_clip(vid, row) for row in rows]
        clips_seen += len(clips)
        try:
            info, clips, results = decode_planned(
                worker, path, clips, timeout=opts["video_timeout_s"], frame_size=opts["frame_size"],
                center_crop=opts["center_crop"], jpeg_quality=opts["jpeg_quality"], threads=opts["decoder_threads"],
                decoder=opts["decoder"], end_tolerance=opts["end_tolerance_seconds"])
        except ExtractError as e:
            errors.append(_error(vid, "decode", e.cls, e.message, clips=len(clips)))
            continue
        for clip, result in zip(clips, results):
            if isinstance(result, ExtractError):
                errors.append(_error(vid, "clip", result.cls, result.message, clip.clip_index, clip.key))
            elif clip.shard not in skip:
                samples[clip.shard].append(clip_sample(clip, info, result))
    return ({"clips": clips_seen, "errors": len(errors), "node": _node_id()},
            {"samples": dict(samples), "errors": errors})


def write_group(group: int, shards: list[int], opts: dict, done: dict, *decoded: dict) -> dict:
    """Write the group's uncommitted shards from its decode results, then its record (failures, shard facts):
    the record is the group's done marker. ``done``: ``{stem: summary}`` of its shards committed before."""
    out = Path(opts["out"])
    samples: dict[int, list] = defaultdict(list)
    errors: list[dict] = []
    for part in decoded:
        for shard, items in part["samples"].items():
            samples[shard].extend(items)
        errors.extend(part["errors"])
    written = dict(done)
    for shard in shards:
        stem = shard_stem(opts["name"], shard)
        if stem not in done:
            items = sorted(samples[shard])
            extra = {"plan_hash": opts["plan_hash"], "versions": opts["versions"]}
            if opts.get("caption_counts"):  # benchmark shards: caption_sampling=expand plans from the sidecars
                extra["captions"] = caption_counts(items)
            sidecar = write_shard(out, stem, items, extra)
            written[stem] = summary(sidecar, shard_facts(out, stem))
    errors.sort(key=lambda e: (e["video_id"], e["clip_index"] if e["clip_index"] is not None else -1))
    record = {"group": group, "versions": opts["versions"], "errors": errors, "shards": written}
    write_atomic(_record_file(out, opts["plan_hash"], group), json.dumps(record, sort_keys=True).encode())
    return record


def write_task(group: int, shards: list[int], opts: dict, done: dict, *decoded: dict) -> dict:
    """The writer as a Ray task: :func:`write_group`'s record, and the node it ran on (kept out of the record,
    which a rerun reads back and compares)."""
    return {"record": write_group(group, shards, opts, done, *decoded), "node": _node_id()}


def _records_dir(out: Path, phash: str) -> Path:
    return out / STATE_DIR / f"groups-{phash[:12]}"


def _record_file(out: Path, phash: str, group: int) -> Path:
    return _records_dir(out, phash) / f"group-{group:06d}.json"


def _ledger(out: Path, phash: str) -> Path:
    return out / STATE_DIR / f"ledger-{phash[:12]}.jsonl"


def _load_records(out: Path, phash: str) -> dict[int, dict]:
    """The group records of this plan: the driver's ledger (one file), then any record a writer left that the
    ledger misses (a driver killed between the two)."""
    records: dict[int, dict] = {}
    try:
        with _ledger(out, phash).open(encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    records[rec["group"]] = rec
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by a kill
    except FileNotFoundError:
        pass
    try:
        names = os.listdir(_records_dir(out, phash))
    except FileNotFoundError:
        names = []
    for name in names:
        if name.startswith("group-") and name.endswith(".json") and int(name[6:-5]) not in records:
            try:
                rec = json.loads((_records_dir(out, phash) / name).read_text())
                records[rec["group"]] = rec
            except (OSError, ValueError, KeyError, TypeError):
                continue  # unreadable: the group is verified shard by shard and run again
    return records


# ----------------------------------------------------------------------------------------------
# starting Ray


class RayStartError(RuntimeError):
    """Ray could not be joined or started; the message names the address and the fix."""


def _unreachable(address: str, timeout: float = 5.0) -> str | None:
    """Why nothing answers at a ``host:port`` or ``ray://host:port`` address, or None (also for 'auto' and
    for forms Ray resolves itself). Ray alone retries a dead address for minutes before giving up."""
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except OSError as e:
        return f"nothing answers at {host}:{port} ({e.strerror or e})"


def _start_ray(cfg, lock_fd: int):
    """``(ray, local head or None, connected here)``: joins ``ray.address``, or starts a local Ray that dies with
    this driver; a Ray this process is already connected to is used as it is (and left connected)."""
    if not cfg.ray.address:
        if "ray" not in sys.modules:
            # Ray reads its authentication mode from the environment once, when it is imported: the local head
            # and this driver must agree, so decide it before the import (token authentication, Ray's default)
            os.environ.setdefault("RAY_AUTH_MODE", "token")
        if os.environ.get("RAY_AUTH_MODE") == "token":
            # a token of this driver's own, in its environment (and so its local Ray's): nothing is written to
            # ~/.ray, and a machine where Ray never made a token works too (ray start refuses to run without one)
            os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
        from ptrain.cluster import single_machine_ray

        # Ray's single-machine mode: the local Ray keeps its 127.0.0.1 address (it listens on loopback only), and so
        # must this driver, even where ray was imported before (else it dials the machine's address and hangs)
        ray = single_machine_ray()
    else:
        import ray

    head = None
    connected_here = not ray.is_initialized()
    if connected_here:
        kwargs = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": True}
        try:
            if cfg.ray.address:
                why_not = _unreachable(cfg.ray.address)
                if why_not:
                    raise ConnectionError(why_not)
                ray.init(address=cfg.ray.address, **kwargs)
            else:
                from sharding.localray import LocalRay

                head = LocalRay.start(cfg.ray.num_cpus, hold_fd=lock_fd,
                                      auth_mode=os.environ.get("RAY_AUTH_MODE", "disabled"))
                ray.init(address=head.address, **{k: v for k, v in kwargs.items() if k != "include_dashboard"})
        except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError, ...: all mean "no Ray to run on"
            if head is not None:
                head.stop()
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if cfg.ray.address:
                raise RayStartError(
                    f"cannot join the Ray cluster at ray.address={cfg.ray.address!r}: {why}\n  Start one "
                    "(`ray start --head` on this machine for 'auto'), check the address (ray://HEAD:10001, or the "
                    "HEAD:6379 of `ray start`), submit this command with `ray job submit`, or leave ray.address "
                    "unset to start a local Ray."
                ) from None
            raise RayStartError(f"cannot start a local Ray (ray.num_cpus={cfg.ray.num_cpus}): {why}\n  Check "
                                "the free memory and /tmp space, or join a running cluster with ray.address=...") \
                from None
    return ray, head, connected_here


# ----------------------------------------------------------------------------------------------
# the output directory


class OutputError(RuntimeError):
    """The output directory cannot be used; the message names it and the fix."""


def _io_message(e: OSError, out: Path) -> str:
    where = e.filename or out
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        return (f"{where}: no space left on the device of out={out}; free space there (or choose another out=DIR) "
                "and rerun the same command: committed shards are kept")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{where}: cannot write there ({e.strerror}); make out={out} writable or choose another out=DIR"
    return f"{where}: {e.strerror or e}; check out={out} (or choose another out=DIR)"


def _open_out(out: Path):
    """Create the output and state directories and take the output's lock; OutputError when that is impossible."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"out={out} is a file, not a directory; pass a directory for the shards (it is created "
                          "when missing)")
    try:
        (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
        lock = open(out / STATE_DIR / "lock", "w")
    except NotADirectoryError:
        raise OutputError(f"out={out}: a parent of it is a file, not a directory; pass a directory for the "
                          "shards") from None
    except OSError as e:
        raise OutputError(_io_message(e, out)) from None
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock
        except BlockingIOError:
            if time.monotonic() > deadline:
                lock.close()
                raise OutputError(f"another `ptrain shard` is writing to {out}; wait for it to finish") from None
            time.sleep(0.2)


def _marker_plan(state: Path) -> str | None:
    """The plan hash of ``.ptrain_shard/plan.json`` (the plan whose shards this output holds), None without one."""
    marker = state / "plan.json"
    if not marker.exists():
        return None
    try:
        value = json.loads(marker.read_text()).get("plan_hash")
        if not isinstance(value, str) or not value:
            raise ValueError("no plan_hash")
        return value
    except (ValueError, AttributeError, UnicodeDecodeError, OSError) as e:
        raise OutputError(
            f"{marker} is damaged ({type(e).__name__}: {str(e)[:80]}): it names the plan whose shards {state.parent} "
            f"holds, so they cannot be trusted. Restore it, shard into a new out=DIR, or delete {state} (and the "
            "shards) to start over") from None


# ----------------------------------------------------------------------------------------------
# the driver


def run(cfg: ShardConfig) -> int:
    out = Path(cfg.out)
    try:
        lock = _open_out(out)
    except OutputError as e:
        print(f"ptrain shard: {e}", file=sys.stderr)
        return 2
    try:
        return _run(cfg, out, lock)
    except (CaptionError, AnnotationError, FileNotFoundError, OutputError, ForeignShardsError, RayStartError) as e:
        print(f"ptrain shard: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full or read-only disk: one line, and a rerun that completes once it is fixed
        print(f"ptrain shard: {_io_message(e, out)}", file=sys.stderr)
        return 2
    finally:
        lock.close()


def _plan(cfg: ShardConfig, state: Path) -> tuple[StoredPlan, bool, float]:
    """The stored plan for these inputs and settings: reused, or made now. ``(plan, reused, seconds)``."""
    t0 = time.time()
    source = open_source(cfg.source, cfg)
    index = None if Path(cfg.videos).is_file() else index_videos(cfg.videos)
    try:
        facts = source.describe()  # what the plan was made from, stated as it was read
    except FileNotFoundError:
        facts = None  # a missing input: planning says which, with the fix
    vfacts = videos_facts(cfg.videos, index)
    key = inputs_key(cfg, facts, vfacts)
    stored = reusable_plan(state, key) if facts is not None else None
    if stored is not None:
        return stored, True, time.time() - t0
    if index is None:
        index = index_videos(cfg.videos)
    stored = build_plan(cfg, source, index, state, key, {**(facts or {}), "videos": vfacts})
    return stored, False, time.time() - t0


def _run(cfg: ShardConfig, out: Path, lock) -> int:
    t_start = time.time()
    state = out / STATE_DIR
    marker_plan = _marker_plan(state)
    stored, reused, plan_s = _plan(cfg, state)
    phash, m = stored.plan_hash, stored.manifest
    if marker_plan is not None and marker_plan != phash:
        if not reused:
            discard(stored)
        raise ForeignShardsError(foreign_plan_message(out, marker_plan, phash))
    print(f"ptrain shard: {m['videos_listed']} videos listed, {m['videos_planned']} to decode, {m['clips']} clips "
          f"planned -> {m['shards']} shards in {len(stored.groups)} groups (plan {phash[:12]}, "
          + ("reused" if reused else f"made in {plan_s:.1f} s") + ")")
    if cfg.dry_run:
        return _dry_run(cfg, out, stored)

    versions = _versions()
    groups = [(g, [shard_stem(cfg.name, first + k) for k in range(n)])
              for g, (first, n, *_rest) in enumerate(stored.groups)]
    records = _load_records(out, phash)
    t_scan = time.time()
    committed, done, removed, rehashed = resume_scan(out, groups, records, phash, versions, marker_plan, cfg.verify)
    if marker_plan is None:
        write_atomic(state / "plan.json", json.dumps({"plan_hash": phash, "settings": m["settings"]},
                                                     indent=1).encode())
    from ptrain.config import dump_config

    dump_config(cfg, out / "config.yaml")
    pending = [g for g, _stems in groups if g not in done]
    print(f"ptrain shard: {len(committed)} shards already committed ({rehashed} re-hashed, "
          f"{time.time() - t_scan:.1f} s), {len(pending)}/{len(groups)} shard groups to run"
          + (f"; removed partial {removed}" if removed else ""))

    live = _Live(cfg, out, stored, versions, committed, {g: records[g] for g in done})
    live.write_errors()
    live.progress("running" if pending else "finishing", force=True)
    crashed: list[tuple[int, str]] = []
    if pending:
        crashed = _execute(cfg, out, stored, pending, committed, live, lock.fileno())
    return live.finish(crashed, t_start)


def _execute(cfg, out: Path, stored: StoredPlan, pending: list[int], committed: dict, live, lock_fd: int):
    """Run the pending groups on Ray through a window of at most ``ray.window`` tasks in flight."""
    ray, head, connected_here = _start_ray(cfg, lock_fd)
    live.local_ray = {"session": head.session, "address": head.address} if head else None
    phash = stored.plan_hash
    opts = {"out": str(out.resolve()), "name": cfg.name, "plan_hash": phash, "versions": live.versions,
            "frame_size": cfg.frame_size, "center_crop": cfg.center_crop, "jpeg_quality": cfg.jpeg_quality,
            "decoder_threads": cfg.decoder_threads, "decoder": cfg.decoder,
            "video_timeout_s": cfg.video_timeout_s, "end_tolerance_seconds": cfg.plan.end_tolerance_seconds,
            "caption_counts": cfg.source != "howto100m"}
    window = cfg.ray.window or max(2, int(2 * ray.cluster_resources().get("CPU", 1) / cfg.ray.cpus_per_task))
    live.window = window
    # a task whose worker dies is retried (max_retries); where each task runs is chosen per task (_Placement)
    task = {"num_cpus": cfg.ray.cpus_per_task, "max_retries": 2}
    decode_remote, write_remote = ray.remote(decode_videos), ray.remote(write_task)
    place = _Placement(ray, cfg.ray.cpus_per_task)
    live.nodes = {n["NodeID"]: {"address": n["NodeManagerAddress"], "resources": n["Resources"], "decode_tasks": 0,
                                "write_tasks": 0} for n in ray.nodes() if n["Alive"]}
    print(f"ptrain shard: {len(live.nodes)} Ray node(s), {ray.cluster_resources().get('CPU', 0):g} CPUs, "
          f"window {window} tasks", flush=True)
    (out / STATE_DIR / f"groups-{phash[:12]}").mkdir(exist_ok=True)

    def units():
        """Tasks in submission order: a group's decode tasks, then its writer."""
        for g in pending:
            first, n_shards, n_videos = stored.groups[g][:3]
            stems = [shard_stem(cfg.name, first + k) for k in range(n_shards)]
            done = {s: committed[s] for s in stems if s in committed}
            skip = [first + k for k, s in enumerate(stems) if s in done]
            for a in range(0, n_videos, cfg.videos_per_decode_task):
                yield "decode", g, (a, min(a + cfg.videos_per_decode_task, n_videos), skip)
            yield "write", g, (list(range(first, first + n_shards)), done)

    crashed: list[tuple[int, str]] = []
    inflight: dict = {}  # ref -> (kind, group, node placed on): what the driver waits on, at most the window
    held: dict[int, list] = defaultdict(list)  # group -> its decode results, until its writer is submitted
    todo = units()
    nxt = next(todo, None)
    bar = _progress(cfg.progress, sum(stored.groups[g][3] for g in pending))
    ledger = _ledger(out, phash).open("a", encoding="utf-8")
    try:
        while nxt is not None or inflight:
            while nxt is not None and len(inflight) < window:
                kind, g, args = nxt
                group_file = str(stored.group_file(g))
                node, where = place.pick(kind, g)
                if kind == "decode":
                    small, big = decode_remote.options(num_returns=2, scheduling_strategy=where, **task).remote(
                        group_file, args[0], args[1], opts, args[2])
                    held[g].append(big)
                    inflight[small] = ("decode", g, node)
                else:
                    ref = write_remote.options(scheduling_strategy=where, **task).remote(g, args[0], opts, args[1],
                                                                                        *held.pop(g))
                    inflight[ref] = ("write", g, node)
                live.max_in_flight = max(live.max_in_flight, len(inflight))
                nxt = next(todo, None)
            # block for one, then take every task that has finished by now (one call over the window, not a
            # call per outstanding ref); fetch_local=False: the samples stay where they are, for their writer
            refs = list(inflight)
            ray.wait(refs, num_returns=1, fetch_local=False)
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
            for ref in ready:
                kind, g, node = inflight.pop(ref)
                place.release(node)
                if kind == "decode":
                    try:
                        decoded = ray.get(ref)
                        n = decoded["clips"]
                        live.task_done(decoded["node"], "decode")
                    except Exception:  # noqa: BLE001 - the group's writer reports it
                        n = 0
                    bar.update(n)
                    live.clips_done += n
                    continue
                try:
                    written = ray.get(ref)
                    record = written["record"]
                    live.task_done(written["node"], "write")
                except Exception as e:  # noqa: BLE001 - a crashed group is reported, the others go on
                    cause = getattr(e, "cause", None) or e
                    crashed.append((g, f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1]}"))
                    live.groups_crashed += 1
                    continue
                ledger.write(json.dumps(record, sort_keys=True) + "\n")
                ledger.flush()
                live.group_done(record)
            live.in_flight = len(inflight)
            live.progress("running")
    finally:
        ledger.close()
        bar.close()
        if connected_here:
            ray.shutdown()
        if head is not None:
            head.stop()
    return crashed


class _Placement:
    """Where the next task goes: the alive node with the fewest of this job's tasks in flight per CPU, or, for a
    group's writer, the node that ran most of the group's decode tasks (its frames are in that node's object store:
    nothing to move). Ray's own placement does not spread a stream of short tasks: a worker leased for one task runs
    the next ones of the same kind too, so a whole job can run on the head while another node idles. The affinity
    is soft (a node that died or left: Ray places the task elsewhere); nodes are re-read every REFRESH_S, so nodes
    that join are used."""

    REFRESH_S = 30.0

    def __init__(self, ray, cpus_per_task: float):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.ray, self.cpus_per_task, self.affinity = ray, cpus_per_task, NodeAffinitySchedulingStrategy
        self.load: Counter = Counter()  # node id -> this job's tasks in flight placed there
        self.decoded_on: dict[int, Counter] = defaultdict(Counter)  # group -> nodes of its decode tasks so far
        self.cpus: dict[str, float] = {}
        self._t = 0.0
        self.refresh()

    def refresh(self) -> None:
        # a node without CPUs for a task (a head started with --num-cpus=0) gets none
        self.cpus = {n["NodeID"]: n["Resources"].get("CPU", 0.0) for n in self.ray.nodes()
                     if n["Alive"] and n["Resources"].get("CPU", 0.0) >= self.cpus_per_task}
        self._t = time.monotonic()

    def pick(self, kind: str, group: int):
        """``(node id, scheduling strategy)`` for group ``group``'s next ``decode`` task or its ``write`` task (which
        comes after all its decodes); ``(None, "SPREAD")`` while no node has the CPUs (a cluster that is still
        growing: Ray places the task when one joins)."""
        if time.monotonic() - self._t > self.REFRESH_S:
            self.refresh()
        near = self.decoded_on.pop(group, Counter()).most_common(1) if kind == "write" else []
        if not self.cpus:
            node = None
        elif near and near[0][0] in self.cpus:  # the writer: where most of its group's frames are, if still alive
            node = near[0][0]
        else:
            node = min(self.cpus, key=lambda n: self.load[n] / self.cpus[n])
        if kind == "decode":
            self.decoded_on[group][node] += 1
        if node is None:
            return None, "SPREAD"
        self.load[node] += 1
        return node, self.affinity(node_id=node, soft=True)

    def release(self, node: str | None) -> None:
        if node is not None:
            self.load[node] -= 1


class _Live:
    """The run's state as the output directory shows it: progress.json, errors.jsonl and manifest.json."""

    MANIFEST_EVERY_S = 60.0
    PROGRESS_EVERY_S = 2.0

    def __init__(self, cfg, out: Path, stored: StoredPlan, versions: dict, committed: dict, records: dict):
        self.cfg, self.out, self.stored, self.versions = cfg, out, stored, versions
        self.committed, self.records = committed, records
        self.started = time.time()
        self.clips_done = 0
        self.groups_crashed = 0
        self.in_flight = self.max_in_flight = self.window = 0
        self.local_ray = None
        self.nodes: dict[str, dict] = {}  # Ray node id -> address, resources, tasks finished there
        self._t_progress = self._t_manifest = 0.0
        self.failures = Counter()
        for rec in records.values():
            self.failures.update(e["class"] for e in rec["errors"])
        self.failures.update(stored.manifest["plan_failures_by_class"])

    def task_done(self, node: str | None, kind: str) -> None:
        entry = self.nodes.setdefault(node or "?", {"address": None, "resources": {}, "decode_tasks": 0,
                                                    "write_tasks": 0})  # a node that joined during the run
        entry[f"{kind}_tasks"] += 1

    def group_done(self, record: dict) -> None:
        self.records[record["group"]] = record
        self.committed.update(record["shards"])
        self.failures.update(e["class"] for e in record["errors"])
        with (self.out / ERRORS).open("a", encoding="utf-8") as f:  # watchable now; rewritten in order at the end
            f.writelines(json.dumps(e, sort_keys=True) + "\n" for e in record["errors"])
        if time.time() - self._t_manifest > self.MANIFEST_EVERY_S:
            self.write_manifest(complete=False)

    def progress(self, state: str, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._t_progress < self.PROGRESS_EVERY_S:
            return
        self._t_progress = now
        m = self.stored.manifest
        done_clips = sum(m["groups"][g][3] for g in self.records)
        rate = self.clips_done / max(now - self.started, 1e-9)
        info = {
            "state": state, "plan_hash": self.stored.plan_hash, "started": self.started, "updated": now,
            "groups_total": len(m["groups"]), "groups_done": len(self.records), "groups_crashed": self.groups_crashed,
            "shards_total": m["shards"], "shards_committed": len(self.committed),
            "clips_total": m["clips"], "clips_in_done_groups": done_clips, "clips_decoded_this_run": self.clips_done,
            "clips_per_s": round(rate, 3), "eta_s": round((m["clips"] - done_clips) / rate) if rate > 0 else None,
            "failures_by_class": dict(sorted(self.failures.items())),
            "tasks_in_flight": self.in_flight, "max_tasks_in_flight": self.max_in_flight, "window": self.window,
            "local_ray": self.local_ray, "nodes": self.nodes,
        }
        write_atomic(self.out / PROGRESS, json.dumps(info, indent=1, sort_keys=True).encode())

    def write_errors(self, crashed: list[tuple[int, str]] = ()) -> Counter:
        """errors.jsonl whole: the plan's failures, then each done group's, in plan order, then crashed groups."""
        by_class, failed_clips = Counter(), 0
        tmp = self.out / f".{ERRORS}.tmp"
        with tmp.open("w", encoding="utf-8") as f:
            def put(e: dict) -> None:
                nonlocal failed_clips
                by_class[e["class"]] += 1
                if e["class"] not in ("no_captions", "no_clips", "duplicate_id"):
                    failed_clips += e.get("clips", 1)
                f.write(json.dumps(e, sort_keys=True) + "\n")

            for e in self.stored.plan_errors():
                put(e)
            for g in sorted(self.records):
                for e in self.records[g]["errors"]:
                    put(e)
            for g, msg in crashed:
                n = Counter()
                for vid, _path, rows in read_group(self.stored.group_file(g)):
                    n[vid] = len(rows)
                for vid in n:
                    put(_error(vid, "task", "task_error", f"shard group {g} crashed: {msg}", clips=n[vid]))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.out / ERRORS)
        self.failed_clips = failed_clips
        return by_class

    def write_manifest(self, complete: bool, by_class: Counter | None = None) -> dict:
        cfg, m = self.cfg, self.stored.manifest
        from ptrain.config import config_to_dict

        stems = [shard_stem(cfg.name, s) for first, n, *_r in m["groups"] for s in range(first, first + n)]
        shards = {stem: {k: self.committed[stem][k] for k in ("samples", "bytes", "sha256")}
                  | {"file": self.committed[stem]["shard"]} for stem in stems if stem in self.committed}
        manifest = {
            "plan_hash": self.stored.plan_hash, "name": cfg.name, "videos_listed": m["videos_listed"],
            "videos_planned": m["videos_planned"], "clips_planned": m["clips"] + m["unplanned_clips"],
            "samples": sum(s["samples"] for s in shards.values()), "shards_planned": len(stems), "shards": shards,
            "failures_by_class": dict(sorted((by_class or self.failures).items())),
            "failed_clips": getattr(self, "failed_clips", None), "complete": complete,
            "settings": m["settings"], "config": config_to_dict(cfg), "versions": self.versions,
            "inputs": {k: v for k, v in m["inputs"].items() if k != "videos"},
        }
        write_atomic(self.out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        self._t_manifest = time.time()
        return manifest

    def finish(self, crashed: list[tuple[int, str]], t_start: float) -> int:
        by_class = self.write_errors(crashed)
        n_shards = self.stored.manifest["shards"]
        complete = len(self.records) == len(self.stored.groups) and not crashed
        manifest = self.write_manifest(complete=complete, by_class=by_class)
        self.progress("done" if complete else "stopped", force=True)
        elapsed = time.time() - t_start
        print(f"ptrain shard: done in {elapsed:.1f} s: {self.stored.manifest['videos_planned']} videos, "
              f"{manifest['samples']} clips in {len(manifest['shards'])}/{n_shards} shards, "
              f"{self.clips_done / max(elapsed, 1e-9):.1f} clips/s this run")
        if by_class:
            print("  failures by class: " + ", ".join(f"{k} {v}" for k, v in sorted(by_class.items()))
                  + f"  (details: {self.out / ERRORS})")
        if crashed:
            print(f"  {len(crashed)} shard group(s) crashed; rerun the same command to retry them", file=sys.stderr)
            return 1
        return 0


def _dry_run(cfg: ShardConfig, out: Path, stored: StoredPlan) -> int:
    """Plan only: the counts, the missing videos, and estimates from a few timed decodes (``sharding.estimate``)."""
    from sharding.estimate import estimate

    m = stored.manifest
    missing = [e for e in stored.plan_errors() if e["class"] == "missing"]
    n_decode_tasks = sum(-(-g[2] // cfg.videos_per_decode_task) for g in stored.groups)
    report = {
        "plan_hash": stored.plan_hash, "videos_listed": m["videos_listed"], "videos_planned": m["videos_planned"],
        "clips": m["clips"], "frames": m["frames"], "shards": m["shards"], "groups": len(stored.groups),
        "tasks": {"decode": n_decode_tasks, "write": len(stored.groups)},
        "missing_videos": len(missing), "missing_clips": sum(e.get("clips", 0) for e in missing),
        "plan_failures_by_class": m["plan_failures_by_class"],
        "estimate": estimate(cfg, stored),
    }
    write_atomic(out / "dry_run.json", json.dumps(report, indent=1, sort_keys=True).encode())
    est = report["estimate"]
    print(f"ptrain shard: dry run: {report['videos_planned']} videos to decode, {report['clips']} clips, "
          f"{report['frames']} frames -> {report['shards']} shards; tasks: {n_decode_tasks} decode + "
          f"{len(stored.groups)} write")
    print(f"  missing videos: {len(missing)} ({report['missing_clips']} clips)"
          + (": " + ", ".join(e["video_id"] for e in missing[:5]) + (" ..." if len(missing) > 5 else "")
             if missing else ""))
    if est.get("output_bytes") is not None:
        size = est["output_bytes"]
        size = f"{size / 1e12:.3g} TB" if size >= 1e12 else f"{size / 1e9:.3g} GB" if size >= 1e9 else \
            f"{size / 1e6:.3g} MB"
        print(f"  estimate from {est['sample_videos']} decoded videos ({est['sample_clips']} clips): {size} of "
              f"shards, {est['core_hours']:.3g} core-hours of decoding ({est['method']})")
    else:
        print(f"  no estimate: {est['why']}")
    print(f"  report: {out / 'dry_run.json'}; the plan is stored, a run with the same inputs reuses it")
    return 0


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(enabled: bool, total: int):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="clip", desc="shard", smoothing=0.1, dynamic_ncols=True)
