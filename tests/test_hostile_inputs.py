"""Broken inputs to training and eval (issue 8, root causes 4, 5 and 8, the ptrain side): each must end in one clear
line naming the input and the fix with exit status 2 (never a traceback, a hang or a silent wrong number), found
before any rank starts when the config alone can tell; and the rendezvous store of a loopback run listens on
loopback only."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import pytest

from data_fixtures import write_shards
from net import free_port, rank_env
from ptrain.cli import main

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch" / "pretrain.sh"
TINY = ["model.clip=tiny", "model.num_frames=3", "model.frame_size=32", "model.max_words=8", "data.num_workers=0",
        "engine.zero_stage=1", "engine.precision=fp32", "engine.micro_batch_size=2", "log.tensorboard=false"]


def _one_line(stderr: str, prefix: str) -> str:
    """The single error line (no traceback anywhere)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def _spoil(src: Path, dst: Path, suffix: str) -> Path:
    """A copy of the shards in ``src`` whose ``*suffix`` members are garbage of the same length (headers and
    sidecars stay valid: only the JSON or the JPEG bytes are unreadable)."""
    shutil.copytree(src, dst)
    for tar in dst.glob("*.tar"):
        blob = bytearray(tar.read_bytes())
        with tarfile.open(tar) as tf:
            for m in tf:
                if m.name.endswith(suffix):
                    blob[m.offset_data:m.offset_data + m.size] = (b"\x00garbage" * m.size)[:m.size]
        tar.write_bytes(bytes(blob))
    return dst


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Shards of 32 px / 4 frames (with the manifest `ptrain shard` writes), the same with every JSON or every JPEG
    unreadable, and two tiny exports: 64 px / 8 frames and 32 px / 4 frames."""
    import torch

    from ptrain.model import ModelConfig, build_model, save_export

    root = tmp_path_factory.mktemp("hostile_inputs")
    shards = root / "shards"
    write_shards(shards, num_shards=1, samples_per_shard=8, frames=(4,), size=(32, 32))
    (shards / "manifest.json").write_text(json.dumps({"settings": {"num_frames": 4, "frame_size": 32}}))
    exports = {}
    for size, frames in ((64, 8), (32, 4)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            model = build_model(ModelConfig(clip="tiny", head="meanP", frame_size=size, num_frames=frames, max_words=8))
        exports[size] = save_export(model.eval(), root / f"export{size}")
    return {"root": root, "shards": shards, "export64": exports[64], "export32": exports[32],
            "bad_json": _spoil(shards, root / "bad_json", ".json"), "bad_jpg": _spoil(shards, root / "bad_jpg", ".jpg")}


# ---------------------------------------------------------------------------------------------- eval


def test_eval_refuses_shards_of_another_frame_size_and_count(data, capsys, tmp_path):
    """32 px / 4-frame shards against a 64 px / 8-frame export: refused with both sizes named, exit 2; converted
    (resized and padded) only with allow_resize=true."""
    assert main(["eval", f"export={data['export64']}", f"shards=[{data['shards']}]"]) == 2
    line = _one_line(capsys.readouterr().err, "ptrain eval:")
    assert "frames of 32x32 (short side 32) but the export takes 64 px" in line
    assert "4 frames per clip were planned but the export takes 8" in line and "allow_resize=true" in line
    out = tmp_path / "results.json"
    assert main(["eval", f"export={data['export64']}", f"shards=[{data['shards']}]", "allow_resize=true",
                 f"out={out}"]) == 0
    results = json.loads(out.read_text())
    assert results["frames"] == {"frame_short_side": 32, "frames_planned": 4, "resized": True}
    assert results["all"]["n_video"] == 8 and results["model"]["frame_size"] == 64


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_eval_on_a_missing_or_empty_shard_directory(data, capsys, tmp_path, kind):
    shards = tmp_path / "shards"
    if kind == "empty":
        shards.mkdir()
    assert main(["eval", f"export={data['export32']}", f"shards=[{shards}]"]) == 2
    line = _one_line(capsys.readouterr().err, "ptrain eval:")
    assert str(shards) in line
    assert ("does not exist" in line) if kind == "missing" else ("has no complete shard" in line)


@pytest.mark.parametrize("kind", ["bad_json", "bad_jpg"])
def test_eval_on_shards_that_are_all_unreadable(data, capsys, kind):
    assert main(["eval", f"export={data['export32']}", f"shards=[{data[kind]}]"]) == 2
    line = _one_line(capsys.readouterr().err, "ptrain eval:")
    assert "none of the 8 held-out samples could be read" in line and str(data[kind]) in line
    assert "samples_corrupt" in line and "re-shard them" in line


def test_eval_batch_size_bound(data, capsys):
    assert main(["eval", f"export={data['export32']}", f"shards=[{data['shards']}]", "batch_size=1000000000"]) == 2
    line = _one_line(capsys.readouterr().err, "ptrain eval:")
    assert "batch_size=1000000000 clips of 4 frames at 32 px" in line and "GiB" in line


# ---------------------------------------------------------------------------------------------- training data


def test_training_on_shards_where_every_sample_is_unreadable(data, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ptrain", "pretrain", f"run_dir={tmp_path / 'run'}", "max_steps=2",
                           f"data.sources=[{data['bad_jpg']}]", "data.max_substitutes=8", *TINY],
                          env=rank_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_line(proc.stderr, "ptrain: rank 0:")
    assert "data.sources: global sample 0 and 8 substitutes in a row were unreadable" in line
    assert str(data["bad_jpg"]) in line and "re-shard them" in line


_STREAMED = r"""
import sys
from ptrain.data import DataConfig, build_train_loader
from ptrain.data.seekable import DataUnreadable
cfg = DataConfig(sources=[sys.argv[1]], num_workers=0, allow_pipe=True)
it = iter(build_train_loader(cfg, micro_batch_size=2, seed=0, num_frames=4, frame_size=32, max_words=8))
try:
    next(it)
except DataUnreadable as e:
    print("DataUnreadable:", e)
"""


@pytest.mark.parametrize("kind", ["bad_jpg", "garbage_tar"])
def test_streamed_training_on_unreadable_shards_stops_instead_of_looping(data, tmp_path, kind):
    """A pipe: source whose every sample is unreadable, or whose tar yields no sample at all, once looped forever."""
    d = data["bad_jpg"]
    if kind == "garbage_tar":
        d = Path(shutil.copytree(data["shards"], tmp_path / "garbage"))
        tar = d / "shard-000000.tar"
        tar.write_bytes(b"\xff" * tar.stat().st_size)
    proc = subprocess.run([sys.executable, "-c", _STREAMED, f"pipe:cat {d}/shard-000000.tar"], env=rank_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DataUnreadable: data.sources:" in proc.stdout and "re-shard them" in proc.stdout


# ---------------------------------------------------------------------------------------------- run directory


def _setpriv() -> list[str]:
    """As root, a read-only directory is still writable: drop the capability that allows it for the child."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a directory read-only for the child")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def test_a_read_only_run_directory(data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        proc = subprocess.run([*_setpriv(), sys.executable, "-m", "ptrain", "pretrain", f"run_dir={run}",
                               "max_steps=1", f"data.sources=[{data['shards']}]", *TINY],
                              env=rank_env(), capture_output=True, text=True, timeout=300)
    finally:
        run.chmod(0o755)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_line(proc.stderr, "ptrain pretrain:")
    assert f"run_dir={run} is not writable (Permission denied)" in line
    assert not list(run.iterdir())


def test_a_run_directory_that_is_a_file(data, capsys, tmp_path):
    run = tmp_path / "run"
    run.write_text("not a directory")
    assert main(["pretrain", f"run_dir={run}", f"data.sources=[{data['shards']}]", *TINY]) == 2
    assert f"run_dir={run} is a file" in _one_line(capsys.readouterr().err, "ptrain pretrain:")


def _file_size_limit(limit: int):
    def limit_writes():  # runs in the child: writes past `limit` bytes fail (EFBIG) like a full disk's (ENOSPC)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limit_writes


def test_a_run_directory_that_fills_up_mid_run_then_a_rerun_completes(data, tmp_path):
    """The first checkpoint does not fit (the tiny model's files are ~6 MB, the limit 3 MB): one line, exit 2, no
    traceback; the partial checkpoint has no COMPLETE marker, so a rerun with room starts over and completes."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "ptrain", "pretrain", f"run_dir={run}", "max_steps=1", "checkpoint.every_steps=1",
            f"data.sources=[{data['shards']}]", *TINY]
    proc = subprocess.run(args, env=rank_env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=_file_size_limit(3 << 20))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_line(proc.stderr, "ptrain: rank 0:")
    assert f"could not write checkpoint {run / 'checkpoints' / 'step_00000001'}" in line
    assert "full, read-only or over quota" in line and "no intact checkpoint yet" in line
    assert not (run / "checkpoints" / "step_00000001" / "COMPLETE").exists()
    again = subprocess.run(args, env=rank_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run / "checkpoints" / "step_00000001" / "COMPLETE").is_file()


# ---------------------------------------------------------------------------------------------- config checks


def test_frame_size_that_is_not_a_multiple_of_the_patch(data, capsys):
    for clip, size, want in (("tiny", 33, "multiple of 4"),
                             ("ViT-B/32", 225, "multiple of 32; got 225 (e.g. 224 or 256")):
        assert main(["pretrain", f"data.sources=[{data['shards']}]", f"model.clip={clip}",
                     f"model.frame_size={size}"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "model.frame_size" in err and want in err


def test_a_local_clip_directory_of_another_image_size(data, capsys, tmp_path):
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text(json.dumps({"vision_config": {"image_size": 224, "patch_size": 32}}))
    assert main(["pretrain", f"run_dir={tmp_path / 'run'}", f"data.sources=[{data['shards']}]", f"model.clip={clip}",
                 "model.frame_size=32"]) == 2
    line = _one_line(capsys.readouterr().err, "ptrain pretrain:")
    assert "takes 224x224 frames" in line and "set model.frame_size=224" in line


def test_absurd_micro_batch_size_is_refused_before_anything_is_allocated(data, capsys):
    from ptrain.config import load_config
    from ptrain.configs import PretrainConfig

    assert main(["pretrain", f"data.sources=[{data['shards']}]", "engine.micro_batch_size=1000000000"]) == 2
    err = capsys.readouterr().err
    assert "engine.micro_batch_size=1000000000 clips of 12 frames at 224 px" in err and "at most 38043" in err
    # the bound never bites a real configuration: ViT-L/14 at 336 px, 32 frames, 1024 clips per device
    load_config(PretrainConfig, None, ["model.clip=ViT-L/14", "model.frame_size=336", "model.num_frames=32",
                                       "engine.micro_batch_size=1024"])


def test_launcher_runs_every_config_check_before_starting_ranks(data, tmp_path):
    cases = {
        "data.sources": ([f"data.sources=[{tmp_path / 'nope'}]"], "does not exist"),
        "data.eval_sources": ([f"data.sources=[{data['shards']}]", f"data.eval_sources=[{tmp_path / 'nope'}]"],
                              "data.eval_sources: shard source"),
        "checkpoint.resume": ([f"data.sources=[{data['shards']}]", f"checkpoint.resume={tmp_path / 'nope'}"],
                              "checkpoint.resume="),
        "model.clip": ([f"data.sources=[{data['shards']}]", f"model.clip={tmp_path / 'nope.pt'}"], "does not exist"),
    }
    config = tmp_path / "c.yaml"
    config.write_text("max_steps: 1\n")
    for key, (overrides, want) in cases.items():
        proc = subprocess.run([str(LAUNCH), "--master-port", str(free_port()), str(config),
                               f"run_dir={tmp_path / 'run'}", *overrides], env=rank_env(), capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2, (key, proc.stderr[-2000:])
        line = _one_line(proc.stderr, "launch/pretrain.sh:")
        assert want in line, (key, line)
        assert "deepspeed" not in proc.stderr.lower().replace("launch/pretrain.sh", ""), key  # no rank started


# ---------------------------------------------------------------------------------------------- MASTER_PORT


@pytest.fixture
def taken_port():
    """A port another process (here: this one) listens on, on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_taken_master_port_is_refused_by_the_launcher_at_once(data, tmp_path, taken_port):
    config = tmp_path / "c.yaml"
    config.write_text(f"max_steps: 1\ndata: {{sources: [{data['shards']}]}}\n")
    proc = subprocess.run([str(LAUNCH), "--master-port", str(taken_port), str(config), f"run_dir={tmp_path / 'run'}"],
                          env=rank_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = _one_line(proc.stderr, "launch/pretrain.sh:")
    assert f"MASTER_PORT={taken_port} is already in use on 127.0.0.1" in line and "--master-port P" in line


def test_a_rank_meeting_a_taken_port_fails_at_once(data, tmp_path, taken_port):
    """A launcher other than ours (RANK etc. set): rank 0 cannot bind the store; one line and exit 2, not a wait."""
    env = rank_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(taken_port))
    proc = subprocess.run([sys.executable, "-m", "ptrain", "pretrain", f"run_dir={tmp_path / 'run'}", "max_steps=1",
                           f"data.sources=[{data['shards']}]", *TINY, "engine.dist_timeout_s=600"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"MASTER_PORT={taken_port} is already in use" in _one_line(proc.stderr, "ptrain pretrain:")


def test_a_world_of_one_ignores_an_inherited_taken_port(taken_port):
    code = "from ptrain import distributed as du; du.init(60); import torch.distributed as d; print(d.get_world_size())"
    env = rank_env(MASTER_PORT=str(taken_port), MASTER_ADDR="10.0.0.1")
    proc = subprocess.run([sys.executable, "-c", code], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "1", proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- network binding

_RANK = r"""
import sys, time
from ptrain import distributed as du
du.init(60)
import torch
x = torch.ones(1)
du.all_reduce_sum(x)
print("ready", float(x), flush=True)
sys.stdin.read()  # hold the sockets open until the test has looked
"""


def _listening(pids: list[int]) -> list[str]:
    """Local addresses of the TCP sockets these processes listen on (``ss -ltnp``)."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines() if any(f"pid={p}," in line for p in pids)]


@pytest.mark.parametrize("addr", ["127.0.0.1", "localhost"])
def test_a_loopback_rendezvous_listens_on_loopback_only(addr):
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is not installed")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _RANK], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=rank_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR=addr,
                                       MASTER_PORT=str(port)))
             for r in (0, 1)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready 2.0", p.stderr.read()[-2000:] if p.poll() is not None else ""
        addresses = _listening([p.pid for p in procs])
        assert any(a.endswith(f":{port}") for a in addresses), addresses  # the store, found
        assert all(a.rsplit(":", 1)[0] in ("127.0.0.1", "[::1]") for a in addresses), addresses
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=60)


def test_only_loopback_addresses_are_bound_by_hand():
    from ptrain import distributed as du

    assert du.loopback_ip("127.0.0.1") == "127.0.0.1" and du.loopback_ip("127.0.0.2") == "127.0.0.2"
    assert du.loopback_ip("::1") == "::1"
    assert du.loopback_ip("localhost") in ("127.0.0.1", "::1")
    for remote in ("10.0.0.1", "192.0.2.7", "2001:db8::1", "no-such-host.invalid"):
        assert du.loopback_ip(remote) is None, remote  # multi-node: torch's own store, as before
    du.check_master_port("192.0.2.7", free_port())  # not this machine's address: nothing to check here
    with pytest.raises(du.PortInUse, match="already in use"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            du.check_master_port("127.0.0.1", s.getsockname()[1])
