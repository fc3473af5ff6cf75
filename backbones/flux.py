"""FLUX.1 dev and schnell (FluxPipeline): a double- and single-stream MMDiT (FluxTransformer2DModel) on a
rectified flow, CLIP-L (pooled) + T5 (sequence), a 16-channel VAE.

Latents live packed, as the transformer reads them: (B, 16, h, w) → 2×2 patches → (B, h/2·w/2, 64)
(`pack` / `unpack`); rid's noise, sampler and latent-space distance all work on the packed form and
decode unpacks. Positions are rotary: img_ids (h/2·w/2, 3) = (0, row, col) per patch, txt_ids (L, 3) zeros.
Conditioning, as FluxPipeline.encode_prompt makes it: hidden = T5's last states (B, 512, 4096),
pooled = CLIP-L's pooler output (B, 768). No CFG batch: the guidance-distilled dev model takes the
guidance scale as an embedding (guidance_embeds: a (B,) tensor of w), schnell ignores it (FluxPipeline's
true CFG with a negative prompt is not used). The transformer takes timestep σ (= t/1000) and multiplies
by 1000 itself. Sampler: samplers.Flow with the pipeline's sigmas linspace(1, 1/n, n) and, for dev, the
dynamic shift μ of the image token count h/2·w/2. Decode: unpack, z / 0.3611 + 0.1159 (from the VAE config).
LoRA targets: diffusers' train_dreambooth_lora_flux.py's (attention of both streams, the single blocks'
q/k/v, both feed-forwards); the file's keys carry the "transformer." prefix (FluxLoraLoaderMixin).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

import samplers
from backbones import Backbone, Cond, loading_error, require_subfolders

LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")

# Every LoRA-target linear (attention q/k/v/out, the transformer feed-forward DRaFT adapts, and the text
# stream's twins add_q/k/v_proj, to_add_out, ff_context, which diffusers' SD3/FLUX LoRA scripts target) at
# the native resolution: (where, tokens per image, in, out) from the diffusers config; M = batch · tokens.
# The kernel compile matrix and gpu-check run these (rid_kernels/bench.py, via backbones.lora_shapes()).
# FLUX.1-dev, 1024²: width 3072 (24 heads × 128); 19 double blocks as SD3's with 4096 image and 512 T5 tokens,
# feed-forward 3072 → 12288; 38 single blocks on the joint 4608 tokens: q/k/v, proj_mlp 3072 → 12288, proj_out
# (3072 + 12288) → 3072. Guidance-distilled: batch = images, no CFG doubling.
LORA_SHAPES = {
    "flux": [("image q/k/v/out", 4096, 3072, 3072), ("text add_q/k/v, to_add_out", 512, 3072, 3072),
             ("image ff in", 4096, 3072, 12288), ("image ff out", 4096, 12288, 3072),
             ("text ff in", 512, 3072, 12288), ("text ff out", 512, 12288, 3072),
             ("single q/k/v", 4608, 3072, 3072), ("single proj_mlp", 4608, 3072, 12288),
             ("single proj_out", 4608, 15360, 3072)],
}

MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default max_sequence_length


def pack(z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, h/2·w/2, 4C): each 2×2 patch one token (FluxPipeline._pack_latents)."""
    B, C, h, w = z.shape
    return z.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), C * 4)


def unpack(z: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2·w/2, 4C) → (B, C, h, w), pack's inverse (FluxPipeline._unpack_latents; h, w in latent cells)."""
    B, _, c4 = z.shape
    return z.view(B, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, c4 // 4, h, w)


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(h/2·w/2, 3): (0, row, col) of every packed token (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


@dataclass
class Flux(Backbone):
    """FLUX.1's components, frozen and in eval mode."""
    transformer: nn.Module
    vae: nn.Module
    text_encoder: nn.Module      # CLIP ViT-L (CLIPTextModel): the pooled embedding
    text_encoder_2: nn.Module    # T5-XXL encoder: the sequence
    tokenizer: object
    tokenizer_2: object
    _uncond: Cond | None = field(default=None, repr=False)  # unused: no CFG batch
    resolution: int | None = None
    scheduler_config: dict = field(default_factory=lambda: {"_class_name": samplers.FLOW_CLASS, "shift": 1.0})
    max_sequence_length: int = MAX_SEQUENCE_LENGTH
    default_sample_size: int = 128  # FluxPipeline's: 128 latent cells (1024 px) unless a resolution is set

    lora_prefix = "transformer"  # FluxLoraLoaderMixin reads transformer.<layer>

    @property
    def unet(self) -> nn.Module:
        """The denoiser under the name the CLIs still use (train.py, eval.py inject and load through it)."""
        return self.transformer

    @property
    def guidance_embedded(self) -> bool:
        return True  # dev: w as an embedding; schnell: no guidance at all. Never a CFG batch.

    @property
    def resolution_multiple(self) -> int:
        return self.vae_factor * 2  # packing needs even latent sides

    @property
    def latent_hw(self) -> tuple:
        s = self.resolution // self.vae_factor if self.resolution is not None else self.default_sample_size
        return (s, s)

    @property
    def latent_shape(self) -> tuple:
        """The packed latent: (h/2·w/2 tokens, 4·16 channels)."""
        h, w = self.latent_hw
        return ((h // 2) * (w // 2), self.transformer.config.in_channels)

    def sampler(self, steps: int, kind: str = "auto", generator: torch.Generator | None = None):
        """samplers.Flow with FluxPipeline's sigmas and, where the config shifts dynamically (dev), μ of the
        image token count."""
        mu = None
        if self.scheduler_config.get("use_dynamic_shifting"):
            mu = samplers.flow_mu(self.scheduler_config, self.latent_shape[0], max_shift=1.15)
        return samplers.build(self.scheduler_config, steps, kind, generator, mu=mu, pipeline_sigmas=True)

    # -- conditioning --------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list) -> Cond:
        """Prompts → Cond(hidden = T5 states (B, L, D), pooled = CLIP pooler output (B, P))."""
        prompts = list(prompts)
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        pooled = self.text_encoder(ids.to(self.text_encoder.device), output_hidden_states=False).pooler_output
        ids = self.tokenizer_2(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                               return_tensors="pt").input_ids
        hidden = self.text_encoder_2(ids.to(self.text_encoder_2.device), output_hidden_states=False)[0]
        return Cond(hidden.to(self.device, self.dtype), pooled=pooled.to(self.device, self.dtype))

    def conditioning(self, prompts: list, guidance: float) -> Cond:
        return self.encode(prompts)

    def predict(self, z: torch.Tensor, t, cond: Cond, guidance: float) -> torch.Tensor:
        """v from one transformer call: timestep t/1000, dev's guidance embedding of w, the rotary ids."""
        t = torch.as_tensor(t, device=z.device).expand(len(z)).to(z.dtype)
        g = None
        if self.transformer.config.guidance_embeds:
            g = torch.full([1], guidance, device=z.device, dtype=torch.float32).expand(len(z))
        h, w = self.latent_hw
        return self.transformer(hidden_states=z, timestep=t / 1000, guidance=g, pooled_projections=cond.extra["pooled"],
                                encoder_hidden_states=cond.hidden,
                                txt_ids=torch.zeros(cond.hidden.shape[1], 3, device=z.device, dtype=cond.hidden.dtype),
                                img_ids=image_ids(h, w, z.device, z.dtype)).sample

    # -- pixels ----------------------------------------------------------------------------------------
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Packed latents (B, N, 64) → images (B, 3, H, W) in [0, 1]: unpack, z / scaling_factor + shift_factor."""
        c = self.vae.config
        z = unpack(z.to(self.vae.dtype), *self.latent_hw) / c.scaling_factor + (c.shift_factor or 0.0)
        return (self.vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1)

    def kohya_keys(self, layer: str) -> tuple:
        raise ValueError("a kohya-format LoRA export is for UNet models (SD, SDXL); FLUX exports the diffusers "
                         "format (lora_keys), which FluxPipeline.load_lora_weights reads")


SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def load(model: str, model_id: str, index: dict, device="cpu", dtype=torch.float32) -> Flux:
    """The components and the scheduler config from a local diffusers-layout dir or a hub id."""
    require_subfolders(model, SUBFOLDERS)
    try:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

        transformer = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype)
        text_encoder_2 = T5EncoderModel.from_pretrained(model, subfolder="text_encoder_2", dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
        tokenizer_2 = AutoTokenizer.from_pretrained(model, subfolder="tokenizer_2")
        config = dict(FlowMatchEulerDiscreteScheduler.load_config(model, subfolder="scheduler"))
    except (ImportError, OSError, ValueError, RuntimeError) as e:
        raise loading_error(model, e) from e
    for m in (transformer, vae, text_encoder, text_encoder_2):
        m.to(device).eval().requires_grad_(False)
    transformer.rid_base_model = model_id
    transformer.rid_lora_targets = LORA_TARGETS
    return Flux(transformer, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler_config=config)
