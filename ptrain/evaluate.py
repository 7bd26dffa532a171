"""``ptrain eval``: embed held-out shards with an export and report text-video retrieval metrics.

    ptrain eval export=runs/demo/checkpoints/step_00000060/export shards=[demo/shards_heldout]
    ptrain eval export=runs/demo shards=[demo/shards_heldout] probe.sample_meta=demo/raw/sample_meta.json
    ptrain eval export=RUN shards=[DIR] caption_filter='left|right' out=RUN/eval.json

Every held-out clip is one gallery item and its caption one query (ground truth: the diagonal).
Reported: t2v and v2t R@1/5/10, MdR, MnR (``ptrain.metrics``), with chance levels. ``caption_filter``
keeps only matching captions as queries (e.g. the motion-direction ones) against the full gallery.

The probe (``probe.sample_meta``, for ``ptrain sample-data`` corpora): each held-out clip that lies
inside one ground-truth event is scored against four captions that differ only in the direction
("the red circle moves to the left / to the right / up / down"). ``direction_acc`` is the 4-way
accuracy (chance 25%); ``order_acc`` picks between the true direction and its opposite (chance
50%); ``reversal_acc`` scores the true caption against the clip and the same clip played backwards
(identical frames, only their order differs: an order-blind head such as meanP scores exactly 50%).

The same embedding code runs inside training (:func:`evaluate_during_training`), where every rank
embeds its share of the batches and the features are all-gathered.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ptrain import distributed as du
from ptrain.data.config import DataConfig
from ptrain.metrics import chunked_similarity, retrieval_metrics
from ptrain.model.video_text import reverse_clips
from ptrain.configs import EvalConfig, EvalDuringTrainConfig
from ptrain.model.config import ModelConfig

DIRECTION_PHRASES = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def _rows_of(features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Features of the selected rows placed back into a zero tensor of the whole batch (CPU fp32)."""
    out = torch.zeros((len(rows), *features.shape[1:]), dtype=torch.float32)
    out[rows] = features.float().cpu()
    return out


def embed(model, loader, max_samples: int = 0, reversed_too: bool = False) -> dict[str, Any]:
    """Text and video features of every valid eval sample, in global (shard, tar) order, on every rank.
    ``reversed_too``: also the features of every clip played backwards (key ``video_rev``)."""
    texts_f, videos_f, valid, pos, info, rev_f = [], [], [], [], [], []
    world, rank = du.world_size(), du.rank()
    B = None
    for j, batch in enumerate(loader):
        B = len(batch["keys"])
        # Encode the real rows only: padding rows (which keep the ranks' batch counts equal) would change
        # compat (head-major) scores of the real clips. Every rank still runs one forward per batch (ZeRO-3
        # gathers line up) and the features are put back at their rows (the all-gathers line up).
        rows = batch["valid"].bool()
        if not rows.any():  # nothing readable in this batch: encode it whole, its rows are dropped below
            rows = torch.ones(B, dtype=torch.bool)
        texts_f.append(_rows_of(model.encode_text(batch["input_ids"][rows], batch["attention_mask"][rows]), rows))
        videos_f.append(_rows_of(model.encode_video(batch["frames"][rows], batch["frame_mask"][rows]), rows))
        if reversed_too:
            rev = reverse_clips(batch["frames"][rows], batch["frame_mask"][rows])
            rev_f.append(_rows_of(model.encode_video(rev, batch["frame_mask"][rows]), rows))
        valid.append(batch["valid"].bool())
        g = j * world + rank  # EvalStream: rank r holds global batches r, r + world, ...
        pos.append(torch.arange(g * B, (g + 1) * B))
        info.extend({"key": k, "text": t, "meta": m or {}} for k, t, m in zip(batch["keys"], batch["texts"], batch["meta"]))
    if not texts_f:
        raise ValueError("the eval shards hold no samples; check the shard directories (every *.tar needs its .json sidecar)")
    text, video = torch.cat(texts_f), torch.cat(videos_f)
    valid_t, pos_t = torch.cat(valid), torch.cat(pos)
    # Ranks hold equal numbers of batches, so the gathers line up; then sort rows by global position.
    text, video = du.all_gather_tensor(text), du.all_gather_tensor(video)
    valid_t, pos_t = du.all_gather_tensor(valid_t), du.all_gather_tensor(pos_t)
    info = [x for part in du.all_gather_objects(info) for x in part]
    order = torch.argsort(pos_t)
    keep = order[valid_t[order]]
    if max_samples:
        keep = keep[:max_samples]
    idx = keep.tolist()
    out = {"text": text[keep], "video": video[keep], "items": [info[i] for i in idx]}
    if reversed_too:  # ptrain eval runs in one process: no gather needed
        out["video_rev"] = torch.cat(rev_f)[keep]
    return out


def retrieval(model, emb: dict[str, Any], caption_filter: str = "", dsl: bool = False) -> dict[str, float]:
    """Retrieval metrics of captions (optionally only those matching ``caption_filter``) vs all clips."""
    rows = list(range(len(emb["items"])))
    if caption_filter:
        pattern = re.compile(caption_filter)
        rows = [i for i in rows if pattern.search(emb["items"][i]["text"])]
        if not rows:
            raise ValueError(f"caption_filter={caption_filter!r} matches no held-out caption; loosen the regex")
    sim = chunked_similarity(emb["text"][rows], emb["video"], model.similarity, 512, 512)
    out = retrieval_metrics(sim, np.asarray(rows), dsl=dsl)
    out["chance_R1"] = 100.0 / sim.shape[1]
    return out


def _clip_event(meta: dict, videos: dict[str, Any], min_overlap: float) -> dict | None:
    video = videos.get(str(meta.get("video_id", "")))
    if video is None or "start" not in meta or "end" not in meta:
        return None
    start, end = float(meta["start"]), float(meta["end"])
    span = max(end - start, 1e-6)
    best, best_cover = None, 0.0
    for ev in video.get("events", []):
        cover = max(0.0, min(end, ev["end"]) - max(start, ev["start"])) / span
        if cover > best_cover:
            best, best_cover = ev, cover
    return best if best_cover >= min_overlap else None


@torch.no_grad()
def direction_probe(model, emb: dict[str, Any], sample_meta: str | Path, min_overlap: float = 0.8) -> dict[str, float]:
    """4-way direction accuracy and true-vs-opposite accuracy on clips inside one ground-truth event."""
    path = Path(sample_meta)
    if not path.is_file():
        raise FileNotFoundError(f"probe.sample_meta={path}: not found; point it at OUT/sample_meta.json of `ptrain sample-data`")
    videos = json.loads(path.read_text()).get("videos", {})
    clips = []
    for i, item in enumerate(emb["items"]):
        ev = _clip_event(item["meta"], videos, min_overlap)
        if ev is not None:
            clips.append((i, ev))
    if not clips:
        return {"probe_clips": 0}
    directions = list(DIRECTION_PHRASES)
    queries = sorted({(ev["colour"], ev["shape"]) for _, ev in clips})
    texts = [f"the {c} {s} moves {DIRECTION_PHRASES[d]}" for c, s in queries for d in directions]
    text_f = model.encode_text(texts)
    hits4 = hits2 = hits_rev = 0.0
    for i, ev in clips:
        q = queries.index((ev["colour"], ev["shape"]))
        scores = model.similarity(text_f[4 * q : 4 * q + 4], emb["video"][i : i + 1]).flatten().float()
        truth = directions.index(ev["direction"])
        hits4 += int(scores.argmax().item() == truth)
        hits2 += int(scores[truth] > scores[directions.index(OPPOSITE[ev["direction"]])])
        if "video_rev" in emb:
            # the true caption vs the same clip played backwards: identical frames, only the order differs;
            # differences below float noise are ties (an order-blind head scores exactly 50%)
            rev = model.similarity(text_f[4 * q + truth : 4 * q + truth + 1], emb["video_rev"][i : i + 1]).flatten().float()
            diff = float(scores[truth] - rev[0])
            hits_rev += 0.5 if abs(diff) < 1e-4 * max(1.0, abs(float(scores[truth]))) else float(diff > 0)
    n = len(clips)
    out = {"probe_clips": n, "direction_acc": 100.0 * hits4 / n, "order_acc": 100.0 * hits2 / n}
    if "video_rev" in emb:
        out["reversal_acc"] = 100.0 * hits_rev / n
    return out


def evaluate_during_training(module, data_cfg: DataConfig, model_cfg: ModelConfig,
                             cfg: EvalDuringTrainConfig) -> dict[str, float]:
    """All ranks embed their share of ``data_cfg.eval_sources``; every rank returns the metrics."""
    from ptrain.data import build_eval_loader

    loader = build_eval_loader(data_cfg, num_frames=model_cfg.num_frames, frame_size=model_cfg.frame_size,
                               max_words=model_cfg.max_words, batch_size=cfg.batch_size, rank=du.rank(),
                               world_size=du.world_size(), tokenizer=model_cfg.tokenizer or None)
    was_training = module.training
    module.eval()
    try:
        emb = embed(module, loader, cfg.max_samples)
        # every rank computes the same matrix: under ZeRO-3 similarity() gathers head weights collectively
        m = retrieval(module, emb)
    finally:
        module.train(was_training)
    keys = ("t2v_R1", "t2v_R5", "t2v_R10", "t2v_MdR", "t2v_MnR", "v2t_R1", "v2t_R5", "v2t_R10", "n_text", "chance_R1")
    return {k: float(m[k]) for k in keys if k in m}


def _print_table(name: str, m: dict[str, float]) -> None:
    print(f"{name}: {int(m.get('n_text', 0))} captions x {int(m.get('n_video', 0))} clips "
          f"(chance R@1 {m.get('chance_R1', 0):.1f}%)")
    for d in ("t2v", "v2t"):
        print(f"  {d}  R@1 {m[d + '_R1']:5.1f}  R@5 {m[d + '_R5']:5.1f}  R@10 {m[d + '_R10']:5.1f}  "
              f"MdR {m[d + '_MdR']:.1f}  MnR {m[d + '_MnR']:.1f}")


def run(cfg: EvalConfig) -> int:
    import ptrain
    from ptrain.checkpoint import find_export
    from ptrain.data import build_eval_loader

    export = find_export(cfg.export)
    model = ptrain.load(export)
    mc = model.cfg
    data_cfg = DataConfig(num_workers=0)
    loader = build_eval_loader(data_cfg, num_frames=mc.num_frames, frame_size=mc.frame_size, max_words=mc.max_words,
                               batch_size=cfg.batch_size, sources=list(cfg.shards), tokenizer=model.tokenizer_path)
    emb = embed(model, loader, cfg.max_samples, reversed_too=bool(cfg.probe.sample_meta))
    skipped = {k: v for k, v in loader.stats.items() if v and ("corrupt" in k or "missing" in k or "damaged" in k)}
    results: dict[str, Any] = {"export": str(export), "head": mc.head, "shards": list(cfg.shards)}
    print(f"ptrain eval: {export} (head {mc.head}, {mc.num_frames} frames) on {len(emb['items'])} held-out clips")
    if skipped:
        print(f"  skipped while reading: {skipped}")
    results["all"] = retrieval(model, emb, dsl=cfg.dsl)
    _print_table("all captions", results["all"])
    if cfg.caption_filter:
        results["filtered"] = retrieval(model, emb, cfg.caption_filter, dsl=cfg.dsl)
        _print_table(f"captions matching {cfg.caption_filter!r}", results["filtered"])
    if cfg.probe.sample_meta:
        results["probe"] = direction_probe(model, emb, cfg.probe.sample_meta, cfg.probe.min_overlap)
        p = results["probe"]
        if p["probe_clips"]:
            print(f"direction probe ({p['probe_clips']} clips inside one event): 4-way accuracy {p['direction_acc']:.1f}% "
                  f"(chance 25%), true vs opposite caption {p['order_acc']:.1f}% (chance 50%), true caption: "
                  f"clip vs clip played backwards {p['reversal_acc']:.1f}% (order-blind heads: exactly 50%)")
        else:
            print("direction probe: no held-out clip lies inside a single event")
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(results, indent=1, default=float))
    return 0
