"""End to end: `ptrain sample-data` corpus -> `ptrain shard` (local Ray) -> shards read back with webdataset."""

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from net import free_port, kill_session
from ptrain.config import load_config
from sharding.config import ShardConfig
from sharding.job import run as shard_run
from sharding.plan import plan_video
from sharding.sources.howto100m import load_captions, load_video_list

SETTINGS = ["max_samples_per_shard=3", "shards_per_task=2", "frame_size=32", "plan.num_frames=4", "plan.min_seconds=2",
            "plan.min_words=3", "plan.max_seconds=6", "ray.num_cpus=2", "progress=false"]


@pytest.fixture(scope="module")
def corpus(sample_corpus):
    return sample_corpus


def shard_args(corpus: Path, out: Path) -> list[str]:
    return [f"videos={corpus / 'videos'}", f"captions={corpus / 'caption.json'}", f"out={out}",
            f"video_list={corpus / 'HowTo100M_v1.csv'}", *SETTINGS]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    # a window larger than the job: every task is submitted at once (what bounded runs are compared with)
    cfg = load_config(ShardConfig, None, shard_args(corpus, out) + ["ray.window=1000"])
    assert shard_run(cfg) == 0
    return out, cfg


def tar_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("shard-*.tar"))}


def test_every_planned_clip_once_or_in_errors(corpus, reference):
    out, cfg = reference
    captions = load_captions(corpus / "caption.json")
    planned = {}
    for vid in load_video_list(corpus / "HowTo100M_v1.csv"):
        for clip in plan_video(vid, captions[vid], cfg.plan):
            planned[clip.key] = clip
    in_shards = []
    for tar_path in sorted(out.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            names = tar.getnames()
        assert names == sorted(names)
        in_shards += sorted({n.split(".")[0] for n in names})
    assert len(in_shards) == len(set(in_shards)), "a clip was written twice"
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    failed = set()
    for e in errors:
        if e["key"]:
            failed.add(e["key"])
        else:  # a whole video failed: all of its clips
            failed |= {k for k, c in planned.items() if c.video_id == e["video_id"]}
    assert not failed & set(in_shards)
    assert set(in_shards) | failed == set(planned)
    classes = {e["class"] for e in errors}
    assert {"missing", "corrupt", "empty", "no_video_stream", "truncated", "span_beyond_end"} <= classes
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == len(in_shards) and manifest["complete"]
    assert manifest["inputs"]["source"] == "howto100m"
    assert manifest["inputs"]["captions"]["bytes"] == (corpus / "caption.json").stat().st_size
    # clips of one video are spread over several shards
    shards_per_video = {}
    for tar_path in sorted(out.glob("shard-*.tar")):
        for key in json.loads(tar_path.with_suffix(".json").read_text())["keys"]:
            shards_per_video.setdefault(planned[key].video_id, set()).add(tar_path.name)
    assert max(len(s) for s in shards_per_video.values()) > 1


def test_frames_decode_with_right_size_inside_their_clip(reference):
    out, cfg = reference
    ds = wds.WebDataset(sorted(str(p) for p in out.glob("shard-*.tar")), shardshuffle=False)
    n = 0
    for sample in ds:
        meta = json.loads(sample["json"])
        assert sample["__key__"] == meta["key"] and "." not in meta["key"]
        assert sample["txt"].decode() == meta["text"] and meta["text"]
        frames = sorted(k for k in sample if k.endswith(".jpg"))
        assert len(frames) == len(meta["frame_times"]) == len(meta["target_times"]) <= cfg.plan.num_frames
        assert meta["frame_times"] == sorted(meta["frame_times"])
        # each frame lies inside its clip, and is the one on screen at its target time (shown at or before it, less
        # than 2 frames earlier: the VFR video has gaps up to 1.6 frame intervals) or, when that one was shown
        # before the clip starts, the clip's first frame (shown less than 2 frames after the target)
        for t, target in zip(meta["frame_times"], meta["target_times"]):
            assert meta["start"] <= target <= meta["end"]
            assert meta["start"] - 1e-6 <= t <= meta["end"]
            assert target - 2.0 / meta["fps"] <= t <= target + 2.0 / meta["fps"]
            if t > target + 1e-6:
                assert t - meta["start"] < 2.0 / meta["fps"]
        for k in frames:
            img = Image.open(io.BytesIO(sample[k]))
            assert img.format == "JPEG" and img.mode == "RGB"
            assert min(img.size) == cfg.frame_size
        n += 1
    assert n == json.loads((out / "manifest.json").read_text())["samples"] > 0


def test_weird_video_id_is_sanitised_but_kept(corpus, reference):
    out, _ = reference
    weird = json.loads((corpus / "sample_meta.json").read_text())["weird_id"]
    metas = []
    for tar_path in out.glob("shard-*.tar"):
        with tarfile.open(tar_path) as tar:
            metas += [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    mine = [m for m in metas if m["video_id"] == weird]
    assert mine and all("." not in m["key"] for m in mine)


def test_rerun_is_a_noop_and_foreign_plan_is_refused(corpus, reference, capsys):
    out, cfg = reference
    before = tar_hashes(out)
    sidecar_times = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.json")}
    assert shard_run(cfg) == 0
    printed = capsys.readouterr().out
    assert re.search(r" 0/\d+ shard groups to run", printed), printed
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.json")} == sidecar_times  # nothing rewritten
    assert tar_hashes(out) == before
    other = load_config(ShardConfig, None, shard_args(corpus, out) + ["plan.num_frames=3"])
    assert shard_run(other) == 2
    assert "holds shards of a different plan" in capsys.readouterr().err
    assert tar_hashes(out) == before


SLOW_HOOK = Path(__file__).parent / "hooks" / "slow"  # sitecustomize.py: with PTRAIN_TEST_COMMIT_DELAY_S, slow commits


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


@pytest.mark.slow
def test_kill_mid_run_then_rerun_is_byte_identical(corpus, reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "killed"
    commit_log = tmp_path / "commits.log"
    # one CPU and one video per decode task: shard groups run one after another; the test-only start-up hook makes
    # every shard commit take 5 s more (slow storage), so the kill below always lands after the first commit
    # and long before the last, however fast the machine is
    cmd = [sys.executable, "-m", "ptrain", "shard", *shard_args(corpus, out), "ray.num_cpus=1",
           "videos_per_decode_task=1", "ray.window=2"]
    slow_env = {**os.environ, "PTRAIN_TEST_COMMIT_DELAY_S": "5", "PTRAIN_TEST_COMMIT_LOG": str(commit_log),
                "PYTHONPATH": os.pathsep.join([str(SLOW_HOOK), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=slow_env)
    try:
        # the hook logs a commit after its tar and sidecar are in place, then sleeps: kill inside that sleep
        deadline = time.time() + 120
        while time.time() < deadline and not _lines(commit_log) and proc.poll() is None:
            time.sleep(0.05)
        assert _lines(commit_log), "no shard was committed in time"
    finally:
        kill_session(proc.pid)  # the driver (its local Ray, in a session of its own, goes with it)
        proc.wait()
    # watchable while it ran: progress, and the failures of the groups done so far
    progress = json.loads((out / "progress.json").read_text())
    assert progress["state"] == "running" and progress["window"] == 2 and 1 <= progress["max_tasks_in_flight"] <= 2
    assert (out / "errors.jsonl").is_file()
    # the hook ran in the Ray worker that wrote the shard (workers inherit the driver's environment), not the driver
    committers = [line.split() for line in _lines(commit_log)]
    assert committers and all(int(pid) != proc.pid for pid, _shard in committers)
    done_before = len(list(out.glob("shard-*.json")))
    assert 1 <= done_before < len(tar_hashes(ref_out)), "the run finished before it could be killed"
    last = sorted(tar_hashes(ref_out))[-1]
    (out / f".{last}.tmp").write_bytes(b"partial")  # what a kill during a write leaves
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"'.{last}.tmp'" in result.stdout  # reported as removed
    assert tar_hashes(out) == tar_hashes(ref_out)
    assert not list(out.glob(".*.tmp"))
    assert (out / "errors.jsonl").read_text() == (ref_out / "errors.jsonl").read_text()


def test_rerun_over_committed_shards_reads_none_of_them(corpus, reference, monkeypatch, capsys):
    import builtins
    import io

    import sharding.write as write

    out, cfg = reference
    stems = sorted(p.stem for p in out.glob("shard-*.tar"))
    assert len(stems) > 10
    opened, hashed = [], []
    real_open = builtins.open

    def spy_open(file, *a, **k):
        opened.append(os.fspath(file) if not isinstance(file, int) else "")
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(write, "file_sha256", lambda p: hashed.append(p) or (0, ""))
    assert shard_run(cfg) == 0
    printed = capsys.readouterr().out
    assert f"{len(stems)} shards already committed (0 re-hashed" in printed and "reused)" in printed
    assert not hashed
    shard_files = [f for f in opened if Path(f).name.startswith("shard-")]
    assert shard_files == [], shard_files  # neither a tar nor a sidecar was opened


@pytest.mark.slow
def test_a_window_smaller_than_the_job_gives_the_same_bytes(corpus, reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "windowed"
    cfg = load_config(ShardConfig, None, shard_args(corpus, out) + ["ray.window=2", "videos_per_decode_task=1"])
    assert shard_run(cfg) == 0
    progress = json.loads((out / "progress.json").read_text())
    plan = json.loads(next((out / ".ptrain_shard" / "plans").glob("*/manifest.json")).read_text())
    tasks = sum(g[2] + 1 for g in plan["groups"])  # one decode task per video here, one writer per group
    assert tasks > 4 * progress["window"] and progress["window"] == 2
    # the driver counted what it had in flight after every submission: never more than the window
    assert 1 <= progress["max_tasks_in_flight"] <= 2
    assert tar_hashes(out) == tar_hashes(ref_out)
    assert (out / "errors.jsonl").read_text() == (ref_out / "errors.jsonl").read_text()


@pytest.mark.slow
def test_a_killed_driver_takes_its_local_ray_with_it(corpus, tmp_path):
    from net import session_pids

    out = tmp_path / "out"
    commit_log = tmp_path / "commits.log"
    cmd = [sys.executable, "-m", "ptrain", "shard", *shard_args(corpus, out), "ray.num_cpus=1"]
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths live under it
    address_file = ray_tmp / "ray" / "ray_current_cluster"  # what a later bare ray.init() would join
    slow_env = {**os.environ, "PTRAIN_TEST_COMMIT_DELAY_S": "30", "PTRAIN_TEST_COMMIT_LOG": str(commit_log),
                "PYTHONPATH": os.pathsep.join([str(SLOW_HOOK), *filter(None, [os.environ.get("PYTHONPATH")])]),
                "RAY_TMPDIR": str(ray_tmp)}
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=slow_env)
    keeper = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not _lines(commit_log) and proc.poll() is None:
            time.sleep(0.05)
        assert _lines(commit_log), "no shard was committed in time"
        keeper = json.loads((out / "progress.json").read_text())["local_ray"]["session"]
        assert len(session_pids(keeper)) > 3  # the keeper, gcs, raylet, agents, workers
        assert address_file.read_text().startswith("127.0.0.1:")
        os.kill(proc.pid, 9)  # the driver alone: what `kill -9` of a user's `ptrain shard` does
        proc.wait()
        deadline = time.time() + 60  # the keeper's grace is 5 s; a loaded machine gets more
        while time.time() < deadline and session_pids(keeper):
            time.sleep(0.2)
        assert session_pids(keeper) == [], "Ray processes outlived the killed driver"
        assert not address_file.exists(), "the dead cluster's address was left for a later ray.init() to join"
    finally:
        kill_session(proc.pid)
        if keeper is not None:
            kill_session(keeper)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_hung_decoder_is_killed_and_the_job_goes_on(corpus, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    good = sorted((corpus / "videos").glob("*.mp4"))
    good = [p for p in good if not p.name.startswith("bad_")][0]
    (videos / good.name).symlink_to(good)
    os.mkfifo(videos / "hangs00.mp4")  # opening a FIFO blocks forever, like a stalled network mount
    caps = json.loads((corpus / "caption.json").read_text())
    vid = good.name[: -len(".mp4")]
    sub = {vid: caps[vid], "hangs00": {"start": [0, 2], "end": [2, 4], "text": ["one two three", "four five"]}}
    (tmp_path / "caption.json").write_text(json.dumps(sub))
    cfg = load_config(ShardConfig, None, [f"videos={videos}", f"captions={tmp_path / 'caption.json'}",
                                          f"out={tmp_path / 'out'}", "video_timeout_s=10", *SETTINGS])
    t0 = time.time()
    assert shard_run(cfg) == 0
    assert time.time() - t0 < 60
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [(e["video_id"], e["class"]) for e in errors] == [("hangs00", "timeout")]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["samples"] > 0


def test_a_driver_that_imported_ray_first_still_reaches_its_local_ray(corpus, tmp_path):
    """Ray reads its single-machine switch when it is first imported. A driver that imported ray before ptrain chose
    that mode dialled the machine's address while its local Ray listened on loopback only, and retried for about 14
    minutes before failing (seen when a test that imports ray ran first). Run where nothing else imported ray."""
    rows = (corpus / "HowTo100M_v1.csv").read_text().splitlines()
    (tmp_path / "two.csv").write_text("\n".join(rows[:3]) + "\n")  # header + two videos: a short job
    args = [f"videos={corpus / 'videos'}", f"captions={corpus / 'caption.json'}", f"out={tmp_path / 'out'}",
            f"video_list={tmp_path / 'two.csv'}", *SETTINGS]
    code = ("import sys\nimport ray  # first, with Ray's multi-node default\n"
            "from ptrain.config import load_config\nfrom sharding.config import ShardConfig\n"
            "from sharding.job import run\nsys.exit(run(load_config(ShardConfig, None, sys.argv[1:])))")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    try:
        proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                              timeout=240, start_new_session=True)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"the driver never reached its local Ray:\n{(e.stderr or b'')[-2000:]!r}") from None
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Failed to connect to GCS" not in proc.stderr, proc.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["complete"]


def test_malformed_captions_fail_fast(tmp_path, capsys):
    (tmp_path / "videos").mkdir()
    (tmp_path / "caption.json").write_text(json.dumps({"abc": {"start": [0, 1], "end": [1], "text": ["x", "y"]}}))
    cfg = load_config(ShardConfig, None, [f"videos={tmp_path / 'videos'}", f"captions={tmp_path / 'caption.json'}",
                                          f"out={tmp_path / 'out'}"])
    assert shard_run(cfg) == 2
    err = capsys.readouterr().err
    assert "caption.json: video 'abc': start, end and text have different lengths" in err
    seg = {"start": [0], "end": [6], "text": ["one two three four"]}
    (tmp_path / "caption.json").write_text(json.dumps({"a.b": seg, "a-b-69f6642c": seg}))
    for vid in ("a.b", "a-b-69f6642c"):
        (tmp_path / "videos" / f"{vid}.mp4").write_bytes(b"x")
    assert shard_run(cfg) == 2
    assert "give the same sample key" in capsys.readouterr().err


def _shard_joining(tmp_path, address: str) -> subprocess.CompletedProcess:
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "abc.mp4").write_bytes(b"not decoded: ray.init fails first")
    (tmp_path / "caption.json").write_text(json.dumps({"abc": {"start": [0], "end": [6], "text": ["one two three"]}}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(tmp_path / "ray")}
    return subprocess.run(
        [sys.executable, "-m", "ptrain", "shard", f"videos={tmp_path / 'videos'}",
         f"captions={tmp_path / 'caption.json'}", f"out={tmp_path / 'out'}", f"ray.address={address}",
         "progress=false"], capture_output=True, text=True, timeout=120, env=env)


def _assert_clear_join_error(result: subprocess.CompletedProcess, address: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert f"ptrain shard: cannot join the Ray cluster at ray.address={address!r}" in result.stderr, result.stderr
    assert "ray start --head" in result.stderr and "leave ray.address unset" in result.stderr


def test_joining_an_address_where_nothing_answers_fails_at_once(tmp_path):
    address = f"127.0.0.1:{free_port()}"  # Ray alone would retry it for minutes
    started = time.monotonic()
    result = _shard_joining(tmp_path, address)
    _assert_clear_join_error(result, address)
    assert f"nothing answers at {address}" in result.stderr
    assert time.monotonic() - started < 60


def test_joining_auto_with_no_cluster_running_is_a_clear_error(tmp_path):
    from ray._private.services import find_gcs_addresses

    # Ray's 'auto' joins any cluster it finds running on this machine (it scans the processes), whatever the
    # temp dir: the premise of this test holds only where none runs (CI)
    if find_gcs_addresses():
        pytest.skip("another Ray cluster runs on this machine, and ray.address=auto would join it")
    _assert_clear_join_error(_shard_joining(tmp_path, "auto"), "auto")


def test_readme_states_the_shard_benchmarks_defaults():
    import ast

    root = Path(__file__).resolve().parents[1]
    source = (root / "benchmarks" / "bench_shard.py").read_text()
    defaults = {call.args[0].value: kw.value.value for call in ast.walk(ast.parse(source))
                if isinstance(call, ast.Call) and getattr(call.func, "attr", "") == "add_argument"
                for kw in call.keywords if kw.arg == "default"}
    setup = f"({defaults['--videos']} videos of {defaults['--seconds']} s, {defaults['--fps']} fps"
    assert setup in " ".join((root / "README.md").read_text().split())
    assert f"[--videos {defaults['--videos']}] [--seconds {defaults['--seconds']}]" in source  # the docstring
