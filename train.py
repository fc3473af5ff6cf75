"""The RIL runner: fine-tune a text-to-image model on a sequence of rewards, one adapter per task.

    python train.py --tasks aesthetic,hps,compress           # the mini world (CPU-scale, committed)
    python train.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --tasks aesthetic,hps,compress
    torchrun --nproc_per_node=8 train.py --model ... --tasks ...    # data-parallel, same maths as 1 GPU

config.py holds the flags, the run's settings (Config) and their presets (the paper's, the mini world's);
this file runs them: the stage loop, checkpoints, resume. Task k is *stage k*: a fresh LoRA pair joins the
adapter group (older adapters frozen) and is trained on reward k with rid.train_step. The run directory (--out) is what eval.py reads; its layout is described
at the top of checkpoint.py. A stage is finished when run.json lists it. Every --ckpt-every steps the adapter group (with its EMA
teacher), the optimizer and the step are written atomically; --resume continues from there and ends
with bit-identical adapters: every random draw comes from a generator seeded by (seed, stage, step,
process), see seed_of, so the RNG state is a function of the step; the prompt order of epoch e is a
permutation seeded by (seed, e).
Exit codes: 0 done, 2 bad input (one line on stderr), 3 non-finite loss, adapters or samples (the last
good checkpoint stays). One train.py per --out (<out>/.lock); docs/reliability.md lists every failure
handled and its test.
"""
from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import checkpoint
import ddpo
import plots
import rewards
import rid
import surrogate
from checkpoint import reading, write_json
from cli import UsageError
from config import PER_TASK, RUNTIME, SD15, Config, build_parser, micro_plan, resolve, step_config


class NonFiniteLoss(Exception):
    """The loss, the adapters after an update, or the stage's samples went nan/inf: main() exits 3 and
    the last good checkpoint stays (one whose weights gave a finite loss)."""


#### PROMPTS ####

def read_prompts(path: str, flag: str = "--prompts") -> list[str]:
    """A text file (one prompt a line) or a json list of strings or {'prompt'|'caption': ...} objects."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag} {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if path.endswith(".json"):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{flag} {path}: not valid JSON ({e})") from None
        items = items if isinstance(items, list) else []
        prompts = [x if isinstance(x, str) else x.get("prompt") or x.get("caption") if isinstance(x, dict)
                   else None for x in items]
        if any(not isinstance(x, str) for x in prompts):
            raise UsageError(f"{flag} {path}: expected a JSON list of strings or of objects with a "
                             "'prompt' or 'caption' string")
    else:
        prompts = text.splitlines()
    kept = list(dict.fromkeys(p.strip() for p in prompts if p.strip()))  # no duplicates across the split
    if not kept:
        raise UsageError(f"{flag} {path}: no prompts in it (one prompt a line, or a JSON list)")
    empty = sum(not p.strip() for p in prompts)
    if empty or len(kept) + empty < len(prompts):
        log(f"{path}: {len(kept)} prompts kept of {len(prompts)} entries ({empty} empty, "
            f"{len(prompts) - empty - len(kept)} repeated, dropped)")
    return kept


def split_prompts(prompts: list, n_train: int, n_test: int, seed: int) -> tuple[list, list]:
    """Deterministic from the seed: one shuffle, the first n_test held out, the next n_train trained on.
    Short lists keep ≥ 4/5 for training; a 1-prompt list trains on its test prompt."""
    order = list(prompts)
    random.Random(seed).shuffle(order)
    n_test = max(1, min(n_test, len(order) // 5))
    return order[n_test:n_test + n_train] or order, order[:n_test]


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_prompts(train: list, step: int, batch: int, seed: int) -> list:
    """Global batch of optimizer step `step` (0-based): positions step·B … step·B+B−1 of the stream of
    epochs, epoch e visiting the prompts in a permutation seeded by (seed, e)."""
    n = len(train)
    return [train[_epoch_order(n, seed, i // n)[i % n]] for i in range(step * batch, (step + 1) * batch)]


#### RUN DIRECTORY ####

def config_dict(cfg: Config) -> dict:
    return json.loads(json.dumps(asdict(cfg)))  # JSON-normalised (tuples -> lists), as stored


def config_diff(old: dict, new: dict) -> list[str]:
    return [f"{k}: was {old.get(k)!r}, now {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in RUNTIME and old.get(k) != new.get(k)]


def open_run(cfg: Config, resume: bool, world: int = 1) -> tuple[dict, list, list]:
    """Read-only: the run in --out (--resume; settings must match) or a new one. -> (run.json, train, test).
    Nothing is written until the model and the rewards have loaded (create_run)."""
    out = Path(cfg.out)
    run_path = out / "run.json"
    if run_path.exists():
        if not resume:
            raise UsageError(f"--out {out} already holds a run; pass --resume to continue it or choose another --out")
        run = saved_run(out)
        diff = config_diff(run["config"], config_dict(cfg)) + world_diff(run, world)
        if diff:
            raise UsageError(f"--resume: {out} was trained with other settings ({'; '.join(diff)}); these change "
                             "the numbers, so resume with the old values or choose another --out")
        return run, *run_prompts(out, run)
    if cfg.branch_from:
        return branch_run(cfg, world)
    prompts = read_prompts(cfg.prompts)
    if cfg.test_prompts:
        train, test = prompts[:cfg.n_train], read_prompts(cfg.test_prompts, "test prompts")[:cfg.n_test]
    else:
        train, test = split_prompts(prompts, cfg.n_train, cfg.n_test, cfg.seed)
    return new_run(cfg, world), train, test


def new_run(cfg: Config, world: int, stages: list = (), **extra) -> dict:
    """run.json of a new run whose finished stages are `stages`."""
    return {"tasks": cfg.tasks, "method": cfg.method, "model": cfg.model, "reward_spec": cfg.reward_spec,
            "stages": list(stages), "test_prompts": "test_prompts.txt", "train_prompts": "train_prompts.txt",
            "seed": cfg.seed, "world_size": world, "config": config_dict(cfg), **extra}


def saved_run(d: Path) -> dict:
    """run.json of the run in `d`, its config read as today's (runs from before --lr-schedule trained at a
    constant lr, from before --text-encoder-3 loaded every text encoder their model had: auto)."""
    run = checkpoint.read_run(d, need=("config", "stages", "train_prompts", "test_prompts"))
    run["config"].setdefault("lr_schedule", dict.fromkeys(run["config"].get("tasks", []), "constant"))
    run["config"].setdefault("text_encoder_3", "auto")
    for f in fields(ddpo.DDPOConfig):  # runs from before ddpo: its settings at their defaults (only ddpo reads them)
        if f.name.startswith("ddpo_"):
            run["config"].setdefault(f.name, f.default)
    return run


def run_prompts(d: Path, run: dict) -> tuple[list, list]:
    """(train, test) prompts of the run in `d` (paths inside the run only)."""
    return tuple(read_prompts(str(checkpoint.inside(d, run[key], key)), f"{d / 'run.json'} {key}")
                 for key in ("train_prompts", "test_prompts"))


def world_diff(run: dict, world: int) -> list[str]:
    """The world size as a config_diff line (runs from before it was recorded: not checked)."""
    return [] if run.get("world_size", world) == world else [f"world size: was {run['world_size']} process(es), now {world}"]


def branch_run(cfg: Config, world: int) -> tuple[dict, list, list]:
    """--branch-from: the new run's run.json listing the source run's finished stages that this run shares
    (the longest prefix of --tasks it finished), and the source's prompt split. Every setting but the later
    tasks' must match: stage k's random draws depend on (seed, k), never on the tasks after it, so the shared
    stages are exactly what this run would train. create_run copies them."""
    src = Path(cfg.branch_from)
    flag = f"--branch-from {cfg.branch_from}"
    with reading(src / "run.json"):
        info = saved_run(src)
    old = info["config"]
    old_tasks, done = old.get("tasks") or [], info["stages"]
    shared = 0
    while (shared < min(len(old_tasks), len(cfg.tasks)) and old_tasks[shared] == cfg.tasks[shared]
           and f"stage{shared + 1}-{cfg.tasks[shared]}" in done):
        shared += 1
    if not shared:
        raise UsageError(f"{flag}: none of its finished stages ({', '.join(done) or 'none'}) begins --tasks "
                         f"{','.join(cfg.tasks)}; nothing to share")
    keep = cfg.tasks[:shared]
    def settings(c: dict) -> dict:  # what the shared stages depend on
        c = {k: v for k, v in c.items() if k not in ("tasks", *RUNTIME)}
        for key in PER_TASK:
            c[key] = {t: (c.get(key) or {}).get(t) for t in keep}
        if not any(surrogate.is_black_box(t) for t in keep):
            c.pop("surrogate", None)  # only black-box stages read it
        return c
    diff = config_diff(settings(old), settings(config_dict(cfg))) + world_diff(info, world)
    if diff:
        raise UsageError(f"{flag}: trained with other settings ({'; '.join(diff)}); its stages are not this "
                         "run's, so match them or drop --branch-from")
    stages = [f"stage{k}-{t}" for k, t in enumerate(keep, 1)]
    return new_run(cfg, world, stages, branched_from={"run": str(src), "stages": stages}), *run_prompts(src, info)


def create_run(cfg: Config, run: dict, train: list, test: list) -> None:
    """Rank 0 writes the prompt split and run.json of a new run (a branch's shared stages first: copied
    whole, checked against their checksums, then renamed into place; run.json, written last, makes them count)."""
    out = Path(cfg.out)
    if _rank() == 0 and not (out / "run.json").exists():
        if run.get("branched_from"):
            src = Path(run["branched_from"]["run"])
            out.mkdir(parents=True, exist_ok=True)
            for name in run["branched_from"]["stages"]:
                tmp = out / f".{name}.tmp"  # remove_stale_temps' pattern: a kill mid-copy leaves nothing
                shutil.rmtree(tmp, ignore_errors=True)
                try:
                    with reading(src / name), bad_input():
                        shutil.copytree(src / name, tmp, ignore=shutil.ignore_patterns("ckpt*", ".*.tmp"))
                        checkpoint.verify(tmp)
                except UsageError:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                shutil.rmtree(out / name, ignore_errors=True)
                os.replace(tmp, out / name)
            log(f"branched from {src}: copied {', '.join(run['branched_from']['stages'])}")
        checkpoint.atomic_write(out / "train_prompts.txt", "\n".join(train) + "\n")
        checkpoint.atomic_write(out / "test_prompts.txt", "\n".join(test) + "\n")
        write_json(out / "run.json", run)


def seed_of(seed: int, stage: int, purpose: int, step: int = 0, rank: int = 0) -> int:
    """A 32-bit seed for one purpose at one step of one stage on one process. Every random draw of
    training comes from a generator seeded this way, so the RNG state is a function of the step and a
    checkpoint needs no generator states: resume is bit-exact for any world size."""
    return int(np.random.SeedSequence([seed, stage, purpose, step, rank]).generate_state(1)[0])


INIT, NOISE, METHOD, GLOBAL, SURROGATE = range(5)  # seed_of purposes


def save_grid(images: torch.Tensor, path: Path, ncol: int = 4) -> None:
    """images (B, 3, H, W) in [0, 1] -> one PNG, ncol per row."""
    imgs = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()  # (B, 3, H, W)
    b, _, h, w = imgs.shape
    ncol = min(ncol, b)
    grid = torch.zeros(3, math.ceil(b / ncol) * h, ncol * w, dtype=torch.uint8)
    for i, img in enumerate(imgs):
        r, c = divmod(i, ncol)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    checkpoint.atomic_write(path, lambda tmp: Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG"))


#### TRAINING ####

def log(msg: str) -> None:
    if _rank() == 0:
        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _mean_across_ranks(logs: dict, device) -> dict:
    """Average the step's logged floats over processes (each saw its shard); grad_norm is already global."""
    if not dist.is_initialized():
        return logs
    keys = sorted(logs)
    t = torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64, device=device)  # NCCL: on the GPU
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))


def reward_fn(task: str, cfg: Config):
    """The task's reward; loaded now so missing weights fail before hours of training, not after."""
    if surrogate.is_black_box(task):  # the true reward; train_stage wraps it in its surrogate
        return surrogate.black_box(task)
    spec = rewards.load_spec(cfg.reward_spec)
    return rewards.joint(cfg.joint, spec, cfg.device) if task == "joint" else rewards.get(task, spec, cfg.device)


def lr_at(peak: float, step: int, total: int, schedule: str) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total`: constant, or half a cosine from
    the peak at step 0 towards 0 (step total−1 still moves a little). Set before every step, so a resumed
    task continues on the same curve."""
    if schedule == "constant":
        return peak
    return peak * 0.5 * (1.0 + math.cos(math.pi * step / total))


def stage_steps(cfg: Config, task: str, n_train: int) -> int:
    """Optimizer steps of a task: its epochs over the training prompts at its batch, capped by --max-steps."""
    total = -(-cfg.epochs[task] * n_train // cfg.batch[task])  # ceil, in integers (no float overflow)
    return total if cfg.max_steps is None else min(total, cfg.max_steps)


def _stage_start(k: int, models, group, cfg: Config):
    """The adapter group as stage k starts, before its own adapter joins: the previous stage's (in memory,
    or read back from its directory after a restart), or an empty group for stage 1."""
    if group is not None:
        return group
    if k == 1:
        group = rid.group_of(models.unet)  # a failed checkpoint load may have filled it
        if group is None:
            return rid.inject(models.unet, rank=cfg.rank)
        group.clear()
        return group
    with bad_input():  # the finished stages' adapters (checksum verified)
        return checkpoint.load(models.unet, Path(cfg.out) / f"stage{k - 1}-{cfg.tasks[k - 2]}")


def _resume_from(ckpt: Path, k: int, models, cfg: Config, total: int):
    """-> (group, optimizer, trainer state: {"step", "optimizer", ddpo's "tracker"}) from a mid-task checkpoint;
    UsageError when anything in it is unreadable or does not belong to this stage."""
    state = checkpoint.load_trainer(ckpt)
    if cfg.method == "ddpo" and not isinstance(state.get("tracker"), dict):
        raise UsageError(f"{ckpt / 'trainer.pt'}: no ddpo reward statistics ('tracker') in it")
    with bad_input():
        group = checkpoint.load(models.unet, ckpt)
    if group.tasks != cfg.tasks[:k] or not group.trainable:
        raise UsageError(f"{ckpt}: holds tasks {group.tasks} (trainable: {group.trainable}); stage {k} "
                         f"trains {cfg.tasks[k - 1]!r} after {cfg.tasks[:k - 1]}")
    if not state["step"] < total:
        raise UsageError(f"{ckpt / 'trainer.pt'}: step {state['step']} is not in [1, {total - 1}]")
    optimizer = _optimizer(group, cfg, cfg.tasks[k - 1])
    with reading(ckpt / "trainer.pt"):
        for entry in state["optimizer"]["state"].values():  # load_state_dict checks no tensor shape
            for name, t in entry.items():
                if t.dim() and t.shape != group.flat.shape:
                    raise ValueError(f"optimizer {name} has shape {tuple(t.shape)}, the adapters "
                                     f"{tuple(group.flat.shape)}")
        optimizer.load_state_dict(state["optimizer"])
    return group, optimizer, state


def _optimizer(group, cfg: Config, task: str) -> torch.optim.AdamW:
    return torch.optim.AdamW([group.flat], lr=cfg.lr[task], betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def _finite(group, step_cfg) -> bool:
    """The trainable adapters (and RID's EMA teacher) hold no nan/inf: one reduction each, one sync."""
    ok = torch.isfinite(group.flat).all()
    if step_cfg.method == "rid":
        ok = ok & torch.isfinite(group.ema).all()
    return bool(ok)


def _surrogate_state(ckpt: Path) -> dict:
    """A mid-task checkpoint's surrogate (surrogate.pt); UsageError when it is missing or unreadable."""
    with reading(ckpt / "surrogate.pt"), bad_input():
        state = torch.load(ckpt / "surrogate.pt", map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not {"head", "opt", "stats", "gen", "buf", "held"} <= set(state):
            raise ValueError("not a surrogate state (keys head, opt, stats, gen, buf, held)")
    return state


SURROGATE_HELD_OUT = (16, 2)  # held-out test prompts × samples each of the stage-end surrogate check


def _surrogate_task(k: int, task: str, fn, models, train: list, cfg: Config, state: dict | None):
    """The black-box task's surrogate: restored from a checkpoint's state, or pre-trained now on samples
    of the model as the stage starts (its new adapter is still zero: the previous stage's model)."""
    sur_cfg = surrogate.SurrogateConfig(**cfg.surrogate)
    box = surrogate.SurrogateTask(task, fn, models, train, sur_cfg, seed=seed_of(cfg.seed, k, SURROGATE))
    if state is not None:
        with bad_input():
            box.load_state_dict(state)
        return box
    t0 = time.time()
    explored = box.explored(torch.Generator().manual_seed(seed_of(cfg.seed, k, SURROGATE, 1)))
    noise = torch.randn((len(explored) * sur_cfg.pretrain_noises, *models.latent_shape),
                        generator=torch.Generator().manual_seed(seed_of(cfg.seed, k, SURROGATE, 2)))
    with bad_input():
        logs = box.pretrain(explored, noise, cfg.steps, cfg.guidance, kind=cfg.sampler)
    log(f"stage {k} {task}: surrogate pre-trained on {logs['pretrain_samples']} samples of {len(explored)} prompts "
        f"in {time.time() - t0:.0f} s (held-out pair accuracy {logs['pair_acc']:.3f})")
    if _rank() == 0:
        sdir = Path(cfg.out) / f"stage{k}-{task}"
        sdir.mkdir(parents=True, exist_ok=True)
        write_json(sdir / "surrogate_pretrain.json", {**logs, "seconds": round(time.time() - t0, 3)})
    return box


def _surrogate_report(k: int, box, sdir: Path, test: list, models, cfg: Config) -> None:
    n, reps = SURROGATE_HELD_OUT
    shown = test[:n]
    noise = torch.randn((len(shown) * reps, *models.latent_shape),
                        generator=torch.Generator().manual_seed(seed_of(cfg.seed, k, SURROGATE, 3)))
    with bad_input():
        final = box.heldout(shown, noise, cfg.steps, cfg.guidance, reps, kind=cfg.sampler)
    pre = sdir / "surrogate_pretrain.json"
    write_json(sdir / "surrogate.json", {"task": box.task, "held_out_prompts": len(shown), "samples_each": reps,
                                          "final": final, "pretrain": json.loads(pre.read_text()) if pre.exists() else None,
                                          "config": box.sur.cfg.__dict__})
    log(f"stage {k} {box.task}: surrogate on held-out prompts: pair accuracy {final['pair_acc']:.3f}, "
        f"Kendall τ {final['kendall_tau']:.3f}, true reward {final['true_reward']:.4g}")


def train_stage(k: int, task: str, models, group, reward, train: list, test: list, cfg: Config,
                step_cfg, world: int, tb=None):
    """Stage k: add the task's adapter to the group and train it; returns the group."""
    out = Path(cfg.out)
    sdir = out / f"stage{k}-{task}"
    rank = _rank()
    batch, lr = cfg.batch[task], cfg.lr[task]
    micro, accum = micro_plan(cfg, task, world)
    total = stage_steps(cfg, task, len(train))
    offset = sum(stage_steps(cfg, t, len(train)) for t in cfg.tasks[:k - 1])  # steps of the earlier stages
    stage_cfg = {**config_dict(cfg), "stage": k, "task": task, "total_steps": total, "world_size": world,
                 "micro_batch_resolved": micro, "grad_accum_resolved": accum}

    #### RESUME: the newest readable checkpoint (ckpt/, then ckpt.old/), else the stage's start ####
    start, optimizer, saved, box_state, state = 0, None, None, None, {}  # saved: the newest checkpoint's step
    lasro = surrogate.is_black_box(task) and cfg.method != "ddpo"  # ddpo calls the black box itself
    for ckpt in checkpoint.ckpt_candidates(sdir):
        try:
            group, optimizer, state = _resume_from(ckpt, k, models, cfg, total)
            start = state["step"]
            box_state = _surrogate_state(ckpt) if lasro else None
            saved = start
            log(f"stage {k} {task}: resuming at step {start}/{total} from {ckpt}")
            break
        except UsageError as e:
            rest = [p for p in checkpoint.ckpt_candidates(sdir) if p != ckpt]
            aside = ckpt.with_name(ckpt.name + ".unreadable")  # kept for a look until the stage ends
            log(f"stage {k} {task}: skipping checkpoint {ckpt} ({e}); moved to {aside}; "
                f"{f'trying {rest[0]}' if rest else 'starting the stage over'}")
            if dist.is_initialized():
                dist.barrier()  # every process is done reading it
            if rank == 0:
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(ckpt, aside)
            group = None  # the failed load emptied the UNet's group: rebuild the stage's start
    if optimizer is None:
        group = _stage_start(k, models, group, cfg)
        init = torch.Generator(models.device).manual_seed(seed_of(cfg.seed, k, INIT))
        group.add_task(task, generator=init)  # the new adapter's LoRA init
        optimizer = _optimizer(group, cfg, task)
    box = tracker = None
    if lasro:  # LaSRO: the method maximises the black box's latent surrogate
        box = reward = _surrogate_task(k, task, reward, models, train, cfg, box_state)
    if cfg.method == "ddpo":  # the reward's own value, never its gradient: a black box scores the decoded images
        if surrogate.is_black_box(task):
            reward = functools.partial(surrogate.true_scores, task, reward)
        tracker = ddpo.PerPromptStatTracker(cfg.ddpo_buffer, cfg.ddpo_min_count)  # a new reward, new statistics
        if "tracker" in state:
            tracker.load_state_dict(state["tracker"])

    metrics, elapsed = sdir / "metrics.jsonl", 0.0  # elapsed: stage time before a resume
    if rank == 0:
        sdir.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_stale_temps(sdir)  # a killed checkpoint write's temp dir (we hold the lock)
        write_json(sdir / "config.json", stage_cfg)
        rows = checkpoint.read_metrics(metrics, log) if start and metrics.exists() else []
        rows = [r for r in rows if r["step"] <= start]  # drop steps logged after the checkpoint
        checkpoint.atomic_write(metrics, "".join(json.dumps(r) + "\n" for r in rows))
        elapsed = rows[-1]["time"] if rows else 0.0

    def save_ckpt(step):
        def write(tmp):
            checkpoint.save(group, tmp, extra={"task": task, "stage": k, "step": step})
            torch.save({"step": step, "optimizer": optimizer.state_dict(),
                        **({"tracker": tracker.state_dict()} if tracker is not None else {})}, tmp / "trainer.pt")
            if box is not None:
                torch.save(box.state_dict(), tmp / "surrogate.pt")
            write_json(tmp / "config.json", stage_cfg)
        if rank == 0:  # the replaced checkpoint stays as ckpt.old until this one has proved good
            checkpoint.save_dir_atomic(sdir / "ckpt", write, keep_old=True)

    def stop(what: str, from_saved: bool = False):
        """from_saved: the newest checkpoint holds exactly the weights `what` was computed from."""
        bar.close()  # the error goes on a line of its own
        found = checkpoint.ckpt_candidates(sdir)
        where = f"Last good checkpoint: {found[0] if found else 'none, the stage starts over'}"
        if from_saved and found:
            where = (f"The last checkpoint, {found[0]} (step {saved}), holds the weights this was computed "
                     f"from; the one before it: {found[1] if len(found) > 1 else 'none'}")
        return NonFiniteLoss(f"{what} at stage {k} ({task}); adapters not saved. {where}. "
                             f"Try a lower --lr {task}=... in a new --out")

    t0 = time.time()
    bar = tqdm(total=total, initial=start, desc=f"stage {k}/{len(cfg.tasks)} {task}", disable=rank != 0,
               dynamic_ncols=True)
    lo, hi = rank * (batch // world), (rank + 1) * (batch // world)  # this process's shard of the batch
    for step in range(start, total):
        #### ONE OPTIMIZER STEP (ddpo: one round of sampling and updates) ####
        # Seeds from (seed, stage, step): noise for the whole global batch (any world size gives each
        # prompt the same noise), the method's own draws (refl's step, draft-lv's re-noising) and the
        # global RNGs per process (whatever else draws from them).
        g = seed_of(cfg.seed, k, GLOBAL, step, rank)
        torch.manual_seed(g), random.seed(g), np.random.seed(g)
        prompts = batch_prompts(train, step, batch, cfg.seed)[lo:hi]
        noise = torch.randn((batch, *models.latent_shape),
                            generator=torch.Generator().manual_seed(seed_of(cfg.seed, k, NOISE, step)))
        noise = noise[lo:hi].to(models.device)  # (B / world, C, h, w)
        micro_batches = [(prompts[i:i + micro], noise[i:i + micro]) for i in range(0, len(prompts), micro)]
        method_gen = torch.Generator(models.device).manual_seed(seed_of(cfg.seed, k, METHOD, step, rank))
        lr_now = lr_at(lr, step, total, cfg.lr_schedule.get(task, "constant"))
        for pg in optimizer.param_groups:
            pg["lr"] = lr_now
        if tracker is not None:  # ddpo: one round, sampling and its inner epochs of updates
            with bad_input():  # a user's black box failing mid-run: one line, exit 2, checkpoints kept
                logs = ddpo.train_round(models, group, reward, micro_batches, optimizer, step_cfg, tracker,
                                        clip_grad=cfg.clip_grad, generator=method_gen)
        else:
            logs = rid.train_step(models, group, reward, micro_batches, optimizer, step_cfg,
                                  clip_grad=cfg.clip_grad, generator=method_gen)
        if box is not None:  # the step's samples → the true reward → the surrogate's buffer (and an adaptation)
            with bad_input():  # a user's black box failing mid-run: one line, exit 2, checkpoints kept
                logs.update(box.after_step())
        logs = _mean_across_ranks({k_: float(v) for k_, v in logs.items()}, models.device)
        #### FINITE CHECKS, before anything is saved ####
        if not math.isfinite(logs["loss"]):  # computed from the weights after `step` updates
            raise stop(f"loss is {logs['loss']} at step {step + 1}", from_saved=saved == step)
        if not _finite(group, step_cfg):
            raise stop(f"the update of step {step + 1} made the adapters non-finite (grad norm "
                       f"{logs['grad_norm']:.4g}, lr {lr_now:g})")
        if rank == 0:
            row = {"step": step + 1, "epoch": step * batch // len(train), **logs, "lr": lr_now,
                   "time": round(elapsed + time.time() - t0, 3)}
            with open(metrics, "a") as f:
                f.write(json.dumps(row) + "\n")
            if tb is not None:
                tb.scalars(f"stage{k}-{task}", offset + step + 1, row)
        bar.update(1)
        bar.set_postfix(reward=f"{logs['reward']:.4g}", loss=f"{logs['loss']:.4g}")
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < total:
            save_ckpt(step + 1)
            saved = step + 1  # the one it replaced stays as ckpt.old
    bar.close()

    #### STAGE END: samples, adapters, run.json (the stage counts as finished from here) ####
    if rank == 0:
        gen = torch.Generator().manual_seed(cfg.seed)
        shown = test[:cfg.n_samples]
        noise = torch.randn((len(shown), *models.latent_shape), generator=gen).to(models.device)
        images = rid.sample(models, shown, noise, steps=cfg.steps, guidance=cfg.guidance, group=group,
                            sampler=cfg.sampler, generator=gen)  # a stochastic sampler (LCM) draws after the noise
        if not torch.isfinite(images).all():  # the last update's weights, never run forward in training
            raise stop(f"the samples after the last step ({total}) are non-finite")
        save_grid(images, sdir / "samples.png")
        if box is not None:  # the surrogate against the true reward on held-out prompts, the final model's samples
            _surrogate_report(k, box, sdir, test, models, cfg)
        checkpoint.save(group, sdir, extra={"task": task, "stage": k, "step": total, "config": stage_cfg})
        checkpoint.write_stage_lora(group, models, sdir)  # pipe.load_lora_weights(sdir); kohya for ComfyUI/A1111
        run_path = out / "run.json"
        run = checkpoint.read_run(out, need=("stages",))
        run["stages"] = [s for s in run["stages"] if s != sdir.name] + [sdir.name]
        write_json(run_path, run)
        checkpoint.remove_ckpts(sdir)
        plots.training_figure(out, out / "training.png")  # every stage so far, continuous across resumes
        if tb is not None:
            tb.image(f"stage{k}-{task}/samples", offset + total, sdir / "samples.png")
        rows = checkpoint.read_metrics(metrics)
        if rows:
            n = max(1, min(10, len(rows) // 10))
            r0, r1 = (sum(r["reward"] for r in part) / len(part) for part in (rows[:n], rows[-n:]))
            log(f"stage {k}/{len(cfg.tasks)} {task}: reward {r0:.4g} -> {r1:.4g} ({r1 - r0:+.3g}) over "
                f"{total} steps in {elapsed + time.time() - t0:.0f} s")
    if dist.is_initialized():
        dist.barrier()
    return group


@contextmanager
def bad_input():
    """Library errors at the CLI boundary (rid/rewards ValueError, unreadable files) -> UsageError."""
    try:
        yield
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None


def adopt_micro_batch(cfg: Config, resume: bool) -> None:
    """--micro-batch auto on a run that continues another (--resume, --branch-from): the micro-batch it was
    planned with, since it sets the order the gradient sums in (the numbers) and this GPU may differ."""
    if cfg.micro_batch != "auto":
        return
    src = Path(cfg.out) if resume and (Path(cfg.out) / "run.json").exists() else \
        Path(cfg.branch_from) if cfg.branch_from else None
    if src is not None:
        old = saved_run(src)["config"]
        cfg.micro_batch, cfg.grad_accum = old.get("micro_batch"), old.get("grad_accum")
        log(f"--micro-batch auto: {cfg.micro_batch or f'--grad-accum {cfg.grad_accum}'}, as {src} was trained")


def _plan_stand_in(images, prompts):
    """ddpo's reward in the memory plan: any differentiable one (the planned step is an upper bound)."""
    return images.mean((1, 2, 3))


def plan_micro_batch(cfg: Config, models, reward_fns: dict, world: int, free=None) -> int:
    """--micro-batch auto: the largest micro-batch whose training step fits the free memory of the device
    (memplan's fake-tensor model of the loaded architecture, per task's reward, 15 % kept free; the model
    behind docs/sd15_memory.md) and divides every task's batch per process. Sets cfg.micro_batch; UsageError
    when not even 1 fits."""
    import memplan

    step_cfg = step_config(cfg)
    budget = memplan.free_bytes(cfg.device) if free is None else free
    per_rank = {t: cfg.batch[t] // world for t in cfg.tasks}
    top, need = None, None
    for task in cfg.tasks:
        method, fn = cfg.method, reward_fns[task]
        if method == "ddpo":  # one UNet call with gradient, the reward never differentiated (black boxes too):
            method, fn = "baseline", _plan_stand_in  # the baseline's step, its decode and reward backward, is larger
        elif surrogate.is_black_box(task):  # scored on latents: no VAE decode with gradient, less than any other
            continue
        p = memplan.plan_micro_batch(models, fn, method, budget, steps=cfg.steps,
                                     truncate=step_cfg.truncate, checkpointing=cfg.gradient_checkpointing,
                                     rank=cfg.rank, frozen_tasks=len(cfg.tasks) - 1)
        if top is None or p["top"] < top:
            top, need = p["top"], p
    if top is None:  # black-box tasks only
        top = max(per_rank.values())
    micro = max((d for d in range(1, min(top, max(per_rank.values())) + 1) if all(b % d == 0 for b in per_rank.values())), default=0)
    gib = 2 ** 30
    if micro == 0:
        raise UsageError(f"--micro-batch auto: not even 1 sample fits {cfg.device}: a step needs "
                         f"{(need['fixed'] + need['per_sample']) / gib:.1f} GiB beyond the loaded weights, "
                         f"{need['usable'] / gib:.1f} GiB of the {budget / gib:.1f} GiB free is usable (15 % kept "
                         "free); try --dtype bf16, a smaller --resolution, --gradient-checkpointing, or a larger GPU")
    if dist.is_initialized():  # every process the same micro-batch: the smallest any GPU can take
        t = torch.tensor([micro], device=models.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        micro = int(t.item())
    cfg.micro_batch = micro
    how = (f"{need['fixed'] / gib:.2f} GiB + {need['per_sample'] / gib:.2f} GiB per sample beyond the weights, "
           f"{need['usable'] / gib:.1f} of {budget / gib:.1f} GiB free usable" if need else "black-box tasks only")
    log(f"--micro-batch auto: {micro} ({how}; largest that fits {top if need else '-'}, "
        f"a divisor of the batch per process {sorted(set(per_rank.values()))})")
    return micro


def run(cfg: Config, is_mini: bool, model_given: bool, resume: bool, world: int) -> None:
    lock = checkpoint.RunLock(Path(cfg.out), log=log) if _rank() == 0 else None  # before anything is read
    try:
        if lock is not None:
            checkpoint.remove_stale_temps(Path(cfg.out))  # what a killed run's atomic writes left
        _run(cfg, is_mini, model_given, resume, world)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: Config, is_mini: bool, model_given: bool, resume: bool, world: int) -> None:
    if is_mini:
        log(f"{'no --model given: ' * (not model_given)}training in the mini world ({cfg.model}, CPU-scale); "
            f"for the paper's setting pass --model {SD15}")
    #### SET-UP: everything that can fail on bad input fails here, before hours of training ####
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' per-load "Loading weights" bar ...
    enable_progress_bars()  # ... but keep the hub's download bars (SD-1.5's first download takes minutes)
    black = [t for t in cfg.tasks if surrogate.is_black_box(t)]
    if black and world > 1:
        raise UsageError(f"black-box task(s) {black} train on one process only (each would fit its own "
                         f"surrogate); run without torchrun, WORLD_SIZE is {world}")
    with bad_input():
        adopt_micro_batch(cfg, resume)
        run_info, train, test = open_run(cfg, resume, world)
        step_cfg = step_config(cfg)
        for task in cfg.tasks:
            if cfg.micro_batch != "auto":
                micro_plan(cfg, task, world)
    with reading(f"--model {cfg.model}"), bad_input():  # a weight file in it may be truncated or garbage
        models = rid.load_models(cfg.model, device=cfg.device,
                                 dtype=torch.bfloat16 if cfg.dtype == "bf16" else torch.float32,
                                 text_encoder_3=cfg.text_encoder_3, name=lambda option: "--" + option.replace("_", "-"))
        if cfg.dtype == "bf16" and models.vae.config.get("force_upcast", False):
            models.vae.to(torch.float32)  # rid.decode casts the latents to the VAE's dtype
    with bad_input():
        models.set_resolution(cfg.resolution, "--resolution")
        if cfg.method == "ddpo":  # its sampler must have a stochastic step to be a policy
            ddpo.policy_steps(models.sampler(cfg.steps, cfg.sampler), cfg.steps, cfg.ddpo_eta)
    reward_fns = {}
    for task in cfg.tasks:  # all weights, up front
        spec = f" (reward spec {cfg.reward_spec})" if cfg.reward_spec else ""
        with reading(f"reward {task!r}{spec}: its weights"), bad_input():
            reward_fns[task] = reward_fn(task, cfg)
    with bad_input():
        if cfg.report_to == "tensorboard":
            plots.TensorBoardLogger.writer_class()  # fails here, with one line, when tensorboard is missing
    if cfg.micro_batch == "auto":
        with bad_input():
            plan_micro_batch(cfg, models, reward_fns, world)
        run_info["config"] = config_dict(cfg)
    if dist.is_initialized():  # every rank has looked at --out before rank 0 writes to it
        dist.barrier()
    create_run(cfg, run_info, train, test)
    tb = plots.TensorBoardLogger(Path(cfg.out) / "tensorboard") if cfg.report_to == "tensorboard" and _rank() == 0 else None
    log(f"{cfg.method} on {','.join(cfg.tasks)}: {len(train)} train / {len(test)} test prompts, "
        f"world size {world}, device {cfg.device}, out {cfg.out}")

    #### STAGES ####
    group, done = None, run_info["stages"]
    for k, task in enumerate(cfg.tasks, 1):
        if f"stage{k}-{task}" in done:  # done only if its adapters are still what was saved
            checkpoint.verify(Path(cfg.out) / f"stage{k}-{task}")
            if _rank() == 0:  # a crash between run.json and the clean-up leaves them
                checkpoint.remove_ckpts(Path(cfg.out) / f"stage{k}-{task}")
            continue
        group = train_stage(k, task, models, group, reward_fns[task], train, test, cfg, step_cfg, world, tb)
    if tb is not None:
        tb.close()
    log(f"done: {cfg.out} holds {len(cfg.tasks)} stage(s); evaluate with: python eval.py --ckpt {cfg.out}")


def main(argv=None) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        args = build_parser(__doc__).parse_args(argv)
        cfg, is_mini = resolve(args)
        if cfg.method == "ddpo" and world > 1:
            raise UsageError(f"--method ddpo trains on one process only for now (its advantages would need every "
                             f"process's rewards); run without torchrun, WORLD_SIZE is {world}")
        if world > 1:
            if cfg.device.startswith("cuda"):
                cfg.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
                torch.cuda.set_device(cfg.device)
            dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
        run(cfg, is_mini, args.model is not None, args.resume, world)
    except UsageError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
