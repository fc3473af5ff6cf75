"""SD-1.5 / SD-2 (StableDiffusionPipeline): one UNet, one CLIP text encoder, the scheduler its
directory ships (SD-1.5: DDIM, scaled-linear betas, leading spacing, offset 1, ε-prediction).

Conditioning is the CLIP text encoder's last hidden states (B, L, D), padded to the tokenizer's max
length as SD does; the unconditional branch is the "" prompt's, computed once and cached.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

import samplers
from backbones import Backbone, loading_error, require_subfolders


@dataclass
class SD(Backbone):
    """SD-style components, frozen and in eval mode (rid.Models(unet, vae, text_encoder, tokenizer)
    builds one from modules; scheduler_config None: SD-1.5's)."""
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    _uncond: torch.Tensor | None = field(default=None, repr=False)  # cached "" embedding (1, L, D)
    resolution: int | None = None  # image side in pixels; None: the UNet's own sample_size × the VAE factor
    scheduler_config: dict = field(default_factory=lambda: dict(samplers.SD15_SCHEDULER))

    @torch.no_grad()
    def encode(self, prompts: list) -> torch.Tensor:
        """Prompts → CLIP last hidden states (B, L, D), padded to the tokenizer's max length as SD does."""
        tok = self.tokenizer
        ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids)[0].to(self.dtype)

    def uncond(self) -> torch.Tensor:
        return self.encode([""])  # (1, L, D)

    @staticmethod
    def _cfg_batch(uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return torch.cat([uncond.expand_as(cond), cond])  # (2B, L, D)

    def _forward(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, w_emb=None) -> torch.Tensor:
        if w_emb is None:
            return self.unet(z, t, encoder_hidden_states=cond).sample
        return self.unet(z, t, encoder_hidden_states=cond, timestep_cond=w_emb).sample


# Every LoRA-target linear (attention q/k/v/out and the transformer feed-forward DRaFT adapts) at the
# native resolution: (where, tokens per image, in, out) from the diffusers config; M = batch · tokens. The
# kernel compile matrix and gpu-check run these (rid_kernels/bench.py, via backbones.lora_shapes()).
# SD-1.5 UNet, 512² (latent 64²): channels 320/640/1280, one transformer block per attention, GEGLU
# feed-forward (C → 2·4C, 4C → C), cross-attention on 77 CLIP tokens of width 768
LORA_SHAPES = {
    "sd15": [("attn 64²", 4096, 320, 320), ("attn 32²", 1024, 640, 640), ("attn 16²", 256, 1280, 1280),
             ("attn 8² (mid)", 64, 1280, 1280), ("cross k/v 64²", 77, 768, 320), ("cross k/v 32²", 77, 768, 640),
             ("cross k/v 16²", 77, 768, 1280), ("ff in 64²", 4096, 320, 2560), ("ff out 64²", 4096, 1280, 320),
             ("ff in 32²", 1024, 640, 5120), ("ff out 32²", 1024, 2560, 640), ("ff in 16²", 256, 1280, 10240),
             ("ff out 16²", 256, 5120, 1280), ("ff in 8²", 64, 1280, 10240), ("ff out 8²", 64, 5120, 1280)],
}

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer")


def scheduler_config(model: str) -> dict:
    """The directory's scheduler/scheduler_config.json; SD-1.5's when it has none (older rid layouts)."""
    from diffusers import DDIMScheduler

    try:
        return dict(DDIMScheduler.load_config(model, subfolder="scheduler"))
    except (OSError, ValueError):
        return dict(samplers.SD15_SCHEDULER)


def load(model: str, model_id: str, index: dict, device="cpu", dtype=torch.float32) -> SD:
    """unet/vae/text_encoder/tokenizer/scheduler from a local diffusers-layout dir or a hub id."""
    require_subfolders(model, SUBFOLDERS)
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
        config = scheduler_config(model)
    except (ImportError, OSError, ValueError, RuntimeError) as e:
        raise loading_error(model, e) from e
    for m in (unet, vae, text_encoder):
        m.to(device).eval().requires_grad_(False)
    unet.rid_base_model = model_id  # read by rid.inject() to tag checkpoints with their base model
    return SD(unet, vae, text_encoder, tokenizer, scheduler_config=config)
