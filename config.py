"""train.py's settings and command line: the run's Config (every knob, commented), the presets that fill
it (the paper's per-task schedules, the mini world's, a mini flow world's), the flags derived from it, and
resolve(), which turns the flags into the resolved Config that train.py runs and saves with the run.
Every value is checked here, once, at the boundary (UsageError: one line, exit 2); the stage loop trusts it.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

import checkpoint
import ddpo
import mini
import rewards
import rid
import surrogate
from cli import Parser, UsageError

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

def build_parser(doc: str = "") -> argparse.ArgumentParser:
    """train.py's flags. doc: train.py's docstring, whose first paragraph and examples open and close --help
    (train.main passes it; a parser built only to parse flags needs none)."""
    d = Config()
    head, _, rest = doc.partition("\n\n")
    examples = rest.split("\n\n")[0]
    p = Parser(prog="train.py", description=head, formatter_class=argparse.RawDescriptionHelpFormatter,
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
