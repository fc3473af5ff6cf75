"""The mini world's networks: the SD-1.5 classes at CPU scale, plus the domain CLIP and aesthetic MLP.

Sizes (full build; `--small` shrinks nothing here, only data and steps):
    VAE           AutoencoderKL 32×32×3 -> 4×8×8 (f = 4; SD-1.5 has f = 8 at 512²), channels 16/32/64
    text encoder  transformers CLIPTextModel, 3 layers × 64 wide, 24 tokens, quick_gelu (as SD's CLIP-L)
    tokenizer     transformers CLIPTokenizer whose vocab.json/merges.txt are the subset of CLIP's own
                  BPE (open_clip ships it) needed for the domain's words, so domain text is tokenised
                  exactly as CLIP tokenises it, with a ~600-token vocabulary instead of 49408
    UNet          UNet2DConditionModel on 8×8 latents, 2 levels (32/64 channels), a transformer block
                  (self-attn, cross-attn, GEGLU FF) per level, so rid's to_q/to_k/to_v/to_out.0 and
                  ff.net.* LoRA targets exist
    CLIP          open_clip CLIP: ViT 32×32 / patch 4, width 64 × 3 layers; text width 48 × 3 layers
                  with open_clip's default tokenizer (49408 tokens: the narrow width keeps that table at
                  2.4 M parameters); embed dim 64
    aesthetic     LAION-layout MLP (Linear 64→256→64→32→16→1, dropouts, no activations, as LAION's)
The flow world (mini/flow, mini/flow_build.py) adds one network:
    transformer   SD3Transformer2DModel (SD3-Medium's MMDiT, no qk-norm, no dual attention) on 8×8×4 latents,
                  patch 1 (64 image tokens), 6 joint blocks × 64 wide (2 heads × 32), context 128 = the two
                  CLIP slots' 64 + 64, pooled 128; 0.89 M parameters (the UNet: 1.08 M)
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from torch import nn

from . import domain

TOKENS = 24                          # text context length; the longest caption is 21 tokens with bos/eos
LATENT = (4, 8, 8)                   # (C, h, w) of the VAE latents

# SD-1.5's noise schedule and samplers (scheduler/scheduler_config.json of runwayml/stable-diffusion-v1-5)
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                trained_betas=None)

# The flow world's scheduler (FlowMatchEulerDiscreteScheduler's config). SD3 pre-trained at 256² unshifted and
# shifts σ towards noise only above it (3.0 at 1024², its shipped config); the mini images (32²) are far below
# 256², so unshifted. Training draws its σ through the same shift (mini.flow_build.train_flow).
FLOW_SCHEDULE = dict(num_train_timesteps=1000, shift=1.0)

CLIP_CONFIG = {                       # open_clip model config (written to world/clip_config.json)
    "embed_dim": 64,
    "vision_cfg": {"image_size": domain.SIZE, "patch_size": 4, "width": 64, "layers": 3, "head_width": 32},
    "text_cfg": {"context_length": TOKENS, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 3},
}
AESTHETIC_DIMS = (256, 64, 32, 16)   # LAION: (1024, 128, 64, 16) on 768-d CLIP-L features


def vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT[0], sample_size=domain.SIZE,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8)


def unet(cross_attention_dim: int):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(sample_size=LATENT[1], in_channels=LATENT[0], out_channels=LATENT[0],
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=2,
                                cross_attention_dim=cross_attention_dim, norm_num_groups=16)


def flow_transformer(joint_attention_dim: int, pooled_projection_dim: int):
    from diffusers import SD3Transformer2DModel
    return SD3Transformer2DModel(sample_size=LATENT[1], patch_size=1, in_channels=LATENT[0], out_channels=LATENT[0],
                                 num_layers=6, attention_head_dim=32, num_attention_heads=2,
                                 joint_attention_dim=joint_attention_dim, caption_projection_dim=64,
                                 pooled_projection_dim=pooled_projection_dim, pos_embed_max_size=LATENT[1])


def text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=TOKENS, hidden_act="quick_gelu",
                         projection_dim=64, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(cfg)


def clip():
    import open_clip
    return open_clip.model.CLIP(**CLIP_CONFIG)


class AestheticMLP(nn.Module):
    """LAION's improved-aesthetic-predictor head: keys layers.{0,2,4,6,7}.{weight,bias}."""

    def __init__(self, dim: int, hidden=AESTHETIC_DIMS):
        super().__init__()
        h1, h2, h3, h4 = hidden
        self.layers = nn.Sequential(nn.Linear(dim, h1), nn.Dropout(0.2), nn.Linear(h1, h2), nn.Dropout(0.2),
                                    nn.Linear(h2, h3), nn.Dropout(0.1), nn.Linear(h3, h4), nn.Linear(h4, 1))

    def forward(self, x):             # (N, dim) normalised CLIP image embeddings -> (N,)
        return self.layers(x).squeeze(-1)


# ---------------------------------------------------------------------------- tokenizer

def domain_words() -> list[str]:
    text = " ".join([*domain.SHAPES, *domain.COLORS, *domain.SIZES, *domain.POSITIONS, *domain.PATTERNS,
                     "a and background ,"])
    return sorted(set(text.replace(",", " , ").split()))


def write_tokenizer(out: Path):
    """Write a CLIPTokenizer (vocab.json, merges.txt, configs) for the domain's words to `out`.

    Vocabulary = CLIP's 512 byte tokens (so any text still tokenises) + the merges CLIP's BPE applies
    to the domain's words, in CLIP's merge order, + <|startoftext|>, <|endoftext|>. BPE with a
    rank-ordered subset of merges that contains every merge applied to a word reproduces that word's
    tokenisation, so domain captions tokenise to the same token strings as with CLIP's full BPE."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    ranks = {tuple(m.split()): i for i, m in enumerate(lines)}
    used = set()
    for word in domain_words():
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:                             # CLIP's BPE loop, recording the merges it applies
            pair = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, float("inf")))
            if pair not in ranks:
                break
            used.add(pair)
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
    merges = sorted(used, key=ranks.__getitem__)
    base = list(bytes_to_unicode().values())
    vocab = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    CLIPTokenizer.from_pretrained(out, model_max_length=TOKENS).save_pretrained(out)
    return CLIPTokenizer.from_pretrained(out)
