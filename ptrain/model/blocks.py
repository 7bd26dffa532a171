"""The transformer block the CLIP4Clip / CLIP2Video heads use, and CLIP-text-block initialisation.

A pre-LN residual block (``ln_1 -> attn -> + ; ln_2 -> mlp(c_fc, QuickGELU, c_proj) -> +``) with the
reference's parameter layout (one fused ``in_proj`` for q/k/v) so imported checkpoints map 1:1, and
LayerNorm eps 1e-12 (the reference's TF-style LayerNorm). Every parameter lives in a Linear or a
LayerNorm whose own forward uses it (ZeRO-3 gathers parameters in module forward hooks).

Masks are per-key: ``mask_BN`` 1 = real token. They become an additive -1e6 bias like the reference
(a fully masked row then attends uniformly instead of producing NaN). ``head_major=True`` reproduces
CLIP2Video's ``attn_mask.repeat(n_head, 1, 1)`` layout: sample b, head h gets the mask of sample
(b * H + h) mod B (a bug; only for parity with released checkpoints).

Shapes: B batch, N tokens, D width, H heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MASK_VALUE = -1e6  # the reference's additive mask value


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads.")
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x_BND: torch.Tensor, bias_BHNN: torch.Tensor | None) -> torch.Tensor:
        B, N, D = x_BND.shape
        q, k, v = self.in_proj(x_BND).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if bias_BHNN is not None:
            bias_BHNN = bias_BHNN.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias_BHNN)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = QuickGELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int = 4, eps: float = 1e-12):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, width * mlp_ratio)

    def forward(self, x_BND, bias_BHNN):
        x_BND = x_BND + self.attn(self.ln_1(x_BND), bias_BHNN)
        return x_BND + self.mlp(self.ln_2(x_BND))


def key_mask_bias(mask_BN: torch.Tensor, heads: int, head_major: bool = False) -> torch.Tensor:
    """Additive attention bias [B, H, 1, N] from a per-key mask (1 = attend)."""
    bias_BN = (1.0 - mask_BN.float()) * MASK_VALUE
    B, N = bias_BN.shape
    if head_major:
        # Index b*H + h of the repeated stack is sample (b*H + h) mod B, as in the reference.
        return bias_BN.repeat(heads, 1).view(B, heads, 1, N)
    return bias_BN.view(B, 1, 1, N).expand(B, heads, 1, N)


class Transformer(nn.Module):
    """A stack of reference blocks; key names ``resblocks.{i}.*`` as in CLIP4Clip/CLIP2Video."""

    def __init__(self, width: int, layers: int, heads: int, head_major: bool = False):
        super().__init__()
        self.heads, self.head_major = heads, head_major
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x_BND: torch.Tensor, mask_BN: torch.Tensor) -> torch.Tensor:
        bias = key_mask_bias(mask_BN, self.heads, self.head_major)
        for block in self.resblocks:
            x_BND = block(x_BND, bias)
        return x_BND


@torch.no_grad()
def copy_hf_clip_layer(block: ResidualAttentionBlock, layer) -> None:
    """Initialise a block from a ``transformers`` CLIPEncoderLayer (the papers' text-block init)."""
    attn = layer.self_attn
    block.attn.in_proj.weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    block.attn.in_proj.bias.copy_(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
    block.attn.out_proj.load_state_dict(attn.out_proj.state_dict())
    block.ln_1.load_state_dict(layer.layer_norm1.state_dict())
    block.ln_2.load_state_dict(layer.layer_norm2.state_dict())
    block.mlp.c_fc.load_state_dict(layer.mlp.fc1.state_dict())
    block.mlp.c_proj.load_state_dict(layer.mlp.fc2.state_dict())


@torch.no_grad()
def init_transformer_from_clip_text(transformer: Transformer, text_layers) -> bool:
    """Copy CLIP text blocks 0..L-1 into ``transformer``. Returns False if some block could not be
    copied (CLIP has fewer text blocks, or another width); those keep their random init."""
    complete = len(text_layers) >= len(transformer.resblocks)
    for block, layer in zip(transformer.resblocks, text_layers):
        if layer.self_attn.q_proj.weight.shape != block.attn.out_proj.weight.shape:
            return False
        if layer.mlp.fc1.weight.shape != block.mlp.c_fc.weight.shape:
            return False
        copy_hf_clip_layer(block, layer)
    return complete
