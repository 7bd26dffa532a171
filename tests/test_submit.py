"""`ptrain submit` / `ptrain jobs` without a cluster: what a submission is made of (paths, carried config files, the
id), the token as Ray's tools read it, the errors when the dashboard is not there, the Ray Train restart's resume
choice, the `ray` config section, and a fast CLI (the cluster tests are in test_ray_train.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from net import free_port
from ptrain import cluster
from ptrain.cli import main
from ptrain.config import ConfigError, config_files, load_config
from ptrain.configs import FinetuneConfig, PretrainConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working directory with shards, an export and a config that includes a base file one directory up."""
    (tmp_path / "shards").mkdir()
    (tmp_path / "exp").mkdir()
    (tmp_path / "configs" / "sub").mkdir(parents=True)
    (tmp_path / "configs" / "base.yaml").write_text("max_steps: 5\nmodel: {clip: tiny}\n")
    (tmp_path / "configs" / "sub" / "run.yaml").write_text("include: ../base.yaml\nrun_dir: runs/a\n"
                                                           "data: {sources: [shards]}\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_submission_resolves_paths_carries_includes_and_derives_its_id(project):
    plan = cluster.prepare("pretrain", ["configs/sub/run.yaml", "model.clip=ViT-B/32"], project)
    cfg = plan["cfg"]
    # relative paths became absolute against the submitting directory; a CLIP name stays a name
    assert cfg.run_dir == str(project / "runs" / "a")
    assert cfg.data.sources == [{"path": str(project / "shards"), "weight": 1.0}]
    assert cfg.model.clip == "ViT-B/32" and cfg.ray.enabled and cfg.max_steps == 5
    assert f"run_dir={project / 'runs' / 'a'}" in plan["overrides"] and "ray.enabled=true" in plan["overrides"]
    assert plan["output"] == str(project / "runs" / "a")
    # the config and the file it includes travel together, in their relative layout
    assert plan["files"] == [project / "configs" / "sub" / "run.yaml", project / "configs" / "base.yaml"]
    into = project / "wd"
    entry = cluster._working_dir(plan["files"], into)
    assert entry == "config/sub/run.yaml"
    assert (into / "config" / "base.yaml").read_text() == (project / "configs" / "base.yaml").read_text()
    # what the job will run loads to the same config there
    carried = load_config(PretrainConfig, into / entry, plan["overrides"])
    assert cluster.submission_key("pretrain", carried) == plan["key"]
    # the id is the verb + the resolved config: the same work spelt with absolute paths has the same id
    same = cluster.prepare("pretrain", [str(project / "configs/sub/run.yaml"), f"run_dir={project}/runs/a",
                                        "model.clip=ViT-B/32", "ray.enabled=true"], project)
    assert same["key"] == plan["key"] and plan["key"].startswith("ptrain-pretrain-")
    other = cluster.prepare("pretrain", ["configs/sub/run.yaml", "model.clip=ViT-B/32", "seed=1"], project)
    assert other["key"] != plan["key"]


def test_submission_refuses_a_relative_input_missing_here_and_bad_verbs(project):
    with pytest.raises(cluster.UsageError, match=r"data.sources=nowhere: a relative path that does not exist here .*"
                                                 r"absolute path as the cluster's nodes see it"):
        cluster.prepare("pretrain", ["configs/sub/run.yaml", "data.sources=[nowhere]"], project)
    with pytest.raises(cluster.UsageError, match="runs shard, pretrain, finetune, eval, not 'convert'"):
        cluster.prepare("convert", [], project)
    with pytest.raises(cluster.UsageError, match="optim.lrr: unknown key"):
        cluster.prepare("pretrain", ["configs/sub/run.yaml", "optim.lrr=1"], project)


def test_submission_per_verb(project):
    shard = cluster.prepare("shard", ["videos=shards", "captions=/data/c.json", "out=out"], project)
    assert "ray.address=auto" in shard["overrides"] and shard["cfg"].out == str(project / "out")
    assert shard["files"] == [] and shard["key"].startswith("ptrain-shard-")
    tuned = cluster.prepare("shard", ["videos=shards", "captions=/data/c.json", "out=out", "ray.address=ray://h:1"],
                            project)
    assert "ray.address=auto" not in tuned["overrides"]
    ev = cluster.prepare("eval", ["export=exp", "shards=[shards]", "out=res/e.json"], project)
    assert ev["cfg"].export == str(project / "exp") and ev["cfg"].out == str(project / "res" / "e.json")
    assert not any(o.startswith("ray.") for o in ev["overrides"])
    ft = cluster.prepare("finetune", ["init=exp", "data.sources=[{path: shards, weight: 2}]", "test=[shards]"],
                         project)
    assert ft["cfg"].init == str(project / "exp") and ft["cfg"].test == [str(project / "shards")]
    assert ft["cfg"].data.sources == [{"path": str(project / "shards"), "weight": 2.0}]
    # what the job reads back from the overrides is the same config
    again = load_config(FinetuneConfig, None, ft["overrides"])
    assert cluster.submission_key("finetune", again) == ft["key"]


def test_config_files_follow_nested_includes(tmp_path):
    (tmp_path / "a.yaml").write_text("include: [b.yaml, d/c.yaml]\nseed: 1\n")
    (tmp_path / "b.yaml").write_text("max_steps: 2\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "c.yaml").write_text("include: ../b.yaml\n")
    assert config_files(tmp_path / "a.yaml") == [tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "d" / "c.yaml"]
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        config_files(tmp_path / "a.yaml")


def test_token_is_read_as_rays_tools_read_it(tmp_path, monkeypatch):
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    token, why = cluster.auth_token()
    assert token is None and "RAY_AUTH_TOKEN" in why
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert cluster.auth_token() == ("from-home", str(tmp_path / ".ray" / "auth_token"))
    (tmp_path / "t").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert cluster.auth_token()[0] == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert cluster.auth_token() == ("from-env", "RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(cluster.ClusterError, match="RAY_AUTH_TOKEN_PATH=.*cannot read the token file"):
        cluster.auth_token()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert cluster.auth_token()[0] is None


def test_unreachable_dashboard_is_said_clearly(project, capsys):
    address = f"http://127.0.0.1:{free_port()}"
    code = cluster.submit_main(["--address", address, "eval", "export=/x/exp", "shards=[/x/shards]"])
    err = capsys.readouterr().err
    assert code == 4
    assert f"cannot reach the Ray dashboard at {address}: nothing answers at 127.0.0.1" in err
    assert "ray start --head" in err and "--address http://HEAD:8265" in err
    assert cluster.jobs_main(["--address", address]) == 4
    assert cluster.jobs_main(["--address", "ray://h:10001"]) == 4
    assert "not an http(s)://HOST:PORT URL" in capsys.readouterr().err


def test_command_line_flags(project, capsys):
    assert main(["submit", "--bogus", "eval"]) == 2
    assert "unknown flag '--bogus'" in capsys.readouterr().err
    assert main(["submit"]) == 2
    assert main(["submit", "--address"]) == 2
    assert "--address needs a value" in capsys.readouterr().err
    assert main(["jobs", "logs"]) == 2
    assert main(["jobs", "frobnicate", "x"]) == 2
    assert main(["submit", "--help"]) == 0 and "--resubmit" in capsys.readouterr().out
    assert main(["jobs", "-h"]) == 0 and "ptrain jobs stop ID" in capsys.readouterr().out
    assert main(["sbumit"]) == 2 and "did you mean 'submit'" in capsys.readouterr().err
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "submit" in out and "jobs" in out


def test_cluster_commands_start_fast():
    code = ("import sys, contextlib, io\nfrom ptrain.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['submit', '--help']) == 0 and main(['jobs', '--help']) == 0\n"
            "    assert main(['pretrain', '--help']) == 0\n"
            "print(','.join(m for m in ('torch', 'ray', 'deepspeed') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == ""


def test_ray_section_checks():
    cfg = load_config(PretrainConfig, None, ["ray.enabled=true", "ray.num_workers=4", "ray.use_gpu=true"])
    assert cfg.ray.enabled and cfg.ray.num_workers == 4 and cfg.ray.gpus_per_worker == 1.0
    with pytest.raises(ConfigError) as e:
        load_config(FinetuneConfig, None, ["init=x", "ray.num_workers=0", "ray.max_failures=-2",
                                           "ray.use_gpu=true", "ray.gpus_per_worker=0", "ray.address=nowhere"])
    text = str(e.value)
    for key in ("ray.num_workers must be >= 1", "ray.max_failures must be -1", "ray.gpus_per_worker must be positive",
                "ray.address must be 'auto'"):
        assert key in text, text


def test_ray_enabled_inside_a_launched_rank_is_refused(monkeypatch, capsys):
    from ptrain import pretrain

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert pretrain.run(load_config(PretrainConfig, None, ["ray.enabled=true"])) == 2
    assert "Ray Train starts its own workers" in capsys.readouterr().err


def _complete(run: Path, step: int) -> Path:
    d = run / "checkpoints" / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "COMPLETE").write_text("{}")
    return d


def test_a_ray_restart_resumes_from_the_newest_complete_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = load_config(PretrainConfig, None, [f"run_dir={run}", "checkpoint.resume=none"])
    assert cluster._resume_from_report(cfg, None, "pretrain") is cfg  # not restarted after a report: as configured
    reported, pointer = _complete(run, 10), tmp_path / "pointer"
    pointer.mkdir()
    (pointer / cluster.POINTER).write_text(json.dumps({"checkpoint": str(reported), "step": 10, "samples_seen": 80}))
    assert cluster._resume_from_report(cfg, str(pointer), "pretrain").checkpoint.resume == str(reported)
    # a checkpoint completed after the last report (the failure came before Ray registered it) is newer: a rerun
    # would take it too
    newer = _complete(run, 20)
    assert cluster._resume_from_report(cfg, str(pointer), "pretrain").checkpoint.resume == str(newer)
    assert "restarted by Ray Train after a failure; resuming from" in capsys.readouterr().err
    # a worker that cannot see the reported checkpoint: run_dir is not on a shared filesystem
    (reported / "COMPLETE").unlink()
    with pytest.raises(RuntimeError, match="must be on a filesystem every node sees"):
        cluster._resume_from_report(cfg, str(pointer), "pretrain")


def test_recipe_exit_keeps_its_status_across_processes():
    import pickle

    e = pickle.loads(pickle.dumps(cluster.RecipeExit("ptrain pretrain exited with status 3 on rank 1", 3)))
    assert e.code == 3 and "status 3" in str(e)

    class Failure(Exception):
        worker_failures = {1: RuntimeError("wrapped")}

    Failure.worker_failures[1].__cause__ = e
    assert cluster._exit_code(Failure()) == 3
    assert cluster._exit_code(RuntimeError("x")) == 1
