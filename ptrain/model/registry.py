"""The head registry: one row per similarity head, the only table that names them (stdlib only, no torch).

    from ptrain.model.registry import HEADS, head_spec
    spec = head_spec("tightTransf")
    spec.tight                         # True: scores (text, video) pairs in a cross encoder -> local negatives only
    spec.flops(cfg, dim, T, L, pairs)  # forward matmul FLOPs of the head for one sample

``ModelConfig`` validates ``head`` against this table, ``VideoTextModel`` builds the head class it names, the FLOP
count and the training loop read its properties. Adding a head is one class in ``ptrain/model/heads.py`` (with a
``from_config(cfg, dim, heads, positions)`` classmethod) and one row here.

TAB is CLIP2Video's temporal alignment block beside a loose *global* head (``ModelConfig.tab_global``: TDB,
seqTransf or meanP); its row adds the alignment part, the global head's row does the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


def transformer_flops(tokens: int, width: int, mlp: int, layers: int) -> int:
    """Matmul FLOPs of ``layers`` pre-norm transformer blocks over ``tokens`` tokens (2*m*n*k per matmul)."""
    return layers * (2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width)


def _no_flops(cfg: Any, dim: int, T: int, L: int, pairs: int) -> int:
    return 0


def _lstm_flops(cfg: Any, dim: int, T: int, L: int, pairs: int) -> int:
    return T * 2 * 4 * dim * (2 * dim)


def _seq_flops(cfg: Any, dim: int, T: int, L: int, pairs: int) -> int:
    return transformer_flops(T, dim, 4 * dim, cfg.cross_layers)


def _tdb_flops(cfg: Any, dim: int, T: int, L: int, pairs: int) -> int:
    out = transformer_flops(2 * T - 1, dim, 4 * dim, cfg.cross_layers)
    if cfg.tdb_proj == "sigmoid_selfA":
        out += transformer_flops(T - 1, dim, 4 * dim, 1)
    elif cfg.tdb_proj == "sigmoid_mlp":
        out += 2 * (T - 1) * dim * dim
    return out


def _tight_flops(cfg: Any, dim: int, T: int, L: int, pairs: int) -> int:
    return pairs * (transformer_flops(T + 1, dim, 4 * dim, cfg.cross_layers) + 2 * dim * dim + 2 * dim)


def _tab_flops(cfg: Any, dim: int, T: int, L: int, pairs: int) -> int:
    """The alignment part of TAB (the global head's row counts the rest)."""
    S = (T + 1) // 2  # motion tokens from every 2nd frame
    out = {"TAB": transformer_flops(S, dim, 4 * dim, 1), "TAB_TDB": transformer_flops(2 * S - 1, dim, 4 * dim, 1)}.get(
        cfg.tab_motion, 0)
    tokens = T + (S if cfg.tab_motion != "none" else 0) + L
    return out + 2 * tokens * cfg.tab_centers * dim


@dataclass(frozen=True)
class HeadSpec:
    """What the rest of ptrain needs to know about a head."""

    name: str
    cls: str  # "module:Class" of the head module (built lazily: importing the registry never imports torch)
    summary: str
    flops: Callable[[Any, int, int, int, int], int]  # (model cfg, width, frames, words, cross pairs) -> forward FLOPs
    tight: bool = False  # scores pairs in a cross encoder: no temperature, local negatives only, [M, T, D] features
    frame_positions: bool = False  # has a frame position table (TAB's motion tokens borrow it)
    compat_quirks: tuple[str, ...] = ()  # what model.compat=true reproduces for this head (reference behaviour)
    alignment: bool = False  # TAB: an alignment block beside the global head named by tab_global


_HEAD_MAJOR = "head-major attention-mask layout of the reference transformer (changes padded batches only)"
_TDB_MASK = "TDB difference token masked with frame i's mask, not both frames' (off by one after the last real frame)"

HEADS: dict[str, HeadSpec] = {spec.name: spec for spec in (
    HeadSpec("meanP", "ptrain.model.heads:MeanP", "CLIP4Clip: parameter-free masked mean of the frame embeddings",
             _no_flops),
    HeadSpec("seqLSTM", "ptrain.model.heads:SeqLSTM", "CLIP4Clip: 1-layer LSTM over the frames + residual",
             _lstm_flops),
    HeadSpec("seqTransf", "ptrain.model.heads:SeqTransf", "CLIP4Clip: temporal transformer + residual",
             _seq_flops, frame_positions=True, compat_quirks=(_HEAD_MAJOR,)),
    HeadSpec("tightTransf", "ptrain.model.heads:TightTransf",
             "CLIP4Clip: cross encoder over [text; frames] scoring every pair", _tight_flops, tight=True,
             compat_quirks=(_HEAD_MAJOR,)),
    HeadSpec("TDB", "ptrain.model.heads:TDBHead", "CLIP2Video: temporal transformer over frames and difference tokens",
             _tdb_flops, frame_positions=True, compat_quirks=(_HEAD_MAJOR, _TDB_MASK)),
    HeadSpec("TAB", "ptrain.model.heads:TemporalAlignment",
             "CLIP2Video: temporal alignment block fused with the tab_global head", _tab_flops, alignment=True,
             compat_quirks=(_HEAD_MAJOR, _TDB_MASK)),
)}
HEAD_NAMES = tuple(HEADS)
# heads that can be TAB's global branch: loose ones (CLIP2Video's sim_type meanP / seqTransf, with or without TDB)
TAB_GLOBAL_HEADS = ("TDB", "seqTransf", "meanP")


def head_spec(name: str) -> HeadSpec:
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; known heads: {', '.join(HEAD_NAMES)}")
    return HEADS[name]


def global_spec(cfg: Any) -> HeadSpec:
    """The head that makes the global video vector (for TAB: its ``tab_global`` branch)."""
    return head_spec(cfg.tab_global if head_spec(cfg.head).alignment else cfg.head)


def head_flops(cfg: Any, dim: int, T: int, L: int, pairs: int = 1) -> int:
    """Forward FLOPs of the whole head of ``cfg`` (global branch + alignment) for one sample."""
    spec = head_spec(cfg.head)
    out = global_spec(cfg).flops(cfg, dim, T, L, pairs)
    return out + (spec.flops(cfg, dim, T, L, pairs) if spec.alignment else 0)


def head_label(head: str, tab_global: str = "TDB") -> str:
    """A head as the papers name it: ``seqTransf``; TAB with its global branch first, ``TDB+TAB`` (CLIP2Video)."""
    spec = HEADS.get(head)
    return f"{tab_global}+{head}" if spec is not None and spec.alignment else head


def build_head_class(spec: HeadSpec):
    import importlib

    module, cls = spec.cls.split(":")
    return getattr(importlib.import_module(module), cls)
