"""Training-time token masking (FLIP, UMT): which patch tokens of each frame CLIP's vision transformer keeps.

    from ptrain.masking import build_token_masker
    masker = build_token_masker(cfg.model, model.num_patches, seed=cfg.seed, max_steps=cfg.max_steps,
                                unmasked_tail_steps=cfg.optim.unmasked_tail_steps)     # None when mask_ratio = 0
    keep_BTK = masker(batch, step)       # LongTensor [B, T, K]: kept patch positions 0..N-1, ascending; or None
    out = model(frames, frame_mask, ids, attn, token_keep=keep_BTK)

Stateless on purpose: the kept set of row b is drawn by a generator seeded with (run seed, the sample's global
position ``batch["index"][b]``, a tag), like the loader's crops. So a sample position draws the same mask on any
world size and any number of DataLoader workers, and a resumed run draws exactly the masks the uninterrupted run
drew, with nothing to checkpoint. A position is unique over the whole run (epochs are concatenated), so a
sample seen again in a later epoch gets a fresh mask. Rows without a position (streamed ``pipe:``/URL shards,
index -1) are seeded by (seed, step, micro-step, the sample key) instead: reproducible for the same stream,
which is all the streaming fallback promises.

``mode="frame"`` draws a set per frame; ``"tube"`` one set per clip shared by all its frames (the same spatial
positions over time, as VideoMAE's tube masking), returned as [B, 1, K]. ``K = floor(N * (1 - ratio))``
(``ModelConfig.kept_patches``). The class token is always kept (the model adds it). Steps from ``unmasked_from``
on train unmasked (``optim.unmasked_tail_steps``: FLIP's short unmasked tail, which closes most of the gap to an
unmasked model at evaluation, where every token is used).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from ptrain.model.config import ModelConfig

MASK_TAG = 0x70CE  # separates the mask draws from the crop draws seeded by the same (seed, position)


def draw_keep(seed_parts: list[int], frames: int, patches: int, kept: int) -> np.ndarray:
    """Kept patch positions [frames, kept] (ascending) from a generator seeded by ``seed_parts`` (non-negative
    ints): for each frame, the ``kept`` positions with the lowest of ``patches`` uniform scores."""
    scores = np.random.default_rng(seed_parts).random((frames, patches))
    return np.sort(np.argsort(scores, axis=1, kind="stable")[:, :kept], axis=1)


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


class TokenMasker:
    """Draws the kept patch tokens of a training micro-batch (see the module docstring)."""

    def __init__(self, ratio: float, mode: str, patches: int, kept: int, seed: int, unmasked_from: int | None = None):
        if mode not in ("frame", "tube"):
            raise ValueError(f"mask mode must be 'frame' or 'tube', got {mode!r}")
        if not 1 <= kept <= patches:
            raise ValueError(f"kept tokens must lie in [1, {patches}], got {kept}")
        if seed < 0:
            raise ValueError(f"the mask seed must be >= 0 (it is the run seed), got {seed}")
        self.ratio, self.mode, self.patches, self.kept = ratio, mode, patches, kept
        self.seed, self.unmasked_from = seed, unmasked_from

    def ratio_at(self, step: int) -> float:
        """The mask ratio optimizer step ``step`` trains at (0 in the unmasked tail)."""
        return 0.0 if self.unmasked_from is not None and step >= self.unmasked_from else self.ratio

    def row_seeds(self, batch: dict[str, Any]) -> list[list[int]]:
        """Per row: (seed, global position, tag), or for a row without a position (seed, tag, step, micro step,
        key hash)."""
        index = batch["index"].tolist() if torch.is_tensor(batch["index"]) else list(batch["index"])
        out = []
        for b, i in enumerate(index):
            if i >= 0:
                out.append([self.seed, int(i), MASK_TAG])
            else:
                key = batch["keys"][b] if "keys" in batch else str(b)
                out.append([self.seed, MASK_TAG, int(batch.get("step", 0)), int(batch.get("micro_step", 0)),
                            _key_hash(key)])
        return out

    def draw(self, batch: dict[str, Any]) -> torch.Tensor:
        """The kept positions of every row of ``batch``: [B, T, K], or [B, 1, K] in tube mode."""
        frames = 1 if self.mode == "tube" else int(batch["frames"].shape[1])
        rows = [draw_keep(s, frames, self.patches, self.kept) for s in self.row_seeds(batch)]
        return torch.from_numpy(np.stack(rows)).long()

    def __call__(self, batch: dict[str, Any], step: int) -> torch.Tensor | None:
        """The kept positions for optimizer step ``step``, or None (train on every token) in the unmasked tail."""
        if self.ratio_at(step) == 0:
            return None
        return self.draw(batch)


def build_token_masker(cfg: ModelConfig, patches: int, *, seed: int, max_steps: int,
                       unmasked_tail_steps: int = 0) -> TokenMasker | None:
    """The masker for ``cfg.mask_ratio`` / ``cfg.mask_mode`` (None when the ratio is 0): the last
    ``unmasked_tail_steps`` of ``max_steps`` train unmasked."""
    if cfg.mask_ratio == 0:
        return None
    if unmasked_tail_steps < 0:
        raise ValueError(f"unmasked_tail_steps must be >= 0, got {unmasked_tail_steps}")
    unmasked_from = max_steps - unmasked_tail_steps if unmasked_tail_steps else None
    return TokenMasker(cfg.mask_ratio, cfg.mask_mode, patches, cfg.kept_patches(patches), seed, unmasked_from)
