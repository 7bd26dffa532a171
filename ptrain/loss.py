"""Contrastive losses, computed by the training step from the model's features (never inside the model).

    from ptrain.loss import build_loss, contrastive_loss
    loss_fn = build_loss(model_cfg)                       # the head's loss: InfoNCE, TAB's fused pair, or pairwise
    loss, stats = loss_fn(model(frames, mask, ids, attn), group_ids_B)
    loss, stats = contrastive_loss(text_BD, video_BD, logit_scale, group_ids_B,
                                   local_loss=False, gather_with_grad=True)

- Features are L2-normalised rows; ``logit_scale`` is the (already clamped) multiplier.
- Under ``torch.distributed`` the features of every rank are all-gathered. ``gather_with_grad=True``
  sends every rank's gradient back to the rank that owns the rows, so averaging parameter gradients
  across ranks (DDP / DeepSpeed) gives exactly the single-process gradient on the concatenated batch.
- ``local_loss=False``: every rank computes the same N x N loss (N = global batch).
  ``local_loss=True``: each rank computes its B rows against all N columns in both directions (B x N,
  linear memory); the mean over ranks equals the global loss, so gradients are again exact.
- Multi-positive: samples with equal ``group_ids`` (e.g. two captions of one video) are positives of
  each other. A row's loss is MIL-NCE style, -log(sum of softmax over its positives); with one
  positive per row this is the usual cross-entropy on the diagonal.
- Reversal negatives (``extra_video_BD``): more gallery columns for the text->video direction only,
  never anyone's positive; the model passes every clip played backwards, so a caption must prefer
  its clip over the same frames in reverse order (``acc_order`` is the fraction that does).
- The tight (cross-encoder) head scores only local pairs: ``pairwise_loss`` on its B x B logits.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ptrain import distributed as du


def multi_positive_nce(logits_RC: torch.Tensor, positive_RC: torch.Tensor) -> torch.Tensor:
    """Mean over rows of logsumexp(all) - logsumexp(positives). Every row needs >= 1 positive."""
    logits_RC = logits_RC.float()
    all_R = torch.logsumexp(logits_RC, dim=1)
    pos_R = torch.logsumexp(logits_RC.masked_fill(~positive_RC, float("-inf")), dim=1)
    return (all_R - pos_R).mean()


def _top1_hits(logits_RC: torch.Tensor, positive_RC: torch.Tensor) -> torch.Tensor:
    best_R = logits_RC.argmax(dim=1)
    return positive_RC.gather(1, best_R[:, None]).float().mean()


def _default_groups(batch: int, device) -> torch.Tensor:
    # Without group ids every sample is its own group: ids unique across ranks.
    return torch.arange(batch, device=device) + du.rank() * batch


def contrastive_loss(
    text_BD: torch.Tensor,
    video_BD: torch.Tensor,
    logit_scale: torch.Tensor,
    group_ids_B: torch.Tensor | None = None,
    *,
    local_loss: bool = False,
    gather_with_grad: bool = True,
    extra_video_BD: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Symmetric InfoNCE of normalised text/video rows; returns (loss, detached stats).
    ``extra_video_BD``: negatives-only video rows (row i = clip i played backwards) for text->video."""
    if text_BD.shape != video_BD.shape:
        raise ValueError(f"text features {tuple(text_BD.shape)} and video features {tuple(video_BD.shape)} must match.")
    if extra_video_BD is not None and extra_video_BD.shape != video_BD.shape:
        raise ValueError(f"extra video rows {tuple(extra_video_BD.shape)} must match the video rows {tuple(video_BD.shape)}.")
    batch = text_BD.shape[0]
    groups_B = _default_groups(batch, text_BD.device) if group_ids_B is None else group_ids_B.to(text_BD.device).long()
    gather = du.all_gather_with_grad if gather_with_grad else du.all_gather_no_grad
    text_ND, video_ND = gather(text_BD.float()), gather(video_BD.float())
    extra_ND = gather(extra_video_BD.float()) if extra_video_BD is not None else None
    groups_N = du.all_gather_tensor(groups_B)
    scale = logit_scale.float()
    stats: dict[str, torch.Tensor] = {}

    def with_extra(logits_RN, positive_RN, text_RD):
        # the reversed clips: more columns, never positive
        if extra_ND is None:
            return logits_RN, positive_RN
        extra_RN = scale * text_RD @ extra_ND.t()
        return torch.cat([logits_RN, extra_RN], 1), torch.cat([positive_RN, torch.zeros_like(positive_RN)], 1)

    if local_loss:
        # Local rows x global columns in both directions.
        positive_BN = groups_B[:, None] == groups_N[None, :]
        logits_t2v = scale * text_BD.float() @ video_ND.t()
        logits_v2t = scale * video_BD.float() @ text_ND.t()
        loss_t2v = multi_positive_nce(*with_extra(logits_t2v, positive_BN, text_BD.float()))
        loss_v2t = multi_positive_nce(logits_v2t, positive_BN)
        hits = _top1_hits(logits_t2v.detach(), positive_BN)
    else:
        # The full global N x N matrix, identical on every rank.
        positive_NN = groups_N[:, None] == groups_N[None, :]
        logits_t2v = scale * text_ND @ video_ND.t()
        loss_t2v = multi_positive_nce(*with_extra(logits_t2v, positive_NN, text_ND))
        loss_v2t = multi_positive_nce(logits_t2v.t(), positive_NN)
        start = du.rank() * batch if du.is_initialized() else 0
        rows = slice(start, start + batch)
        hits = _top1_hits(logits_t2v.detach()[rows], positive_NN[rows])
    if extra_video_BD is not None:
        with torch.no_grad():  # does each caption score its clip above the clip played backwards?
            t = text_BD.float()
            own = (t * video_BD.float()).sum(-1)
            rev = (t * extra_video_BD.float()).sum(-1)
            tie = (own - rev).abs() <= 1e-5  # an order-blind head differs by float summation order only
            stats["acc_order"] = torch.where(tie, 0.5, (own > rev).float()).mean()
    loss = 0.5 * (loss_t2v + loss_v2t)
    return loss, {"loss_t2v": loss_t2v.detach(), "loss_v2t": loss_v2t.detach(), "acc_t2v": hits, **stats}


def pairwise_loss(logits_BB: torch.Tensor, group_ids_B: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Symmetric InfoNCE on a local B x B score matrix (tightTransf: no temperature, no gather)."""
    batch = logits_BB.shape[0]
    groups_B = torch.arange(batch, device=logits_BB.device) if group_ids_B is None else group_ids_B.to(logits_BB.device)
    positive_BB = groups_B[:, None] == groups_B[None, :]
    loss_t2v = multi_positive_nce(logits_BB, positive_BB)
    loss_v2t = multi_positive_nce(logits_BB.t(), positive_BB)
    hits = _top1_hits(logits_BB.detach(), positive_BB)
    return 0.5 * (loss_t2v + loss_v2t), {"loss_t2v": loss_t2v.detach(), "loss_v2t": loss_v2t.detach(), "acc_t2v": hits}


# (model features, group ids or None) -> (loss, detached stats)
LossFn = Callable[[dict, Any], tuple]


def build_loss(model_cfg: Any) -> LossFn:
    """The loss of ``model_cfg``'s head over the features ``VideoTextModel.forward`` returns.

    Loose heads: symmetric InfoNCE of ``text`` x ``video`` over the global batch (``local_loss`` and
    ``gather_with_grad`` from the model config), with ``video_rev`` as extra text->video negatives. TAB: the
    global loss and the alignment loss (``text_tab`` x ``video_tab``) fused as ``w * global + (1 - w) * tab``
    (``tab_weight``), both reported. Tight heads: ``pairwise_loss`` on the cross encoder's local ``logits``."""
    opts = dict(local_loss=model_cfg.local_loss, gather_with_grad=model_cfg.gather_with_grad)
    w = model_cfg.tab_weight

    def loss_fn(out: dict[str, torch.Tensor], group_ids: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        scale = out["logit_scale"]
        if "logits" in out:
            loss, stats = pairwise_loss(out["logits"], group_ids)
            return loss, {"logit_scale": scale.detach(), **stats}
        loss, stats = contrastive_loss(out["text"], out["video"], scale, group_ids, extra_video_BD=out.get("video_rev"),
                                       **opts)
        stats = {"logit_scale": scale.detach(), **stats}
        if "text_tab" in out:
            loss_tab, _ = contrastive_loss(out["text_tab"], out["video_tab"], scale, group_ids,
                                           extra_video_BD=out.get("video_tab_rev"), **opts)
            stats.update(loss_global=loss.detach(), loss_tab=loss_tab.detach())
            loss = w * loss + (1 - w) * loss_tab
        return loss, stats

    return loss_fn
