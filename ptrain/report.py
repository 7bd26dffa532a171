"""``ptrain report RUN_OR_RESULTS... [out=DIR]``: runs' retrieval results side by side with the papers' numbers for
the same recipe (``report.md``), and their training curves (``curves_*.png``).

    ptrain report runs/msrvtt_meanP_from_clip runs/msrvtt_meanP_from_pretrain out=reports/msrvtt
    ptrain report runs/demo/eval/results.json runs/ft out=reports/x     # results.json files and run dirs mixed
    ptrain report runs=[runs/a,runs/b] out=reports/x                     # the same as a list key

An input is a run directory (``config.yaml``, ``metrics.jsonl``, and the results files in it: every
``**/results.json`` that ``ptrain eval`` wrote, and ``results/*.json`` of a fine-tune) or one results.json. Each
results file is a row: benchmark, head, init (what the model started from), text->video R@1/5/10 (R@50 for
paragraph benchmarks), MdR, MnR, and the paper's R@1 for that (benchmark, head) recipe with the difference. The
benchmark is the results' ``benchmark`` key, else the shards' manifests (``ptrain shard``'s source and split);
the head and init come from the results, the run's config.yaml or the export's config.json, whichever has them.

Curves (matplotlib, Agg, no display): ``curves_loss.png`` (training loss per step), ``curves_lr.png`` (the new
modules' and CLIP's learning rates, log scale) and ``curves_val_r1.png`` (validation text->video R@1 per epoch), one
line per run. Everything read is data (JSON, ``yaml.safe_load``); nothing in a run directory is executed.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ptrain.config import opt
from ptrain.model.registry import head_label


@dataclass
class ReportConfig:
    """``ptrain report``: several runs' results and training curves side by side."""

    POSITIONAL: ClassVar[str] = "runs"  # `ptrain report RUN_A RUN_B` = runs=[RUN_A,RUN_B]

    runs: list[str] = opt([], "run directories and/or results.json files, in the order of the table")
    out: str = opt("report", "output directory: report.md and curves_*.png")
    title: str = opt("Runs compared", "the report's heading")


# ----------------------------------------------------------------------------------------------
# the papers' numbers (ViT-B/32, text -> video), from ../shared/research/seeds_clip4clip_clip2video.md §6


@dataclass(frozen=True)
class Paper:
    r1: float
    r5: float
    r10: float | None  # ActivityNet rows report R@50 instead
    mdr: float
    mnr: float
    source: str
    r50: float | None = None


_C4C = "CLIP4Clip (ViT-B/32)"
_C2V = "CLIP2Video (ViT-B/32, README)"
PAPERS: dict[tuple[str, str], Paper] = {
    # §6.2 "MSR-VTT 1k-A, Training-9K" table, rows meanP, seqLSTM, seqTransf, tightTransf
    ("msrvtt", "meanP"): Paper(43.1, 70.4, 80.8, 2.0, 16.2, _C4C),
    ("msrvtt", "seqLSTM"): Paper(42.5, 70.8, 80.7, 2.0, 16.7, _C4C),
    ("msrvtt", "seqTransf"): Paper(44.5, 71.4, 81.6, 2.0, 15.3, _C4C),
    ("msrvtt", "tightTransf"): Paper(40.2, 71.5, 80.5, 2.0, 13.4, _C4C),
    # §6.2 "MSVD" table
    ("msvd", "meanP"): Paper(46.2, 76.1, 84.6, 2.0, 10.0, _C4C),
    ("msvd", "seqLSTM"): Paper(46.3, 76.1, 84.7, 2.0, 10.0, _C4C),
    ("msvd", "seqTransf"): Paper(45.2, 75.5, 84.3, 2.0, 10.3, _C4C),
    ("msvd", "tightTransf"): Paper(40.0, 71.5, 82.1, 2.0, 13.3, _C4C),
    # §6.2 "LSMDC" table
    ("lsmdc", "meanP"): Paper(20.7, 38.9, 47.2, 13.0, 65.3, _C4C),
    ("lsmdc", "seqLSTM"): Paper(21.6, 41.8, 49.8, 11.0, 58.0, _C4C),
    ("lsmdc", "seqTransf"): Paper(22.6, 41.0, 49.1, 11.0, 61.0, _C4C),
    ("lsmdc", "tightTransf"): Paper(18.9, 37.8, 46.7, 13.0, 61.6, _C4C),
    # §6.2 "ActivityNet" table (paragraph retrieval; R@50 reported instead of R@10)
    ("activitynet", "meanP"): Paper(40.5, 72.4, None, 2.0, 7.4, _C4C, r50=98.1),
    ("activitynet", "seqLSTM"): Paper(40.1, 72.2, None, 2.0, 7.3, _C4C, r50=98.1),
    ("activitynet", "seqTransf"): Paper(40.4, 73.4, None, 2.0, 7.5, _C4C, r50=98.2),
    ("activitynet", "tightTransf"): Paper(19.5, 47.6, None, 6.0, 17.3, _C4C, r50=93.1),
    # §6.2 "DiDeMo" table (paragraph retrieval)
    ("didemo", "meanP"): Paper(43.4, 70.2, 80.6, 2.0, 17.5, _C4C),
    ("didemo", "seqLSTM"): Paper(43.4, 69.9, 80.2, 2.0, 17.5, _C4C),
    ("didemo", "seqTransf"): Paper(42.8, 68.5, 79.2, 2.0, 18.9, _C4C),
    ("didemo", "tightTransf"): Paper(25.8, 52.8, 66.3, 5.0, 27.3, _C4C),
    # §6.4 "T2V [README]" table of CLIP2Video (seqTransf + TDB + TAB), rows MSVD, MSR-VTT 9k (1k-A), MSR-VTT full,
    # VATEX random 1.5k, VATEX HGR split
    ("msvd", "TDB+TAB"): Paper(47.0, 76.8, 85.9, 2.0, 9.6, _C2V),
    ("msrvtt", "TDB+TAB"): Paper(45.6, 72.6, 81.7, 2.0, 14.6, _C2V),
    ("msrvtt_full", "TDB+TAB"): Paper(29.8, 55.5, 66.2, 4.0, 45.5, _C2V),
    ("vatex", "TDB+TAB"): Paper(57.3, 90.0, 95.5, 1.0, 3.6, _C2V),
    ("vatex_hgr", "TDB+TAB"): Paper(61.2, 90.9, 95.6, 1.0, 3.4, _C2V),
}

# recipe benchmark -> (name in the table, the split the papers report)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "msrvtt": ("MSR-VTT 1k-A", "test1kA"),
    "msrvtt_full": ("MSR-VTT full", "testfull"),
    "msvd": ("MSVD", "test"),
    "lsmdc": ("LSMDC", "test"),
    "activitynet": ("ActivityNet", "val1"),
    "didemo": ("DiDeMo", "test"),
    "vatex": ("VATEX 1.5k (random)", "test1k5"),
    "vatex_hgr": ("VATEX (HGR split)", "test"),
}


def _squash(text: Any) -> str:
    return re.sub(r"[^a-z0-9]", "", str(text or "").lower())


def recipe_benchmark(benchmark: Any, split: Any = "") -> str | None:
    """The papers' benchmark a (benchmark or shard source, split) names: ``msrvtt`` (1k-A), ``msrvtt_full``,
    ``msvd``, ``lsmdc``, ``activitynet``, ``didemo``, ``vatex`` (the random 1.5k test), ``vatex_hgr``; None for
    anything else (a pretraining corpus, an unknown name)."""
    name, part = _squash(benchmark), _squash(split)
    if name.startswith("msrvtt"):
        return "msrvtt_full" if "full" in name or "full" in part else "msrvtt"
    if name.startswith("vatex"):
        return "vatex_hgr" if "hgr" in name or part == "test" else "vatex"
    if name.startswith(("activitynet", "anet")):
        return "activitynet"
    return next((key for key in ("msvd", "lsmdc", "didemo") if name.startswith(key)), None)


def paper_for(recipe: str | None, split: Any, head: str) -> Paper | None:
    """The paper's row for a recipe, when the split is the one the paper reports (or unknown)."""
    if recipe is None or (split and _squash(split) != _squash(BENCHMARKS[recipe][1])):
        return None
    return PAPERS.get((recipe, head))


# ----------------------------------------------------------------------------------------------
# reading runs

_MAX_JSON_BYTES = 64 << 20


class ReportError(ValueError):
    """An input that is not a run directory or a results file; the message names it and the fix."""


def _read_json(path: Path) -> Any:
    """A JSON file's content, or None when it is unreadable, too big or not JSON."""
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            return None
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def is_results(data: Any) -> bool:
    """Whether a JSON value is a results.json of ``ptrain eval`` / a fine-tune (metrics under ``all``)."""
    return isinstance(data, dict) and isinstance(data.get("all"), dict) and "t2v_R1" in data["all"]


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """``metrics.jsonl`` rows (objects with a numeric ``step``) and the count of lines that are not."""
    rows, bad = [], 0
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1  # e.g. a line torn by a crash
            continue
        step = row.get("step") if isinstance(row, dict) else None
        if isinstance(step, (int, float)) and not isinstance(step, bool) and math.isfinite(step):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


@dataclass
class Run:
    """One input: a run directory (config, metrics, results files) or a lone results file."""

    name: str
    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    bad_metric_lines: int = 0
    results: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # files that looked like results but are not


def _results_files(run_dir: Path) -> list[Path]:
    found = set(run_dir.rglob("results.json")) | set((run_dir / "results").glob("*.json"))
    return sorted(p for p in found if p.is_file())


def read_input(arg: str) -> Run:
    """A run directory or a results.json file; a ReportError naming the input and the fix otherwise."""
    path = Path(arg)
    if path.is_file():
        data = _read_json(path)
        if not is_results(data):
            raise ReportError(f"{path}: not a results.json of `ptrain eval` or a fine-tune (no metrics under 'all'); "
                              "pass a run directory or the results.json that `ptrain eval out=...` wrote")
        where = path.resolve()
        name = f"{where.parent.parent.name}/{where.parent.name}" if path.stem == "results" else \
            f"{where.parent.name}/{path.stem}"
        return Run(name=name.strip("/"), path=path, results=[(path, data)])
    if not path.is_dir():
        raise ReportError(f"{path}: no such run directory or results file; pass RUN (a run_dir of ptrain pretrain / "
                          "finetune) or a results.json")
    run = Run(name=path.resolve().name, path=path)
    if (path / "config.yaml").is_file():
        run.config = _read_yaml(path / "config.yaml")
    if (path / "metrics.jsonl").is_file():
        run.metrics, run.bad_metric_lines = read_metrics(path / "metrics.jsonl")
    for f in _results_files(path):
        data = _read_json(f)
        if is_results(data):
            run.results.append((f, data))
        else:
            run.skipped.append(str(f.relative_to(path)))
    if not run.results and not run.metrics and not run.config:
        raise ReportError(f"{path}: no config.yaml, metrics.jsonl or results files: not a run directory; pass the "
                          "run_dir of ptrain pretrain / finetune, or a results.json")
    return run


# ----------------------------------------------------------------------------------------------
# the table rows


def _section(data: dict, key: str) -> dict:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _export_model(results: dict[str, Any]) -> dict[str, Any]:
    """The ``ptrain.model`` section of the export a results file names, when that export is still there."""
    export = results.get("export")
    if not isinstance(export, str) or not export:
        return {}
    cfg = Path(export) / "config.json"
    data = _read_json(cfg) if cfg.is_file() else None
    return _section(_section(data, "ptrain"), "model") if isinstance(data, dict) else {}


def _from_manifests(results: dict[str, Any]) -> tuple[str, str]:
    """(source, split) of the shards a results file was computed on, from their ``manifest.json``."""
    shards = results.get("shards")
    for d in shards if isinstance(shards, list) else []:
        manifest = Path(str(d)) / "manifest.json"
        data = _read_json(manifest) if manifest.is_file() else None
        cfg = _section(data, "config") if isinstance(data, dict) else {}
        if cfg.get("source"):
            return str(cfg["source"]), str(cfg.get("split") or "")
    return "", ""


def _short(text: str, width: int = 48) -> str:
    """A long path cut to its last parts."""
    if len(text) <= width or "/" not in text:
        return text
    parts = text.rstrip("/").split("/")
    out = parts[-1]
    for part in reversed(parts[:-1]):
        if len(out) + len(part) + 3 > width:
            break
        out = f"{part}/{out}"
    return f".../{out}"


def _init_text(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("path") or value.get("name") or json.dumps(value, sort_keys=True)
    return _short(str(value)) if value not in (None, "") else "?"


@dataclass
class Row:
    label: str
    source: Path
    benchmark: str
    recipe: str | None
    split: str
    head: str
    init: str
    protocol: str
    metrics: dict[str, Any]
    paper: Paper | None
    selected_on: str = ""


def make_row(run: Run, path: Path, results: dict[str, Any]) -> Row:
    model = {**_section(run.config, "model"), **_export_model(results)}
    head = str(results.get("head") or model.get("head") or "?")
    label = head_label(head, str(model.get("tab_global") or "TDB"))
    benchmark, split = results.get("benchmark"), results.get("split")
    if not benchmark:
        benchmark, found_split = _from_manifests(results)
        split = split or found_split
    benchmark = str(benchmark or run.config.get("benchmark") or "")
    split = str(split or "")
    recipe = recipe_benchmark(benchmark, split)
    if recipe:
        name, paper_split = BENCHMARKS[recipe]
        shown = name if not split or _squash(split) == _squash(paper_split) else f"{name} ({split})"
    else:
        shown = " ".join(x for x in (benchmark, split) if x) or "?"
    init = results.get("init") or run.config.get("init") or model.get("clip")
    if path == run.path:
        name = run.name
    else:
        rel = path.relative_to(run.path).with_suffix("").as_posix().removesuffix("results").rstrip("/")
        name = f"{run.name} · {rel}" if rel else run.name
    return Row(label=name, source=path, benchmark=shown, recipe=recipe, split=split, head=label,
               init=_init_text(init), protocol=str(results.get("protocol", "?")), metrics=results["all"],
               paper=paper_for(recipe, split, label), selected_on=str(results.get("selected_on") or ""))


# ----------------------------------------------------------------------------------------------
# markdown


def _num(value: Any, digits: int = 1) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def results_table(rows: list[Row]) -> list[str]:
    r50 = any("t2v_R50" in r.metrics or (r.paper and r.paper.r50 is not None) for r in rows)
    ks = ["R@1", "R@5", "R@10"] + (["R@50"] if r50 else [])
    lines = ["| run | benchmark | head | init | " + " | ".join(ks) + " | MdR | MnR | paper R@1 | Δ R@1 |",
             "|---|---|---|---|" + "---:|" * (len(ks) + 4)]
    for r in rows:
        m = r.metrics
        cells = [_num(m.get(f"t2v_{k.replace('@', '')}")) for k in ks]
        paper = _num(r.paper.r1) if r.paper else "–"
        ours = m.get("t2v_R1")
        delta = f"{ours - r.paper.r1:+.1f}" if r.paper and isinstance(ours, (int, float)) and math.isfinite(ours) else "–"
        mark = " †" if "test" in r.selected_on.lower() else ""
        lines.append(f"| {_md(r.label)}{mark} | {_md(r.benchmark)} | {_md(r.head)} | {_md(r.init)} | " +
                     " | ".join(cells) + f" | {_num(m.get('t2v_MdR'))} | {_num(m.get('t2v_MnR'))} | {paper} | {delta} |")
    return lines


def v2t_table(rows: list[Row]) -> list[str]:
    have = [r for r in rows if "v2t_R1" in r.metrics]
    if not have:
        return []
    lines = ["| run | benchmark | head | R@1 | R@5 | R@10 | MdR | MnR |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in have:
        m = r.metrics
        lines.append(f"| {_md(r.label)} | {_md(r.benchmark)} | {_md(r.head)} | " +
                     " | ".join(_num(m.get(f"v2t_{k}")) for k in ("R1", "R5", "R10", "MdR", "MnR")) + " |")
    return lines


def papers_table(rows: list[Row]) -> list[str]:
    seen: dict[tuple[str, str], Paper] = {}
    for r in rows:
        if r.paper and r.recipe:
            seen.setdefault((r.recipe, r.head), r.paper)
    if not seen:
        return []
    lines = ["| benchmark | head | R@1 | R@5 | R@10 | R@50 | MdR | MnR | source |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for (recipe, head), p in seen.items():
        lines.append(f"| {BENCHMARKS[recipe][0]} | {head} | {_num(p.r1)} | {_num(p.r5)} | {_num(p.r10)} | "
                     f"{_num(p.r50)} | {_num(p.mdr)} | {_num(p.mnr)} | {p.source} |")
    return lines


def _epochs(run: Run) -> tuple[list[float], list[float]]:
    """(step, epoch) pairs of the training rows, to place evaluations that carry no epoch."""
    pts = sorted((float(r["step"]), float(r["epoch"])) for r in run.metrics
                 if r.get("kind", "train") == "train" and isinstance(r.get("epoch"), (int, float)))
    return [s for s, _ in pts], [e for _, e in pts]


def _interp(x: float, xs: list[float], ys: list[float]) -> float | None:
    """ys at x, piecewise linear through (0, 0) and the points, the end segments extended (epochs grow linearly
    with steps while the global batch stays the same)."""
    pts = list(zip(xs, ys))
    if not pts:
        return None
    if pts[0][0] > 0:
        pts.insert(0, (0.0, 0.0))
    if len(pts) == 1:
        return pts[0][1]
    for i in range(1, len(pts)):
        if x <= pts[i][0] or i == len(pts) - 1:
            (x0, y0), (x1, y1) = pts[i - 1], pts[i]
            return y1 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def curves(run: Run) -> dict[str, list[tuple[float, float]]]:
    """A run's series: ``loss``, ``lr_new``, ``lr_clip`` per step; ``val_r1`` per epoch (``val_r1_step`` per step
    when the run logs no epochs). Validation rows are the logged evaluations other than ``train`` and ``test``."""
    out: dict[str, list[tuple[float, float]]] = {"loss": [], "lr_new": [], "lr_clip": [], "val_r1": [],
                                                 "val_r1_step": []}
    steps, epochs = _epochs(run)
    for r in sorted(run.metrics, key=lambda r: r["step"]):
        kind = str(r.get("kind", "train"))
        if kind == "train":
            for key in ("loss", "lr_new", "lr_clip"):
                v = r.get(key)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    out[key].append((float(r["step"]), float(v)))
        elif kind != "test" and isinstance(r.get("t2v_R1"), (int, float)):
            epoch = r.get("epoch") if isinstance(r.get("epoch"), (int, float)) else _interp(float(r["step"]), steps, epochs)
            out["val_r1_step"].append((float(r["step"]), float(r["t2v_R1"])))
            if epoch is not None:
                out["val_r1"].append((float(epoch), float(r["t2v_R1"])))
    return out


def runs_table(runs: list[Run], series: dict[str, dict]) -> list[str]:
    lines = ["| run | head | init | steps logged | last loss | best val R@1 (epoch) | last val R@1 |",
             "|---|---|---|---:|---:|---:|---:|"]
    for run in runs:
        if run.path.is_file():
            continue
        s = series[run.name]
        model = _section(run.config, "model")
        head = head_label(str(model.get("head", "?")), str(model.get("tab_global") or "TDB")) if model else "?"
        steps = int(max(x for x, _ in s["loss"])) if s["loss"] else 0
        last_loss = _num(s["loss"][-1][1], 4) if s["loss"] else "–"
        val = s["val_r1"] or s["val_r1_step"]
        unit = "epoch" if s["val_r1"] else "step"
        best = max(val, key=lambda p: p[1]) if val else None
        best_text = f"{best[1]:.1f} ({unit} {best[0]:.3g})" if best else "–"
        lines.append(f"| {_md(run.name)} | {_md(head)} | {_md(_init_text(run.config.get('init') or model.get('clip')))} "
                     f"| {steps} | {last_loss} | {best_text} | {_num(val[-1][1]) if val else '–'} |")
    return lines if len(lines) > 2 else []


# ----------------------------------------------------------------------------------------------
# plots


def plot_curves(runs: list[Run], series: dict[str, dict], out: Path) -> list[str]:
    """Write ``curves_{loss,lr,val_r1}.png`` for the series any run has; returns the file names written."""
    # the Agg canvas directly, not pyplot: no display, and no global backend switched under a caller's feet
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = []
    colours = {run.name: f"C{i % 10}" for i, run in enumerate(runs)}

    def figure(title: str, xlabel: str, ylabel: str):
        fig = Figure(figsize=(7.5, 4.2), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        return fig, ax

    def save(fig, ax, name: str) -> None:
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, format="png")
        written.append(name)

    with_loss = [r for r in runs if series[r.name]["loss"]]
    if with_loss:
        fig, ax = figure("training loss", "optimizer step", "loss")
        for r in with_loss:
            xs, ys = zip(*series[r.name]["loss"])
            ax.plot(xs, ys, color=colours[r.name], label=r.name, linewidth=1.2)
        save(fig, ax, "curves_loss.png")
    with_lr = [r for r in runs if any(v > 0 for k in ("lr_new", "lr_clip") for _, v in series[r.name][k])]
    if with_lr:
        fig, ax = figure("learning rates (solid: new modules, dashed: CLIP)", "optimizer step", "learning rate")
        ax.set_yscale("log")
        for r in with_lr:
            for key, style, what in (("lr_new", "-", "new"), ("lr_clip", "--", "CLIP")):
                pts = [(x, y) for x, y in series[r.name][key] if y > 0]  # a log axis cannot show the schedule's 0
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, style, color=colours[r.name], label=f"{r.name} ({what})", linewidth=1.2)
        save(fig, ax, "curves_lr.png")
    with_val = [r for r in runs if series[r.name]["val_r1_step"]]
    if with_val:
        by_epoch = all(series[r.name]["val_r1"] for r in with_val)
        key, xlabel = ("val_r1", "epoch") if by_epoch else ("val_r1_step", "optimizer step")
        fig, ax = figure("validation text->video R@1", xlabel, "R@1 (%)")
        for r in with_val:
            xs, ys = zip(*series[r.name][key])
            ax.plot(xs, ys, "o-", color=colours[r.name], label=r.name, linewidth=1.2, markersize=4)
        save(fig, ax, "curves_val_r1.png")
    return written


# ----------------------------------------------------------------------------------------------
# the verb


def _unique_names(runs: list[Run]) -> None:
    """Runs with the same name are told apart by their parent directory, then numbered (the same path twice)."""
    counts = Counter(run.name for run in runs)
    for run in runs:
        if counts[run.name] > 1:
            base = run.path.resolve()
            base = base.parent if base.is_file() else base
            run.name = f"{base.parent.name}/{base.name}"
    seen: Counter = Counter()
    for run in runs:
        seen[run.name] += 1
        if seen[run.name] > 1:
            run.name = f"{run.name} ({seen[run.name]})"


def build_report(cfg: ReportConfig) -> tuple[str, list[Run], list[Row], dict[str, dict]]:
    runs = [read_input(arg) for arg in cfg.runs]
    _unique_names(runs)
    rows = [make_row(run, path, data) for run in runs for path, data in run.results]
    series = {run.name: curves(run) for run in runs}
    lines = [f"# {cfg.title}", ""]
    if rows:
        lines += ["## Text -> video retrieval", ""] + results_table(rows)
        notes = ["", "init: what the model started from (a CLIP or an export). paper R@1: the paper's number for the "
                 "same benchmark and head (ViT-B/32, its test split), Δ = ours − paper; – where the paper has none."]
        if any("test" in r.selected_on.lower() for r in rows):
            notes.append("† the checkpoint was selected on the test split (no validation split was used), so its "
                         "numbers are optimistic.")
        lines += notes
        papers = papers_table(rows)
        if papers:
            lines += ["", "## The papers' numbers for these recipes (text -> video)", ""] + papers
        v2t = v2t_table(rows)
        if v2t:
            lines += ["", "## Video -> text retrieval", "", "Multi-caption benchmarks: the lenient rank the "
                      "references report (a video's best caption).", ""] + v2t
    else:
        lines += ["No results files in these inputs: `ptrain eval export=RUN shards=[DIR] out=RUN/eval` writes one."]
    table = runs_table(runs, series)
    if table:
        lines += ["", "## Training runs", ""] + table
    lines += ["", "## Sources", ""]
    for r in rows:
        m = r.metrics
        counted = all(isinstance(m.get(k), (int, float)) and math.isfinite(m[k]) for k in ("n_text", "n_video"))
        size = f"{int(m['n_text'])} queries x {int(m['n_video'])} videos" if counted else ""
        extra = ", ".join(x for x in (f"protocol {r.protocol}", size, f"split {r.split}" if r.split else "",
                                      f"selected on {r.selected_on}" if r.selected_on else "") if x)
        lines.append(f"- {_md(r.label)}: `{r.source}` ({extra})")
    for run in runs:
        if run.bad_metric_lines:
            lines.append(f"- {_md(run.name)}: {run.bad_metric_lines} line(s) of metrics.jsonl were not JSON rows and "
                         "were skipped")
        if run.skipped:
            lines.append(f"- {_md(run.name)}: not results files, skipped: {', '.join(run.skipped)}")
    return "\n".join(lines) + "\n", runs, rows, series


def run(cfg: ReportConfig) -> int:
    """``ptrain report``: write ``out/report.md`` (printed too) and ``out/curves_*.png``; a bad input is one line
    naming it and exit status 2."""
    if not cfg.runs:
        print("ptrain report: name at least one run directory or results.json: ptrain report RUN_A RUN_B out=DIR",
              file=sys.stderr)
        return 2
    try:
        text, runs, rows, series = build_report(cfg)
    except ReportError as e:
        print(f"ptrain report: {e}", file=sys.stderr)
        return 2
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    images = plot_curves(runs, series, out)
    if images:
        text += "\n## Training curves\n\n" + "".join(f"![{name}]({name})\n" for name in images)
    (out / "report.md").write_text(text, encoding="utf-8")
    print(text, end="")
    print(f"ptrain report: wrote {out / 'report.md'}" + (f" and {', '.join(images)}" if images else ""),
          file=sys.stderr)
    return 0
