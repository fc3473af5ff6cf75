"""LaSRO in its own setting at CPU scale: a 2-step generator fine-tuned on black-box rewards through the
latent surrogate, against policy-gradient RL (DDPO), at one budget of true-reward calls (issue 34, items 2-3).

    python -m experiments.lasro_fast --jobs 2          seeds 0,1,2 → docs/lasro_fast_results.md (+ figures)

1. THE GENERATOR (item 2). Per seed `train.py --method r0 --joint hps:1,aesthetic:2,clip:1 --steps 2`
   (experiments.r0's mix, the mini preset's r0 schedule at K = 2), then one eval.py of those runs (eval
   scores an r0 run at its K and its base model at K and at its usual 20 steps). The rule: the mean over
   seeds of R0@2 is above the base model at 2 steps on HPS, aesthetic and CLIP, with an FID no higher.
   If it holds, R0@2 is the generator; if not, the doc says so and nothing else trains (a consistency-
   distilled LCM of the mini UNet is the issue's fallback, not built here).
2. THE COMPARISON (item 3). On each seed's generator at its 2 steps, for two rewards without a gradient:
   jpeg-kb (the JPEG size through PIL) and the mini world's aesthetic model called through the black-box
   plugin interface (`experiments.lasro_fast:aesthetic`, below): LaSRO (the surrogate online), LaSRO with
   the surrogate frozen after pre-training (--surrogate-adapt-every 0), DDPO (--method ddpo), and for
   aesthetic the direct gradient of the differentiable reward (the upper bound). LaSRO's generator update is
   `--method draft` (the gradient through both steps); every method has the mini preset's batch and lr.
   Each run gets the same budget of true-reward calls (--budget, images scored): its optimizer steps are
   computed from its own settings (reward_calls). Every run starts from the generator's adapters: stage 1
   of its run directory is a checked copy of the generator's stage (`branch`, below), stage 2 trains.
3. ONE eval.py scores every run (the generator's stages from cache); the doc gives the true reward after
   training (eval's metric on the test prompts), its FID/CLIP/HPS cost, the training curves against true-
   reward calls and wall time, and a verdict per claim of seed 001 computed from the numbers.

Resumable: finished runs are kept, a killed one resumes (train.py --resume); --report-only rewrites the
doc from what is stored. One experiment per --out (<out>/.lock).

    python -m experiments.lasro_fast branch GEN_RUN <train.py flags>

is what step 2 runs per comparison run: train.py's run of the one task given by --tasks, with GEN_RUN's
finished joint stage copied in first as stage 1 (checksums verified, the prompt split GEN_RUN's). It is
train.py --branch-from across methods, which train.py refuses (a branch must share the method).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from cli import Parser, UsageError, command
from experiments.common import ROOT, finished, ints, logger, mean_std, run, run_parallel, take_lock, \
    timing as timing_of, write_doc

PROG = "python -m experiments.lasro_fast"
K = 2  # the generator's steps: LaSRO's setting is ≤ 2-step generation
JOINT = "hps:1,aesthetic:2,clip:1"  # experiments.r0's mix (its JOINT)
RULE = ("hps", "aesthetic", "clip", "fid")  # the generator rule's metrics; FID: not higher, the rest: higher
BUDGET = 1024  # true-reward calls per run: LaSRO's 256 pre-training samples + 96 steps of 8; DDPO 128 rounds of 8
PLUGIN = "experiments.lasro_fast:aesthetic"
# name: (train.py task, label, eval metric of its true reward, the differentiable task of the same reward)
REWARDS = {
    "jpeg-kb": ("jpeg-kb", "JPEG size (jpeg-kb)", "jpeg_kb", None),
    "aesthetic": (PLUGIN, "aesthetic model as a black box", "aesthetic", "aesthetic"),
}
# name: (label, train.py flags). "direct" trains the reward's differentiable task, where it has one.
METHODS = {
    "lasro": ("LaSRO", ["--method", "draft"]),
    "lasro-frozen": ("LaSRO, frozen surrogate", ["--method", "draft", "--surrogate-adapt-every", "0"]),
    "ddpo": ("DDPO", ["--method", "ddpo"]),
    "direct": ("direct gradient", ["--method", "draft"]),
}
ONE_CALL_PER_SAMPLE = ("baseline", "draft", "draft-k", "ddpo")  # methods whose step scores each sample once
# What a comparison run and its generator must share for the copied stage to be that run's stage 1.
SHARED = ("model", "reward_spec", "prompts", "test_prompts", "n_train", "n_test", "rank", "seed", "steps",
          "guidance", "sampler", "dtype", "resolution")
GEN_STAGE = "stage1-joint"


#### THE AESTHETIC MODEL AS A BLACK BOX ####

_AESTHETIC = []


def aesthetic(images, prompts):
    """The mini world's aesthetic model behind the plugin interface (surrogate.py): PIL images in, one float
    each out, no gradient. It sees what every black box sees, the uint8 image (the direct reward: floats)."""
    import numpy as np
    import torch

    import mini
    import rewards

    if not _AESTHETIC:
        _AESTHETIC.append(rewards.get("aesthetic", rewards.load_spec(str(mini.REWARD_SPEC)), "cpu"))
    x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
                     for im in images])  # (N, 3, H, W) in [0, 1]
    with torch.no_grad():
        return _AESTHETIC[0](x, list(prompts)).double().tolist()


#### THE BUDGET ####

def reward_calls(cfg, task: str, n_train: int) -> tuple[int, int]:
    """(true-reward calls before the first optimizer step, calls per step) of a config.Config's run of `task`:
    DDPO scores a round's --batch samples; LaSRO first pre-trains on explored prompts × noises, then scores
    each step's --batch samples (surrogate.SurrogateTask.after_step); the direct gradient scores each sample."""
    if cfg.method not in ONE_CALL_PER_SAMPLE:
        raise ValueError(f"--method {cfg.method}: its reward calls per step are not counted here; allowed: "
                         f"{', '.join(ONE_CALL_PER_SAMPLE)}")
    import surrogate

    batch = cfg.batch[task]
    if cfg.method == "ddpo" or not surrogate.is_black_box(task):
        return 0, batch
    k = cfg.surrogate["pretrain_prompts"]
    explored = n_train if not k or k >= n_train else k
    return explored * cfg.surrogate["pretrain_noises"], batch


def steps_for(budget: int, fixed: int, per_step: int) -> int:
    """Optimizer steps (DDPO: rounds) that spend at most `budget` calls."""
    return (budget - fixed) // per_step


def resolved(flags: list):
    """train.py's resolved Config and training-prompt count for these flags (nothing is loaded)."""
    import config
    import train

    cfg, _ = config.resolve(config.build_parser().parse_args([str(f) for f in flags]))
    prompts = train.read_prompts(cfg.prompts)
    n_train = len(prompts[:cfg.n_train] if cfg.test_prompts else train.split_prompts(prompts, cfg.n_train, cfg.n_test,
                                                                                       cfg.seed)[0])
    return cfg, n_train


#### BRANCH: a run of another method from the generator's stage ####

def branch(argv: list) -> int:
    """`branch GEN_RUN <train.py flags>`: see the module docstring. Exit codes as train.py's."""
    import checkpoint
    import config
    import train

    try:
        if not argv or argv[0].startswith("-"):
            raise UsageError("usage: branch GEN_RUN <train.py flags> (GEN_RUN: a finished r0 run of one joint task)")
        gen_dir = Path(argv[0]).resolve()
        cfg, is_mini = config.resolve(config.build_parser().parse_args(argv[1:]))
        if len(cfg.tasks) != 1 or cfg.joint:
            raise UsageError(f"--tasks {','.join(cfg.tasks)}: give the one task trained after the generator")
        gen = train.saved_run(gen_dir)
        g = gen["config"]
        if gen["stages"] != [GEN_STAGE] or g.get("tasks") != ["joint"]:
            raise UsageError(f"{gen_dir}: not a finished run of one joint task (stages {gen['stages']})")
        mine = train.config_dict(cfg)
        diff = [f"{k}: generator {g.get(k)!r}, this run {mine.get(k)!r}" for k in SHARED if g.get(k) != mine.get(k)]
        if diff:
            raise UsageError(f"{gen_dir}: its stage is not this run's stage 1 ({'; '.join(diff)})")
        cfg.tasks, cfg.joint, cfg.branch_from = ["joint", *cfg.tasks], g["joint"], str(gen_dir)
        for key in config.PER_TASK:  # the generator's schedule of its stage, as recorded
            getattr(cfg, key)["joint"] = g[key]["joint"]
        out = Path(cfg.out)
        if not (out / "run.json").exists():
            lock = checkpoint.RunLock(out, log=train.log)
            try:
                if not (out / "run.json").exists():
                    stages = [GEN_STAGE]
                    info = train.new_run(cfg, 1, stages, branched_from={"run": str(gen_dir), "stages": stages})
                    train.create_run(cfg, info, *train.run_prompts(gen_dir, gen))  # copies, verifies, run.json last
            finally:
                lock.release()
        train.run(cfg, is_mini, False, resume=True, world=1)
    except UsageError as e:
        print(f"{PROG} branch: error: {e}", file=sys.stderr)
        return 2
    except train.NonFiniteLoss as e:
        print(f"{PROG} branch: error: {e}", file=sys.stderr)
        return 3
    return 0


#### THE PLAN ####

def plan_runs(out: Path, seeds: list, rewards: list, methods: list, budget: int, train_args: list) -> list:
    """Every comparison run: dicts with reward, method, seed, dir, task, flags (train.py's, without --out),
    fixed, per_step, steps, calls. Raises ValueError for a budget too small or settings train.py refuses."""
    plans = []
    for reward in rewards:
        task, _, _, direct = REWARDS[reward]
        for method in methods:
            if method == "direct" and direct is None:
                continue  # no gradient exists: no upper bound to draw
            t = direct if method == "direct" else task
            flags = ["--tasks", t, *METHODS[method][1], *train_args, "--steps", K]
            try:
                cfg, n_train = resolved([*flags, "--seed", seeds[0]])
                fixed, per_step = reward_calls(cfg, t, n_train)
            except (UsageError, ValueError) as e:
                raise ValueError(f"--train-args {' '.join(map(str, train_args))!r}: the {reward}/{method} run: {e}") from None
            steps = steps_for(budget, fixed, per_step)
            if steps < 1:
                raise ValueError(f"--budget {budget}: {reward}/{method} spends {fixed} calls before its first step "
                                 f"and {per_step} per step; allowed: ≥ {fixed + per_step}")
            epochs = -(-steps * cfg.batch[t] // n_train)  # enough passes; --max-steps stops at the budget
            for seed in seeds:
                plans.append({"reward": reward, "method": method, "seed": seed, "task": t,
                              "dir": out / f"{reward}-{method}-seed{seed}", "fixed": fixed, "per_step": per_step,
                              "steps": steps, "calls": fixed + steps * per_step,
                              "flags": [*flags, "--seed", seed, "--epochs", epochs, "--max-steps", steps]})
    return plans


#### THE GENERATOR DECISION ####

def decide(report: dict, seeds: list) -> dict:
    """eval's report of the generator runs → {"base2", "base_usual", "per_seed" {seed: metrics}, "mean",
    "pass" {metric: bool}, "ok"}: R0@2's mean over seeds against the base at 2 steps (RULE)."""
    bases = {r["method"]: r["metrics"] for r in report["rows"] if r["stage"] == 0}
    base2 = bases.get("base", {})
    usual = next((m for name, m in bases.items() if name != "base"), {})
    per_seed = {int(Path(r["run"]).name.rsplit("seed", 1)[1]): r["metrics"] for r in report["rows"] if r["stage"] == 1}
    per_seed = {s: m for s, m in per_seed.items() if s in seeds}
    mean = {m: statistics.fmean(v[m] for v in per_seed.values()) for m in RULE} if per_seed else {}
    ok_of = {m: (mean[m] <= base2[m] if m == "fid" else mean[m] > base2[m]) if mean and m in base2 else False
             for m in RULE}
    return {"base2": base2, "base_usual": usual, "per_seed": per_seed, "mean": mean, "pass": ok_of,
            "ok": bool(per_seed) and all(ok_of.values())}


#### COLLECT: eval's rows and the runs' own logs → one record per run ####

def collect(plans: list, report: dict) -> list:
    """A record per finished comparison run: its plan, eval's metrics at stage 1 (the generator) and stage 2,
    and the curve [(calls, seconds, true reward)] of its training: LaSRO's pre-training (the generator's
    samples, before any step) then every step's batch (LaSRO: the true reward of the step's samples, logged
    as true_reward; DDPO: its round's rewards; the direct gradient: its reward)."""
    rows = {(str(Path(r["run"]).resolve()), r["stage"]): r for r in report["rows"]}
    records = []
    for pl in plans:
        key = str(pl["dir"].resolve())
        if (key, 2) not in rows:
            continue
        sdir = pl["dir"] / f"stage2-{pl['task']}"
        steps = [json.loads(line) for line in (sdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        pre_file, curve, t0 = sdir / "surrogate_pretrain.json", [], 0.0
        if pre_file.exists():
            pre = json.loads(pre_file.read_text())
            t0 = pre["seconds"]
            curve = [(0, 0.0, pre["true_reward"]), (pl["fixed"], t0, pre["true_reward"])]
        value = "true_reward" if pre_file.exists() else "reward"
        curve += [(pl["fixed"] + pl["per_step"] * r["step"], t0 + r["time"], r[value]) for r in steps]
        records.append({**{k: pl[k] for k in ("reward", "method", "seed", "fixed", "per_step", "steps", "calls")},
                        "start": rows[(key, 1)]["metrics"], "final": rows[(key, 2)]["metrics"], "curve": curve,
                        "pretrained": pre_file.exists(), "seconds": curve[-1][1] if curve else None})
    return records


#### SUMMARIES: numbers the tables and verdicts are written from ####

def true_reward(reward: str, metrics: dict) -> float:
    """The reward's true value in eval's metric, higher is better (jpeg-kb: −kB)."""
    m = REWARDS[reward][2]
    return metrics[m] if m != "jpeg_kb" else -metrics[m]


def smooth(values: list, w: int) -> list:
    """Trailing mean over the last w values (fewer at the start)."""
    return [statistics.fmean(values[max(0, i - w + 1):i + 1]) for i in range(len(values))]


def window(budget: int, per_step: int) -> int:
    """Steps in a tenth of the budget: the curves' smoothing window, the same number of calls for every method."""
    return max(1, round(budget / 10 / per_step))


def summarize(records: list, budget: int) -> dict:
    """{(reward, method): summary}: per seed the eval gain of the true reward over the generator, the final
    metrics, and the training curve smoothed over a tenth of the budget; over seeds their mean curve, the
    start and end levels, and the worst drop of a seed's curve below its running best (drawdown)."""
    out = {}
    for key in dict.fromkeys((r["reward"], r["method"]) for r in records):
        recs = sorted((r for r in records if (r["reward"], r["method"]) == key), key=lambda r: r["seed"])
        reward = key[0]
        w = window(budget, recs[0]["per_step"])
        n_pre = 2 if recs[0]["pretrained"] else 0
        train_curves = [smooth([c[2] for c in r["curve"][n_pre:]], w) for r in recs]
        n = min(map(len, train_curves))
        mean_curve = [statistics.fmean(c[i] for c in train_curves) for i in range(n)]
        drawdowns = [max((max(c[:i + 1]) - c[i] for i in range(len(c))), default=0.0) for c in train_curves]
        start, end = mean_curve[min(w, n) - 1], mean_curve[-1]
        out[key] = {
            "seeds": [r["seed"] for r in recs],
            "gain": [true_reward(reward, r["final"]) - true_reward(reward, r["start"]) for r in recs],
            "final": {m: [r["final"][m] for r in recs] for m in recs[0]["final"]},
            "start": {m: [r["start"][m] for r in recs] for m in recs[0]["start"]},  # each seed's generator
            "calls": recs[0]["calls"], "steps": recs[0]["steps"], "fixed": recs[0]["fixed"],
            "per_step": recs[0]["per_step"], "window": w,
            "seconds": [r["seconds"] for r in recs],
            "calls_x": [c[0] for c in recs[0]["curve"][n_pre:]][:n],
            "curve": mean_curve, "curve_start": start, "curve_end": end, "drawdown": drawdowns,
            "raw": [r["curve"] for r in recs], "pretrained": recs[0]["pretrained"],
        }
    return out


def calls_to_reach(s: dict, level_gain: float) -> int | None:
    """True-reward calls at which the mean smoothed curve first gains `level_gain` over its start (None: never)."""
    w = s["window"]
    for i in range(min(w, len(s["curve"])) - 1, len(s["curve"])):
        if s["curve"][i] - s["curve_start"] >= level_gain:
            return s["calls_x"][i]
    return None


def verdicts(summary: dict, rewards: list) -> list:
    """(claim, reward, holds: bool | None, sentence) for each claim of seed 001 that the runs can check."""
    out = []
    for reward in rewards:
        las, dd = summary.get((reward, "lasro")), summary.get((reward, "ddpo"))
        if not las or not dd:
            out.append(("all", reward, None, "LaSRO and DDPO did not both run: no comparison"))
            continue
        label = REWARDS[reward][1]
        gl, gd = statistics.fmean(las["gain"]), statistics.fmean(dd["gain"])
        wins = sum(a > b for a, b in zip(las["gain"], dd["gain"]))
        out.append(("beats policy-gradient RL at ≤ 2 steps", reward, gl > gd,
                    f"{label}: LaSRO gains {gl:+.4g} in true reward on the test prompts, DDPO {gd:+.4g} (mean over "
                    f"seeds; LaSRO ahead in {wins} of {len(las['gain'])} seeds)"))
        total = max(las["curve_end"] - las["curve_start"], dd["curve_end"] - dd["curve_start"])
        if total > 0:
            cl, cd = calls_to_reach(las, total / 2), calls_to_reach(dd, total / 2)
            holds = cl is not None and (cd is None or cl < cd)
            say = lambda c, s: f"{c} calls" if c is not None else f"not within its {s['calls']}"  # noqa: E731
            out.append(("more sample-efficient", reward, holds,
                        f"{label}: to gain {total / 2:.4g} (half the larger training gain) LaSRO needs "
                        f"{say(cl, las)}, DDPO {say(cd, dd)} (pre-training's {las['fixed']} included)"))
        else:
            out.append(("more sample-efficient", reward, False, f"{label}: neither training curve rose"))
        def stable(s):  # every seed improves on the generator; no seed's curve falls back half the training gain
            g = s["curve_end"] - s["curve_start"]
            return all(x > 0 for x in s["gain"]) and max(s["drawdown"]) <= 0.5 * max(abs(g), 1e-12)
        out.append(("stable", reward, stable(las),
                    f"{label}: LaSRO improves on the generator in {sum(x > 0 for x in las['gain'])} of "
                    f"{len(las['gain'])} seeds (gain {mean_std(las['gain'])}), worst drawdown {max(las['drawdown']):.3g}; "
                    f"DDPO {sum(x > 0 for x in dd['gain'])} of {len(dd['gain'])} (gain {mean_std(dd['gain'])}), "
                    f"worst drawdown {max(dd['drawdown']):.3g}; stable by the rule: LaSRO "
                    f"{'yes' if stable(las) else 'no'}, DDPO {'yes' if stable(dd) else 'no'}"))
    return out


#### THE DOC ####

def fmt(metric: str, v) -> str:
    import eval as evaluation

    return "–" if v is None else f"{v:.{evaluation.METRICS[metric][2]}f}"


def generator_section(dec: dict, seeds: list, forced: bool = False) -> list:
    import eval as evaluation

    M = evaluation.METRICS
    head = "| Model | " + " | ".join(f"{M[m][0]} {'↑' if M[m][1] else '↓'}" for m in RULE) + " |"
    lines = ["## 1. The 2-step generator", "",
             f"Rule (issue 34, item 2): R0 at {K} steps is the generator if its mean over seeds "
             f"{', '.join(map(str, seeds))} is above the base model at {K} steps on HPS, aesthetic and CLIP and "
             "its FID is not higher.", "", head, "|" + "---|" * (len(RULE) + 1)]
    if dec["base_usual"]:
        lines.append("| base, its usual steps | " + " | ".join(fmt(m, dec["base_usual"].get(m)) for m in RULE) + " |")
    lines.append(f"| base, {K} steps | " + " | ".join(fmt(m, dec["base2"].get(m)) for m in RULE) + " |")
    for s, mt in sorted(dec["per_seed"].items()):
        lines.append(f"| R0@{K}, seed {s} | " + " | ".join(fmt(m, mt.get(m)) for m in RULE) + " |")
    if dec["mean"]:
        lines.append(f"| **R0@{K}, mean** | " + " | ".join(
            f"{fmt(m, dec['mean'][m])} {'✓' if dec['pass'][m] else '✗'}" for m in RULE) + " |")
    lines.append("")
    if dec["ok"]:
        lines.append(f"**R0@{K} is the generator**: it beats the base model at {K} steps on every metric of the rule "
                     f"(✓). Every comparison run below starts from its own seed's R0@{K} adapters.")
    else:
        failed = [M[m][0] for m in RULE if not dec["pass"].get(m)]
        lines.append(f"**R0@{K} is not the generator**: it misses the rule on {', '.join(failed)} (✗). The issue's "
                     f"next step is a consistency-distilled (LCM) generator of the mini UNet, sampled with the LCM "
                     f"sampler; it is not built" + (f". The comparison below ran on R0@{K} anyway (--ignore-rule): "
                                                   "read it as a smoke test, not as LaSRO's setting." if forced else
                                                   ", so no comparison ran."))
    return lines


def write_report(dec: dict, summary: dict, args, seeds: list, rewards: list, methods: list, timing: dict,
                 doc: Path, figure: Path | None) -> str:
    import eval as evaluation

    M = evaluation.METRICS
    facts = [f"`{PROG} --seeds {args.seeds} --rewards {args.rewards} --methods {args.methods} --budget {args.budget} "
             f"--jobs {args.jobs}{' --ignore-rule' if getattr(args, 'ignore_rule', False) else ''}` "
             f"({timing.get('date', '?')}). Wall time {timing.get('train_min', 0):.1f} min "
             f"training ({timing.get('trained_runs', 0)} runs), {timing.get('total_min', 0):.1f} min in all, on "
             f"{timing.get('cpu', '?')}; peak RSS {timing.get('peak_rss_gb', 0):.2f} GB."]
    lines = generator_section(dec, seeds, forced=bool(summary) and not dec["ok"])
    if summary:
        from train import SURROGATE_HELD_OUT as held

        lines += ["", "## 2. The budget", "",
                  f"Every run may spend {args.budget} true-reward calls (images scored by the reward). Calls per "
                  "run, from its own settings: LaSRO pre-trains its surrogate on explored prompts × noises, then "
                  "scores each step's samples (the frozen ablation scores them too, for its curve, but trains on the "
                  "pre-trained surrogate alone); a DDPO round scores its samples; the direct gradient differentiates "
                  f"the reward of each sample. Not counted: LaSRO's check on held-out prompts at the stage's end "
                  f"({held[0]} prompts × {held[1]} samples, a diagnostic)." + (
                      " jpeg-kb has no direct gradient: the differentiable compress reward is another quantity "
                      "(docs/lasro_results.md)." if "jpeg-kb" in rewards else ""), "",
                  "| Reward | Method | calls before step 1 | calls per step | steps | calls |", "|---|---|---|---|---|---|"]
        for (reward, method), s in summary.items():
            unit = " rounds" if method == "ddpo" else ""
            lines.append(f"| {reward} | {METHODS[method][0]} | {s['fixed']} | {s['per_step']} | {s['steps']}{unit} | "
                         f"{s['calls']} |")
        cols = [m for m in ("aesthetic", "jpeg_kb", "hps", "clip", "fid") if m in next(iter(summary.values()))["final"]]
        lines += ["", "## 3. After training", "",
                  f"eval.py on the test prompts at {K} steps (the run's deterministic sampler, DDPO's too), mean ± std "
                  "over seeds; *gain*: the true reward (−kB for jpeg-kb) over the generator's. Seconds: training "
                  f"(pre-training included) of one run, {args.jobs} run(s) at a time.", "",
                  "| Reward | Method | gain | " + " | ".join(f"{M[m][0]} {'↑' if M[m][1] else '↓'}" for m in cols)
                  + " | seconds |", "|" + "---|" * (len(cols) + 4)]
        for reward in rewards:
            first = next((s for (r, _), s in summary.items() if r == reward), None)
            if first:
                lines.append(f"| {reward} | generator (R0@{K}) | – | " + " | ".join(mean_std(first["start"][m]) for m in cols)
                             + " | – |")
            for method in methods:
                s = summary.get((reward, method))
                if s:
                    lines.append(f"| {reward} | {METHODS[method][0]} | {mean_std(s['gain'])} | "
                                 + " | ".join(mean_std(s["final"][m]) for m in cols) + f" | {mean_std(s['seconds'])} |")
        lines += ["", "Per seed, the gain in true reward over the generator:", "",
                  "| Reward | Method | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|" + "---|" * (len(seeds) + 2)]
        for (reward, method), s in summary.items():
            by = dict(zip(s["seeds"], s["gain"]))
            lines.append(f"| {reward} | {METHODS[method][0]} | " + " | ".join(
                f"{by[x]:+.4g}" if x in by else "–" for x in seeds) + " |")
        if figure is not None:
            lines += ["", "## 4. Training curves", "",
                      "The true reward of each step's samples (LaSRO: the generator's samples during pre-training, "
                      "then its training samples; DDPO: its round's η = 1 samples; the direct gradient: the "
                      "differentiable reward), each seed's curve averaged over a tenth of the budget, then mean ± "
                      "std over seeds; against true-reward calls and against training wall time.", "",
                      f"![curves]({figure.name})", "",
                      f"Samples (rows: the base model at its usual and at {K} steps, the generator, then each "
                      f"reward's runs, seed {seeds[0]}; columns: the first test prompts, the same noise everywhere): "
                      f"[{figure.name.replace('_curves', '_grid')}]({figure.name.replace('_curves', '_grid')})"]
        lines += ["", "## 5. The claims of seed 001, checked", ""]
        for claim, reward, holds, sentence in verdicts(summary, rewards):
            mark = "**holds**" if holds else "**does not hold**" if holds is not None else "**not checked**"
            lines.append(f"- *{claim}*, {reward}: {mark}. {sentence}.")
        for reward in rewards:
            las, fr, dr = (summary.get((reward, m)) for m in ("lasro", "lasro-frozen", "direct"))
            if las and fr:
                lines.append(f"- Online adaptation, {reward}: LaSRO gains {statistics.fmean(las['gain']):+.4g}, the "
                             f"frozen surrogate {statistics.fmean(fr['gain']):+.4g}.")
            if las and dr and statistics.fmean(dr["gain"]) > 0:
                gl, gd = statistics.fmean(las["gain"]), statistics.fmean(dr["gain"])
                lines.append(f"- Upper bound, {reward}: LaSRO reaches {gl / gd:.0%} of the direct gradient's gain "
                             f"({gd:+.4g}) at the same calls.")
        lines += quality_lines(summary, rewards)
        lines += ["", "Rules: *beats*: the larger mean gain over seeds; *more sample-efficient*: fewer true-reward calls "
                  "until the mean smoothed training curve has gained half of the larger of the two methods' training "
                  "gains (end of curve − its first full window); *stable*: every seed improves on the generator and no "
                  "seed's smoothed curve falls below its running best by more than half the mean curve's gain."]
    text = "\n".join(["# LaSRO in its own setting: a 2-step generator against DDPO, mini world", "", *facts, "",
                      *lines, ""])
    write_doc(doc, text)
    return text


def quality_lines(summary: dict, rewards: list) -> list:
    """What each run's reward gain cost in CLIP score and FID (generator → after training, means over seeds),
    and a DDPO whose gain is inside its seed spread said to have not moved: "beats DDPO" then compares with
    a policy that has not started to learn at this budget."""
    lines = []
    for reward in rewards:
        costs = []
        for method in METHODS:
            s = summary.get((reward, method))
            if s and all(m in s["start"] and m in s["final"] for m in ("clip", "fid")):
                c0, c1 = statistics.fmean(s["start"]["clip"]), statistics.fmean(s["final"]["clip"])
                f0, f1 = statistics.fmean(s["start"]["fid"]), statistics.fmean(s["final"]["fid"])
                costs.append(f"{METHODS[method][0]} CLIP {c0:.3g} → {c1:.3g}, FID {f0:.3g} → {f1:.3g}")
        if costs:
            lines.append(f"- Quality, {reward} (generator → after training): " + "; ".join(costs) + ".")
        d = summary.get((reward, "ddpo"))
        if d and len(d["gain"]) > 1 and abs(statistics.fmean(d["gain"])) <= statistics.stdev(d["gain"]):
            lines.append(f"- DDPO, {reward}: its gain ({statistics.fmean(d['gain']):+.3g} ± "
                         f"{statistics.stdev(d['gain']):.2g}) is inside its seed spread: at this budget it has not "
                         f"measurably moved, so the claims above compare against a policy that has not started to learn.")
    return lines


def grid_rows(report: dict, plans: list, seed: int) -> list:
    """eval's rows for the sample grid: the base model at its usual and at K steps, seed `seed`'s generator,
    then that seed's run of every (reward, method), labelled in ASCII (PIL's built-in font)."""
    rows = {(str(Path(r["run"]).resolve()), r["stage"]): r for r in report["rows"]}
    out = sorted((r for r in report["rows"] if r["stage"] == 0), key=lambda r: r["method"] == "base")
    out += [{**r, "method": f"generator (R0@{K})", "name": f"seed {seed}"} for r in report["rows"]
            if r["stage"] == 1 and Path(r["run"]).name == f"generator-seed{seed}"]
    for pl in plans:
        r = rows.get((str(pl["dir"].resolve()), 2))
        if r is not None and pl["seed"] == seed:
            out.append({**r, "method": f"{pl['reward']}: {METHODS[pl['method']][0]}", "name": f"seed {seed}"})
    return out


def curves(summary: dict, rewards: list, methods: list) -> dict:
    """plots.curves_figure's panels: per reward, true reward against calls and against wall time."""
    panels = {}
    for reward in rewards:
        by_calls, by_time = {}, {}
        for method in methods:
            s = summary.get((reward, method))
            if not s:
                continue
            n_pre = 2 if s["pretrained"] else 0
            w = s["window"]
            seeds = [[c[2] for c in raw[n_pre:]] for raw in s["raw"]]
            sm = [smooth(v, w) for v in seeds]
            n = min(map(len, sm))
            idx = sorted({round(i * (n - 1) / 24) for i in range(25)}) if n > 25 else list(range(n))
            pre = [raw[:n_pre] for raw in s["raw"]]
            xc = [c for c, _, _ in s["raw"][0][:n_pre]] + [s["raw"][0][n_pre + i][0] for i in idx]
            xt = [statistics.fmean(p[j][1] for p in pre) for j in range(n_pre)] + \
                 [statistics.fmean(raw[n_pre + i][1] for raw in s["raw"]) for i in idx]
            ys = [[p[j][2] for p in pre] for j in range(n_pre)] + [[v[i] for v in sm] for i in idx]
            mean = [statistics.fmean(y) for y in ys]
            std = [statistics.stdev(y) if len(y) > 1 else 0.0 for y in ys]
            by_calls[METHODS[method][0]] = {"x": xc, "mean": mean, "std": std}
            by_time[METHODS[method][0]] = {"x": xt, "mean": mean, "std": std}
        if by_calls:
            name = "true reward (−JPEG kB)" if reward == "jpeg-kb" else "true reward (aesthetic)"
            panels[f"{reward}: {name} vs calls"] = ("true-reward calls", by_calls)
            panels[f"{reward}: {name} vs time"] = ("training seconds", by_time)
    return panels


#### MAIN ####

def names(p: Parser, flag: str, text: str, known: dict) -> list:
    got = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in got if x not in known]
    if bad or not got:
        p.error(f"{flag} {text!r}: {'unknown ' + repr(bad[0]) if bad else 'empty'}; allowed: {', '.join(known)}")
    return got


@command(PROG)
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["branch"]:
        return branch(argv[1:])
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="training seeds (default: 0,1,2)")
    p.add_argument("--rewards", default=",".join(REWARDS), help=f"comma list of {', '.join(REWARDS)} (default: all)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)} (default: all)")
    p.add_argument("--budget", type=int, default=BUDGET, help=f"true-reward calls per comparison run (default: {BUDGET})")
    p.add_argument("--out", default="out/lasro-fast", help="directory of the runs and evals (default: out/lasro-fast)")
    p.add_argument("--doc", default="docs/lasro_fast_results.md", help="report to write (default: docs/lasro_fast_results.md)")
    p.add_argument("--jobs", type=int, default=1, help="training runs at once, one CPU thread each (default: 1)")
    p.add_argument("--gen-args", default="", help="extra train.py flags of the generator runs, quoted (default: none)")
    p.add_argument("--train-args", default="", help="extra train.py flags of the comparison runs, quoted (default: none)")
    p.add_argument("--eval-args", default="", help="extra eval.py flags, quoted (default: none)")
    p.add_argument("--ignore-rule", action="store_true",
                   help="run the comparison on R0@2 even where it misses the generator rule (the doc says so)")
    p.add_argument("--report-only", action="store_true", help="train and evaluate nothing: rewrite --doc from --out")
    args = p.parse_args(argv)
    seeds = ints(p, "--seeds", args.seeds)
    rewards, methods = names(p, "--rewards", args.rewards, REWARDS), names(p, "--methods", args.methods, METHODS)
    if not seeds:
        p.error("--seeds: give at least one seed")
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: must be ≥ 1")
    if args.budget < 1:
        p.error(f"--budget {args.budget}: must be ≥ 1")
    out, log, t0 = ROOT / args.out, logger(PROG), time.time()
    try:
        plans = plan_runs(out, seeds, rewards, methods, args.budget, args.train_args.split())
    except ValueError as e:
        p.error(str(e))
    gen_dirs = [out / f"generator-seed{s}" for s in seeds]
    ev_gen, ev, timing_file = out / "eval-generator", out / "eval", out / "experiment.json"

    if args.report_only:
        if not (ev_gen / "report.json").exists() or not timing_file.exists():
            p.error(f"--report-only: {ev_gen / 'report.json'} or {timing_file} is missing; run without --report-only first")
        dec = decide(json.loads((ev_gen / "report.json").read_text()), seeds)
        timing = json.loads(timing_file.read_text())
    else:
        lock = take_lock(out, p, log)
        try:
            #### 1. THE GENERATOR: R0 at K steps per seed, then eval against the base at K ####
            todo = []
            for s, d in zip(seeds, gen_dirs):
                if finished(d, 1):
                    log(f"{d.name}: finished earlier, kept")
                    continue
                todo.append([sys.executable, "train.py", "--joint", JOINT, "--method", "r0", *args.gen_args.split(),
                             "--steps", K, "--seed", s, "--out", d, *(["--resume"] if (d / "run.json").exists() else [])])
            t_train = time.time()
            run_parallel(todo, args.jobs, out, PROG, log)
            trained, t_train = len(todo), time.time() - t_train
            run([sys.executable, "eval.py", "--ckpt", *gen_dirs, "--out", ev_gen, *args.eval_args.split()], PROG, log)
            dec = decide(json.loads((ev_gen / "report.json").read_text()), seeds)
            #### 2. THE COMPARISON, from each seed's generator, the same budget of true-reward calls ####
            if dec["ok"] or args.ignore_rule:
                todo = []
                for pl in plans:
                    if finished(pl["dir"], 2):
                        log(f"{pl['dir'].name}: finished earlier, kept")
                        continue
                    todo.append([sys.executable, "-m", "experiments.lasro_fast", "branch",
                                 out / f"generator-seed{pl['seed']}", *pl["flags"], "--out", pl["dir"]])
                t1 = time.time()
                run_parallel(todo, args.jobs, out, PROG, log)
                trained, t_train = trained + len(todo), t_train + time.time() - t1
            else:
                log(f"R0@{K} misses the generator rule: no comparison runs (see {args.doc})")
            if dec["ok"] or args.ignore_rule:
                run([sys.executable, "eval.py", "--ckpt", *gen_dirs, *[pl["dir"] for pl in plans], "--out", ev,
                     *args.eval_args.split()], PROG, log)
            if trained or not timing_file.exists():  # else the stored timing describes the real work
                timing_file.write_text(json.dumps(
                    {**timing_of(t0, t_train, trained, args.jobs), "plan": [
                        {k: (str(v) if isinstance(v, Path) else v) for k, v in pl.items() if k != "flags"}
                        for pl in plans]}, indent=1) + "\n")
            timing = json.loads(timing_file.read_text())
        finally:
            lock.release()

    #### 3. REPORT ####
    summary, figure = {}, None
    doc = ROOT / args.doc
    if dec["ok"] or args.ignore_rule:
        if not (ev / "report.json").exists():
            p.error(f"{ev / 'report.json'} is missing; run without --report-only first")
        report = json.loads((ev / "report.json").read_text())
        summary = summarize(collect(plans, report), args.budget)
        if summary:
            import eval as evaluation
            import plots

            figure = doc.with_name(doc.stem + "_curves.png")
            figure.parent.mkdir(parents=True, exist_ok=True)
            plots.curves_figure(curves(summary, rewards, methods), figure,
                                title=f"mean ± std over seeds {', '.join(map(str, seeds))}; budget {args.budget} calls")
            evaluation.write_grid(grid_rows(report, plans, seeds[0]), doc.with_name(doc.stem + "_grid.png"))
    write_report(dec, summary, args, seeds, rewards, methods, timing, doc, figure)
    log(f"wrote {doc} in {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
