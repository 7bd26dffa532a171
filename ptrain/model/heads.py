"""Temporal similarity heads: CLIP4Clip's meanP / seqLSTM / seqTransf / tightTransf and CLIP2Video's
TDB (temporal difference block) and TAB (temporal alignment block).

Loose heads map frame features to one L2-normalised video vector: ``head(video_BTD, mask_BT) -> video_BD``.
The tight head scores (text, video) pairs: ``head.score(text_ND, video_MTD, mask_MT) -> logits_NM``.
TAB adds ``TemporalAlignment`` beside a loose head. The math follows the references exactly
(see ``docs/model.md``); new modules initialise from CLIP the way the papers do (``init_from_clip``).

Shapes: B batch, T frames, D joint embedding width, N/M text/video counts, L text length, K centres.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ptrain.model.blocks import QuickGELU, Transformer, init_transformer_from_clip_text


def masked_mean_pool(video_BTD: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """The references' pooling tail: normalise frames, masked mean (empty -> divide by 1), normalise."""
    video_BTD = F.normalize(video_BTD, dim=-1)
    m_BT1 = mask_BT.to(video_BTD.dtype).unsqueeze(-1)
    count_B1 = m_BT1.sum(dim=1).clamp(min=1.0)
    return F.normalize((video_BTD * m_BT1).sum(dim=1) / count_B1, dim=-1)


def _arange_positions(table: nn.Embedding, batch: int, length: int, device) -> torch.Tensor:
    ids = torch.arange(length, device=device).unsqueeze(0).expand(batch, -1)
    return table(ids)


class MeanP(nn.Module):
    """Parameter-free masked mean of the frame embeddings."""

    @classmethod
    def from_config(cls, cfg, dim: int, heads: int, positions: int) -> "MeanP":
        return cls()

    def forward(self, video_BTD, mask_BT):
        return masked_mean_pool(video_BTD, mask_BT)

    def init_from_clip(self, clip) -> None:
        pass


class SeqLSTM(nn.Module):
    """1-layer LSTM over the real frames + residual (PyTorch default init, as in CLIP4Clip).
    Real frames must come first in the mask (the loaders pad at the end)."""

    def __init__(self, dim: int):
        super().__init__()
        self.lstm_visual = nn.LSTM(dim, dim, num_layers=1, batch_first=True)

    @classmethod
    def from_config(cls, cfg, dim: int, heads: int, positions: int) -> "SeqLSTM":
        return cls(dim)

    def forward(self, video_BTD, mask_BT):
        lengths = mask_BT.sum(dim=-1).clamp(min=1).cpu()
        packed = pack_padded_sequence(video_BTD, lengths, batch_first=True, enforce_sorted=False)
        out_BTD, _ = pad_packed_sequence(self.lstm_visual(packed)[0], batch_first=True, total_length=video_BTD.shape[1])
        # Positions past a clip's length hold zeros here (the reference: copies); both are masked.
        return masked_mean_pool(out_BTD + video_BTD, mask_BT)

    def init_from_clip(self, clip) -> None:
        pass


class SeqTransf(nn.Module):
    """Frame position embedding + transformer (CLIP text blocks 0..L-1) + residual."""

    def __init__(self, dim: int, layers: int, heads: int, positions: int, head_major: bool = False):
        super().__init__()
        self.frame_position_embeddings = nn.Embedding(positions, dim)
        self.transformerClip = Transformer(dim, layers, heads, head_major)

    @classmethod
    def from_config(cls, cfg, dim: int, heads: int, positions: int) -> "SeqTransf":
        return cls(dim, cfg.cross_layers, heads, positions, cfg.compat)

    def temporal(self, video_BTD, mask_BT):
        B, T, _ = video_BTD.shape
        x = video_BTD + _arange_positions(self.frame_position_embeddings, B, T, video_BTD.device)
        return self.transformerClip(x, mask_BT) + video_BTD

    def forward(self, video_BTD, mask_BT):
        return masked_mean_pool(self.temporal(video_BTD, mask_BT), mask_BT)

    def init_from_clip(self, clip) -> bool:
        return _init_positions(self.frame_position_embeddings, clip) & init_transformer_from_clip_text(
            self.transformerClip, clip.text_model.encoder.layers
        )


class Projection(nn.Module):
    """A bare ``x @ W`` (CLIP2Video's ``frame2t_projection``), wrapped so ZeRO-3 sees its use."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim).normal_(std=64**-0.5))

    def forward(self, x):
        return x @ self.weight


class TemporalDifference(nn.Module):
    """CLIP2Video's TDB: adjacent-frame differences, transformed, interleaved with the frames.

    ``forward(video_BTD, mask_BT, pos_BTD)`` -> tokens [B, 2T-1, D] = [V0, d0, V1, d1, ..., V_{T-1}] with
    their position ids (di shares Vi's), type embeddings (frame 1, difference 0) and mask. A
    difference is real iff both its frames are; ``compat`` gives it frame i's mask (the reference)."""

    def __init__(self, dim: int, proj: str, heads: int, compat: bool = False):
        super().__init__()
        self.proj, self.compat = proj, compat
        self.type_position_embeddings = nn.Embedding(2, dim)
        if proj != "raw":  # only the sigmoid transforms use it (CLIP2Video creates it always; raw drops it)
            self.trans_layernorm = nn.LayerNorm(dim)
        if proj == "sigmoid_mlp":
            self.frame2t_projection = Projection(dim)
        elif proj == "sigmoid_selfA":
            self.frame2t_attention = Transformer(dim, 1, heads, head_major=compat)

    def forward(self, video_BTD, mask_BT, pos_BTD):
        B, T, D = video_BTD.shape
        frame_type = self.type_position_embeddings(torch.ones(B, T, dtype=torch.long, device=video_BTD.device))
        if T == 1:
            return video_BTD, pos_BTD, frame_type, mask_BT
        diff_type = self.type_position_embeddings(torch.zeros(B, T - 1, dtype=torch.long, device=video_BTD.device))
        diff = video_BTD[:, 1:] - video_BTD[:, :-1]
        if self.proj == "sigmoid_mlp":
            diff = 2 * torch.sigmoid(self.trans_layernorm(self.frame2t_projection(diff))) - 1
        elif self.proj == "sigmoid_selfA":
            diff = self.frame2t_attention(diff + pos_BTD[:, 1:], mask_BT[:, 1:])
            diff = 2 * torch.sigmoid(self.trans_layernorm(diff)) - 1
        diff_mask = mask_BT[:, :-1] if self.compat else mask_BT[:, 1:] * mask_BT[:, :-1]

        def interleave(frames, diffs):
            pairs = torch.stack([frames[:, :-1], diffs], dim=2).flatten(1, 2)
            return torch.cat([pairs, frames[:, -1:]], dim=1)

        return (
            interleave(video_BTD, diff),
            interleave(pos_BTD, pos_BTD[:, :-1]),
            interleave(frame_type, diff_type),
            interleave(mask_BT, diff_mask.to(mask_BT.dtype)),
        )


class TDBHead(nn.Module):
    """seqTransf over frames interleaved with TDB difference tokens; frame outputs + residual, pooled."""

    def __init__(self, dim: int, layers: int, heads: int, positions: int, proj: str, compat: bool = False):
        super().__init__()
        self.frame_position_embeddings = nn.Embedding(positions, dim)
        self.transformerClip = Transformer(dim, layers, heads, head_major=compat)
        self.tdb = TemporalDifference(dim, proj, heads, compat)

    @classmethod
    def from_config(cls, cfg, dim: int, heads: int, positions: int) -> "TDBHead":
        return cls(dim, cfg.cross_layers, heads, positions, cfg.tdb_proj, cfg.compat)

    def forward(self, video_BTD, mask_BT):
        B, T, _ = video_BTD.shape
        pos = _arange_positions(self.frame_position_embeddings, B, T, video_BTD.device)
        x, pos2, typ, mask2 = self.tdb(video_BTD, mask_BT, pos)
        y = self.transformerClip(x + pos2 + typ, mask2)
        return masked_mean_pool(y[:, 0::2] + video_BTD, mask_BT)

    def init_from_clip(self, clip) -> bool:
        ok = _init_positions(self.frame_position_embeddings, clip)
        ok &= init_transformer_from_clip_text(self.transformerClip, clip.text_model.encoder.layers)
        table = clip.text_model.embeddings.position_embedding.weight
        with torch.no_grad():
            if table.shape[1] == self.tdb.type_position_embeddings.weight.shape[1]:
                self.tdb.type_position_embeddings.weight.copy_(table[:2])
            else:
                ok = False
            if self.tdb.proj == "sigmoid_selfA":
                ok &= init_transformer_from_clip_text(self.tdb.frame2t_attention, clip.text_model.encoder.layers)
            elif self.tdb.proj == "sigmoid_mlp":
                # CLIP2Video: visual.proj[0:D] (OpenAI [Dv, D] layout) = visual_projection.weight[:, :D].T
                w = clip.visual_projection.weight
                if w.shape[1] >= w.shape[0]:
                    self.tdb.frame2t_projection.weight.copy_(w[:, : w.shape[0]].t())
                else:
                    ok = False
        return ok


class TABCentres(nn.Module):
    """NetVLAD-style aggregation over K centres shared by both modalities:
    A = softmax_k(z W^T); U_k = sum_n mask_n A_nk (z_n - C_k); normalise each U_k; mean over k; normalise."""

    def __init__(self, dim: int, centres: int):
        super().__init__()
        self.weight_center = nn.Parameter(torch.empty(centres, dim).normal_(std=64**-0.5))
        self.emb_center = nn.Parameter(torch.empty(centres, dim).normal_(std=64**-0.5))

    def forward(self, tokens_BND, mask_BN):
        assign_BNK = torch.softmax(tokens_BND @ self.weight_center.t(), dim=-1)
        resid_BNKD = tokens_BND.unsqueeze(2) - self.emb_center
        m = mask_BN.to(tokens_BND.dtype)[:, :, None, None]
        u_BKD = (assign_BNK.unsqueeze(-1) * resid_BNKD * m).sum(dim=1)
        return F.normalize(F.normalize(u_BKD, dim=-1).mean(dim=1), dim=-1)


class TemporalAlignment(nn.Module):
    """CLIP2Video's TAB: video tokens = frames (+ motion tokens from every 2nd frame), text tokens =
    every projected token state except SOT; both aggregated by the shared ``TABCentres``."""

    def __init__(self, dim: int, heads: int, centres: int, motion: str, compat: bool = False):
        super().__init__()
        self.motion = motion
        self.centres = TABCentres(dim, centres)
        if motion in ("TAB", "TAB_TDB"):
            self.actionClip = Transformer(dim, 1, heads, head_major=compat)

    @classmethod
    def from_config(cls, cfg, dim: int, heads: int, positions: int) -> "TemporalAlignment":
        return cls(dim, heads, cfg.tab_centers, cfg.tab_motion, cfg.compat)

    def video(self, video_BTD, mask_BT, global_head) -> torch.Tensor:
        tokens, mask = video_BTD, mask_BT
        if self.motion != "none":
            sparse, sparse_mask = video_BTD[:, 0::2], mask_BT[:, 0::2]
            B, S, _ = sparse.shape
            pos = _arange_positions(global_head.frame_position_embeddings, B, S, video_BTD.device)
            if self.motion == "TAB_TDB":
                x, pos2, typ, mask2 = global_head.tdb(sparse, sparse_mask, pos)
                motion = self.actionClip(x + pos2 + typ, mask2)[:, 0::2] + sparse
            else:
                motion = self.actionClip(sparse + pos, sparse_mask) + sparse
            tokens = torch.cat([video_BTD, motion], dim=1)
            mask = torch.cat([mask_BT, sparse_mask], dim=1)
        return self.centres(tokens, mask)

    def text(self, text_BLD, attention_mask_BL) -> torch.Tensor:
        mask = attention_mask_BL.clone()
        mask[:, 0] = 0  # the SOT token is left out, as in the reference
        return self.centres(text_BLD, mask)

    def init_from_clip(self, clip) -> bool:
        if self.motion == "none":
            return True
        return init_transformer_from_clip_text(self.actionClip, clip.text_model.encoder.layers)


class CrossEncoder(nn.Module):
    """tightTransf: [text EOT feature; frames] + positions -> transformer -> LN -> token 0 -> dense ->
    QuickGELU -> linear score. No temperature, no normalisation (CLIP4Clip's cross model)."""

    def __init__(self, dim: int, layers: int, heads: int, positions: int, dropout: float, head_major: bool = False):
        super().__init__()
        self.position_embeddings = nn.Embedding(positions, dim)
        self.dropout = nn.Dropout(dropout)
        self.transformer = Transformer(dim, layers, heads, head_major)
        self.ln_pool = nn.LayerNorm(dim, eps=1e-12)
        self.dense = nn.Linear(dim, dim)
        self.act = QuickGELU()
        self.similarity_dense = nn.Linear(dim, 1)
        for lin in (self.dense, self.similarity_dense):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, text_PD, video_PTD, mask_PT):
        """Score P aligned pairs -> [P]."""
        seq = torch.cat([text_PD.unsqueeze(1), video_PTD], dim=1)
        mask = torch.cat([torch.ones_like(mask_PT[:, :1]), mask_PT], dim=1)
        P, N, _ = seq.shape
        x = self.dropout(seq + _arange_positions(self.position_embeddings, P, N, seq.device))
        pooled = self.act(self.dense(self.ln_pool(self.transformer(x, mask))[:, 0]))
        return self.similarity_dense(pooled).squeeze(-1)


class TightTransf(nn.Module):
    """CLIP4Clip's tight head: the cross encoder scores every (text, video) pair."""

    def __init__(self, dim: int, layers: int, heads: int, positions: int, dropout: float, head_major: bool = False):
        super().__init__()
        self.cross = CrossEncoder(dim, layers, heads, positions, dropout, head_major)

    @classmethod
    def from_config(cls, cfg, dim: int, heads: int, positions: int) -> "TightTransf":
        # the text token takes position 0, so the table needs one row more than the frames
        return cls(dim, cfg.cross_layers, heads, max(positions, 1 + cfg.num_frames), cfg.tight_dropout, cfg.compat)

    @property
    def max_frames(self) -> int:
        return self.cross.position_embeddings.num_embeddings - 1

    def forward(self, text_ND, video_MTD, mask_MT, pair_chunk: int = 4096):
        """All pairs -> logits [N, M], text rows in chunks of ~``pair_chunk`` pairs (bounded memory)."""
        N, M = text_ND.shape[0], video_MTD.shape[0]
        rows = max(1, pair_chunk // max(M, 1))
        out = []
        for start in range(0, N, rows):
            t = text_ND[start : start + rows]
            n = t.shape[0]
            pairs = self.cross(
                t.repeat_interleave(M, dim=0), video_MTD.repeat(n, 1, 1), mask_MT.repeat(n, 1)
            )
            out.append(pairs.view(n, M))
        return torch.cat(out, dim=0)

    def init_from_clip(self, clip) -> bool:
        return _init_positions(self.cross.position_embeddings, clip) & init_transformer_from_clip_text(
            self.cross.transformer, clip.text_model.encoder.layers
        )


@torch.no_grad()
def _init_positions(table: nn.Embedding, clip) -> bool:
    """Frame positions from CLIP's text position table (rows beyond it keep their random init)."""
    src = clip.text_model.embeddings.position_embedding.weight
    if src.shape[1] != table.weight.shape[1]:
        return False
    n = min(src.shape[0], table.weight.shape[0])
    table.weight[:n].copy_(src[:n])
    table.weight[n:].normal_(std=0.01)  # OpenAI's position-table init for rows past CLIP's 77
    return True
