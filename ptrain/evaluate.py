"""``ptrain eval``: embed held-out shards with an export and report text-video retrieval metrics.

    ptrain eval export=runs/demo/checkpoints/step_00000060/export shards=[demo/shards_heldout]
    ptrain eval export=RUN shards=[DIR] caption_filter='left|right' out=RUN/eval.json

Every held-out clip is one gallery item and its caption one query (ground truth: the diagonal).
Reported: t2v and v2t R@1/5/10, MdR, MnR (``ptrain.metrics``), with chance levels. ``caption_filter``
keeps only matching captions as queries (e.g. the motion-direction ones) against the full gallery.
:func:`evaluate` returns the results with the model and the embeddings, for callers that score more
(the demo's motion-direction probe, ``ptrain_demo.eval``, which is what the ``ptrain eval`` verb runs).

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
from ptrain.configs import EvalConfig, EvalDuringTrainConfig
from ptrain.data.config import DataConfig
from ptrain.metrics import chunked_similarity, retrieval_metrics
from ptrain.model.config import ModelConfig
from ptrain.model.video_text import reverse_clips


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


def evaluate(cfg: EvalConfig, reversed_too: bool = False) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """Embed ``cfg.shards`` with ``cfg.export``, print the retrieval tables and return ``(results, model, emb)``:
    the model and the embeddings (``embed``'s dict, ``reversed_too``: with the reversed clips) are for callers
    that score more on them (``ptrain_demo.eval``'s direction probe)."""
    import ptrain
    from ptrain.checkpoint import find_export
    from ptrain.data import build_eval_loader

    export = find_export(cfg.export)
    model = ptrain.load(export)
    mc = model.cfg
    data_cfg = DataConfig(num_workers=0)
    loader = build_eval_loader(data_cfg, num_frames=mc.num_frames, frame_size=mc.frame_size, max_words=mc.max_words,
                               batch_size=cfg.batch_size, sources=list(cfg.shards), tokenizer=model.tokenizer_path)
    emb = embed(model, loader, cfg.max_samples, reversed_too=reversed_too)
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
    return results, model, emb


def write_results(out: str, results: dict[str, Any]) -> None:
    """The results as JSON at ``out`` ('' = nowhere)."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=1, default=float))


def run(cfg: EvalConfig) -> int:
    results, _model, _emb = evaluate(cfg)
    write_results(cfg.out, results)
    return 0
