"""The model behind one seam: what the methods (rid.py), LaSRO's surrogate, eval, export and the
benchmarks know of a text-to-image model, and nothing else of it is touched elsewhere.

A backbone provides
    conditioning(prompts, guidance)   prompts → what the denoiser reads (hidden states, pooled
                                      embeddings, time ids), CFG-batched [uncond; cond]
    predict(z, t, cond, guidance)     the denoiser call with CFG → the model's prediction (ε, v or x₀);
                                      sampler(...).x0 turns it into x̂₀
    sampler(steps, kind, generator)   built from the model directory's scheduler config (samplers.py)
    decode(z)                         latents → images (B, 3, H, W) in [0, 1]
    latent_shape, set_resolution      the latent for a resolution
    denoiser                          the module the adapter group wraps (rid.inject)
    lora_keys(layer), kohya_keys(layer)   the LoRA exports' keys of one wrapped layer (diffusers, kohya)
and, for LaSRO's latent surrogate, `surrogate_encoder(unet)` / `encoder_features(enc, z, cond)` /
`encoder_widths(enc)` below; each file's LORA_SHAPES, its LoRA-target layer shapes at its native
resolution, which the kernel benchmarks read through `lora_shapes()` (no model is built).

Which backbone a model gets is read from its model_index.json's pipeline class (`REGISTRY`).
Adding one: a file here with a Backbone subclass, `load(model, model_id, index, device, dtype)`
(index: the model_index.json dict) and LORA_SHAPES, and one line in REGISTRY naming the pipeline class it serves.
"""
from __future__ import annotations

import json
import os
from importlib import import_module

import torch
from torch import nn

import samplers

# diffusers pipeline class (model_index.json's "_class_name") → module in this package
REGISTRY = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}


def lora_shapes() -> dict:
    """{model: [(where, tokens per image, in, out), …]}: every registered file's LORA_SHAPES, in REGISTRY's
    order (sd15, sdxl, sd3, flux): the layer shapes the kernel compile matrix and gpu-check run."""
    shapes = {}
    for name in dict.fromkeys(REGISTRY.values()):
        shapes.update(import_module(f"backbones.{name}").LORA_SHAPES)
    return shapes


HOW = ("a local diffusers directory (what a pipeline's save_pretrained writes: model_index.json and "
       "its subfolders), or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5 available in "
       "the Hugging Face cache")


class Backbone:
    """The pieces every UNet-based latent diffusion backbone shares. Subclasses set `unet`, `vae`,
    `resolution`, `scheduler_config`, `_uncond` and implement `encode`, `uncond`, `_forward`."""

    lora_prefix = "unet"  # the export's key prefix: diffusers' pipe.load_lora_weights reads unet.<layer>

    # -- the denoiser and its latents ------------------------------------------------------------
    @property
    def denoiser(self) -> nn.Module:
        return self.unet

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell (8 for SD's VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE factor × the UNet's total downsampling."""
        return self.vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def set_resolution(self, px: int | None, flag: str = "resolution") -> None:
        """Generate px × px images (None: the model's default); ValueError naming `flag` otherwise."""
        m = self.resolution_multiple
        if px is not None and (isinstance(px, bool) or not isinstance(px, int) or px < m or px % m or px > 8192):
            raise ValueError(f"{flag} {px!r} is not allowed; allowed: a multiple of {m} (the VAE factor "
                             f"{self.vae_factor} × the UNet's downsampling) from {m} to 8192")
        self.resolution = px

    @property
    def latent_hw(self) -> tuple:
        if self.resolution is not None:
            return (self.resolution // self.vae_factor,) * 2
        s = self.unet.config.sample_size
        return (s, s) if isinstance(s, int) else tuple(s)

    @property
    def latent_shape(self) -> tuple:
        return (self.unet.config.in_channels, *self.latent_hw)

    # -- conditioning and the denoiser call ------------------------------------------------------
    @property
    def guidance_embedded(self) -> bool:
        """A UNet distilled with the guidance scale as an input (LCM's w-conditioning, time_cond_proj_dim):
        it takes w as an embedding instead of a CFG batch, as diffusers' pipelines do."""
        return getattr(self.unet.config, "time_cond_proj_dim", None) is not None

    def conditioning(self, prompts: list, guidance: float):
        """[uncond; cond] (2B, ...) for one CFG-batched denoiser call; just cond (B, ...) when guidance == 1
        or the UNet takes the guidance as an embedding."""
        cond = self.encode(prompts)
        if guidance == 1.0 or self.guidance_embedded:
            return cond
        if self._uncond is None:
            self._uncond = self.uncond()
        return self._cfg_batch(self._uncond, cond)

    def predict(self, z: torch.Tensor, t, cond, guidance: float) -> torch.Tensor:
        """CFG prediction p_u + w(p_c − p_u); uncond and cond batched in ONE denoiser call."""
        t = torch.as_tensor(t, device=z.device)
        if self.guidance_embedded:
            return self._forward(z, t, cond, guidance_embedding(guidance, len(z), self.unet.config.time_cond_proj_dim,
                                                               z))
        if guidance == 1.0:
            return self._forward(z, t, cond)
        out_u, out_c = self._forward(torch.cat([z, z]), t, cond).chunk(2)
        return out_u + guidance * (out_c - out_u)

    def sampler(self, steps: int, kind: str = "auto", generator: torch.Generator | None = None):
        """The sampler over `steps` steps from this model's scheduler config (kind, generator: samplers.build)."""
        return samplers.build(self.scheduler_config, steps, kind, generator)

    # -- pixels ----------------------------------------------------------------------------------
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, h, w) → images (B, 3, H, W) in [0, 1] (the one place [−1, 1] → [0, 1])."""
        c = self.vae.config
        z = z.to(self.vae.dtype)  # an fp32 VAE (force_upcast) under a half-precision denoiser: cast up here
        if getattr(c, "latents_mean", None) is not None and getattr(c, "latents_std", None) is not None:
            mean, std = (torch.tensor(v).view(1, -1, 1, 1).to(z) for v in (c.latents_mean, c.latents_std))
            x = self.vae.decode(z * std / c.scaling_factor + mean).sample
        else:
            x = self.vae.decode(z / c.scaling_factor).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)

    # -- export ----------------------------------------------------------------------------------
    def lora_keys(self, layer: str) -> tuple:
        """(A key, B key) of one wrapped layer in the diffusers/peft LoRA file (pipe.load_lora_weights)."""
        return f"{self.lora_prefix}.{layer}.lora_A.weight", f"{self.lora_prefix}.{layer}.lora_B.weight"

    def kohya_name(self, layer: str) -> str:
        """The layer's module name as kohya's sd-scripts writes it (SD-1.x: diffusers' own names)."""
        return layer

    def kohya_keys(self, layer: str) -> tuple:
        """(down, up, alpha) keys of one wrapped layer in a kohya-format LoRA file (A1111, ComfyUI; diffusers
        converts it): lora_unet_<module name with _ for .>.lora_down.weight / .lora_up.weight / .alpha."""
        stem = "lora_unet_" + self.kohya_name(layer).replace(".", "_")
        return f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"


def guidance_embedding(guidance: float, n: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    """(n, dim) sinusoidal embedding of w − 1 (×1000), as diffusers' get_guidance_scale_embedding (LCM)."""
    w = torch.tensor(guidance - 1).repeat(n) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2)).to(like.device, like.dtype)


class Cond:
    """A batch of conditioning beyond one hidden-state tensor: `hidden` (B, L, D) and named extras,
    each (B, ...) (SDXL: text_embeds (B, P), time_ids (B, 6)). Indexes, moves and casts like a tensor,
    so code that stores per-prompt conditioning (LaSRO's surrogate) need not know the backbone."""

    def __init__(self, hidden: torch.Tensor, **extra: torch.Tensor):
        self.hidden, self.extra = hidden, extra

    def __getitem__(self, idx) -> "Cond":
        return Cond(self.hidden[idx], **{k: v[idx] for k, v in self.extra.items()})

    def __len__(self) -> int:
        return len(self.hidden)

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def to(self, *args, **kwargs) -> "Cond":
        return Cond(self.hidden.to(*args, **kwargs), **{k: v.to(*args, **kwargs) for k, v in self.extra.items()})

    @staticmethod
    def cat(parts: list) -> "Cond":
        return Cond(torch.cat([p.hidden for p in parts]),
                    **{k: torch.cat([p.extra[k] for p in parts]) for k in parts[0].extra})

    def expand(self, n: int) -> "Cond":
        """A batch of one repeated n times (views, no copy)."""
        return Cond(self.hidden.expand(n, *self.hidden.shape[1:]),
                    **{k: v.expand(n, *v.shape[1:]) for k, v in self.extra.items()})


#### LaSRO's latent surrogate reads the frozen base denoiser's encoder ####

def surrogate_encoder(unet: nn.Module) -> nn.ModuleDict:
    """The modules of a denoiser the latent surrogate reads (the caller copies them). A UNet: conv_in, the
    time embedding, the down blocks and the mid block; SDXL's added embedding of pooled text and time ids
    too. An MMDiT (SD3): the patch embedding, the timestep + pooled-text embedding, the context embedder and
    the first ⌈N/2⌉ of its N joint blocks — it has no down path, and the UNet's down + mid blocks are about
    the first half of its depth; the early blocks are where the prompt is mixed into the image tokens, the
    later ones specialise to the velocity (SD3-Medium: 12 of 24 blocks, half a transformer call). FLUX: the
    first ⌈N/2⌉ of its double-stream blocks (dev: 10 of 19, before 38 single-stream ones; its x_embedder and
    rotary pos_embed instead of a patch embedding), read at guidance 3.5 (FluxPipeline's default)."""
    if hasattr(unet, "transformer_blocks") and hasattr(unet, "context_embedder"):
        blocks = unet.transformer_blocks  # FLUX: its double-stream blocks (the single-stream ones follow them)
        parts = {k: getattr(unet, k) for k in ("pos_embed", "x_embedder", "time_text_embed", "context_embedder")
                 if getattr(unet, k, None) is not None}
        return nn.ModuleDict({**parts, "joint_blocks": nn.ModuleList(list(blocks)[:(len(blocks) + 1) // 2])})
    parts = ["conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block"]
    if getattr(unet, "add_embedding", None) is not None:
        parts += ["add_time_proj", "add_embedding"]
    return nn.ModuleDict({k: getattr(unet, k) for k in parts})


def encoder_widths(enc: nn.ModuleDict) -> list:
    """The widths of encoder_features' outputs, in order."""
    if "joint_blocks" in enc:
        return [enc["context_embedder"].out_features] * len(enc["joint_blocks"])
    return [b.resnets[-1].out_channels for b in enc["down_blocks"]] + [enc["mid_block"].resnets[-1].out_channels]


def encoder_features(enc: nn.ModuleDict, z: torch.Tensor, cond) -> list:
    """The encoder at timestep 0 with the prompt's conditioning (the backbone's, as its denoiser gets it)
    → the spatial means (B, width) of every down block's output and of the mid block's output (an MMDiT:
    the image tokens' mean after each joint block read)."""
    dtype = next(enc.parameters()).dtype
    z, emb = z.to(dtype), cond.to(dtype)
    if "joint_blocks" in enc:  # an MMDiT: σ = 0 (timestep 0), pooled text, the context through the joint blocks
        t = torch.zeros(z.shape[0], dtype=dtype, device=z.device)
        ctx, extra = enc["context_embedder"](emb.hidden), {}  # (B, L, D)
        if "x_embedder" in enc:  # FLUX: packed z (B, N, 64), rotary positions; dev: the guidance 3.5 (its default)
            import backbones.flux as flux

            n = int(round(z.shape[1] ** 0.5)) * 2  # square latents: N = (h/2)² tokens
            ids = torch.cat([torch.zeros(ctx.shape[1], 3, device=z.device), flux.image_ids(n, n, z.device)])
            extra["image_rotary_emb"] = enc["pos_embed"](ids)
            h = enc["x_embedder"](z)
            tte = enc["time_text_embed"]
            temb = (tte(t, torch.full_like(t, 3.5 * 1000), emb.extra["pooled"]) if hasattr(tte, "guidance_embedder")
                    else tte(t, emb.extra["pooled"]))
        else:  # SD3: patch embedding with its positional table
            h, temb = enc["pos_embed"](z), enc["time_text_embed"](t, emb.extra["pooled"])
        pooled = []
        for block in enc["joint_blocks"]:
            ctx, h = block(hidden_states=h, encoder_hidden_states=ctx, temb=temb, **extra)
            pooled.append(h.float().mean(1))
        return pooled
    t = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
    temb = enc["time_embedding"](enc["time_proj"](t).to(dtype))
    if "add_embedding" in enc:  # SDXL: pooled text ⊕ time-id features join the time embedding, as in its UNet
        time_embeds = enc["add_time_proj"](emb.extra["time_ids"].flatten()).reshape(len(z), -1)
        temb = temb + enc["add_embedding"](torch.cat([emb.extra["text_embeds"], time_embeds], -1).to(temb.dtype))
    if isinstance(emb, Cond):
        emb = emb.hidden
    h = enc["conv_in"](z)
    pooled = []
    for block in enc["down_blocks"]:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(hidden_states=h, temb=temb, encoder_hidden_states=emb)
        else:
            h, _ = block(hidden_states=h, temb=temb)
        pooled.append(h.float().mean((2, 3)))
    mid = enc["mid_block"]
    h = mid(h, temb, encoder_hidden_states=emb) if getattr(mid, "has_cross_attention", False) else mid(h, temb)
    pooled.append(h.float().mean((2, 3)))
    return pooled


def import_failure(e: BaseException) -> str | None:
    """One line for an ImportError anywhere in e's chain (diffusers and transformers wrap them):
    the module that failed, the module whose import of it failed, and the installed versions;
    None when the chain holds no ImportError."""
    from importlib import metadata

    seen = set()
    while e is not None and id(e) not in seen and not isinstance(e, ImportError):
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    if e is None or not isinstance(e, ImportError):
        return None
    importer, tb = "?", e.__traceback__
    while tb is not None:  # the innermost frame outside importlib's own machinery
        name = tb.tb_frame.f_globals.get("__name__", "?")
        importer = importer if name.startswith(("importlib", "_frozen_importlib")) else name
        tb = tb.tb_next
    failed = e.name or "?"
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0]

    def version(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    versions = ", ".join(f"{d} {version(d)}" for d in ("torch", "diffusers", "transformers"))
    return f"importing {failed!r} failed in {importer} ({detail}); installed: {versions}"


def require_subfolders(model: str, names) -> None:
    """A local model directory must hold each of its backbone's component folders (a hub id is checked
    by from_pretrained)."""
    if os.path.isdir(model):
        missing = [s for s in names if not os.path.isdir(os.path.join(model, s))]
        if missing:
            raise ValueError(f"model={model!r} lacks the subfolder(s) {missing}; expected {HOW}")


def loading_error(model: str, e: BaseException, how: str = HOW) -> BaseException:
    """The ValueError a backbone's load raises for a failure inside the libraries (one line)."""
    broken = import_failure(e)
    if broken:  # the libraries' own code, not the model: the line a user pastes into a bug report
        return ValueError(f"model={model!r} could not be loaded: {broken}")
    if isinstance(e, RuntimeError):
        return e
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ValueError(f"model={model!r} could not be loaded ({first}); expected {how}")


def resolve(model: str) -> tuple:
    """(model id to tag checkpoints with, its model_index.json as a dict or None when a directory has none)."""
    model = str(model)
    if os.path.isdir(model):
        index = os.path.join(model, "model_index.json")
        if not os.path.isfile(index):
            return os.path.realpath(model), None
        try:
            with open(index) as f:
                return os.path.realpath(model), json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"model={model!r}: its model_index.json is unreadable ({e}); expected {HOW}") from None
    if os.path.exists(model) or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ValueError(f"model={model!r} is neither a directory nor a hub id; expected {HOW}")
    try:
        from diffusers import DiffusionPipeline

        return model, dict(DiffusionPipeline.load_config(model))
    except (ImportError, OSError, ValueError, RuntimeError) as e:
        raise loading_error(model, e) from e


# load()'s one option, a run setting (train.py and eval.py --text-encoder-3, saved in run.json): whether an SD3
# directory's T5-XXL is loaded. "none" is StableDiffusion3Pipeline(text_encoder_3=None, tokenizer_3=None).
TEXT_ENCODER_3 = ("auto", "none")
TEXT_ENCODER_3_HELP = ("SD3/SD3.5 only: auto loads the T5-XXL text encoder (text_encoder_3) where the model directory "
                       "has one; none never reads it (4.76 B parameters: 9.5 GB less in bf16, 19 GB in fp32) and "
                       "conditions on zeros in its place, as StableDiffusion3Pipeline(text_encoder_3=None) does, at a "
                       "quality cost the model's authors state (docs/backbones.md)")


def load(model: str, device="cpu", dtype=torch.float32, text_encoder_3: str = "auto",
         name=lambda option: option) -> Backbone:
    """The backbone its model_index.json names, loaded (frozen, eval mode) on `device` in `dtype`. A
    directory without model_index.json is read as StableDiffusionPipeline (what rid always assumed).
    text_encoder_3: TEXT_ENCODER_3_HELP; `name` turns the option's name into what the user typed (a CLI flag)."""
    if text_encoder_3 not in TEXT_ENCODER_3:
        raise ValueError(f"{name('text_encoder_3')} {text_encoder_3!r} is not allowed; allowed: {', '.join(TEXT_ENCODER_3)}")
    model_id, index = resolve(model)
    cls = (index or {}).get("_class_name", "StableDiffusionPipeline")
    if cls not in REGISTRY:
        raise ValueError(f"model={str(model)!r} is a {cls} (model_index.json); supported pipeline classes: "
                         f"{', '.join(REGISTRY)}")
    if text_encoder_3 != "auto" and REGISTRY[cls] != "sd3":
        raise ValueError(f"{name('text_encoder_3')} {text_encoder_3!r} is not allowed for model={str(model)!r}, a {cls}; "
                         "allowed: auto (only a StableDiffusion3Pipeline has a text_encoder_3 to leave out)")
    options = {"text_encoder_3": text_encoder_3} if REGISTRY[cls] == "sd3" else {}
    return import_module(f"backbones.{REGISTRY[cls]}").load(str(model), model_id, index or {}, device, dtype, **options)
