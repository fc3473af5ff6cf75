"""Build the mini world: data -> VAE -> CLIP -> aesthetic MLP -> hps CLIP -> UNet + text encoder -> checks.

Every artifact goes where SD-1.5's would, in the format its loaders read:
    OUT/model/                 StableDiffusionPipeline.save_pretrained layout (unet, vae, text_encoder,
                               tokenizer, scheduler = SD-1.5's DDIM config, model_index.json)
    OUT/clip_config.json       open_clip model config;  OUT/clip.safetensors   its weights (fp16)
    OUT/aesthetic.safetensors  LAION-layout MLP (keys layers.{0,2,4,6,7}.*)
    OUT/hps.safetensors        the hps model: that CLIP with its image tower fine-tuned on preference
                               pairs, as HPSv2 fine-tunes CLIP-H (mini.domain.preference), same config
    OUT/rewards.json           RewardSpec: aesthetic on the CLIP, hps (cosine) on the hps model, CLIP score
                               and FID features on the CLIP
    OUT/prompts/{train,test}.txt, OUT/fid_ref.safetensors, OUT/world.json (facts + measured quality)

Training follows SD where SD has a recipe: VAE on L1 + L2 reconstruction + KL at SD's weight (1e-6
on per-image sums); latents scaled by 1/std; UNet with ε-prediction on the scaled-linear schedule,
10 % empty-caption dropout for classifier-free guidance. Unlike SD, the text encoder is trained with
the UNet (there is no pretrained one to freeze); afterwards it is frozen like SD's.
Seeded; one stage's randomness does not depend on another's step counts. Bit-exact reproduction
needs the same torch build and thread count (floating-point reduction order).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import domain, models

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # OpenAI CLIP normalisation (open_clip's default)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class BuildConfig:
    seed: int = 0
    n_train_images: int = 24000   # rendered train-split scenes (VAE, CLIP, UNet and MLP data)
    n_heldout: int = 1000         # test-split scenes for held-out CLIP / aesthetic checks
    vae_steps: int = 1500
    vae_batch: int = 32
    clip_steps: int = 700         # ~7 epochs; caption top-1 on real test images 0.99 (1200 steps: 1.00)
    clip_batch: int = 256
    hps_steps: int = 120          # preference fine-tune of the CLIP's image tower (pairwise accuracy ~0.9)
    hps_batch: int = 128          # scenes per step, each rendered at two vignette depths
    hps_lr: float = 3e-4
    mlp_steps: int = 3000         # batch 256 on cached CLIP features
    unet_steps: int = 3000        # batch 128 is the CPU's best per-sample cost (64: 1.3x, 256: 1.2x worse)
    unet_batch: int = 128
    fid_per_caption: int = 10     # fid_ref = this many renderings of each test caption
    eval_per_caption: int = 2     # generated samples per test caption for the retrieval check
    steps: int = 20               # the mini model's default DDIM steps ...
    guidance: float = 5.0         # ... and CFG scale (world.json)
    n_train_prompts: int = 750
    n_test_prompts: int = 50


def small_config(seed: int = 0) -> BuildConfig:
    """Same architectures, a few steps each: the reduced build the tests run (seconds)."""
    return BuildConfig(seed=seed, n_train_images=256, n_heldout=64, vae_steps=3, clip_steps=3, mlp_steps=10, hps_steps=3,
                       unet_steps=3, fid_per_caption=2, eval_per_caption=1, steps=4)


def _log(msg: str):
    print(f"[mini build {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up then cosine decay to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _to_unit(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().div(255)


def clip_preprocess(x01: torch.Tensor) -> torch.Tensor:
    """(N, 3, 32, 32) in [0, 1] -> CLIP input (the domain CLIP's image size is the image size)."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x01 - mean) / std


#### VAE ####

def train_vae(x: torch.Tensor, cfg: BuildConfig):
    """x (N, 3, 32, 32) in [-1, 1] -> trained AutoencoderKL and its scaling factor."""
    torch.manual_seed(cfg.seed + 1)
    # channels_last: oneDNN's convolutions skip their layout reorders; 1.29x per step on 2 CPU cores
    vae = models.vae().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(cfg.vae_steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.vae_steps, 1e-3)
        xb = x[torch.randint(len(x), (cfg.vae_batch,))].contiguous(memory_format=torch.channels_last)  # (B, 3, 32, 32)
        post = vae.encode(xb).latent_dist
        rec = vae.decode(post.sample()).sample
        # SD's weighting: per-image sums, KL weight 1e-6; divided by the pixel count to keep lr sane
        loss = F.l1_loss(rec, xb) + F.mse_loss(rec, xb) + 1e-6 * post.kl().mean() / xb[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == cfg.vae_steps - 1:
            _log(f"vae step {step}/{cfg.vae_steps} loss {loss.item():.4f}")
    vae = vae.to(memory_format=torch.contiguous_format).eval().requires_grad_(False)   # safetensors saves contiguous
    with torch.no_grad():
        lat = torch.cat([vae.encode(x[i:i + 512]).latent_dist.mean for i in range(0, len(x), 512)])
    scaling = float(1.0 / lat.std())
    vae.register_to_config(scaling_factor=scaling)
    return vae, lat, scaling


#### CLIP (hps / clip score / FID features) ####

def train_clip(x01: torch.Tensor, captions: list[str], cfg: BuildConfig):
    """Contrastive training of the domain CLIP on (image, caption) pairs."""
    import open_clip
    torch.manual_seed(cfg.seed + 2)
    model = models.clip()
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=models.TOKENS)(captions)   # (N, 32)
    loss_fn = open_clip.loss.ClipLoss()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    model.train()
    for step in range(cfg.clip_steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.clip_steps, 1e-3)
        idx = torch.randint(len(x01), (min(cfg.clip_batch, len(x01)),))
        img_f, txt_f, scale = model(clip_preprocess(x01[idx]), tokens[idx])
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 200 == 0 or step == cfg.clip_steps - 1:
            _log(f"clip step {step}/{cfg.clip_steps} loss {loss.item():.3f} scale {scale.item():.1f}")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def clip_image_features(clip, x01: torch.Tensor) -> torch.Tensor:
    """(N, 3, 32, 32) in [0, 1] -> (N, D) normalised image embeddings."""
    return torch.cat([clip.encode_image(clip_preprocess(x01[i:i + 512]), normalize=True)
                      for i in range(0, len(x01), 512)])


@torch.no_grad()
def caption_features(clip, captions: list[str]) -> torch.Tensor:
    """captions -> (K, D) normalised text embeddings, with open_clip's tokenizer at the world's length."""
    import open_clip
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=models.TOKENS)
    return torch.cat([clip.encode_text(tokenizer(captions[i:i + 1024]), normalize=True)
                      for i in range(0, len(captions), 1024)])


@torch.no_grad()
def caption_scores(clip, x01: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """cos(image n, its caption's embedding txt[n]): (N, 3, 32, 32) in [0, 1], (N, D) -> (N,)."""
    return (clip_image_features(clip, x01) * txt).sum(-1)


@torch.no_grad()
def retrieval_top1(clip, x01: torch.Tensor, labels: torch.Tensor, captions: list[str]) -> float:
    """Top-1 accuracy of retrieving each image's caption (index `labels`) among `captions`."""
    txt = caption_features(clip, captions)                          # (K, D)
    pred = (clip_image_features(clip, x01) @ txt.T).argmax(1)       # (N,)
    return float((pred == labels).float().mean())


@torch.no_grad()
def fid(clip, real01: torch.Tensor, fake01: torch.Tensor) -> float:
    """Fréchet distance between the CLIP's image embeddings before normalisation of two image sets (N, 3, 32, 32)
    in [0, 1]: eval.py's FID in the mini world (rewards.clip_features, torchmetrics' formula in float64)."""
    def stats(x):
        f = torch.cat([clip.encode_image(clip_preprocess(x[i:i + 512]), normalize=False)
                       for i in range(0, len(x), 512)]).double()           # (N, D)
        mu = f.mean(0)
        return mu, (f - mu).T @ (f - mu) / (len(f) - 1)
    (m1, s1), (m2, s2) = stats(real01), stats(fake01)
    # ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁Σ₂)^½, the last from the eigenvalues of Σ₁Σ₂
    return float((m1 - m2).square().sum() + s1.trace() + s2.trace()
                 - 2 * torch.linalg.eigvals(s1 @ s2).sqrt().real.sum())


#### hps model: the CLIP fine-tuned on preferences ####

def vignette(x01: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """mini.domain.vignette on float images (N, 3, H, W) in [0, 1], one depth per image (N,)."""
    rho2 = torch.from_numpy(domain.falloff(x01.shape[-1])).to(x01.dtype)           # (H, W)
    return x01 * (1 - domain.VIGNETTE * depth.view(-1, 1, 1, 1) * rho2).clamp(min=0)


def train_hps(clip, x01: torch.Tensor, captions: list[str], cfg: BuildConfig):
    """HPSv2's recipe at mini scale: fine-tune CLIP on choices between two images of one caption.

    Each step takes hps_batch scenes and renders each at two vignette depths drawn from U[0, 2]. The
    loss is HPSv2's — cross-entropy over the pair's logits scale·cos(image, caption), the depth with the
    higher mini.domain.preference winning (pairs within 0.1 of each other are skipped) — plus the CLIP
    image-to-caption contrastive loss over the batch, so the score stays a caption-fidelity score too.
    Only the image tower trains (the captions' text embeddings are the CLIP's own, fixed)."""
    import copy
    torch.manual_seed(cfg.seed + 5)
    hps = copy.deepcopy(clip).requires_grad_(False)
    hps.visual.requires_grad_(True)
    unique = sorted(set(captions))
    text = caption_features(clip, unique)                                           # (K, D)
    row = {c: i for i, c in enumerate(unique)}
    label = torch.tensor([row[c] for c in captions])                               # (N,)
    scale = float(clip.logit_scale.exp())
    opt = torch.optim.AdamW(hps.visual.parameters(), lr=cfg.hps_lr, weight_decay=0.0)
    hps.train()
    for step in range(cfg.hps_steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.hps_steps, cfg.hps_lr, warmup=20)
        b = min(cfg.hps_batch, len(x01))
        idx = torch.randint(len(x01), (b,))
        depth = torch.rand(2, b) * 2                                                # (2, B) in [0, 2)
        img = hps.encode_image(clip_preprocess(torch.cat([vignette(x01[idx], d) for d in depth])),
                               normalize=True)                                      # (2B, D)
        txt = text[label[idx]]                                                      # (B, D)
        contrastive = F.cross_entropy(scale * img @ txt.T, torch.arange(b).repeat(2))
        pref = torch.from_numpy(domain.preference(depth.numpy())).float()          # (2, B)
        keep = (pref[0] - pref[1]).abs() > 0.1
        cos = (img.view(2, b, -1) * txt).sum(-1)                                    # (2, B)
        choice = F.cross_entropy(scale * cos.T[keep], (pref[1] > pref[0]).long()[keep])
        loss = contrastive + choice
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.hps_steps - 1:
            _log(f"hps step {step}/{cfg.hps_steps} contrastive {contrastive.item():.3f} choice {choice.item():.3f}")
    return hps.eval().requires_grad_(False)


@torch.no_grad()
def hps_check(hps, x01: torch.Tensor, labels: torch.Tensor, captions: list[str]) -> dict:
    """On held-out renderings: mean score (cosine with the caption) at depths 0, 1, 2, the accuracy of
    choosing the preferred image of random depth pairs, and caption top-1 at depth 0."""
    txt = caption_features(hps, captions)[labels]                                  # (N, D)
    score = lambda d: caption_scores(hps, vignette(x01, d), txt)                    # (N,)
    full = lambda v: torch.full((len(x01),), float(v))
    g = torch.Generator().manual_seed(0)
    da, db = torch.rand(len(x01), generator=g) * 2, torch.rand(len(x01), generator=g) * 2
    pa, pb = domain.preference(da.numpy()), domain.preference(db.numpy())
    keep = torch.from_numpy(np.abs(pa - pb) > 0.1)
    right = ((score(db) > score(da)) == torch.from_numpy(pb > pa))[keep]
    return {"hps_real_test_depth0": round(float(score(full(0)).mean()), 4),
            "hps_real_test_depth1": round(float(score(full(1)).mean()), 4),
            "hps_real_test_depth2": round(float(score(full(2)).mean()), 4),
            "hps_pair_accuracy_test": round(float(right.float().mean()), 4),
            "hps_top1_real_test": round(retrieval_top1(hps, x01, labels, captions), 4)}


#### aesthetic MLP ####

def train_aesthetic(feats: torch.Tensor, ratings: torch.Tensor, cfg: BuildConfig):
    """Regress the domain rating from normalised CLIP image embeddings, as LAION's predictor does."""
    torch.manual_seed(cfg.seed + 3)
    mlp = models.AestheticMLP(feats.shape[1])
    opt = torch.optim.AdamW(mlp.parameters(), lr=1e-3, weight_decay=0.0)
    mlp.train()
    for step in range(cfg.mlp_steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.mlp_steps, 1e-3)
        idx = torch.randint(len(feats), (256,))
        loss = F.mse_loss(mlp(feats[idx]), ratings[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _log(f"aesthetic mlp {cfg.mlp_steps} steps, last batch mse {loss.item():.3f}")
    return mlp.eval().requires_grad_(False)


#### UNet + text encoder ####

def train_unet(lat_mean: torch.Tensor, scaling: float, captions: list[str], tokenizer, cfg: BuildConfig):
    """ε-prediction on SD-1.5's schedule; text encoder trained jointly; EMA weights returned."""
    from diffusers import DDPMScheduler
    torch.manual_seed(cfg.seed + 4)
    text_encoder = models.text_encoder(tokenizer)
    unet = models.unet(text_encoder.config.hidden_size)
    sched = DDPMScheduler(**{k: v for k, v in models.SCHEDULE.items() if k not in ("set_alpha_to_one", "steps_offset")})
    tok = lambda texts: tokenizer(texts, padding="max_length", max_length=models.TOKENS, truncation=True,
                                  return_tensors="pt").input_ids
    ids = tok(captions)                                              # (N, 32)
    empty = tok([""])                                                # (1, 32) the CFG null caption
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    unet.train(), text_encoder.train()
    for step in range(cfg.unet_steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.unet_steps, 1e-3, warmup=200)
        idx = torch.randint(len(ids), (min(cfg.unet_batch, len(ids)),))
        z0 = lat_mean[idx] * scaling                                 # (B, 4, 8, 8)
        drop = torch.rand(len(idx)) < 0.1                            # caption dropout for CFG
        b_ids = torch.where(drop[:, None], empty, ids[idx])
        cond = text_encoder(b_ids).last_hidden_state                 # (B, 32, 64)
        # Add noise at a random timestep and predict it
        noise = torch.randn_like(z0)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),))
        zt = sched.add_noise(z0, noise, t)
        loss = F.mse_loss(unet(zt, t, cond).sample, noise)
        descend(opt, params, ema, loss, step)
        if step % 250 == 0 or step == cfg.unet_steps - 1:
            _log(f"unet step {step}/{cfg.unet_steps} loss {loss.item():.4f}")
    load_ema(params, ema)
    return unet.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False)


#### the build ####

def descend(opt, params: list, ema: list, loss, step: int):
    """One step of the worlds' training: gradient clipped to norm 1, AdamW, then the EMA of the weights with
    decay min(0.999, (1 + step) / (10 + step)) (fast at the start, 0.999 after ~9,000 steps)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    decay = min(0.999, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)


def load_ema(params: list, ema: list):
    """The trained weights replaced by their EMA, in place."""
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)


def _save_file(tensors: dict, path: Path, metadata: dict | None = None):
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def _begin(out: Path, marker: str, what: str, threads: int | None):
    """A build's start: refuse an `out` that holds something else than `what` (no `marker` file), set the threads,
    quiet the libraries' progress bars, and give (an empty staging folder beside `out`, wall and CPU clocks)."""
    import diffusers
    import transformers
    if out.exists() and any(out.iterdir()) and not (out / marker).exists():
        raise ValueError(f"--out {out} exists and is not {what} (no {marker}); give an empty or new directory")
    if threads:
        torch.set_num_threads(threads)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp, time.time(), time.process_time()


def build(out: Path, cfg: BuildConfig, threads: int | None = None) -> dict:
    """Build every artifact into `out` (replaced atomically); returns world.json's content."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    out = Path(out)
    tmp, t0, c0 = _begin(out, "world.json", "a mini world", threads)
    (tmp / "prompts").mkdir(parents=True)
    timings = {}

    #### prompts and data ####
    train_prompts, test_prompts = domain.prompt_sets(cfg.seed, cfg.n_train_prompts, cfg.n_test_prompts)
    (tmp / "prompts" / "train.txt").write_text("\n".join(train_prompts) + "\n")
    (tmp / "prompts" / "test.txt").write_text("\n".join(test_prompts) + "\n")
    imgs, captions = domain.sample(np.random.default_rng(cfg.seed + 10), cfg.n_train_images, "train")
    held, held_caps = domain.sample(np.random.default_rng(cfg.seed + 11), cfg.n_heldout, "test")
    x01 = _to_unit(imgs)                                             # (N, 3, 32, 32)
    rng_fid = np.random.default_rng(cfg.seed + 12)
    fid = np.stack([domain.render(domain.scene_for(c, rng_fid)) for c in test_prompts
                    for _ in range(cfg.fid_per_caption)])           # (50·k, 32, 32, 3), caption-major
    fid_labels = torch.arange(len(test_prompts)).repeat_interleave(cfg.fid_per_caption)
    _save_file({"images": torch.from_numpy(fid).permute(0, 3, 1, 2)}, tmp / "fid_ref.safetensors",
               {"source": f"{cfg.fid_per_caption} renderings of each caption of prompts/test.txt, in order"})
    timings["data"] = time.time() - t0

    #### VAE ####
    t = time.time()
    vae, lat_mean, scaling = train_vae(x01 * 2 - 1, cfg)
    timings["vae"] = time.time() - t
    with torch.no_grad():
        rec = vae.decode(lat_mean[:512]).sample.clamp(-1, 1)
        vae_psnr = float(-10 * torch.log10(F.mse_loss((rec + 1) / 2, x01[:512])))
    _log(f"vae: scaling_factor {scaling:.4f}, reconstruction PSNR {vae_psnr:.1f} dB")

    #### CLIP and the aesthetic MLP ####
    t = time.time()
    clip = train_clip(x01, captions, cfg)
    timings["clip"] = time.time() - t
    (tmp / "clip_config.json").write_text(json.dumps(models.CLIP_CONFIG, indent=2) + "\n")
    _save_file({k: v.half() for k, v in clip.state_dict().items()}, tmp / "clip.safetensors")
    t = time.time()
    mlp = train_aesthetic(clip_image_features(clip, x01), torch.from_numpy(domain.rating(imgs)).float(), cfg)
    timings["aesthetic"] = time.time() - t
    _save_file(mlp.state_dict(), tmp / "aesthetic.safetensors")
    held01 = _to_unit(held)
    pred = mlp(clip_image_features(clip, held01)).numpy()
    aesthetic_r = float(np.corrcoef(pred, domain.rating(held))[0, 1])
    real_top1 = retrieval_top1(clip, _to_unit(fid), fid_labels, test_prompts)
    _log(f"aesthetic MLP Pearson r on held-out {aesthetic_r:.3f}; CLIP top-1 on real test images {real_top1:.3f}")

    #### the hps model, fine-tuned from the CLIP as saved (fp16 weights) ####
    t = time.time()
    saved = models.clip()
    saved.load_state_dict({k: v.half().float() for k, v in clip.state_dict().items()})
    hps = train_hps(saved.eval().requires_grad_(False), x01, captions, cfg)
    timings["hps"] = time.time() - t
    _save_file({k: v.half() for k, v in hps.state_dict().items()}, tmp / "hps.safetensors")
    hps_quality = hps_check(hps, _to_unit(fid), fid_labels, test_prompts)
    _log("hps model: " + ", ".join(f"{k} {v}" for k, v in hps_quality.items()))
    (tmp / "rewards.json").write_text(json.dumps({
        "clip_arch": "clip_config.json", "clip_weights": "clip.safetensors",
        "aesthetic_head": "aesthetic.safetensors",
        "hps_arch": "clip_config.json", "hps_weights": "hps.safetensors"}, indent=2) + "\n")

    #### UNet + text encoder, saved as an SD pipeline ####
    t = time.time()
    tokenizer = models.write_tokenizer(tmp / "tokenizer_src")
    unet, text_encoder = train_unet(lat_mean, scaling, captions, tokenizer, cfg)
    timings["unet"] = time.time() - t
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**models.SCHEDULE), safety_checker=None,
                                   feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp / "model", safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):                        # SD-1.5's tokenizer/ has them too
        shutil.copy(tmp / "tokenizer_src" / name, tmp / "model" / "tokenizer" / name)
    shutil.rmtree(tmp / "tokenizer_src")

    #### check: generate from the test captions with the defaults, retrieve with the CLIP ####
    t = time.time()
    pipe = StableDiffusionPipeline.from_pretrained(tmp / "model", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    prompts = [p for p in test_prompts for _ in range(cfg.eval_per_caption)]
    gen = torch.Generator().manual_seed(cfg.seed + 20)
    with torch.no_grad():
        samples = pipe(prompts, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
                       generator=gen, output_type="pt").images          # (N, 3, 32, 32) in [0, 1]
    labels = torch.arange(len(test_prompts)).repeat_interleave(cfg.eval_per_caption)
    gen_top1 = retrieval_top1(clip, samples, labels, test_prompts)
    gen_u8 = (samples * 255).round().byte().permute(0, 2, 3, 1).numpy()
    gen_hps = float(caption_scores(hps, samples, caption_features(hps, test_prompts)[labels]).mean())
    timings["check"] = time.time() - t
    _log(f"CLIP top-1 of generated test samples {gen_top1:.3f} (chance {1 / len(test_prompts):.3f}); "
         f"their hps {gen_hps:.3f} (real renderings: {hps_quality['hps_real_test_depth0']} without a vignette, "
         f"{hps_quality['hps_real_test_depth1']} with the preferred one)")

    world = {
        "image_size": domain.SIZE, "latent_shape": list(models.LATENT), "scaling_factor": scaling,
        "steps": cfg.steps, "guidance": cfg.guidance, "eta": 0.0,
        "prompts": {"train": "prompts/train.txt", "test": "prompts/test.txt",
                    "split": "held-out combinations: caption in test iff crc32(caption) % 10 == 0"},
        "fid_ref": {"path": "fid_ref.safetensors", "n": int(len(fid)),
                    "source": f"{cfg.fid_per_caption} renderings of each test caption, caption-major"},
        "clip": {"image_size": domain.SIZE, "mean": CLIP_MEAN, "std": CLIP_STD,
                 "tokenizer": f"open_clip SimpleTokenizer, context_length {models.TOKENS}",
                 "preprocess": "images in [0, 1] at 32x32 (no resize), normalised with mean/std"},
        "aesthetic": {"rating": "mini.domain.rating (1-10)", "head": "LAION layout, dims " +
                      "->".join(map(str, (models.CLIP_CONFIG["embed_dim"], *models.AESTHETIC_DIMS, 1)))},
        "hps": {"preference": "mini.domain.preference: a vignette of depth 1 (mini.domain.vignette) is preferred",
                "model": "clip.safetensors with the image tower fine-tuned on preference pairs (HPSv2's loss) "
                         "plus the image-to-caption contrastive loss; score = cosine(image, caption)"},
        "quality": {
            "vae_psnr_db": round(vae_psnr, 2),
            "clip_top1_real_test": round(real_top1, 4),
            "clip_top1_generated_test": round(gen_top1, 4),
            "chance_top1": 1 / len(test_prompts),
            "aesthetic_pearson_r_heldout": round(aesthetic_r, 4),
            "rating_mean_real_test": round(float(domain.rating(fid).mean()), 3),
            "rating_mean_generated_test": round(float(domain.rating(gen_u8).mean()), 3),
            **hps_quality,
            "hps_generated_test": round(gen_hps, 4),
        },
        "build": {"config": asdict(cfg), "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "seconds": {k: round(v, 1) for k, v in timings.items()},
                  "wall_seconds": round(time.time() - t0, 1),
                  "cpu_seconds": round(time.process_time() - c0, 1)},   # all threads; > wall when uncontended
    }
    (tmp / "world.json").write_text(json.dumps(world, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    _log(f"done in {world['build']['wall_seconds']:.0f} s wall, {world['build']['cpu_seconds']:.0f} s CPU -> {out}")
    return world
