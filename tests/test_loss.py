"""ptrain.loss: InfoNCE values, multi-positive masks, and 2 gloo ranks == 1 process on the whole batch."""

from __future__ import annotations

import math
import warnings

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from net import free_port
from ptrain.distributed import destroy
from ptrain.loss import build_loss, contrastive_loss, multi_positive_nce, pairwise_loss


def test_unique_groups_is_symmetric_cross_entropy():
    torch.manual_seed(0)
    t, v = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    loss, stats = contrastive_loss(t, v, torch.tensor(20.0))
    logits = 20.0 * t @ v.t()
    want = 0.5 * (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.t(), torch.arange(5)))
    torch.testing.assert_close(loss, want)
    assert stats["acc_t2v"] == (logits.argmax(1) == torch.arange(5)).float().mean()
    local, _ = contrastive_loss(t, v, torch.tensor(20.0), local_loss=True)
    torch.testing.assert_close(local, want)


def test_multi_positive_rows_by_hand():
    # Rows 0 and 2 share a group: each of them has two positive columns.
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.5, 1.5, -1.0], [1.0, 0.0, 3.0]])
    pos = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.bool)
    e = logits.exp()
    rows = [-math.log((e[0, 0] + e[0, 2]) / e[0].sum()), -math.log(e[1, 1] / e[1].sum()), -math.log((e[2, 0] + e[2, 2]) / e[2].sum())]
    torch.testing.assert_close(multi_positive_nce(logits, pos), torch.tensor(sum(rows) / 3))


def test_group_ids_make_duplicates_positives():
    torch.manual_seed(0)
    t, v = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    v[2] = v[0]  # the same video twice
    unique, _ = contrastive_loss(t, v, torch.tensor(10.0))
    grouped, _ = contrastive_loss(t, v, torch.tensor(10.0), torch.tensor([5, 6, 5, 7]))
    assert grouped < unique  # a duplicate is no longer pushed away as a negative


def test_reversal_negatives_are_extra_text_to_video_columns():
    torch.manual_seed(0)
    t, v, r = (F.normalize(torch.randn(3, 8), dim=-1) for _ in range(3))
    for local in (False, True):
        loss, stats = contrastive_loss(t, v, torch.tensor(10.0), extra_video_BD=r, local_loss=local)
        t2v = 10.0 * torch.cat([t @ v.t(), t @ r.t()], 1)  # columns 3..5: clips played backwards, never positive
        want = 0.5 * (F.cross_entropy(t2v, torch.arange(3)) + F.cross_entropy(10.0 * v @ t.t(), torch.arange(3)))
        torch.testing.assert_close(loss, want)
        own, rev = (t * v).sum(1), (t * r).sum(1)
        assert stats["acc_order"] == (own > rev).float().mean()
    # an order-blind head gives identical reversed rows: every order comparison is a tie (0.5)
    _, stats = contrastive_loss(t, v, torch.tensor(10.0), extra_video_BD=v.clone())
    assert stats["acc_order"] == 0.5


def test_model_reversal_negatives_reverse_the_real_frames_only():
    from ptrain.model import ModelConfig, build_model
    from ptrain.model.video_text import reverse_clips

    x = torch.arange(2 * 4).reshape(2, 4, 1).float()
    assert reverse_clips(x, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))[..., 0].tolist() == [[2, 1, 0, 3], [7, 6, 5, 4]]
    frames, mask, ids, attn = _batch()
    for head, order_blind in (("meanP", True), ("TDB", False)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            model = build_model(ModelConfig(clip="tiny", head=head, frame_size=16, num_frames=3, max_words=6,
                                            cross_layers=1, reverse_negatives=True))
        loss, stats = build_loss(model.cfg)(model(frames, mask, ids, attn), None)
        assert torch.isfinite(loss)
        # meanP cannot tell a clip from its reversal (all ties); a temporal head at random init already can
        assert (float(stats["acc_order"]) == 0.5) == order_blind, (head, stats["acc_order"])


def test_pairwise_loss_is_local_cross_entropy():
    logits = torch.tensor([[3.0, 0.0], [1.0, 2.0]])
    loss, _ = pairwise_loss(logits)
    want = 0.5 * (F.cross_entropy(logits, torch.arange(2)) + F.cross_entropy(logits.t(), torch.arange(2)))
    torch.testing.assert_close(loss, want)


# ----------------------------------------------------------------------------------------------
# two gloo ranks vs one process

CASES = [  # (head, local_loss, group ids of the global batch of 4, reversal negatives)
    ("meanP", False, [0, 1, 0, 3], False),
    ("TAB", False, [0, 1, 2, 1], True),
    ("seqTransf", True, [0, 1, 2, 3], False),
    ("TDB", True, [0, 1, 2, 3], True),
]


def _model(head, local_loss, reverse=False):
    from ptrain.model import ModelConfig, build_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return build_model(ModelConfig(clip="tiny", head=head, frame_size=16, num_frames=3, max_words=6,
                                       cross_layers=1, local_loss=local_loss, reverse_negatives=reverse)).train()


def _batch():
    g = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 256, (4, 3, 3, 16, 16), dtype=torch.uint8, generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    ids = torch.tensor([[49406, 320, 1929, 49407, 0, 0], [49406, 530, 49407, 0, 0, 0],
                        [49406, 320, 2368, 3207, 49407, 0], [49406, 1237, 889, 49407, 0, 0]])
    return frames, mask, ids, (ids > 0).long()


def _run_single():
    results = []
    for head, local_loss, groups, reverse in CASES:
        model = _model(head, local_loss, reverse)
        loss, _ = build_loss(model.cfg)(model(*_batch()), torch.tensor(groups))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    return results


def _worker(rank, world, port, out_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        results = []
        for head, local_loss, groups, reverse in CASES:
            model = _model(head, local_loss, reverse)
            frames, mask, ids, attn = (x[rank * 2 : rank * 2 + 2] for x in _batch())
            loss, _ = build_loss(model.cfg)(model(frames, mask, ids, attn), torch.tensor(groups[rank * 2 : rank * 2 + 2]))
            loss.backward()
            # What DDP / DeepSpeed do: average gradients (and here the reported loss) over ranks.
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            grads = {}
            for n, p in model.named_parameters():
                if p.grad is not None:
                    g = p.grad.clone()
                    dist.all_reduce(g)
                    grads[n] = g / world
            results.append((loss / world, grads))
        if rank == 0:
            torch.save(results, out_path)
    finally:
        destroy()  # a barrier first: a rank leaving early made gloo abort its peer


def _spawn(target, tmp_path):
    ctx = mp.get_context("spawn")
    port, out_path = free_port(), tmp_path / "rank0.pt"
    procs = [ctx.Process(target=target, args=(r, 2, port, str(out_path))) for r in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=180)
    finally:
        for p in procs:  # a rank stuck in a collective must not keep pytest from exiting
            if p.is_alive():
                p.kill()
                p.join(10)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return torch.load(out_path, weights_only=True)


LOSS_CASES = [(False, True), (True, True), (False, False)]  # (local_loss, gather_with_grad)


def _encoders():
    torch.manual_seed(0)
    return torch.nn.Linear(6, 5), torch.nn.Linear(7, 5), torch.nn.Parameter(torch.tensor([math.log(10.0)]))


def _features(text_enc, video_enc, rows):
    g = torch.Generator().manual_seed(3)
    x_t, x_v = torch.randn(4, 6, generator=g)[rows], torch.randn(4, 7, generator=g)[rows]
    return F.normalize(text_enc(x_t), dim=-1), F.normalize(video_enc(x_v), dim=-1)


def _loss_worker(rank, world, port, out_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = []
        groups = torch.tensor([0, 1, 0, 2])[rank * 2 : rank * 2 + 2]
        for local_loss, with_grad in LOSS_CASES:
            te, ve, log_scale = _encoders()
            t, v = _features(te, ve, slice(rank * 2, rank * 2 + 2))
            loss, _ = contrastive_loss(t, v, log_scale.exp(), groups, local_loss=local_loss, gather_with_grad=with_grad)
            loss.backward()
            params = [*te.parameters(), *ve.parameters(), log_scale]
            for p in params:
                dist.all_reduce(p.grad)
            dist.all_reduce(loss := loss.detach().clone())
            results.append((loss / world, [p.grad / world for p in params]))
        if rank == 0:
            torch.save(results, out_path)
    finally:
        destroy()  # a barrier first: a rank leaving early made gloo abort its peer


def test_two_gloo_ranks_loss_equals_one_process(tmp_path):
    """The loss alone (tiny linear encoders, cheap to spawn): exact for gather_with_grad, in both
    the global-matrix and the local_loss mode; gather_with_grad=False drops cross-rank gradients."""
    distributed = _spawn(_loss_worker, tmp_path)
    for (local_loss, with_grad), (loss2, grads2) in zip(LOSS_CASES, distributed):
        te, ve, log_scale = _encoders()
        t, v = _features(te, ve, slice(0, 4))
        loss1, _ = contrastive_loss(t, v, log_scale.exp(), torch.tensor([0, 1, 0, 2]))
        loss1.backward()
        grads1 = [p.grad for p in (*te.parameters(), *ve.parameters(), log_scale)]
        torch.testing.assert_close(loss2, loss1.detach())
        same = all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads1, grads2))
        assert same == with_grad, (local_loss, with_grad)


def test_two_gloo_ranks_model_equals_one_process(tmp_path):
    """The full model forward + the step's loss on 2 ranks == 1 process on the whole batch."""
    distributed = _spawn(_worker, tmp_path)
    single = _run_single()
    for (head, local_loss, _, _), (loss1, grads1), (loss2, grads2) in zip(CASES, single, distributed):
        torch.testing.assert_close(loss2, loss1, rtol=1e-5, atol=1e-6, msg=f"{head} local_loss={local_loss}")
        assert set(grads1) == set(grads2)
        for name in grads1:
            # fp32 sums in another order: compare elementwise to 1e-5 of the tensor's largest entry.
            atol = 1e-5 * max(1.0, float(grads1[name].abs().max()))
            torch.testing.assert_close(grads2[name], grads1[name], rtol=1e-4, atol=atol, msg=f"{head} {name}")


def test_rank_and_world_from_environment(monkeypatch):
    from ptrain import distributed as du

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (du.rank(), du.world_size(), du.local_rank(), du.is_main()) == (3, 8, 1, False)
    monkeypatch.setenv("WORLD_SIZE", "eight")
    try:
        du.world_size()
    except ValueError as e:
        assert "WORLD_SIZE" in str(e)
    else:
        raise AssertionError("a malformed WORLD_SIZE must raise")
