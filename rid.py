"""RID — Reward Incremental Distillation, and the reward fine-tuning methods it is compared with.

Reading order: the method's settings (`StepConfig`, every knob declared once) → the adapter group
(LoRA tasks on a frozen denoiser, one flat trainable buffer, an EMA teacher that is a second buffer,
not a second UNet) → sampling through the backbone → RID's training step (`rid_loss`, the paper's
Algorithm 1) → the baselines (AlignProp-style last step, DRaFT-K, DRaFT, DRaFT-LV, ReFL) → R0 (a K-step
generator by regularized multi-reward maximization) → `train_step`. The model (prompts → conditioning,
the denoiser call, the sampler from its scheduler config, decode) sits behind one seam, backbones/;
the samplers are written out in samplers.py; adapter groups on disk in checkpoint.py; timings in bench.py.

Shapes use SD-1.5 names: latents z (B, 4, h, w), images (B, 3, H, W) in [0, 1], text (B, L, D). The methods
read the sampler only through samplers.py's interface (timestep, step, x0, add_noise), so they run unchanged
on rectified flows (SD3: z (B, 16, h, w); FLUX: packed z (B, h·w/4, 64)): the last step to σ = 0 is x̂₀,
DRaFT-LV re-noises to (1 − σ)x̂₀ + σε, R0's random η is samplers.Flow's η analogue.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, fields

import torch
from torch import nn

import backbones
import backbones.sd
import rid_kernels
import samplers

ATTN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # AlignProp's LoRA targets, which RID follows
FF_TARGETS = ("ff.net.0.proj", "ff.net.2")  # DRaFT also adapts the transformer feed-forward
METHODS = ("baseline", "rid", "draft-k", "draft", "draft-lv", "refl", "r0")
DISTILL_SPACES = ("pixel", "latent")


############################################################################################
# Settings: every knob declared once (default, help, allowed values); CLIs derive flags from it
############################################################################################

def setting(default, help: str, allowed: str = "", check=None, choices: tuple = (), **meta):
    """A dataclass field that carries its own help text and range: train.py builds its --flag from
    it and `check_settings` is the one range check of its value."""
    return field(default=default, metadata={"help": help, "allowed": allowed, "check": check,
                                            "choices": tuple(choices), **meta})


def int_at_least(lo: int):
    return f"an integer ≥ {lo}", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _finite_at_least(lo: float):
    return f"a finite number ≥ {lo:g}", lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v >= lo


def _eta_range(text: str) -> tuple:
    """'LO,HI' (the CLI's form of eta_range) -> (lo, hi); ValueError when it is not two numbers."""
    parts = str(text).split(",")
    if len(parts) != 2:
        raise ValueError("expected two numbers LO,HI")
    return tuple(float(p) for p in parts)


def check_settings(obj, name=lambda field_name: field_name) -> None:
    """Raise ValueError naming the first setting of `obj` outside its allowed values. `name` turns a
    field name into what the user typed (train.py: --flag-name)."""
    for f in fields(obj):
        value, meta = getattr(obj, f.name), f.metadata
        if meta.get("choices") and value not in meta["choices"]:
            raise ValueError(f"{name(f.name)} {value!r} is not allowed; allowed: {', '.join(meta['choices'])}")
        if meta.get("check") is not None and not meta["check"](value):
            raise ValueError(f"{name(f.name)} {value!r} is not allowed; allowed: {meta['allowed']}")


# The paper gives no EMA momentum. An EMA of momentum α averages the student over ≈ 1/(1−α)
# optimizer steps. At the paper's batch 8 one epoch of the 750 training prompts is ≈ 94 steps, so
# α = 0.99 (horizon 100 steps) makes the teacher ≈ the student of one epoch ago. The teacher starts
# as the previous stage's model (the new adapter's up matrix is zero), so the distillation first
# anchors to what the model could already do and then follows the student with a one-epoch lag —
# short against a task's 10 (aesthetic, ≈ 940 steps) to 120 (hps) epochs. α = 0.999 (≈ 1000 steps)
# would pin the teacher to the old model for the whole aesthetic stage, an L2-to-init penalty that
# fights the reward throughout; α = 0.9 (10 steps) leaves teacher ≈ student and nothing to distil.
DEFAULT_EMA = 0.99

# R0's weight regularization λ_w‖θ − θ₀‖² (no value published). Its gradient 2λ_w(θ − θ₀) meets a reward
# gradient that, normalised per sample, does not grow with the reward's scale; see docs/r0_results.md.
DEFAULT_LAM_W = 1e-2


@dataclass
class StepConfig:
    """One training step of one method. Checked once, when built; the step functions trust it."""
    method: str = setting("rid", "the fine-tuning method", choices=METHODS)
    steps: int = setting(50, "DDIM steps per sample (paper: 50; r0: K, the generator's steps, R0's 4)",
                         "an integer in [1, 1000]",
                          lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1000)
    sampler: str = setting("auto", "the sampler: auto follows the model's scheduler config (LCMScheduler: lcm, "
                           "EulerDiscreteScheduler (SDXL base): euler, FlowMatchEulerDiscreteScheduler (SD3, FLUX): "
                           "flow, else ddim; samplers.py)", choices=("auto",) + samplers.SAMPLERS)
    guidance: float = setting(7.5, "classifier-free guidance scale w; 1 = no unconditional branch (paper: 7.5); "
                              "FLUX-dev: w as its guidance embedding, no unconditional branch (its default 3.5)",
                              *_finite_at_least(0))
    lam: float = setting(0.1, "rid: λ, weight of the distillation term λ·‖x₀ˢ − x₀ᵗ‖² (paper: 0.1)",
                         *_finite_at_least(0))
    ema: float = setting(DEFAULT_EMA, "rid: teacher momentum α, teacher ← α·teacher + (1−α)·student after each "
                         f"step; the teacher averages the last ~1/(1−α) steps ({DEFAULT_EMA}: ~100 steps ≈ one "
                         "epoch of 750 prompts at batch 8, see rid.DEFAULT_EMA)",
                         "a number in [0, 1)", lambda v: isinstance(v, (int, float)) and 0 <= v < 1)
    truncate: int = setting(1, "draft-k: K, the number of final DDIM steps with gradient", *int_at_least(1),
                            metavar="K")
    lv_n: int = setting(2, "draft-lv: n, re-noised copies of x̂₀ (DRaFT: 2)", *int_at_least(1))
    refl_m: int = setting(20, "refl: the reward step is drawn from the last m steps (m at 50 steps, scaled "
                          "with --steps)", *int_at_least(1))
    distill_space: str = setting("pixel", "rid: compare student and teacher as decoded images (the paper) "
                                 "or as final latents", choices=DISTILL_SPACES)
    gradient_checkpointing: bool = setting(False, "recompute the denoiser's and the VAE decoder's "
                                           "activations in the backward pass (memory flat in K for draft-k / "
                                           "draft / r0)", "true or false",
                                           lambda v: isinstance(v, bool))
    eta_range: tuple = setting((0.0, 1.0), "r0: the η of each DDIM step is drawn uniformly from [LO, HI] "
                               "(0,0: deterministic DDIM; R0's random-η regularizer)",
                               "LO,HI with 0 ≤ LO ≤ HI ≤ 1",
                               lambda v: (isinstance(v, tuple) and len(v) == 2 and all(
                                   isinstance(x, (int, float)) and math.isfinite(x) for x in v)
                                   and 0 <= v[0] <= v[1] <= 1), parse=_eta_range, metavar="LO,HI")
    lam_w: float = setting(DEFAULT_LAM_W, "r0: λ_w, weight of the regularizer λ_w·‖θ − θ₀‖² pulling the trainable "
                           "adapters θ towards the task's initial ones θ₀ (rid.DEFAULT_LAM_W)", *_finite_at_least(0))
    raw_grads: bool = setting(False, "r0: use each reward's raw image-gradient instead of normalising it per "
                              "sample (the ablation of R0's Fig. 8)", "true or false", lambda v: isinstance(v, bool))
    r0_plus: bool = setting(False, "r0: R0+, add the rewards of the predicted clean image at a random "
                            "intermediate step, gradient stopped before that step", "true or false",
                            lambda v: isinstance(v, bool))

    def __post_init__(self):
        self.check()

    def check(self, name=lambda field_name: field_name):
        """Every setting in range, and how they combine; `name` as in check_settings."""
        check_settings(self, name)
        if self.truncate > self.steps:
            raise ValueError(f"{name('truncate')} {self.truncate} is not allowed; allowed: K in "
                             f"[1, {name('steps')}={self.steps}]")
        if self.r0_plus and (self.method != "r0" or self.steps < 2):
            raise ValueError(f"{name('r0_plus')} is not allowed with {name('method')} {self.method} and "
                             f"{name('steps')} {self.steps}; allowed: {name('method')} r0 with {name('steps')} ≥ 2 "
                             "(an intermediate step needs one after it)")


############################################################################################
# LoRA adapter group
############################################################################################

class LoRALinear(nn.Module):
    """A frozen nn.Linear and its adapter group: y = xWᵀ + b + Σ_i s_i (x A_iᵀ) B_iᵀ.

    Frozen tasks live pre-concatenated (a concatenation of adapters is itself one adapter), the
    current task is a view into the group's flat buffer, so the op always gets two entries:
        As = [A_frozen (T_f·r, in), A_t (r, in)],  Bs = [B_frozen·s_rep (out, T_f·r), B_t (out, r)].
    The hot path (128 layers per UNet call at SD scale, N UNet calls per sample) does no work that
    does not depend on x: the entries are checked when the adapters change, not per call, and on the
    reference path their concatenation is cached while the buffer it reads is unchanged and no
    gradient is recorded (a sampling loop's N−1 no-grad calls share one).
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
        self._cat_cache = None  # (key, (A_cat, B_cat, s_rep)) under no_grad

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

    def _entries(self, buf):
        """(As, Bs, scales) of the op: the frozen block (scale 1, its scales folded into B_scaled) and
        the current task's views into `buf`."""
        As, Bs, scales = [], [], []
        if self.A_frozen.shape[0]:
            As.append(self.A_frozen), Bs.append(self.B_scaled), scales.append(1.0)
        if buf is not None:
            A_t, B_t = self.current(buf)
            As.append(A_t), Bs.append(B_t), scales.append(self.group.scales[-1])
        return As, Bs, tuple(scales)

    def _concatenated(self, buf):
        """(A_cat (R, in), B_cat (out, R), s_rep (R,) or None when every scale is 1) for the reference
        path, or (None,)*3 without adapters. Cached under no_grad until the buffer changes in place
        (its version counter) or the group's tasks or scales change (group._epoch); built per call
        when a gradient is recorded."""
        key = None
        if not torch.is_grad_enabled():
            key = (self.group._epoch, id(buf), None if buf is None else buf._version)
            if self._cat_cache is not None and self._cat_cache[0] == key:
                return self._cat_cache[1]
        As, Bs, scales = self._entries(buf)
        if not As:
            out = (None, None, None)
        else:
            s_rep = rid_kernels.lora_group.scale_vector(scales, [a.shape[0] for a in As], self.A_frozen.device)
            out = (torch.cat(As), torch.cat(Bs, 1), s_rep)
        if key is not None:
            self._cat_cache = (key, out)
        return out

    def forward(self, x):
        # nn.Module's __getattr__ costs ~0.5 µs per lookup (self.base.weight is two): the dicts directly
        params = self._modules["base"]._parameters
        group = self.group
        buf, w, b = group._active, params["weight"], params["bias"]
        where = (x.is_cuda, w.is_cuda)
        fused = group._kernel.get(where)
        if fused is None:
            fused = group._kernel[where] = rid_kernels.use_triton(x, w)
        if fused:  # the fused kernel concatenates inside its own launch path
            return rid_kernels.lora_group_linear(x, w, b, *self._entries(buf), check=False)
        return rid_kernels.lora_group_cat_reference(x, w, b, *self._concatenated(buf))


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
        self._epoch = 0  # bumped whenever tasks or scales change: the layers' cached concatenations expire
        # (x.is_cuda, weight.is_cuda) -> the fused Triton op or the reference: RID_KERNELS is read once per
        # epoch, not at every call of every layer (an env read is ~0.6 µs, 128 layers × N UNet calls)
        self._kernel: dict = {}

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

    @property
    def trainable(self) -> bool:
        return self._flat is not None

    def parameters(self) -> list:
        return [self.flat]

    # -- tasks -----------------------------------------------------------------------------------
    def add_task(self, name: str, generator: torch.Generator | None = None) -> nn.Parameter:
        """Freeze every existing adapter and append a fresh (A_t, B_t) to every wrapped layer.
        Standard LoRA init: A Kaiming-uniform (a=√5, as nn.Linear and peft), B zero — the model
        output is unchanged. Returns the new flat buffer; build the optimizer on it."""
        if not isinstance(name, str) or not name or name in self.tasks:
            raise ValueError(f"task name {name!r} is not allowed; allowed: a new non-empty string "
                             f"(existing: {self.tasks})")
        flat = self.start_task(name)
        with torch.no_grad():
            for layer in self.layers.values():
                A_t, _ = layer.current(flat)
                nn.init.kaiming_uniform_(A_t, a=math.sqrt(5), generator=generator)
            self._ema.copy_(flat)  # teacher = student at creation
        return flat

    def start_task(self, name: str) -> nn.Parameter:
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

    @torch.no_grad()
    def append_frozen(self, name: str, scale: float, adapters: dict):
        """Append a frozen task: adapters = {layer name: (A (r, in), B (out, r))}."""
        for lname, layer in self.layers.items():
            A, B = adapters[lname]
            layer.A_frozen = torch.cat([layer.A_frozen, A.to(layer.A_frozen.device)])
            layer.B_frozen = torch.cat([layer.B_frozen, B.to(layer.B_frozen.device)], 1)
        self.tasks.append(name)
        self.scales.append(float(scale))
        self._refresh_scales()

    def clear(self):
        """Remove every task (the wrapped layers then compute the base model)."""
        for layer in self.layers.values():
            layer.A_frozen, layer.B_frozen = layer.A_frozen[:0], layer.B_frozen[:, :0]
        self.tasks, self.scales = [], []
        self._flat = self._ema = self._active = None
        self._refresh_scales()

    def set_scale(self, task, value: float):
        """Per-task LoRA scale s_i (DRaFT's scaling / interpolation); task = index or name."""
        i = self.tasks.index(task) if isinstance(task, str) and task in self.tasks else task
        if not isinstance(i, int) or not -len(self.tasks) <= i < len(self.tasks):
            raise ValueError(f"task {task!r} is not allowed; allowed: an index below {len(self.tasks)} "
                             f"or one of {self.tasks}")
        self.scales[i] = float(value)
        self._refresh_scales()

    def task_tensors(self, i: int) -> dict:
        """{layer: (A_i (r, in), B_i (out, r))} for task i, frozen or current."""
        n_frozen = len(self.tasks) - self.trainable
        out = {}
        for name, layer in self.layers.items():
            if i < n_frozen:
                rows = slice(i * self.rank, (i + 1) * self.rank)
                out[name] = (layer.A_frozen[rows], layer.B_frozen[:, rows])
            else:
                out[name] = tuple(t.detach() for t in layer.current(self._flat))
        return out

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
        self._epoch += 1
        self._kernel = {}
        n_frozen = len(self.tasks) - self.trainable
        s_rep = torch.tensor(self.scales[:n_frozen], dtype=torch.float32).repeat_interleave(self.rank)
        for layer in self.layers.values():
            layer.B_scaled = layer.B_frozen * s_rep.to(layer.B_frozen.device)

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
        """teacher ← α·teacher + (1−α)·student, one kernel over the flat buffer (α checked by StepConfig)."""
        rid_kernels.ema_(self.ema, self.flat.detach(), alpha)


def group_of(unet) -> AdapterGroup | None:
    """The adapter group injected into this UNet, if any."""
    for m in unet.modules():
        if isinstance(m, LoRALinear):
            return m.group
    return None


def inject(unet, rank: int = 4, targets=None) -> AdapterGroup:
    """Wrap the target linears of a diffusers denoiser in place; freezes all of it. No tasks yet.
    targets None: the backbone's own (its load sets `rid_lora_targets`: SD3's as diffusers' SD3 LoRA
    script), else AlignProp's ATTN_TARGETS. A target names a module suffix ("to_q", "attn.add_q_proj").
    Move the denoiser to its device first: the adapter buffers are created where the weights are."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank {rank!r} is not allowed; allowed: an integer ≥ 1")
    own = tuple(getattr(unet, "rid_lora_targets", ()))
    targets = (own or ATTN_TARGETS) if targets is None else targets
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    allowed = tuple(dict.fromkeys(ATTN_TARGETS + FF_TARGETS + own))
    bad = [t for t in targets if t not in allowed]
    if bad or not targets:
        raise ValueError(f"targets {targets!r} is not allowed; allowed: a non-empty subset of {allowed}")
    if group_of(unet) is not None:
        raise ValueError("inject: this UNet already has an adapter group (checkpoint.load replaces its contents)")
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
# The model behind one seam (backbones/, chosen from model_index.json); sampling (samplers.py)
############################################################################################

# What other modules and the tests call by these names is the backbone's (backbones/__init__.py lists it all).
Models = backbones.sd.SD  # SD-1.5's backbone; rid.Models(unet, vae, text_encoder, tokenizer) builds one from modules
load_models = backbones.load  # (model, device, dtype, text_encoder_3) -> the backbone its model_index.json names
TEXT_ENCODER_3, TEXT_ENCODER_3_HELP = backbones.TEXT_ENCODER_3, backbones.TEXT_ENCODER_3_HELP  # --text-encoder-3

DDIM = samplers.DDIM  # DDIM(steps) is SD-1.5's; a model's own: models.sampler(steps, kind)
denoise = samplers.denoise  # the sampling loop
sample, _randn = samplers.sample, samplers.randn


decode = samplers.decode  # (models, z, checkpoint=False): latents (B, 4, h, w) → images (B, 3, H, W) in [0, 1]


def score(models, reward_fn, x0: torch.Tensor, prompts: list, images: torch.Tensor | None = None,
          checkpoint: bool = False):
    """R of final latents x0 (B, 4, h, w) → (B,): on the decoded images, or on the latents themselves
    for a latent-space reward (`reward_fn.on_latents`: LaSRO's surrogate of a black box, no decode).
    checkpoint: the decode's activations are recomputed in the backward pass (--gradient-checkpointing)."""
    if getattr(reward_fn, "on_latents", False):
        return reward_fn(x0, prompts)
    return reward_fn(decode(models, x0, checkpoint) if images is None else images, prompts)


############################################################################################
# Training: one loss per method, one optimizer step
############################################################################################

def sq_norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a − b‖² per sample (summed over every element of an image), averaged over the batch: (B, ...) -> ().
    The paper's λ‖x_s − x_t‖² read literally; a per-element mean would divide it by C·H·W and make
    λ = 0.1 negligible next to the reward (README, "Choices the paper leaves open")."""
    return (a - b).pow(2).flatten(1).sum(1).mean()


def rid_loss(models, group, reward_fn, prompts, noise, cfg: StepConfig, generator=None):
    """RID (the paper's Algorithm 1): reward on the student's image minus λ × the distance to the
    EMA teacher's image, both generated from the same z_1. The EMA update follows the optimizer
    step (train_step)."""
    ddim = models.sampler(cfg.steps, cfg.sampler, generator)  # a stochastic sampler's noise: the generator's
    text = models.conditioning(prompts, cfg.guidance)  # (2B, L, D)
    last = [cfg.steps - 1]

    #### SAMPLING: z_N → z_1 with the student, no gradient ####
    with torch.no_grad():
        z1 = denoise(models, text, noise.to(models.device, models.dtype), ddim, range(cfg.steps - 1), cfg.guidance)

    #### LAST STEP, STUDENT: z_1 → x₀ with gradient into the current adapters ####
    x0_s = denoise(models, text, z1, ddim, last, cfg.guidance, cfg.gradient_checkpointing)  # (B, 4, h, w)

    #### LAST STEP, TEACHER: same z_1, EMA adapters, no gradient ####
    with torch.no_grad(), group.teacher():
        x0_t = denoise(models, text, z1, ddim, last, cfg.guidance)

    #### DECODE AND REWARD ####
    gc = cfg.gradient_checkpointing
    img_s = decode(models, x0_s, gc) if cfg.distill_space == "pixel" else None  # (B, 3, H, W) in [0, 1]
    reward = score(models, reward_fn, x0_s, prompts, img_s, gc)  # (B,)

    #### DISTILLATION: ‖student − teacher‖², the squared L2 norm per image, mean over the batch ####
    if cfg.distill_space == "pixel":
        with torch.no_grad():
            img_t = models.decode(x0_t)
        distill = sq_norm(img_s, img_t)
    else:
        distill = sq_norm(x0_s.float(), x0_t.float())

    loss = -reward.mean() + cfg.lam * distill
    return loss, {"loss": loss.item(), "reward": reward.mean().item(), "distill": distill.item()}


def truncated_loss(models, reward_fn, prompts, noise, cfg: StepConfig, generator=None):
    """baseline (K=1, AlignProp), draft-k (K=cfg.truncate), draft (K=all steps), draft-lv (K=1 plus
    n re-noised copies of the final latent, DRaFT's low-variance estimator); loss = −R."""
    K = {"baseline": 1, "draft-k": cfg.truncate, "draft": cfg.steps, "draft-lv": 1}[cfg.method]
    ddim = models.sampler(cfg.steps, cfg.sampler, generator)
    text = models.conditioning(prompts, cfg.guidance)
    with torch.no_grad():  # steps N … K+1
        z = denoise(models, text, noise.to(models.device, models.dtype), ddim, range(cfg.steps - K), cfg.guidance)
    x0 = denoise(models, text, z, ddim, range(cfg.steps - K, cfg.steps), cfg.guidance, cfg.gradient_checkpointing)
    reward = score(models, reward_fn, x0, prompts, checkpoint=cfg.gradient_checkpointing)  # (B,)
    rewards = [reward.mean()]
    if cfg.method == "draft-lv":
        t1 = ddim.timestep(-1)
        for _ in range(cfg.lv_n):  # z_1 = √ᾱ x̂₀ + √(1−ᾱ) ε_i (flow: (1−σ)x̂₀ + σε_i), then the last step again
            z1 = ddim.add_noise(x0.detach(), _randn(x0.shape, x0, generator), t1)
            x0_i = denoise(models, text, z1, ddim, [cfg.steps - 1], cfg.guidance, cfg.gradient_checkpointing)
            rewards.append(score(models, reward_fn, x0_i, prompts, checkpoint=cfg.gradient_checkpointing).mean())
    loss = -torch.stack(rewards).mean()
    return loss, {"loss": loss.item(), "reward": reward.mean().item()}


def refl_loss(models, reward_fn, prompts, noise, cfg: StepConfig, generator=None):
    """ReFL: sample to a random step j ∈ [1, m] from the end (no grad), then one UNet call with
    gradient predicting x̂₀ directly from z_t; loss = −R(decode(x̂₀)). m scales with steps/50.
    --gradient-checkpointing recomputes that call in the backward pass, as every other method's."""
    m = min(cfg.steps, max(1, round(cfg.refl_m * cfg.steps / 50)))
    j = int(torch.randint(1, m + 1, (), generator=generator))
    ddim = models.sampler(cfg.steps, cfg.sampler, generator)
    text = models.conditioning(prompts, cfg.guidance)
    i = cfg.steps - j
    with torch.no_grad():
        z_t = denoise(models, text, noise.to(models.device, models.dtype), ddim, range(i), cfg.guidance)
    t = ddim.timestep(i)
    eps = samplers.predict(models, z_t, t, text, cfg.guidance, cfg.gradient_checkpointing, whole=False)
    reward = score(models, reward_fn, ddim.x0(eps, t, z_t), prompts, checkpoint=cfg.gradient_checkpointing)
    loss = -reward.mean()
    return loss, {"loss": loss.item(), "reward": reward.mean().item(), "t": float(t)}


#### R0: a K-step generator by regularized multi-reward maximization ####

def reward_parts(reward_fn) -> dict:
    """{name: (weight w_i, fn)} of a reward: a joint reward's parts (rewards.joint), else one part of weight 1."""
    return getattr(reward_fn, "parts", None) or {"reward": (1.0, reward_fn)}


def reward_directions(images, prompts, parts: dict, normalize: bool = True):
    """Each reward's gradient with respect to the image, normalised per sample, weighted and summed:
        d_b = Σ_i w_i ĝ_ib,  ĝ_ib = ∇_x R_i(x_b) / ‖∇_x R_i(x_b)‖   (normalize=False: the raw ∇_x R_i(x_b)).
    images (B, 3, H, W) in [0, 1] (detached here) -> ({name: R_i (B,)}, d (B, 3, H, W)). One reward forward
    and backward per part, the same work as backpropagating the summed reward."""
    x = images.detach().requires_grad_(True)
    values, direction = {}, torch.zeros_like(x)
    with torch.enable_grad():
        for name, (w, fn) in parts.items():
            r = fn(x, prompts)  # (B,), sample b depends on x_b only
            (g,) = torch.autograd.grad(r.sum(), x)  # (B, 3, H, W): ∇_x R_i(x_b) per sample
            if normalize:
                g = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (g.dim() - 1))
            direction += w * g
            values[name] = r.detach()
    return values, direction


def r0_reward_loss(images, prompts, parts: dict, normalize: bool = True):
    """-Σ_i w_i mean_b R_i(x_b) in value; its gradient with respect to image x_b is −d_b / B with d from
    reward_directions (the forward value is the plain weighted reward, only the backward is normalised).
    -> (loss (), {name: mean R_i})."""
    values, d = reward_directions(images, prompts, parts, normalize)
    total = sum(w * values[name] for name, (w, _) in parts.items())  # (B,)
    surrogate = -(d * images).flatten(1).sum(1).mean()  # ∂/∂x_b = −d_b / B
    loss = surrogate - surrogate.detach() - total.mean()
    return loss, {name: v.mean().item() for name, v in values.items()}


def r0_loss(models, group, reward_fn, prompts, noise, cfg: StepConfig, generator=None):
    """R0: K = cfg.steps sampler steps from noise with gradient through all of them, each step's η drawn
    from U[eta_range] (η-DDIM; on a rectified flow its analogue, samplers.Flow); loss = −Σ_i w_i R_i(x) with each reward's image-gradient normalised per sample,
    + λ_w‖θ − θ₀‖² on the trainable adapters (θ₀: the task's initial adapters). R0+ (cfg.r0_plus) adds
    the same reward loss on x̂₀ predicted at a random intermediate step j ∈ [1, K−1] from z_j with the
    gradient stopped before it (one more UNet call and decode).
    Draws from `generator`, in this order: the K η's, then j (R0+), then each η > 0 step's noise."""
    K, parts, normalize = cfg.steps, reward_parts(reward_fn), not cfg.raw_grads
    ddim = models.sampler(K, cfg.sampler, generator)
    text = models.conditioning(prompts, cfg.guidance)
    lo, hi = cfg.eta_range
    dev = generator.device if generator is not None else "cpu"
    etas = (lo + (hi - lo) * torch.rand(K, generator=generator, device=dev, dtype=torch.float64)).tolist()
    j = int(torch.randint(1, K, (), generator=generator, device=dev)) if cfg.r0_plus else K

    #### SAMPLING: z_K → z_j → x, gradient through every step ####
    z = noise.to(models.device, models.dtype)
    z_j = denoise(models, text, z, ddim, range(j), cfg.guidance, cfg.gradient_checkpointing, etas[:j], generator)
    z0 = denoise(models, text, z_j, ddim, range(j, K), cfg.guidance, cfg.gradient_checkpointing, etas[j:], generator)

    #### REWARDS: each one's image-gradient normalised per sample, weighted ####
    loss, means = r0_reward_loss(decode(models, z0, cfg.gradient_checkpointing), prompts, parts, normalize)
    logs = {"reward": -loss.item(), **({f"reward_{k}": v for k, v in means.items()} if len(parts) > 1 else {})}

    #### R0+: rewards on x̂₀ at step j, no gradient before it ####
    if cfg.r0_plus:
        z_j, t = z_j.detach(), ddim.timestep(j)
        x0_j = ddim.x0(samplers.predict(models, z_j, t, text, cfg.guidance, cfg.gradient_checkpointing, False), t, z_j)
        inter, _ = r0_reward_loss(decode(models, x0_j, cfg.gradient_checkpointing), prompts, parts, normalize)
        loss = loss + inter
        logs["reward_mid"] = -inter.item()

    #### WEIGHT REGULARIZATION: λ_w‖θ − θ₀‖² ####
    # θ₀ is the group's second buffer: add_task copies the initial adapters there and only RID's EMA
    # update moves it, so it is saved and restored with every checkpoint (resume keeps θ₀).
    reg = (group.flat - group.ema).pow(2).sum()
    loss = loss + cfg.lam_w * reg
    return loss, {"loss": loss.item(), **logs, "weight_reg": reg.item()}


def method_loss(models, group, reward_fn, prompts, noise, cfg: StepConfig, generator=None):
    """(loss, logs) for cfg.method on one micro-batch; gradient reaches only group.flat."""
    if cfg.method == "rid":
        return rid_loss(models, group, reward_fn, prompts, noise, cfg, generator)
    if cfg.method == "refl":
        return refl_loss(models, reward_fn, prompts, noise, cfg, generator)
    if cfg.method == "r0":
        return r0_loss(models, group, reward_fn, prompts, noise, cfg, generator)
    return truncated_loss(models, reward_fn, prompts, noise, cfg, generator)


def train_step(models, group, reward_fn, micro_batches, optimizer, cfg: StepConfig, clip_grad=1.0,
               generator=None) -> dict:
    """One optimizer step over micro-batches [(prompts, noise), …] (one latent per prompt);
    DDP-averaged when torch.distributed is initialised; RID's EMA teacher update after the step."""
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
