"""Build the mini flow world: an SD3-architecture model on a rectified flow, in the mini world's domain.

    python -m mini build-flow   ->   mini/flow/   (StableDiffusion3Pipeline.save_pretrained layout + flow.json)

It reuses the mini world (mini/world, read only), so every reward and metric applies unchanged:
    vae/             the world's AutoencoderKL, its weights file byte for byte. Its config gains shift_factor 0.0:
                     SD3's pipeline decodes z / scaling_factor + shift_factor and needs the key; the world's
                     latents are scaled (1 / std), not shifted
    text_encoder/,   the world's one CLIP text encoder (trained with its UNet) in both of SD3's CLIP slots (SD3:
    text_encoder_2/  CLIP-L and OpenCLIP-bigG), as CLIPTextModelWithProjection with an identity text_projection
                     (projection_dim = hidden = 64; the world's encoder has none), frozen as SD3's are. Each slot
                     gives its penultimate states (B, 24, 64) and pooled projected embedding (B, 64), both the same:
                     context (B, 24, 64 + 64), pooled (B, 128)
    text_encoder_3   none (model_index null), as SD3 allows: the context's T5 part is then 256 zero tokens
                     (StableDiffusion3Pipeline's max_sequence_length), so the transformer reads (B, 24 + 256, 128)
    tokenizer/,      the world's CLIPTokenizer (24 tokens), files byte for byte
    tokenizer_2/
    prompts, fid_ref, CLIP, hps model: the check's (flow.json), as the world's own build uses them
New: transformer/ (mini.models.flow_transformer) and scheduler/ (FlowMatchEulerDiscreteScheduler, models.FLOW_SCHEDULE).
Load it with rid.load_models("mini/flow") (backbones/sd3.py) or StableDiffusion3Pipeline.from_pretrained(
"mini/flow", text_encoder_3=None, tokenizer_3=None) (diffusers wants the absent T5 named).

Training follows SD3 (Esser et al. 2024) where it has a recipe: rectified flow x_σ = (1 − σ)x₀ + σε on the
VAE's scaled latents, the transformer predicts v = ε − x₀ at timestep σ·1000, plain MSE on v, σ drawn
logit-normal(0, 1) then shifted by the scheduler's shift, frozen text encoders. Otherwise as the UNet world
(mini.build.train_unet): 10 % empty captions for CFG, AdamW with warm-up + cosine, clipped gradients, EMA
weights, batch 128. Seeded; bit-exact for the same torch build and thread count.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from backbones.sd3 import RepeatedLastToken  # the 256 zero T5 tokens as one (training below, and rid's SD3 backbone)

from . import domain, models
from .build import (_begin, _log, _lr, _to_unit, caption_features, caption_scores, descend, fid, load_ema,
                    retrieval_top1)

T5_TOKENS = 256   # StableDiffusion3Pipeline's default max_sequence_length: the zero T5 tokens without a T5


@dataclass
class FlowConfig:
    seed: int = 0
    n_train_images: int = 24000   # rendered train-split scenes (as the UNet world's build)
    flow_steps: int = 2500        # batch 128; a step costs ~1.4 UNet-world steps (measured at batch 32, 1 thread),
    flow_batch: int = 128         # so 2500 fit the UNet's 3000-step share of the 30-minute budget
    flow_lr: float = 1e-3         # AdamW peak, 200 warm-up steps then cosine to 0 (the UNet world's)
    logit_mean: float = 0.0       # σ ~ sigmoid(N(logit_mean, logit_std²)): SD3's rf/lognorm(0.00, 1.00)
    logit_std: float = 1.0
    cfg_dropout: float = 0.1      # share of empty captions (the unconditional branch of CFG)
    eval_per_caption: int = 2     # generated samples per test caption for the checks
    steps: int = 20               # the flow model's default Euler steps ...
    guidance: float = 5.0         # ... and CFG scale (flow.json), as the UNet world's DDIM 20 / 5.0


def small_flow_config(seed: int = 0) -> FlowConfig:
    """Same architecture, a few steps: the reduced build the tests run (seconds)."""
    return FlowConfig(seed=seed, n_train_images=256, flow_steps=3, eval_per_caption=1, steps=4)


#### the world's parts, as SD3's pipeline takes them ####

def text_encoder_with_projection(world_model: Path):
    """The world's CLIPTextModel as CLIPTextModelWithProjection, text_projection = identity (hidden = projection)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    plain = CLIPTextModel.from_pretrained(world_model, subfolder="text_encoder")
    config = plain.config
    if config.projection_dim != config.hidden_size:
        raise ValueError(f"the world's text encoder has projection_dim {config.projection_dim} != hidden_size "
                         f"{config.hidden_size}; an identity text_projection needs them equal")
    enc = CLIPTextModelWithProjection(config)
    enc.text_model.load_state_dict(getattr(plain, "text_model", plain).state_dict())   # transformers 5: flat
    with torch.no_grad():
        enc.text_projection.weight.copy_(torch.eye(config.hidden_size))
    return enc.eval().requires_grad_(False)


def load_clip(path: Path):
    """An open_clip model of the world's config from its fp16 safetensors (clip.safetensors, hps.safetensors)."""
    from safetensors.torch import load_file
    model = models.clip()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval().requires_grad_(False)


@torch.no_grad()
def encode_captions(pipe, captions: list[str]):
    """Captions → SD3's conditioning as pipe.encode_prompt makes it, with ONE zero T5 token standing for the
    pipeline's 256 (RepeatedLastToken): hidden (K, 24 + 1, 128), pooled (K, 128)."""
    hidden, pooled = [], []
    for i in range(0, len(captions), 1024):
        h, _, p, _ = pipe.encode_prompt(captions[i:i + 1024], None, None, do_classifier_free_guidance=False,
                                        max_sequence_length=1)
        hidden.append(h)
        pooled.append(p)
    return torch.cat(hidden), torch.cat(pooled)


#### transformer ####

def train_flow(transformer, z0_all: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor, cap: torch.Tensor,
               empty: int, shift: float, cfg: FlowConfig):
    """Flow matching on the scaled latents z0_all (N, 4, 8, 8); caption n's conditioning is hidden/pooled[cap[n]],
    the empty caption's [empty]. Trains `transformer` in place (the attention processors restored after) and
    loads its EMA weights."""
    torch.manual_seed(cfg.seed + 7)
    processors = transformer.attn_processors
    transformer.set_attn_processor(RepeatedLastToken(T5_TOKENS))
    params = list(transformer.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.flow_lr, weight_decay=0.01)
    transformer.train()
    for step in range(cfg.flow_steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.flow_steps, cfg.flow_lr, warmup=200)
        idx = torch.randint(len(z0_all), (min(cfg.flow_batch, len(z0_all)),))
        z0 = z0_all[idx]                                              # (B, 4, 8, 8)
        drop = torch.rand(len(idx)) < cfg.cfg_dropout                 # caption dropout for CFG
        c = torch.where(drop, empty, cap[idx])
        # A point on the straight path from data to noise, at SD3's logit-normal σ under the scheduler's shift
        eps = torch.randn_like(z0)
        sigma = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(len(idx)))
        sigma = shift * sigma / (1 + (shift - 1) * sigma)             # (B,)
        s = sigma.view(-1, 1, 1, 1)
        zt = (1 - s) * z0 + s * eps
        # Predict the velocity ε − x₀
        v = transformer(hidden_states=zt, timestep=sigma * 1000, encoder_hidden_states=hidden[c],
                        pooled_projections=pooled[c]).sample
        loss = F.mse_loss(v, eps - z0)
        descend(opt, params, ema, loss, step)
        if step % 250 == 0 or step == cfg.flow_steps - 1:
            _log(f"flow step {step}/{cfg.flow_steps} loss {loss.item():.4f}")
    load_ema(params, ema)
    transformer.set_attn_processor(processors)
    return transformer.eval().requires_grad_(False)


#### the build ####

def load_pipeline(path: Path):
    """The flow world's StableDiffusion3Pipeline (diffusers needs the absent T5 named)."""
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_world(world: Path):
    need = ["world.json", "clip.safetensors", "hps.safetensors", "fid_ref.safetensors", "prompts/test.txt",
            *(f"model/{s}" for s in ("vae", "text_encoder", "tokenizer"))]
    missing = [n for n in need if not (world / n).exists()]
    if missing:
        raise ValueError(f"--world {world} is not a built mini world (missing {', '.join(missing)}); "
                         f"build it with `python -m mini build`")


def build_flow(out: Path, world: Path, cfg: FlowConfig, threads: int | None = None) -> dict:
    """Build the flow world from the mini world `world` into `out` (replaced atomically); returns flow.json's content."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline,
                           StableDiffusionPipeline)
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer
    out, world = Path(out), Path(world)
    _check_world(world)
    tmp, t0, c0 = _begin(out, "flow.json", "a mini flow world", threads)
    timings = {}

    #### the world's VAE, text encoder and tokenizer in SD3's slots; a new transformer ####
    wm = world / "model"
    vae = AutoencoderKL.from_pretrained(wm, subfolder="vae").eval().requires_grad_(False)
    vae.register_to_config(shift_factor=0.0)
    scaling = vae.config.scaling_factor
    text_encoder = text_encoder_with_projection(wm)
    tokenizer = CLIPTokenizer.from_pretrained(wm, subfolder="tokenizer")
    scheduler = FlowMatchEulerDiscreteScheduler(**models.FLOW_SCHEDULE)
    torch.manual_seed(cfg.seed + 6)
    width = 2 * text_encoder.config.hidden_size                      # the two CLIP slots side by side
    transformer = models.flow_transformer(joint_attention_dim=width, pooled_projection_dim=width)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                    text_encoder=text_encoder, tokenizer=tokenizer,
                                    text_encoder_2=text_encoder, tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)

    #### data: the world's train-split scenes, their latents and captions' conditioning ####
    t = time.time()
    imgs, captions = domain.sample(np.random.default_rng(cfg.seed + 10), cfg.n_train_images, "train")
    x = _to_unit(imgs) * 2 - 1                                        # (N, 3, 32, 32) in [-1, 1]
    with torch.no_grad():
        lat = torch.cat([vae.encode(x[i:i + 512]).latent_dist.mean for i in range(0, len(x), 512)])
    z0 = (lat - vae.config.shift_factor) * scaling                   # (N, 4, 8, 8), SD3's latent normalisation
    unique = sorted(set(captions)) + [""]
    row = {c: i for i, c in enumerate(unique)}
    hidden, pooled = encode_captions(pipe, unique)                    # (K, 25, 128), (K, 128)
    cap = torch.tensor([row[c] for c in captions])                   # (N,)
    timings["data"] = time.time() - t

    #### transformer ####
    t = time.time()
    train_flow(transformer, z0, hidden, pooled, cap, row[""], scheduler.config.shift, cfg)
    timings["flow"] = time.time() - t
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.copy(wm / "vae" / "diffusion_pytorch_model.safetensors", tmp / "vae")   # the world's, byte for byte
    vae_config = json.loads((wm / "vae" / "config.json").read_text())  # ... and its config (no local path in it)
    (tmp / "vae" / "config.json").write_text(json.dumps({**vae_config, "shift_factor": 0.0}, indent=2) + "\n")
    for sub in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(tmp / sub)
        shutil.copytree(wm / "tokenizer", tmp / sub)
    shutil.rmtree(tmp / "text_encoder_2")                            # one encoder, one file in both slots
    shutil.copytree(tmp / "text_encoder", tmp / "text_encoder_2")

    #### check: generate from the test captions with the defaults; retrieval, FID, hps (and the UNet world's) ####
    t = time.time()
    wj = json.loads((world / "world.json").read_text())
    test_prompts = (world / "prompts" / "test.txt").read_text().splitlines()
    clip, hps = load_clip(world / "clip.safetensors"), load_clip(world / "hps.safetensors")
    real = load_file(str(world / "fid_ref.safetensors"))["images"].float() / 255       # (M, 3, 32, 32)
    prompts = [p for p in test_prompts for _ in range(cfg.eval_per_caption)]
    labels = torch.arange(len(test_prompts)).repeat_interleave(cfg.eval_per_caption)
    hps_txt = caption_features(hps, test_prompts)[labels]

    def measure(p, steps, guidance):
        with torch.no_grad():
            x01 = p(prompts, num_inference_steps=steps, guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(cfg.seed + 20), output_type="pt").images
        u8 = (x01 * 255).round().byte().permute(0, 2, 3, 1).numpy()
        return {"clip_top1_generated_test": round(retrieval_top1(clip, x01, labels, test_prompts), 4),
                "fid_generated_test": round(fid(clip, real, x01), 3),
                "hps_generated_test": round(float(caption_scores(hps, x01, hps_txt).mean()), 4),
                "rating_mean_generated_test": round(float(domain.rating(u8).mean()), 3)}

    quality = measure(load_pipeline(tmp), cfg.steps, cfg.guidance)
    unet = StableDiffusionPipeline.from_pretrained(wm, safety_checker=None)
    unet.set_progress_bar_config(disable=True)
    unet_quality = measure(unet, wj["steps"], wj["guidance"])
    timings["check"] = time.time() - t
    _log(f"flow model: {quality}; the UNet world's under the same protocol: {unet_quality}")

    flow = {
        "image_size": domain.SIZE, "latent_shape": list(models.LATENT), "scaling_factor": scaling, "shift_factor": 0.0,
        "steps": cfg.steps, "guidance": cfg.guidance, "sampler": "flow-matching Euler (FlowMatchEulerDiscreteScheduler)",
        "scheduler": dict(models.FLOW_SCHEDULE),
        "world": {"reused": "vae (weights byte for byte, shift_factor 0.0 added), tokenizer "
                  "(byte for byte), text_encoder (+ identity text_projection) in both CLIP slots; prompts, "
                  "fid_ref, clip and hps models for the check"},
        "conditioning": f"context (B, {tokenizer.model_max_length} + {T5_TOKENS}, {width}): each CLIP slot's "
                        f"penultimate states side by side, then {T5_TOKENS} zero T5 tokens (no text_encoder_3); "
                        f"pooled (B, {width}): both slots' projected pooled embeddings",
        "training": {"objective": "rectified flow z_σ = (1 − σ)z₀ + σε, MSE on v = ε − z₀ at timestep 1000σ",
                     "sigma": f"sigmoid(N({cfg.logit_mean}, {cfg.logit_std}²)) shifted by the scheduler's shift",
                     "t5_tokens": f"trained as one token at logit + log {T5_TOKENS} (mini.flow_build.RepeatedLastToken)"},
        "quality": {**quality, "chance_top1": 1 / len(test_prompts),
                    "protocol": f"{cfg.eval_per_caption} sample(s) of each test caption at the default steps and "
                                f"guidance; top-1 caption retrieval by the domain CLIP; FID on its features to "
                                f"the world's fid_ref ({len(real)} images); hps = the world's hps model; rating = "
                                f"mini.domain.rating"},
        "unet_world_same_protocol": {**unet_quality, "steps": wj["steps"], "guidance": wj["guidance"]},
        "build": {"config": asdict(cfg), "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "transformer_parameters": sum(p.numel() for p in transformer.parameters()),
                  "seconds": {k: round(v, 1) for k, v in timings.items()},
                  "wall_seconds": round(time.time() - t0, 1),
                  "cpu_seconds": round(time.process_time() - c0, 1)},
    }
    (tmp / "flow.json").write_text(json.dumps(flow, indent=2, ensure_ascii=False) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    _log(f"flow world done in {flow['build']['wall_seconds']:.0f} s wall, {flow['build']['cpu_seconds']:.0f} s CPU -> {out}")
    return flow
