"""Damaged and tampered checkpoints (issue 8, root causes 1 and 6): a real run's checkpoints, then each kind of damage
a crash, a full disk, a bad copy or an attacker leaves. Resume must verify before trusting (sizes and sha256 from the
COMPLETE marker, every file parsed), fall back to the newest intact checkpoint with a warning naming what was wrong,
stop with one clear error (exit 2) when nothing intact is left, and never run code from DeepSpeed's pickles."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_fixtures import write_shards
from net import rank_env
from ptrain import checkpoint as ckpt
from ptrain.configs import CheckpointConfig

OVERRIDES = ["model.clip=tiny", "model.head=seqTransf", "model.num_frames=3", "model.frame_size=32",
             "model.max_words=8", "model.cross_layers=1", "data.num_workers=0", "engine.zero_stage=1",
             "engine.precision=fp32", "engine.micro_batch_size=2", "checkpoint.every_steps=1",
             "checkpoint.keep_last=3", "log.tensorboard=false", "log.every_steps=1"]
MODEL_PT = "deepspeed/mp_rank_00_model_states.pt"
OPTIM_PT = "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _pretrain(run: Path, shards: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ptrain", "pretrain", f"run_dir={run}", f"data.sources=[{shards}]",
                           *OVERRIDES, *extra], env=rank_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step run with a checkpoint after every step: step_1, step_2, step_3."""
    root = tmp_path_factory.mktemp("ckpt")
    write_shards(root / "shards", num_shards=1, samples_per_shard=8, frames=(3,), size=(32, 32))
    proc = _pretrain(root / "run", root / "shards", "max_steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.fixture
def run(trained, tmp_path):
    """A private copy of the trained run directory."""
    return Path(shutil.copytree(trained / "run", tmp_path / "run"))


def _step(run: Path, n: int) -> Path:
    return run / "checkpoints" / f"step_{n:08d}"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _old_marker(step: Path) -> None:
    """Rewrite COMPLETE as checkpoints before hashes had it (format 1: step and time only)."""
    (step / "COMPLETE").write_text(json.dumps({"step": int(step.name.split("_")[1]), "time": 0.0}))


def _evil_pickle(path: Path, victim: Path) -> None:
    """A torch.save file that runs `touch victim` when unpickled with weights_only=False (what DeepSpeed does)."""

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {victim}",)

    torch.save({"module": Evil(), "buffer_names": []}, path)


def _forge_marker(step: Path, rel: str) -> None:
    """What an attacker who rewrote a file also does: record its new size and sha256 in COMPLETE."""
    marker = json.loads((step / "COMPLETE").read_text())
    data = (step / rel).read_bytes()
    marker["files"][rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step / "COMPLETE").write_text(json.dumps(marker))


# ---------------------------------------------------------------------------------------------- verify


def test_complete_marker_records_every_file_and_an_intact_checkpoint_verifies(run):
    step = _step(run, 3)
    marker = json.loads((step / "COMPLETE").read_text())
    on_disk = sorted(str(f.relative_to(step)) for f in step.rglob("*") if f.is_file() and f.name != "COMPLETE")
    assert sorted(marker["files"]) == on_disk and marker["format"] == 2
    for rel in (MODEL_PT, "consolidated/weights.safetensors", "trainer_state.json"):
        data = (step / rel).read_bytes()
        assert marker["files"][rel] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ckpt.verify(step) == []


DAMAGE = {  # kind -> (what it does to step_3, words the warning must contain)
    "truncated .pt": (lambda s: _truncate(s / OPTIM_PT), [OPTIM_PT, "bytes but was saved with"]),
    "truncated .safetensors": (lambda s: _truncate(s / "consolidated/weights.safetensors"),
                               ["consolidated/weights.safetensors", "truncated"]),
    "deleted deepspeed/": (lambda s: shutil.rmtree(s / "deepspeed"), ["deepspeed/ is missing"]),
    "garbage trainer_state.json": (lambda s: (s / "trainer_state.json").write_text("{\x00garbage"),
                                   ["trainer_state.json"]),
    "flipped byte in the export": (lambda s: _flip_byte(s / "export/model.safetensors"),
                                   ["export/model.safetensors has changed since it was saved"]),
    "old marker, truncated .pt": (lambda s: (_old_marker(s), _truncate(s / MODEL_PT)),
                                  [MODEL_PT, "not a readable torch checkpoint"]),
    "old marker, truncated .safetensors": (lambda s: (_old_marker(s), _truncate(s / "export/model.safetensors")),
                                           ["export/model.safetensors is truncated"]),
    "old marker, missing rng": (lambda s: (_old_marker(s), (s / "rng/rank_00000.json").unlink()),
                                ["rng/rank_00000.json is missing"]),
    "garbage COMPLETE": (lambda s: (s / "COMPLETE").write_text("not json"), ["COMPLETE does not parse"]),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_each_kind_of_damage_falls_back_to_the_previous_checkpoint(run, kind):
    damage, words = DAMAGE[kind]
    damage(_step(run, 3))
    problems = " ".join(ckpt.verify(_step(run, 3)))
    for w in words:
        assert w in problems, (w, problems)
    assert ckpt.verify(_step(run, 2)) == []
    warnings: list[str] = []
    chosen = ckpt.select_resume(run, CheckpointConfig(resume="auto"), warnings.append)
    assert chosen == _step(run, 2)
    moved = run / "checkpoints" / "damaged" / "step_00000003"
    assert moved.is_dir() and not _step(run, 3).exists()  # out of resume's and prune's way, kept for inspection
    text = " ".join(warnings)
    assert "step_00000003 is damaged" in text and str(moved) in text and "newest intact checkpoint" in text
    for w in words:
        assert w in text, (w, text)


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_forged_marker_or_state_is_checked_not_followed(run):
    """COMPLETE and trainer_state.json are untrusted too: listed paths must stay inside the checkpoint, and a forged
    world size is named in at most five problems, not a million."""
    step = _step(run, 3)
    _edit_json(step / "COMPLETE", lambda m: m["files"].update({"../../../etc/passwd": {"bytes": 1, "sha256": "0"},
                                                               "/etc/hostname": {"bytes": 1, "sha256": "0"}}))
    problems = ckpt.verify(step)
    assert "COMPLETE lists '../../../etc/passwd', which is not a file inside the checkpoint" in problems
    assert "COMPLETE lists '/etc/hostname', which is not a file inside the checkpoint" in problems
    _old_marker(step)
    _edit_json(step / "trainer_state.json", lambda st: st.update(world_size=100_000))
    assert len(ckpt.verify(step)) > 100_000  # every rank's RNG files are missing
    warnings: list[str] = []
    assert ckpt.select_resume(run, CheckpointConfig(resume="auto"), warnings.append) == _step(run, 2)
    assert warnings[0].count("is missing") <= 5 and "more" in warnings[0] and len(warnings[0]) < 2000


def test_an_old_checkpoint_without_hashes_still_verifies(run):
    _old_marker(_step(run, 3))
    assert ckpt.verify(_step(run, 3)) == []


def test_every_checkpoint_damaged_is_an_error_or_a_fresh_start_only_when_asked(run):
    for n in (1, 2, 3):
        _truncate(_step(run, n) / "consolidated/weights.safetensors")
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.select_resume(run, CheckpointConfig(resume="auto"), print)
    text = str(e.value)
    assert "every complete checkpoint" in text and "if_all_damaged=start_over" in text
    assert all(f"step_0000000{n}: consolidated/weights.safetensors" in text for n in (1, 2, 3))
    assert all(_step(run, n).is_dir() for n in (1, 2, 3))  # an error moves nothing
    warnings: list[str] = []
    start_over = CheckpointConfig(resume="auto", if_all_damaged="start_over")
    assert ckpt.select_resume(run, start_over, warnings.append) is None
    assert "starting over from step 0" in warnings[0]
    assert sorted(p.name for p in (run / "checkpoints" / "damaged").iterdir()) == [f"step_0000000{n}" for n in (1, 2, 3)]


def test_an_explicitly_chosen_damaged_checkpoint_is_refused_not_replaced(run):
    _truncate(_step(run, 3) / OPTIM_PT)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.select_resume(run, CheckpointConfig(resume=str(_step(run, 3))), print)
    assert f"checkpoint.resume={_step(run, 3)} is damaged" in str(e.value) and OPTIM_PT in str(e.value)


def test_prune_never_counts_a_damaged_checkpoint_as_kept(run):
    _truncate(_step(run, 3) / MODEL_PT)
    removed = ckpt.prune(run, keep_last=1)
    assert removed == [_step(run, 1)]
    assert _step(run, 2).is_dir()  # the only intact one survives a keep_last=1 prune
    assert _step(run, 3).is_dir()  # the damaged newer one stays for inspection
    assert ckpt.latest_intact(run) == _step(run, 2)


def test_prune_keeps_the_newest_intact_ones(run):
    assert sorted(ckpt.prune(run, keep_last=1)) == [_step(run, 1), _step(run, 2)]
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step_00000003"]


# ---------------------------------------------------------------------------------------------- resume, end to end


def test_resume_skips_a_truncated_checkpoint_and_trains_on(run, trained):
    _truncate(_step(run, 3) / OPTIM_PT)
    proc = _pretrain(run, trained / "shards", "max_steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "warning: checkpoint" in err and "step_00000003 is damaged" in err and OPTIM_PT in err
    assert f"resumed from {_step(run, 2)} at step 2" in err
    assert ckpt.verify(_step(run, 4)) == [] and ckpt.verify(_step(run, 3)) == []  # step 3 written again, intact


def test_all_damaged_resume_exits_2_with_one_line(run, trained):
    for n in (1, 2, 3):
        (_step(run, n) / "trainer_state.json").write_text("garbage")
    proc = _pretrain(run, trained / "shards", "max_steps=4")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ptrain pretrain:")]
    assert len(lines) == 1 and "every complete checkpoint" in lines[0] and "trainer_state.json" in lines[0]
    assert "Traceback" not in proc.stderr


def test_a_tampered_deepspeed_pickle_never_runs_on_resume(run, trained, tmp_path):
    """The attacker replaces DeepSpeed's model file with a pickle that runs a command and updates COMPLETE to match:
    resume refuses the file by name and the command never runs (it is the only checkpoint: exit 2)."""
    victim = tmp_path / "PWNED"
    for n in (1, 2):
        shutil.rmtree(_step(run, n))
    _evil_pickle(_step(run, 3) / MODEL_PT, victim)
    _forge_marker(_step(run, 3), MODEL_PT)
    proc = _pretrain(run, trained / "shards", "max_steps=4")
    assert not victim.exists(), "the pickle in the checkpoint ran a command"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert MODEL_PT in proc.stderr and "posix.system" in proc.stderr and "refused" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------- the loader itself


def test_deepspeed_files_load_through_the_restricted_loader(run, tmp_path):
    from ptrain.engine import load_deepspeed_file

    for rel in (MODEL_PT, OPTIM_PT):
        state = load_deepspeed_file(str(_step(run, 3) / rel), map_location="cpu")
        assert isinstance(state, dict) and any(torch.is_tensor(v) or isinstance(v, dict) for v in state.values())
    victim = tmp_path / "PWNED"
    _evil_pickle(tmp_path / "evil.pt", victim)
    with pytest.raises(ValueError, match="evil.pt: refused to unpickle it.*posix.system"):
        load_deepspeed_file(str(tmp_path / "evil.pt"))
    # a plain pickle (not torch's zip format) with the same payload
    import pickle

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {victim}",)

    (tmp_path / "raw.pt").write_bytes(pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(ValueError, match="raw.pt: refused"):
        load_deepspeed_file(str(tmp_path / "raw.pt"))
    assert not victim.exists()


_ENGINE_LOAD = r"""
import os, sys, warnings
import torch
from safetensors.torch import load_file
from ptrain import distributed as du
from ptrain.configs import EngineConfig, OptimConfig
from ptrain.engine import Engine
from ptrain.model import ModelConfig, build_model
from ptrain.optim import build_optimizer

step, evil_step = sys.argv[1], sys.argv[2]
du.init(120)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model = build_model(ModelConfig(clip="tiny", head="seqTransf", num_frames=3, frame_size=32, max_words=8,
                                    cross_layers=1))
engine = Engine(model, build_optimizer(model, OptimConfig()), EngineConfig(zero_stage=1, precision="fp32",
                                                                           micro_batch_size=2))
engine.load(step, "deepspeed")
full = load_file(os.path.join(step, "consolidated", "weights.safetensors"))
print("equal", all(torch.equal(p.detach(), full[n]) for n, p in engine.module.named_parameters()))
try:
    engine.load(evil_step, "deepspeed")
    print("loaded the tampered checkpoint")
except ValueError as e:
    print("refused", e)
"""


def test_engine_load_reads_deepspeed_files_without_running_code(run, tmp_path):
    """Even with verification bypassed, DeepSpeed's own load_checkpoint gets its files through the restricted
    loader: a real checkpoint loads (the weights equal the consolidated ones), a tampered one is refused unrun.
    (A process of its own: DeepSpeed caches process groups across engines of one process.)"""
    evil = Path(shutil.copytree(_step(run, 3), tmp_path / "evil"))
    victim = tmp_path / "PWNED"
    _evil_pickle(evil / MODEL_PT, victim)
    proc = subprocess.run([sys.executable, "-c", _ENGINE_LOAD, str(_step(run, 3)), str(evil)], env=rank_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "equal True" in proc.stdout
    assert f"refused {evil / MODEL_PT}: refused to unpickle it" in proc.stdout and "posix.system" in proc.stdout
    assert not victim.exists()
