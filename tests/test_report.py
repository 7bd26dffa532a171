"""`ptrain report`: two fake runs (config.yaml + metrics.jsonl + results files) and a lone results.json side by side,
the table's numbers and the papers' for each recipe, valid PNG curves, and bad inputs named with the fix."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ptrain.report import PAPERS, ReportConfig, build_report, paper_for, recipe_benchmark, run

ROOT = Path(__file__).resolve().parents[1]


def _metrics(path: Path, steps_per_epoch: int, epochs: int, scale: float, with_epoch_on_eval: bool) -> list[dict]:
    """Train rows every step (loss, both learning rates, fractional epoch) and an eval row at each epoch's end."""
    rows, n = [], steps_per_epoch * epochs
    for s in range(1, n + 1):
        lr = 1e-4 * 0.5 * (1 + math.cos(math.pi * s / n))
        rows.append({"step": s, "time": 1.0, "kind": "train", "loss": scale * math.exp(-s / 20) + 0.2, "lr_new": lr,
                     "lr_clip": lr * 1e-3, "epoch": s / steps_per_epoch})
        if s % steps_per_epoch == 0:
            row = {"step": s, "time": 1.0, "kind": "eval", "t2v_R1": 10.0 * scale * s / n, "t2v_R5": 50.0}
            if with_epoch_on_eval:
                row["epoch"] = s / steps_per_epoch
            rows.append(row)
    rows.append({"step": n, "time": 1.0, "kind": "test", "t2v_R1": 99.0})  # a test row is not a validation point
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "torn li\n')
    return rows


def _results(**kw) -> dict:
    all_ = {"t2v_R1": 41.25, "t2v_R5": 69.5, "t2v_R10": 80.04, "t2v_MdR": 2.0, "t2v_MnR": 16.75,
            "v2t_R1": 40.0, "v2t_R5": 70.0, "v2t_R10": 81.0, "v2t_MdR": 2.0, "v2t_MnR": 12.0, "n_text": 1000,
            "n_video": 1000}
    all_.update(kw.pop("all", {}))
    return {"protocol": "single", "all": all_, **kw}


@pytest.fixture()
def runs(tmp_path) -> dict[str, Path]:
    """run A: meanP fine-tuned on MSR-VTT from CLIP (results/test.json names the benchmark, a fine-tune's format);
    run B: TAB (TDB global) from a pretraining export, evaluated by `ptrain eval` (eval/results.json; the benchmark
    comes from the shards' manifest); C: a lone ActivityNet results.json (paragraph: R@50)."""
    a, b = tmp_path / "ft_msrvtt_meanP_clip", tmp_path / "ft_msrvtt_tab_pretrained"
    for run_dir, head, init in ((a, "meanP", "ViT-B-32.pt"), (b, "TAB", "runs/pre/checkpoints/step_00001000/export")):
        (run_dir / "results").mkdir(parents=True)
        yaml.safe_dump({"run_dir": str(run_dir), "init": init, "max_steps": 50,
                        "model": {"head": head, "clip": "ViT-B/32", "tab_global": "TDB"}}, (run_dir / "config.yaml").open("w"))
    _metrics(a / "metrics.jsonl", 10, 5, 3.0, with_epoch_on_eval=True)
    _metrics(b / "metrics.jsonl", 8, 4, 4.0, with_epoch_on_eval=False)
    (a / "results" / "test.json").write_text(json.dumps(_results(benchmark="msrvtt", split="test1kA", head="meanP",
                                                                  init="ViT-B-32.pt", selected_on="val")))
    (a / "results" / "selection.json").write_text(json.dumps({"best_epoch": 3}))  # not a results file
    shards = tmp_path / "shards_test1kA"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"config": {"source": "msrvtt", "split": "test1kA"}}))
    (b / "eval").mkdir()
    (b / "eval" / "results.json").write_text(json.dumps(_results(head="TAB", shards=[str(shards)], export="gone",
                                                                 all={"t2v_R1": 46.5, "t2v_MnR": 14.25})))
    lone = tmp_path / "anet" / "results.json"
    lone.parent.mkdir()
    lone.write_text(json.dumps(_results(protocol="paragraph", benchmark="activitynet", split="val1", head="seqTransf",
                                        all={"t2v_R1": 38.0, "t2v_R50": 97.5}, selected_on="test")))
    return {"a": a, "b": b, "lone": lone}


def _table(md: str, heading: str) -> list[list[str]]:
    """The rows of the first markdown table after ``heading`` as lists of cells."""
    after = md.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(after) if line.startswith("|"))
    end = next((i for i in range(start, len(after)) if not after[i].startswith("|")), len(after))
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in after[start + 2:end]]


def test_table_has_each_runs_numbers_and_the_papers(runs, tmp_path):
    text, _, rows, series = build_report(ReportConfig(runs=[str(runs["a"]), str(runs["b"]), str(runs["lone"])],
                                                      out=str(tmp_path / "out")))
    table = _table(text, "## Text -> video retrieval")
    head = ["run", "benchmark", "head", "init", "R@1", "R@5", "R@10", "R@50", "MdR", "MnR", "paper R@1", "Δ R@1"]
    assert [c.strip() for c in text.split("## Text -> video retrieval")[1].strip().splitlines()[0].strip("|").split(" | ")] == head
    assert table[0] == ["ft_msrvtt_meanP_clip · results/test", "MSR-VTT 1k-A", "meanP", "ViT-B-32.pt", "41.2", "69.5",
                        "80.0", "–", "2.0", "16.8", "43.1", "-1.9"]
    # B: benchmark from the shards' manifest, head TAB with the TDB global branch = CLIP2Video's TDB+TAB row (45.6)
    assert table[1] == ["ft_msrvtt_tab_pretrained · eval", "MSR-VTT 1k-A", "TDB+TAB",
                        "runs/pre/checkpoints/step_00001000/export", "46.5", "69.5", "80.0", "–", "2.0", "14.2", "45.6",
                        "+0.9"]
    # C: ActivityNet paragraph numbers with R@50, selected on the test split (marked †)
    assert table[2] == [f"{tmp_path.name}/anet †", "ActivityNet", "seqTransf", "?", "38.0",
                        "69.5", "80.0", "97.5", "2.0", "16.8", "40.4", "-2.4"]
    assert "† the checkpoint was selected on the test split" in text
    papers = _table(text, "## The papers' numbers for these recipes")
    assert papers[0][:8] == ["MSR-VTT 1k-A", "meanP", "43.1", "70.4", "80.8", "–", "2.0", "16.2"]
    assert papers[2][:8] == ["ActivityNet", "seqTransf", "40.4", "73.4", "–", "98.2", "2.0", "7.5"]
    assert "CLIP2Video" in papers[1][-1]
    v2t = _table(text, "## Video -> text retrieval")
    assert v2t[0][3:] == ["40.0", "70.0", "81.0", "2.0", "12.0"]
    runs_rows = _table(text, "## Training runs")
    # best validation R@1: A at epoch 5 (the eval rows carry it); B at epoch 4, placed from the train rows' epochs
    assert runs_rows[0][3:] == ["50", f"{3 * math.exp(-50 / 20) + 0.2:.4f}", "30.0 (epoch 5)", "30.0"]
    assert runs_rows[1][3:] == ["32", f"{4 * math.exp(-32 / 20) + 0.2:.4f}", "40.0 (epoch 4)", "40.0"]
    assert series["ft_msrvtt_tab_pretrained"]["val_r1"] == [(1.0, 10.0), (2.0, 20.0), (3.0, 30.0), (4.0, 40.0)]
    assert 99.0 not in [y for _, y in series["ft_msrvtt_meanP_clip"]["val_r1"]]
    assert "1 line(s) of metrics.jsonl were not JSON rows" in text and "results/selection.json" in text
    assert [r.source for r in rows] == [runs["a"] / "results" / "test.json", runs["b"] / "eval" / "results.json",
                                        runs["lone"]]


def _check_png(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as img:
        img.verify()  # a complete, valid PNG
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] >= 400 and img.size[1] >= 250
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 20  # something was drawn, not a blank canvas


def test_cli_writes_report_and_curves(runs, tmp_path):
    out = tmp_path / "report"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "ptrain", "report", str(runs["a"]), str(runs["b"]), f"out={out}",
                           "title=MSR-VTT: from CLIP or from the pretraining export?"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "report.md").read_text()
    assert md.startswith("# MSR-VTT: from CLIP or from the pretraining export?") and proc.stdout == md
    for name in ("curves_loss.png", "curves_lr.png", "curves_val_r1.png"):
        _check_png(out / name)
        assert f"![{name}]({name})" in md
    # the same with the list key
    again = subprocess.run([sys.executable, "-m", "ptrain", "report", f"runs=[{runs['a']}]", f"out={out}2"],
                           capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert again.returncode == 0 and "ft_msrvtt_meanP_clip" in (out.parent / "report2" / "report.md").read_text()


def test_bad_inputs_are_named_with_the_fix(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "other.json").write_text(json.dumps({"step": 3}))
    for arg, words in ((tmp_path / "missing", "no such run directory"), (tmp_path / "empty", "not a run directory"),
                       (tmp_path / "other.json", "not a results.json")):
        assert run(ReportConfig(runs=[str(arg)], out=str(tmp_path / "out"))) == 2
        err = capsys.readouterr().err
        assert str(arg) in err and words in err
    assert run(ReportConfig(runs=[], out=str(tmp_path / "out"))) == 2
    assert not (tmp_path / "out").exists()


def test_a_run_without_results_or_curves(tmp_path):
    """A run that has only its config (nothing trained yet) still gets a line; no PNG is drawn from nothing."""
    only = tmp_path / "fresh"
    only.mkdir()
    (only / "config.yaml").write_text("model: {head: seqTransf, clip: ViT-B/32}\n")
    assert run(ReportConfig(runs=[str(only)], out=str(tmp_path / "out"))) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "No results files in these inputs" in md and "| fresh | seqTransf | ViT-B/32 | 0 | – | – | – |" in md
    assert not list((tmp_path / "out").glob("*.png"))


def test_recipe_names_and_paper_rows():
    assert recipe_benchmark("msrvtt", "test1kA") == recipe_benchmark("MSR-VTT") == "msrvtt"
    assert recipe_benchmark("msrvtt", "testfull") == recipe_benchmark("msrvtt_full") == "msrvtt_full"
    assert recipe_benchmark("vatex", "test1k5") == "vatex" and recipe_benchmark("vatex", "test") == "vatex_hgr"
    assert recipe_benchmark("ActivityNet Captions") == "activitynet" and recipe_benchmark("howto100m") is None
    assert paper_for("msvd", "test", "TDB+TAB").r1 == 47.0 and paper_for("msvd", "", "meanP").r1 == 46.2
    assert paper_for("msvd", "val", "meanP") is None  # the papers report the test split only
    assert paper_for("msrvtt_full", "testfull", "TDB+TAB").mnr == 45.5
    assert paper_for("msrvtt", "test1kA", "seqLSTM").r1 == 42.5
    heads = {h for _, h in PAPERS}
    assert heads == {"meanP", "seqLSTM", "seqTransf", "tightTransf", "TDB+TAB"}
