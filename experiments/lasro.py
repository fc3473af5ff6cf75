"""A black-box task in the RIL sequence, at CPU scale: aesthetic → hps → jpeg-kb through LaSRO's surrogate.

    python -m experiments.lasro --jobs 2          rid and baseline, seeds 0,1,2 → docs/lasro_results.md

For every (method, seed) it runs `train.py --tasks aesthetic,hps,jpeg-kb`, where jpeg-kb is the true
JPEG size through PIL (no gradient) and the method maximises the surrogate of it (surrogate.py); the
ablation `rid-frozen` does the same with the surrogate frozen after pre-training
(`--surrogate-adapt-every 0`). The comparison with the differentiable compress task uses the RIL
experiment's runs (`--ril-out`, python -m experiments.ril; trained here when missing): the same
first two stages, then compress. ONE eval.py scores every run; the doc gives the forgetting table as
docs/mini_results.md does, the true JPEG kB before and after the black-box stage per seed (target:
lower in every seed), the surrogate's held-out pair accuracy (target ≥ 0.8), the frozen ablation,
and what the surrogate costs (pre-training's share of the stage, per-step time against compress).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import eval as evaluation
from experiments import ril
from cli import Parser, command
from experiments.common import ROOT, finished, ints, logger, mean_std, train_cmd, train_then_eval, write_doc

PROG = "python -m experiments.lasro"
BLACK = "jpeg-kb"
TASKS = f"aesthetic,hps,{BLACK}"
COMPARE = "aesthetic,hps,compress"


def metrics_rows(stage_dir: Path) -> list:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def first_last(rows: list, key: str, n: int = 10) -> tuple:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return (statistics.fmean(vals[:n]), statistics.fmean(vals[-n:])) if vals else (None, None)


def per_seed_table(report: dict, run_of: dict, label: str, task: str) -> list:
    """[(seed, JPEG kB at stage 2, at stage 3)] of the runs labelled `label` (stage 3 trained `task`)."""
    out = []
    for r in report["rows"]:
        lab = run_of.get(str(Path(r["run"]).resolve()))
        if lab == label and r["stage"] == 3 and r["name"].endswith(task):
            prev = [x for x in report["rows"] if x["run"] == r["run"] and x["stage"] == 2]
            seed = int(Path(r["run"]).name.rsplit("seed", 1)[1])
            out.append((seed, prev[0]["metrics"].get("jpeg_kb") if prev else None, r["metrics"].get("jpeg_kb")))
    return sorted(out)


@command(PROG)
def main(argv=None) -> int:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="rid,baseline", help="comma list of train.py methods (default: rid,baseline)")
    p.add_argument("--seeds", default="0,1,2", help="comma list of training seeds (default: 0,1,2)")
    p.add_argument("--out", default="out/lasro", help="directory of the runs and the eval (default: out/lasro)")
    p.add_argument("--ril-out", default="out/mini-experiment",
                   help="the RIL experiment's runs, the compress comparison (default: out/mini-experiment)")
    p.add_argument("--doc", default="docs/lasro_results.md", help="report to write (default: docs/lasro_results.md)")
    p.add_argument("--jobs", type=int, default=1, help="training runs at once, one CPU thread each (default: 1)")
    p.add_argument("--no-ablation", action="store_true", help="skip the frozen-surrogate ablation runs")
    p.add_argument("--train-args", default="", help="extra train.py flags for every run, quoted (default: none)")
    p.add_argument("--eval-args", default="", help="extra eval.py flags, quoted (default: none)")
    p.add_argument("--report-only", action="store_true",
                   help="train and evaluate nothing: rewrite --doc from --out's eval/report.json, the runs' own "
                        "files and the timings stored in --out/experiment.json")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    seeds = ints(p, "--seeds", args.seeds)
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: must be ≥ 1")
    if not methods or not seeds:
        p.error("--methods and --seeds need at least one entry each")
    out, ril_out, log, t0 = ROOT / args.out, ROOT / args.ril_out, logger(PROG), time.time()

    #### TRAIN: the black-box sequence, its frozen ablation, the compress comparison ####
    # The black-box runs share their first two stages with the compress run of the same method and seed
    # (train.py --branch-from copies them: stage k's draws depend on (seed, k) only), so the compress
    # runs train first and every black-box run trains its third stage alone.
    plan = []  # (label, run dir, tasks, method, extra flags)
    for seed in seeds:
        for m in methods:
            plan.append((f"{m} (compress)", ril_out / f"{m}-seed{seed}", COMPARE, m, []))
            plan.append((m, out / f"{m}-seed{seed}", TASKS, m, ["--branch-from", ril_out / f"{m}-seed{seed}"]))
        if not args.no_ablation:
            plan.append(("rid-frozen", out / f"rid-frozen-seed{seed}", TASKS, "rid",
                         ["--surrogate-adapt-every", "0", "--branch-from", ril_out / f"rid-seed{seed}"]))
    if not args.no_ablation and "rid" not in methods:
        p.error("the frozen-surrogate ablation branches from the rid runs: add rid to --methods or pass --no-ablation")
    run_of, phases = {}, ([], [])
    for label, d, tasks, m, extra in plan:
        run_of[str(d.resolve())] = label
        if finished(d, 3):
            log(f"{d}: finished earlier, kept")
            continue
        phases[tasks == TASKS].append(train_cmd(d, tasks, m, int(d.name.rsplit("seed", 1)[1]), *extra,
                                                *args.train_args.split()))
    #### then EVALUATE every run side by side ####
    ev, timing = train_then_eval(list(phases), [d for _, d, *_ in plan], out, args, p, t0, PROG, log)
    report = json.loads((ev / "report.json").read_text())

    #### REPORT ####
    doc = ROOT / args.doc
    groups = ril.aggregate(report, run_of)
    metrics = evaluation.METRICS
    cols = [m for m in metrics if any(m in g["metrics"] for g in groups.values())]
    order = lambda kv: (kv[0][1], kv[0][0])  # noqa: E731
    lines = ["| Method | Stage | " + " | ".join(f"{metrics[m][0]} {'↑' if metrics[m][1] else '↓'}" for m in cols) + " |",
             "|" + "---|" * (len(cols) + 2)]
    for (label, stage, name), g in sorted(groups.items(), key=order):
        lines.append(f"| {label} | {stage}: {name} | " + " | ".join(mean_std(g["metrics"].get(m, [])) for m in cols) + " |")
    lines += ["", "**Forgetting** after the last stage (Eq. 3; F for CLIP, FID and the earlier tasks' metrics, "
              "\"-\" otherwise), mean ± std over seeds:", "",
              "| Method | " + " | ".join(metrics[m][0] for m in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for (label, stage, name), g in sorted(groups.items(), key=order):
        if stage == 3 and g["forgetting"]:
            lines.append(f"| {label} | " + " | ".join(mean_std(g["forgetting"].get(m, [])) if m in g["shown"] else "-"
                                                      for m in cols) + " |")

    lines += ["", "**True JPEG kB** (eval.py's metric, lower is better) at stage 2 (after hps) and after the third "
              "stage, per seed:", "", "| Run | seed | stage 2 | stage 3 | lower? |", "|---|---|---|---|---|"]
    for label in [*methods, *(["rid-frozen"] if not args.no_ablation else []), *[f"{m} (compress)" for m in methods]]:
        task = "compress" if label.endswith("(compress)") else BLACK
        for seed, before, after in per_seed_table(report, run_of, label, task):
            lower = "–" if before is None or after is None else ("yes" if after < before else "**no**")
            lines.append(f"| {label} | {seed} | {before if before is None else f'{before:.3f}'} | "
                         f"{after if after is None else f'{after:.3f}'} | {lower} |")

    lines += ["", "**The surrogate** (train.py's surrogate.json and metrics.jsonl): held-out pair accuracy after "
              "pre-training and at the stage's end, Kendall τ at the end, and over the stage's training steps the "
              "surrogate score and the true reward (mean of the first → last 10 steps); mean ± std over seeds:", "",
              "| Run | pair acc. (pre-trained) | pair acc. (end) | Kendall τ (end) | surrogate score | true reward (−kB) |",
              "|---|---|---|---|---|---|"]
    cost = []
    for label in [*methods, *(["rid-frozen"] if not args.no_ablation else [])]:
        acc0, acc1, tau, s0, s1, r0, r1 = ([] for _ in range(7))
        for _, d, tasks, *_ in [x for x in plan if x[0] == label]:
            sdir = d / f"stage3-{BLACK}"
            rep = json.loads((sdir / "surrogate.json").read_text())
            acc0.append((rep.get("pretrain") or {}).get("pair_acc"))
            acc1.append(rep["final"]["pair_acc"])
            tau.append(rep["final"]["kendall_tau"])
            rows = metrics_rows(sdir)
            a, b = first_last(rows, "surrogate")
            s0.append(a), s1.append(b)
            a, b = first_last(rows, "true_reward")
            r0.append(a), r1.append(b)
            compress_dir = ril_out / d.name.replace("rid-frozen", "rid") / "stage3-compress"
            if label in methods and compress_dir.exists():
                pre = (rep.get("pretrain") or {}).get("seconds", 0.0)
                t_black, t_comp = rows[-1]["time"], metrics_rows(compress_dir)[-1]["time"]
                cost.append((label, d.name, pre, t_black, t_comp, len(rows)))
        lines.append(f"| {label} | {mean_std(acc0)} | {mean_std(acc1)} | {mean_std(tau)} | "
                     f"{mean_std(s0)} → {mean_std(s1)} | {mean_std(r0, 4)} → {mean_std(r1, 4)} |")
    if cost:
        lines += ["", "**Cost** of the surrogate (stage 3, seconds; runs share 2 cores, so compare within a row): "
                  "pre-training, then the training steps with the surrogate (its adaptation and the true reward "
                  "included) against the same steps on compress:", "",
                  "| Run | pre-training | steps (jpeg-kb) | steps (compress) | per-step ratio | pre-training share |",
                  "|---|---|---|---|---|---|"]
        for label, name, pre, t_black, t_comp, n in cost:
            lines.append(f"| {name} | {pre:.0f} | {t_black:.0f} | {t_comp:.0f} | {t_black / t_comp:.2f}× | "
                         f"{pre / (pre + t_black):.0%} |")
    facts = [f"`{PROG} --methods {args.methods} --seeds {args.seeds} --jobs {args.jobs}` ({timing['date']}). "
             f"Wall time {timing['train_min']:.1f} min training ({timing['trained_runs']} runs), "
             f"{timing['total_min']:.1f} min with evaluation, on {timing['cpu']}; peak RSS {timing['peak_rss_gb']:.2f} GB."]
    write_doc(doc, "\n".join(["# A black-box task in the RIL sequence (LaSRO's surrogate), mini world", "",
                              *facts, "", *lines, ""]))
    log(f"wrote {doc} in {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
