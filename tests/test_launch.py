"""launch/pretrain.sh argument handling: help, config validation before any rank starts, flag errors, nested
launchers refused, and every documented launch form (slow: 2 CPU ranks each).
(The multi-rank launches themselves are in test_train_distributed.py, marked slow.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch" / "pretrain.sh"
DEMO = REPO / "launch" / "demo.sh"


def _run(*args, **env):
    full = dict(os.environ, DS_ACCELERATOR="cpu", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env)
    return subprocess.run([str(LAUNCH), *args], env=full, capture_output=True, text=True, timeout=60)


def test_scripts_are_executable_bash():
    for script in (LAUNCH, DEMO):
        assert os.access(script, os.X_OK), script
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script


def test_help_documents_env_vars_and_examples():
    proc = _run("--help")
    assert proc.returncode == 0
    for word in ("NUM_GPUS", "HOSTFILE", "LAUNCHER", "NO_SSH", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                 "slurm", "openmpi", "--no-ssh", "Examples:"):
        assert word in proc.stdout, word


def test_bad_config_fails_before_launching(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("engine: {zero_stage: 7}\noptim: {lrr: 1}\n")
    proc = _run(str(cfg))
    assert proc.returncode == 2
    assert "zero_stage must be 0, 1, 2 or 3" in proc.stderr and "did you mean optim.lr?" in proc.stderr
    assert "deepspeed" not in proc.stderr.lower().split("invalid config")[0]  # no launcher output before it


def test_flag_errors(tmp_path):
    assert _run("--bogus", "x.yaml").returncode == 2
    assert _run().returncode == 2
    cfg = tmp_path / "ok.yaml"
    cfg.write_text("max_steps: 1\n")
    proc = _run("--no-ssh", "--node-rank", "1", str(cfg))
    assert proc.returncode == 2 and "--no-ssh needs --hostfile" in proc.stderr
    proc = _run("--hostfile", str(tmp_path / "missing"), str(cfg))
    assert proc.returncode == 2 and "hostfile" in proc.stderr


# ---------------------------------------------------------------------------------------------- launch forms

FORMS = {  # every documented way to start 2 CPU ranks of `ptrain pretrain`
    "launch/pretrain.sh": lambda port: [str(LAUNCH), "--gpus", "2", "--master-port", str(port)],
    "deepspeed launch/pretrain.sh": lambda port: ["deepspeed", "--num_gpus", "2", "--master_port", str(port), str(LAUNCH)],
    "deepspeed --no_python launch/pretrain.sh": lambda port: ["deepspeed", "--num_gpus", "2", "--master_port", str(port),
                                                              "--no_python", str(LAUNCH)],
    "deepspeed --module ptrain pretrain": lambda port: ["deepspeed", "--num_gpus", "2", "--master_port", str(port),
                                                        "--module", "ptrain", "pretrain"],
    "torchrun -m ptrain pretrain": lambda port: ["torchrun", "--nproc_per_node", "2", "--master_port", str(port), "-m",
                                                 "ptrain", "pretrain"],
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from data_fixtures import write_shards

    root = tmp_path_factory.mktemp("forms")
    write_shards(root / "shards", num_shards=2, samples_per_shard=8, frames=(3,), size=(32, 32))
    config = root / "tiny.yaml"
    config.write_text(
        "max_steps: 3\nmodel: {clip: tiny, head: seqTransf, num_frames: 3, frame_size: 32, max_words: 8, "
        f"cross_layers: 1}}\ndata: {{sources: [{root / 'shards'}], num_workers: 0}}\n"
        "engine: {zero_stage: 2, precision: fp32, micro_batch_size: 2}\ncheckpoint: {every_steps: 3}\n"
        "log: {every_steps: 1, tensorboard: false}\n")
    return root, config


def _clean_env():
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "NUM_GPUS", "HOSTFILE"):
        env.pop(k, None)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("form", list(FORMS))
def test_every_launch_form_runs_two_ranks_alike(form, tiny_run):
    """Each form trains the same 3 steps on 2 CPU ranks; the logged losses equal launch/pretrain.sh's."""
    import json

    from net import free_port

    root, config = tiny_run
    run = root / form.replace(" ", "_").replace("/", "_")
    proc = subprocess.run([*FORMS[form](free_port()), str(config), f"run_dir={run}"], cwd=root, env=_clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    state = json.loads((run / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert len(losses) == 3 and state["world_size"] == 2
    reference = root / "reference.json"
    if reference.exists():  # every form after the first computes the same numbers
        assert losses == json.loads(reference.read_text()), form
    else:
        reference.write_text(json.dumps(losses))


def test_a_launcher_inside_a_launched_rank_is_refused(tmp_path):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text("max_steps: 1\n")
    proc = _run(str(cfg), RANK="0", WORLD_SIZE="2", LOCAL_RANK="0")
    assert proc.returncode == 2
    assert "already rank 0 of 2 started by a launcher" in proc.stderr and "deepspeed" not in proc.stdout


def test_launcher_flags_given_to_a_rank_are_refused(tmp_path):
    """`deepspeed launch/pretrain.sh --gpus 2 CONFIG` hands --gpus to the rank: it names the mistake."""
    env = dict(_clean_env(), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    proc = subprocess.run([sys.executable, str(LAUNCH), "--local_rank=0", "--gpus", "2", str(tmp_path / "c.yaml")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unexpected flag '--gpus'" in proc.stderr
    assert "belong to the launcher's own command line" in proc.stderr
