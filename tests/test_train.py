"""`ptrain pretrain` in one process (a DeepSpeed world of one, CPU/gloo) on small generated shards:
the run directory contract, a truncated shard skipped with a count, pruning, the export, eval."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_fixtures import write_shards
from net import rank_env
from ptrain.config import load_config
from ptrain.configs import PretrainConfig

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train1")
    shards = root / "shards"
    write_shards(shards, num_shards=3, samples_per_shard=8, frames=(2, 3, 4), size=(32, 40))
    # Cut one tar to 60 %: its sidecar promises 8 samples, the bytes hold fewer.
    tar = shards / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[: int(tar.stat().st_size * 0.6)])
    run = root / "run"
    overrides = [
        f"run_dir={run}", "max_steps=6", "model.clip=tiny", "model.head=seqTransf", "model.num_frames=3",
        "model.frame_size=32", "model.max_words=8", "model.cross_layers=1", f"data.sources=[{shards}]",
        "data.num_workers=0", f"data.eval_sources=[{shards}]", "engine.zero_stage=1", "engine.precision=fp32",
        "engine.micro_batch_size=4", "engine.grad_accum=2", "engine.peak_tflops=1", "checkpoint.every_steps=2",
        "checkpoint.keep_last=2", "log.every_steps=1", "eval.every_steps=3", "eval.batch_size=8",
        "optim.lr=1e-3", "optim.coef_lr=1",
    ]
    proc = subprocess.run([sys.executable, "-m", "ptrain", "pretrain", *overrides], cwd=root, env=rank_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"run": run, "shards": shards, "log": proc.stderr, "root": root}


def test_run_directory_contract(trained):
    run = trained["run"]
    cfg = load_config(PretrainConfig, run / "config.yaml")  # the resolved config reloads
    assert cfg.max_steps == 6 and cfg.engine.grad_accum == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr_new", "lr_clip", "logit_scale", "grad_norm", "samples_per_s", "frames_per_s",
                "data_wait", "mfu", "samples_seen"):
        assert key in train[-1], key
    assert train[-1]["samples_seen"] == 6 * 4 * 2  # micro x accumulation x 1 rank
    assert 0 < train[-1]["frames_per_s"] <= 3 * train[-1]["samples_per_s"] * 1.0001  # real frames only
    assert 0 <= train[-1]["data_wait"] <= 1 and train[-1]["mfu"] > 0
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6] and "t2v_R1" in evals[0]
    assert list((run / "tb").glob("events.out.tfevents.*"))
    # keep_last=2: steps 4 and 6 survive, each complete with every part of the contract
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["step_00000004", "step_00000006"]
    for part in ("COMPLETE", "trainer_state.json", "export/model.safetensors", "export/config.json",
                 "consolidated/weights.safetensors", "consolidated/moments.safetensors", "deepspeed",
                 "rng/rank_00000.safetensors"):
        assert (run / "checkpoints" / "step_00000006" / part).exists(), part
    state = json.loads((run / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["world_size"] == 1 and state["data"]["start_step"] == 6


def test_truncated_shard_is_skipped_with_a_count(trained):
    rows = [json.loads(line) for line in (trained["run"] / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["kind"] == "train"][-1]
    assert last["samples_skipped"] > 0 and last["shards_damaged"] == 1
    assert "loader: skipped" in trained["log"]
    assert "global batch 8 = micro 4 x ranks 1 x accumulation 2" in trained["log"]
    assert "negatives per query 3" in trained["log"]


def test_export_loads_and_matches_the_consolidated_weights(trained):
    import torch
    from safetensors.torch import load_file

    import ptrain

    ckpt = trained["run"] / "checkpoints" / "step_00000006"
    model = ptrain.load(ckpt / "export")
    full = load_file(str(ckpt / "consolidated" / "weights.safetensors"))
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), full[name]), name
    text = model.encode_text(["the red circle moves to the left"])
    video = model.encode_video(torch.randint(0, 255, (2, 3, 3, 32, 32), dtype=torch.uint8))
    assert model.similarity(text, video).shape == (1, 2)
    # the model card says which run, step and data made it
    card = (ckpt / "export" / "README.md").read_text()
    assert f"| run_dir | {trained['run']} |" in card and "| step | 6 |" in card
    assert f"| data sources | {trained['shards']} |" in card and "| init | tiny |" in card


def test_rerun_resumes_and_finds_nothing_to_do(trained):
    proc = subprocess.run([sys.executable, "-m", "ptrain", "pretrain", str(trained["run"] / "config.yaml")],
                          cwd=trained["root"], env=rank_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "step_00000006" in proc.stderr and "nothing to do" in proc.stderr


def test_resume_applies_the_new_learning_rate_and_logs_each_step_once(trained, tmp_path):
    import shutil

    from ptrain.optim import lr_multiplier

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    with open(run / "metrics.jsonl", "a") as f:  # what a crash after step 6's checkpoint would have logged
        f.write(json.dumps({"step": 7, "kind": "train", "loss": 99.0}) + "\n" + '{"step": 8, "ki')
    cfg = load_config(PretrainConfig, run / "config.yaml", [f"run_dir={run}", "max_steps=8", "optim.lr=5e-4"])
    proc = subprocess.run([sys.executable, "-m", "ptrain", "pretrain", str(run / "config.yaml"), f"run_dir={run}",
                           "max_steps=8", "optim.lr=5e-4", "eval.every_steps=0"],
                          cwd=trained["root"], env=rank_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in rows if r["kind"] == "train"}
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 9))  # the stale step 7 is gone
    for step in (7, 8):  # the optimizer's rate (logged from its param groups) follows the new config
        assert train[step]["lr_new"] == pytest.approx(5e-4 * lr_multiplier(step - 1, cfg.optim, 8))
        assert train[step]["loss"] != 99.0
    # starting over in a directory that holds checkpoints is refused, nothing is touched
    again = subprocess.run([sys.executable, "-m", "ptrain", "pretrain", str(run / "config.yaml"), f"run_dir={run}",
                            "checkpoint.resume=none"], cwd=trained["root"], env=rank_env(), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 2 and "already holds checkpoints (newest step_00000008)" in again.stderr


def test_ptrain_eval_reports_metrics(trained, tmp_path):
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "ptrain", "eval", f"export={trained['run']}",
                           f"shards=[{trained['shards']}]", "caption_filter=video [0-4]", f"out={out}"],
                          env=rank_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "t2v  R@1" in proc.stdout and "captions matching" in proc.stdout
    result = json.loads(out.read_text())
    assert result["all"]["n_video"] == result["all"]["n_text"] > 0
    assert result["filtered"]["n_text"] < result["all"]["n_text"]
    assert result["export"].endswith("step_00000006/export")


def test_report_reads_a_real_run_and_its_eval(trained, tmp_path):
    """`ptrain report` on what `ptrain pretrain` and `ptrain eval` really write: the run's curves (eval rows carry
    no epoch: placed by the train rows'), the eval row's numbers, the head and init from config.yaml."""
    from ptrain.report import ReportConfig, build_report

    results = tmp_path / "eval" / "results.json"
    proc = subprocess.run([sys.executable, "-m", "ptrain", "eval", f"export={trained['run']}",
                           f"shards=[{trained['shards']}]", f"out={results}"],
                          env=rank_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text, runs, rows, series = build_report(ReportConfig(runs=[str(trained["run"]), str(results)]))
    m = json.loads(results.read_text())["all"]
    assert rows[0].head == "seqTransf" and rows[0].metrics == m and f"| {m['t2v_R1']:.1f} |" in text
    curves = series["run"]
    assert [x for x, _ in curves["loss"]] == [1, 2, 3, 4, 5, 6] and len(curves["lr_clip"]) == 6
    rows_ = [json.loads(line) for line in (trained["run"] / "metrics.jsonl").read_text().splitlines()]
    epoch_at = {r["step"]: r["epoch"] for r in rows_ if r["kind"] == "train"}
    assert [x for x, _ in curves["val_r1"]] == pytest.approx([epoch_at[3], epoch_at[6]])
    assert "| run | seqTransf | tiny | 6 |" in text


def test_non_finite_loss_stops_with_a_message(tmp_path):
    shards = tmp_path / "shards"
    write_shards(shards, num_shards=1, samples_per_shard=8, frames=(3,), size=(32, 32))
    overrides = [f"run_dir={tmp_path / 'run'}", "max_steps=4", "model.clip=tiny", "model.num_frames=3",
                 "model.frame_size=32", "model.max_words=8", f"data.sources=[{shards}]", "data.num_workers=0",
                 "engine.precision=fp32", "engine.micro_batch_size=4", "optim.lr=1e30", "optim.warmup_steps=0",
                 "checkpoint.every_steps=1", "log.tensorboard=false"]
    proc = subprocess.run([sys.executable, "-m", "ptrain", "pretrain", *overrides], env=rank_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "non-finite loss or gradient at step 2" in proc.stderr
    assert "resume from" in proc.stderr and "step_00000001" in proc.stderr


def test_reverse_frames_keeps_padding_at_the_end():
    import torch

    from ptrain.model.video_text import reverse_clips as reverse_frames

    frames = torch.arange(2 * 4).reshape(2, 4, 1, 1, 1).expand(2, 4, 3, 2, 2).clone()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    rev = reverse_frames(frames, mask)[:, :, 0, 0, 0]
    assert rev.tolist() == [[2, 1, 0, 3], [7, 6, 5, 4]]


def test_single_process_eval_encodes_only_real_rows(tmp_path):
    """Padding rows never reach the model in one process (they would change compat head-major scores)."""

    from ptrain.data import DataConfig, build_eval_loader
    from ptrain.evaluate import embed

    write_shards(tmp_path, num_shards=1, samples_per_shard=5, frames=(2, 3), size=(32, 32))
    loader = build_eval_loader(DataConfig(num_workers=0), num_frames=3, frame_size=32, max_words=8, batch_size=4,
                               sources=[str(tmp_path)])

    class Stub:
        seen: list[int] = []

        def encode_text(self, ids, mask):
            return ids[:, :2].float()

        def encode_video(self, frames, mask):
            self.seen.append(len(frames))
            return frames.float().mean(dim=(1, 2, 3, 4))[:, None].repeat(1, 2)

    model = Stub()
    emb = embed(model, loader)
    assert model.seen == [4, 1]  # 5 samples in batches of 4: the second batch's 3 padding rows are skipped
    assert len(emb["items"]) == 5 and emb["video"].shape == (5, 2)


@pytest.mark.parametrize("verb, config", [("pretrain", "configs/demo/pretrain_tiny.yaml"),
                                           ("finetune", "configs/demo/finetune_tiny.yaml")])
def test_ray_train_inside_a_launched_rank_is_refused_with_the_fix(verb, config, tmp_path):
    """ray.enabled=true in a process a launcher started would start Ray Train workers from every rank."""
    env = dict(rank_env(), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
    extra = ["init=tiny"] if verb == "finetune" else []
    proc = subprocess.run([sys.executable, "-m", "ptrain", verb, str(REPO / config), "ray.enabled=true",
                           f"run_dir={tmp_path / 'run'}", *extra], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"ptrain {verb}: ray.enabled=true in a rank that a launcher started" in proc.stderr
    assert f"run `ptrain {verb} CONFIG ray.enabled=true` once" in proc.stderr
    assert not (tmp_path / "run").exists()
