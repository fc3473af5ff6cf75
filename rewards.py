"""Differentiable rewards and the CLIP metrics built on the same models.

Every reward is a small factory selected by name (ddpo-pytorch's `rewards.py` habit):

    fn = rewards.get("aesthetic", spec, device)
    scores = fn(images, prompts)        # images (N, 3, H, W) in [0, 1], prompts: list[str] -> (N,)

Higher is better for every reward. Gradients flow to the images only: reward weights are frozen
(eval mode, requires_grad False).

    aesthetic  LAION aesthetic predictor v2 (sac+logos+ava1-l14-linearMSE): OpenAI CLIP ViT-L/14 image
               embedding, L2-normalised, into a 5-layer linear MLP; 1-10 scale.
    hps        HPSv2: open_clip ViT-H-14 with the HPS_v2_compressed.pt weights; cosine similarity of the
               normalised image and prompt embeddings (about 0.26 for SD-1.5 on HPSv2's benchmark).
    compress   -||img - JPEG(img)||^2 per image (summed over pixels and channels, as the paper's norm and
               RID's distillation term) with rid's differentiable JPEG (rid_kernels.jpeg).
    clip       100 * cos(image, prompt) with the CLIP metric's own model (clip_arch/clip_weights), the
               CLIP score eval.py reports, differentiable: R0's text-alignment reward. A stage trained on
               it is scored by the model it maximised (eval.py's report says so).

Where the weights come from is a RewardSpec (a JSON file, `--reward-spec` on the CLIs). The SD-scale
defaults point at the public checkpoints; the mini world ships a spec with tiny custom-architecture
CLIPs. Lookup order for a checkpoint: the spec's explicit path, then where the user's tools already
cache it, then the Hugging Face hub (only ever at run time, never at import).

Images enter CLIP through a differentiable copy of open_clip's eval preprocessing (antialiased bicubic
resize, centre crop or pad, CLIP mean/std): no PIL round trip, so the reward gradient reaches the
pixels. tests/test_rewards.py checks it against open_clip's own PIL transforms.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

REWARDS = ("aesthetic", "hps", "compress")  # the RIL sequence, train.py's default --tasks
NAMES = REWARDS + ("clip",)  # every reward get() builds

# JPEG quality of the compress reward. DRaFT trains towards a fixed compression target; we use the
# quality at which eval.py measures JPEG size (80), so the reward optimises the measured quantity.
DEFAULT_JPEG_QUALITY = 80

AESTHETIC_HUB = ("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth")  # the copy trl's DDPO uses
HPS_HUB = ("xswu/HPSv2", "HPS_v2_compressed.pt")
HPS_FILE = "HPS_v2_compressed.pt"

_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_HOW_TO = "set it in a reward spec JSON and pass it with --reward-spec (see rewards.RewardSpec)"


@dataclass(frozen=True)
class RewardSpec:
    """Where reward and metric weights come from. Frozen, so it can key the model caches."""

    clip_arch: str = "ViT-L-14"        # open_clip model name (or hf-hub:/local-dir: id), or a model-config JSON
    clip_weights: str = "openai"       # open_clip pretrained tag, or a checkpoint file (.pt/.bin/.safetensors)
    aesthetic_head: str | None = None  # LAION MLP file; None -> hub copy trl uses (AESTHETIC_HUB)
    hps_arch: str = "ViT-H-14"         # open_clip model name or config JSON of the HPS model
    hps_weights: str | None = None     # HPS_v2_compressed.pt; None -> $HPS_ROOT or ~/.cache/hpsv2, then hub
    jpeg_quality: int = DEFAULT_JPEG_QUALITY  # JPEG quality of the compress reward, 1..100

    def __post_init__(self):
        q = self.jpeg_quality
        if isinstance(q, bool) or not isinstance(q, int) or not 1 <= q <= 100:
            raise ValueError(f"reward spec jpeg_quality={q!r} is not allowed; use an integer in 1..100")


def load_spec(path: str | os.PathLike | None) -> RewardSpec:
    """Read a RewardSpec from JSON; None gives the SD-scale defaults.

    Relative file paths are resolved against the JSON's folder, so a spec can ship beside its weights
    (the mini world's mini/world/rewards.json does).
    """
    if path is None:
        return RewardSpec()
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"reward spec {str(path)!r} is not a file; pass a JSON with keys of rewards.RewardSpec")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"reward spec {str(path)!r} is not valid JSON: {e}") from None
    allowed = [f.name for f in dataclasses.fields(RewardSpec)]
    if not isinstance(raw, dict) or set(raw) - set(allowed):
        extra = sorted(set(raw) - set(allowed)) if isinstance(raw, dict) else raw
        raise ValueError(f"reward spec {str(path)!r} has unknown keys {extra}; allowed: {', '.join(allowed)}")

    def resolve(value, suffixes):
        if isinstance(value, str) and value.lower().endswith(suffixes) and not os.path.isabs(value):
            return str((path.parent / value).resolve())
        return value

    for key in ("clip_arch", "hps_arch"):
        if key in raw:
            raw[key] = resolve(raw[key], (".json",))
    for key in ("clip_weights", "aesthetic_head", "hps_weights"):
        if key in raw:
            raw[key] = resolve(raw[key], _WEIGHT_SUFFIXES)
    return RewardSpec(**raw)


#### WEIGHT LOOKUP ####

def _hub_download(repo: str, filename: str) -> str:
    """One file from the Hugging Face hub (its cache first). Only called at run time."""
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo, filename)


def _explicit_file(path: str, key: str) -> str:
    if not os.path.isfile(path):
        raise ValueError(f"reward spec {key}={path!r} is not a file; fix the path ({_HOW_TO})")
    return path


def aesthetic_file(spec: RewardSpec) -> str:
    if spec.aesthetic_head is not None:
        return _explicit_file(spec.aesthetic_head, "aesthetic_head")
    try:
        return _hub_download(*AESTHETIC_HUB)
    except Exception as e:  # offline, no hub access, ...
        raise ValueError(
            f"aesthetic predictor weights not found (hub {AESTHETIC_HUB[0]}/{AESTHETIC_HUB[1]}: "
            f"{type(e).__name__}); download sac+logos+ava1-l14-linearMSE.pth from "
            f"github.com/christophschuhmann/improved-aesthetic-predictor and set aesthetic_head ({_HOW_TO})"
        ) from None


def hps_root() -> Path:
    """The hpsv2 package's own cache folder: $HPS_ROOT, else ~/.cache/hpsv2 (as hpsv2/utils.py names it)."""
    return Path(os.environ.get("HPS_ROOT") or os.path.expanduser("~/.cache/hpsv2"))


def hps_file(spec: RewardSpec) -> str:
    if spec.hps_weights is not None:
        return _explicit_file(spec.hps_weights, "hps_weights")
    cached = hps_root() / HPS_FILE
    if cached.is_file():
        return str(cached)
    try:
        return _hub_download(*HPS_HUB)
    except Exception as e:
        raise ValueError(
            f"HPSv2 weights {HPS_FILE} not found in {cached} nor on the hub ({HPS_HUB[0]}: "
            f"{type(e).__name__}); download it from huggingface.co/{HPS_HUB[0]} and set hps_weights ({_HOW_TO})"
        ) from None


#### MODELS (loaded once per (files, device), frozen) ####

def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


@lru_cache(maxsize=None)
def load_clip(arch: str, weights: str | None, device: str):
    """(open_clip model, tokenizer). `arch` is a registered open_clip name or a model-config JSON path."""
    import open_clip
    from open_clip.model import set_model_preprocess_cfg
    from open_clip.pretrained import get_pretrained_cfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    if arch.lower().endswith(".json"):
        # open_clip's create_model only builds registered names (add_model_config registers a file under
        # its stem in a process-wide table, so two "clip_config.json" would collide); build the config
        # with open_clip's own classes and load with its own checkpoint loader instead.
        if not os.path.isfile(arch):
            raise ValueError(f"CLIP architecture config {arch!r} is not a file ({_HOW_TO})")
        cfg = json.loads(Path(arch).read_text())
        missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(cfg)
        if missing:
            raise ValueError(f"CLIP architecture config {arch!r} lacks {sorted(missing)} (open_clip model_configs format)")
        if weights is None or not os.path.isfile(weights):
            raise ValueError(f"custom CLIP {arch!r} needs a checkpoint file, got {weights!r} ({_HOW_TO})")
        preprocess = cfg.pop("preprocess_cfg", {})
        custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg["text_cfg"]
        model = (open_clip.CustomTextCLIP if custom_text else open_clip.CLIP)(**cfg)
        try:  # .safetensors, or torch.load(weights_only=True); strips DDP's "module." prefixes
            open_clip.load_checkpoint(model, weights, weights_only=True)
        except (RuntimeError, OSError, KeyError, pickle.UnpicklingError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"checkpoint {weights!r} does not fit CLIP config {arch!r}: {first[:300]}") from None
        set_model_preprocess_cfg(model, merge_preprocess_dict(PreprocessCfg(size=model.visual.image_size), preprocess))
        tokenizer = open_clip.SimpleTokenizer(context_length=model.context_length)
    else:
        if arch not in open_clip.list_models() and not arch.startswith(("hf-hub:", "local-dir:")):
            raise ValueError(f"CLIP architecture {arch!r} is not an open_clip model name, hf-hub:/local-dir: "
                             f"id or config JSON ({_HOW_TO})")
        if weights is not None and os.path.splitext(weights)[1] in _WEIGHT_SUFFIXES and not os.path.isfile(weights):
            raise ValueError(f"CLIP checkpoint {weights!r} is not a file ({_HOW_TO})")
        # open_clip 3 only *warns* when a tag was trained with QuickGELU (OpenAI's weights were) and the
        # config uses GELU; the LAION aesthetic MLP was fitted on the QuickGELU features, so force it.
        tag_cfg = get_pretrained_cfg(arch, weights) if weights and not os.path.isfile(weights) else {}
        try:
            model = open_clip.create_model(arch, pretrained=weights, force_quick_gelu=bool(tag_cfg.get("quick_gelu")))
        except RuntimeError as e:  # unknown tag, failed download, or a checkpoint that does not fit
            raise ValueError(f"could not load CLIP {arch!r} with weights {weights!r}: {e} ({_HOW_TO})") from None
        tokenizer = open_clip.get_tokenizer(arch)
    return freeze(model.to(device)), tokenizer


def mlp_from_state(state: dict[str, torch.Tensor], source: str) -> nn.Sequential:
    """The LAION MLP: Linear layers at the indices present in layers.{i}.weight, Dropout between.

    Dims come from the weight shapes (768-1024-128-64-16-1 for ViT-L/14; smaller in the mini world).
    The v2 predictor has no activations: it is linear in the embedding, which is what the file holds.
    """
    state = {k.removeprefix("layers."): v for k, v in state.items()}
    idx = sorted({int(k.split(".")[0]) for k in state if k.endswith(".weight")})
    if not idx or set(state) != {f"{i}.{p}" for i in idx for p in ("weight", "bias")}:
        raise ValueError(f"aesthetic head {source!r} is not a LAION MLP state dict (keys layers.{{i}}.weight/bias)")
    layers, prev_out = [], None
    for i in range(idx[-1] + 1):
        if i not in idx:
            layers.append(nn.Dropout(0.0))  # eval mode: a no-op, kept so indices match the file
            continue
        out_f, in_f = state[f"{i}.weight"].shape
        if prev_out is not None and in_f != prev_out:
            raise ValueError(f"aesthetic head {source!r}: layer {i} takes {in_f} features, previous gives {prev_out}")
        layers.append(nn.Linear(in_f, out_f))
        prev_out = out_f
    if prev_out != 1:
        raise ValueError(f"aesthetic head {source!r} ends in {prev_out} outputs, expected 1")
    mlp = nn.Sequential(*layers)
    mlp.load_state_dict(state)
    return mlp


@lru_cache(maxsize=None)
def load_aesthetic_head(path: str, device: str) -> nn.Sequential:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return freeze(mlp_from_state(dict(state), path).to(device))


#### DIFFERENTIABLE CLIP PREPROCESSING ####

def clip_preprocess(images: torch.Tensor, size: int, mean, std, resize_mode: str = "shortest") -> torch.Tensor:
    """open_clip's eval transform, in torch and differentiable. (N, 3, H, W) in [0, 1] -> (N, 3, size, size).

    resize_mode "shortest" (CLIP, aesthetic): shorter side to `size` with antialiased bicubic, centre crop.
    resize_mode "longest" (HPSv2): longer side to `size`, centre pad with black -- HPSv2's
    ResizeMaxSize + pad; for square images both are a plain resize. Sizes are rounded exactly as
    torchvision/open_clip round them. torch's antialiased bicubic uses PIL's kernel (a = -0.5).
    Remaining difference to PIL: it rounds to uint8 after each pass (within ~1/255; test_rewards.py
    states the tolerance).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if resize_mode == "shortest":
        short, long = min(h, w), max(h, w)
        new_long = int(size * long / short)  # torchvision's Resize(int) truncates the long side
        nh, nw = (size, new_long) if h <= w else (new_long, size)
    elif resize_mode == "longest":
        ratio = max(h / size, w / size)
        nh, nw = round(h / ratio), round(w / ratio)
    else:
        raise ValueError(f"resize_mode={resize_mode!r} is not allowed; use 'shortest' or 'longest'")
    x = images.float()
    # Two 1-D passes, horizontal first, each clamped to [0, 1]: PIL's order, and it clips between passes
    # (bicubic overshoots on sharp edges). One 2-D call differs from PIL by up to ~15/255 on noise.
    if nw != w:
        x = F.interpolate(x, size=(h, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    if nh != h:
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    if resize_mode == "shortest":
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        x = x[..., top:top + size, left:left + size]
    else:
        ph, pw = size - nh, size - nw
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std  # (N, 3, size, size)


def _encode_images(model, images: torch.Tensor, resize_mode: str, normalize: bool) -> torch.Tensor:
    from open_clip.model import get_model_preprocess_cfg

    cfg = get_model_preprocess_cfg(model)
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    if not isinstance(model.visual.image_size, int) and len(set(model.visual.image_size)) != 1:
        raise ValueError(f"non-square CLIP input size {model.visual.image_size} is not supported")
    device = next(model.parameters()).device
    x = clip_preprocess(images.to(device), size, cfg["mean"], cfg["std"], resize_mode)
    return model.encode_image(x, normalize=normalize)  # (N, D)


def _encode_prompts(model, tokenizer, prompts: list[str], n: int) -> torch.Tensor:
    if isinstance(prompts, str) or len(prompts) != n:
        raise ValueError(f"prompts must be a list of {n} strings (one per image), got {prompts!r:.80}")
    tokens = tokenizer(list(prompts)).to(next(model.parameters()).device)
    return model.encode_text(tokens, normalize=True)  # (N, D)


#### REWARDS ####

def _device(device) -> str:
    return str(torch.device(device))


def _aesthetic(spec: RewardSpec, device: str) -> Callable:
    model, _ = load_clip(spec.clip_arch, spec.clip_weights, device)
    head = load_aesthetic_head(aesthetic_file(spec), device)
    dim = getattr(model.visual, "output_dim", None)
    if dim is not None and head[0].in_features != dim:
        raise ValueError(f"aesthetic head takes {head[0].in_features} features but CLIP {spec.clip_arch!r} "
                         f"embeds to {dim}; aesthetic_head must match clip_arch")

    def aesthetic(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        emb = _encode_images(model, images, "shortest", normalize=True)  # (N, 768), unit norm as LAION fits it
        return head(emb).squeeze(-1)  # (N,) on the 1-10 scale

    return aesthetic


def _hps(spec: RewardSpec, device: str) -> Callable:
    model, tokenizer = load_clip(spec.hps_arch, hps_file(spec), device)

    def hps(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        img = _encode_images(model, images, "longest", normalize=True)  # (N, 1024)
        txt = _encode_prompts(model, tokenizer, prompts, len(images))  # (N, 1024)
        return (img * txt).sum(-1)  # (N,) cosine; HPSv2 reports diag(img @ txtᵀ) without logit scale

    return hps


def _compress(spec: RewardSpec, device: str) -> Callable:
    import rid_kernels

    q = spec.jpeg_quality

    def compress(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        x = images.float()
        return -(x - rid_kernels.jpeg(x, quality=q)).square().sum(dim=(1, 2, 3))  # (N,)

    return compress


def _clip_reward(spec: RewardSpec, device: str) -> Callable:
    load_clip(spec.clip_arch, spec.clip_weights, device)  # loads now: missing weights fail here

    def clip(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return clip_score(images, prompts, spec, device)  # (N,), 100 * cosine

    return clip


_FACTORIES = {"aesthetic": _aesthetic, "hps": _hps, "compress": _compress, "clip": _clip_reward}


def get(name: str, spec: RewardSpec | None = None, device="cpu") -> Callable:
    """fn(images (N, 3, H, W) in [0, 1], prompts) -> (N,) scores, higher is better.

    Weights load here (once per spec files and device), so a missing checkpoint fails now with a
    ValueError naming the file and the spec key, not in the middle of training.
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown reward {name!r}; valid names: {', '.join(NAMES)}")
    return _FACTORIES[name](spec or RewardSpec(), _device(device))


def parse_joint(text: str) -> dict[str, float]:
    """'aesthetic:0.01,hps:2,compress:1' -> {'aesthetic': 0.01, 'hps': 2.0, 'compress': 1.0}."""
    weights: dict[str, float] = {}
    for part in (p.strip() for p in str(text).split(",")):
        name, sep, value = part.partition(":")
        name = name.strip()
        if not sep or name not in NAMES:
            raise ValueError(f"--joint {text!r}: {part!r} is not name:weight with name in {', '.join(NAMES)} "
                             "(example: aesthetic:0.01,hps:2,compress:1)")
        if name in weights:
            raise ValueError(f"--joint {text!r}: reward {name!r} given twice")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"--joint {text!r}: weight {value!r} of {name!r} is not a number") from None
        if not (math.isfinite(weights[name]) and weights[name] > 0):
            raise ValueError(f"--joint {text!r}: weight {value!r} of {name!r} must be a finite number > 0")
    return weights


def joint(weights: dict[str, float], spec: RewardSpec | None = None, device="cpu") -> Callable:
    """Weighted sum of rewards: the joint-tuning baseline, sum_i w_i R_i. The paper's Eq. 10 uses
    aesthetic 0.01, hps 2, compress 1 for rewards on very different scales: aesthetic 1-10, HPS ~0.27,
    compress a squared norm over the whole image, which grows with resolution (≈ -3 in the mini world
    at 32², some -100 at 512²), so at SD scale compress dominates the sum at weight 1."""
    if not weights:
        raise ValueError(f"joint reward needs at least one name:weight, got {weights!r}")
    fns = {name: get(name, spec, device) for name in weights}

    def joint_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return sum(w * fns[name](images, prompts) for name, w in weights.items())

    joint_reward.parts = {name: (w, fns[name]) for name, w in weights.items()}  # R0 normalises each part
    return joint_reward


#### METRICS (eval.py) ####

def clip_score(images: torch.Tensor, prompts: list[str], spec: RewardSpec | None = None, device="cpu") -> torch.Tensor:
    """100 * cos(image, prompt) with the clip_arch model, (N,). (torchmetrics' CLIPScore also clamps at 0;
    we report the raw value, identical for any sensible text-image pair.)"""
    spec = spec or RewardSpec()
    model, tokenizer = load_clip(spec.clip_arch, spec.clip_weights, _device(device))
    img = _encode_images(model, images, "shortest", normalize=True)
    txt = _encode_prompts(model, tokenizer, prompts, len(images))
    return 100.0 * (img * txt).sum(-1)


def clip_features(images: torch.Tensor, spec: RewardSpec | None = None, device="cpu") -> torch.Tensor:
    """CLIP image embeddings before normalisation, (N, D): the feature space of FID in the mini world
    (and of FD_CLIP, Kynkaanniemi et al. 2023)."""
    spec = spec or RewardSpec()
    model, _ = load_clip(spec.clip_arch, spec.clip_weights, _device(device))
    return _encode_images(model, images, "shortest", normalize=False)
