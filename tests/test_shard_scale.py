"""`ptrain shard` at scale, without Ray: the stored plan and its reuse, the dry run, video list files, the resume
scan that trusts group records, and the output-directory errors (one line, exit 2, no traceback)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ptrain.config import load_config
from sharding.config import ShardConfig
from sharding.job import run as shard_run
from sharding.write import resume_scan, shard_facts, summary, write_shard

SETTINGS = ["max_samples_per_shard=3", "shards_per_task=2", "frame_size=32", "plan.num_frames=4", "plan.min_seconds=2",
            "plan.min_words=3", "plan.max_seconds=6", "progress=false"]


def args(corpus: Path, out: Path, *extra: str, videos: Path | None = None) -> list[str]:
    return [f"videos={videos or corpus / 'videos'}", f"captions={corpus / 'caption.json'}", f"out={out}",
            f"video_list={corpus / 'HowTo100M_v1.csv'}", *SETTINGS, *extra]


def shard(argv: list[str]) -> int:
    return shard_run(load_config(ShardConfig, None, argv))


def test_dry_run_reports_the_plan_and_estimates_without_writing_a_shard(sample_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert shard(args(sample_corpus, out, "dry_run=true", "dry_run_videos=3")) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "dry_run.json").read_text())
    assert not list(out.glob("shard-*")) and not (out / ".ptrain_shard" / "plan.json").exists()
    listed = (sample_corpus / "HowTo100M_v1.csv").read_text().splitlines()[1:]
    assert report["videos_listed"] == len(listed)
    assert report["missing_videos"] == 1 and report["missing_clips"] > 0  # the corpus's missing video
    assert "missing videos: 1" in printed and "bad_missing" in printed
    assert report["clips"] > 0 and report["frames"] >= report["clips"] and report["shards"] >= report["groups"]
    assert report["tasks"]["write"] == report["groups"] and report["tasks"]["decode"] >= report["groups"]
    est = report["estimate"]
    # real decodes: some of the picked videos are the corpus's broken ones, the others give the numbers
    assert est["sample_clips"] > 0 and est["output_bytes"] > report["clips"] * 3 * 512
    assert est["core_hours"] > 0 and est["cpu_s_per_clip"] > 0
    # the plan is stored: the same inputs reuse it; touching an input (mtime) plans again, to the same hash
    assert shard(args(sample_corpus, out, "dry_run=true", "dry_run_videos=0")) == 0
    assert "reused)" in capsys.readouterr().out
    caption = tmp_path / "caption.json"
    shutil.copy(sample_corpus / "caption.json", caption)
    again = [a if not a.startswith("captions=") else f"captions={caption}" for a in args(sample_corpus, out)]
    assert shard_run(load_config(ShardConfig, None, [*again, "dry_run=true", "dry_run_videos=0"])) == 0
    assert "made in" in capsys.readouterr().out
    assert json.loads((out / "dry_run.json").read_text())["plan_hash"] == report["plan_hash"]


def test_videos_as_a_list_file_plans_like_the_directory(sample_corpus, tmp_path, capsys):
    files = sorted(p for p in (sample_corpus / "videos").rglob("*") if p.is_file())
    lines = tmp_path / "videos.txt"
    lines.write_text("".join(f"{p}\n" for p in files))
    table = tmp_path / "videos.csv"
    # relative paths are taken from the list's directory
    table.write_text("video_id,path\n" + "".join(f"{p.stem},{os.path.relpath(p, tmp_path)}\n" for p in files))
    hashes = []
    for i, videos in enumerate((sample_corpus / "videos", lines, table)):
        out = tmp_path / f"out{i}"
        assert shard(args(sample_corpus, out, "dry_run=true", "dry_run_videos=0", videos=videos)) == 0
        report = json.loads((out / "dry_run.json").read_text())
        hashes.append((report["plan_hash"], report["clips"], report["missing_videos"]))
        group = next((out / ".ptrain_shard" / "plans" / report["plan_hash"]).glob("group-*.jsonl"))
        path = json.loads(group.read_text().splitlines()[0])[0]
        assert Path(path).is_absolute() and Path(path).is_file()
    capsys.readouterr()
    assert hashes[0] == hashes[1] == hashes[2]


def test_resume_scan_trusts_recorded_shards_without_reading_them(tmp_path, monkeypatch):
    versions = {"av": "x"}
    groups, records = [], {}
    for g in range(60):
        stems = [f"shard-{2 * g + k:06d}" for k in range(2)]
        shards = {}
        for stem in stems:
            side = write_shard(tmp_path, stem, [(f"v{g}_{stem[-4:]}", {"txt": b"t", "json": b"{}", "000.jpg": b"j"})],
                               {"plan_hash": "p1", "versions": versions})
            shards[stem] = summary(side, shard_facts(tmp_path, stem))
        groups.append((g, stems))
        if g < 50:  # groups 50..59 ran when the driver stopped: no record
            records[g] = {"group": g, "versions": versions, "errors": [], "shards": shards}
    opened, hashed = [], []
    import builtins
    import io

    import sharding.write as write

    real_open, real_hash = builtins.open, write.file_sha256

    def spy_open(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(write, "file_sha256", lambda p: hashed.append(p.name) or real_hash(p))
    committed, done, removed, rehashed = resume_scan(tmp_path, groups, records, "p1", versions, "p1")
    assert done == set(range(60)) - set(range(50, 60)) and len(committed) == 120 and not removed
    # the 100 shards of recorded groups were not opened; the 20 of unrecorded groups were verified in full
    assert rehashed == 20 and len(hashed) == 20
    assert all(name.startswith(("shard-0001", "shard-00010", "shard-00011")) for name in hashed)
    assert not [f for f in opened if "shard-0000" in f or "shard-00009" in f]
    # a shard rewritten behind our back (same size, other mtime) is verified, found changed, and removed
    tar = tmp_path / "shard-000004.tar"
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF
    tar.write_bytes(bytes(data))
    committed, done, removed, _n = resume_scan(tmp_path, groups, records, "p1", versions, "p1")
    assert removed == ["shard-000004.tar"] and 2 not in done and "shard-000004" not in committed
    # verify=full re-hashes every committed shard
    hashed.clear()
    resume_scan(tmp_path, groups, records, "p1", versions, "p1", verify="full")
    assert len(hashed) == 119


def _run_cli(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ptrain", "shard", *argv], capture_output=True, text=True,
                          timeout=300, **kw)


def _assert_one_clear_line(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("ptrain shard:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_out_that_is_a_file_is_a_clear_error(sample_corpus, tmp_path):
    (tmp_path / "out").write_text("not a directory")
    _assert_one_clear_line(_run_cli(args(sample_corpus, tmp_path / "out")),
                           f"out={tmp_path / 'out'} is a file, not a directory; pass a directory")


def test_a_corrupt_plan_marker_is_a_clear_error(sample_corpus, tmp_path):
    state = tmp_path / "out" / ".ptrain_shard"
    state.mkdir(parents=True)
    (state / "plan.json").write_text('{"plan_hash": "abc')
    _assert_one_clear_line(_run_cli(args(sample_corpus, tmp_path / "out")),
                           f"{state / 'plan.json'} is damaged", "Restore it, shard into a new out=DIR, or delete")


def _namespace_ok() -> bool:
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    return probe.returncode == 0


needs_mounts = pytest.mark.skipif(not shutil.which("unshare") or not _namespace_ok(),
                                  reason="needs a private mount namespace (unshare -m) for a real read-only or "
                                         "full filesystem")


def _in_namespace(mount: str, argv: list[str]) -> subprocess.CompletedProcess:
    cmd = " ".join(map(_quote, [sys.executable, "-m", "ptrain", "shard", *argv]))
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", f"{mount} && exec {cmd}"],
                          capture_output=True, text=True, timeout=300)


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


@needs_mounts
def test_a_read_only_output_directory_is_a_clear_error(sample_corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mount = f"mount --bind {_quote(str(out))} {_quote(str(out))} && mount -o remount,bind,ro {_quote(str(out))}"
    result = _in_namespace(mount, args(sample_corpus, out))
    _assert_one_clear_line(result, "cannot write there (Read-only file system)", f"make out={out} writable")


@needs_mounts
def test_a_full_output_disk_is_a_clear_error_and_the_rerun_completes(sample_corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # a 4 KiB filesystem: the state directory fits, the stored plan does not
    result = _in_namespace(f"mount -t tmpfs -o size=4k tmpfs {_quote(str(out))}", args(sample_corpus, out))
    _assert_one_clear_line(result, "no space left on the device", "rerun the same command")
    # the same command on a disk with room (the tmpfs is gone with its namespace) plans and completes
    result = _run_cli(args(sample_corpus, out, "dry_run=true", "dry_run_videos=0"))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("caption, message", [
    ('{"v": {"start": [0, 1e300], "end": [1, 1.7e308], "text": ["a", "b"]}}',
     "video 'v': segment 1: times must lie within 0 .. 172800 s (48 h"),
    ('{"v": {"start": ' + "[" * 100_000 + "]" * 100_000 + ', "end": [], "text": []}}',
     "video 'v': 'start' nests a list or an object in a list"),
    ('{"v": {"start": [0], "end": [6], "text": ["one"]}, "v": {"start": [9], "end": [12], "text": ["two"]}}',
     "video 'v' appears twice"),
])
def test_hostile_captions_stop_the_job_with_one_line(tmp_path, caption, message):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "v.mp4").write_bytes(b"never decoded")
    (tmp_path / "caption.json").write_text(caption)
    result = _run_cli([f"videos={tmp_path / 'videos'}", f"captions={tmp_path / 'caption.json'}",
                       f"out={tmp_path / 'out'}", "progress=false"])
    _assert_one_clear_line(result, f"{tmp_path / 'caption.json'}: ", message)
    assert not list((tmp_path / "out" / ".ptrain_shard" / "plans").glob("*/manifest.json"))  # no partial plan kept
