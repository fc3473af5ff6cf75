"""Samplers, written out: DDIM / η-DDIM (timestep spacing leading, trailing or linspace), Euler (the
k-diffusion σ form of EulerDiscreteScheduler, SDXL base's own) with its η analogue, LCM's multistep
consistency sampler, and the flow-matching Euler sampler of rectified-flow models (SD3, FLUX) with its η
analogue. Each is built from a model directory's scheduler config — betas, prediction type, timestep
spacing, offset, the last step's ᾱ or σ; the flow's shift — never from constants, and each equals
diffusers' own scheduler on the same inputs step by step (tests/test_samplers.py, tests/test_flow.py):
    DDIM(steps, config)  == DDIMScheduler.from_config(config)  after set_timesteps(steps)
    Euler(steps, config) == EulerDiscreteScheduler.from_config(config) after set_timesteps(steps), on the
                           scaled latent z = x/√(σ²+1) the UNet reads (Euler's docstring)
    LCM(steps, config)   == LCMScheduler.from_config(config)  after set_timesteps(steps)
    Flow(steps, config, mu, sigmas) == FlowMatchEulerDiscreteScheduler.from_config(config) after
                           set_timesteps(steps, mu=mu, sigmas=...) as StableDiffusion3Pipeline / FluxPipeline call it
Which one a model gets (`build`, kind 'auto'): its scheduler config's class — LCMScheduler → lcm,
EulerDiscreteScheduler → euler, FlowMatchEulerDiscreteScheduler → flow, any other (DDIM, PNDM, Euler
ancestral, …) → ddim, the DDIM that `DDIMScheduler.from_config` would make of it (its keys, DDIMScheduler's
defaults for the rest). An explicit kind (`--sampler ddim`) overrides it.

The interface the methods use (rid.py): `timesteps` (steps,) first = noisiest; `timestep(i)` the
i-th as the denoiser takes it (DDIM/LCM: int; Euler: float; flow: float σ·1000); `x0(pred, t, z)` the clean
estimate from the model's output at timestep t; `step(pred, t, z, eta, noise)` z_t → z_prev;
`needs_noise(t, eta)` whether that step takes fresh noise (drawn by the caller from its seeded
generator); `add_noise(x0, eps, t)` the forward process q(z_t | x0) (flow: (1−σ)x0 + σε).
Shapes: latents z (B, C, h, w) (FLUX: packed (B, h·w/4, 4C)); pred as z.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.utils.checkpoint
from torch._subclasses.fake_tensor import unset_fake_temporarily

SAMPLERS = ("ddim", "euler", "lcm", "flow")

# DDIMScheduler's own defaults: what a key missing from the directory's config means.
DDIM_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True,
    "steps_offset": 0, "prediction_type": "epsilon", "thresholding": False, "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}
# LCMScheduler's: the same keys, its own values where they differ, and the consistency parametrisation.
LCM_DEFAULTS = {**DDIM_DEFAULTS, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "clip_sample": False, "original_inference_steps": 50, "timestep_scaling": 10.0}
# EulerDiscreteScheduler's (SDXL base ships it): its own defaults, which differ from DDIM's (linspace spacing).
EULER_CLASS = "EulerDiscreteScheduler"
EULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "prediction_type": "epsilon", "interpolation_type": "linear", "use_karras_sigmas": False,
    "use_exponential_sigmas": False, "use_beta_sigmas": False, "sigma_min": None, "sigma_max": None,
    "timestep_spacing": "linspace", "timestep_type": "discrete", "steps_offset": 0, "rescale_betas_zero_snr": False,
    "final_sigmas_type": "zero",
}
# SD-1.5's shipped scheduler_config.json (what rid.DDIM(steps) means without a config).
SD15_SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                  "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                  "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
                  "timestep_spacing": "leading"}
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")


def default_kind(config: dict) -> str:
    """The sampler a scheduler config asks for: lcm for LCMScheduler, euler for EulerDiscreteScheduler (SDXL
    base), flow for FlowMatchEulerDiscreteScheduler, ddim for everything else (DDIM, PNDM, Euler ancestral, …)."""
    return {"LCMScheduler": "lcm", EULER_CLASS: "euler", FLOW_CLASS: "flow"}.get(config.get("_class_name"), "ddim")


def build(config: dict, steps: int, kind: str = "auto", generator: torch.Generator | None = None, **flow):
    """The sampler `kind` ('auto': the config's own, see default_kind) with `steps` steps; `generator`:
    where its fresh noise comes from when denoise is given none (seeded per step in training, so a
    stochastic sampler such as LCM resumes bit for bit); `flow`: Flow's mu and pipeline_sigmas. A
    rectified-flow model samples only with flow, an ε/v model never with it."""
    if kind not in ("auto",) + SAMPLERS:
        raise ValueError(f"sampler {kind!r} is not allowed; allowed: auto (the model's scheduler config), "
                         f"{', '.join(SAMPLERS)}")
    own = default_kind(config)
    kind = own if kind == "auto" else kind
    if (kind == "flow") != (own == "flow"):
        allowed = "auto, flow" if own == "flow" else "auto, ddim, euler, lcm"
        raise ValueError(f"sampler {kind!r} is not allowed for a {config.get('_class_name')} model; allowed: {allowed}")
    sampler = Flow(steps, config, **flow) if kind == "flow" else \
        {"ddim": DDIM, "euler": Euler, "lcm": LCM}[kind](steps, config)
    sampler.generator = generator
    return sampler


#### THE LOOP: a sampler through a backbone ####

def randn(shape, like: torch.Tensor, generator):
    """Fresh noise of `like`'s dtype and device, drawn on the generator's device (resume is bit-exact)."""
    dev = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=dev).to(like)


def switchable(module) -> bool:
    """Whether `module` has diffusers' own gradient-checkpointing switch (its ModelMixin models do)."""
    return bool(getattr(module, "_supports_gradient_checkpointing", False))


@contextlib.contextmanager
def blockwise(module):
    """diffusers' own gradient checkpointing of `module` (a UNet's resnets and attention blocks, a transformer's
    blocks, a VAE decoder's mid and up blocks: each keeps only its inputs and is recomputed in the backward
    pass), switched on for the calls inside only; a module without diffusers' switch, or with it already on,
    is left as it is."""
    if not switchable(module) or module.is_gradient_checkpointing:
        yield
        return
    module.enable_gradient_checkpointing()
    try:
        yield
    finally:
        module.disable_gradient_checkpointing()


def _blockwise_call(module, fn, *args):
    """fn(*args) with `module`'s own block checkpointing on (blockwise)."""
    with blockwise(module):
        return fn(*args)


def predict(models, z, t, text, guidance, checkpoint=False, whole=True):
    """The backbone's prediction at (z, t). checkpoint (with grad): the denoiser's own blocks keep only their
    inputs and are recomputed one at a time in the backward pass (diffusers' switch, on for this call only), so
    the backward pass holds one block's activations, not the network's. whole: besides, the call keeps only its
    own inputs until the backward pass (memory flat in the number of calls with gradient, at one more forward
    per call); denoise uses it when it runs several steps with gradient. A denoiser without diffusers' switch
    is checkpointed whole."""
    if not (checkpoint and torch.is_grad_enabled()):
        return models.predict(z, t, text, guidance)
    if whole or not switchable(models.denoiser):
        return torch.utils.checkpoint.checkpoint(_blockwise_call, models.denoiser, models.predict, z, t, text, guidance,
                                                 use_reentrant=False)
    return _blockwise_call(models.denoiser, models.predict, z, t, text, guidance)


def decode(models, z, checkpoint=False):
    """The backbone's latents → images in [0, 1]; checkpoint (with grad): the VAE decoder keeps only the input
    of its mid block and of each up block and recomputes their activations in the backward pass (diffusers'
    own gradient checkpointing of AutoencoderKL, switched on for this call only). At 1024² a decode with
    gradient otherwise holds ~23 GiB of fp32 activations per image (docs/backbone_memory.md): the largest
    part of draft-lv's step on every backbone after the denoiser's calls are checkpointed."""
    if not (checkpoint and torch.is_grad_enabled()):
        return models.decode(z)
    if not switchable(models.vae):
        return torch.utils.checkpoint.checkpoint(models.decode, z, use_reentrant=False)
    return _blockwise_call(models.vae, models.decode, z)


def denoise(models, text, z, sampler, indices, guidance, checkpoint=False, etas=None, generator=None):
    """Run the sampler's steps at sampler.timesteps[indices] with the backbone's denoiser (`models`:
    backbones/) on its conditioning `text`; the caller picks grad / no_grad. etas: one η per index (None:
    all 0); a step that takes fresh noise (η > 0; LCM: all but the last) draws it from `generator`, in
    step order (None: the sampler's own). checkpoint: recompute each step's activations in the backward pass
    (predict: block by block; with several steps each call also keeps only its inputs)."""
    generator = sampler.generator if generator is None else generator
    whole = len(indices) > 1  # kept until the backward pass: one step's block inputs, or each of several steps' inputs
    for n, i in enumerate(indices):
        t = sampler.timestep(i)
        eps = predict(models, z, t, text, guidance, checkpoint, whole)
        eta = 0.0 if etas is None else etas[n]
        z = sampler.step(eps, t, z, eta, randn(z.shape, z, generator) if sampler.needs_noise(t, eta) else None)
    return z


@torch.no_grad()
def sample(models, prompts, noise, steps=50, guidance=7.5, group=None, teacher=False, sampler="auto",
           generator=None) -> torch.Tensor:
    """The model's sampler (`sampler`: samplers.build's kind) from `noise` (B, *latent_shape) → images
    (B, 3, H, W) in [0, 1]. Uses whatever adapters are injected in models.denoiser; teacher=True samples
    with group's EMA teacher; `generator`: the fresh noise of a stochastic sampler (LCM)."""
    if teacher and group is None:
        raise ValueError("sample(teacher=True) needs group: the AdapterGroup whose EMA teacher should sample")
    chosen = models.sampler(steps, sampler)
    text = models.conditioning(prompts, guidance)
    with group.teacher() if teacher else contextlib.nullcontext():
        z = denoise(models, text, noise.to(models.device, models.dtype), chosen, range(steps), guidance,
                    generator=generator)
    return models.decode(z)


#### THE SAMPLERS ####

def _betas(c: dict) -> torch.Tensor:
    """β_1..β_T (T,) float32, as diffusers' DDIMScheduler/LCMScheduler make them."""
    T = c["num_train_timesteps"]
    if c["trained_betas"] is not None:
        return torch.tensor(c["trained_betas"], dtype=torch.float32)
    if c["beta_schedule"] == "linear":
        return torch.linspace(c["beta_start"], c["beta_end"], T, dtype=torch.float32)
    if c["beta_schedule"] == "scaled_linear":  # linear in √β (SD's)
        return torch.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, T, dtype=torch.float32) ** 2
    if c["beta_schedule"] == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine ᾱ(t), β capped at 0.999
        abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=torch.float32)
    raise ValueError(f"scheduler beta_schedule {c['beta_schedule']!r} is not allowed; allowed: linear, "
                     "scaled_linear, squaredcos_cap_v2, or trained_betas")


class DDIM:
    """DDIM (η = 0 unless a step is given one) from a scheduler config. SD-1.5's (the default):
    scaled-linear betas √0.00085 → √0.012 over 1000 steps, spacing "leading", steps_offset 1 (→ 981,
    961, …, 1 at 50 steps), set_alpha_to_one False (the last step's ᾱ_prev = ᾱ_0), ε-prediction.
    SDXL-Turbo's: spacing "trailing" (→ 999 at 1 step; 999, 749, 499, 249 at 4). float32, as diffusers."""

    defaults = DDIM_DEFAULTS

    def __init__(self, steps: int = 50, config: dict | None = None):
        c = {**self.defaults, **{k: v for k, v in (config or SD15_SCHEDULER).items() if k in self.defaults}}
        T = c["num_train_timesteps"]
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
            raise ValueError(f"steps {steps!r} is not allowed; allowed: an integer in [1, {T}]")
        for key, allowed in (("prediction_type", PREDICTIONS), ("timestep_spacing", SPACINGS)):
            if c[key] not in allowed:
                raise ValueError(f"scheduler {key} {c[key]!r} is not allowed; allowed: {', '.join(allowed)}")
        for key in ("thresholding", "rescale_betas_zero_snr"):
            if c[key]:
                raise ValueError(f"scheduler {key} {c[key]!r} is not allowed; allowed: false (not implemented)")
        self.config, self.prediction_type = c, c["prediction_type"]
        self.generator = None  # fresh noise's source when denoise is given none (build sets it)
        self.clip = c["clip_sample_range"] if c["clip_sample"] else None
        self.alphas_cumprod = torch.cumprod(1.0 - _betas(c), dim=0)  # ᾱ_t (T,)
        self.final_alpha = torch.tensor(1.0) if c["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.ratio = T // steps  # diffusers' prev_timestep = t − T // steps, whatever the spacing
        self.timesteps = self._timesteps(steps, c)  # (steps,) int64, noisiest first

    @staticmethod
    def _timesteps(steps: int, c: dict) -> torch.Tensor:
        T = c["num_train_timesteps"]
        if c["timestep_spacing"] == "leading":  # 0, r, 2r, … reversed, + offset
            return torch.arange(steps - 1, -1, -1, dtype=torch.int64) * (T // steps) + c["steps_offset"]
        if c["timestep_spacing"] == "trailing":  # T, T − T/n, … rounded, − 1: starts at the last timestep
            return torch.from_numpy(np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1)
        return torch.from_numpy(np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64).copy())  # linspace

    def timestep(self, i: int) -> int:
        """The i-th timestep (negative: from the end) as the denoiser takes it."""
        return int(self.timesteps[i])

    def alpha(self, t: int) -> torch.Tensor:
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha  # ᾱ_prev of the last step

    def x0(self, pred: torch.Tensor, t: int, z: torch.Tensor) -> torch.Tensor:
        """x̂₀ from the model's output: ε → (z_t − √(1−ᾱ_t) ε)/√ᾱ_t; v → √ᾱ_t z_t − √(1−ᾱ_t) v; x₀ itself."""
        a_t = self.alpha(t)
        if self.prediction_type == "epsilon":
            x0 = (z - (1 - a_t) ** 0.5 * pred) / a_t ** 0.5
        elif self.prediction_type == "v_prediction":
            x0 = a_t ** 0.5 * z - (1 - a_t) ** 0.5 * pred
        else:
            x0 = pred
        return x0 if self.clip is None else x0.clamp(-self.clip, self.clip)

    def eps(self, pred: torch.Tensor, t: int, z: torch.Tensor) -> torch.Tensor:
        """ε̂ from the model's output, never from a clipped x̂₀ (as diffusers)."""
        if self.prediction_type == "epsilon":
            return pred
        a_t = self.alpha(t)
        if self.prediction_type == "v_prediction":
            return a_t ** 0.5 * pred + (1 - a_t) ** 0.5 * z
        return (z - a_t ** 0.5 * pred) / (1 - a_t) ** 0.5

    def needs_noise(self, t: int, eta: float) -> bool:
        return eta > 0

    def step(self, pred: torch.Tensor, t: int, z: torch.Tensor, eta: float = 0.0,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        """z_t → z_{t−ratio} = √ᾱ_prev x̂₀ + √(1−ᾱ_prev−σ²) ε + σ·noise,
        σ = η·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_prev) (DDIM's Eq. 16; diffusers' DDIMScheduler.step with
        eta and variance_noise). η = 0: no fresh noise, and exactly the formula it always was."""
        a_prev = self.alpha(t - self.ratio)
        x0 = self.x0(pred, t, z)
        eps = self.eps(pred, t, z)
        if eta == 0:
            return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        a_t = self.alpha(t)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        return a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps + sigma * noise

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        a_t = self.alpha(t)
        return a_t ** 0.5 * x0 + (1 - a_t) ** 0.5 * eps


class LCM(DDIM):
    """LCM's multistep consistency sampler (LCMScheduler; LCM-SSD-1B, LCM-LoRA). Timesteps: every
    (T / original_inference_steps)-th training step ending at k − 1, `steps` of them evenly by index
    (4 of 50 → 999, 759, 499, 259). A step: the consistency function
        f(z_t) = c_out(t)·x̂₀ + c_skip(t)·z_t,  c_skip = σ_d²/((s t)² + σ_d²),  c_out = s t/√((s t)² + σ_d²)
    (σ_d = 0.5, s = timestep_scaling), then re-noised to the next timestep with fresh noise:
    z_next = √ᾱ_next f + √(1−ᾱ_next) noise; the last step returns f. η plays no part."""

    defaults = LCM_DEFAULTS

    @staticmethod
    def _timesteps(steps: int, c: dict) -> torch.Tensor:
        original = c["original_inference_steps"]
        if steps > original:
            raise ValueError(f"steps {steps} is not allowed with the LCM sampler; allowed: an integer in "
                             f"[1, {original}] (the scheduler's original_inference_steps)")
        k = c["num_train_timesteps"] // original
        origin = torch.arange(original, 0, -1, dtype=torch.int64) * k - 1  # (original,) noisiest first
        return origin[torch.from_numpy(np.floor(np.linspace(0, original, num=steps, endpoint=False)).astype(np.int64))]

    def _next(self, t: int) -> int | None:
        """The timestep after t in the schedule; None after the last."""
        i = self.timesteps.tolist().index(t)
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else None

    def x0(self, pred: torch.Tensor, t: int, z: torch.Tensor) -> torch.Tensor:
        """The consistency function's output f(z_t): what the sampler returns as the clean image."""
        st = torch.tensor(t) * self.config["timestep_scaling"]
        c_skip, c_out = 0.25 / (st ** 2 + 0.25), st / (st ** 2 + 0.25) ** 0.5
        return c_out * super().x0(pred, t, z) + c_skip * z

    def needs_noise(self, t: int, eta: float) -> bool:
        return self._next(t) is not None

    def step(self, pred: torch.Tensor, t: int, z: torch.Tensor, eta: float = 0.0,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        denoised = self.x0(pred, t, z)
        t_next = self._next(t)
        if t_next is None:
            return denoised
        a_next = self.alpha(t_next)
        return a_next.sqrt() * denoised + (1 - a_next).sqrt() * noise


#### EULER (EulerDiscreteScheduler, SDXL base's own): k-diffusion's σ form ####

def _sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    """The (fractional) training timestep of σ: linear interpolation in log σ (diffusers' _sigma_to_t)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigma))


class Euler:
    """Euler on the probability-flow ODE in k-diffusion's variables (Karras et al. 2022): x = x₀ + σε with
    σ_t = √((1 − ᾱ_t)/ᾱ_t), the UNet reading the scaled x/√(σ² + 1) (diffusers' scale_model_input). rid's
    state z IS that scaled latent, z = √ᾱ x₀ + √(1 − ᾱ) ε (what DDIM's z is too), so the methods call the
    denoiser on z unchanged; a step converts to x, takes diffusers' step and converts back:
        x = √(σ² + 1)·z,  x̂₀ = x − σε̂ (v: √ᾱ z − √(1−ᾱ) v; x₀: the output),  d = (x − x̂₀)/σ,
        x' = x + (σ' − σ)d,  z' = x'/√(σ'² + 1)   (the last step returns x', the latent the pipeline decodes).
    Schedule, from the config as EulerDiscreteScheduler.set_timesteps: timesteps by `timestep_spacing`
    (leading + steps_offset: SDXL's 50 steps → 981, 961, …, 1; trailing; linspace), σ interpolated at them
    (`interpolation_type` linear in t, or log_linear), or Karras / exponential σ's with their timesteps
    read back (`use_karras_sigmas`, `use_exponential_sigmas`); a final σ of 0, or the training σ_min
    (`final_sigmas_type`).
    Start: z = the unit noise at the first timestep, i.e. x = √(σ_max² + 1)·noise, diffusers' init_noise_sigma
    for leading spacing (SDXL base). For trailing and linspace diffusers starts at x = σ_max·noise instead
    (k-diffusion's habit): 0.23 % less at SDXL's σ_max = 14.6; pass its pipeline latents × init_scale to match.
    η analogue (R0's random η): DDIM's η posterior in these coordinates, i.e. k-diffusion's ancestral step
        σ↑ = min(σ', η·σ'√(σ² − σ'²)/σ),  σ↓ = √(σ'² − σ↑²),  x' = x + (σ↓ − σ)d + σ↑·noise;
    η = 0: the Euler step (computed as such, diffusers' to float rounding); η = 1: EulerAncestralDiscreteScheduler's."""

    defaults = EULER_DEFAULTS

    def __init__(self, steps: int = 50, config: dict | None = None):
        c = {**self.defaults, **{k: v for k, v in (config or SD15_SCHEDULER).items() if k in self.defaults}}
        T = c["num_train_timesteps"]
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
            raise ValueError(f"steps {steps!r} is not allowed; allowed: an integer in [1, {T}]")
        for key, allowed in (("prediction_type", PREDICTIONS), ("timestep_spacing", SPACINGS),
                             ("interpolation_type", ("linear", "log_linear")),
                             ("final_sigmas_type", ("zero", "sigma_min")),
                             ("timestep_type", ("discrete",))):
            if c[key] not in allowed:
                raise ValueError(f"scheduler {key} {c[key]!r} is not allowed; allowed: {', '.join(allowed)}")
        for key in ("use_beta_sigmas", "rescale_betas_zero_snr"):
            if c[key]:
                raise ValueError(f"scheduler {key} {c[key]!r} is not allowed; allowed: false (not implemented)")
        if c["use_karras_sigmas"] and c["use_exponential_sigmas"]:
            raise ValueError("scheduler use_karras_sigmas and use_exponential_sigmas are both true; allowed: one")
        self.config, self.prediction_type, self.generator = c, c["prediction_type"], None
        with unset_fake_temporarily():  # a schedule of real numbers, also when built in memplan's fake mode
            self.alphas_cumprod = torch.cumprod(1.0 - _betas(c), dim=0)  # ᾱ_t (T,)
            timesteps, sigmas = self._schedule(steps, c, self.alphas_cumprod)
        self.timesteps = torch.from_numpy(timesteps)  # (steps,) float32, noisiest first
        self.sigmas = torch.from_numpy(sigmas)  # (steps + 1,) float32 (log_linear: steps + 2, as diffusers)
        self._sigma = sigmas.tolist()  # the same as Python floats: no tensor read on the hot path
        self._index = {float(t): i for i, t in enumerate(timesteps)}

    @staticmethod
    def _schedule(steps: int, c: dict, alphas_cumprod: torch.Tensor) -> tuple:
        """(timesteps (steps,), σ's (steps + 1,)) float32 numpy, as EulerDiscreteScheduler.set_timesteps."""
        T = c["num_train_timesteps"]
        if c["timestep_spacing"] == "linspace":
            timesteps = np.linspace(0, T - 1, steps, dtype=np.float32)[::-1].copy()
        elif c["timestep_spacing"] == "leading":  # 0, r, 2r, … reversed, + offset
            timesteps = (np.arange(0, steps) * (T // steps)).round()[::-1].copy().astype(np.float32) + c["steps_offset"]
        else:  # trailing: T, T − T/n, … rounded, − 1
            timesteps = np.arange(T, 0, -T / steps).round().copy().astype(np.float32) - 1
        train = np.array(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)  # σ_t (T,) float32, t ascending
        log_train = np.log(train)
        if c["interpolation_type"] == "linear":
            sigmas = np.interp(timesteps, np.arange(0, T), train)
        else:  # log_linear: steps + 1 σ's from σ_max to σ_min, the timesteps kept (diffusers' own quirk)
            sigmas = torch.linspace(np.log(train[-1]), np.log(train[0]), steps + 1).exp().numpy()
        if c["use_karras_sigmas"] or c["use_exponential_sigmas"]:
            lo = c["sigma_min"] if c["sigma_min"] is not None else sigmas[-1].item()
            hi = c["sigma_max"] if c["sigma_max"] is not None else sigmas[0].item()
            if c["use_karras_sigmas"]:  # ρ = 7, Karras et al.'s
                ramp = np.linspace(0, 1, steps)
                sigmas = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
            else:
                sigmas = np.exp(np.linspace(math.log(hi), math.log(lo), steps))
            timesteps = np.array([_sigma_to_t(s, log_train) for s in sigmas])
        last = 0.0 if c["final_sigmas_type"] == "zero" else float(train[0])  # sigma_min: the training σ_0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        return timesteps.astype(np.float32), sigmas

    @property
    def init_noise_sigma(self) -> float:
        """diffusers' initial x = noise × this: √(σ_max² + 1) for leading spacing, σ_max for trailing/linspace."""
        top = max(self._sigma)
        return top if self.config["timestep_spacing"] in ("linspace", "trailing") else (top ** 2 + 1) ** 0.5

    @property
    def init_scale(self) -> float:
        """rid's start z = noise is diffusers' x = noise × √(σ₀² + 1): its latents = noise × this (1 for leading)."""
        return (self._sigma[0] ** 2 + 1) ** 0.5 / self.init_noise_sigma

    def timestep(self, i: int) -> float:
        """The i-th timestep (negative: from the end) as the denoiser takes it."""
        return float(self.timesteps[i])

    def sigma(self, t: float) -> torch.Tensor:
        """σ of timestep t (one of `timesteps`), the float32 scalar the scheduler holds."""
        return self.sigmas[self._index[float(t)]]

    def _x0(self, pred: torch.Tensor, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x̂₀ from the model's output and the unscaled x, as EulerDiscreteScheduler.step computes it."""
        if self.prediction_type == "epsilon":
            return x - sigma * pred
        if self.prediction_type == "v_prediction":
            return pred * (-sigma / (sigma ** 2 + 1) ** 0.5) + (x / (sigma ** 2 + 1))
        return pred

    def x0(self, pred: torch.Tensor, t: float, z: torch.Tensor) -> torch.Tensor:
        """x̂₀ from the model's output at timestep t on the scaled latent z (ε: (z − √(1−ᾱ)ε̂)/√ᾱ, as DDIM's)."""
        sigma = self.sigma(t)
        return self._x0(pred, sigma, z.to(torch.float32) * (sigma ** 2 + 1) ** 0.5).to(pred.dtype)

    def needs_noise(self, t: float, eta: float) -> bool:
        return eta > 0 and self._sigma[self._index[float(t)] + 1] > 0

    def step(self, pred: torch.Tensor, t: float, z: torch.Tensor, eta: float = 0.0,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        """z at σ → z at σ' (σ' the next σ): Euler at η = 0, else the ancestral η step of the class docstring.
        In float32 as diffusers, cast back to the prediction's dtype; the last step returns the unscaled x'."""
        i = self._index[float(t)]
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = z.to(torch.float32) * (sigma ** 2 + 1) ** 0.5  # diffusers' sample (B, C, h, w)
        d = (x - self._x0(pred, sigma, x)) / sigma  # the ODE's derivative dx/dσ = ε̂
        if eta == 0:
            x_next = x + d * (sigma_next - sigma)
        else:
            up = eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5  # σ↑
            up = torch.clamp(up, max=sigma_next)
            down = (sigma_next ** 2 - up ** 2) ** 0.5
            x_next = x + d * (down - sigma)
            if self.needs_noise(t, eta):
                x_next = x_next + noise * up
        if i + 1 < len(self.timesteps):  # scaled for the next denoiser call
            x_next = x_next / (sigma_next ** 2 + 1) ** 0.5
        return x_next.to(pred.dtype)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: float) -> torch.Tensor:
        """z_t = (x₀ + σε)/√(σ² + 1) = √ᾱ x₀ + √(1−ᾱ) ε: a clean estimate back onto the chain (DRaFT-LV)."""
        sigma = self.sigma(t)
        return (x0 + sigma * eps) / (sigma ** 2 + 1) ** 0.5


#### RECTIFIED FLOWS: FLOW-MATCHING EULER AND ITS η ANALOGUE (SD3, FLUX) ####

FLOW_CLASS = "FlowMatchEulerDiscreteScheduler"
# FlowMatchEulerDiscreteScheduler's own defaults (what a key missing from the directory's config means).
FLOW_DEFAULTS = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5,
                 "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096, "invert_sigmas": False,
                 "shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                 "use_beta_sigmas": False, "time_shift_type": "exponential", "stochastic_sampling": False}


def flow_mu(config: dict, image_seq_len: int, max_shift: float = 1.15) -> float:
    """The dynamic shift μ for `image_seq_len` image tokens: linear from base_shift at base_image_seq_len
    to max_shift at max_image_seq_len (diffusers' calculate_shift; `max_shift`: the pipeline's default
    when the config has none: FLUX 1.15, SD3 1.16)."""
    c = {**FLOW_DEFAULTS, "max_shift": max_shift, **{k: v for k, v in config.items() if v is not None}}
    m = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
    return image_seq_len * m + (c["base_shift"] - m * c["base_image_seq_len"])


class Flow:
    """Flow-matching Euler for rectified flows x_σ = (1 − σ)x₀ + σε, the model predicting v = ε − x₀
    (SD3, SD3.5, FLUX.1). σ schedule, from the config:
      SD3 (pipeline_sigmas False): the scheduler's own, linspace(σ_max·T, σ_min·T, n)/T over its shifted
          training range, then shifted: σ ← sσ/(1 + (s−1)σ) (static shift s, SD3: 3.0);
      FLUX (pipeline_sigmas True): linspace(1, 1/n, n) as FluxPipeline passes them, then the dynamic shift
          σ ← e^μ/(e^μ + (1/σ − 1)) with μ from the image token count (flow_mu);
    a final σ = 0 appended; timesteps = σ·T (T = 1000): what the denoiser takes.
    Step: x_next = x + (σ_next − σ)·v; x̂₀ = x − σv (the last step, to σ = 0, returns x̂₀).

    η analogue (DDIM's η for rectified flows). Write the flow as x_σ = a x₀ + s ε with a = 1 − σ, s = σ.
    DDIM's non-Markovian posterior for any such (a, s) is
        x_next = a' x̂₀ + √(s'² − c²) ε̂ + c·noise,   ε̂ = (x − a x̂₀)/s = x + (1 − σ)v,
    and it keeps every marginal x_σ' = a' x₀ + s' ε for any c ∈ [0, s']. DDIM's η scales c against the
    Markov (DDPM) posterior, whose forward kernel x_σ = (a/a')x_σ' + N(0, s² − (a s'/a')²) gives, by
    Gaussian conditioning, Var(x_σ' | x_σ, x₀) = s'²(s² − (a s'/a')²)/s². Hence
        c(η) = η · (σ'/σ) · √(σ² − ((1 − σ)σ'/(1 − σ'))²)
    (for a² + s² = 1 this is DDIM's Eq. 16: η√((1−ᾱ')/(1−ᾱ))√(1 − ᾱ/ᾱ')). η = 0: c = 0 and
    a'x̂₀ + s'ε̂ = (1−σ')(x − σv) + σ'(x + (1−σ)v) = x + (σ' − σ)v, the Euler step (computed as such here,
    bit for bit diffusers'); η = 1: the DDPM posterior; σ' = 0 (the last step): c = 0, x̂₀."""

    def __init__(self, steps: int = 28, config: dict | None = None, mu: float | None = None,
                 pipeline_sigmas: bool = False):
        c = {**FLOW_DEFAULTS, **{k: v for k, v in (config or {}).items() if k in FLOW_DEFAULTS}}
        T = c["num_train_timesteps"]
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
            raise ValueError(f"steps {steps!r} is not allowed; allowed: an integer in [1, {T}]")
        for key in ("invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                    "use_beta_sigmas", "stochastic_sampling"):
            if c[key]:
                raise ValueError(f"scheduler {key} {c[key]!r} is not allowed; allowed: false (not implemented)")
        if c["use_dynamic_shifting"] and mu is None:
            raise ValueError("scheduler use_dynamic_shifting needs mu (samplers.flow_mu of the image token count)")
        self.config, self.generator = c, None
        shift = c["shift"]
        if pipeline_sigmas:  # FluxPipeline: sigmas given, in float32
            sigmas = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
        else:  # StableDiffusion3Pipeline: the scheduler's own range, itself the shifted training σ's
            train = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()) / T  # (T,) float32
            if not c["use_dynamic_shifting"]:
                train = shift * train / (1 + (shift - 1) * train)
            sigmas = np.linspace(train[0].item() * T, train[-1].item() * T, steps) / T  # float64, as diffusers
        if c["use_dynamic_shifting"]:
            if c["time_shift_type"] == "exponential":
                sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
            else:
                sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
        else:
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        sigmas = torch.from_numpy(np.asarray(sigmas)).to(torch.float32)
        self.timesteps = sigmas * T  # (steps,) float32, noisiest first
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])  # (steps + 1,), σ = 0 last
        self._index = {float(t): i for i, t in enumerate(self.timesteps)}

    def timestep(self, i: int) -> float:
        """The i-th timestep σ_i·T (negative: from the end) as the denoiser takes it."""
        return float(self.timesteps[i])

    def sigma(self, t: float) -> torch.Tensor:
        """σ of timestep t (one of `timesteps`), the float32 scalar the scheduler holds."""
        return self.sigmas[self._index[float(t)]]

    def x0(self, pred: torch.Tensor, t: float, z: torch.Tensor) -> torch.Tensor:
        """x̂₀ = x − σv."""
        return z - self.sigma(t) * pred

    def needs_noise(self, t: float, eta: float) -> bool:
        return eta > 0 and float(self.sigmas[self._index[float(t)] + 1]) > 0

    def step(self, pred: torch.Tensor, t: float, z: torch.Tensor, eta: float = 0.0,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_σ → x_σ' (σ' the next σ): Euler at η = 0, else the η posterior of the class docstring."""
        i = self._index[float(t)]
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        if eta == 0:  # diffusers: in float32, cast back to the prediction's dtype
            return (z.to(torch.float32) + (sigma_next - sigma) * pred).to(pred.dtype)
        s, s_next = float(sigma), float(sigma_next)
        c = eta * s_next / s * max(s ** 2 - ((1 - s) * s_next / (1 - s_next)) ** 2, 0.0) ** 0.5
        x0, eps = z - sigma * pred, z + (1 - sigma) * pred
        out = (1 - s_next) * x0 + (s_next ** 2 - c ** 2) ** 0.5 * eps
        return out + c * noise if c > 0 else out

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: float) -> torch.Tensor:
        """x_σ = (1 − σ)x₀ + σε: a clean estimate back onto the flow at timestep t (DRaFT-LV's re-noising)."""
        sigma = self.sigma(t)
        return (1 - sigma) * x0 + sigma * eps
