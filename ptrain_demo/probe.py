"""The motion-direction probe on held-out clips of a ``ptrain sample-data`` corpus (its config, phrases and scoring).

    scores = direction_probe(model, emb, "demo/raw/sample_meta.json", min_overlap=0.7)

Each held-out clip that lies inside one ground-truth event is scored against four captions that differ only in the
direction ("the red circle moves to the left / to the right / up / down"). ``direction_acc`` is the 4-way accuracy
(chance 25%); ``order_acc`` picks between the true direction and its opposite (chance 50%); ``reversal_acc`` scores
the true caption against the clip and the same clip played backwards (identical frames, only their order differs:
an order-blind head such as meanP scores exactly 50%). ``emb`` is ``ptrain.evaluate.embed``'s output (with
``reversed_too=True`` for ``reversal_acc``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptrain.config import opt

DIRECTION_PHRASES = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


@dataclass
class ProbeConfig:
    """Motion-direction probe on clips of ``ptrain sample-data`` (ground truth from sample_meta.json)."""

    sample_meta: str = opt("", "sample_meta.json of the corpus the eval shards came from; '' = no probe")
    min_overlap: float = opt(0.8, "a clip is probed if one event covers at least this fraction of it")


def _clip_event(meta: dict, videos: dict[str, Any], min_overlap: float) -> dict | None:
    """The ground-truth event covering at least ``min_overlap`` of the clip, None when no event does."""
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


def direction_probe(model, emb: dict[str, Any], sample_meta: str | Path, min_overlap: float = 0.8) -> dict[str, float]:
    """4-way direction accuracy and true-vs-opposite accuracy on clips inside one ground-truth event."""
    import torch

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
    hits4 = hits2 = hits_rev = 0.0
    with torch.no_grad():
        text_f = model.encode_text(texts)
        for i, ev in clips:
            q = queries.index((ev["colour"], ev["shape"]))
            scores = model.similarity(text_f[4 * q : 4 * q + 4], emb["video"][i : i + 1]).flatten().float()
            truth = directions.index(ev["direction"])
            hits4 += int(scores.argmax().item() == truth)
            hits2 += int(scores[truth] > scores[directions.index(OPPOSITE[ev["direction"]])])
            if "video_rev" in emb:
                # the true caption vs the same clip played backwards: identical frames, only the order differs;
                # differences below float noise are ties (an order-blind head scores exactly 50%)
                rev = model.similarity(text_f[4 * q + truth : 4 * q + truth + 1],
                                       emb["video_rev"][i : i + 1]).flatten().float()
                diff = float(scores[truth] - rev[0])
                hits_rev += 0.5 if abs(diff) < 1e-4 * max(1.0, abs(float(scores[truth]))) else float(diff > 0)
    n = len(clips)
    out = {"probe_clips": n, "direction_acc": 100.0 * hits4 / n, "order_acc": 100.0 * hits2 / n}
    if "video_rev" in emb:
        out["reversal_acc"] = 100.0 * hits_rev / n
    return out
