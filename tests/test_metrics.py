"""ptrain.metrics on hand-built matrices: known ranks, ties, multi-caption protocols, DSL, chunking.

`_reference_compute_metrics` and `_reference_multi_caption` re-state the CLIP4Clip / CLIP2Video
evaluation (research notes §4) so tie-free results can be checked against the reference protocol.
"""

import tracemalloc

import numpy as np
import pytest
import torch

from ptrain.metrics import (
    chunked_similarity,
    dual_softmax,
    join_captions_per_video,
    ranks,
    retrieval_metrics,
    text_to_video_index,
)


def _reference_compute_metrics(x):
    """CLIP4Clip metrics.compute_metrics: rank by value equality in the sorted row (0-based)."""
    sx = np.sort(-x, axis=1)
    d = np.diag(-x)[:, None]
    ind = np.where(sx - d == 0)[1]
    return {
        "R1": 100 * np.mean(ind == 0),
        "R5": 100 * np.mean(ind < 5),
        "R10": 100 * np.mean(ind < 10),
        "MdR": np.median(ind) + 1,
        "MnR": np.mean(ind) + 1,
        "n_ranks": len(ind),
    }


def _reference_multi_caption(sim_TV, t2v):
    """CLIP2Video multi-sentence eval: t2v = rank of own video per caption (argsort-of-argsort);
    v2t = compute_metrics on the video x caption-group matrix scored by each group's best caption."""
    order = np.argsort(np.argsort(-sim_TV, axis=1, kind="stable"), axis=1, kind="stable")
    t2v_ranks = order[np.arange(len(t2v)), t2v] + 1
    n_video = sim_TV.shape[1]
    group_VV = np.stack([sim_TV[t2v == g].max(axis=0) for g in range(n_video)])  # [group, video]
    return t2v_ranks, _reference_compute_metrics(group_VV.T)


KEYS = ("R1", "R5", "R10", "MdR", "MnR")


def _pick(metrics, prefix):
    return {k: metrics[prefix + k] for k in KEYS}


def test_perfect_diagonal():
    sim = np.eye(7, dtype=np.float32) + 0.01 * np.arange(49, dtype=np.float32).reshape(7, 7) / 49
    m = retrieval_metrics(sim)
    for prefix in ("t2v_", "v2t_", "v2t_strict_"):
        assert _pick(m, prefix) == {"R1": 100.0, "R5": 100.0, "R10": 100.0, "MdR": 1.0, "MnR": 1.0}
    assert (m["n_text"], m["n_video"], m["n_v2t_queries"]) == (7, 7, 7)


# Rows are texts, columns videos, ground truth on the diagonal; no ties anywhere.
KNOWN = np.array(
    [
        [0.9, 0.1, 0.2, 0.3],  # t2v rank 1
        [0.8, 0.5, 0.7, 0.1],  # 0.8, 0.7 above 0.5 -> rank 3
        [0.3, 0.2, 0.1, 0.4],  # rank 4
        [0.0, 0.6, 0.05, 0.5],  # 0.6 above -> rank 2
    ],
    dtype=np.float32,
)


def test_known_ranks():
    assert ranks(KNOWN).tolist() == [1, 3, 4, 2]
    assert ranks(KNOWN.T).tolist() == [1, 2, 3, 1]  # columns: v2t
    m = retrieval_metrics(KNOWN, ks=(1, 2, 5))
    assert _pick_k(m, "t2v_", (1, 2, 5)) == {"R1": 25.0, "R2": 50.0, "R5": 100.0, "MdR": 2.5, "MnR": 2.5}
    assert _pick_k(m, "v2t_", (1, 2, 5)) == {"R1": 50.0, "R2": 75.0, "R5": 100.0, "MdR": 1.5, "MnR": 1.75}
    # Same as the reference protocol when there are no ties.
    ref = _reference_compute_metrics(KNOWN)
    assert (ref["R1"], ref["MdR"], ref["MnR"]) == (25.0, 2.5, 2.5)


def _pick_k(metrics, prefix, ks):
    out = {f"R{k}": metrics[f"{prefix}R{k}"] for k in ks}
    out.update(MdR=metrics[prefix + "MdR"], MnR=metrics[prefix + "MnR"])
    return out


def test_random_tie_free_matches_reference():
    rng = np.random.default_rng(0)
    sim = rng.standard_normal((60, 60)) + 2 * np.eye(60)
    m = retrieval_metrics(sim, chunk_size=7)
    for prefix, x in (("t2v_", sim), ("v2t_", sim.T)):
        ref = _reference_compute_metrics(x)
        assert _pick(m, prefix) == pytest.approx({k: ref[k] for k in KEYS})


def test_ties_each_policy_and_the_reference_miscount():
    collapsed = np.ones((4, 4), dtype=np.float32)  # a collapsed model: every score equal
    pes = retrieval_metrics(collapsed)
    opt = retrieval_metrics(collapsed, ties="optimistic")
    mean = retrieval_metrics(collapsed, ties="mean")
    assert _pick(pes, "t2v_") == {"R1": 0.0, "R5": 100.0, "R10": 100.0, "MdR": 4.0, "MnR": 4.0}
    assert _pick(opt, "t2v_") == {"R1": 100.0, "R5": 100.0, "R10": 100.0, "MdR": 1.0, "MnR": 1.0}
    # mean: expected rank (1+4)/2; R@1 is the expected recall 1/4 under a random tie order.
    assert _pick(mean, "t2v_") == {"R1": 25.0, "R5": 100.0, "R10": 100.0, "MdR": 2.5, "MnR": 2.5}
    # The reference finds the GT value at every tied position: 16 ranks for 4 queries.
    assert _reference_compute_metrics(collapsed)["n_ranks"] == 16

    # One partial tie: the positive (0.5) ties with two negatives, one negative (0.9) is above it.
    sim = np.array([[0.5, 0.5, 0.9, 0.5, 0.1], *np.eye(5)[1:]], dtype=np.float32)
    assert ranks(sim, ties="pessimistic")[0] == 4
    assert ranks(sim, ties="optimistic")[0] == 2
    assert ranks(sim, ties="mean")[0] == 3
    m = retrieval_metrics(sim, ties="mean", ks=(1, 2, 3, 4))
    # Query 0's rank is uniform on {2, 3, 4}; the other four queries are rank 1 (ties with zeros
    # don't touch the positive 1.0).
    assert m["t2v_R1"] == pytest.approx(80.0)
    assert m["t2v_R2"] == pytest.approx(100 * (4 + 1 / 3) / 5)
    assert m["t2v_R3"] == pytest.approx(100 * (4 + 2 / 3) / 5)
    assert m["t2v_R4"] == pytest.approx(100.0)
    ref = _reference_compute_metrics(sim)
    assert ref["n_ranks"] == 7  # 3 hits for query 0: 7 "ranks" for 5 queries
    assert ref["R1"] == pytest.approx(400 / 7)  # while 4 of 5 queries are truly rank 1
    for ties in ("pessimistic", "optimistic", "mean"):
        assert retrieval_metrics(sim, ties=ties)["t2v_R1"] == 80.0


# Captions 0,1 -> video 0; caption 2 -> video 1; captions 3,4 -> video 2.
MULTI_T2V = np.array([0, 0, 1, 2, 2])
MULTI = np.array(
    [
        [0.9, 0.1, 0.2],  # cap0 (v0): t2v rank 1
        [0.3, 0.4, 0.1],  # cap1 (v0): rank 2
        [0.2, 0.5, 0.6],  # cap2 (v1): rank 2
        [0.1, 0.7, 0.3],  # cap3 (v2): rank 2
        [0.7, 0.8, 0.05],  # cap4 (v2): rank 3
    ],
    dtype=np.float32,
)


def test_multi_caption_lenient_vs_strict_by_hand():
    m = retrieval_metrics(MULTI, MULTI_T2V, ks=(1, 2, 5))
    assert _pick_k(m, "t2v_", (1, 2, 5)) == pytest.approx({"R1": 20.0, "R2": 80.0, "R5": 100.0, "MdR": 2.0, "MnR": 2.0})
    # Lenient (CLIP4Clip): video 1's column is [0.1, 0.4, 0.5, 0.7, 0.8]; group scores v0 0.4, v1 0.5,
    # v2 max(0.7, 0.8) = 0.8 -> one group above -> rank 2. Video 0 -> 1, video 2 -> 2 (group v1 0.6 > 0.3).
    assert _pick_k(m, "v2t_", (1, 2, 5)) == pytest.approx({"R1": 100 / 3, "R2": 100.0, "R5": 100.0, "MdR": 2.0, "MnR": 5 / 3})
    # Strict: for video 1 captions 3 (0.7) and 4 (0.8) both beat its caption (0.5) -> rank 3.
    assert _pick_k(m, "v2t_strict_", (1, 2, 5)) == pytest.approx(
        {"R1": 100 / 3, "R2": 200 / 3, "R5": 100.0, "MdR": 2.0, "MnR": 2.0}
    )
    assert (m["n_text"], m["n_video"], m["n_v2t_queries"]) == (5, 3, 3)


def test_multi_caption_matches_reference_protocol_on_random_data():
    rng = np.random.default_rng(1)
    t2v = np.concatenate([np.full(rng.integers(1, 6), v) for v in range(40)])
    rng.shuffle(t2v)  # captions of one video need not be contiguous
    sim = rng.standard_normal((len(t2v), 40)) + 1.5 * np.eye(40)[t2v]
    m = retrieval_metrics(sim, t2v, chunk_size=5)
    ref_t2v_ranks, ref_v2t = _reference_multi_caption(sim, t2v)
    assert m["t2v_R1"] == pytest.approx(100 * np.mean(ref_t2v_ranks == 1))
    assert m["t2v_MnR"] == pytest.approx(ref_t2v_ranks.mean())
    assert m["t2v_MdR"] == pytest.approx(np.median(ref_t2v_ranks))
    assert _pick(m, "v2t_") == pytest.approx({k: ref_v2t[k] for k in KEYS})
    assert m["v2t_strict_MnR"] >= m["v2t_MnR"]  # strict can only rank lower


def test_video_without_captions_is_a_t2v_distractor_only():
    sim = np.concatenate([MULTI, np.full((5, 1), 0.65, dtype=np.float32)], axis=1)  # video 3: no caption
    m = retrieval_metrics(sim, MULTI_T2V)
    assert m["n_v2t_queries"] == 3 and m["n_video"] == 4
    assert m["t2v_MnR"] > retrieval_metrics(MULTI, MULTI_T2V)["t2v_MnR"]  # the distractor beats some positives


def test_dsl_changes_numbers_and_reports_both():
    # Video 1 is a "hub": it scores 12 with every caption, above every true pair (10).
    sim = 10 * np.eye(4, dtype=np.float32)
    sim[:, 1] = 12.0
    raw = retrieval_metrics(sim)
    both = retrieval_metrics(sim, dsl=True)
    assert raw["t2v_R1"] == 25.0
    assert both["dsl_t2v_R1"] == 100.0  # the hub's score is spread over all captions by the softmax
    assert {k: both[k] for k in raw} == raw  # the raw numbers are unchanged and still reported
    assert {k[4:] for k in both if k.startswith("dsl_")} == {k for k in raw if k[:3] in ("t2v", "v2t")}


def test_dual_softmax_formula_numpy_and_torch():
    rng = np.random.default_rng(2)
    sim = rng.standard_normal((6, 5)).astype(np.float32) * 5
    t = torch.from_numpy(sim)
    for axis in (0, 1):
        expected = (t * torch.softmax(t / 0.5, dim=axis) * t.shape[axis]).numpy()
        np.testing.assert_allclose(dual_softmax(sim, 0.5, axis=axis), expected, rtol=1e-5, atol=1e-6)
        assert isinstance(dual_softmax(t, 0.5, axis=axis), torch.Tensor)
    with pytest.raises(ValueError, match="temperature"):
        dual_softmax(sim, 0.0)


def test_chunked_similarity_equals_unchunked():
    rng = np.random.default_rng(3)
    text = torch.from_numpy(rng.standard_normal((23, 8)).astype(np.float32))
    video = torch.from_numpy(rng.standard_normal((17, 4, 8)).astype(np.float32))
    mask = torch.from_numpy((rng.random((17, 4)) > 0.3).astype(np.float32))

    def cross(text_block, video_block):
        # A cross-encoder-like score that needs both blocks (masked mean of frame-text products).
        v, m = video_block["frames"], video_block["mask"]
        per_frame = torch.einsum("td,vfd->tvf", text_block, v)
        return (per_frame * m[None]).sum(-1) / m.sum(-1).clamp(min=1)[None]

    full = cross(text, {"frames": video, "mask": mask}).numpy()
    for ct, cv in ((1, 1), (5, 3), (7, 100), (100, 100)):
        got = chunked_similarity(text, {"frames": video, "mask": mask}, cross, ct, cv)
        assert got.shape == (23, 17) and got.dtype == np.float32
        np.testing.assert_allclose(got, full, rtol=1e-6, atol=1e-6)
    # Tuples of numpy arrays work too; a wrong block shape is a clear error.
    t_np, v_np = text.numpy(), video.numpy().mean(1)
    got = chunked_similarity((t_np,), (v_np,), lambda a, b: a[0] @ b[0].T, 4, 6)
    np.testing.assert_allclose(got, t_np @ v_np.T, rtol=1e-5, atol=1e-5)
    # A list is rows (e.g. raw captions for a scorer that encodes text itself).
    captions = [f"caption {i}" for i in range(5)]
    got = chunked_similarity(captions, v_np[:3], lambda c, v: np.full((len(c), len(v)), float(len(c[0]))), 2, 2)
    assert got.shape == (5, 3) and got[0, 0] == len("caption 0")
    with pytest.raises(ValueError, match="sim_fn returned shape"):
        chunked_similarity(t_np, v_np, lambda a, b: a @ b.T[:, :1], 4, 6)


def test_chunk_size_does_not_change_metrics():
    rng = np.random.default_rng(4)
    t2v = rng.integers(0, 30, 90)
    sim = np.round(rng.standard_normal((90, 30)), 1)  # rounding creates many ties
    for ties in ("pessimistic", "optimistic", "mean"):
        base = retrieval_metrics(sim, t2v, ties=ties, dsl=True)
        for chunk in (1, 4, 1000):
            assert retrieval_metrics(sim, t2v, ties=ties, dsl=True, chunk_size=chunk) == base


def test_rank_memory_is_bounded_on_10k_by_10k():
    """10k x 10k float32 is 400 MB; computing every protocol allocates only chunk-sized temporaries."""
    rng = np.random.default_rng(5)
    sim = rng.random((10_000, 10_000), dtype=np.float32)
    t2v = rng.integers(0, 2_000, 10_000)
    tracemalloc.start()
    try:
        m = retrieval_metrics(sim)
        _, peak_single = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        m_multi = retrieval_metrics(sim[:, :2_000], t2v)  # exercises the lenient group-max path
        _, peak_multi = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert m["n_text"] == 10_000 and m_multi["n_v2t_queries"] <= 2_000
    assert 1 <= m["t2v_MnR"] <= 10_000
    assert peak_single < 64 * 2**20 and peak_multi < 64 * 2**20, (peak_single, peak_multi)


def test_torch_and_low_precision_inputs():
    sim = torch.from_numpy(KNOWN).to(torch.bfloat16)
    assert retrieval_metrics(sim)["t2v_MnR"] == retrieval_metrics(sim.float().numpy())["t2v_MnR"]
    assert retrieval_metrics(torch.from_numpy(MULTI), torch.from_numpy(MULTI_T2V))["v2t_strict_MnR"] == 2.0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="square"):
        retrieval_metrics(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(np.zeros((3, 2)), [0, 1, 2])
    with pytest.raises(ValueError, match="one entry per text row"):
        retrieval_metrics(np.zeros((3, 2)), [0, 1])
    with pytest.raises(ValueError, match="ties"):
        retrieval_metrics(np.eye(3), ties="random")
    nan = np.eye(3)
    nan[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(nan)
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(np.zeros(3))


def test_paragraph_helpers():
    captions = [" a man opens a door ", "he walks in", "a dog barks", "then leaves.", "the dog sleeps"]
    vids = ["v1", "v1", "v2", "v1", "v2"]
    order, paragraphs = join_captions_per_video(captions, vids)
    assert order == ["v1", "v2"]
    assert paragraphs == ["a man opens a door he walks in then leaves.", "a dog barks the dog sleeps"]
    t2v, gallery = text_to_video_index(vids, ["v0", "v1", "v2"])
    assert t2v.tolist() == [1, 1, 2, 1, 2] and gallery == ["v0", "v1", "v2"]
    assert text_to_video_index(vids)[0].tolist() == [0, 0, 1, 0, 1]
    with pytest.raises(ValueError, match="absent from video_ids"):
        text_to_video_index(vids, ["v1"])
    with pytest.raises(ValueError, match="one video id per caption"):
        join_captions_per_video(captions, vids[:2])
    # Paragraph retrieval is the plain metric on the paragraph x video matrix (diagonal ground truth).
    sim = np.array([[0.9, 0.2], [0.3, 0.8]])
    assert retrieval_metrics(sim)["t2v_R1"] == 100.0
