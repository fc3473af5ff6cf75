"""The paper's Tables 3 and 6 at mini scale: every task order, averages, model soup, joint tuning.

    python -m experiments.table3 --jobs 2          6 orders x rid, baseline (seed 0) -> docs/mini_table3.md
    python -m experiments.table3 --seeds 0,1,2     the same with three seeds per order

Table 3 of the RIL paper fine-tunes SD-1.5 on all six orders of {aesthetic, hps, compress} with the
baseline and RID and prints each order's final metrics with Eq. 3 forgetting in parentheses, an
average row per method, the base model and a model soup; Table 6 compares joint tuning (one task on a
weighted sum of the rewards) with RID's average. This script runs the same on the mini world, with
one schedule for every order (train.py's mini preset, unchanged):
  - 12 sequences: train.py --tasks <order> --method rid|baseline --seed S;
  - the model soup as the paper's Sec. 6 builds it: three baseline models, each fine-tuned on ONE reward
    from the base model (train.py --tasks aesthetic | hps | compress), averaged with equal weights 1/3
    (the paper's α, β, 1 − α − β are not given; equal weights are model soup's uniform soup);
  - joint tuning as the paper's Table 6: the baseline on R_j = Σ w_r R_r, one task. The paper's weights
    (0.01, 2, 1) bring SD-scale rewards to comparable gradient size; here the same principle is applied
    to the mini world's rewards, measured, not tuned on the outcome: w_r ∝ 1 / ‖∂R_r/∂θ‖ at the base
    model (one batch of training prompts, a fresh adapter), scaled so compress has weight 1 as in the
    paper;
  - one eval.py over everything (the base model evaluated once, the soup as eval's --soup).
A rerun reuses finished runs and eval's cache; the paper's order (aesthetic → hps → compress) reuses
`python -m experiments.ril`'s seed runs when they are finished (the same command, so the same numbers).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import eval as evaluation
import plots
from cli import Parser, command
from experiments.common import (ROOT, finished, logger, mean_std, run, run_parallel, take_lock, train_cmd,
                                write_doc)
from experiments.common import timing as common_timing

PROG = "python -m experiments.table3"
REWARDS = ("aesthetic", "hps", "compress")
ABBREV = {"aesthetic": "A", "hps": "H", "compress": "C"}
ORDERS = ["".join(ABBREV[t] for t in p) for p in itertools.permutations(REWARDS)]  # AHC, ACH, HAC, ...
METHODS = ("baseline", "rid")
COLS = ("aesthetic", "hps", "png_kb", "jpeg_kb", "clip", "fid")  # the paper's Table 3 columns

# The paper's Table 3 (SD-1.5): final value and forgetting (None where it prints "-") per order and method.
PAPER_TABLE3 = {
    ("baseline", "AHC"): [(4.98, 1.09), (0.249, 0.033), (316.89, None), (34.20, None), (22.39, 3.38), (104.85, 33.31)],
    ("rid", "AHC"): [(5.55, 0.48), (0.272, 0.004), (373.63, None), (40.50, None), (25.00, 0.77), (80.28, 8.74)],
    ("baseline", "ACH"): [(5.28, 0.79), (0.280, None), (422.34, 36.71), (69.56, 24.53), (22.26, 3.51), (119.30, 47.76)],
    ("rid", "ACH"): [(5.40, 0.63), (0.281, None), (369.05, 15.64), (44.09, 7.21), (24.36, 1.41), (82.89, 11.35)],
    ("baseline", "CHA"): [(7.23, None), (0.265, 0.026), (307.13, 0.00), (37.58, 0.00), (18.92, 6.85), (124.57, 53.03)],
    ("rid", "CHA"): [(5.77, None), (0.275, 0.014), (343.71, 0.00), (40.83, 0.08), (24.43, 1.50), (91.04, 19.50)],
    ("baseline", "CAH"): [(5.25, 0.67), (0.279, None), (412.77, 35.78), (62.99, 22.88), (22.02, 3.75), (116.20, 44.66)],
    ("rid", "CAH"): [(5.19, 0.04), (0.283, None), (389.83, 3.46), (47.15, 6.40), (24.72, 1.21), (76.99, 5.45)],
    ("baseline", "HAC"): [(4.76, 1.81), (0.227, 0.058), (333.32, None), (29.35, None), (16.58, 9.19), (134.98, 63.44)],
    ("rid", "HAC"): [(5.66, 0.23), (0.274, 0.011), (327.52, None), (37.59, None), (24.06, 1.71), (92.28, 20.74)],
    ("baseline", "HCA"): [(6.18, None), (0.251, 0.034), (429.12, 76.56), (51.50, 11.46), (16.41, 9.36), (185.61, 114.07)],
    ("rid", "HCA"): [(5.75, None), (0.275, 0.010), (326.05, 8.55), (38.55, 0.57), (23.93, 1.84), (92.19, 20.65)],
}
PAPER_DECIMALS = (2, 3, 2, 2, 2, 2)  # as the paper prints each column
PAPER_ROWS = {"Stable Diffusion V1.5": (5.23, 0.259, 425.13, 50.40, 25.77, 71.54),
              "Model Soup": (5.56, 0.275, 399.15, 47.36, 25.23, 86.24),
              "Joint Tuning (Table 6)": (5.43, 0.263, 378.99, 49.20, 20.00, 82.52)}


def tasks_of(order: str) -> list:
    return [{v: k for k, v in ABBREV.items()}[c] for c in order]


def run_name(method: str, order: str, seed: int) -> str:
    return f"{method}-{order}-seed{seed}"


def paper_counts() -> dict:
    """Per Table 3 column: in how many orders RID's forgetting is below the baseline's, of the orders
    where the paper prints both."""
    out = {}
    for j, m in enumerate(COLS):
        pairs = [(PAPER_TABLE3["rid", o][j][1], PAPER_TABLE3["baseline", o][j][1]) for o in ORDERS]
        pairs = [(r, b) for r, b in pairs if r is not None and b is not None]
        out[m] = (sum(r < b for r, b in pairs), len(pairs))
    return out


#### TABLES FROM EVAL'S REPORT ####

def build_tables(rows: list, runs: dict, soup_dirs: list, joint_dirs: list) -> dict:
    """eval's report rows → the tables' data. runs: {run dir: (method, order, seed)} of the sequences;
    joint_dirs: the joint-tuning runs, one per seed. Returns {"final": {(method, order): [last-stage rows,
    one per seed]}, "average": {method: {metric: [the per-order means]}}, "base": row, "soup": row | None,
    "joint": [rows], "counts": {metric: (orders where RID's mean forgetting is lower, orders compared)},
    "pairs": {metric: [(order, seed, RID's forgetting, the baseline's)]}, "tests": {metric: pair_tests(...)}}."""
    by_dir = {}
    for r in rows:
        if r["stage"] > 0 and r["method"] != "soup":
            if r["stage"] >= by_dir.get(r["run"], {"stage": 0})["stage"]:
                by_dir[r["run"]] = r
    final, seeded = {}, {}
    for d, (method, order, seed) in runs.items():
        if d in by_dir:
            final.setdefault((method, order), []).append(by_dir[d])
            seeded[method, order, seed] = by_dir[d]
    average = {}
    for method in METHODS:
        per_order = [final[method, o] for o in ORDERS if (method, o) in final]
        average[method] = {m: [statistics.fmean(r["metrics"][m] for r in rs) for rs in per_order
                               if all(m in r["metrics"] for r in rs)] for m in COLS}
    seeds = sorted({seed for (_, _, seed) in seeded})
    by_seed = {method: {m: [statistics.fmean(seeded[method, o, sd]["metrics"][m] for o in ORDERS)
                            for sd in seeds if all((method, o, sd) in seeded and m in seeded[method, o, sd]["metrics"]
                                                   for o in ORDERS)] for m in COLS} for method in METHODS}
    counts, pairs = {}, {}
    for m in COLS:
        less = total = 0
        for o in ORDERS:
            if ("rid", o) not in final or ("baseline", o) not in final:
                continue
            fr, fb = ([r["forgetting"][m] for r in final[meth, o] if m in r["forgetting_shown"]]
                      for meth in ("rid", "baseline"))
            if fr and fb:
                total += 1
                less += statistics.fmean(fr) < statistics.fmean(fb)
        counts[m] = (less, total)
        pairs[m] = [(o, seed, rr["forgetting"][m], rb["forgetting"][m])
                    for (meth, o, seed), rr in sorted(seeded.items(), key=lambda kv: (ORDERS.index(kv[0][1]), kv[0][2]))
                    if meth == "rid" and (rb := seeded.get(("baseline", o, seed))) is not None
                    and m in rr["forgetting_shown"] and m in rb["forgetting_shown"]]
    base = next(r for r in rows if r["stage"] == 0)
    soup = next((r for r in rows if r["method"] == "soup"), None)
    joint = [by_dir[d] for d in joint_dirs if d in by_dir]
    return {"final": final, "average": average, "by_seed": by_seed, "base": base, "soup": soup, "joint": joint,
            "counts": counts,
            "pairs": pairs, "tests": {m: pair_tests([(r, b) for _, _, r, b in pairs[m]]) for m in COLS},
            "soup_dirs": soup_dirs}


#### PAIRED TESTS: does RID forget less than the baseline over the (order, seed) pairs? ####

def pair_tests(pairs: list) -> dict:
    """Over (RID's forgetting, the baseline's) pairs: how many pairs RID forgets less / more / the same,
    the two-sided exact sign test over the untied pairs, and the two-sided exact Wilcoxon signed-rank test
    (zero differences dropped, tied |differences| given their mean rank; the exact null distribution
    of W+ by counting the 2^n sign assignments with a dynamic programme over doubled ranks)."""
    d = [r - b for r, b in pairs]
    less, more = sum(x < 0 for x in d), sum(x > 0 for x in d)
    out = {"n": len(d), "less": less, "more": more, "ties": len(d) - less - more,
           "sign_p": sign_test_p(less, less + more), "wilcoxon_p": wilcoxon_p(d)}
    return out


def sign_test_p(k: int, n: int) -> float | None:
    """Two-sided exact binomial(n, 1/2) p-value of k successes: P(X ≤ min(k, n−k)) doubled, capped at 1."""
    if n == 0:
        return None
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def wilcoxon_p(diffs: list) -> float | None:
    """Two-sided exact Wilcoxon signed-rank p-value: 2·P(W+ ≤ min(W+, W−)) under the null, capped at 1."""
    d = [x for x in diffs if x != 0]
    n = len(d)
    if n == 0:
        return None
    order = sorted(range(n), key=lambda i: abs(d[i]))
    ranks2 = [0] * n  # doubled ranks: mean ranks of ties are then integers
    i = 0
    while i < n:
        j = i
        while j + 1 < n and abs(d[order[j + 1]]) == abs(d[order[i]]):
            j += 1
        for k in range(i, j + 1):
            ranks2[order[k]] = i + j + 2  # 2 × mean of the 1-based ranks i+1 .. j+1
        i = j + 1
    w_plus2 = sum(r for r, x in zip(ranks2, d) if x > 0)
    w_min2 = min(w_plus2, sum(ranks2) - w_plus2)
    ways = {0: 1}  # doubled rank sum of the positive signs → number of sign assignments
    for r in ranks2:
        nxt = dict(ways)
        for total, c in ways.items():
            nxt[total + r] = nxt.get(total + r, 0) + c
        ways = nxt
    return min(1.0, 2 * sum(c for total, c in ways.items() if total <= w_min2) / 2 ** n)


def _cell(rs: list, m: str) -> str:
    """'value (F)' over seeds: mean (± std when several), forgetting as the paper prints it."""
    v = mean_std([r["metrics"].get(m) for r in rs]) if len(rs) > 1 else _num(rs[0]["metrics"].get(m), m)
    if not all(m in r["forgetting_shown"] for r in rs):
        return f"{v} (-)"
    f = [r["forgetting"][m] for r in rs]
    return f"{v} ({mean_std(f) if len(f) > 1 else _num(f[0], m)})"


def _average(data: dict, method: str, m: str) -> str:
    """The average row: over the orders; with several seeds, mean ± std over the seeds' averages."""
    per_seed = data["by_seed"][method][m]
    if len(per_seed) > 1:
        return mean_std(per_seed)
    avg = data["average"][method][m]
    return _num(statistics.fmean(avg) if avg else None, m)


def _p(p: float | None) -> str:
    return "–" if p is None else f"{p:.2g}" if p < 0.01 else f"{p:.2f}"


def _num(v, m: str) -> str:
    return "–" if v is None else f"{v:.{evaluation.METRICS[m][2]}f}"


def write_markdown(data: dict, facts: list, path: Path, weights: dict, figure: str) -> None:
    head = ["Method", "Tasks"] + [f"{evaluation.METRICS[m][0]} {'↑' if evaluation.METRICS[m][1] else '↓'}" for m in COLS]
    sep = "|" + "---|" * len(head)
    lines = ["## Table 3 at mini scale", "",
             "Final metrics after the last task; forgetting (the paper's Eq. 3, ≥ 0, lower is better) in parentheses, "
             "\"(-)\" where the paper prints a dash (a target metric whose task was not trained before the last "
             "stage). With several seeds: mean ± std.", "", "| " + " | ".join(head) + " |", sep]
    for o in ORDERS:
        for method in METHODS:
            if (method, o) in data["final"]:
                lines.append(f"| {method} | {o} | " + " | ".join(_cell(data["final"][method, o], m) for m in COLS) + " |")
    for method in METHODS:
        lines.append(f"| Average ({method}) | | " + " | ".join(_average(data, method, m) for m in COLS) + " |")
    lines.append("| Base model | | " + " | ".join(_num(data["base"]["metrics"].get(m), m) for m in COLS) + " |")
    if data["soup"]:
        lines.append("| Model soup | | " + " | ".join(_num(data["soup"]["metrics"].get(m), m) for m in COLS) + " |")
    lines += ["", "Orders: A = aesthetic, H = hps, C = compress, in training order (AHC is the paper's Table 2 "
              "order). The model soup averages three baseline models, each fine-tuned on one reward from the base "
              "model, with equal weights 1/3 (" + ", ".join(Path(d).parent.name for d in data["soup_dirs"]) + "): "
              "the paper's Sec. 6 soup of three single-reward baseline models; its mixing coefficients are not "
              "given, and equal weights are model soup's uniform soup.", ""]

    lines += ["## Table 6 at mini scale", "", "| Method | " + " | ".join(head[2:]) + " |", "|" + "---|" * (len(COLS) + 1),
              "| Base model | " + " | ".join(_num(data["base"]["metrics"].get(m), m) for m in COLS) + " |"]
    if data["joint"]:
        lines.append("| Joint tuning (baseline) | " + " | ".join(
            mean_std([r["metrics"].get(m) for r in data["joint"]]) if len(data["joint"]) > 1
            else _num(data["joint"][0]["metrics"].get(m), m) for m in COLS) + " |")
    for method in ("rid", "baseline"):
        lines.append(f"| Average ({method}) | " + " | ".join(_average(data, method, m) for m in COLS) + " |")
    lines += ["", "Joint tuning: the baseline method on one task rewarded by " + " + ".join(
        f"{w:.3g}·R_{r}" for r, w in weights.items()) + " (weights ∝ 1/‖∂R/∂θ‖ measured at the base model, "
        "compress = 1; the paper's SD-scale weights are 0.01 / 2 / 1), for the mini preset's longest schedule "
        "among its rewards" + (f", one run per seed ({len(data['joint'])}); the averages over the six orders are "
        "per seed, then mean ± std over the seeds." if len(data["joint"]) > 1 else "."), ""]

    counts, paper, tests = data["counts"], paper_counts(), data["tests"]
    lines += ["## Where RID forgets less", "",
              "Per metric: the orders in which RID's forgetting (mean over seeds) is below the baseline's, of the "
              "orders where both are defined (the paper prints a dash for a target metric whose task came last); "
              "the (order, seed) pairs in which RID forgets less / more; and two-sided exact paired tests over "
              "those pairs (sign test; Wilcoxon signed-rank on RID − baseline). A small p says the direction "
              "is unlikely to be chance at this many pairs; it is not a statement about SD-1.5.", "",
              "| | " + " | ".join(evaluation.METRICS[m][0] for m in COLS) + " |", "|" + "---|" * (len(COLS) + 1),
              "| orders, mini world | " + " | ".join(f"{a} of {n}" for a, n in (counts[m] for m in COLS)) + " |",
              "| (order, seed) pairs: RID less | " + " | ".join(f"{tests[m]['less']} of {tests[m]['n']}" for m in COLS) + " |",
              "| (order, seed) pairs: RID more | " + " | ".join(f"{tests[m]['more']} of {tests[m]['n']}" for m in COLS) + " |",
              "| sign test p | " + " | ".join(_p(tests[m]["sign_p"]) for m in COLS) + " |",
              "| Wilcoxon p | " + " | ".join(_p(tests[m]["wilcoxon_p"]) for m in COLS) + " |",
              "| orders, paper (SD-1.5, Table 3) | " + " | ".join(f"{a} of {n}" for a, n in (paper[m] for m in COLS)) + " |",
              "", "Per order, the seeds in which RID forgets less than the baseline (\"–\": not defined for that order):", "",
              "| Order | " + " | ".join(evaluation.METRICS[m][0] for m in COLS) + " |", "|" + "---|" * (len(COLS) + 1)]
    for o in ORDERS:
        cells = []
        for m in COLS:
            ps = [(r, b) for order, _, r, b in data["pairs"][m] if order == o]
            cells.append(f"{sum(r < b for r, b in ps)} of {len(ps)}" if ps else "–")
        lines.append(f"| {o} | " + " | ".join(cells) + " |")
    lines += ["", f"![forgetting per order and method]({figure})", ""]

    lines += ["## The paper's Table 3 (reference)", "", "| Method | Tasks | " + " | ".join(head[2:]) + " |",
              "|" + "---|" * (len(COLS) + 2)]
    for o in ORDERS:
        for method in METHODS:
            lines.append(f"| {method} | {o} | " + " | ".join(
                f"{v:.{d}f} ({'-' if f is None else f'{f:.{d}f}'})"
                for (v, f), d in zip(PAPER_TABLE3[method, o], PAPER_DECIMALS)) + " |")
    for name, vals in PAPER_ROWS.items():
        lines.append(f"| {name} | | " + " | ".join(f"{v:.{d}f}" for v, d in zip(vals, PAPER_DECIMALS)) + " |")
    write_doc(path, "\n".join(["# The paper's Tables 3 and 6 in the mini world", "", *facts, "", *lines]))


#### JOINT WEIGHTS ####

def joint_weights(n_prompts: int = 8, seed: int = 0) -> dict:
    """w_r ∝ 1/‖∂R_r/∂θ‖ at the base mini model (a fresh adapter, one batch of training prompts, the
    baseline's last-step gradient), scaled so compress has weight 1."""
    import torch

    import mini
    import rewards
    import rid

    world = json.loads((mini.WORLD / "world.json").read_text())
    prompts = (mini.WORLD / "prompts" / "train.txt").read_text().splitlines()[:n_prompts]
    spec = rewards.load_spec(mini.REWARD_SPEC)
    models = rid.load_models(mini.MODEL)
    group = rid.inject(models.unet)
    group.add_task("probe", generator=torch.Generator().manual_seed(seed))
    cfg = rid.StepConfig(method="baseline", steps=int(world["steps"]), guidance=float(world["guidance"]))
    noise = torch.randn(n_prompts, *models.latent_shape, generator=torch.Generator().manual_seed(seed))
    norms = {}
    for name in REWARDS:
        group.flat.grad = None
        loss, _ = rid.method_loss(models, group, rewards.get(name, spec), prompts, noise, cfg)
        loss.backward()
        norms[name] = float(group.flat.grad.norm())
    return {name: norms["compress"] / norms[name] for name in REWARDS}


#### MAIN ####

@command(PROG)
def main(argv=None) -> int:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0", help="comma list of training seeds per order (default: 0, as the paper)")
    p.add_argument("--out", default="out/mini-table3", help="directory of the runs and the eval (default: out/mini-table3)")
    p.add_argument("--doc", default="docs/mini_table3.md", help="report to write (default: docs/mini_table3.md)")
    p.add_argument("--jobs", type=int, default=1, help="training runs at once, each on 1 CPU thread (default: 1)")
    p.add_argument("--reuse", default="out/mini-experiment",
                   help="where `python -m experiments.ril` keeps its runs; its finished seed runs stand for the "
                        "AHC order (default: out/mini-experiment)")
    p.add_argument("--train-args", default="", help="extra train.py flags, quoted (default: none)")
    p.add_argument("--eval-args", default="", help="extra eval.py flags, quoted (default: none)")
    args = p.parse_args(argv)
    try:
        seeds = sorted({int(s) for s in args.seeds.split(",") if s.strip()})
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: expected a comma list of integers ≥ 0, e.g. 0,1,2")
    if not seeds or min(seeds) < 0:
        p.error(f"--seeds {args.seeds!r}: expected a comma list of integers ≥ 0, e.g. 0,1,2")
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: must be ≥ 1")
    out, log, t0 = ROOT / args.out, logger(PROG), time.time()
    extra = args.train_args.split()

    lock = take_lock(out, p, log)  # one experiment per --out (its train.py runs lock their own directories)
    try:
        #### TRAIN: sequences, single-reward runs for the soup, the joint run ####
        runs, todo = {}, []
        for seed in seeds:
            for order in ORDERS:
                for method in METHODS:
                    d = out / run_name(method, order, seed)
                    runs[str(d)] = (method, order, seed)
                    reuse = ROOT / args.reuse / f"{method}-seed{seed}"
                    if order == "AHC" and not d.exists() and not extra and finished(reuse, 3):
                        shutil.copytree(reuse, d, ignore=shutil.ignore_patterns("eval"))
                        log(f"{d.name}: copied from {reuse} (the same train.py command)")
                    if not finished(d, 3):
                        todo.append(train_cmd(d, ",".join(tasks_of(order)), method, seed, *extra))
        singles = [out / f"baseline-{ABBREV[t]}-seed{seeds[0]}" for t in REWARDS]
        for t, d in zip(REWARDS, singles):
            if not finished(d, 1):
                todo.append(train_cmd(d, t, "baseline", seeds[0], *extra))
        weights_file = out / "joint_weights.json"
        if weights_file.exists():
            weights = json.loads(weights_file.read_text())
        else:
            log("measuring the joint weights (reward gradient norms at the base model)")
            weights = joint_weights()
            out.mkdir(parents=True, exist_ok=True)
            weights_file.write_text(json.dumps(weights, indent=1) + "\n")
        joint_dirs = {seed: out / f"baseline-joint-seed{seed}" for seed in seeds}  # Table 6: one per seed
        spec = ",".join(f"{r}:{w:.6g}" for r, w in weights.items())
        for seed, d in joint_dirs.items():
            if not finished(d, 1):
                todo.append(train_cmd(d, None, "baseline", seed, "--joint", spec, *extra))
        log(f"{len(todo)} run(s) to train, {len(runs) + len(singles) + len(joint_dirs) - len(todo)} finished earlier")
        run_parallel(todo, args.jobs, out, PROG, log)
        t_train = time.time() - t0

        #### EVALUATE everything side by side, the soup with it ####
        ev = out / "eval"
        run([sys.executable, "eval.py", "--ckpt", *runs, *singles, *joint_dirs.values(), "--soup", *singles,
             "--weights", *(["0.333333333333"] * 3), "--out", ev, *args.eval_args.split()], PROG, log)
        timing_file = out / "experiment.json"
        if todo or not timing_file.exists():
            timing_file.write_text(json.dumps(common_timing(t0, t_train, len(todo), args.jobs), indent=1) + "\n")
        timing = json.loads(timing_file.read_text())
    finally:
        lock.release()

    #### REPORT ####
    report = json.loads((ev / "report.json").read_text())
    resolved = {str(Path(d).resolve()): v for d, v in runs.items()}
    rows = [{**r, "run": str(Path(r["run"]).resolve())} for r in report["rows"]]
    data = build_tables(rows, resolved, [str(d / f"stage1-{t}") for d, t in zip(singles, REWARDS)],
                        [str(d.resolve()) for d in joint_dirs.values()])
    doc = ROOT / args.doc
    figure = doc.with_name(doc.stem + "_forgetting.png")
    labelled = [{**r, "method": f"{resolved[r['run']][0]} {resolved[r['run']][1]}"} for r in rows if r["run"] in resolved]
    doc.parent.mkdir(parents=True, exist_ok=True)
    plots.forgetting_figure(evaluation.last_stage_rows(labelled), evaluation.METRICS, figure)
    facts = [f"`{PROG} --seeds {args.seeds} --jobs {args.jobs}` ({timing['date']}). Wall time "
             f"{timing['train_min']:.1f} min training ({timing['trained_runs']} runs, {timing['jobs']} at a time), "
             f"{timing['total_min']:.1f} min with evaluation, on {timing['cpu']}; peak RSS of any one process "
             f"{timing['peak_rss_gb']:.2f} GB. Every run uses train.py's mini preset unchanged (the schedule of "
             "docs/mini_results.md), whatever the order."]
    write_markdown(data, facts, doc, weights, figure.name)
    log(f"wrote {doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else doc} in {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
