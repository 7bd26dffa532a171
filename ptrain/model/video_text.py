"""``VideoTextModel``: a CLIP backbone (vision tower per frame, text tower) + a temporal head; returns features.

    from ptrain.model import ModelConfig, build_model
    from ptrain.loss import build_loss
    model = build_model(ModelConfig(clip="tiny", head="seqTransf", frame_size=32))
    out = model(frames_BTCHW, frame_mask_BT, input_ids_BL, attention_mask_BL)   # features (see forward)
    loss, stats = build_loss(model.cfg)(out, group_ids_B)                         # the step computes the loss
    out = model(..., token_keep=keep_BTK)   # training with token masking: kept patch positions (ptrain.masking)

    text_N = model.encode_text(["a dog runs"])              # or ids [N, L] (+ attention_mask)
    video_M = model.encode_video(frames_BTCHW, frame_mask_BT)
    logits_NM = model.similarity(text_N, video_M)           # every head, tight and TAB included

Features (what ``encode_*`` return; concatenate chunks along dim 0):
- loose heads: L2-normalised rows [N, D]; similarity = logit_scale * text @ video.T.
- TAB: rows [N, 2D] = [sqrt(w) * global, sqrt(1-w) * alignment], so the same dot product gives
  w * S_global + (1-w) * S_TAB (CLIP2Video's fused score).
- tightTransf: text = raw EOT features [N, D]; video = frame features [M, T, D] with padded frames
  zeroed (the mask is recovered as "row is non-zero"); similarity runs the cross encoder per pair.

Parameter groups: CLIP backbone parameters live under ``clip.``; ``param_group_names()`` returns
``{"clip": [...], "new": [...]}`` with ``logit_scale`` in "clip" (CLIP4Clip trains it at the CLIP LR).

Shapes: B batch, T frames, C=3, H=W=frame_size, L words, D joint width, N/M text/video rows.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ptrain.model.clip import build_clip
from ptrain.model.config import CLIP_MEAN, CLIP_STD, ModelConfig
from ptrain.model.registry import build_head_class, global_spec, head_flops, head_spec, transformer_flops


def reverse_clips(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Each clip's real frames (or frame features) in reverse order; padding stays at the end."""
    n_B = mask_BT.long().sum(1).to(x_BT.device)
    t_T = torch.arange(x_BT.shape[1], device=x_BT.device)
    idx_BT = torch.where(t_T[None] < n_B[:, None], n_B[:, None] - 1 - t_T[None], t_T[None])
    return x_BT[torch.arange(x_BT.shape[0], device=x_BT.device)[:, None], idx_BT]


class LogitScale(nn.Module):
    """The learnable temperature: a 1-D log-scale parameter (DeepSpeed rejects 0-dim ones).

    ``forward()`` returns ``exp(min(log_scale, ln max_scale))``. The clamp alone is not enough in
    training: above the bound its gradient is exactly zero, so a parameter that an optimizer step
    pushed past ln ``max_scale`` gets no gradient through the loss and cannot come back (Adam's
    momentum and weight decay may even move it further). The trainer therefore also clamps it after
    every optimizer step, as CLIP4Clip does, in DeepSpeed's fp32 master copy
    (``ptrain.engine.Engine.clamp_``); a plain PyTorch loop calls ``clamp_()`` after its step.
    The two together bound the parameter itself, and the clamp in forward keeps every use of the
    scale within the bound."""

    def __init__(self, init_scale: float, max_scale: float = 100.0):
        super().__init__()
        self.max_log = math.log(max_scale)
        self.log_scale = nn.Parameter(torch.tensor([math.log(init_scale)]))

    def forward(self) -> torch.Tensor:
        return self.log_scale.clamp(max=self.max_log).exp().squeeze(0)

    @torch.no_grad()
    def clamp_(self) -> "LogitScale":
        """Clamp the parameter's data to at most ln ``max_scale`` in place (call after each step of a
        plain PyTorch optimizer; under DeepSpeed the master copy lives in the optimizer: use
        ``ptrain.engine.Engine.clamp_``)."""
        self.log_scale.data.clamp_(max=self.max_log)
        return self


class VideoTextModel(nn.Module):
    """CLIP (``self.clip``, a ``transformers.CLIPModel`` without its 0-dim logit_scale) + ``self.head``
    (+ ``self.tab`` for head=TAB) + ``self.logit_scale``. Build with ``build_model`` or ``ptrain.load``."""

    def __init__(self, cfg: ModelConfig, clip, logit_scale: float, init_from_clip: bool = True):
        super().__init__()
        self.cfg = cfg
        self.clip = clip
        self.logit_scale = LogitScale(cfg.logit_scale_init or logit_scale, cfg.max_logit_scale)
        text_cfg = clip.config.text_config
        dim, heads = clip.config.projection_dim, text_cfg.num_attention_heads
        if dim % heads:
            heads = max(h for h in range(1, dim + 1) if dim % h == 0 and h <= heads)
        positions = max(text_cfg.max_position_embeddings, cfg.num_frames)
        self.spec, global_head = head_spec(cfg.head), global_spec(cfg)
        self.head = build_head_class(global_head).from_config(cfg, dim, heads, positions)
        self.max_frames = getattr(self.head, "max_frames", positions)
        self.tab = build_head_class(self.spec).from_config(cfg, dim, heads, positions) if self.spec.alignment else None
        # New modules start from CLIP's text blocks / position table, like the papers (skipped when
        # the caller loads a full state dict next).
        ok = not init_from_clip or self.head.init_from_clip(clip) is not False
        if init_from_clip and self.tab is not None:
            ok &= self.tab.init_from_clip(clip)
        if not ok:
            warnings.warn(
                f"head {cfg.head}: some head modules keep a random init instead of copying CLIP text blocks "
                f"(CLIP text: width {text_cfg.hidden_size}, {text_cfg.num_hidden_layers} blocks; head: width {dim}, "
                f"cross_layers={cfg.cross_layers}).",
                stacklevel=2,
            )
        if cfg.linear_patch == "3d":
            # The 3D conv replaces the 2D one; keep the 2D weights (exported for HF) but frozen.
            clip.vision_model.embeddings.patch_embedding.weight.requires_grad_(False)
        if self.is_tight:
            self.logit_scale.log_scale.requires_grad_(False)  # the cross encoder's score has no temperature
        if cfg.grad_checkpointing:
            clip.gradient_checkpointing_enable()
        self.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self._tokenizer = None
        # Where ``tokenize`` reads its vocabulary: set by ``ptrain.load`` to the export's own copy;
        # None = ``cfg.tokenizer`` ('' = the CLIP BPE file shipped in ptrain/model/).
        self.tokenizer_path: str | None = None

    # ------------------------------------------------------------------------------------------
    # encoders

    @property
    def is_tight(self) -> bool:
        return self.spec.tight

    def _param_dtype(self) -> torch.dtype:
        return self.clip.visual_projection.weight.dtype

    @property
    def num_patches(self) -> int:
        """Patch tokens per frame (N, without the class token) on the full grid."""
        vc = self.clip.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2

    def frame_features(self, frames_BTCHW: torch.Tensor, frame_mask: torch.Tensor | None = None,
                       token_keep: torch.Tensor | None = None) -> torch.Tensor:
        """CLIP image features of every frame -> [B, T, D] (padded frames are encoded too).

        ``token_keep`` (training's token masking, ``ptrain.masking``): LongTensor [B, T, K] (or [B, 1, K], one set
        per clip) of the patch positions 0..N-1 each frame keeps; the vision transformer then runs on the class
        token + those K tokens only. The embeddings (2D or 3D patch) are computed on the full grid and their
        full-grid position embeddings added before the kept tokens are gathered, so a kept token carries the
        position it has in an unmasked forward. None = every token (evaluation, exports).

        ``frames_BTCHW``: uint8 RGB (normalised here with CLIP's mean/std) or floats already
        normalised. ``frame_mask`` [B, T] (1 = real frame): padded frames are set to exactly 0 in
        normalised pixel space before the patch embedding, whatever their pixels (the loader pads
        with black uint8 frames). That is what the references' loaders feed (``np.zeros``, then the
        real, already normalised frames), and it matters where a padded frame reaches a real one:
        the 3D patch kernel and CLIP2Video's (compat) difference token after the last real frame."""
        if frames_BTCHW.dim() != 5:
            raise ValueError(f"frames must be [B, T, 3, H, W], got shape {tuple(frames_BTCHW.shape)}.")
        B, T, C, H, W = frames_BTCHW.shape
        size = self.clip.config.vision_config.image_size
        if C != 3 or H != size or W != size:
            raise ValueError(
                f"frames are {C}x{H}x{W} but the model expects 3x{size}x{size} (model.frame_size); "
                "resize and centre-crop frames to the model's frame size."
            )
        if T > self.max_frames:
            raise ValueError(f"clips have {T} frames but the head's frame position table has {self.max_frames} rows; "
                             f"build the model with num_frames >= {T}.")
        if frame_mask is not None and tuple(frame_mask.shape) != (B, T):
            raise ValueError(f"frame_mask must be [B, T] = [{B}, {T}] like the frames, got shape {tuple(frame_mask.shape)}.")
        x = frames_BTCHW.reshape(B * T, C, H, W)
        if x.dtype == torch.uint8:
            x = (x.float() / 255.0 - self.pixel_mean) / self.pixel_std
        x = x.to(self._param_dtype())
        if frame_mask is not None:
            real = frame_mask.to(x.device).reshape(B * T, 1, 1, 1) != 0
            x = torch.where(real, x, torch.zeros((), dtype=x.dtype, device=x.device))  # never the caller's tensor in place
        vm = self.clip.vision_model
        if self.cfg.linear_patch == "3d":
            h = vm.embeddings(x, num_frames=T)
        else:
            h = vm.embeddings(x)
        if token_keep is not None:
            h = self._keep_tokens(h, token_keep, B, T)
        h = vm.encoder(inputs_embeds=vm.pre_layrnorm(h)).last_hidden_state
        pooled = vm.post_layernorm(h[:, 0])
        return self.clip.visual_projection(pooled).view(B, T, -1)

    def _keep_tokens(self, h_BT_ND: torch.Tensor, keep: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """[B*T, 1+N, W] embeddings -> [B*T, 1+K, W]: the class token, then the kept patch tokens of each frame."""
        N = h_BT_ND.shape[1] - 1
        if keep.dim() != 3 or keep.shape[0] != B or keep.shape[1] not in (1, T) or not 1 <= keep.shape[2] <= N:
            raise ValueError(f"token_keep must be [B, T, K] or [B, 1, K] = [{B}, {T} or 1, 1..{N}] patch positions, "
                             f"got shape {tuple(keep.shape)}.")
        if keep.dtype != torch.long:
            raise ValueError(f"token_keep must be a LongTensor of patch positions, got {keep.dtype}.")
        keep_BTK = keep.to(h_BT_ND.device).expand(B, T, keep.shape[2]).reshape(B * T, -1)
        # position 0 is the class token: always kept, first
        idx = torch.cat([keep_BTK.new_zeros(B * T, 1), keep_BTK + 1], dim=1)
        return h_BT_ND.gather(1, idx.unsqueeze(-1).expand(-1, -1, h_BT_ND.shape[-1]))

    def text_features(self, input_ids_BL: torch.Tensor, all_tokens: bool = False):
        """EOT features [B, D] (the highest id marks EOT), and with ``all_tokens`` every token [B, L, D]."""
        h = self.clip.text_model(input_ids=input_ids_BL).last_hidden_state  # causal; padding never reaches EOT
        eot = input_ids_BL.argmax(dim=-1)
        rows = torch.arange(h.shape[0], device=h.device)
        if all_tokens:
            tokens_BLD = self.clip.text_projection(h)
            return tokens_BLD[rows, eot], tokens_BLD
        return self.clip.text_projection(h[rows, eot]), None

    def _video_vectors(self, video_BTD, mask_BT):
        """Loose heads: the normalised global vector, and for TAB the alignment vector too."""
        mask_BT = mask_BT.to(video_BTD.device)
        global_BD = self.head(video_BTD, mask_BT)
        tab_BD = self.tab.video(video_BTD, mask_BT, self.head) if self.tab is not None else None
        return global_BD, tab_BD

    # ------------------------------------------------------------------------------------------
    # training

    def forward(self, frames, frame_mask, input_ids, attention_mask, token_keep=None) -> dict[str, torch.Tensor]:
        """The training forward: the features the loss needs (``ptrain.loss.build_loss`` computes the loss).

        ``token_keep``: the patch tokens each frame keeps (see ``frame_features``; the trainer draws them with
        ``ptrain.masking.TokenMasker`` when ``model.mask_ratio > 0``). Training only: in eval mode it is refused,
        so evaluation always sees every token.

        Loose heads: ``text`` and ``video`` [B, D], L2-normalised, and ``logit_scale`` (clamped, with gradient);
        with ``reverse_negatives`` also ``video_rev`` (every clip played backwards); TAB adds ``text_tab``,
        ``video_tab`` (and ``video_tab_rev``). Tight heads: ``logits`` [B, B], the cross encoder's score of every
        local (text, video) pair, and the unused ``logit_scale`` (detached)."""
        if token_keep is not None and not self.training:
            raise ValueError("token_keep (token masking) is for training only; evaluation uses every token: call "
                             "model.train() first, or leave token_keep out.")
        # Heads run in the parameters' dtype (bf16 under DeepSpeed); the loss casts to fp32.
        video_BTD = self.frame_features(frames, frame_mask, token_keep)
        text_BD, tokens_BLD = self.text_features(input_ids, all_tokens=self.tab is not None)
        frame_mask = frame_mask.to(video_BTD.device)
        scale = self.logit_scale()
        if self.is_tight:
            return {"logits": self.head(text_BD, video_BTD, frame_mask), "logit_scale": scale.detach()}
        global_BD, tab_BD = self._video_vectors(video_BTD, frame_mask)
        out = {"text": F.normalize(text_BD, dim=-1), "video": global_BD, "logit_scale": scale}
        if self.cfg.reverse_negatives:
            # every clip played backwards, a negative for its own caption: the head must read frame order
            if self.cfg.linear_patch == "3d":  # the 3D kernel mixes neighbouring frames: encode them again
                # a frame keeps its own patches when the clip is played backwards
                rev_keep = token_keep if token_keep is None or token_keep.shape[1] == 1 else \
                    reverse_clips(token_keep, frame_mask)
                rev_BTD = self.frame_features(reverse_clips(frames, frame_mask), frame_mask, rev_keep)
            else:
                rev_BTD = reverse_clips(video_BTD, frame_mask)
            out["video_rev"], rev_tab_BD = self._video_vectors(rev_BTD, frame_mask)
            if rev_tab_BD is not None:
                out["video_tab_rev"] = rev_tab_BD
        if self.tab is not None:
            out["text_tab"] = self.tab.text(tokens_BLD, attention_mask.to(video_BTD.device))
            out["video_tab"] = tab_BD
        return out

    # ------------------------------------------------------------------------------------------
    # inference API

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP BPE ids and mask as LongTensors [N, max_words] (SOT + tokens + EOT, zero padded)."""
        if self._tokenizer is None:
            from ptrain.model.tokenizer import get_tokenizer

            self._tokenizer = get_tokenizer(self.tokenizer_path or self.cfg.tokenizer or None)
        ids, mask = self._tokenizer(list(texts), max_words=self.cfg.max_words)
        return torch.from_numpy(ids), torch.from_numpy(mask)

    @torch.no_grad()
    def encode_text(self, texts, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text features from a list of strings or ids [N, L] (see the module docstring for the layout)."""
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(texts, (list, tuple)):
            ids, attention_mask = self.tokenize(texts)
        else:
            ids = texts
        ids = ids.to(self.clip.visual_projection.weight.device).long()
        if attention_mask is None:
            # Real tokens run up to EOT (the highest id) inclusive.
            attention_mask = (torch.arange(ids.shape[1], device=ids.device) <= ids.argmax(-1, keepdim=True)).long()
        text_ND, tokens = self.text_features(ids, all_tokens=self.tab is not None)
        if self.is_tight:
            return text_ND.float()
        text_ND = F.normalize(text_ND.float(), dim=-1)
        if self.tab is None:
            return text_ND
        w = self.cfg.tab_weight
        tab = self.tab.text(tokens, attention_mask.to(ids.device)).float()
        return torch.cat([math.sqrt(w) * text_ND, math.sqrt(1 - w) * tab], dim=-1)

    @torch.no_grad()
    def encode_video(self, frames_BTCHW: torch.Tensor, frame_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Video features of uint8 (or normalised float) frames [B, T, 3, H, W]; mask 1 = real frame."""
        device = self.clip.visual_projection.weight.device
        frames_BTCHW = frames_BTCHW.to(device)
        if frame_mask_BT is None:
            frame_mask_BT = torch.ones(frames_BTCHW.shape[:2], dtype=torch.long, device=device)
        frame_mask_BT = frame_mask_BT.to(device)
        video_BTD = self.frame_features(frames_BTCHW, frame_mask_BT)
        if self.is_tight:
            return video_BTD.float() * frame_mask_BT.unsqueeze(-1).float()
        global_BD, tab_BD = self._video_vectors(video_BTD, frame_mask_BT)
        if tab_BD is None:
            return global_BD.float()
        w = self.cfg.tab_weight
        return torch.cat([math.sqrt(w) * global_BD.float(), math.sqrt(1 - w) * tab_BD.float()], dim=-1)

    @torch.no_grad()
    def similarity(self, text_features: torch.Tensor, video_features: torch.Tensor, pair_chunk: int = 4096) -> torch.Tensor:
        """Logits [N_text, N_video] from ``encode_text`` / ``encode_video`` outputs (any chunk of them)."""
        if self.is_tight:
            if video_features.dim() != 3:
                raise ValueError("tightTransf video features are [M, T, D] frame features from encode_video.")
            mask = (video_features.abs().sum(-1) > 0).long()
            dtype = self._param_dtype()
            return self.head(text_features.to(dtype), video_features.to(dtype), mask, pair_chunk=pair_chunk).float()
        return self.logit_scale().float() * text_features @ video_features.t()

    # ------------------------------------------------------------------------------------------
    # bookkeeping

    def param_group_names(self) -> dict[str, list[str]]:
        """Trainable parameter names: "clip" (backbone + logit_scale, the low-LR group) and "new"."""
        groups: dict[str, list[str]] = {"clip": [], "new": []}
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups["clip" if name.startswith(("clip.", "logit_scale.")) else "new"].append(name)
        return groups

    def flops_per_sample(self, tight_pairs: int = 1, mask_ratio: float | None = None) -> int:
        """Forward matmul FLOPs for one (video, text) pair (x3 for forward + backward).

        Counts 2 * m * n * k for every matmul: CLIP on every frame (patch conv, qkv/out/MLP, attention
        scores and values, projection), the text tower, and the head. tightTransf runs its cross
        encoder ``tight_pairs`` times per sample (training scores the local B x B pairs: pass B).
        ``mask_ratio`` (None = ``cfg.mask_ratio``, the training forward; 0 = evaluation): the vision transformer
        runs on the class token + the kept patch tokens; the patch embedding still covers the full grid."""
        cfg, vc, tc = self.cfg, self.clip.config.vision_config, self.clip.config.text_config
        dim, T, L = self.clip.config.projection_dim, cfg.num_frames, cfg.max_words

        patches = (vc.image_size // vc.patch_size) ** 2
        kept = patches if (cfg.mask_ratio if mask_ratio is None else mask_ratio) == 0 else \
            cfg.kept_patches(patches, mask_ratio)
        kernel = 3 * vc.patch_size**2 * (3 if cfg.linear_patch == "3d" else 1)
        frame = 2 * patches * kernel * vc.hidden_size + transformer_flops(
            kept + 1, vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers)
        frame += 2 * vc.hidden_size * dim
        text = transformer_flops(L, tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers)
        text += 2 * tc.hidden_size * dim * (L if self.tab is not None else 1)
        return int(T * frame + text + head_flops(cfg, dim, T, L, tight_pairs))


def build_model(cfg: ModelConfig) -> VideoTextModel:
    """Build the model for ``cfg`` (random / HF / OpenAI CLIP per ``cfg.clip``; heads from CLIP)."""
    clip, scale = build_clip(cfg.clip, cfg.frame_size, cfg.linear_patch)
    return VideoTextModel(cfg, clip, scale)
