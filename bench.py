"""End-to-end cost figures of the method (the kernels' own benchmarks: python -m rid_kernels.bench).

    python bench.py                          the mini world's model (mini/world/model)
    python bench.py --model DIR --steps 50   any diffusers directory or hub id

Validates, then times, interleaving the variants so load from other processes hits all alike:
  1. a training step of rid vs baseline (UNet calls and VAE decodes counted with hooks);
  2. the EMA teacher's memory (one flat buffer) vs a deep-copied UNet, here and at SD-1.5's size;
  3. a UNet forward with an adapter group of T = 3 tasks (2 frozen, 1 trainable) vs the plain UNet, here and
     with --sd15 RES on SD-1.5's UNet (random weights) at RES²;
  4. a training step of r0 vs draft at K = 4 steps, both with gradient through every step (r0 adds random
     η with fresh noise, per-reward normalised image-gradients and the weight regularizer);
  5. a rid training step on jpeg-kb through LaSRO's latent surrogate (its adaptation amortised) vs on compress.
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import asdict, replace
import statistics
import sys
import time

import torch

import rid_kernels
import cli
import mini
import rid


def _interleaved_ms(fns: dict, reps: int) -> dict:
    """Median ms per call of each function, calls interleaved round by round (after one warm-up)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _sd15_unet_meta():
    """SD-1.5's UNet (860 M parameters) on the meta device: shapes without memory."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


def step_cost(base: rid.Models, steps: int, batch: int, reps: int, log=print) -> dict:
    prompts = (["a photo of a cat", "a red car", "a dog on the house", "the blue tree"] * batch)[:batch]
    reward = lambda img, p: img[:, 0].mean(dim=(1, 2))  # noqa: E731  (cheap, differentiable)
    runs, calls = {}, {}
    for method in ("baseline", "rid"):
        m = copy.deepcopy(base)
        group = rid.inject(m.unet)
        group.add_task("bench")
        count = {"unet": 0, "decode": 0}
        m.unet.register_forward_pre_hook(lambda *a, c=count: c.__setitem__("unet", c["unet"] + 1))
        dec = m.vae.decode
        m.vae.decode = lambda *a, c=count, d=dec, **k: (c.__setitem__("decode", c["decode"] + 1), d(*a, **k))[1]
        opt = torch.optim.AdamW(group.parameters(), lr=1e-4)
        cfg = rid.StepConfig(method=method, steps=steps)
        noise = torch.randn(batch, *m.latent_shape, generator=torch.Generator().manual_seed(0)).to(m.device)
        runs[method] = lambda m=m, g=group, o=opt, c=cfg, n=noise: rid.train_step(m, g, reward, [(prompts, n)], o, c)
        runs[method]()
        calls[method] = dict(count)
    ms = _interleaved_ms(runs, reps)
    for method in runs:
        log(f"  {method:8s} {ms[method]:9.1f} ms/step   UNet calls {calls[method]['unet']:3d} (CFG-batched)   "
            f"VAE decodes {calls[method]['decode']}")
    log(f"  rid / baseline = {ms['rid'] / ms['baseline']:.3f}   extra per step: "
        f"{calls['rid']['unet'] - calls['baseline']['unet']} UNet call, "
        f"{calls['rid']['decode'] - calls['baseline']['decode']} VAE decode "
        f"(at 50 steps the extra UNet call is ≈ 1/50 of the sampling; a tiny VAE is relatively dear)")
    return {"ms": ms, "calls": calls}


def teacher_memory(base: rid.Models, log=print) -> dict:
    m = copy.deepcopy(base)
    group = rid.inject(m.unet)
    group.add_task("bench")
    tensors = list(m.unet.parameters()) + list(m.unet.buffers())
    copy_bytes = sum(t.numel() * t.element_size() for t in tensors)
    ema_bytes = group.ema.numel() * group.ema.element_size()
    log(f"  this model: EMA buffer {ema_bytes / 1e6:.3f} MB vs deepcopy(unet) {copy_bytes / 1e6:.2f} MB "
        f"(ratio {copy_bytes / ema_bytes:.0f}x)")
    sd = _sd15_unet_meta()
    sd_group = rid.inject(sd)
    sd_group.add_task("bench")
    n_unet = sum(p.numel() for p in sd.parameters())
    log(f"  SD-1.5 (rank 4, attention targets, counted on the meta device): EMA buffer "
        f"{sd_group.ema.numel() * 4 / 1e6:.2f} MB fp32 ({sd_group.ema.numel() / 1e6:.3f} M values) vs "
        f"deepcopy(unet) {n_unet * 2 / 1e9:.2f} GB fp16 ({n_unet / 1e6:.0f} M parameters)")
    return {"ema_bytes": ema_bytes, "copy_bytes": copy_bytes}


def group_overhead(base: rid.Models, batch: int, reps: int, tasks: int = 3, log=print) -> dict:
    """UNet forward (CFG batch 2B) with an adapter group of `tasks` tasks vs the plain UNet."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2 * batch, *base.latent_shape, generator=g).to(base.device, base.dtype)
    text = base.conditioning(["a photo of a cat"] * batch, guidance=2.0)
    return unet_overhead(base, z, text, reps, tasks, log, wrapped=True)


def unet_overhead(models, z, text, reps: int, tasks: int = 3, log=print, wrapped: bool = False) -> dict:
    """The backbone's denoiser call on (z, t, text) with an adapter group of `tasks` tasks (the last trainable)
    vs without, interleaved. wrapped: also the UNet with its layers wrapped but no task (the wrappers' own
    per-call cost, without LoRA arithmetic; a second copy of the UNet, so off at SD-1.5's size)."""
    def with_unet(unet):  # the same backbone around another copy of its denoiser
        return replace(models, unet=unet)

    plain, adapted = models, with_unet(copy.deepcopy(models.unet))  # one copy: SD-1.5's UNet is 3.4 GB in fp32
    group = rid.inject(adapted.unet)
    g = torch.Generator().manual_seed(0)
    for t in range(tasks):
        group.add_task(f"t{t}", generator=g)
        with torch.no_grad():
            group.flat.normal_(0, 0.01, generator=g)
    t = torch.tensor(501, device=z.device)

    @torch.no_grad()
    def fwd(m):
        return m.predict(z, t, text, guidance=1.0)  # z is already the CFG batch

    diff = (fwd(adapted) - fwd(plain)).abs().max().item()
    if not diff > 0:
        raise RuntimeError("bench: the adapter group did not change the UNet's output")
    fns = {"plain": lambda: fwd(plain), "group": lambda: fwd(adapted)}
    if wrapped:
        empty = with_unet(copy.deepcopy(models.unet))
        rid.inject(empty.unet)  # wrappers, no adapters: each wrapped layer returns its base linear's output
        if not torch.equal(fwd(empty), fwd(plain)):
            raise RuntimeError("bench: a UNet wrapped without adapters differs from the plain UNet")
        fns["wrapped"] = lambda: fwd(empty)
    ms = _interleaved_ms(fns, reps)
    lora = sum(2 * group.rank * tasks * (layer.in_features + layer.out_features) for layer in group.layers.values())
    base_w = sum(layer.in_features * layer.out_features for layer in group.layers.values())
    log(f"  plain {ms['plain']:8.2f} ms   with the group (T={tasks}) {ms['group']:8.2f} ms   "
        f"group / plain = {ms['group'] / ms['plain']:.3f}   (kernel mode {rid_kernels.kernel_mode()}, "
        f"{len(group.layers)} adapted layers; their LoRA multiply-adds per token are {lora / 2 / base_w:.1%} "
        f"of their base weights)")
    if wrapped:
        log(f"  wrapped, no adapters {ms['wrapped']:8.2f} ms   wrapped / plain = {ms['wrapped'] / ms['plain']:.3f}   "
            f"(the wrappers' own cost, below 1 when they save more than they add: nn.Linear's forward reads its weight "
            f"and bias through Module.__getattr__; the rest of group / plain is the LoRA arithmetic)")
    return {"ms": ms}


def sd15_overhead(resolution: int, batch: int, reps: int, log=print) -> dict:
    """unet_overhead on SD-1.5's UNet (random weights, fp32) at `resolution`² with CFG batch 2B."""
    from diffusers import UNet2DConditionModel

    from experiments.sd15 import UNET

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET).eval().requires_grad_(False)
    unet.rid_base_model = "sd15-random"
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2 * batch, 4, resolution // 8, resolution // 8, generator=g)
    text = torch.randn(2 * batch, 77, UNET["cross_attention_dim"], generator=g)
    return unet_overhead(rid.Models(unet, None, None, None), z, text, reps, log=log)  # the denoiser only


def surrogate_cost(base: rid.Models, steps: int, batch: int, reps: int, log=print) -> dict:
    """One rid training step on a black-box task (jpeg-kb through LaSRO's surrogate, surrogate.SurrogateTask,
    its after-step work included: decoding the step's latents, the true JPEG size, the buffer, and an
    adaptation fit every `adapt_every` steps, amortised by timing whole cycles) vs the same step on the
    differentiable compress reward. The mini preset's surrogate settings when the model is the mini world's."""
    import rewards
    import config
    import surrogate

    prompts = [f"a photo of a {a}" for a in config.ANIMALS][:max(batch, 8)]
    sur_cfg = surrogate.SurrogateConfig(**{**asdict(surrogate.SurrogateConfig()), **config.MINI_SURROGATE})
    runs, logs = {}, {}
    for task in ("compress", "jpeg-kb"):
        m = copy.deepcopy(base)
        group = rid.inject(m.unet)
        group.add_task("bench", generator=torch.Generator().manual_seed(0))
        opt = torch.optim.AdamW(group.parameters(), lr=1e-4)
        cfg = rid.StepConfig(method="rid", steps=steps)
        noise = torch.randn(batch, *m.latent_shape, generator=torch.Generator().manual_seed(0)).to(m.device)
        if task == "compress":
            reward = rewards.get("compress")
            runs[task] = lambda m=m, g=group, o=opt, c=cfg, n=noise, r=reward: rid.train_step(
                m, g, r, [(prompts[:batch], n)], o, c)
        else:
            box = surrogate.SurrogateTask(task, surrogate.black_box(task), m, prompts, sur_cfg, seed=0)
            box.sur.add(*_explored(box, m, prompts, steps))  # a filled buffer, as after pre-training
            box.sur.fit(1)

            def cycle(m=m, g=group, o=opt, c=cfg, n=noise, b=box):  # adapt_every steps: one adaptation
                for _ in range(max(1, sur_cfg.adapt_every)):
                    rid.train_step(m, g, b, [(prompts[:batch], n)], o, c)
                    logs.update(b.after_step())
            runs[task] = cycle
    ms = _interleaved_ms(runs, reps)
    per_step = ms["jpeg-kb"] / max(1, sur_cfg.adapt_every)
    log(f"  compress {ms['compress']:8.1f} ms/step   jpeg-kb through the surrogate {per_step:8.1f} ms/step "
        f"(adapting every {sur_cfg.adapt_every} steps for {sur_cfg.adapt_steps} fits, amortised)   "
        f"surrogate / compress = {per_step / ms['compress']:.3f}")
    return {"ms": {"compress": ms["compress"], "jpeg-kb": per_step}}


def _explored(box, m, prompts: list, steps: int):
    """(z, prompt ids, true scores) of one sample per prompt: what pre-training puts in the buffer."""
    import surrogate

    noise = torch.randn(len(prompts), *m.latent_shape, generator=torch.Generator().manual_seed(1))
    z = surrogate.explore(m, prompts, noise, steps, 7.5)
    return z, torch.arange(len(prompts)), box._true(z, prompts)


def r0_vs_draft(base: rid.Models, batch: int, reps: int, K: int = 4, log=print) -> dict:
    """One optimizer step of r0 vs draft at K DDIM steps, full backprop in both, the same reward: in the
    mini world R0's mix hps + aesthetic + clip (one part per reward, as r0 normalises each), else a
    cheap differentiable one. Validates first: both steps move the adapters, r0's logs every part."""
    import rewards

    prompts = (["a photo of a cat", "a red car", "a dog on the house", "the blue tree"] * batch)[:batch]
    if mini.is_model(str(getattr(base.unet, "rid_base_model", ""))):
        reward = rewards.joint({"hps": 1.0, "aesthetic": 1.0, "clip": 1.0}, rewards.load_spec(mini.REWARD_SPEC))
    else:
        cheap = lambda img, p: img[:, 0].mean(dim=(1, 2))  # noqa: E731
        reward = rewards_joint_like({"red": cheap, "green": lambda img, p: img[:, 1].mean(dim=(1, 2))})
    runs, calls = {}, {}
    for method in ("draft", "r0"):
        m = copy.deepcopy(base)
        group = rid.inject(m.unet)
        group.add_task("bench", generator=torch.Generator().manual_seed(0))
        count = {"unet": 0, "decode": 0}
        m.unet.register_forward_pre_hook(lambda *a, c=count: c.__setitem__("unet", c["unet"] + 1))
        dec = m.vae.decode
        m.vae.decode = lambda *a, c=count, d=dec, **k: (c.__setitem__("decode", c["decode"] + 1), d(*a, **k))[1]
        opt = torch.optim.AdamW(group.parameters(), lr=1e-4)
        cfg = rid.StepConfig(method=method, steps=K)
        noise = torch.randn(batch, *m.latent_shape, generator=torch.Generator().manual_seed(0)).to(m.device)
        gen = torch.Generator(m.device).manual_seed(0)
        runs[method] = lambda m=m, g=group, o=opt, c=cfg, n=noise, r=gen: rid.train_step(
            m, g, reward, [(prompts, n)], o, c, generator=r)
        before = group.flat.detach().clone()
        logs = runs[method]()
        if not (group.flat.detach() != before).any() or not logs["grad_norm"] > 0:
            raise RuntimeError(f"bench: the {method} step did not move the adapters")
        calls[method] = dict(count)
    if calls["r0"] != calls["draft"]:
        raise RuntimeError(f"bench: r0 and draft should make the same UNet calls and decodes, got {calls}")
    ms = _interleaved_ms(runs, reps)
    log(f"  draft {ms['draft']:9.1f} ms/step   r0 {ms['r0']:9.1f} ms/step   r0 / draft = "
        f"{ms['r0'] / ms['draft']:.3f}   (K = {K}, batch {batch}, {len(rid.reward_parts(reward))} reward part(s); "
        f"both {calls['r0']['unet']} CFG-batched UNet calls and {calls['r0']['decode']} VAE decode)")
    return {"ms": ms, "calls": calls}


def rewards_joint_like(fns: dict):
    """A weighted sum with .parts, as rewards.joint builds one, of plain functions (weight 1 each)."""
    def total(img, p):
        return sum(fn(img, p) for fn in fns.values())
    total.parts = {name: (1.0, fn) for name, fn in fns.items()}
    return total


def main(argv=None) -> int:
    p = cli.Parser(prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(mini.MODEL), help="diffusers dir or hub id (default: the mini world's model)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps per training step (default: 10)")
    p.add_argument("--batch", type=int, default=2, help="prompts per training step (default: 2)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions; medians are printed (default: 5)")
    p.add_argument("--sd15", type=int, default=0, metavar="RES",
                   help="also part 3 on SD-1.5's UNet (random weights, fp32, 3.4 GB) at RES² (default: 0, skip)")
    try:
        a = p.parse_args(argv)
        for flag in ("steps", "batch", "reps"):
            if getattr(a, flag) < 1:
                p.error(f"--{flag} {getattr(a, flag)}: must be ≥ 1")
        if a.sd15 and (a.sd15 % 64 or not 64 <= a.sd15 <= 1024):
            p.error(f"--sd15 {a.sd15}: allowed: 0 (skip) or a multiple of 64 from 64 to 1024")
        base = rid.load_models(a.model)
    except ValueError as e:  # cli.UsageError (a bad flag) or a model that does not load: one line, exit 2
        print(f"bench.py: error: {e}", file=sys.stderr)
        return 2
    print(f"== per training step: rid vs baseline ({a.model}, {a.steps} DDIM steps, batch {a.batch}, "
          f"{base.device}) ==")
    step_cost(base, a.steps, a.batch, a.reps)
    print("== teacher memory: EMA adapter buffer vs a deep-copied UNet ==")
    teacher_memory(base)
    print(f"== UNet forward: adapter group vs plain (CFG batch {2 * a.batch}) ==")
    group_overhead(base, a.batch, a.reps * 4)
    if a.sd15:
        print(f"== UNet forward at SD-1.5's size, {a.sd15}²: adapter group vs plain (CFG batch {2 * a.batch}) ==")
        sd15_overhead(a.sd15, a.batch, a.reps)
    print(f"== per training step: r0 vs draft at K = 4, full backprop (batch {a.batch}) ==")
    r0_vs_draft(base, a.batch, a.reps)
    print(f"== per training step: a black-box task through LaSRO's surrogate vs compress (rid, {a.steps} DDIM "
          f"steps, batch {a.batch}) ==")
    surrogate_cost(base, a.steps, a.batch, a.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
