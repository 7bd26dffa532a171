"""``ptrain eval``: embed held-out shards with an export and report text-video retrieval under a benchmark protocol.

    ptrain eval export=runs/demo/checkpoints/step_00000060/export shards=[demo/shards_heldout]
    ptrain eval export=RUN shards=[DIR] protocol=multi device=cuda dtype=bf16 out=RUN/eval/results.json
    torchrun --nproc_per_node 4 -m ptrain eval export=RUN shards=[DIR]        # ranks embed their share

Protocols (``protocol=auto`` reads them off the shards: paragraph samples carry their ``sentences``, multi-caption
samples more than one caption, the rest are single):

- ``single`` (MSR-VTT 1k-A, LSMDC): one caption per video (its first) against every video.
- ``multi`` (MSVD, VATEX, MSR-VTT full): every caption is a query against the videos; video->text is reported both
  lenient (a video ranks the caption groups by their best caption, as the references do: ``v2t_*``) and strict (its
  best own caption among all captions: ``v2t_strict_*``).
- ``paragraph`` (ActivityNet, DiDeMo): one paragraph per video, R@50 reported too.

Every rank embeds its share of the videos once (``EvalStream``: batches round robin), the features are gathered,
each rank scores its block of query rows (the tight head's cross encoder included, in chunks of bounded memory) and
rank 0 computes the metrics. The result: ``results.json`` (every number, the protocol, counts of queries and gallery
items, the missing videos recorded by ``ptrain shard``, the export and data used) and ``results.md`` beside it (a
table like the papers'). DSL and QB-Norm numbers appear beside the raw ones when asked, never in their place.

The same embedding code runs inside training (:func:`evaluate_during_training`).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ptrain import distributed as du
from ptrain.configs import EvalConfig, EvalDuringTrainConfig, batch_problem
from ptrain.data.config import DataConfig
from ptrain.metrics import chunked_similarity, qb_norm, retrieval_metrics
from ptrain.model.config import ModelConfig
from ptrain.model.video_text import reverse_clips

PROTOCOLS = ("single", "multi", "paragraph")
KS = {"single": (1, 5, 10), "multi": (1, 5, 10), "paragraph": (1, 5, 10, 50)}


def _rows_of(features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Features of the selected rows placed back into a zero tensor of the whole batch (CPU fp32)."""
    out = torch.zeros((len(rows), *features.shape[1:]), dtype=torch.float32)
    out[rows] = features.float().cpu()
    return out


def _encode_captions(model, ids: torch.Tensor, mask: torch.Tensor, batch: int) -> torch.Tensor:
    parts = [model.encode_text(ids[i:i + batch], mask[i:i + batch]).float().cpu() for i in range(0, len(ids), batch)]
    return torch.cat(parts) if parts else torch.zeros(0)


def embed(model, loader, max_samples: int = 0, reversed_too: bool = False) -> dict[str, Any]:
    """Features of every valid eval sample, in global (shard, tar) order, on every rank.

    Returns ``video`` [N_video, ...], ``items`` (per video: key, text, captions, meta), and when the loader carries
    every caption (``all_captions``) ``captions`` [N_caption, ...] with ``caption_video`` (caption -> video row);
    otherwise ``text`` holds the one caption per video. ``reversed_too``: also every clip played backwards
    (``video_rev``). ``max_samples``: the first N videos only."""
    videos_f, texts_f, caps_f, cap_rows, valid, pos, info, rev_f = [], [], [], [], [], [], [], []
    world, rank = du.world_size(), du.rank()
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
        g = j * world + rank  # EvalStream: rank r holds global batches r, r + world, ...
        if "caption_ids" in batch:
            real = batch["valid"].bool()[batch["caption_row"]]
            caps_f.append(_encode_captions(model, batch["caption_ids"][real], batch["caption_mask"][real], B))
            cap_rows.append(batch["caption_row"][real] + g * B)
        valid.append(batch["valid"].bool())
        pos.append(torch.arange(g * B, (g + 1) * B))
        info.extend({"key": k, "text": t, "captions": c, "meta": m or {}}
                    for k, t, c, m in zip(batch["keys"], batch["texts"], batch.get("captions", batch["texts"]),
                                          batch["meta"]))
    if not videos_f:
        raise ValueError("the eval shards hold no samples; check the shard directories (every *.tar needs its .json sidecar)")
    local = {"video": torch.cat(videos_f), "text": torch.cat(texts_f), "valid": torch.cat(valid), "pos": torch.cat(pos),
             "info": info, "rev": torch.cat(rev_f) if rev_f else None,
             "caps": torch.cat(caps_f) if caps_f else None, "cap_pos": torch.cat(cap_rows) if cap_rows else None}
    parts = du.all_gather_objects(local) if world > 1 else [local]  # our own CPU tensors, ranks in order
    video = torch.cat([p["video"] for p in parts])
    text = torch.cat([p["text"] for p in parts])
    valid_t, pos_t = torch.cat([p["valid"] for p in parts]), torch.cat([p["pos"] for p in parts])
    info = [x for p in parts for x in p["info"]]
    order = torch.argsort(pos_t)
    keep = order[valid_t[order]]
    if not len(keep):
        dirs = sorted({str(Path(s.path).parent) for s in loader.dataset.shards})
        counts = {k: v for k, v in loader.stats.items() if v and k.startswith(("samples_", "shards_"))}
        raise ValueError(f"none of the {loader.num_samples} held-out samples could be read {counts}: the "
                         f"JSON or JPEGs of the shards in {', '.join(dirs)} are damaged throughout; re-shard them "
                         "or evaluate other shards")
    if max_samples:
        keep = keep[:max_samples]
    out: dict[str, Any] = {"video": video[keep], "text": text[keep], "items": [info[i] for i in keep.tolist()]}
    if reversed_too:
        out["video_rev"] = torch.cat([p["rev"] for p in parts])[keep]
    if parts[0]["caps"] is not None:
        # captions follow their videos: map each caption's global sample position to its kept video row
        row_of = {int(p): r for r, p in enumerate(pos_t[keep].tolist())}
        caps = torch.cat([p["caps"] for p in parts])
        cap_pos = torch.cat([p["cap_pos"] for p in parts]).tolist()
        picked = [(row_of[p], i) for i, p in enumerate(cap_pos) if p in row_of]
        picked.sort()
        out["captions"] = caps[[i for _, i in picked]] if picked else caps[:0]
        out["caption_video"] = np.asarray([r for r, _ in picked], dtype=np.int64)
        out["caption_texts"] = [c for item in out["items"] for c in item["captions"]]
    return out


def detect_protocol(items: list[dict]) -> str:
    """paragraph when samples carry timed sentences, multi when a video has several captions, else single."""
    if any(item["meta"].get("sentences") for item in items):
        return "paragraph"
    if any(len(item.get("captions") or []) > 1 for item in items):
        return "multi"
    return "single"


def queries(emb: dict[str, Any], protocol: str) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """(query features, query -> video row, query texts) of a protocol."""
    if protocol == "multi":
        if "captions" not in emb:
            raise ValueError("protocol=multi needs every caption of each sample (embed with an all_captions loader)")
        return emb["captions"], emb["caption_video"], emb["caption_texts"]
    return emb["text"], np.arange(len(emb["items"])), [item["text"] for item in emb["items"]]


def similarity(model, text: torch.Tensor, video: torch.Tensor, chunk: int = 512) -> np.ndarray:
    """The [N_text, N_video] scores; under several ranks each scores a block of rows and they are gathered."""
    world, rank = du.world_size(), du.rank()
    if world == 1 or len(text) < world:
        return chunked_similarity(text, video, model.similarity, chunk, chunk)
    bounds = np.linspace(0, len(text), world + 1).astype(int)
    mine = chunked_similarity(text[bounds[rank]:bounds[rank + 1]], video, model.similarity, chunk, chunk)
    return np.concatenate(du.all_gather_objects(mine))


def retrieval(model, emb: dict[str, Any], protocol: str = "single", caption_filter: str = "", dsl: bool = False,
              bank: torch.Tensor | None = None) -> dict[str, Any]:
    """Retrieval metrics of the protocol's queries (optionally only those matching ``caption_filter``) against every
    video; ``bank``: query-bank features for QB-Norm numbers beside the raw ones."""
    feats, t2v, texts = queries(emb, protocol)
    rows = np.arange(len(texts))
    if caption_filter:
        pattern = re.compile(caption_filter)
        rows = np.asarray([i for i, t in enumerate(texts) if pattern.search(t)], dtype=np.int64)
        if not len(rows):
            raise ValueError(f"caption_filter={caption_filter!r} matches no held-out caption; loosen the regex")
    sim = similarity(model, feats[torch.as_tensor(rows)], emb["video"])
    out = retrieval_metrics(sim, t2v[rows], ks=KS[protocol], dsl=dsl)
    out["chance_R1"] = 100.0 / sim.shape[1]
    if bank is not None:  # on cosine scale (beta=20 as the paper): divide a loose head's logit scale out
        scale = 1.0 if model.is_tight else float(model.logit_scale())
        normed = qb_norm(sim / scale, similarity(model, bank, emb["video"]) / scale)
        out.update({f"qb_{k}": v for k, v in retrieval_metrics(normed, t2v[rows], ks=KS[protocol]).items()
                    if k.startswith(("t2v_", "v2t_"))})
    return out


def score_split(model, shards: list[str], *, batch_size: int, protocol: str = "auto", max_samples: int = 0,
                tokenizer: str | None = None, data_cfg: DataConfig | None = None, **retrieval_opts
                ) -> tuple[dict[str, Any], str, dict[str, Any], Any]:
    """Embed ``shards`` on every rank and score them: ``(metrics, protocol, embeddings, loader)``."""
    from ptrain.data import build_eval_loader

    mc = model.cfg
    loader = build_eval_loader(data_cfg or DataConfig(num_workers=0), num_frames=mc.num_frames,
                               frame_size=mc.frame_size, max_words=mc.max_words, batch_size=batch_size,
                               sources=list(shards), tokenizer=tokenizer, rank=du.rank(), world_size=du.world_size(),
                               all_captions=True)
    emb = embed(model, loader, max_samples, reversed_too=retrieval_opts.pop("reversed_too", False))
    protocol = detect_protocol(emb["items"]) if protocol == "auto" else protocol
    return retrieval(model, emb, protocol, **retrieval_opts), protocol, emb, loader


_TRAINING_KEYS = ("R1", "R5", "R10", "MdR", "MnR")


def embed_split(module, shards: list[str], model_cfg: ModelConfig, cfg, tokenizer: str | None = None) -> dict[str, float]:
    """Retrieval metrics of ``shards`` with a model being trained (every rank gets them; eval mode meanwhile).
    ``cfg``: a section with ``batch_size``, ``max_samples`` and optionally ``protocol``."""
    was_training = module.training
    module.eval()
    try:
        # every rank computes the same metrics: under ZeRO-3 similarity() gathers head weights collectively
        m, protocol, _, _ = score_split(module, shards, batch_size=cfg.batch_size, max_samples=cfg.max_samples,
                                        protocol=getattr(cfg, "protocol", "auto"),
                                        tokenizer=tokenizer or model_cfg.tokenizer or None)
    finally:
        module.train(was_training)
    keys = [f"{d}_{k}" for d in ("t2v", "v2t", "v2t_strict") for k in _TRAINING_KEYS] + ["n_text", "chance_R1"]
    return {k: float(m[k]) for k in keys if k in m}


def evaluate_during_training(module, data_cfg: DataConfig, model_cfg: ModelConfig,
                             cfg: EvalDuringTrainConfig) -> dict[str, float]:
    """All ranks embed their share of ``data_cfg.eval_sources``; every rank returns the metrics (auto protocol)."""
    return embed_split(module, [s["path"] for s in data_cfg.eval_sources], model_cfg, cfg)


# ----------------------------------------------------------------------------------------------
# ptrain eval


def _device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and du.on_cuda()):
        if not torch.cuda.is_available():
            raise ValueError("device=cuda but CUDA is not available here; use device=auto or device=cpu")
        return du.device() if du.is_initialized() else torch.device("cuda", du.local_rank())
    return torch.device("cpu")


def _planned_frames(shard_path: str) -> int | None:
    """The frames per clip that ``ptrain shard`` planned for a shard (its manifest's settings), if recorded."""
    manifest = Path(shard_path).parent / "manifest.json"
    try:
        settings = json.loads(manifest.read_text()).get("settings", {})
        return int(settings.get("num_frames") or settings.get("plan", {}).get("num_frames"))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def check_shards_fit(loader, model_cfg: ModelConfig, allow_resize: bool) -> dict[str, Any]:
    """The stored frame size (first readable sample) and planned frame count (the shard manifest) against the
    export's; refuses a mismatch, which would be silently resized or padded, unless ``allow_resize``. A clip with
    fewer frames than planned (a short clip) is normal and padded; shards planned with fewer frames are not."""
    from ptrain.data.format import decode_sample
    from ptrain.data.jpeg import jpeg_size
    from ptrain.data.seekable import ShardReader

    stream = loader.dataset
    reader = ShardReader(stream.shards)
    for sid, shard in enumerate(stream.shards):
        for k in range(min(shard.samples, 4)):
            try:
                sample = decode_sample(reader.read(sid, k)[1])
                w, h = jpeg_size(sample.frames[0])
            except Exception:  # noqa: BLE001 - a damaged sample: try the next one (the loader counts them)
                continue
            planned = _planned_frames(shard.path)
            found = {"frame_short_side": min(w, h), "frames_planned": planned}
            bad = []
            if min(w, h) != model_cfg.frame_size:
                bad.append(f"frames of {w}x{h} (short side {min(w, h)}) but the export takes {model_cfg.frame_size} px")
            if planned is not None and planned < model_cfg.num_frames:
                bad.append(f"{planned} frames per clip were planned but the export takes {model_cfg.num_frames}")
            if bad and not allow_resize:
                raise ValueError(f"{shard.path}: the shards do not fit the export: {'; '.join(bad)}. Shard again with "
                                 f"frame_size={model_cfg.frame_size} plan.num_frames={model_cfg.num_frames} (or evaluate "
                                 "an export made for these shards); allow_resize=true resizes and pads instead")
            return {**found, "resized": bool(bad)}
    return {}


def _missing_videos(shard_dirs: list[str]) -> int | None:
    """Videos ``ptrain shard`` recorded as missing in the manifests beside the shards (None: no manifest)."""
    total, found = 0, False
    for d in shard_dirs:
        manifest = Path(d) / "manifest.json"
        if manifest.is_file():
            try:
                data = json.loads(manifest.read_text())
                total += int(data.get("failures_by_class", {}).get("missing", 0))
                found = True
            except (ValueError, TypeError):
                continue
    return total if found else None


def _print_table(name: str, m: dict[str, float], protocol: str) -> None:
    print(f"{name}: {int(m.get('n_text', 0))} captions x {int(m.get('n_video', 0))} videos "
          f"({protocol} protocol, chance R@1 {m.get('chance_R1', 0):.1f}%)")
    for d in ("t2v", "v2t", "v2t_strict"):
        if d + "_R1" not in m or (d == "v2t_strict" and m["n_text"] == m.get("n_v2t_queries")):
            continue
        extra = f"  R@50 {m[d + '_R50']:5.1f}" if d + "_R50" in m else ""
        name = {"v2t": "v2t (lenient)", "v2t_strict": "v2t (strict)"}.get(d, d) if "v2t_strict_R1" in m and \
            m["n_text"] != m.get("n_v2t_queries") else d
        print(f"  {name}  R@1 {m[d + '_R1']:5.1f}  R@5 {m[d + '_R5']:5.1f}  R@10 {m[d + '_R10']:5.1f}{extra}  "
              f"MdR {m[d + '_MdR']:.1f}  MnR {m[d + '_MnR']:.1f}")


def markdown(results: dict[str, Any]) -> str:
    """``results.md``: the numbers as the papers print them."""
    m, protocol = results["all"], results["protocol"]
    ks = [k for k in (1, 5, 10, 50) if f"t2v_R{k}" in m]
    head = "| direction | " + " | ".join(f"R@{k}" for k in ks) + " | MdR | MnR |"
    lines = [f"# Retrieval: {results['export']}", "",
             f"protocol **{protocol}**, {m['n_text']} queries x {m['n_video']} videos, head {results['head']}, "
             f"shards {', '.join(results['shards'])}", "", head, "|" + "---|" * (len(ks) + 3)]
    rows = [("t2v", "text -> video")]
    rows += [("v2t", "video -> text (lenient, as the references)"), ("v2t_strict", "video -> text (strict)")] \
        if protocol == "multi" else [("v2t", "video -> text")]
    for prefix in ("", "dsl_", "qb_"):
        for d, name in rows:
            if f"{prefix}{d}_R1" in m:
                label = {"": name, "dsl_": f"{name}, DSL", "qb_": f"{name}, QB-Norm"}[prefix]
                lines.append(f"| {label} | " + " | ".join(f"{m[f'{prefix}{d}_R{k}']:.1f}" for k in ks) +
                             f" | {m[f'{prefix}{d}_MdR']:.1f} | {m[f'{prefix}{d}_MnR']:.1f} |")
    if results.get("missing_videos"):
        lines += ["", f"{results['missing_videos']} videos of the split were missing when sharded and are not in the "
                      "gallery (see the shards' errors.jsonl)."]
    return "\n".join(lines) + "\n"


def score_export(model, export, device: torch.device, cfg, reversed_too: bool = False) -> dict[str, Any]:
    """The results dict of ``model`` (loaded from ``export``) on ``cfg.shards`` (an ``EvalConfig``-like section):
    every number, the protocol, counts, the missing videos, the data and export used (``_emb``: the embeddings)."""
    mc = model.cfg
    if (why := batch_problem("batch_size", cfg.batch_size, mc.num_frames, mc.frame_size)) is not None:
        raise ValueError(why)
    data_cfg = DataConfig(num_workers=getattr(cfg, "num_workers", 0),
                          frame_sampling=getattr(cfg, "frame_sampling", "uniform"))
    bf16 = getattr(cfg, "dtype", "fp32") == "bf16"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        bank = None
        if getattr(cfg, "qb_norm", False):
            _, _, bank_emb, _ = score_split(model, cfg.qb_norm_bank, batch_size=cfg.batch_size, data_cfg=data_cfg,
                                            tokenizer=model.tokenizer_path)
            bank = queries(bank_emb, "multi" if "captions" in bank_emb else "single")[0]
        from ptrain.data import build_eval_loader

        loader = build_eval_loader(data_cfg, num_frames=mc.num_frames, frame_size=mc.frame_size,
                                   max_words=mc.max_words, batch_size=cfg.batch_size, sources=list(cfg.shards),
                                   tokenizer=model.tokenizer_path, rank=du.rank(), world_size=du.world_size(),
                                   all_captions=True)
        fit = check_shards_fit(loader, mc, getattr(cfg, "allow_resize", False))
        emb = embed(model, loader, cfg.max_samples, reversed_too=reversed_too)
        protocol = detect_protocol(emb["items"]) if cfg.protocol == "auto" else cfg.protocol
        dsl, caption_filter = getattr(cfg, "dsl", False), getattr(cfg, "caption_filter", "")
        results: dict[str, Any] = {
            "export": str(export), "head": mc.head, "shards": list(cfg.shards), "protocol": protocol,
            "protocol_from": "the shards" if cfg.protocol == "auto" else "protocol=",
            "device": str(device), "dtype": "bf16" if bf16 else "fp32", "world_size": du.world_size(),
            "n_videos": len(emb["items"]), "missing_videos": _missing_videos(list(cfg.shards)),
            "frames": fit, "model": {"num_frames": mc.num_frames, "frame_size": mc.frame_size,
                                     "max_words": mc.max_words},
        }
        skipped = {k: v for k, v in loader.stats.items() if v and ("corrupt" in k or "missing" in k or "damaged" in k)}
        if skipped:
            results["skipped_while_reading"] = skipped
        if du.is_main():
            print(f"ptrain eval: {export} (head {mc.head}, {mc.num_frames} frames) on {len(emb['items'])} videos, "
                  f"protocol {protocol} ({results['protocol_from']}), {device}")
            if skipped:
                print(f"  skipped while reading: {skipped}")
        results["all"] = retrieval(model, emb, protocol, dsl=dsl, bank=bank)
        if caption_filter:
            results["filtered"] = retrieval(model, emb, protocol, caption_filter, dsl=dsl, bank=bank)
    results["_emb"] = emb
    return results


def retrieval_on_export(export, shards: list[str], cfg) -> dict[str, Any]:
    """Load ``export`` on this rank's device and score ``shards`` (every rank takes part; the fine-tune's final test)."""
    from ptrain.model.api import load

    device = du.device()
    model = load(export, map_location=device)
    results = score_export(model, export, device, _Shards(cfg, shards))
    results.pop("_emb")
    return results


class _Shards:
    """An eval section with its shards given apart (``score_export`` reads ``cfg.shards``)."""

    def __init__(self, section, shards: list[str]):
        self._section, self.shards = section, list(shards)

    def __getattr__(self, name):
        return getattr(self._section, name)


def evaluate(cfg: EvalConfig, reversed_too: bool = False) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """Embed ``cfg.shards`` with ``cfg.export``, print the retrieval tables and return ``(results, model, emb)``:
    the model and the embeddings (``embed``'s dict, ``reversed_too``: with the reversed clips) are for callers
    that score more on them (``ptrain_demo.eval``'s direction probe)."""
    from ptrain.checkpoint import find_export
    from ptrain.model.api import load

    t0 = time.perf_counter()
    if du.launched():
        du.init()
    export = find_export(cfg.export)
    device = _device(cfg.device)
    model = load(export, map_location=device, dtype=torch.bfloat16 if cfg.dtype == "bf16" else None)
    results = score_export(model, export, device, cfg, reversed_too=reversed_too)
    emb = results.pop("_emb")
    results["seconds"] = round(time.perf_counter() - t0, 3)
    if du.is_main():
        _print_table("all captions", results["all"], results["protocol"])
        if cfg.caption_filter:
            _print_table(f"captions matching {cfg.caption_filter!r}", results["filtered"], results["protocol"])
    return results, model, emb


def write_results(out: str, results: dict[str, Any]) -> None:
    """``out`` (a .json file, or a directory: ``out/results.json``) and ``results.md`` beside it; '' = nowhere."""
    if not out or not du.is_main():
        return
    path = Path(out)
    if path.suffix != ".json":
        path = path / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=float))
    path.with_suffix(".md").write_text(markdown(results))


def run(cfg: EvalConfig, reversed_too: bool = False, extra=None) -> int:
    """``ptrain eval``: evaluate, print, write; ``extra(results, model, emb)`` may add to the results (the demo's
    probe). A bad input (missing export or shards, shards that do not fit) is one line and exit status 2."""
    import sys

    try:
        results, model, emb = evaluate(cfg, reversed_too=reversed_too)
        if extra is not None:
            extra(results, model, emb)
    except (ValueError, FileNotFoundError) as e:
        print(f"ptrain eval: {e}", file=sys.stderr)
        return 2
    write_results(cfg.out, results)
    return 0
