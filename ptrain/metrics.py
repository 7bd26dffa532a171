"""Text-video retrieval metrics: R@K, median and mean rank, multi-caption protocols, DSL.

Usage:
    from ptrain.metrics import retrieval_metrics, chunked_similarity, text_to_video_index
    t2v_T, video_ids = text_to_video_index(caption_video_ids)          # caption i -> video column
    sim_TV = chunked_similarity(text_feats, video_feats, model.similarity, 1024, 1024)
    m = retrieval_metrics(sim_TV, t2v_T)            # {"t2v_R1": ..., "v2t_R1": ..., "v2t_strict_R1": ...}
    m = retrieval_metrics(sim_TV, t2v_T, dsl=True)  # raw numbers plus "dsl_*" numbers, side by side

Shapes: ``sim_TV`` [N_text, N_video], scores (higher = more similar); ``t2v_T`` int [N_text].

Protocols (docs/metrics.md has the long form and a worked example):
- Ranks are 1-based and every query gets exactly one rank: 1 + (negatives scoring above the best
  positive) + a tie term. ``ties="pessimistic"`` (default) counts every negative tied with the
  positive as ranked above it, so ties can never inflate a number and a collapsed model (all scores
  equal) scores R@1 = 0 instead of 100; ``"optimistic"`` counts none; ``"mean"`` gives the expected
  rank under a uniformly random tie order (R@K is then the expected recall). The CLIP4Clip reference
  finds the rank by value equality in the sorted row, so a tied query contributes several ranks
  (and a NaN one none): its denominator is not N_query. With no ties all policies agree with it.
- t2v: every caption is a query over the N_video gallery; its positive is video ``t2v_T[i]``.
- v2t (lenient, the CLIP4Clip/CLIP2Video protocol, keys ``v2t_*``): each video scores every video's
  caption group by the group's best caption; the rank is that of its own group among the groups.
- v2t strict (keys ``v2t_strict_*``, the COCO image-to-text protocol): rank of the video's
  best-ranked own caption among ALL N_text captions, so every other caption competes on its own.
  With one caption per video both equal the plain v2t rank.
- R@K is a percentage (as in the papers); MdR is ``np.median`` of the ranks (the two middle ranks
  averaged; the reference's multi-caption t2v takes the lower one); MnR is their mean.
- Videos without any caption are t2v distractors and are not v2t queries.
- Paragraph retrieval (ActivityNet, DiDeMo) is the same metric on the paragraph x video matrix:
  build the paragraphs with :func:`join_captions_per_video`.

Memory: ranks are computed per chunk of query rows by comparing against the positive's score (no
argsort, no copy of the matrix): extra memory is O(chunk x N_gallery), ~20 MB by default.
This module imports numpy only; torch tensors are accepted and torch is imported lazily.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

TIE_POLICIES = ("pessimistic", "optimistic", "mean")
# Elements per chunk of the query x gallery comparisons: ~2M keeps temporaries near 20 MB.
_CHUNK_ELEMENTS = 1 << 21


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """A numpy view of an array or (CPU/GPU, any float dtype) torch tensor."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()  # numpy has no bf16; fp16 -> fp32 is exact, so ties are preserved
        x = x.cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [N_text, N_video] score matrix, got shape {arr.shape}.")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    return arr


def _auto_chunk(chunk_size: int | None, n_gallery: int) -> int:
    if chunk_size is None:
        return max(1, _CHUNK_ELEMENTS // max(n_gallery, 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    return chunk_size


def _check_finite_block(block: np.ndarray, what: str) -> None:
    if np.isnan(block).any():
        raise ValueError(
            f"{what} contains NaN; ranks would be undefined. The features or logits are not finite: "
            f"check the model (e.g. fp16 overflow) before evaluating."
        )


def _row_rank_counts(sim_QG: np.ndarray, pos_Q: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query row: gallery items scoring strictly above / tied with its one positive column.

    Compares each row chunk with the positive's score (no sort): extra memory O(chunk x N_gallery).
    """
    n_query = len(pos_Q)
    above_Q = np.zeros(n_query, dtype=np.int64)
    tied_Q = np.zeros(n_query, dtype=np.int64)
    for q0 in range(0, n_query, chunk):
        q1 = min(q0 + chunk, n_query)
        block_CG = sim_QG[q0:q1]
        _check_finite_block(block_CG, "the score matrix")
        pos_C1 = block_CG[np.arange(q1 - q0), pos_Q[q0:q1]][:, None]
        above_Q[q0:q1] = (block_CG > pos_C1).sum(axis=1)
        tied_Q[q0:q1] = (block_CG == pos_C1).sum(axis=1) - 1  # minus the positive itself
    return above_Q, tied_Q


def _summarise(above_Q: np.ndarray, tied_Q: np.ndarray, ties: str, ks: Sequence[int], prefix: str) -> dict:
    """R@K (percent), MdR, MnR from the per-query counts under a tie policy."""
    if ties == "optimistic":
        ranks_Q = 1.0 + above_Q
    elif ties == "pessimistic":
        ranks_Q = 1.0 + above_Q + tied_Q
    else:  # mean: the positive is uniformly placed among its ties
        ranks_Q = 1.0 + above_Q + tied_Q / 2.0
    out = {}
    for k in ks:
        if ties == "mean":
            # P(rank <= k) with rank uniform on {above+1, ..., above+tied+1}.
            hit_Q = np.clip((k - above_Q) / (tied_Q + 1.0), 0.0, 1.0)
        else:
            hit_Q = (ranks_Q <= k).astype(np.float64)
        out[f"{prefix}R{k}"] = float(100.0 * hit_Q.mean()) if len(hit_Q) else float("nan")
    out[f"{prefix}MdR"] = float(np.median(ranks_Q)) if len(ranks_Q) else float("nan")
    out[f"{prefix}MnR"] = float(ranks_Q.mean()) if len(ranks_Q) else float("nan")
    return out


def ranks(sim_QG, positive_Q=None, *, ties: str = "pessimistic", chunk_size: int | None = None) -> np.ndarray:
    """1-based rank of each query's positive gallery item (float; "mean" ties give halves).

    ``sim_QG`` [N_query, N_gallery]; ``positive_Q`` int [N_query], default the diagonal.
    """
    sim = _to_numpy(sim_QG, "sim_QG")
    n_query, n_gallery = sim.shape
    pos_Q = np.arange(n_query) if positive_Q is None else _check_index(positive_Q, n_query, n_gallery, "positive_Q")
    if ties not in TIE_POLICIES:
        raise ValueError(f"ties must be one of {TIE_POLICIES}, got {ties!r}.")
    above, tied = _row_rank_counts(sim, pos_Q, _auto_chunk(chunk_size, n_gallery))
    tie_term = {"optimistic": 0.0, "pessimistic": 1.0, "mean": 0.5}[ties]
    return 1.0 + above + tie_term * tied


def _check_index(index, n_query: int, n_gallery: int, name: str) -> np.ndarray:
    idx = _to_numpy_1d(index)
    if idx.shape != (n_query,):
        raise ValueError(f"{name} must have one entry per text row ({n_query}), got shape {idx.shape}.")
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"{name} must hold integer video indices, got dtype {idx.dtype}.")
    if n_query and (idx.min() < 0 or idx.max() >= n_gallery):
        raise ValueError(
            f"{name} holds video indices outside [0, {n_gallery}) (min {idx.min()}, max {idx.max()}); "
            f"it must index the columns of the similarity matrix."
        )
    return idx.astype(np.int64, copy=False)


def _to_numpy_1d(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def retrieval_metrics(
    sim_TV,
    text_to_video=None,
    *,
    ties: str = "pessimistic",
    ks: Sequence[int] = (1, 5, 10),
    dsl: bool = False,
    dsl_temperature: float = 1.0,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """t2v, v2t (lenient = CLIP4Clip) and v2t_strict R@K / MdR / MnR of a [N_text, N_video] score matrix.

    ``text_to_video``: int [N_text], caption i belongs to video column ``text_to_video[i]``; None means
    one caption per video with ground truth on the diagonal. ``dsl=True`` adds the same metrics on the
    dual-softmax re-weighted matrix under ``dsl_`` keys (the raw numbers are always returned).
    Also returns ``n_text``, ``n_video`` and ``n_v2t_queries`` (videos with at least one caption).
    """
    sim = _to_numpy(sim_TV, "sim_TV")
    n_text, n_video = sim.shape
    if ties not in TIE_POLICIES:
        raise ValueError(f"ties must be one of {TIE_POLICIES}, got {ties!r}.")
    if text_to_video is None:
        if n_text != n_video:
            raise ValueError(
                f"sim_TV is {n_text}x{n_video}: without text_to_video the ground truth is the diagonal, "
                f"which needs a square matrix. Pass text_to_video (caption i -> video column)."
            )
        t2v_T = np.arange(n_text)
    else:
        t2v_T = _check_index(text_to_video, n_text, n_video, "text_to_video")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers like (1, 5, 10), got {ks!r}.")

    out: dict[str, float] = {"n_text": n_text, "n_video": n_video}
    out.update(_all_protocols(sim, t2v_T, ties, ks, chunk_size, prefix=""))
    if dsl:
        # DSL's prior runs over the query axis, so each direction gets its own re-weighting.
        dsl_t2v = dual_softmax(sim, dsl_temperature, axis=0)
        dsl_v2t = dual_softmax(sim, dsl_temperature, axis=1)
        out.update(_all_protocols(dsl_t2v, t2v_T, ties, ks, chunk_size, prefix="dsl_", only="t2v"))
        del dsl_t2v
        out.update(_all_protocols(dsl_v2t, t2v_T, ties, ks, chunk_size, prefix="dsl_", only="v2t"))
    return out


def _all_protocols(sim, t2v_T, ties, ks, chunk_size, prefix, only=None) -> dict[str, float]:
    n_text, n_video = sim.shape
    out: dict[str, float] = {}
    if only in (None, "t2v"):
        # t2v: every caption row is a query; its one positive is its video's column.
        counts = _row_rank_counts(sim, t2v_T, _auto_chunk(chunk_size, n_video))
        out.update(_summarise(*counts, ties, ks, prefix + "t2v_"))
    if only in (None, "v2t"):
        videos_with_text = np.unique(t2v_T)
        out["n_v2t_queries"] = int(len(videos_with_text))
        chunk = _auto_chunk(chunk_size, n_video)
        strict = _v2t_counts(sim, t2v_T, chunk, lenient=False)
        # With one caption per video the groups are single captions: lenient == strict.
        lenient = strict if len(videos_with_text) == n_text else _v2t_counts(sim, t2v_T, chunk, lenient=True)
        out.update(_summarise(*(c[videos_with_text] for c in lenient), ties, ks, prefix + "v2t_"))
        out.update(_summarise(*(c[videos_with_text] for c in strict), ties, ks, prefix + "v2t_strict_"))
    return out


def _v2t_counts(sim_TV: np.ndarray, t2v_T: np.ndarray, chunk: int, lenient: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per video column: competitors scoring above / tied with the video's best own caption.

    Strict: competitors are the other videos' captions. Lenient: they are the other videos'
    caption groups, a group counting once if any of its captions is above (tied: none above and
    one equal), i.e. the group scored by its best caption. Streams over row chunks of whole
    groups, so memory access is contiguous and nothing of size [N_video, N_video] is built.
    """
    n_text, n_video = sim_TV.shape
    above_V = np.zeros(n_video, dtype=np.int64)
    tied_V = np.zeros(n_video, dtype=np.int64)
    if n_text == 0:
        return above_V, tied_V
    pos_T = sim_TV[np.arange(n_text), t2v_T]
    best_V = np.full(n_video, -np.inf, dtype=sim_TV.dtype)
    np.maximum.at(best_V, t2v_T, pos_T)  # the best own caption's score of every video
    order_T = np.argsort(t2v_T, kind="stable")  # captions grouped by video
    _, group_starts = np.unique(t2v_T[order_T], return_index=True)
    bounds = [*group_starts.tolist(), n_text]
    g = 0
    while g < len(group_starts):
        # A chunk is a run of whole groups with about `chunk` captions (at least one group).
        g_end = g + 1
        while g_end < len(group_starts) and bounds[g_end + 1] - bounds[g] <= chunk:
            g_end += 1
        r0, r1 = bounds[g], bounds[g_end]
        rows_C = order_T[r0:r1]
        block_CV = sim_TV[rows_C]
        _check_finite_block(block_CV, "sim_TV")
        above_CV = block_CV > best_V[None, :]
        tied_CV = block_CV == best_V[None, :]
        # A video's own captions are positives, never competitors.
        own_C = t2v_T[rows_C]
        above_CV[np.arange(len(rows_C)), own_C] = False
        tied_CV[np.arange(len(rows_C)), own_C] = False
        if lenient:
            starts = np.asarray(bounds[g:g_end]) - r0
            above_CV = np.logical_or.reduceat(above_CV, starts, axis=0)
            tied_CV = np.logical_or.reduceat(tied_CV, starts, axis=0) & ~above_CV
        above_V += above_CV.sum(axis=0)
        tied_V += tied_CV.sum(axis=0)
        g = g_end
    return above_V, tied_V


def dual_softmax(sim, temperature: float = 1.0, axis: int = 0):
    """CAMoE's dual softmax: S * softmax(S / temperature, over ``axis``) * S.shape[axis].

    ``axis`` is the QUERY axis: 0 for t2v on [N_text, N_video] (each video's preference among all
    test captions re-weights the caption's scores), 1 for v2t. Transductive: it needs every query
    at once and assumes roughly one query per gallery item, so report it beside the raw numbers.
    Takes logits as the model scores them (CAMoE used temperature 1 on CLIP-scaled logits).
    Returns the same kind (numpy array or torch tensor) as given.
    """
    if temperature <= 0:
        raise ValueError(f"dual_softmax temperature must be > 0, got {temperature}.")
    if axis not in (0, 1):
        raise ValueError(f"axis must be 0 (t2v: softmax over texts) or 1 (v2t: softmax over videos), got {axis}.")
    if hasattr(sim, "detach"):
        import torch

        with torch.no_grad():
            return sim * torch.softmax(sim / temperature, dim=axis) * sim.shape[axis]
    s = _to_numpy(sim, "sim")
    dtype = np.result_type(s.dtype, np.float32)
    out = np.empty(s.shape, dtype=dtype)
    n = s.shape[axis]
    # Row blocks only (contiguous); a softmax over rows needs the column max and sum first.
    step = max(1, _CHUNK_ELEMENTS // max(s.shape[1], 1))
    blocks = [slice(r0, r0 + step) for r0 in range(0, s.shape[0], step)]
    if axis == 1:
        for rows in blocks:
            block = s[rows].astype(dtype, copy=False)
            e = np.exp((block - block.max(axis=1, keepdims=True)) / temperature)
            out[rows] = block * (e * (n / e.sum(axis=1, keepdims=True)))
        return out
    col_max = np.full(s.shape[1], -np.inf, dtype=dtype)
    for rows in blocks:
        np.maximum(col_max, s[rows].max(axis=0), out=col_max)
    col_sum = np.zeros(s.shape[1], dtype=np.float64)
    for rows in blocks:
        out[rows] = np.exp((s[rows].astype(dtype, copy=False) - col_max) / temperature)
        col_sum += out[rows].sum(axis=0, dtype=np.float64)
    scale = (n / col_sum).astype(dtype)
    for rows in blocks:
        out[rows] *= s[rows]
        out[rows] *= scale
    return out


def qb_norm(sim_QG, bank_BG, beta: float = 20.0, k: int = 1) -> np.ndarray:
    """Querybank normalisation with the dynamic inverted softmax (Bogolin et al., CVPR 2022), for text->video.

    ``bank_BG`` scores a bank of queries that are not the test queries (e.g. training captions) against the same
    gallery. A gallery item is *activated* when it is among the top-``k`` results of some bank query. A test
    query whose own top-``k`` touches an activated item is scored by the inverted softmax over the bank,
    ``beta * S[q, g] - logsumexp_b(beta * bank[b, g])``, which lowers gallery items that are close to everything
    (hubs); other queries keep their raw scores. Rows are re-scored as a whole, so text->video ranks are
    comparable; video->text numbers of the result mean nothing. ``beta`` applies to the scores as given (20 for
    cosine similarities, as in the paper)."""
    s = _to_numpy(sim_QG, "sim_QG").astype(np.float64)
    b = _to_numpy(bank_BG, "bank_BG").astype(np.float64)
    if s.shape[1] != b.shape[1]:
        raise ValueError(f"qb_norm: the bank scores {b.shape[1]} gallery items, the queries {s.shape[1]}")
    if k < 1 or beta <= 0:
        raise ValueError(f"qb_norm needs k >= 1 and beta > 0, got k={k}, beta={beta}")
    kk = min(k, s.shape[1])
    activated = np.zeros(s.shape[1], dtype=bool)
    activated[np.argpartition(-b, kk - 1, axis=1)[:, :kk].ravel()] = True
    z = beta * b
    lse_G = z.max(axis=0) + np.log(np.exp(z - z.max(axis=0)).sum(axis=0))
    hit_Q = activated[np.argpartition(-s, kk - 1, axis=1)[:, :kk]].any(axis=1)
    out = s.copy()
    out[hit_Q] = beta * s[hit_Q] - lse_G
    return out


def _slice_rows(feats, i0: int, i1: int):
    """Rows i0:i1 of an array/tensor/list, or of every member of a tuple or dict of them."""
    if isinstance(feats, dict):
        return {k: v[i0:i1] for k, v in feats.items()}
    if isinstance(feats, tuple):
        return tuple(v[i0:i1] for v in feats)
    return feats[i0:i1]


def _num_rows(feats, name: str) -> int:
    leaves = list(feats.values()) if isinstance(feats, dict) else list(feats) if isinstance(feats, tuple) else [feats]
    if not leaves:
        raise ValueError(f"{name} is empty; pass an array/tensor/list or a tuple/dict of them with rows on dim 0.")
    lengths = {len(v) for v in leaves}
    if len(lengths) != 1:
        raise ValueError(f"{name}: every member must have the same number of rows, got {sorted(lengths)}.")
    return lengths.pop()


def chunked_similarity(
    text_feats,
    video_feats,
    sim_fn: Callable[[Any, Any], Any],
    chunk_text: int = 1024,
    chunk_video: int = 1024,
) -> np.ndarray:
    """The [N_text, N_video] float32 score matrix, filled block by block.

    ``text_feats`` / ``video_feats``: arrays, tensors or lists (e.g. raw captions) with rows on dim 0,
    or a tuple/dict of them (e.g. video features and frame masks), sliced together. ``sim_fn(text_block, video_block)``
    returns [chunk_t, chunk_v] scores; it may be a cross-encoder (tightTransf, TAB) since it only ever
    sees one block pair, so peak memory is the matrix plus one block's activations.
    Runs under ``torch.no_grad()`` when torch is importable.
    """
    if chunk_text < 1 or chunk_video < 1:
        raise ValueError(f"chunk_text and chunk_video must be >= 1, got {chunk_text}, {chunk_video}.")
    n_text, n_video = _num_rows(text_feats, "text_feats"), _num_rows(video_feats, "video_feats")
    sim_TV = np.empty((n_text, n_video), dtype=np.float32)
    try:
        import torch

        no_grad = torch.no_grad()
    except ImportError:  # numpy-only callers
        import contextlib

        no_grad = contextlib.nullcontext()
    with no_grad:
        for t0 in range(0, n_text, chunk_text):
            t1 = min(t0 + chunk_text, n_text)
            text_block = _slice_rows(text_feats, t0, t1)
            for v0 in range(0, n_video, chunk_video):
                v1 = min(v0 + chunk_video, n_video)
                block = sim_fn(text_block, _slice_rows(video_feats, v0, v1))
                if hasattr(block, "detach"):
                    block = block.detach().float().cpu().numpy()
                block = np.asarray(block)
                if block.shape != (t1 - t0, v1 - v0):
                    raise ValueError(
                        f"sim_fn returned shape {block.shape} for a block of {t1 - t0} texts x {v1 - v0} "
                        f"videos; it must return [n_text_block, n_video_block] scores."
                    )
                sim_TV[t0:t1, v0:v1] = block
    return sim_TV


def text_to_video_index(caption_video_ids: Sequence[str], video_ids: Sequence[str] | None = None):
    """(text_to_video int64 [N_text], video_ids) for captions labelled by their video id.

    ``video_ids`` fixes the gallery's column order (it may hold distractor videos without captions);
    by default the videos appear in order of first appearance among the captions.
    """
    if video_ids is None:
        video_ids = list(dict.fromkeys(caption_video_ids))
    column = {v: j for j, v in enumerate(video_ids)}
    if len(column) != len(video_ids):
        raise ValueError("video_ids has duplicates; each gallery video must appear once.")
    missing = [v for v in caption_video_ids if v not in column]
    if missing:
        raise ValueError(f"{len(missing)} captions belong to videos absent from video_ids, e.g. {missing[0]!r}.")
    return np.array([column[v] for v in caption_video_ids], dtype=np.int64), list(video_ids)


def join_captions_per_video(
    captions: Sequence[str], caption_video_ids: Sequence[str], sep: str = " "
) -> tuple[list[str], list[str]]:
    """Paragraph retrieval input: (video_ids, paragraphs), one paragraph per video.

    A video's captions are stripped and joined with ``sep`` in their given order (ActivityNet and
    DiDeMo in CLIP4Clip join sentences with a space); videos come in order of first appearance.
    Score paragraphs against videos and call ``retrieval_metrics(sim)`` (diagonal ground truth).
    Pure function. Note: the tokenizer truncates long paragraphs to ``max_words``; the tail is lost.
    """
    if len(captions) != len(caption_video_ids):
        raise ValueError(
            f"captions ({len(captions)}) and caption_video_ids ({len(caption_video_ids)}) must have one "
            f"video id per caption."
        )
    groups: dict[str, list[str]] = {}
    for caption, vid in zip(captions, caption_video_ids):
        groups.setdefault(vid, []).append(caption.strip())
    return list(groups), [sep.join(c for c in caps if c) for caps in groups.values()]
