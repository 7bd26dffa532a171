"""launch/pretrain.sh argument handling: help, config validation before any rank starts, flag errors.
(The multi-rank launches themselves are in test_train_distributed.py, marked slow.)"""

import os
import subprocess
import sys
from pathlib import Path

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
