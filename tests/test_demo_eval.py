"""`ptrain eval` with the demo's direction probe (ptrain_demo.eval): retrieval as ptrain.evaluate, then the probe."""

from __future__ import annotations

import json
import warnings

import torch

from data_fixtures import write_shards
from ptrain.cli import main as cli_main
from ptrain.model import ModelConfig, build_model, save_export


def _export(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = build_model(ModelConfig(clip="tiny", head="meanP", num_frames=4, frame_size=32, max_words=8))
    save_export(model.eval(), tmp_path / "export")
    return tmp_path / "export"


def test_eval_with_probe_scores_clips_inside_one_event(tmp_path, capsys):
    export = _export(tmp_path)
    # 2 shards x 4 samples: videos 0..3, two clips each, every clip spans [0, 4] s
    write_shards(tmp_path / "shards", num_shards=2, samples_per_shard=4, frames=[4], size=(32, 40))
    event = {"start": 0.0, "end": 4.0, "shape": "circle", "colour": "red"}
    videos = {"shardvid00000": {"events": [{**event, "direction": "left"}]},
              "shardvid00001": {"events": [{**event, "direction": "up", "colour": "blue"}]},
              # covers half of each clip: below min_overlap, not probed; video 3 has no ground truth
              "shardvid00002": {"events": [{**event, "end": 2.0, "direction": "right"}]}}
    (tmp_path / "sample_meta.json").write_text(json.dumps({"videos": videos}))
    out = tmp_path / "eval.json"
    args = ["eval", f"export={export}", f"shards=[{tmp_path / 'shards'}]"]
    assert cli_main(args + [f"probe.sample_meta={tmp_path / 'sample_meta.json'}", "probe.min_overlap=0.7",
                            f"out={out}"]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["head"] == "meanP" and results["all"]["n_text"] == 8
    probe = results["probe"]
    assert probe["probe_clips"] == 4
    quarters = (0.0, 25.0, 50.0, 75.0, 100.0)  # 4 clips
    assert probe["direction_acc"] in quarters and probe["order_acc"] in quarters
    # meanP averages the frames: a clip and the same clip played backwards score alike, every clip is a tie
    assert probe["reversal_acc"] == 50.0
    assert "direction probe (4 clips inside one event)" in printed and "all captions: 8 captions" in printed

    # without probe.sample_meta: ptrain's retrieval eval alone, the same numbers
    assert cli_main(args + [f"out={tmp_path / 'plain.json'}"]) == 0
    assert "direction probe" not in capsys.readouterr().out
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert "probe" not in plain and plain["all"] == results["all"]


def test_eval_help_lists_the_probe_keys(capsys):
    assert cli_main(["eval", "--help"]) == 0
    text = capsys.readouterr().out
    assert "probe.sample_meta" in text and "probe.min_overlap" in text and "caption_filter" in text
