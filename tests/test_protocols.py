"""The eval protocols on known similarity matrices, checked against ranks worked out by hand: single caption,
multi-caption (lenient and strict video->text), paragraph (R@50), protocol detection, QB-Norm, results.md."""

import numpy as np
import pytest
import torch

from ptrain.evaluate import detect_protocol, markdown, retrieval
from ptrain.metrics import qb_norm


class Fixed:
    """A model whose similarity is a given matrix: features are row / column numbers."""

    is_tight = False

    def __init__(self, sim):
        self.sim = torch.as_tensor(sim, dtype=torch.float32)

    def similarity(self, t, v):
        return self.sim[t[:, 0].long()][:, v[:, 0].long()]

    def logit_scale(self):
        return torch.tensor(1.0)


def ids(n):
    return torch.arange(n, dtype=torch.float32)[:, None]


def test_single_caption_protocol_by_hand():
    # rows: captions of videos 0, 1, 2 (the diagonal). t2v ranks: 1, 3 (0.8 and 0.5 above 0.3), 1
    sim = [[0.9, 0.1, 0.2],
           [0.8, 0.3, 0.5],
           [0.1, 0.6, 0.7]]
    emb = {"text": ids(3), "video": ids(3), "items": [{"text": f"c{i}", "captions": [f"c{i}"], "meta": {}} for i in range(3)]}
    m = retrieval(Fixed(sim), emb, "single")
    assert (m["t2v_R1"], m["t2v_R5"], m["t2v_MdR"], m["t2v_MnR"]) == pytest.approx((200 / 3, 100, 1, 5 / 3))
    # v2t: video 0 column [0.9, 0.8, 0.1] -> its caption first; video 1 [0.1, 0.3, 0.6] -> 2nd; video 2 [.2,.5,.7] -> 1st
    assert (m["v2t_R1"], m["v2t_MdR"], m["v2t_MnR"]) == pytest.approx((200 / 3, 1, 4 / 3))
    assert m["n_text"] == 3 and m["n_video"] == 3 and m["chance_R1"] == pytest.approx(100 / 3)


def test_multi_caption_protocol_by_hand():
    # 5 captions: c0, c1 of video 0; c2 of video 1; c3, c4 of video 2
    sim = np.array([[0.9, 0.1, 0.2],   # c0 -> v0 rank 1
                    [0.2, 0.5, 0.4],   # c1 -> v0 rank 3
                    [0.3, 0.8, 0.1],   # c2 -> v1 rank 1
                    [0.6, 0.2, 0.5],   # c3 -> v2 rank 2
                    [0.1, 0.2, 0.3]])  # c4 -> v2 rank 1
    items = [{"text": "c0", "captions": ["c0", "c1"], "meta": {}}, {"text": "c2", "captions": ["c2"], "meta": {}},
             {"text": "c3", "captions": ["c3", "c4"], "meta": {}}]
    emb = {"captions": ids(5), "caption_video": np.array([0, 0, 1, 2, 2]), "caption_texts": ["c0", "c1", "c2", "c3", "c4"],
           "video": ids(3), "text": ids(3), "items": items}
    assert detect_protocol(items) == "multi"
    m = retrieval(Fixed(sim), emb, "multi")
    assert (m["n_text"], m["t2v_R1"], m["t2v_MdR"], m["t2v_MnR"]) == (5, pytest.approx(60.0), 1, pytest.approx(1.6))
    # v2t lenient: v0 column: own best 0.9 beats every group -> 1; v1: own 0.8, groups v0 max .5, v2 max .2 -> 1;
    # v2: own best 0.5 (c3), group v0 best 0.4? no: column 2 = [.2,.4,.1,.5,.3]: v0 group max .4 < .5 -> 1
    assert (m["v2t_R1"], m["v2t_MnR"]) == (pytest.approx(100.0), pytest.approx(1.0))
    # strict: v0 -> 1 (0.9 tops all); v1: column [.1,.5,.8,.2,.2] -> 1; v2: [.2,.4,.1,.5,.3] -> c3 first -> 1
    assert m["v2t_strict_R1"] == pytest.approx(100.0)
    filtered = retrieval(Fixed(sim), emb, "multi", caption_filter="c[34]")
    assert filtered["n_text"] == 2 and filtered["t2v_R1"] == pytest.approx(50.0)


def test_strict_and_lenient_differ_when_another_group_has_many_captions():
    # v1 has one caption scoring 0.7 on v0; v0's own best is 0.6; v1's other captions are low
    sim = np.array([[0.6, 0.0], [0.7, 0.9], [0.1, 0.8], [0.65, 0.85]])
    items = [{"text": "a", "captions": ["a"], "meta": {}}, {"text": "b", "captions": ["b", "c", "d"], "meta": {}}]
    emb = {"captions": ids(4), "caption_video": np.array([0, 1, 1, 1]), "caption_texts": list("abcd"),
           "video": ids(2), "text": ids(2), "items": items}
    m = retrieval(Fixed(sim), emb, "multi")
    # v0 as query: lenient ranks groups {v0: 0.6, v1: max 0.7} -> 2; strict ranks captions 0.7, 0.65 above 0.6 -> 3
    assert (m["v2t_MnR"], m["v2t_strict_MnR"]) == (pytest.approx(1.5), pytest.approx(2.0))


def test_paragraph_protocol_reports_r50():
    n = 60
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(n, n))
    ranks = [1 + (i % 55) for i in range(n)]  # the paragraph of video i ranks its video at ranks[i]
    for i, r in enumerate(ranks):
        order = np.argsort(-sim[i])
        others = [j for j in order if j != i]
        sim[i, i] = (sim[i, others[r - 2]] + sim[i, others[r - 1]]) / 2 if r > 1 else sim[i].max() + 1
    items = [{"text": f"p{i}", "captions": [f"p{i}"], "meta": {"sentences": [{"start": 0, "end": 1, "text": "x"}]}}
             for i in range(n)]
    emb = {"text": ids(n), "video": ids(n), "items": items}
    assert detect_protocol(items) == "paragraph"
    m = retrieval(Fixed(sim), emb, "paragraph")
    assert m["t2v_R50"] == pytest.approx(100 * sum(r <= 50 for r in ranks) / n)
    assert m["t2v_R1"] == pytest.approx(100 * sum(r == 1 for r in ranks) / n)
    assert m["t2v_MdR"] == pytest.approx(np.median(ranks))


def test_qb_norm_demotes_a_hub_for_queries_that_hit_it():
    # gallery item 2 is a hub: every bank query scores it highest
    bank = np.array([[0.1, 0.2, 0.9], [0.3, 0.1, 0.8], [0.2, 0.2, 0.7]])
    test = np.array([[0.50, 0.10, 0.55],   # top-1 is the hub (activated): re-scored, v0 now wins
                     [0.20, 0.60, 0.10]])  # top-1 is v1 (not activated): kept as is
    out = qb_norm(test, bank, beta=20.0)
    lse = np.log(np.exp(20 * bank).sum(axis=0))
    assert np.allclose(out[0], 20 * test[0] - lse) and np.allclose(out[1], test[1])
    assert out[0].argmax() == 0


def test_markdown_table_labels_every_row():
    res = {"export": "E", "head": "meanP", "shards": ["S"], "protocol": "multi", "missing_videos": 3,
           "all": {"n_text": 5, "n_video": 3, **{f"{d}_{k}": 1.0 for d in ("t2v", "v2t", "v2t_strict", "dsl_t2v")
                                                 for k in ("R1", "R5", "R10", "MdR", "MnR")}}}
    md = markdown(res)
    assert "| text -> video | 1.0 | 1.0 | 1.0 | 1.0 | 1.0 |" in md
    assert "video -> text (lenient, as the references)" in md and "video -> text (strict)" in md
    assert "text -> video, DSL" in md and "3 videos of the split were missing" in md
