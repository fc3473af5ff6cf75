"""DRaFT's own claims at mini scale: reward against compute for every method of the family.

    python -m experiments.draft --jobs 2          aesthetic and hps × 6 methods × seeds 0,1,2 → docs/draft_results.md
    python -m experiments.draft --quick           1 seed, a tiny budget: an end-to-end smoke test (not the doc)

The DRaFT paper (Clark et al., ICLR 2024) claims: K = 1 gives the best reward per unit of compute among
the truncations (larger K is not better); DRaFT-LV with n = 2 learns about 2× faster than DRaFT-1 for
about 10 % more compute per step; ReFL performs similarly to DRaFT-1; full DRaFT (all steps, gradient
checkpointing) works but costs more. This script measures each at mini scale, from the base mini model:

  1. COST, side by side: one process, one thread, every method's train step timed in turn (round robin,
     so a change in machine load hits every method alike); median seconds per step, ratio to K = 1, and
     the UNet calls per step counted by hooks (UNetCalls).
  2. MEMORY: one fresh process per method (and with / without --gradient-checkpointing for K > 1) loads
     the model and rewards, takes 3 steps and reports the peak of the tensors they allocate (and its RSS).
  3. TRAINING: every (reward, method, seed) from the base model with the same lr, batch and schedule,
     until it has spent the same budget of UNet calls (forward + backward, a gradient-checkpointing
     recompute counted as the UNet forwards' worth it re-runs, UNetCalls); the held-out test reward (all 50 test prompts of the mini world,
     fixed noise per seed) every budget/--evals calls. The training loop is train.py's stage 1 (same
     prompt order, noise, LoRA init and method draws from train.seed_of; constant lr), written out here
     only to evaluate mid-task and to count calls.
  4. REPORT: curves of training and test reward against UNet calls and against wall time (training
     steps only, evaluation excluded), mean ± std over seeds; calls, steps and seconds each method needs
     to reach a common level (the test reward K = 1 reaches at half its budget); the paper's claims beside.

Resumable: each piece (cost, one memory probe, one training run) writes its result last; a rerun skips
finished pieces (a killed training run starts over; one takes ~1–2 min).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import checkpoint
import config
import plots
import rid
import train
from cli import Parser, UsageError, command
from experiments.common import ROOT, ints, logger, mean_std, run_parallel, take_lock, write_doc

PROG = "python -m experiments.draft"
REWARDS = ("aesthetic", "hps")

# name -> (label, train.py flags). The first six are trained; the -gc / -nogc variants are only timed and
# measured for memory (K > 1 with and without gradient checkpointing).
CONFIGS = {
    "baseline": ("K=1 (DRaFT-1)", ["--method", "baseline"]),
    "draft-k2": ("DRaFT-K K=2", ["--method", "draft-k", "--truncate", "2"]),
    "draft-k5": ("DRaFT-K K=5", ["--method", "draft-k", "--truncate", "5"]),
    "draft-gc": ("DRaFT (all steps, GC)", ["--method", "draft", "--gradient-checkpointing"]),
    "draft-lv2": ("DRaFT-LV n=2", ["--method", "draft-lv", "--lv-n", "2"]),
    "refl": ("ReFL (m=20 at 50 steps)", ["--method", "refl"]),
    "draft-k2-gc": ("DRaFT-K K=2, GC", ["--method", "draft-k", "--truncate", "2", "--gradient-checkpointing"]),
    "draft-k5-gc": ("DRaFT-K K=5, GC", ["--method", "draft-k", "--truncate", "5", "--gradient-checkpointing"]),
    "draft-nogc": ("DRaFT (all steps), no GC", ["--method", "draft"]),
}
TRAINED = ("baseline", "draft-k2", "draft-k5", "draft-gc", "draft-lv2", "refl")
K1 = "baseline"
# Memory with and without gradient checkpointing for every K > 1: (without, with).
GC_PAIRS = (("draft-k2", "draft-k2-gc"), ("draft-k5", "draft-k5-gc"), ("draft-nogc", "draft-gc"))
# One lr per reward, the same for every method (the paper uses the same hyper-parameters for ReFL and its
# DRaFT variants). aesthetic: the mini world's preset. hps: half the preset's peak, constant: at 7e-4
# constant, K=1's held-out HPS peaked at half the budget and fell back by its end (seed 0: 0.775 → 0.821 at
# 75 steps → 0.792 at 150); at 3.5e-4 it rises over all 150 steps (→ 0.816), so "the level K=1 reaches at
# half its budget" is one that a slower method can still reach.
LR = {"aesthetic": 1e-3, "hps": 3.5e-4}
# The default budget, in K = 1 steps' worth of UNet calls (90 × 21 at 20 DDIM steps), and the test evaluations per
# run after the base model's (every 15 K=1 steps; the 3rd is at half the budget, where the common level is read).
# Sized for the issue's ≤ 45 min on 2 cores: 90 steps and 6 evaluations took 26.6 min (150 and 10: 67.2 min
# on a loaded machine).
DEFAULT_BUDGET_STEPS, DEFAULT_EVALS = 90, 6


#### COUNTING UNET CALLS ####

class UNetCalls:
    """Counts the calls of one UNet by hooks, as they happen:
      forward    entries outside the backward pass,
      recompute  UNet forwards' worth of work re-run during the backward pass by gradient checkpointing,
                 counted on the units diffusers checkpoints (each ResnetBlock2D and BasicTransformerBlock:
                 entries during the backward pass / the number of units; a pre-hook, since a recompute stops
                 as soon as the activations it needs are back, before a forward's end): one step with
                 gradient is recomputed block by block (1 per call), several are each recomputed whole and
                 then block by block (2 per call; samplers.predict),
      backward   backward passes through a call (a hook on the output of every call that records a
                 gradient fires once when the gradient goes through it),
    and `grad_timesteps`, the DDIM timestep of every call that records a gradient, in call order.
    One CFG-batched call (uncond and cond in one batch) is one call."""

    def __init__(self, unet):
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.resnet import ResnetBlock2D

        # torch's autograd engine reports -1 when no backward pass is running on this thread
        self._in_backward = lambda: torch._C._current_graph_task_id() != -1
        units = [m for m in unet.modules() if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))]
        self._units = len(units)
        self._handles = [unet.register_forward_pre_hook(self._pre, with_kwargs=True),
                         unet.register_forward_hook(self._post),
                         *(u.register_forward_pre_hook(self._unit) for u in units)]
        self.reset()

    def reset(self):
        self.forward = self.backward = self._unit_recomputes = 0
        self.grad_timesteps = []

    @property
    def recompute(self) -> float:
        return self._unit_recomputes / self._units

    @property
    def calls(self) -> int:
        return self.forward + self.recompute + self.backward

    def as_dict(self) -> dict:
        return {"fwd": self.forward, "recompute": self.recompute, "bwd": self.backward}

    def _unit(self, module, args):
        if self._in_backward():
            self._unit_recomputes += 1

    def _pre(self, module, args, kwargs):
        if self._in_backward():
            return
        self.forward += 1
        if torch.is_grad_enabled():
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            self.grad_timesteps.append(int(t))

    def _post(self, module, args, output):
        sample = output[0] if isinstance(output, tuple) else output.sample
        if sample.requires_grad and not self._in_backward():
            sample.register_hook(self._on_backward)

    def _on_backward(self, grad):
        self.backward += 1

    def remove(self):
        for h in self._handles:
            h.remove()


#### ONE TRAINING RUN (a piece) ####

def piece_name(reward: str, name: str, seed: int) -> str:
    return f"{reward}-{name}-seed{seed}"


def resolve(reward: str, name: str, seed: int, out: Path, extra: list):
    """train.py's resolved Config for this method on this reward from the base model, constant lr."""
    argv = ["--tasks", reward, *CONFIGS[name][1], "--seed", str(seed), "--out", str(out),
            "--lr", f"{reward}={LR[reward]:g}", "--lr-schedule", "constant", *extra]
    try:
        return config.resolve(config.build_parser().parse_args(argv))[0]
    except UsageError as e:
        raise SystemExit(f"{PROG}: train.py flags {' '.join(argv)}: {e}") from None


class Trainer:
    """train.py's stage 1 for one (reward, method, seed), step by step: the same prompts, noise, LoRA init,
    method draws and AdamW as `train.py --tasks REWARD --method M --seed S --lr-schedule constant`."""

    def __init__(self, reward: str, name: str, seed: int, out: Path, extra: list):

        self.cfg = cfg = resolve(reward, name, seed, out, extra)
        self.reward, self.seed = reward, seed
        _, self.train_prompts, self.test_prompts = train.open_run(cfg, resume=False)
        self.models = rid.load_models(cfg.model, device=cfg.device)
        self.group = rid.inject(self.models.unet, rank=cfg.rank)
        init = torch.Generator(self.models.device).manual_seed(train.seed_of(seed, 1, train.INIT))
        self.group.add_task(reward, generator=init)
        self.optimizer = torch.optim.AdamW([self.group.flat], lr=cfg.lr[reward], betas=tuple(cfg.betas),
                                           weight_decay=cfg.weight_decay)
        self.reward_fn = train.reward_fn(reward, cfg)
        self.step_cfg = config.step_config(cfg)
        self.micro, _ = config.micro_plan(cfg, reward, 1)
        self.counter = UNetCalls(self.models.unet)
        self.step = 0

    def train_step(self) -> dict:
        """One optimizer step; the logs, its seconds and its UNet calls."""

        cfg, step, batch = self.cfg, self.step, self.cfg.batch[self.reward]
        g = train.seed_of(self.seed, 1, train.GLOBAL, step, 0)
        torch.manual_seed(g), random.seed(g), np.random.seed(g)
        prompts = train.batch_prompts(self.train_prompts, step, batch, self.seed)
        noise = torch.randn((batch, *self.models.latent_shape),
                            generator=torch.Generator().manual_seed(train.seed_of(self.seed, 1, train.NOISE, step)))
        noise = noise.to(self.models.device)
        micro_batches = [(prompts[i:i + self.micro], noise[i:i + self.micro]) for i in range(0, batch, self.micro)]
        gen = torch.Generator(self.models.device).manual_seed(train.seed_of(self.seed, 1, train.METHOD, step, 0))
        self.counter.reset()
        t0 = time.perf_counter()
        logs = rid.train_step(self.models, self.group, self.reward_fn, micro_batches, self.optimizer, self.step_cfg,
                              clip_grad=cfg.clip_grad, generator=gen)
        seconds = time.perf_counter() - t0
        self.step += 1
        if not math.isfinite(logs["loss"]):
            raise SystemExit(f"{PROG}: non-finite loss at step {self.step} of {cfg.method} on {self.reward}")
        return {"step": self.step, **{k: float(v) for k, v in logs.items()}, "lr": cfg.lr[self.reward],
                "seconds": round(seconds, 4), **self.counter.as_dict(), "calls": self.counter.calls}

    def test_reward(self) -> float:
        """Mean reward of the held-out test prompts, one image each from noise fixed per seed (the same for
        every method and every evaluation); not counted as training calls."""

        prompts = self.test_prompts
        noise = torch.randn((len(prompts), *self.models.latent_shape), generator=torch.Generator().manual_seed(
            10_000 + self.seed))
        self.counter.remove()
        try:
            images = rid.sample(self.models, prompts, noise, steps=self.cfg.steps, guidance=self.cfg.guidance)
            with torch.no_grad():
                return float(self.reward_fn(images, prompts).mean())
        finally:
            self.counter = UNetCalls(self.models.unet)


def run_piece(reward: str, name: str, seed: int, out: Path, budget: int, evals: int, extra: list,
              train_args: str = "") -> None:
    """Train until `budget` UNet calls are spent; test reward at 0 and every budget/evals calls (at the
    first step that crosses each mark) and at the end. Writes metrics.jsonl (one row per step:
    train.py's keys + seconds, fwd/recompute/bwd/calls of the step, cumulative time and calls),
    test.jsonl ({step, time, calls, test_reward}) and done.json last."""
    out.mkdir(parents=True, exist_ok=True)
    tr = Trainer(reward, name, seed, out, extra)
    log = logger(f"{PROG} {out.name}")
    rows, tests, calls, elapsed, t_eval = [], [], 0, 0.0, 0.0

    def evaluate():
        nonlocal t_eval
        t0 = time.perf_counter()
        tests.append({"step": tr.step, "time": round(elapsed, 3), "calls": calls, "test_reward": tr.test_reward()})
        t_eval += time.perf_counter() - t0

    evaluate()
    mark = budget / evals
    while calls < budget:
        row = tr.train_step()
        calls, elapsed = calls + row["calls"], elapsed + row["seconds"]
        rows.append({**row, "time": round(elapsed, 3), "calls_total": calls})
        if calls >= mark or calls >= budget:
            evaluate()
            while mark <= calls:
                mark += budget / evals
            log(f"step {tr.step}: {calls}/{budget} calls, {elapsed:.0f} s, test reward {tests[-1]['test_reward']:.4f}")
    checkpoint.atomic_write(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    checkpoint.atomic_write(out / "test.jsonl", "".join(json.dumps(r) + "\n" for r in tests))
    checkpoint.write_json(out / "done.json", {
        "reward": reward, "method": name, "seed": seed, "budget": budget, "evals": evals, "train_args": train_args,
        "steps": tr.step, "calls": calls,
        "train_s": round(elapsed, 2), "eval_s": round(t_eval, 2), "lr": tr.cfg.lr[reward],
        "batch": tr.cfg.batch[reward], "ddim_steps": tr.cfg.steps, "n_test": len(tr.test_prompts),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)})


#### COST SIDE BY SIDE, MEMORY ####

def run_cost(out: Path, names: list, rounds: int, extra: list, reward: str = "aesthetic") -> dict:
    """Every config's train step timed in turn, `rounds` times after one warm-up round, in one process on
    one thread; per config the median and least seconds, the ratio to K = 1 (the median over rounds of
    its time over K = 1's in the same round; and least over least: on a shared machine other work only
    ever slows a step down), the UNet calls per step (mean; ReFL's vary with its drawn step)."""
    torch.set_num_threads(1)
    trainers = {n: Trainer(reward, n, 0, out / "cost" / n, extra) for n in names}
    seconds, counts = {n: [] for n in names}, {n: [] for n in names}
    for r in range(rounds + 1):
        for n, tr in trainers.items():
            row = tr.train_step()
            if r:  # round 0 warms up every config's code paths
                seconds[n].append(row["seconds"])
                counts[n].append(row)
    out.mkdir(parents=True, exist_ok=True)
    result = {"rounds": rounds, "reward": reward, "threads": 1, "configs": {}}
    for n in names:
        paired = [a / b for a, b in zip(seconds[n], seconds[K1])]  # against K = 1's step of the same round
        result["configs"][n] = {
            "median_s": round(statistics.median(seconds[n]), 4), "min_s": round(min(seconds[n]), 4),
            "ratio": round(statistics.median(paired), 3), "ratio_min": round(min(seconds[n]) / min(seconds[K1]), 3),
            "seconds": seconds[n],
            **{k: statistics.fmean(c[k] for c in counts[n]) for k in ("fwd", "recompute", "bwd", "calls")}}
    checkpoint.write_json(out / "cost.json", result)
    return result


def run_memory(name: str, out: Path, extra: list, steps: int = 3, reward: str = "aesthetic") -> None:
    """Memory of `steps` steps of one config in a fresh process: the peak of the tensors the steps allocate,
    counted while they live (experiments.memory.PeakMemory, the counter behind docs/sd15_memory.md; at
    this scale the process's RSS peaks while loading and cannot see a step), and the process's peak RSS."""
    from experiments.memory import PeakMemory

    tr = Trainer(reward, name, 0, out, extra)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    with PeakMemory() as mem:
        for _ in range(steps):
            tr.train_step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json(out / "memory.json", {"config": name, "loaded_gb": round(loaded, 3), "peak_gb": round(peak, 3),
                                                "step_mb": round(mem.peak / 2**20, 2), "steps": steps})


#### CURVES (pure: read the pieces' files, no torch) ####

def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def load_pieces(out: Path, reward: str, seeds: list) -> dict:
    """{method: [{"rows": metrics.jsonl rows, "tests": test.jsonl rows} per seed]} for every trained method
    whose runs of this reward are finished for every seed."""
    pieces = {}
    for m in TRAINED:
        dirs = [out / piece_name(reward, m, s) for s in seeds]
        if all((d / "done.json").exists() for d in dirs):
            pieces[m] = [{"rows": read_jsonl(d / "metrics.jsonl"), "tests": read_jsonl(d / "test.jsonl")} for d in dirs]
    return pieces


def reach(points: list, level: float) -> dict | None:
    """The first point where a test-reward curve reaches `level`: points [{step, calls, time, test_reward}]
    in order; linear interpolation between the last point below and the first at or above it, on each of
    step, calls and time. None when no point reaches it."""
    for i, p in enumerate(points):
        if p["test_reward"] >= level:
            if i == 0:
                return {k: float(p[k]) for k in ("step", "calls", "time")}
            q = points[i - 1]
            f = (level - q["test_reward"]) / (p["test_reward"] - q["test_reward"])
            return {k: q[k] + f * (p[k] - q[k]) for k in ("step", "calls", "time")}
    return None


def at(points: list, x_key: str, x: float, y_key: str = "test_reward") -> float:
    """A curve's value at x (linear interpolation)."""
    return float(np.interp(x, [p[x_key] for p in points], [p[y_key] for p in points]))


def band(curves: list, x_key: str, grid, y_key: str = "test_reward") -> dict:
    """Mean ± sample std over seeds of curves interpolated at grid points (each curve: rows with x_key, y_key)."""
    ys = np.array([[at(c, x_key, x, y_key) for x in grid] for c in curves])
    std = ys.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(grid))
    return {"x": [float(x) for x in grid], "mean": ys.mean(0).tolist(), "std": std.tolist(), "n": len(curves)}


def binned(rows_per_seed: list, x_key: str, edges, y_key: str = "reward") -> dict:
    """Training reward averaged over the steps whose x falls in each bin (edges[i-1], edges[i]], per seed,
    then mean ± std over seeds; a bin some seed has no step in is left out. x = the bin's centre."""
    x, mean, std = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        per_seed = [[r[y_key] for r in rows if lo < r[x_key] <= hi] for rows in rows_per_seed]
        if not all(per_seed):
            continue
        m = [statistics.fmean(v) for v in per_seed]
        x.append((lo + hi) / 2), mean.append(statistics.fmean(m))
        std.append(statistics.stdev(m) if len(m) > 1 else 0.0)
    return {"x": x, "mean": mean, "std": std, "n": len(rows_per_seed)}


def curves(pieces: dict, budget: int, n_bins: int = 10) -> dict:
    """pieces: {method: [{"rows": metrics rows, "tests": test rows} per seed]} of one reward →
    {"level", "by_method": {method: {"test_calls", "test_time", "train_calls", "train_time", "reach",
    "final"}}}. The level is K = 1's mean test reward at half the budget; "reach" holds each seed's
    {step, calls, time} to it (None: not reached within the budget)."""
    level = statistics.fmean(at(p["tests"], "calls", budget / 2) for p in pieces[K1])
    out = {"level": level, "budget": budget, "by_method": {}}
    for m, runs in pieces.items():
        calls_grid = np.linspace(0, budget, n_bins + 1)
        t_end = min(p["tests"][-1]["time"] for p in runs)  # every seed's curve covers [0, t_end]
        time_grid = np.linspace(0, t_end, n_bins + 1)
        out["by_method"][m] = {
            "test_calls": band([p["tests"] for p in runs], "calls", calls_grid),
            "test_time": band([p["tests"] for p in runs], "time", time_grid),
            "train_calls": binned([p["rows"] for p in runs], "calls_total", calls_grid),
            "train_time": binned([p["rows"] for p in runs], "time", time_grid),
            "reach": [reach(p["tests"], level) for p in runs],
            "final": [at(p["tests"], "calls", budget) for p in runs],
            "steps": [p["rows"][-1]["step"] for p in runs],
            "train_s": [p["rows"][-1]["time"] for p in runs],
            "calls_per_step": statistics.fmean(r["calls"] for p in runs for r in p["rows"]),
            "seconds_per_step": statistics.fmean(p["rows"][-1]["time"] / p["rows"][-1]["step"] for p in runs)}
    return out


def speedup(c: dict, m: str, key: str) -> tuple:
    """(K = 1's mean over seeds of `key` to the level) / (method m's), and how many of m's seeds reached it;
    None when either reached it in no seed."""
    def mean_of(method):
        xs = [r[key] for r in c["by_method"][method]["reach"] if r is not None]
        return statistics.fmean(xs) if xs else None
    base, mine = mean_of(K1), mean_of(m)
    n = sum(r is not None for r in c["by_method"][m]["reach"])
    return (base / mine if base is not None and mine else None), n


#### REPORT ####

def fmt(x, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def claims(c: dict, cost: dict | None) -> list:
    """The paper's claims beside what this run measured, each with the rule that turns it into a verdict."""
    ratio = lambda n: cost["configs"][n]["ratio"] if cost and n in cost["configs"] else None  # noqa: E731
    lv_steps, lv_n = speedup(c, "draft-lv2", "step")
    lv_calls, _ = speedup(c, "draft-lv2", "calls")
    refl_calls, refl_n = speedup(c, "refl", "calls")
    larger = {m: speedup(c, m, "calls") for m in ("draft-k2", "draft-k5", "draft-gc")}
    final = {m: statistics.fmean(c["by_method"][m]["final"]) for m in c["by_method"]}

    def verdict(ok, partly=False, measured=True):
        return "not measured" if not measured else "agrees" if ok else ("partly" if partly else "does not hold here")
    rows = [
        ("DRaFT-LV (n=2) learns ≈ 2× faster than DRaFT-1 per step", "steps to the level, K=1 / LV",
         f"{fmt(lv_steps)}× (reached in {lv_n}/{len(c['by_method'][K1]['reach'])} seeds)",
         verdict(lv_steps is not None and 1.5 <= lv_steps <= 3, lv_steps is not None and lv_steps > 1.1),
         "agrees: 1.5–3×; partly: 1.1–1.5× or above 3×"),
        ("… for ≈ 10 % more compute per step", "step time LV / K=1 (side by side)",
         f"{fmt(ratio('draft-lv2'))}× (UNet calls per step {fmt(c['by_method']['draft-lv2']['calls_per_step'], 1)} vs "
         f"{fmt(c['by_method'][K1]['calls_per_step'], 1)})",
         verdict(ratio("draft-lv2") is not None and ratio("draft-lv2") <= 1.15,
                 ratio("draft-lv2") is not None and ratio("draft-lv2") <= 1.35, ratio("draft-lv2") is not None),
         "agrees: ≤ 1.15×; partly: ≤ 1.35× (20 DDIM steps here, 50 in the paper: the n extra calls weigh 2.5× more)"),
        ("… so LV is more efficient per unit of compute", "UNet calls to the level, K=1 / LV",
         f"{fmt(lv_calls)}×", verdict(lv_calls is not None and lv_calls >= 1.5, lv_calls is not None and lv_calls > 1.1),
         "agrees: ≥ 1.5×; partly: > 1.1×"),
        ("ReFL performs similarly to DRaFT-1", "UNet calls to the level, K=1 / ReFL; final test reward",
         f"{fmt(refl_calls)}× (reached in {refl_n}/{len(c['by_method'][K1]['reach'])} seeds); {fmt(final['refl'], 3)} vs {fmt(final[K1], 3)}",
         verdict(refl_calls is not None and 0.67 <= refl_calls <= 1.5, refl_calls is not None),
         "agrees: 0.67–1.5×"),
        ("K = 1 is the best truncation per unit of compute (larger K not better)",
         "UNet calls to the level, K=1 / K (K = 2, 5, all)",
         "; ".join(f"{CONFIGS[m][0]}: {fmt(s)}× (reached in {n}/{len(c['by_method'][K1]['reach'])} seeds)"
                   for m, (s, n) in larger.items()),
         verdict(all(s is None or s <= 1.1 for s, _ in larger.values())),
         "agrees: no K > 1 reaches the level with fewer calls than K = 1 (ratio ≤ 1.1)"),
        ("Full DRaFT with checkpointing works but costs more", "step time all-steps+GC / K=1; final test reward",
         f"{fmt(ratio('draft-gc'))}×; {fmt(final['draft-gc'], 3)} vs {fmt(final[K1], 3)} at the same calls",
         verdict(ratio("draft-gc") is not None and ratio("draft-gc") > 1
                 and final["draft-gc"] > c["by_method"][K1]["test_calls"]["mean"][0], measured=ratio("draft-gc") is not None),
         "agrees: costs more per step and still raises the test reward over the base model"),
    ]
    return rows


def write_report(out: Path, doc: Path, rewards: list, seeds: list, budget: int, facts: list) -> dict:
    cost = json.loads((out / "cost.json").read_text()) if (out / "cost.json").exists() else None
    lines = ["# DRaFT's own claims at mini scale: reward against compute", "", *facts, ""]
    if cost:
        lines += ["## Cost per step, side by side", "",
                  f"One process, one thread, {cost['rounds']} rounds after a warm-up round, each round one "
                  f"{cost['reward']} train step of every configuration in turn (batch and DDIM steps as in "
                  "training); UNet calls counted by hooks (one CFG-batched call = one call; a checkpointing "
                  "recompute counts the UNet forwards' worth it re-runs: one step with gradient is recomputed block by "
                  "block, several whole and then block by block).", "",
                  "| configuration | median s / step | × K=1 (median of per-round ratios) | least s / step | × K=1 "
                  "(least / least) | UNet fwd | recompute | bwd | calls | calls × K=1 |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        k1_calls = cost["configs"][K1]["calls"]
        for n, v in cost["configs"].items():
            lines.append(f"| {CONFIGS[n][0]} | {v['median_s']:.3f} | {v['ratio']:.2f} | {v['min_s']:.3f} | "
                         f"{v['ratio_min']:.2f} | {v['fwd']:.1f} | "
                         f"{v['recompute']:.1f} | {v['bwd']:.1f} | {v['calls']:.1f} | {v['calls'] / k1_calls:.2f} |")
        lines.append("")
    mem = {n: json.loads((out / f"memory-{n}" / "memory.json").read_text()) for n in CONFIGS
           if (out / f"memory-{n}" / "memory.json").exists()}
    if mem:
        lo, hi = (f(v["peak_gb"] for v in mem.values()) for f in (min, max))
        rss = f"{lo:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}–{hi:.2f}"
        lines += ["## Peak memory of a training step", "",
                  "A fresh process per configuration loads the model and reward and takes 3 steps; the peak of the "
                  "tensors those steps allocate, counted while they live (experiments.memory.PeakMemory: the "
                  "activations kept for the backward pass, the gradient, AdamW's state), MB. The processes' peak "
                  f"RSS ({rss} GB) is mostly the loaded models and the allocator's reserve, too coarse to compare "
                  "steps this small.", "",
                  "| configuration | step peak (MB) |", "|---|---|"]
        for n, v in mem.items():
            lines.append(f"| {CONFIGS[n][0]} | {v['step_mb']:.1f} |" if "step_mb" in v else f"| {CONFIGS[n][0]} | – |")
        pairs = [(k, a, b) for k, (a, b) in zip(("2", "5", "all steps"), GC_PAIRS)
                 if "step_mb" in mem.get(a, {}) and "step_mb" in mem.get(b, {})]
        if pairs:
            lines += ["", "| K (steps with gradient) | without GC (MB) | with GC (MB) |", "|---|---|---|"]
            for k, a, b in pairs:
                lines.append(f"| {k} | {mem[a]['step_mb']:.1f} | {mem[b]['step_mb']:.1f} |")
        lines.append("")
    summary = {}
    for reward in rewards:
        pieces = load_pieces(out, reward, seeds)
        if K1 not in pieces:
            continue
        c = summary[reward] = curves(pieces, budget)
        png = doc.with_name(f"draft_{reward}.png") if doc.name == "draft_results.md" else doc.with_name(f"{doc.stem}_{reward}.png")
        label = lambda m: CONFIGS[m][0]  # noqa: E731
        panels = {
            "train reward vs UNet calls": ("UNet calls (fwd + bwd)", {label(m): v["train_calls"] for m, v in c["by_method"].items()}),
            "test reward vs UNet calls": ("UNet calls (fwd + bwd)", {label(m): v["test_calls"] for m, v in c["by_method"].items()}),
            "train reward vs wall time": ("training time (s, 1 thread)", {label(m): v["train_time"] for m, v in c["by_method"].items()}),
            "test reward vs wall time": ("training time (s, 1 thread)", {label(m): v["test_time"] for m, v in c["by_method"].items()}),
        }
        plots.curves_figure(panels, png, title=f"{reward}: mean ± std over seeds {', '.join(map(str, seeds))}",
                            hline=("level", c["level"]))
        lines += [f"## {reward}", "", f"![{reward} reward against compute]({png.name})", "",
                  f"Level: {c['level']:.4f}, the held-out test reward K=1 reaches at half its budget (mean over "
                  f"seeds). Base model: {c['by_method'][K1]['test_calls']['mean'][0]:.4f}. Budget: {budget} UNet "
                  "calls per run. Time to the level per seed by linear interpolation between evaluations; "
                  "mean ± std over the seeds that reached it.", "",
                  "| method | steps in budget | UNet calls / step | s / step | test reward at budget | reached | "
                  "steps to level | UNet calls to level | seconds to level | calls speed-up vs K=1 |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for m, v in c["by_method"].items():
            got = [r for r in v["reach"] if r is not None]
            sp, _ = speedup(c, m, "calls")
            lines.append(f"| {label(m)} | {mean_std(v['steps'])} | {v['calls_per_step']:.1f} | {v['seconds_per_step']:.3f} | "
                         f"{mean_std(v['final'], 4)} | {len(got)}/{len(v['reach'])} | "
                         f"{mean_std([r['step'] for r in got])} | {mean_std([r['calls'] for r in got])} | "
                         f"{mean_std([r['time'] for r in got])} | {fmt(sp)} |")
        if len(c["by_method"]) == len(TRAINED):
            lines += ["", "The paper's claims beside this run's numbers:", "",
                      "| the paper says | measured as | here | verdict | rule |", "|---|---|---|---|---|"]
            lines += ["| " + " | ".join(r) + " |" for r in claims(c, cost)]
        lines.append("")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_doc(doc, "\n".join(lines))
    return summary


#### ORCHESTRATION ####

@command(PROG)
def main(argv=None) -> int:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rewards", default=",".join(REWARDS), help="comma list of rewards (default: aesthetic,hps)")
    p.add_argument("--methods", default=",".join(TRAINED), help=f"comma list of {', '.join(TRAINED)} (default: all)")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (default: 0,1,2)")
    p.add_argument("--budget", type=int, help=f"UNet calls per training run (default: {DEFAULT_BUDGET_STEPS} K=1 steps' "
                                             f"worth: {DEFAULT_BUDGET_STEPS} × (DDIM steps + 1))")
    p.add_argument("--evals", type=int, default=DEFAULT_EVALS,
                   help=f"test-reward evaluations per run after the base model (default: {DEFAULT_EVALS})")
    p.add_argument("--cost-rounds", type=int, default=10, help="timed rounds of the side-by-side cost (default: 10)")
    p.add_argument("--jobs", type=int, default=2, help="pieces at once, one CPU thread each (default: 2)")
    p.add_argument("--out", default="out/draft", help="directory of the pieces (default: out/draft)")
    p.add_argument("--doc", default="docs/draft_results.md", help="report (default: docs/draft_results.md)")
    p.add_argument("--train-args", default="", help="extra train.py flags for every run, quoted (default: none)")
    p.add_argument("--quick", action="store_true", help="smoke test: seed 0, 20 K=1 steps' budget, 4 evaluations, "
                   "2 cost rounds, --out out/draft-quick and the report inside it")
    p.add_argument("--report-only", action="store_true", help="run nothing; rewrite --doc from --out")
    p.add_argument("--piece", help=argparse.SUPPRESS)  # reward:config:seed, run by the orchestrator
    p.add_argument("--memory", help=argparse.SUPPRESS)  # config
    args = p.parse_args(argv)
    extra = shlex.split(args.train_args)
    if args.quick:
        args.seeds, args.evals, args.cost_rounds = "0", 4, 2
        args.out = args.out if args.out != "out/draft" else "out/draft-quick"
        args.doc = args.doc if args.doc != "docs/draft_results.md" else f"{args.out}/draft_results.md"
    seeds = ints(p, "--seeds", args.seeds)
    rewards = [r for r in args.rewards.split(",") if r]
    methods = [m for m in args.methods.split(",") if m]
    if not seeds or not rewards or set(rewards) - set(REWARDS):
        p.error(f"--rewards {args.rewards!r} / --seeds {args.seeds!r}: expected a non-empty subset of "
                f"{','.join(REWARDS)} and one or more seeds")
    if K1 not in methods or set(methods) - set(TRAINED):
        p.error(f"--methods {args.methods!r}: expected a subset of {','.join(TRAINED)} that includes {K1}")
    for flag, v in (("--evals", args.evals), ("--cost-rounds", args.cost_rounds), ("--jobs", args.jobs)):
        if v < 1:
            p.error(f"{flag} {v}: must be ≥ 1")
    out, doc = ROOT / args.out, ROOT / args.doc
    if args.budget is None:
        steps = resolve(rewards[0], K1, 0, out, extra).steps
        args.budget = (20 if args.quick else DEFAULT_BUDGET_STEPS) * (steps + 1)
    if args.budget < 1:
        p.error(f"--budget {args.budget}: must be ≥ 1")

    if args.piece:  # one training run, in its own process; --out is its directory
        reward, name, seed = args.piece.split(":")
        run_piece(reward, name, int(seed), out, args.budget, args.evals, extra, args.train_args)
        return 0
    if args.memory:  # one memory probe, in a fresh process; --out is its directory
        run_memory(args.memory, out, extra)
        return 0

    log = logger(PROG)
    t0 = time.time()
    if not args.report_only:
        lock = take_lock(out, p, log)  # one orchestrator per --out: pieces are not train.py runs
        try:
            #### COST, side by side, alone on the machine (before the pool starts) ####
            if not (out / "cost.json").exists():
                log("timing every configuration side by side")
                run_cost(out, [K1] + [n for n in CONFIGS if n != K1], args.cost_rounds, extra)
            #### MEMORY probes and TRAINING runs, --jobs at a time (logs: <out>/logs/<piece>.log) ####
            me = [sys.executable, "-m", "experiments.draft", "--budget", str(args.budget), "--evals", str(args.evals),
                  "--train-args", args.train_args]
            cmds = [[*me, "--memory", n, "--out", f"{args.out}/memory-{n}"] for n in CONFIGS
                    if not (out / f"memory-{n}" / "memory.json").exists()]
            for reward in rewards:
                for seed in seeds:
                    for m in methods:
                        d = out / piece_name(reward, m, seed)
                        if (d / "done.json").exists():
                            done = json.loads((d / "done.json").read_text())
                            ran = {k: done.get(k) for k in ("budget", "evals", "train_args")}
                            if ran != {"budget": args.budget, "evals": args.evals, "train_args": args.train_args}:
                                p.error(f"--out {args.out}: {d.name} was run with {ran}; choose another --out for "
                                        "other settings (or delete that run)")
                            continue
                        shutil.rmtree(d, ignore_errors=True)  # a killed run starts over
                        cmds.append([*me, "--piece", f"{reward}:{m}:{seed}", "--out", f"{args.out}/{d.name}"])
            log(f"{len(cmds)} pieces to run, {args.jobs} at a time")
            run_parallel(cmds, args.jobs, out / "logs", PROG, log)
            before = json.loads((out / "experiment.json").read_text()) if (out / "experiment.json").exists() else {}
            if cmds or not before:  # a resumed run adds its minutes to those of the invocations before it
                timing = {"total_min": round(before.get("total_min", 0) + (time.time() - t0) / 60, 1),
                          "invocations": before.get("invocations", 0) + 1, "date": time.strftime("%Y-%m-%d"),
                          "cpu": f"{os.cpu_count()} CPU cores", "jobs": args.jobs}
                (out / "experiment.json").write_text(json.dumps(timing, indent=1) + "\n")
        finally:
            lock.release()
    timing = json.loads((out / "experiment.json").read_text()) if (out / "experiment.json").exists() else {}
    cfg = resolve(rewards[0], K1, 0, out, extra)
    facts = [f"`{PROG} --rewards {args.rewards} --seeds {args.seeds} --budget {args.budget} --jobs {args.jobs}"
             f"{' --train-args ' + shlex.quote(args.train_args) if args.train_args else ''}` "
             f"({timing.get('date', '?')}; {timing.get('total_min', '?')} min wall on {timing.get('cpu', '?')}, "
             f"{timing.get('jobs', '?')} pieces at a time).",
             f"From the base mini model, every method with batch {cfg.batch[rewards[0]]}, constant lr "
             f"({', '.join(f'{r} {resolve(r, K1, 0, out, extra).lr[r]:g}' for r in rewards)}), AdamW as train.py, "
             f"{cfg.steps} DDIM steps, guidance {cfg.guidance:g}; each run stops once it has spent {args.budget} "
             f"UNet calls (= {args.budget // (cfg.steps + 1)} K=1 steps). Test reward: the {cfg.n_test} held-out "
             "test prompts, one image each, the same noise for every method of a seed. ReFL's training reward is "
             "the reward of its one-step prediction x̂₀ at a random step, not of a finished sample: compare ReFL "
             "on the test reward. Wall time: the seconds of each run's own training steps (evaluation excluded), "
             f"measured while {args.jobs} runs shared the cores with whatever else the machine ran; the "
             "side-by-side table below is the cleaner measure of cost per step."]
    write_report(out, doc, rewards, seeds, args.budget, facts)
    log(f"wrote {doc} in {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
