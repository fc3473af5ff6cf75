"""The memory of one training step, counted without running it on the device: train.py's
--micro-batch auto (the largest micro-batch that fits the free memory) and the model behind
docs/sd15_memory.md and docs/backbone_memory.md (experiments/memory.py writes them from these pieces).
Any backbone: SD, SDXL, SD3 / SD3.5, FLUX.

How: the loaded model's architecture is rebuilt from its configs as *fake* tensors (torch's
FakeTensorMode: shapes, dtypes and devices, no storage; `fake_copy`) and rid.train_step, the real code,
runs one optimizer step on it. A dispatch mode (`PeakMemory`) sees every tensor each op returns and adds
its storage's bytes while the storage lives; the peak of that sum is the step's peak of live tensor memory,
which is what torch.cuda.max_memory_allocated reports for the same step on a GPU (before the caching
allocator's fragmentation). Every value a Python branch reads from a fake tensor is 1 (a finiteness check
passes, AdamW's step is 1), which changes no tensor's size; the sampler's constants stay real
(_real_sampler). Micro-batches 1 and 2 give the fixed part (adapters, optimizer, EMA, what the step keeps)
and the part per sample (activations); `plan_micro_batch` turns them into the largest micro-batch that fits.
tests/test_memory.py checks the counter against hand-counted tensors, the fake step against the same step
run for real (SD, SDXL, SD3, FLUX: byte for byte), and the planner's choice against real steps.
"""
from __future__ import annotations

import dataclasses
import math
import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakMemory(TorchDispatchMode):
    """Live tensor bytes: every storage an op returns counts from its creation until it is freed (a weakref
    finalizer on the storage, whose Python object lives exactly as long as the storage). `peak` is the
    largest sum seen. Storages passed to the constructor (weights, buffers) count from the start.
    `_local_scalar_dense` (.item(), float(t), bool(t)) on a fake tensor reads 1 of the tensor's dtype
    (a finiteness check passes, AdamW's step counter is 1): no tensor's size depends on it."""

    def __init__(self, *tensors):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0
        for t in tensors:
            self.add(t)

    def add(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live:
            return
        self.live[key] = st.nbytes()
        self.now += st.nbytes()
        self.peak = max(self.peak, self.now)
        weakref.finalize(st, self._free, key)

    def _free(self, key) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and _is_fake(args[0]):
            t = args[0]
            return True if t.dtype == torch.bool else 1.0 if t.is_floating_point() else 1
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.add(t)
        return out


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def step_memory(models, reward_fn, modules, method: str, batch: int, checkpointing: bool, steps: int,
                truncate: int = 1, rank: int = 4, frozen_tasks: int = 2) -> dict:
    """One rid.train_step (one micro-batch of `batch` prompts) on the current task of an adapter group with
    `frozen_tasks` frozen tasks before it (the last task of a 3-task RIL run). -> {"static", "peak"} bytes:
    static = everything alive before the step (weights, adapters, EMA, AdamW's state), peak = the step's."""
    import rid

    unet = models.unet
    group = rid.group_of(unet) or rid.inject(unet, rank=rank)
    group.clear()
    for k in range(frozen_tasks):
        group.add_task(f"t{k}")
    group.add_task("current")
    opt = torch.optim.AdamW([group.flat], lr=1e-4)
    for st in ("exp_avg", "exp_avg_sq"):  # AdamW's state, as after the first step
        opt.state[group.flat][st] = torch.zeros_like(group.flat)
    opt.state[group.flat]["step"] = torch.tensor(1.0)
    cfg = rid.StepConfig(method=method, steps=steps, truncate=truncate, gradient_checkpointing=checkpointing)
    noise = torch.randn(batch, *models.latent_shape, device=models.device)
    own = weights(models, modules)
    own += [group.flat, group.ema, *opt.state[group.flat].values()]
    own += [b for layer in group.layers.values() for b in (layer.A_frozen, layer.B_frozen, layer.B_scaled)]
    models.sampler = _real_sampler(models.sampler)
    try:
        with PeakMemory(*own, noise) as mem:
            static = mem.now
            rid.train_step(models, group, reward_fn, [(["a photo of a cat"] * batch, noise)], opt, cfg)
    finally:
        del models.sampler  # the class's method again
    return {"static": static, "peak": mem.peak}


def weights(models, modules=()) -> list:
    """Every parameter and buffer of the backbone's modules (denoiser, VAE, every text encoder) and of `modules`."""
    mods = [getattr(models, f.name) for f in dataclasses.fields(models) if isinstance(getattr(models, f.name), nn.Module)]
    return [t for m in (*mods, *modules) for t in (*m.parameters(), *m.buffers())]


def _real_sampler(build):
    """models.sampler with real constants under fake tensors too. The samplers read their constants in Python
    (a flow's σ and σ' of the step, DDIM's ᾱ_t), where a fake scalar reads 1: the η-flow step divided by
    1 − σ' = 0 and every timestep looked like the last. So the sampler is built on the CPU, as in the real run
    (not in the planner's device context), and its methods run with the fake mode unset: an op on its constants
    alone stays real, one that takes a fake latent is still faked by the fake tensor's own mode. Constants of
    a few hundred bytes, counted in the fake and the real step alike."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    def real(*args, **kwargs):
        with unset_fake_temporarily(), torch.device("cpu"):
            return _Unfaked(build(*args, **kwargs))
    return real


class _Unfaked:
    """A sampler whose methods run with the fake mode unset (_real_sampler); attributes read through."""

    def __init__(self, sampler):
        self._sampler = sampler

    def __getattr__(self, name):
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        value = getattr(self._sampler, name)
        if not callable(value):
            return value

        def call(*args, **kwargs):
            with unset_fake_temporarily():
                return value(*args, **kwargs)
        return call


def free_bytes(device) -> int:
    """Memory a run may still take on `device`: the GPU's free memory, or the host's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


MARGIN = 0.15  # kept free: the caching allocator's fragmentation and cuBLAS/cuDNN workspaces (~10 %), and 5 % more


def fake_copy(models):
    """The loaded backbone's architecture, every module of it built from its config as fake tensors (call
    inside FakeTensorMode): what the planner runs the step on, so it allocates nothing on the device. Any
    backbone (SD: UNet, VAE, CLIP; SDXL: a second CLIP too): the dataclass's nn.Module fields are rebuilt
    (diffusers models from_config, transformers ones from their config), the rest (tokenizers, scheduler
    config, resolution) kept; the unconditional embedding is recomputed on the fake encoders."""
    from diffusers import ModelMixin

    def build(real):
        default = torch.get_default_dtype()
        torch.set_default_dtype(next(real.parameters()).dtype)  # Module.to() cannot swap fake parameters
        try:  # a VAE stays fp32 in a bf16 run when its config says force_upcast: its own dtype
            return type(real).from_config(real.config) if isinstance(real, ModelMixin) else type(real)(real.config)
        finally:
            torch.set_default_dtype(default)

    fakes = {f.name: build(getattr(models, f.name)) for f in dataclasses.fields(models)
             if isinstance(getattr(models, f.name), nn.Module)}
    for m in fakes.values():
        m.eval().requires_grad_(False)
    real = models.denoiser
    fake = dataclasses.replace(models, **fakes, _uncond=None)
    for k, v in vars(real).items():  # rid_base_model, rid_lora_targets: what rid.inject reads off the denoiser
        if k.startswith("rid_"):
            setattr(fake.denoiser, k, v)
    fake.denoiser.rid_base_model = getattr(real, "rid_base_model", "fake")
    return fake


LIMIT = 1024  # the largest micro-batch the planner considers (train.py caps it by the batch anyway)


def plan_micro_batch(models, reward_fn, method: str, budget: int, *, steps: int, truncate: int = 1,
                     checkpointing: bool = False, rank: int = 4, frozen_tasks: int = 2, limit: int = LIMIT) -> dict:
    """train.py --micro-batch auto: the largest micro-batch (at most `limit`) whose step fits `budget` bytes less
    MARGIN (train.py then takes the largest divisor of the batch at most that), from fake-tensor steps of the
    loaded architecture. Micro-batches 1 and 2 give a line, the fixed part and the part per sample (as
    docs/sd15_memory.md), whose top is where to look; fake steps there and beside it then decide (_search): a
    step's need is not always a line in the micro-batch (a tiny FLUX's grows faster above 2: the line's top
    overshoots 3× there). Weights the run has already loaded are in neither `budget` (free memory) nor the
    count: the count is the step's peak above everything alive before it, plus the adapters and AdamW's state.
    -> {"top": 0 when not even 1 fits, "fixed", "per_sample" (the line), "usable", "need": {micro-batch: bytes
    of each fake step run}}."""
    import os

    mode = os.environ.get("RID_KERNELS")
    os.environ["RID_KERNELS"] = "torch"  # a Triton kernel cannot launch on fake tensors: the reference path,
    try:                                 # whose saved tensors the docs' table counts too
        return _plan(models, reward_fn, method, budget, steps, truncate, checkpointing, rank, frozen_tasks, limit)
    finally:
        if mode is None:
            os.environ.pop("RID_KERNELS", None)
        else:
            os.environ["RID_KERNELS"] = mode
        import importlib

        jpeg = importlib.import_module("rid_kernels.jpeg")  # the module (the package exports a function `jpeg`)
        for cached in (jpeg._dct_matrix, jpeg._dct_kron, jpeg._constants):  # constants the compress reward
            cached.cache_clear()  # cached per device while faking: fake tensors, unusable by the real run


def _plan(models, reward_fn, method, budget, steps, truncate, checkpointing, rank, frozen_tasks, limit) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    need = {}
    with FakeTensorMode(allow_non_fake_inputs=True), torch.device(models.device):
        fake = fake_copy(models)
        base = PeakMemory(*weights(fake)).now  # the loaded weights, each storage once: in step_memory's static too

        def at(b: int) -> int:  # the fake step's bytes beyond the loaded weights at micro-batch b
            if b not in need:
                need[b] = step_memory(fake, reward_fn, [], method, b, checkpointing,
                                      steps_for(method, steps, truncate), truncate=truncate, rank=rank,
                                      frozen_tasks=frozen_tasks)["peak"] - base
            return need[b]

        per = at(2) - at(1)
        plan = choose(at(1) - per, per, budget)
        plan["top"] = _search(at, plan["top"], plan["usable"], limit)
    return {**plan, "need": dict(sorted(need.items()))}


def _search(at, guess: int, usable: int, limit: int) -> int:
    """The largest b ≤ limit with at(b) ≤ usable, at(b) growing with b. Probes the line's guess, then the next
    micro-batch (when the line holds, these two decide: 2 steps beyond micro-batches 1 and 2); a fit moves up
    with a doubling stride, a miss bisects between the largest b known to fit and the smallest known not to."""
    lo, hi = 0, limit + 1  # at(lo) fits (0: trivially), at(hi) does not (limit + 1: not considered)
    for b in (1, 2):
        if lo < b < hi:
            lo, hi = (b, hi) if at(b) <= usable else (lo, b)
    probe, stride = guess, 1
    while lo + 1 < hi:
        probe = min(max(probe, lo + 1), hi - 1)
        if at(probe) <= usable:
            lo, probe, stride = probe, probe + stride, 2 * stride
        else:
            hi, probe = probe, (lo + probe) // 2
    return lo


def choose(fixed: int, per: int, budget: int) -> dict:
    """The largest micro-batch whose step, `fixed` + b·`per` bytes beyond the loaded weights, fits `budget` bytes
    of free memory less MARGIN, by the line alone. -> {"top", "fixed", "per_sample", "usable"}."""
    usable = int(budget * (1 - MARGIN))
    return {"top": fits(fixed, per, usable / 1e9), "fixed": fixed, "per_sample": per, "usable": usable}


def steps_for(method: str, paper_steps: int, truncate: int) -> int:
    """DDIM steps of the measured step: the no-grad sampling steps free their activations, so only the
    steps with gradient change the peak; draft keeps all `paper_steps`, r0 its K = 4."""
    return {"draft": paper_steps, "draft-k": truncate + 1, "r0": 4}.get(method, 2)


def fits(fixed: float, per: float, gb: float) -> int:
    """The largest micro-batch b with fixed + b·per ≤ gb·10⁹ bytes (0: not even one)."""
    return max(0, math.floor((gb * 1e9 - fixed) / per)) if per > 0 else 0
