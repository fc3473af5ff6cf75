"""RID — Reward Incremental Distillation, and the reward fine-tuning methods it is compared with.

Reading order: the adapter group (LoRA tasks on a frozen UNet, one flat trainable buffer, an EMA
teacher that is a second buffer, not a second UNet) → DDIM written out → RID's training step
(`rid_loss`, the paper's Algorithm 1) → the baselines (AlignProp-style last step, DRaFT-K, DRaFT,
DRaFT-LV, ReFL) → `train_step` → checkpoints, model soup, diffusers LoRA export → `python rid.py bench`.

Shapes use SD-1.5 names: latents z (B, 4, h, w), images (B, 3, H, W) in [0, 1], text (B, L, D).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import kernels

ATTN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # AlignProp's LoRA targets, which RID follows
FF_TARGETS = ("ff.net.0.proj", "ff.net.2")  # DRaFT also adapts the transformer feed-forward
METHODS = ("baseline", "rid", "draft-k", "draft", "draft-lv", "refl")
DISTILL_SPACES = ("pixel", "latent")
FORMAT_VERSION = 1

# The paper gives no EMA momentum. An EMA of momentum α averages the student over ≈ 1/(1−α)
# optimizer steps. At the paper's batch 8 one epoch of the 750 training prompts is ≈ 94 steps, so
# α = 0.99 (horizon 100 steps) makes the teacher ≈ the student of one epoch ago. The teacher starts
# as the previous stage's model (the new adapter's up matrix is zero), so the distillation first
# anchors to what the model could already do and then follows the student with a one-epoch lag —
# short against a task's 10 (aesthetic, ≈ 940 steps) to 120 (hps) epochs. α = 0.999 (≈ 1000 steps)
# would pin the teacher to the old model for the whole aesthetic stage, an L2-to-init penalty that
# fights the reward throughout; α = 0.9 (10 steps) leaves teacher ≈ student and nothing to distil.
DEFAULT_EMA = 0.99


def _bad(name, value, allowed):
    return ValueError(f"{name}={value!r} is not allowed; allowed: {allowed}")


############################################################################################
# Models
############################################################################################

@dataclass
class Models:
    """SD-style components, frozen and in eval mode. model_id: a hub id or the resolved local dir."""
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    model_id: str
    _uncond: torch.Tensor | None = field(default=None, repr=False)  # cached "" embedding (1, L, D)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_shape(self) -> tuple:
        s = self.unet.config.sample_size
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        return (self.unet.config.in_channels, h, w)


def load_models(model: str, device="cpu", dtype=torch.float32) -> Models:
    """Load unet/vae/text_encoder/tokenizer from a local diffusers-layout dir or a hub id."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model = str(model)
    how = ("a local diffusers directory with unet/ vae/ text_encoder/ tokenizer/ (what "
           "StableDiffusionPipeline.save_pretrained writes), or a hub id such as "
           "stable-diffusion-v1-5/stable-diffusion-v1-5 available in the Hugging Face cache")
    if os.path.isdir(model):
        missing = [s for s in ("unet", "vae", "text_encoder", "tokenizer") if not os.path.isdir(os.path.join(model, s))]
        if missing:
            raise ValueError(f"model={model!r} lacks the subfolder(s) {missing}; expected {how}")
        model_id = os.path.realpath(model)
    elif os.path.exists(model) or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ValueError(f"model={model!r} is neither a directory nor a hub id; expected {how}")
    else:
        model_id = model
    try:
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"model={model!r} could not be loaded ({first}); expected {how}") from e
    for m in (unet, vae, text_encoder):
        m.to(device).eval().requires_grad_(False)
    unet.rid_base_model = model_id  # read by inject() to tag checkpoints with their base model
    return Models(unet, vae, text_encoder, tokenizer, model_id)


@torch.no_grad()
def encode_prompts(models: Models, prompts: list) -> torch.Tensor:
    """Prompts → CLIP last hidden states (B, L, D), padded to the tokenizer's max length as SD does."""
    tok = models.tokenizer
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(models.text_encoder.device)
    return models.text_encoder(ids)[0].to(models.dtype)


def _text_batch(models: Models, prompts: list, guidance: float) -> torch.Tensor:
    """[uncond; cond] (2B, L, D) for one CFG-batched UNet call; just cond (B, L, D) when guidance == 1."""
    cond = encode_prompts(models, prompts)
    if guidance == 1.0:
        return cond
    if models._uncond is None:
        models._uncond = encode_prompts(models, [""])
    return torch.cat([models._uncond.expand_as(cond), cond])


############################################################################################
# LoRA adapter group
############################################################################################

class LoRALinear(nn.Module):
    """A frozen nn.Linear and its adapter group: y = xWᵀ + b + Σ_i s_i (x A_iᵀ) B_iᵀ.

    Frozen tasks live pre-concatenated (a concatenation of adapters is itself one adapter), the
    current task is a view into the group's flat buffer, so the op always gets two entries:
        As = [A_frozen (T_f·r, in), A_t (r, in)],  Bs = [B_frozen·s_rep (out, T_f·r), B_t (out, r)].
    """

    def __init__(self, base: nn.Linear, name: str, group: "AdapterGroup"):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.name = name
        self.group = group  # a plain object, not a submodule
        w = base.weight
        self.register_buffer("A_frozen", w.new_zeros(0, base.in_features, dtype=torch.float32), persistent=False)
        self.register_buffer("B_frozen", w.new_zeros(base.out_features, 0, dtype=torch.float32), persistent=False)
        self.register_buffer("B_scaled", self.B_frozen, persistent=False)  # B_frozen ⊙ s_rep

    # Attention processors read these (e.g. attn.to_q.weight.dtype).
    weight = property(lambda self: self.base.weight)
    bias = property(lambda self: self.base.bias)
    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)

    def current(self, buf: torch.Tensor):
        """This layer's (A_t (r, in), B_t (out, r)) as views into a flat buffer (student or EMA)."""
        r, i, o = self.group.rank, self.base.in_features, self.base.out_features
        off = self.group._offsets[self.name]
        return buf[off:off + r * i].view(r, i), buf[off + r * i:off + r * i + o * r].view(o, r)

    def forward(self, x):
        As, Bs, scales = [], [], []
        if self.A_frozen.shape[0]:
            As.append(self.A_frozen), Bs.append(self.B_scaled), scales.append(1.0)
        buf = self.group._active
        if buf is not None:
            A_t, B_t = self.current(buf)
            As.append(A_t), Bs.append(B_t), scales.append(self.group.scales[-1])
        return kernels.lora_group_linear(x, self.base.weight, self.base.bias, As, Bs, scales)


class AdapterGroup:
    """The LoRA tasks of one UNet. Task t's trainable A_t, B_t of every wrapped layer are views into
    ONE fp32 nn.Parameter (`flat`); the EMA teacher is a second buffer of the same layout (`ema`)."""

    def __init__(self, unet, rank: int, targets: tuple, base_model: str):
        self.unet, self.rank, self.targets, self.base_model = unet, rank, tuple(targets), base_model
        self.layers: dict = {}
        self.tasks: list = []
        self.scales: list = []
        self._offsets: dict = {}
        self._numel = 0
        self._flat: nn.Parameter | None = None
        self._ema: torch.Tensor | None = None
        self._active: torch.Tensor | None = None  # what the wrapped layers read: flat, ema or None

    # -- tasks ---------------------------------------------------------------------------------
    def _layout(self):
        off = 0
        for name, layer in self.layers.items():  # per layer: A_t (r·in) then B_t (out·r)
            self._offsets[name] = off
            off += self.rank * (layer.base.in_features + layer.base.out_features)
        self._numel = off

    @property
    def flat(self) -> nn.Parameter:
        if self._flat is None:
            raise ValueError("the adapter group has no trainable task; call add_task(name) first")
        return self._flat

    @property
    def ema(self) -> torch.Tensor:
        self.flat  # same error when there is no current task
        return self._ema

    def parameters(self) -> list:
        return [self.flat]

    @torch.no_grad()
    def _freeze_current(self):
        if self._flat is None:
            return
        for layer in self.layers.values():
            A_t, B_t = layer.current(self._flat)
            layer.A_frozen = torch.cat([layer.A_frozen, A_t])
            layer.B_frozen = torch.cat([layer.B_frozen, B_t], 1)
        self._flat = self._ema = self._active = None

    @torch.no_grad()
    def _refresh_scales(self):
        n_frozen = len(self.tasks) - (self._flat is not None)
        s_rep = torch.tensor(self.scales[:n_frozen], dtype=torch.float32).repeat_interleave(self.rank)
        for layer in self.layers.values():
            layer.B_scaled = layer.B_frozen * s_rep.to(layer.B_frozen.device)

    def add_task(self, name: str, generator: torch.Generator | None = None) -> nn.Parameter:
        """Freeze every existing adapter and append a fresh (A_t, B_t) to every wrapped layer.
        Standard LoRA init: A Kaiming-uniform (a=√5, as nn.Linear and peft), B zero — the model
        output is unchanged. Returns the new flat buffer; build the optimizer on it."""
        if not isinstance(name, str) or not name or name in self.tasks:
            raise _bad("task name", name, f"a new non-empty string (existing: {self.tasks})")
        flat = self._start_task(name)
        with torch.no_grad():
            for layer in self.layers.values():
                A_t, _ = layer.current(flat)
                nn.init.kaiming_uniform_(A_t, a=math.sqrt(5), generator=generator)
            self._ema.copy_(flat)  # teacher = student at creation
        return flat

    def _start_task(self, name: str) -> nn.Parameter:
        """Freeze the current task; a zero flat buffer and EMA for `name` (the caller fills them)."""
        self._freeze_current()
        device = next(iter(self.layers.values())).base.weight.device
        self._flat = nn.Parameter(torch.zeros(self._numel, dtype=torch.float32, device=device))
        self._ema = torch.zeros_like(self._flat, requires_grad=False)
        self._active = self._flat
        self.tasks.append(name)
        self.scales.append(1.0)
        self._refresh_scales()
        return self._flat

    def set_scale(self, task, value: float):
        """Per-task LoRA scale s_i (DRaFT's scaling / interpolation); task = index or name."""
        i = self.tasks.index(task) if isinstance(task, str) and task in self.tasks else task
        if not isinstance(i, int) or not -len(self.tasks) <= i < len(self.tasks):
            raise _bad("task", task, f"an index below {len(self.tasks)} or one of {self.tasks}")
        self.scales[i] = float(value)
        self._refresh_scales()

    # -- EMA teacher -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def teacher(self):
        """Inside, every wrapped layer reads the EMA adapters of the current task (frozen tasks and
        base weights are shared with the student). Restores the student on exit, also on errors."""
        ema, previous = self.ema, self._active
        self._active = ema
        try:
            yield self
        finally:
            self._active = previous

    def ema_update(self, alpha: float):
        """teacher ← α·teacher + (1−α)·student, one kernel over the flat buffer."""
        if not (isinstance(alpha, (int, float)) and 0.0 <= alpha < 1.0):
            raise _bad("ema alpha", alpha, "a float in [0, 1)")
        kernels.ema_(self.ema, self.flat.detach(), alpha)

    # -- checkpoints -----------------------------------------------------------------------------
    def _task_tensors(self, i: int) -> dict:
        """{layer: (A_i (r, in), B_i (out, r))} for task i, frozen or current."""
        n_frozen = len(self.tasks) - (self._flat is not None)
        out = {}
        for name, layer in self.layers.items():
            if i < n_frozen:
                rows = slice(i * self.rank, (i + 1) * self.rank)
                out[name] = (layer.A_frozen[rows], layer.B_frozen[:, rows])
            else:
                out[name] = tuple(t.detach() for t in layer.current(self._flat))
        return out

    def fingerprint(self) -> str:
        """Hash of a strided sample of the wrapped base weights (bf16-rounded, so fp32/bf16/fp16
        loads of the same model agree): recognises the base model after its directory moved."""
        h = hashlib.sha256()
        for name, layer in self.layers.items():
            w = layer.base.weight.detach().flatten()
            sample = w[:: max(1, w.numel() // 16)][:16].to("cpu", torch.bfloat16).view(torch.int16)
            h.update(name.encode() + bytes(sample.numpy().tobytes()))
        return h.hexdigest()[:16]

    def save(self, dir: str, extra: dict | None = None):
        """dir/adapters.safetensors (every task's A/B per layer, the EMA buffer) + dir/adapters.json."""
        from safetensors.torch import save_file

        os.makedirs(dir, exist_ok=True)
        tensors = {}
        for i in range(len(self.tasks)):
            for name, (A, B) in self._task_tensors(i).items():
                tensors[f"{i}/{name}/A"] = A.detach().float().contiguous().cpu().clone()
                tensors[f"{i}/{name}/B"] = B.detach().float().contiguous().cpu().clone()
        if self._flat is not None:
            tensors["ema"] = self._ema.detach().cpu().clone()
        meta = {"format": "rid-adapters", "version": FORMAT_VERSION, "tasks": self.tasks, "scales": self.scales,
                "rank": self.rank, "targets": list(self.targets), "layers": list(self.layers),
                "trainable": self._flat is not None, "base_model": self.base_model,
                "fingerprint": self.fingerprint(), "extra": extra or {}}
        _atomic(os.path.join(dir, "adapters.safetensors"), lambda p: save_file(tensors, p))
        _atomic(os.path.join(dir, "adapters.json"), lambda p: _write_text(p, json.dumps(meta, indent=1)))

    def export_lora(self, path: str) -> str:
        """ONE standard LoRA file that diffusers' pipe.load_lora_weights(dir, weight_name=...) loads:
        Σ_i s_i B_i A_i = [s_1 B_1 … s_T B_T]·[A_1; …; A_T], exact at rank T·r. Keys follow the
        diffusers/peft naming; no alpha keys, so diffusers sets alpha = rank and the scale is 1.
        A directory `path` gets diffusers' default name pytorch_lora_weights.safetensors."""
        from safetensors.torch import save_file

        if not self.tasks:
            raise ValueError("export_lora: the adapter group has no tasks; call add_task or load_group first")
        if os.path.isdir(path):
            path = os.path.join(path, "pytorch_lora_weights.safetensors")
        per_task = [self._task_tensors(i) for i in range(len(self.tasks))]
        tensors = {}
        for name in self.layers:
            A = torch.cat([t[name][0] for t in per_task])  # (T·r, in)
            B = torch.cat([s * t[name][1] for s, t in zip(self.scales, per_task)], 1)  # (out, T·r)
            tensors[f"unet.{name}.lora_A.weight"] = A.detach().float().cpu().contiguous()
            tensors[f"unet.{name}.lora_B.weight"] = B.detach().float().cpu().contiguous()
        _atomic(path, lambda p: save_file(tensors, p))
        return path


def _atomic(path: str, write):
    """Write via a temp file in the same directory, then os.replace (never a half-written file)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_text(path: str, text: str):
    with open(path, "w") as f:
        f.write(text)


def _group_of(unet):
    for m in unet.modules():
        if isinstance(m, LoRALinear):
            return m.group
    return None


def inject(unet, rank: int = 4, targets=ATTN_TARGETS) -> AdapterGroup:
    """Wrap the target linears of a diffusers UNet in place; freezes the whole UNet. No tasks yet.
    Move the UNet to its device first: the adapter buffers are created where the weights are."""
    if not isinstance(rank, int) or rank < 1:
        raise _bad("rank", rank, "an integer ≥ 1")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    for t in targets:
        if t not in ATTN_TARGETS + FF_TARGETS:
            raise _bad("target", t, ", ".join(ATTN_TARGETS + FF_TARGETS))
    if not targets:
        raise _bad("targets", targets, f"a non-empty subset of {ATTN_TARGETS + FF_TARGETS}")
    if _group_of(unet) is not None:
        raise ValueError("inject: this UNet already has an adapter group (use load_group to replace its contents)")
    unet.requires_grad_(False)
    base = getattr(unet, "rid_base_model", None) or unet.config.get("_name_or_path", "") or "unknown"
    group = AdapterGroup(unet, rank, targets, base)
    names = [n for n, m in unet.named_modules()
             if isinstance(m, nn.Linear) and any(n.endswith("." + t) for t in targets)]
    if not names:
        raise ValueError(f"inject: no nn.Linear named like {targets} in this UNet")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name)
        group.layers[name] = LoRALinear(getattr(parent, child), name, group)
        setattr(parent, child, group.layers[name])
    group._layout()
    return group


############################################################################################
# Checkpoint loading and model soup
############################################################################################

def _read_saved(dir: str):
    from safetensors.torch import load_file

    js, st = os.path.join(dir, "adapters.json"), os.path.join(dir, "adapters.safetensors")
    if not (os.path.isfile(js) and os.path.isfile(st)):
        raise ValueError(f"dir={dir!r} holds no adapter group; expected adapters.json + adapters.safetensors "
                         "(written by AdapterGroup.save)")
    with open(js) as f:
        meta = json.load(f)
    if meta.get("format") != "rid-adapters" or meta.get("version") != FORMAT_VERSION:
        raise _bad(f"{js} format/version", (meta.get("format"), meta.get("version")), ("rid-adapters", FORMAT_VERSION))
    return meta, load_file(st)


def _target_group(unet, meta: dict, dir: str) -> AdapterGroup:
    """The UNet's existing group (emptied) or a new one, checked against a saved group's settings."""
    group = _group_of(unet)
    if group is None:
        group = inject(unet, meta["rank"], tuple(meta["targets"]))
    for key, have in (("rank", group.rank), ("targets", list(group.targets)), ("layers", list(group.layers))):
        if meta[key] != have:
            shown = (lambda v: f"{len(v)} layers, e.g. {v[:2]}") if key == "layers" else repr
            raise ValueError(f"{dir}: saved {key} {shown(meta[key])} differs from this UNet's {shown(have)}")
    if meta["base_model"] != group.base_model and meta["fingerprint"] != group.fingerprint():
        raise ValueError(f"{dir}: saved base_model {meta['base_model']!r} differs from this UNet's "
                         f"{group.base_model!r} (and the base weights differ); load the same base model")
    for layer in group.layers.values():  # empty it
        layer.A_frozen, layer.B_frozen = layer.A_frozen[:0], layer.B_frozen[:, :0]
    group.tasks, group.scales = [], []
    group._flat = group._ema = group._active = None
    return group


@torch.no_grad()
def _append_frozen(group: AdapterGroup, tensors: dict, i: int, scale: float, name: str):
    for lname, layer in group.layers.items():
        dev = layer.A_frozen.device
        layer.A_frozen = torch.cat([layer.A_frozen, tensors[f"{i}/{lname}/A"].to(dev)])
        layer.B_frozen = torch.cat([layer.B_frozen, tensors[f"{i}/{lname}/B"].to(dev)], 1)
    group.tasks.append(name)
    group.scales.append(scale)


def load_group(unet, dir: str) -> AdapterGroup:
    """inject (or reuse the UNet's group) and restore a saved group bit-exactly, the last task
    trainable again with its EMA teacher."""
    meta, tensors = _read_saved(dir)
    group = _target_group(unet, meta, dir)
    n = len(meta["tasks"])
    n_frozen = n - bool(meta["trainable"])
    for i in range(n_frozen):
        _append_frozen(group, tensors, i, meta["scales"][i], meta["tasks"][i])
    if meta["trainable"]:
        group._start_task(meta["tasks"][-1])
        with torch.no_grad():
            for name, layer in group.layers.items():
                A_t, B_t = layer.current(group._flat)
                A_t.copy_(tensors[f"{n - 1}/{name}/A"]), B_t.copy_(tensors[f"{n - 1}/{name}/B"])
            group._ema.copy_(tensors["ema"])
        group.scales[-1] = meta["scales"][-1]
    group._refresh_scales()
    return group


def soup(unet, dirs: list, weights: list | None = None) -> AdapterGroup:
    """Model soup Σ_j w_j Δ_j of independently trained runs. Each Δ_j = Σ_i s_i B_i A_i is an adapter
    group, so the soup is one too: every run's adapters as frozen tasks with scales w_j·s_i.
    Equal weights by default. Evaluation only (no trainable task)."""
    dirs = list(dirs)
    if weights is None and dirs:
        weights = [1.0 / len(dirs)] * len(dirs)
    if not dirs or len(weights) != len(dirs):
        raise _bad("weights", weights, f"None or {len(dirs)} floats, one per run dir (dirs must be non-empty)")
    saved = [_read_saved(d) for d in dirs]
    first = saved[0][0]
    for d, (meta, _) in zip(dirs[1:], saved[1:]):
        for key in ("rank", "targets", "layers"):
            if meta[key] != first[key]:
                raise ValueError(f"soup: {d} has {key} {meta[key]!r} but {dirs[0]} has {first[key]!r}; "
                                 "runs must share rank, targets and layers")
        if meta["base_model"] != first["base_model"] and meta["fingerprint"] != first["fingerprint"]:
            raise ValueError(f"soup: {d} has base_model {meta['base_model']!r} but {dirs[0]} has "
                             f"{first['base_model']!r}; runs must share the base model")
    group = _target_group(unet, first, dirs[0])
    for j, (w, (meta, tensors)) in enumerate(zip(weights, saved)):
        for i, (name, s) in enumerate(zip(meta["tasks"], meta["scales"])):
            _append_frozen(group, tensors, i, float(w) * s, f"{j}:{name}")
    group._refresh_scales()
    return group


############################################################################################
# DDIM, written out (what SD-1.5 ships)
############################################################################################

class DDIM:
    """ε-prediction DDIM, η = 0, SD-1.5's scheduler config: scaled-linear betas √0.00085 → √0.012
    over 1000 steps, timestep_spacing "leading", steps_offset 1 (→ 981, 961, …, 1 at 50 steps),
    set_alpha_to_one False (the last step's ᾱ_prev = ᾱ_0). float32 throughout, as diffusers."""

    def __init__(self, steps: int = 50, num_train_timesteps: int = 1000):
        if not isinstance(steps, int) or not 1 <= steps <= num_train_timesteps:
            raise _bad("steps", steps, f"an integer in [1, {num_train_timesteps}]")
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, num_train_timesteps, dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # ᾱ_t (1000,)
        self.ratio = num_train_timesteps // steps
        self.timesteps = torch.arange(steps - 1, -1, -1, dtype=torch.int64) * self.ratio + 1  # (steps,)

    def alpha(self, t: int) -> torch.Tensor:
        return self.alphas_cumprod[t] if t >= 0 else self.alphas_cumprod[0]  # ᾱ_prev of the last step = ᾱ_0

    def x0(self, eps: torch.Tensor, t: int, z: torch.Tensor) -> torch.Tensor:
        """x̂₀ = (z_t − √(1−ᾱ_t) ε)/√ᾱ_t"""
        a_t = self.alpha(t)
        return (z - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5

    def step(self, eps: torch.Tensor, t: int, z: torch.Tensor) -> torch.Tensor:
        """z_t → z_{t−ratio} = √ᾱ_prev x̂₀ + √(1−ᾱ_prev) ε   (η = 0: no fresh noise)"""
        a_prev = self.alpha(t - self.ratio)
        return a_prev ** 0.5 * self.x0(eps, t, z) + (1 - a_prev) ** 0.5 * eps

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        a_t = self.alpha(t)
        return a_t ** 0.5 * x0 + (1 - a_t) ** 0.5 * eps


def _eps(models: Models, z, t, text, guidance: float):
    """CFG noise prediction ε_u + w(ε_c − ε_u); uncond and cond batched in ONE UNet call."""
    t = torch.as_tensor(t, device=z.device)
    if guidance == 1.0:
        return models.unet(z, t, encoder_hidden_states=text).sample
    eps_u, eps_c = models.unet(torch.cat([z, z]), t, encoder_hidden_states=text).sample.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


def _denoise(models, text, z, ddim: DDIM, indices, guidance, checkpoint=False):
    """Run the DDIM steps at ddim.timesteps[indices]; the caller picks grad / no_grad."""
    for i in indices:
        t = int(ddim.timesteps[i])
        if checkpoint and torch.is_grad_enabled():  # memory flat in K: keep only z between steps
            eps = torch.utils.checkpoint.checkpoint(_eps, models, z, t, text, guidance, use_reentrant=False)
        else:
            eps = _eps(models, z, t, text, guidance)
        z = ddim.step(eps, t, z)
    return z


def decode(models: Models, z: torch.Tensor) -> torch.Tensor:
    """Latents (B, 4, h, w) → images (B, 3, H, W) in [0, 1] (the one place [−1, 1] → [0, 1])."""
    x = models.vae.decode(z.to(models.vae.dtype) / models.vae.config.scaling_factor).sample
    return (x.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def sample(models, prompts, noise, steps=50, guidance=7.5, group=None, teacher=False) -> torch.Tensor:
    """DDIM from `noise` (B, *latent_shape) → images (B, 3, H, W) in [0, 1]. Uses whatever adapters
    are injected in models.unet; teacher=True samples with group's EMA teacher."""
    if teacher and group is None:
        raise _bad("group", group, "the AdapterGroup whose EMA teacher should sample (teacher=True)")
    ddim = DDIM(steps)
    text = _text_batch(models, prompts, guidance)
    with group.teacher() if teacher else contextlib.nullcontext():
        z = _denoise(models, text, noise.to(models.device, models.dtype), ddim, range(steps), guidance)
    return decode(models, z)


############################################################################################
# Training: one step per method
############################################################################################

@dataclass
class StepConfig:
    method: str = "rid"  # one of METHODS
    steps: int = 50  # DDIM steps (paper: 50)
    guidance: float = 7.5  # CFG weight (paper: 7.5)
    lam: float = 0.1  # RID's distillation weight λ (paper: 0.1)
    ema: float = DEFAULT_EMA  # RID teacher momentum α (see DEFAULT_EMA)
    truncate: int = 1  # draft-k: K, the number of final steps with gradient
    lv_n: int = 2  # draft-lv: re-noised copies n (DRaFT: 2)
    refl_m: int = 20  # refl: stop at a random step in [1, m] from the end (m at 50 steps; scaled)
    distill_space: str = "pixel"  # rid: compare decoded images (paper) or final latents
    grad_checkpoint: bool = False  # torch.utils.checkpoint around every UNet call with gradient

    def __post_init__(self):
        self.check()

    def check(self):
        if self.method not in METHODS:
            raise _bad("method", self.method, ", ".join(METHODS))
        if not isinstance(self.steps, int) or not 1 <= self.steps <= 1000:
            raise _bad("steps", self.steps, "an integer in [1, 1000]")
        if not self.lam >= 0:
            raise _bad("lam", self.lam, "a float ≥ 0")
        if not 0 <= self.ema < 1:
            raise _bad("ema", self.ema, "a float in [0, 1)")
        if not isinstance(self.truncate, int) or not 1 <= self.truncate <= self.steps:
            raise _bad("truncate", self.truncate, f"an integer K in [1, steps={self.steps}]")
        if not isinstance(self.lv_n, int) or self.lv_n < 1:
            raise _bad("lv_n", self.lv_n, "an integer ≥ 1")
        if not isinstance(self.refl_m, int) or self.refl_m < 1:
            raise _bad("refl_m", self.refl_m, "an integer ≥ 1")
        if self.distill_space not in DISTILL_SPACES:
            raise _bad("distill_space", self.distill_space, ", ".join(DISTILL_SPACES))
        return self


def sq_norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a − b‖² per sample (summed over every element of an image), averaged over the batch: (B, ...) -> ().

    The paper's λ‖x_s − x_t‖² read literally. A per-element mean (MSE) would divide the term by
    C·H·W (3·512² at SD scale, 3·32² in the mini world): measured in the mini world, λ = 0.1 times
    the MSE stayed below 3e-5 next to an aesthetic reward of ≈ 7 and RID equalled the baseline to
    three digits. With the sum, λ·‖·‖² is of the order of the reward changes a task makes."""
    return (a - b).pow(2).flatten(1).sum(1).mean()


def rid_loss(models, group, reward_fn, prompts, noise, cfg: StepConfig):
    """RID (the paper's Algorithm 1): reward on the student's image minus λ × the distance to the
    EMA teacher's image, both generated from the same z_1. The EMA update follows the optimizer
    step (train_step)."""
    ddim = DDIM(cfg.steps)
    text = _text_batch(models, prompts, cfg.guidance)  # (2B, L, D)
    last = [cfg.steps - 1]

    #### SAMPLING: z_N → z_1 with the student, no gradient ####
    with torch.no_grad():
        z1 = _denoise(models, text, noise.to(models.device, models.dtype), ddim, range(cfg.steps - 1), cfg.guidance)

    #### LAST STEP, STUDENT: z_1 → x₀ with gradient into the current adapters ####
    x0_s = _denoise(models, text, z1, ddim, last, cfg.guidance, cfg.grad_checkpoint)  # (B, 4, h, w)

    #### LAST STEP, TEACHER: same z_1, EMA adapters, no gradient ####
    with torch.no_grad(), group.teacher():
        x0_t = _denoise(models, text, z1, ddim, last, cfg.guidance)

    #### DECODE AND REWARD ####
    img_s = decode(models, x0_s)  # (B, 3, H, W) in [0, 1]
    reward = reward_fn(img_s, prompts)  # (B,)

    #### DISTILLATION: ‖student − teacher‖², the squared L2 norm per image, mean over the batch ####
    if cfg.distill_space == "pixel":
        with torch.no_grad():
            img_t = decode(models, x0_t)
        distill = sq_norm(img_s, img_t)
    else:
        distill = sq_norm(x0_s.float(), x0_t.float())

    loss = -reward.mean() + cfg.lam * distill
    return loss, {"loss": loss.item(), "reward": reward.mean().item(), "distill": distill.item()}


def _randn(shape, like: torch.Tensor, generator):
    dev = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=dev).to(like)


def truncated_loss(models, group, reward_fn, prompts, noise, cfg: StepConfig, generator=None):
    """baseline (K=1, AlignProp), draft-k (K=cfg.truncate), draft (K=all steps), draft-lv (K=1 plus
    n re-noised copies of the final latent, DRaFT's low-variance estimator); loss = −R."""
    K = {"baseline": 1, "draft-k": cfg.truncate, "draft": cfg.steps, "draft-lv": 1}[cfg.method]
    ddim = DDIM(cfg.steps)
    text = _text_batch(models, prompts, cfg.guidance)
    with torch.no_grad():  # steps N … K+1
        z = _denoise(models, text, noise.to(models.device, models.dtype), ddim, range(cfg.steps - K), cfg.guidance)
    x0 = _denoise(models, text, z, ddim, range(cfg.steps - K, cfg.steps), cfg.guidance, cfg.grad_checkpoint)
    reward = reward_fn(decode(models, x0), prompts)  # (B,)
    rewards = [reward.mean()]
    if cfg.method == "draft-lv":
        t1 = int(ddim.timesteps[-1])
        for _ in range(cfg.lv_n):  # z_1 = √ᾱ x̂₀ + √(1−ᾱ) ε_i, then the last step again
            z1 = ddim.add_noise(x0.detach(), _randn(x0.shape, x0, generator), t1)
            x0_i = _denoise(models, text, z1, ddim, [cfg.steps - 1], cfg.guidance, cfg.grad_checkpoint)
            rewards.append(reward_fn(decode(models, x0_i), prompts).mean())
    loss = -torch.stack(rewards).mean()
    return loss, {"loss": loss.item(), "reward": reward.mean().item()}


def refl_loss(models, group, reward_fn, prompts, noise, cfg: StepConfig, generator=None):
    """ReFL: sample to a random step j ∈ [1, m] from the end (no grad), then one UNet call with
    gradient predicting x̂₀ directly from z_t; loss = −R(decode(x̂₀)). m scales with steps/50."""
    m = min(cfg.steps, max(1, round(cfg.refl_m * cfg.steps / 50)))
    j = int(torch.randint(1, m + 1, (), generator=generator))
    ddim = DDIM(cfg.steps)
    text = _text_batch(models, prompts, cfg.guidance)
    i = cfg.steps - j
    with torch.no_grad():
        z_t = _denoise(models, text, noise.to(models.device, models.dtype), ddim, range(i), cfg.guidance)
    t = int(ddim.timesteps[i])
    eps = _eps(models, z_t, t, text, cfg.guidance)
    reward = reward_fn(decode(models, ddim.x0(eps, t, z_t)), prompts)
    loss = -reward.mean()
    return loss, {"loss": loss.item(), "reward": reward.mean().item(), "t": float(t)}


def method_loss(models, group, reward_fn, prompts, noise, cfg: StepConfig, generator=None):
    """(loss, logs) for cfg.method on one micro-batch; gradient reaches only group.flat."""
    cfg.check()
    group.flat  # a trainable task must exist
    if len(prompts) != noise.shape[0]:
        raise _bad("noise batch", noise.shape[0], f"one latent per prompt ({len(prompts)})")
    if cfg.method == "rid":
        return rid_loss(models, group, reward_fn, prompts, noise, cfg)
    if cfg.method == "refl":
        return refl_loss(models, group, reward_fn, prompts, noise, cfg, generator)
    return truncated_loss(models, group, reward_fn, prompts, noise, cfg, generator)


def train_step(models, group, reward_fn, micro_batches, optimizer, cfg: StepConfig, clip_grad=1.0,
               generator=None) -> dict:
    """One optimizer step over micro-batches [(prompts, noise), …]; DDP-averaged when
    torch.distributed is initialised; RID's EMA teacher update after the step."""
    cfg.check()
    if not micro_batches:
        raise _bad("micro_batches", micro_batches, "a non-empty list of (prompts, noise)")
    flat = group.flat
    optimizer.zero_grad(set_to_none=True)
    logs = {}

    #### LOSS AND BACKWARD per micro-batch (gradient accumulation) ####
    for prompts, noise in micro_batches:
        loss, mb = method_loss(models, group, reward_fn, prompts, noise, cfg, generator)
        (loss / len(micro_batches)).backward()
        for k, v in mb.items():
            logs[k] = logs.get(k, 0.0) + v / len(micro_batches)

    #### AVERAGE OVER RANKS, CLIP, STEP ####
    if flat.grad is None:  # e.g. a reward that ignores the image; keeps all_reduce in lockstep
        flat.grad = torch.zeros_like(flat)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flat.grad)
        flat.grad.div_(torch.distributed.get_world_size())
    logs["grad_norm"] = float(nn.utils.clip_grad_norm_([flat], clip_grad if clip_grad else float("inf")))
    optimizer.step()

    #### RID: EMA TEACHER UPDATE (after the student moved) ####
    if cfg.method == "rid":
        group.ema_update(cfg.ema)
    return logs


############################################################################################
# Benchmark: python rid.py bench [--model DIR] [--steps N] [--batch B] [--reps R]
############################################################################################

def _median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _sd15_unet_meta():
    """SD-1.5's UNet (860 M parameters) on the meta device: shapes without memory."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


def bench(model: str | None, steps: int, batch: int, reps: int):
    """Validate, then time: RID vs baseline per training step; EMA-buffer teacher vs a deep-copied
    UNet; one adapter-group op vs T separate LoRA linears as T grows."""
    if model is None:  # the test suite's tiny SD, built from configs in a temp dir
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))
        from tiny import tiny_sd

        with tempfile.TemporaryDirectory(prefix="rid-bench-") as tmp:
            base = load_models(tiny_sd(tmp))
        model = "tests/tiny.py tiny SD"
    else:
        base = load_models(model)
    prompts = ["a photo of a cat", "a red car", "a dog on the house", "the blue tree"] * batch
    prompts, dev = prompts[:batch], base.device
    reward = lambda img, p: img[:, 0].mean(dim=(1, 2))  # noqa: E731  (cheap, differentiable)

    print(f"== per training step: rid vs baseline ({model}, {steps} DDIM steps, batch {batch}, CPU) ==")
    runs, calls = {}, {}
    for method in ("baseline", "rid"):
        m = copy.deepcopy(base)
        group = inject(m.unet)
        group.add_task("bench")
        count = {"unet": 0, "decode": 0}
        m.unet.register_forward_pre_hook(lambda *a, c=count: c.__setitem__("unet", c["unet"] + 1))
        dec = m.vae.decode
        m.vae.decode = lambda *a, c=count, d=dec, **k: (c.__setitem__("decode", c["decode"] + 1), d(*a, **k))[1]
        opt = torch.optim.AdamW(group.parameters(), lr=1e-4)
        cfg = StepConfig(method=method, steps=steps)
        noise = torch.randn(batch, *m.latent_shape, generator=torch.Generator().manual_seed(0)).to(dev)
        runs[method] = lambda m=m, g=group, o=opt, c=cfg, n=noise: train_step(m, g, reward, [(prompts, n)], o, c)
        runs[method]()
        calls[method] = dict(count)
    times = {k: [] for k in runs}
    for _ in range(reps):  # interleaved, so load from other processes hits both alike
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    ms = {k: statistics.median(v) for k, v in times.items()}
    for method in runs:
        print(f"  {method:8s} {ms[method]:9.1f} ms/step   UNet calls {calls[method]['unet']:3d} (CFG-batched)   "
              f"VAE decodes {calls[method]['decode']}")
    print(f"  rid / baseline = {ms['rid'] / ms['baseline']:.3f}   extra per step: "
          f"{calls['rid']['unet'] - calls['baseline']['unet']} UNet call, "
          f"{calls['rid']['decode'] - calls['baseline']['decode']} VAE decode "
          f"(at 50 steps the extra UNet call is ≈ 1/50 of the sampling; a tiny VAE is relatively dear)")

    print("== teacher memory: EMA adapter buffer vs a deep-copied UNet ==")
    m = copy.deepcopy(base)
    group = inject(m.unet)
    group.add_task("bench")
    teacher_unet = copy.deepcopy(m.unet)
    tensors = list(teacher_unet.parameters()) + list(teacher_unet.buffers())
    copy_bytes = sum(t.numel() * t.element_size() for t in tensors)
    ema_bytes = group.ema.numel() * group.ema.element_size()
    print(f"  this model: EMA buffer {ema_bytes / 1e6:.3f} MB vs deepcopy(unet) {copy_bytes / 1e6:.2f} MB "
          f"(ratio {copy_bytes / ema_bytes:.0f}x)")
    sd = _sd15_unet_meta()
    sd_group = inject(sd)
    sd_group.add_task("bench")
    n_unet = sum(p.numel() for p in sd.parameters())
    print(f"  SD-1.5 (rank 4, attention targets, counted on the meta device): EMA buffer "
          f"{sd_group.ema.numel() * 4 / 1e6:.2f} MB fp32 ({sd_group.ema.numel() / 1e6:.3f} M values) vs "
          f"deepcopy(unet) {n_unet * 2 / 1e9:.2f} GB fp16 ({n_unet / 1e6:.0f} M parameters)")

    print("== adapter group op vs T separate LoRA linears (fwd+bwd, x (1024, 320), W (320, 320), r 4) ==")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 320, generator=g, requires_grad=True)
    W, b = torch.randn(320, 320, generator=g) / 18, torch.randn(320, generator=g)
    dy = torch.randn(1024, 320, generator=g)
    for T in (1, 2, 4, 8):
        As = [torch.randn(4, 320, generator=g) / 18 for _ in range(T)]
        Bs = [torch.randn(320, 4, generator=g) / 2 for _ in range(T)]
        for t in (As[-1], Bs[-1]):
            t.requires_grad_(True)
        s = [0.5 + 0.1 * i for i in range(T)]
        entries = ([], [], [])
        if T > 1:  # frozen block: [A_1; …; A_{T−1}], [s_1 B_1 … s_{T−1} B_{T−1}], scale 1
            entries = ([torch.cat(As[:-1])], [torch.cat([si * Bi for si, Bi in zip(s[:-1], Bs[:-1])], 1)], [1.0])

        def group_op():  # rid: (frozen block, current adapter), one op
            A_list, B_list, s_list = entries[0] + [As[-1]], entries[1] + [Bs[-1]], entries[2] + [s[-1]]
            return kernels.lora_group_linear(x, W, b, A_list, B_list, s_list)

        def separate():  # peft-style: one LoRA branch per adapter
            y = F.linear(x, W, b)
            for si, A, B in zip(s, As, Bs):
                y = y + si * F.linear(F.linear(x, A), B)
            return y

        torch.testing.assert_close(group_op(), separate(), rtol=1e-4, atol=1e-4)
        t_group = _median_ms(lambda: group_op().backward(dy), reps * 4)
        t_sep = _median_ms(lambda: separate().backward(dy), reps * 4)
        print(f"  T={T}: group {t_group:7.2f} ms   separate {t_sep:7.2f} ms   separate/group {t_sep / t_group:.2f}x "
              f"(kernel mode {kernels.kernel_mode()})")


def main(argv=None):
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, exit 2, no usage dump
            print(f"rid: {message}", file=sys.stderr)
            sys.exit(2)

    p = Parser(prog="rid.py", description="rid's method module; `bench` prints its cost figures")
    p.add_argument("command", choices=["bench"])
    p.add_argument("--model", default=None, help="diffusers dir or hub id (default: the tests' tiny SD)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps per training step")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (medians printed)")
    a = p.parse_args(argv)
    try:
        bench(a.model, a.steps, a.batch, a.reps)
    except ValueError as e:
        print(f"rid: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
