"""SDXL, SDXL-Turbo, SSD-1B, LCM-SSD-1B (StableDiffusionXLPipeline): one UNet, two CLIP text encoders.

Conditioning, as StableDiffusionXLPipeline.encode_prompt and _get_add_time_ids make it:
    hidden       (B, 77, 768 + 1280)  both encoders' penultimate hidden states, concatenated
    text_embeds  (B, 1280)            the second encoder's pooled, projected embedding
    time_ids     (B, 6)               (original H, W, crop top, left, target H, W) = (H, W, 0, 0, H, W)
The unconditional branch is all zeros where the directory's model_index.json says
force_zeros_for_empty_prompt (SDXL base, Turbo), else the "" prompt's; it shares the time ids.
The VAE (scaling 0.13025) runs in fp32 when its config says force_upcast and the model is fp16/bf16
(SDXL's VAE overflows in half precision). The default resolution is the UNet's sample_size × 8 (1024).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

import samplers
from backbones import Backbone, Cond, loading_error, require_subfolders
from backbones.sd import scheduler_config


@dataclass
class SDXL(Backbone):
    """SDXL's components, frozen and in eval mode."""
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module      # CLIP ViT-L (CLIPTextModel)
    text_encoder_2: nn.Module    # OpenCLIP ViT-bigG (CLIPTextModelWithProjection): the pooled embedding
    tokenizer: object
    tokenizer_2: object
    force_zeros: bool = True     # model_index.json's force_zeros_for_empty_prompt: uncond = zeros
    _uncond: Cond | None = field(default=None, repr=False)  # cached unconditional branch (1, ...)
    resolution: int | None = None
    scheduler_config: dict = field(default_factory=lambda: dict(samplers.SD15_SCHEDULER))

    @property
    def size(self) -> tuple:
        """The image's (H, W) in pixels: what the time ids say as original and target size."""
        return tuple(s * self.vae_factor for s in self.latent_hw)

    @torch.no_grad()
    def encode(self, prompts: list) -> Cond:
        """Prompts → Cond(hidden (B, L, D₁+D₂), text_embeds (B, P), time_ids (B, 6)) as the pipeline makes them."""
        hidden, pooled = [], None
        for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(enc.device)
            out = enc(ids, output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds
                pooled = out[0]
            hidden.append(out.hidden_states[-2])  # penultimate layer, as SDXL was trained
        h, w = self.size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=self.dtype, device=self.device).repeat(len(prompts), 1)
        return Cond(torch.cat(hidden, -1).to(self.device, self.dtype), text_embeds=pooled.to(self.device, self.dtype),
                    time_ids=time_ids)

    def uncond(self) -> Cond:
        empty = self.encode([""])
        if self.force_zeros:
            return Cond(torch.zeros_like(empty.hidden), text_embeds=torch.zeros_like(empty.extra["text_embeds"]))
        return Cond(empty.hidden, text_embeds=empty.extra["text_embeds"])

    @staticmethod
    def _cfg_batch(uncond: Cond, cond: Cond) -> Cond:
        """[uncond; cond]; the unconditional branch takes the prompts' time ids (the pipeline's default)."""
        u = Cond(uncond.hidden, text_embeds=uncond.extra["text_embeds"]).expand(len(cond))
        return Cond.cat([Cond(u.hidden, text_embeds=u.extra["text_embeds"], time_ids=cond.extra["time_ids"]), cond])

    def _forward(self, z: torch.Tensor, t: torch.Tensor, cond: Cond, w_emb=None) -> torch.Tensor:
        return self.unet(z, t, encoder_hidden_states=cond.hidden, timestep_cond=w_emb,
                         added_cond_kwargs={"text_embeds": cond.extra["text_embeds"],
                                            "time_ids": cond.extra["time_ids"]}).sample


    def kohya_name(self, layer: str) -> str:
        """sd-scripts names SDXL's UNet as the original (sgm) code does: down_blocks.i.attentions.j →
        input_blocks.{(L+1)i + j + 1}.1, mid_block.attentions.0 → middle_block.1, up_blocks.i.attentions.j →
        output_blocks.{(L+1)i + j}.1 (L = layers_per_block), the rest of the name unchanged."""
        n = self.unet.config.layers_per_block + 1
        parts = layer.split(".")
        if parts[0] == "down_blocks":
            return ".".join(["input_blocks", str(n * int(parts[1]) + int(parts[3]) + 1), "1", *parts[4:]])
        if parts[0] == "up_blocks":
            return ".".join(["output_blocks", str(n * int(parts[1]) + int(parts[3])), "1", *parts[4:]])
        return ".".join(["middle_block", "1", *parts[3:]])  # mid_block.attentions.0.…


# Every LoRA-target linear (attention q/k/v/out and the transformer feed-forward DRaFT adapts) at the
# native resolution: (where, tokens per image, in, out) from the diffusers config; M = batch · tokens. The
# kernel compile matrix and gpu-check run these (rid_kernels/bench.py, via backbones.lora_shapes()).
# SDXL UNet, 1024² (latent 128²): attention at 64² (640 ch, 2 blocks) and 32² (1280 ch, 10 blocks, mid too),
# cross-attention on 77 tokens of width 2048 (two CLIPs), GEGLU feed-forward
LORA_SHAPES = {
    "sdxl": [("attn 64²", 4096, 640, 640), ("attn 32²", 1024, 1280, 1280), ("cross k/v 64²", 77, 2048, 640),
             ("cross k/v 32²", 77, 2048, 1280), ("ff in 64²", 4096, 640, 5120), ("ff out 64²", 4096, 2560, 640),
             ("ff in 32²", 1024, 1280, 10240), ("ff out 32²", 1024, 5120, 1280)],
}

SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def load(model: str, model_id: str, index: dict, device="cpu", dtype=torch.float32) -> SDXL:
    """The six components and the scheduler config from a local diffusers-layout dir or a hub id."""
    require_subfolders(model, SUBFOLDERS)
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=torch.float32)
        if not getattr(vae.config, "force_upcast", False):  # SDXL's VAE overflows in half precision: it
            vae = vae.to(dtype)  # stays fp32 (loaded as such, not rounded), decode casts the latents up
        text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2", dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
        tokenizer_2 = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2")
        config = scheduler_config(model)
    except (ImportError, OSError, ValueError, RuntimeError) as e:
        raise loading_error(model, e) from e
    for m in (unet, vae, text_encoder, text_encoder_2):
        m.to(device).eval().requires_grad_(False)
    unet.rid_base_model = model_id
    return SDXL(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2,
                force_zeros=bool(index.get("force_zeros_for_empty_prompt", True)), scheduler_config=config)
