"""The RIL runner: fine-tune a text-to-image model on a sequence of rewards, one adapter per task.

    python train.py --tasks aesthetic,hps,compress           # the mini world (CPU-scale, committed)
    python train.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --tasks aesthetic,hps,compress
    torchrun --nproc_per_node=8 train.py --model ... --tasks ...    # data-parallel, same maths as 1 GPU

Task k is *stage k*: a fresh LoRA pair joins the adapter group (older adapters frozen) and is trained on
reward k with rid.train_step. The run directory (--out) is what eval.py reads; its layout is described
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

import argparse
import functools
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import checkpoint
import ddpo
import mini
import plots
import rewards
import rid
import surrogate
from checkpoint import UsageError, reading, write_json

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"

# The paper's appendix. An epoch is one pass over the training prompts. clip is no task of the paper
# (R0 trains on it inside a joint reward): it gets aesthetic's schedule.
PAPER_EPOCHS = {"aesthetic": 10, "hps": 120, "compress": 15, "clip": 10}
PAPER_RID = {"batch": 8, "lr": 5e-5}
PAPER_BASELINE = {"batch": 128, "lr": 1e-3}  # the baseline; the DRaFT family (draft-k/draft/draft-lv/refl) too
# R0 (seed 003) publishes no code nor schedule: its K = 4 steps, and RID's batch and lr as our choice.
R0_STEPS = 4
PAPER_R0 = {"batch": 8, "lr": 5e-5}
# DDPO (ddpo-pytorch's SD-1.5 runs, config/dgx.py): 256 samples per round (--batch), 4 updates of 64 each
# (--ddpo-minibatches), lr 3e-4 on its LoRA.
PAPER_DDPO = {"batch": 256, "lr": 3e-4}
# The mini world's schedule (CPU scale): the paper's task order, sized so RID + baseline over all three
# tasks plus eval.py fit in 20 min on 2 CPU cores. Every method gets batch 8 and the same epochs. As in
# the paper, RID and the baseline have their own hps lr: each the schedule under which it gains HPS in
# every seed (docs/mini_results.md's notes give every schedule tried).
MINI_EPOCHS = {"aesthetic": 1, "hps": 3, "compress": 1, "clip": 1}
MINI_LR = {"aesthetic": 1e-3, "hps": 7e-4, "compress": 1e-3, "clip": 1e-3}
MINI_LR_SCHEDULE = {"aesthetic": "constant", "hps": "cosine", "compress": "constant", "clip": "constant"}
# R0 in the mini world: every task of an r0 run, K = R0_STEPS (docs/r0_results.md's notes say why).
MINI_R0 = {"epochs": 4, "lr": 5e-4, "lr_schedule": "cosine"}
MINI_RID = {"lr": {**MINI_LR, "hps": 5e-4}, "lr_schedule": {**MINI_LR_SCHEDULE, "hps": "constant"}}
MINI_BATCH = 8
# A black-box task (jpeg-kb, png-kb, a plugin) takes compress's schedule, in the paper's and the mini
# world's presets alike. Its surrogate in the mini world: pre-training on 64 prompts × 4 noises (about
# a fifth of a 1-epoch task's samples), and pairs of any two samples, since in a 1-epoch task a
# prompt's online samples never meet another sample of the same prompt (docs/lasro_results.md).
BLACK_BOX_LIKE = "compress"
MINI_SURROGATE = {"pretrain_prompts": 64, "pretrain_noises": 4, "pretrain_steps": 150, "pair_batch": 16, "pairs": "any"}
LR_SCHEDULES = ("constant", "cosine")

# The paper's prompts (seed 000's appendix): HPD v2's "photo" style split 750 train / 50 test exactly as
# AlignProp ships it (data/paper_prompts/NOTICE.md: origin and MIT licence). The train file has 752 lines:
# AlignProp reads its 2 empty lines as prompts; rid drops them (an empty prompt is the unconditional
# branch of CFG, not a caption) and says so in the log. The default for every model but the mini world.
PAPER_PROMPTS = Path(__file__).resolve().parent / "data" / "paper_prompts"
PAPER_TRAIN, PAPER_TEST = PAPER_PROMPTS / "hps_v2_all.txt", PAPER_PROMPTS / "hps_v2_all_eval.txt"
# Simple animal prompts in DDPO's style ("a photo of a <animal>"): bench.py's end-to-end prompts.
ANIMALS = ("cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox "
           "wolf lizard beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog "
           "chicken duck goose bee pig turkey fly llama camel bat gorilla hedgehog kangaroo").split()

class NonFiniteLoss(Exception):
    """The loss, the adapters after an update, or the stage's samples went nan/inf: main() exits 3 and
    the last good checkpoint stays (one whose weights gave a finite loss)."""


#### CONFIG ####

@dataclass
class Config(ddpo.DDPOConfig):
    """The run's settings. The method's knobs (method, steps, guidance, lam, ema, truncate, lv_n, refl_m,
    distill_space, gradient_checkpointing, eta_range, lam_w, raw_grads, r0_plus) are rid.StepConfig's fields,
    DDPO's (ddpo_*) ddpo.DDPOConfig's, declared there once with their help and range; the CLI flags for them
    are derived from those declarations (build_parser)."""
    # -- the task sequence --
    tasks: list = field(default_factory=lambda: list(rewards.REWARDS))  # stage order; ["joint"] with --joint
    joint: dict | None = None  # {reward: weight}: ONE task "joint" rewarded by Σ w·R (paper: 0.01/2/1)
    # -- what is trained, on what --
    model: str = SD15          # diffusers directory or hub id (the mini-world preset points at mini/)
    reward_spec: str | None = None  # rewards.load_spec JSON saying where reward weights live; None: SD's
    prompts: str = str(PAPER_TRAIN)  # prompt file (txt one a line, or HPD json); the paper's 750 by default
    test_prompts: str | None = str(PAPER_TEST)  # fixed held-out prompt file; None: split off `prompts`
    n_train: int = 750         # training prompts kept after the split (paper: 750 HPD "photo")
    n_test: int = 50           # held-out prompts eval.py scores (paper: 50)
    rank: int = 4              # LoRA rank of each task's adapter
    # -- schedule, per task (paper() fills them; --epochs/--lr/--lr-schedule/--batch override) --
    epochs: dict = field(default_factory=dict)  # {task: passes over the training prompts}
    lr: dict = field(default_factory=dict)      # {task: AdamW learning rate (the peak, under cosine)}
    lr_schedule: dict = field(default_factory=dict)  # {task: "constant" | "cosine" (decay to 0 over the task)}
    batch: dict = field(default_factory=dict)   # {task: global batch = prompts per optimizer step}
    max_steps: int | None = None  # cap on optimizer steps per task (smoke runs); None: the epochs decide
    # -- optimizer: AdamW over group.flat only --
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.1  # DRaFT's value; decoupled, so at lr 5e-5 a weight shrinks 5e-6 per step
    clip_grad: float = 1.0     # max global grad norm (DRaFT clips throughout)
    seed: int = 0              # split, prompt order, LoRA init, noise: everything random derives from it
    # How a step's batch splits into micro-batches sets the order the gradient is summed in (adapters
    # differ by ~1e-6), so --resume refuses to change these two (and the world size).
    # "auto" (the default on a GPU): the largest that fits the device's free memory (plan_micro_batch).
    micro_batch: int | str | None = 8  # prompts per forward/backward on one process
    grad_accum: int | None = None  # alternatively: micro-batches per step per process (sets micro_batch)
    # bf16 (the default on a GPU): the frozen UNet and text encoder in bf16, the VAE too unless its config
    # says force_upcast (SD-1.5's does: decoded in fp32), adapters, EMA and AdamW in fp32 (DRaFT's recipe).
    dtype: str = "fp32"
    resolution: int | None = None  # image side in pixels; None: the model's own (SD-1.5: 512; mini world: 32)
    text_encoder_3: str = "auto"  # SD3's T5: auto loads it, none never reads it (zeros instead; rid.TEXT_ENCODER_3_HELP)
    # -- runtime: knobs that do not change what is computed; --resume may change them --
    ckpt_every: int = 100      # optimizer steps between mid-task checkpoints
    n_samples: int = 8         # test prompts in each stage's samples.png
    report_to: str = "none"    # "tensorboard": metrics.jsonl's scalars and samples.png also to <out>/tensorboard
    branch_from: str | None = None  # a finished run whose leading stages this new run copies (open_run)
    # -- black-box tasks (jpeg-kb, png-kb, module:function): LaSRO's surrogate, surrogate.SurrogateConfig --
    surrogate: dict = field(default_factory=lambda: asdict(surrogate.SurrogateConfig()))
    out: str = "out"
    device: str = ""           # "" = cuda if available (cuda:LOCAL_RANK under torchrun), else cpu


RUNTIME = ("gradient_checkpointing", "ckpt_every", "out", "device", "report_to", "branch_from")
PER_TASK = ("epochs", "lr", "lr_schedule", "batch")  # Config dicts keyed by task
REPORT_TO = ("none", "tensorboard")
# Upper bounds of the integer flags that size tensors or loops (seeds feed 64-bit generators):
# beyond them a value fails only mid-run (an allocation, an overflow) instead of up front.
MAX_SEED = 2**63 - 1
MAX_RANK = 1024        # SD-1.5's adapted layers are at most 1280 wide: a larger rank is not low-rank
MAX_BATCH = 65536      # prompts per optimizer step (the paper's largest is 128)


def paper(cfg: Config) -> Config:
    """Preset: the paper's schedules. A joint task runs the longest schedule among its rewards. r0: the
    K = R0_STEPS generator."""
    opt = {"rid": PAPER_RID, "r0": PAPER_R0, "ddpo": PAPER_DDPO}.get(cfg.method, PAPER_BASELINE)
    if cfg.method == "r0":
        cfg.steps = R0_STEPS
    for task in cfg.tasks:
        parts = cfg.joint if task == "joint" else [BLACK_BOX_LIKE if surrogate.is_black_box(task) else task]
        cfg.epochs[task] = max(PAPER_EPOCHS[p] for p in parts)
        cfg.batch[task], cfg.lr[task], cfg.lr_schedule[task] = opt["batch"], opt["lr"], "constant"
    return cfg


def flow_world(model) -> Path | None:
    """The flow.json of a mini flow world (`python -m mini build-flow` writes it into its model directory),
    else None."""
    f = Path(str(model)) / "flow.json"
    return f if model is not None and f.is_file() else None


def mini_world(cfg: Config, flow: Path | None = None) -> Config:
    """Preset: the committed CPU-scale world (mini/): its model, reward spec, prompt split and sampler. With a
    flow world's flow.json: its model and default Euler steps / guidance instead, everything else the same
    (it is built on the world's VAE, text encoder and prompts); the same schedule, so the worlds compare."""
    if not (Path(mini.WORLD) / "world.json").is_file():
        raise UsageError(f"the mini world is not built ({Path(mini.WORLD) / 'world.json'} is missing): run "
                         f"`python -m mini build`, or pass --model, e.g. --model {SD15}")
    world = json.loads((Path(mini.WORLD) / "world.json").read_text())
    cfg.model, cfg.reward_spec = str(mini.MODEL), str(mini.REWARD_SPEC)
    if flow is not None:
        world, cfg.model = json.loads(flow.read_text()), str(flow.parent.resolve())
    cfg.prompts = str(Path(mini.WORLD) / "prompts" / "train.txt")
    cfg.test_prompts = str(Path(mini.WORLD) / "prompts" / "test.txt")
    cfg.steps = int(world.get("steps", cfg.steps))
    cfg.guidance = float(world.get("guidance", cfg.guidance))
    cfg.surrogate.update(MINI_SURROGATE)
    lr, schedule = ((MINI_RID["lr"], MINI_RID["lr_schedule"]) if cfg.method == "rid"
                    else (MINI_LR, MINI_LR_SCHEDULE))
    for task in cfg.tasks:
        if cfg.method == "r0":  # the 20-step model becomes a K-step one
            cfg.steps = R0_STEPS
            cfg.epochs[task], cfg.batch[task] = MINI_R0["epochs"], MINI_BATCH
            cfg.lr[task], cfg.lr_schedule[task] = MINI_R0["lr"], MINI_R0["lr_schedule"]
            continue
        parts = cfg.joint if task == "joint" else [BLACK_BOX_LIKE if surrogate.is_black_box(task) else task]
        cfg.epochs[task] = max(MINI_EPOCHS[p] for p in parts)
        cfg.batch[task], cfg.lr[task] = MINI_BATCH, min(lr[p] for p in parts)
        cfg.lr_schedule[task] = "cosine" if any(schedule[p] == "cosine" for p in parts) else "constant"
    return cfg


#### CLI ####

def build_parser() -> argparse.ArgumentParser:
    d = Config()
    head, examples = __doc__.split("\n\n")[:2]
    p = checkpoint.Parser(prog="train.py", description=head, formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog=f"examples:\n{examples}\n\nexit codes: 0 done, 2 bad input, 3 non-finite loss (the last "
                "good checkpoint stays). Run directory layout: see the top of train.py.")
    a = p.add_argument
    a("--tasks", help=f"comma list of rewards, trained in this order (valid: {', '.join(rewards.NAMES)}, and "
                      f"black boxes trained through LaSRO's surrogate: {', '.join(surrogate.BUILT_IN)} or "
                      f"package.module:function, see README; default: {','.join(d.tasks)})")
    a("--joint", help="train ONE task rewarded by a weighted sum instead of a sequence, e.g. "
                      "aesthetic:0.01,hps:2,compress:1 (the paper's joint tuning); excludes --tasks (default: none)")
    a("--model", help="diffusers directory or hub id (default: the mini world, mini/world/model; a mini flow "
                      "world, mini/flow, takes the mini world's preset with its own steps and guidance; "
                      f"the paper's SD-1.5 is {SD15})")
    a("--reward-spec", help="JSON saying where reward weights live (rewards.RewardSpec keys; default: the "
                            "mini world's spec for the mini model, the public checkpoints otherwise)")
    a("--prompts", help="'paper' (the paper's 750 train / 50 test HPD v2 photo prompts as AlignProp ships them, "
                        "data/paper_prompts/), or a prompt file: text, one prompt a line, or the HPD json (a list "
                        "of strings or of {'prompt'|'caption': ...}), split deterministically from --seed into "
                        f"{d.n_train} train / {d.n_test} test (default: paper; the mini world's own train/test "
                        "files for the mini model)")
    a("--out", help=f"run directory (default: {d.out})")
    a("--seed", type=int, help=f"seed of the split, prompt order, LoRA init and noise, 0 to 2**63-1 "
                               f"(default: {d.seed})")
    a("--rank", type=int, help=f"LoRA rank per task, 1 to {MAX_RANK} (default: {d.rank})")
    add_method_flags(p, d)
    a("--epochs", help="passes over the training prompts: N for every task or task=N[,task=N] "
                       f"(default, the paper: {', '.join(f'{k} {v}' for k, v in PAPER_EPOCHS.items())}; "
                       f"mini world: {', '.join(f'{k} {v}' for k, v in MINI_EPOCHS.items())})")
    a("--lr", help=f"AdamW learning rate, N or task=N[,...] (default: rid {PAPER_RID['lr']}, ddpo {PAPER_DDPO['lr']}, "
                   f"other methods {PAPER_BASELINE['lr']}; mini world: "
                   f"{', '.join(f'{k} {v:g}' for k, v in MINI_LR.items())}, "
                   f"but rid hps {MINI_RID['lr']['hps']:g})")
    a("--lr-schedule", help=f"learning rate over a task: {' or '.join(LR_SCHEDULES)} (half a cosine from "
                            "--lr towards 0 over the task's steps), for every task or task=S[,...] (default: "
                            "constant, as the paper; mini world: "
                            f"{', '.join(f'{k} {v}' for k, v in MINI_LR_SCHEDULE.items())}, "
                            f"but rid hps {MINI_RID['lr_schedule']['hps']})")
    a("--batch", help=f"global batch per optimizer step (1 to {MAX_BATCH}; ddpo: the samples of one round), N or "
                      f"task=N[,...] (default: rid {PAPER_RID['batch']}, ddpo {PAPER_DDPO['batch']}, other methods "
                      f"{PAPER_BASELINE['batch']} by gradient accumulation; mini world: {MINI_BATCH} for every method)")
    a("--micro-batch", help="prompts per forward/backward on one process, or auto: the largest that fits the "
                            "device's free memory (15 %% kept free), from the fake-tensor memory model of "
                            "memplan.py (the model behind docs/sd15_memory.md) run on the loaded model; micro-batches per step = batch / world size "
                            "/ micro-batch; it sets the order the gradient sums in, so --resume keeps it "
                            f"(default: auto on a GPU, {d.micro_batch} on a CPU)")
    a("--grad-accum", type=int, help="micro-batches per step per process; sets the micro-batch size "
                                     "instead of --micro-batch (default: from --micro-batch)")
    a("--max-steps", type=int, help="cap on optimizer steps per task, for smoke runs (default: none)")
    a("--dtype", choices=("fp32", "bf16"), help="fp32, or bf16: the frozen base in bf16 (the VAE decodes in fp32 "
                                                "where its config says force_upcast, as SD-1.5's does), adapters and "
                                                f"optimizer in fp32, as DRaFT did (default: bf16 on a GPU, {d.dtype} on a CPU)")
    a("--resolution", type=int, help="image side in pixels, a multiple of the VAE factor × the UNet's "
                                     "downsampling (SD-1.5: 64; 256/384 fit smaller GPUs) (default: the model's "
                                     "own: 512 for SD-1.5, 32 in the mini world)")
    a("--text-encoder-3", choices=rid.TEXT_ENCODER_3, help=f"{rid.TEXT_ENCODER_3_HELP}; saved with the run, so eval.py "
                                                           f"and --resume load the same (default: {d.text_encoder_3})")
    a("--ckpt-every", type=int, help=f"optimizer steps between mid-task checkpoints (default: {d.ckpt_every})")
    a("--resume", action="store_true", help="continue the run in --out from its last readable checkpoint (same "
                                            "settings required, but for --ckpt-every, --device, --report-to and "
                                            "--gradient-checkpointing); starts fresh if --out holds no run")
    a("--branch-from", metavar="RUN", help="start a new run from another run's finished leading stages: those whose "
                                          "tasks begin --tasks are copied, not retrained, if every other setting "
                                          "matches (e.g. the orders aesthetic,hps,compress and aesthetic,hps,jpeg-kb "
                                          "share two stages); the numbers equal a run from scratch (default: none)")
    a("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    for f in fields(surrogate.SurrogateConfig):  # black-box tasks only
        a("--surrogate-" + f.name.replace("_", "-"), type=str,
          help=f"black-box tasks: surrogate {f.name.replace('_', ' ')} (default: {d.surrogate[f.name]}"
               f"{'; mini world: ' + str(MINI_SURROGATE[f.name]) if f.name in MINI_SURROGATE else ''})")
    a("--report-to", choices=REPORT_TO, help="also log every step's metrics and each stage's samples to "
                                             "<out>/tensorboard (needs the tensorboard package; default: none)")
    return p


# The mini world overrides these method defaults with its world.json's sampler.
MINI_SETS = ("steps", "guidance")


def add_method_flags(p: argparse.ArgumentParser, d: Config) -> None:
    """One --flag per ddpo.DDPOConfig field (rid.StepConfig's and DDPO's), from its declaration (help, choices);
    checked in resolve()."""
    kinds = {"int": int, "float": float, "str": str}
    for f in fields(ddpo.DDPOConfig):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        default = getattr(d, f.name)
        note = "; the mini world sets its own" if f.name in MINI_SETS else ""
        choices = f" (one of {', '.join(meta['choices'])})" if meta["choices"] else ""
        shown = ",".join(f"{x:g}" for x in default) if isinstance(default, tuple) else default
        help = f"{meta['help']}{choices} (default: {'off' if default is False else shown}{note})"
        if f.type == "bool":
            p.add_argument(flag, action="store_true", default=None, help=help)
        else:  # a setting with its own parser (eta_range's LO,HI) arrives as text; resolve() parses it
            p.add_argument(flag, type=str if meta.get("parse") else kinds[f.type], metavar=meta.get("metavar"),
                           help=help)


def _positive(flag, value, cast=int, top=None):
    """None (flag not given) or the value, checked: > 0 and finite, and ≤ top when given."""
    if value is None:
        return None
    if top is not None and not 0 < value <= top:
        raise UsageError(f"{flag} {value} is not allowed; allowed: an integer in [1, {top}]")
    if not (value > 0 and math.isfinite(value)):
        raise UsageError(f"{flag} {value}: must be > 0 and finite")
    return cast(value)


def parse_per_task(flag: str, text: str, tasks: list, cast, choices: tuple = (), top=None) -> dict:
    """'--epochs 10' (every task) or '--epochs hps=120,compress=5' -> {task: value}. Numbers must be
    finite and > 0 (and ≤ top when given); with choices, values are names from it instead."""
    out = {}
    for item in text.split(","):
        key, sep, val = item.strip().rpartition("=")
        if sep and key not in tasks:
            raise UsageError(f"{flag} {text!r}: task {key!r} is not in --tasks ({','.join(tasks)})")
        if choices:
            if val not in choices:
                raise UsageError(f"{flag} {text!r}: {val!r} is not one of {', '.join(choices)}; "
                                 f"use S or task=S[,task=S]")
            value = val
        else:
            try:
                value = cast(val)
            except ValueError:
                kind = "a whole number" if cast is int else "a number"
                raise UsageError(f"{flag} {text!r}: {val!r} is not {kind}; use N or task=N[,task=N]") from None
            if not (value > 0 and math.isfinite(value)):
                raise UsageError(f"{flag} {text!r}: {val!r} must be > 0 and finite")
            if top is not None and value > top:
                raise UsageError(f"{flag} {text!r}: {val!r} is not allowed; allowed: 1 to {top}")
        out.update({t: value for t in ([key] if sep else tasks)})
    return out


def resolve(args) -> tuple[Config, bool]:
    """CLI -> the resolved Config: the base, then presets (paper; mini world), then explicit flags."""
    method = args.method or Config.method
    if method not in ddpo.METHODS:
        raise UsageError(f"--method {method!r} is unknown; valid: {', '.join(ddpo.METHODS)}")  # picks presets
    joint = None
    if args.joint is not None:
        if args.tasks is not None:
            raise UsageError("--joint trains one task with the summed reward; drop --tasks")
        try:
            joint = rewards.parse_joint(args.joint)
        except ValueError as e:
            raise UsageError(str(e)) from None
        tasks = ["joint"]
    else:
        tasks = [t.strip() for t in (args.tasks or ",".join(rewards.REWARDS)).split(",")]
        bad = [t for t in tasks if t not in rewards.NAMES and not surrogate.is_black_box(t)]
        if bad or len(set(tasks)) != len(tasks):
            what = f"unknown task {bad[0]!r}" if bad else "a task repeats"
            raise UsageError(f"--tasks {args.tasks!r}: {what}; valid: {', '.join(rewards.NAMES)}, the black boxes "
                             f"{', '.join(surrogate.BUILT_IN)} or package.module:function")
    cfg = paper(Config(tasks=tasks, joint=joint, method=method))

    flow = flow_world(args.model)
    is_mini = args.model is None or mini.is_model(args.model) or flow is not None
    if is_mini:
        cfg = mini_world(cfg, flow)
    else:
        cfg.model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    if args.prompts == "paper":
        cfg.prompts, cfg.test_prompts = str(PAPER_TRAIN), str(PAPER_TEST)
    elif args.prompts is not None:
        cfg.prompts, cfg.test_prompts = str(Path(args.prompts).resolve()), None
    if args.branch_from is not None:
        cfg.branch_from = str(Path(args.branch_from).resolve())
    if args.reward_spec is not None:
        cfg.reward_spec = str(Path(args.reward_spec).resolve())
    method_fields = [f.name for f in fields(ddpo.DDPOConfig)]
    for name in ("out", "seed", "dtype", "device", "report_to", "resolution", "text_encoder_3", *method_fields):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    for f in fields(ddpo.DDPOConfig):  # settings given as text in their own syntax (--eta-range LO,HI)
        if f.metadata.get("parse") and isinstance(getattr(cfg, f.name), str):
            flag = "--" + f.name.replace("_", "-")
            try:
                setattr(cfg, f.name, f.metadata["parse"](getattr(cfg, f.name)))
            except ValueError:
                raise UsageError(f"{flag} {getattr(cfg, f.name)!r} is not allowed; allowed: "
                                 f"{f.metadata['allowed']}") from None
    try:  # the one range check of every method setting, named as the user typed it
        cfg.check(lambda name: "--" + name.replace("_", "-"))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.micro_batch is not None and args.micro_batch != "auto":
        try:
            args.micro_batch = int(args.micro_batch)
        except ValueError:
            raise UsageError(f"--micro-batch {args.micro_batch!r} is not allowed; allowed: auto or an integer ≥ 1") from None
    if args.micro_batch == "auto":
        cfg.micro_batch = "auto"
    for name, top in (("rank", MAX_RANK), ("max_steps", None), ("ckpt_every", None),
                      *((("micro_batch", None),) if args.micro_batch != "auto" else ())):
        value = _positive("--" + name.replace("_", "-"), getattr(args, name), top=top)
        if value is not None:
            setattr(cfg, name, value)
    if args.grad_accum is not None:
        cfg.grad_accum, cfg.micro_batch = _positive("--grad-accum", args.grad_accum), None
    for flag, cast, top in (("epochs", int, None), ("lr", float, None), ("batch", int, MAX_BATCH)):
        if getattr(args, flag) is not None:
            getattr(cfg, flag).update(parse_per_task("--" + flag, getattr(args, flag), cfg.tasks, cast, top=top))
    if args.lr_schedule is not None:
        cfg.lr_schedule.update(parse_per_task("--lr-schedule", args.lr_schedule, cfg.tasks, str, LR_SCHEDULES))
    for f in fields(surrogate.SurrogateConfig):
        flag, text = "--surrogate-" + f.name.replace("_", "-"), getattr(args, "surrogate_" + f.name)
        if text is not None:
            cast = {"int": int, "float": float}.get(f.type, str)
            try:
                cfg.surrogate[f.name] = cast(text)
            except ValueError:
                raise UsageError(f"{flag} {text!r} is not allowed; allowed: {'an integer' if cast is int else 'a number' if cast is float else 'prompt, any'}") from None
    try:
        surrogate.SurrogateConfig(**cfg.surrogate)
    except ValueError as e:  # "surrogate pairs 'x' ..." → "--surrogate-pairs 'x' ..."
        name = str(e).split()[1]
        raise UsageError(str(e).replace(f"surrogate {name}", "--surrogate-" + name.replace("_", "-"), 1)) from None
    black = [t for t in cfg.tasks if surrogate.is_black_box(t)]
    if black and cfg.method == "r0":
        raise UsageError(f"--method r0 needs differentiable rewards (it normalises each reward's image gradient); "
                         f"the black-box task(s) {black} train with any other method")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise UsageError(f"--seed {cfg.seed} is not allowed; allowed: an integer in [0, 2**63-1]")
    cfg.device = checkpoint.check_device("--device", cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return gpu_defaults(cfg, args), is_mini


def gpu_defaults(cfg: Config, args) -> Config:
    """On a GPU, unless the flags say otherwise: a bf16 base and the micro-batch that fits (--micro-batch auto)."""
    if cfg.device.startswith("cuda"):
        if args.dtype is None:
            cfg.dtype = "bf16"
        if args.micro_batch is None and args.grad_accum is None:
            cfg.micro_batch = "auto"
    return cfg


def step_config(cfg: Config) -> ddpo.DDPOConfig:
    """The method's part of the run's settings, rid.StepConfig's and DDPO's (its __post_init__ checks how they
    combine); rid.train_step reads the former, ddpo.train_round both."""
    own = {f.name: getattr(cfg, f.name) for f in fields(ddpo.DDPOConfig) if f.name.startswith("ddpo_")}
    return ddpo.DDPOConfig(**own, **{f.name: getattr(cfg, f.name) for f in fields(rid.StepConfig)})


def micro_plan(cfg: Config, task: str, world: int) -> tuple[int, int]:
    """-> (micro-batch size, micro-batches per step) of one process for this task's global batch."""
    batch = cfg.batch[task]
    if batch % world:
        raise UsageError(f"--batch {task}={batch} does not split over {world} processes")
    per_rank = batch // world
    if cfg.method == "ddpo" and per_rank % cfg.ddpo_minibatches:
        raise UsageError(f"--ddpo-minibatches {cfg.ddpo_minibatches} does not divide {task}'s round of {per_rank} "
                         "samples per process (--batch); allowed: a divisor of it")
    if cfg.grad_accum is not None:
        if per_rank % cfg.grad_accum:
            raise UsageError(f"--grad-accum {cfg.grad_accum} does not divide {task}'s batch per process {per_rank}")
        return per_rank // cfg.grad_accum, cfg.grad_accum
    if cfg.micro_batch == "auto":
        raise ValueError("micro_plan before plan_micro_batch resolved --micro-batch auto")
    micro = min(cfg.micro_batch, per_rank)
    if per_rank % micro:
        raise UsageError(f"--micro-batch {micro} does not divide {task}'s batch per process {per_rank} "
                         f"(batch {batch} over {world} process(es))")
    return micro, per_rank // micro


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
        args = build_parser().parse_args(argv)
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
