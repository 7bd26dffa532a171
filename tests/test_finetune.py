"""`ptrain finetune` on tiny multi-caption shards (train / val / test) from a tiny export or a CLIP: the loaded
tensors, head mismatches, selection on the validation split, the last epoch without one, selection on test in
words, the final test results, 2 CPU ranks through launch/finetune.sh, and an exact resume (slow: training runs)."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from data_fixtures import make_frame, write_shard
from net import rank_env

REPO = Path(__file__).resolve().parent.parent
TINY = ["model.head=seqTransf", "model.num_frames=3", "model.frame_size=32", "model.max_words=12",
        "model.cross_layers=1", "data.num_workers=0", "data.caption_sampling=expand", "engine.precision=fp32",
        "engine.zero_stage=1", "engine.micro_batch_size=4", "log.every_steps=1", "log.tensorboard=false",
        "benchmark=toy"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """train (8 videos), val and test (4 each); video v has v % 3 + 1 captions; a tiny seqTransf export."""
    from ptrain.model import ModelConfig, build_model, save_export

    root = tmp_path_factory.mktemp("finetune")
    for split, n, off in (("train", 8, 0), ("val", 4, 100), ("test", 4, 200)):
        samples = []
        for v in range(off, off + n):
            caps = [f"clip {v} caption {c}" for c in range(v % 3 + 1)]
            samples.append({"key": f"v{v:03d}_0000", "video_id": f"v{v:03d}", "caption": caps[0], "captions": caps,
                            "frames": [make_frame(32, 32, t, v) for t in range(4)]})
        write_shard(root / split, "shard", 0, samples, offsets=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = build_model(ModelConfig(clip="tiny", head="seqTransf", num_frames=3, frame_size=32, max_words=12,
                                        cross_layers=1))
    save_export(model, root / "init")
    return root


def _finetune(root, *overrides, timeout=400):
    """`ptrain finetune` in one process (a world of one) on the module's shards, from its tiny export."""
    args = [f"init={root / 'init'}", f"data.sources=[{root / 'train'}]", *TINY, *overrides]
    return subprocess.run([sys.executable, "-m", "ptrain", "finetune", *args], cwd=root, env=rank_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_a_head_mismatch_names_both_heads(bench, tmp_path):
    proc = _finetune(bench, f"run_dir={tmp_path / 'run'}", "model.head=meanP")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "the export has head seqTransf but the config asks for model.head=meanP" in proc.stderr


@pytest.mark.slow
def test_two_ranks_select_on_validation_and_test_once(bench, tmp_path):
    from net import free_port

    run = tmp_path / "run"
    launcher = [str(REPO / "launch" / "finetune.sh"), "--gpus", "2", "--master-port", str(free_port())]
    proc = subprocess.run([*launcher, str(REPO / "configs" / "demo" / "finetune_tiny.yaml"), f"run_dir={run}",
                           f"init={bench / 'init'}", f"data.sources=[{bench / 'train'}]",
                           f"data.eval_sources=[{bench / 'val'}]", f"test=[{bench / 'test'}]", "epochs=2",
                           *TINY], cwd=bench, env=rank_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [1.0, 2.0] and all("t2v_R1" in r for r in evals)
    # 8 videos with 1..3 captions = 15 pairs per epoch (expand), global batch 8: 2 steps per epoch
    assert max(r["step"] for r in rows if r["kind"] == "train") == 4
    result = json.loads((run / "results" / "test.json").read_text())
    assert result["protocol"] == "multi" and result["all"]["n_text"] == 9 and result["all"]["n_video"] == 4  # 3+1+2+3
    assert result["selected_on"] == "val" and "selected on the validation split by t2v_R1" in result["selection"]
    assert result["benchmark"] == "toy" and result["init"].endswith("init") and result["world_size"] == 2
    assert (run / "results" / "test.md").read_text().startswith("# Retrieval")
    import ptrain

    best = ptrain.load(run / "best" / "export")
    assert best.cfg.head == "seqTransf" and best.tokenizer_path  # the export carries its vocabulary


@pytest.mark.slow
def test_every_tensor_of_the_init_export_is_loaded_and_no_validation_keeps_the_last_epoch(bench, tmp_path):
    """A learning rate of ~0 leaves the weights as loaded: the final export equals the init export tensor for
    tensor, heads included (a re-initialised head would differ)."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    proc = _finetune(bench, f"run_dir={run}", "epochs=1", "optim.lr=1e-20", "optim.coef_lr=1", f"test=[{bench / 'test'}]")
    assert proc.returncode == 0, proc.stderr[-4000:]
    init, final = load_file(bench / "init" / "model.safetensors"), load_file(run / "best" / "export" / "model.safetensors")
    assert set(init) == set(final) and any(k.startswith("head.") for k in init)
    assert all(torch.allclose(init[k], final[k], atol=1e-6) for k in init)
    result = json.loads((run / "results" / "test.json").read_text())
    assert result["selected_on"] == "last_epoch" and "no validation split: the last epoch" in result["selection"]


@pytest.mark.slow
def test_a_clip_init_gets_fresh_clip4clip_heads_and_select_on_test_says_so(bench, tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    proc = _finetune(bench, f"run_dir={run}", "init=tiny", "epochs=1", "optim.lr=1e-20", "optim.coef_lr=1",
                     f"test=[{bench / 'test'}]", "eval.select_on=test")
    assert proc.returncode == 0, proc.stderr[-4000:]
    w = load_file(run / "best" / "export" / "model.safetensors")
    # CLIP4Clip initialises the temporal transformer from CLIP's text layers
    assert torch.allclose(w["head.transformerClip.resblocks.0.mlp.c_fc.weight"],
                          w["text_model.encoder.layers.0.mlp.fc1.weight"], atol=1e-6)
    result = json.loads((run / "results" / "test.json").read_text())
    assert result["selected_on"] == "test" and "SELECTED ON THE TEST SPLIT" in result["selection"]
    assert result["init_kind"] == "clip"


@pytest.mark.slow
def test_an_interrupted_finetune_resumes_exactly(bench, tmp_path):
    common = [f"data.eval_sources=[{bench / 'val'}]", "epochs=2", "checkpoint.every_steps=2"]
    ref = tmp_path / "ref"
    assert _finetune(bench, f"run_dir={ref}", *common).returncode == 0
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ptrain", "finetune", f"init={bench / 'init'}", f"data.sources=[{bench / 'train'}]",
           *TINY, f"run_dir={run}", *common]
    proc = subprocess.Popen(cmd, cwd=bench, env=rank_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step_00000002" / "COMPLETE").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    again = subprocess.run(cmd, cwd=bench, env=rank_env(), capture_output=True, text=True, timeout=400)
    assert again.returncode == 0 and "resumed from" in again.stderr, again.stderr[-3000:]

    def losses(d):
        return {r["step"]: r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"}

    assert losses(run) == pytest.approx(losses(ref), rel=1e-6)
    best_ref = json.loads((ref / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())["best"]
    best_run = json.loads((run / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())["best"]
    assert best_run["step"] == best_ref["step"] and best_run["value"] == pytest.approx(best_ref["value"])


@pytest.mark.slow
def test_a_finetune_masks_tokens_only_when_its_own_config_says_so(bench, tmp_path):
    """model.mask_ratio in the fine-tune config masks as in pretraining (the log says so; MFU counts the kept
    tokens); an export's own mask_ratio is not inherited."""
    from ptrain.model import ModelConfig, build_model, save_export

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        masked_export = build_model(ModelConfig(clip="tiny", head="seqTransf", num_frames=3, frame_size=32,
                                                max_words=12, cross_layers=1, mask_ratio=0.5))
    save_export(masked_export, tmp_path / "masked_init")
    masked = masked_export.flops_per_sample(mask_ratio=0.5)
    unmasked = masked_export.flops_per_sample(mask_ratio=0)
    assert masked < unmasked

    for name, overrides, flops in (("own", ["model.mask_ratio=0.5"], masked), ("inherited", [], unmasked)):
        run = tmp_path / name
        proc = _finetune(bench, f"run_dir={run}", f"init={tmp_path / 'masked_init'}", "epochs=1",
                         "engine.peak_tflops=1", *overrides)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert ("token masking: ratio 0.5 (frame)" in proc.stderr) == (name == "own"), proc.stderr[-3000:]
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if r["kind"] == "train"]
        assert train
        for row in train:  # mfu = samples/s x 3 x flops / peak (1 TFLOP/s), one step per log window
            assert row["mfu"] * 1e12 / (3 * row["samples_per_s"]) == pytest.approx(flops, rel=1e-6), (name, row)
