"""The RIL experiment of the paper, at CPU scale: methods × seeds on the mini world, one report.

    python -m experiments.ril                      rid and baseline, seeds 0,1,2 → docs/mini_results.md
    python -m experiments.ril --lams 0.1,1,10      the same with one rid run per λ (a sweep of RID's weight)
    python -m experiments.ril --model mini/flow    the same on the mini flow world (SD3 transformer, Euler)
                                                   → out/mini-flow-experiment, docs/mini_flow_results.md

For every (method, seed) it runs `train.py --tasks aesthetic,hps,compress --method M --seed S`
(resumed when a run directory already holds finished stages), then ONE `eval.py` over all runs
(same test prompts, same initial noise for every stage and method, the base model evaluated once),
and writes the table of mean ± std over seeds of every metric per (method, stage) and of the
forgetting (paper Eq. 3) on the last stage, with the sample grid, wall time and peak RSS.

The mini world's schedule (train.py's mini_world preset) gives both methods the same batch, epochs
and learning rates except on hps, where each has its own lr schedule, as in the paper (RID constant
5e-4, the baseline half a cosine from 7e-4; docs/mini_results.md's notes say why).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import eval as evaluation  # the repo's eval.py: METRICS, the sample grid, the last-stage rows
import plots
from cli import Parser, command
from experiments.common import (ROOT, add_model_flag, finished, flow_section, ints, logger, mean_std,
                                resolve_model, schedule_lines, train_cmd, train_then_eval, write_doc)

TASKS = "aesthetic,hps,compress"


PAPER_LAM = 0.1
PROG = "python -m experiments.ril"


def variants(methods: list, lams: list) -> list:
    """(method, λ) pairs: one per λ for rid, λ = None (not used) for every other method."""
    return [(m, lam) for m in methods for lam in (lams if m == "rid" else [None])]


def run_name(method: str, lam, seed: int) -> str:
    """rid-seed0 at the paper's λ (as before λ sweeps existed), rid-lam10-seed0 otherwise."""
    tag = "" if lam is None or lam == PAPER_LAM else f"-lam{lam:g}"
    return f"{method}{tag}-seed{seed}"


def label(method: str, lam, lams: list) -> str:
    return f"{method} λ={lam:g}" if lam is not None and len(lams) > 1 else method


def aggregate(report: dict, run_of: dict) -> dict:
    """report.json rows → {(method, stage, name): {"metrics": {m: [values over seeds]}, "forgetting": …}}."""
    groups: dict = {}
    for row in report["rows"]:
        method = "base" if row["stage"] == 0 else run_of.get(str(Path(row["run"]).resolve()), row["method"])
        g = groups.setdefault((method, row["stage"], row["name"]), {"metrics": {}, "forgetting": {}, "shown": set()})
        for m, v in row["metrics"].items():
            g["metrics"].setdefault(m, []).append(v)
        for m, v in (row["forgetting"] or {}).items():
            g["forgetting"].setdefault(m, []).append(v)
        g["shown"].update(row.get("forgetting_shown", []))
    return groups


def write_markdown(groups: dict, metrics: dict, seeds: list, facts: list, path: Path, train: dict | None = None,
                   title: str = "# The mini world's RIL experiment", tail: list = ()) -> None:
    cols = [m for m in metrics if any(m in g["metrics"] for g in groups.values())]
    head = ["Method", "Stage"] + [f"{metrics[m][0]} {'↑' if metrics[m][1] else '↓'}" for m in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (method, stage, name), g in sorted(groups.items(), key=lambda kv: (kv[0][1], not kv[0][0].startswith("rid"), kv[0][0])):
        lines.append(f"| {method} | {stage}: {name} | " + " | ".join(mean_std(g["metrics"].get(m, [])) for m in cols) + " |")
    lines += ["", f"**Forgetting** at each stage (the paper's Eq. 3: the largest drop from any stage 0…k to stage k, "
              f"so F ≥ 0 and lower is better for every metric), mean ± std over seeds {', '.join(map(str, seeds))}. "
              "As in the paper's Tables 2 and 3, F is given for CLIP and FID at every stage and for a target metric "
              "only once its task was trained before the stage; \"-\" otherwise (eval's report.json keeps every "
              "stage's values, so any other convention can be recomputed).", "",
              "| Method | Stage | " + " | ".join(metrics[m][0] for m in cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for (method, stage, name), g in sorted(groups.items(), key=lambda kv: (kv[0][1], not kv[0][0].startswith("rid"), kv[0][0])):
        if stage > 0 and g["forgetting"]:
            lines.append(f"| {method} | {stage}: {name} | " + " | ".join(
                mean_std(g["forgetting"].get(m, [])) if m in g["shown"] else "-" for m in cols) + " |")
    if train:
        lines += ["", "**Training reward** of each task (train.py's metrics.jsonl, mean of the first and of the last "
                  "10 optimizer steps of the task), mean ± std over seeds:", "",
                  "| Method | Task | start | end |", "|---|---|---|---|"]
        for (method, task), (first, last) in sorted(train.items(), key=lambda kv: (not kv[0][0].startswith("rid"), kv[0])):
            lines.append(f"| {method} | {task} | {mean_std(first, 4)} | {mean_std(last, 4)} |")
    if tail:
        lines += ["", *tail]
    write_doc(path, "\n".join([title, "", *facts, "", *lines, ""]))


@command(PROG)
def main(argv=None) -> int:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="rid,baseline", help="comma list of train.py methods (default: rid,baseline)")
    p.add_argument("--seeds", default="0,1,2", help="comma list of training seeds (default: 0,1,2)")
    p.add_argument("--lams", default="0.1",
                   help="comma list of RID's λ; one rid run per λ and seed (default: 0.1, the paper's)")
    p.add_argument("--tasks", default=TASKS, help=f"task sequence (default: {TASKS})")
    add_model_flag(p)
    p.add_argument("--out", help="directory of the runs and the eval (default: out/mini-experiment; with --model "
                                 "mini/flow: out/mini-flow-experiment)")
    p.add_argument("--doc", help="report to write (default: docs/mini_results.md; with --model mini/flow: "
                                 "docs/mini_flow_results.md)")
    p.add_argument("--jobs", type=int, default=1,
                   help="training runs at once, each on 1 CPU thread (default: 1, all threads); "
                        "the mini model is too small to use many threads well, so --jobs 2 on 2 cores is faster")
    p.add_argument("--train-args", default="", help="extra train.py flags, quoted (default: none)")
    p.add_argument("--eval-args", default="", help="extra eval.py flags, quoted (default: none)")
    p.add_argument("--report-only", action="store_true",
                   help="train and evaluate nothing: rewrite --doc from --out's eval/report.json and the timings "
                        "the run that did the work stored in --out/experiment.json")
    args = p.parse_args(argv)
    model_flags, flow = resolve_model(p, args,
                                      lambda tag: f"out/mini-{tag}-experiment" if tag else "out/mini-experiment",
                                      lambda tag: f"docs/mini_{tag}_results.md" if tag else "docs/mini_results.md")
    methods = [m for m in args.methods.split(",") if m]
    seeds = ints(p, "--seeds", args.seeds)
    try:
        lams = [float(x) for x in args.lams.split(",") if x]
    except ValueError:
        p.error(f"--lams {args.lams!r}: expected a comma list of numbers, e.g. 0.1,1,10")
    if not lams or min(lams) < 0:
        p.error(f"--lams {args.lams!r}: expected one or more numbers ≥ 0")
    out, n_tasks = ROOT / args.out, len(args.tasks.split(","))
    log = logger(PROG)
    t0 = time.time()

    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: must be ≥ 1")

    #### TRAIN every (method, seed) ####
    run_of, dirs, todo = {}, [], []
    for seed in seeds:
        for method, lam in variants(methods, lams):
            d = out / run_name(method, lam, seed)
            run_of[str(d.resolve())] = label(method, lam, lams)
            dirs.append(d)
            if finished(d, n_tasks):
                log(f"{d.name}: finished earlier, kept")
                continue
            todo.append(train_cmd(d, args.tasks, method, seed, *model_flags,
                                  *(["--lam", f"{lam:g}"] if lam is not None else []),
                                  *args.train_args.split()))
    ev, timing = train_then_eval([todo], dirs, out, args, p, t0, PROG, log)

    #### REPORT: mean ± std over seeds ####
    report = json.loads((ev / "report.json").read_text())
    doc = ROOT / args.doc
    doc.parent.mkdir(parents=True, exist_ok=True)
    grid = doc.with_name(doc.stem + "_grid.png")
    rows = [{**r, "method": "base" if r["stage"] == 0 else run_of.get(str(Path(r["run"]).resolve()), r["method"])}
            for r in report["rows"]]  # labelled by variant (method, λ), seeds pooled
    first_seed = [r for r in rows if r["stage"] == 0
                  or str(Path(r["run"]).resolve()) in {str(d.resolve()) for d in dirs if d.name.endswith(f"-seed{seeds[0]}")}]
    evaluation.write_grid(first_seed, grid)
    stages_png, forgetting_png = doc.with_name(doc.stem + "_stages.png"), doc.with_name(doc.stem + "_forgetting.png")
    plots.stage_figure(rows, evaluation.METRICS, stages_png)
    plots.forgetting_figure(evaluation.last_stage_rows(rows), evaluation.METRICS, forgetting_png)
    lam_flag = f" --lams {args.lams}" if args.lams != "0.1" else ""
    model = f" --model {args.model}" if flow else ""
    facts = [f"`python -m experiments.ril{model} --methods {args.methods}{lam_flag} --seeds {args.seeds} "
             f"--jobs {args.jobs}` "
             f"({timing['date']}; tasks {args.tasks}). Wall time {timing['train_min']:.1f} min training "
             f"({timing['trained_runs']} runs, {timing['jobs']} at a time), {timing['total_min']:.1f} min with "
             f"evaluation, on {timing['cpu']}; peak RSS of any one process {timing['peak_rss_gb']:.2f} GB.",
             f"Sample grid (rows: the base model, then every stage of seed {seeds[0]}'s run of each method; columns: "
             f"the first test prompts, the same noise everywhere): [{grid.name}]({grid.name}). Figures (mean ± std over "
             f"seeds): [every metric across stages]({stages_png.name}), [forgetting after the last stage]"
             f"({forgetting_png.name}).", "", f"![metrics across stages]({stages_png.name})", "",
             f"![forgetting after the last stage]({forgetting_png.name})"]
    title, tail = "# The mini world's RIL experiment", []
    if flow:  # what the flow world's runs trained with, and what differs from the UNet world's DDIM
        title = "# The mini flow world's RIL experiment"
        facts += ["", f"Model: {args.model}, an SD3 transformer on a rectified flow (flow.json). Schedule: train.py's "
                  "mini-world preset, the UNet world's unchanged (each method's batch, epochs, lr and lr schedule "
                  "per task, below, read from the runs' run.json): the same prompts, rewards and batch, so the two "
                  "worlds compare; it was not retuned for the flow model, whose own best schedule is open).", "",
                  *schedule_lines(dirs, lambda d: run_of[str(d.resolve())])]
        tail = flow_section(flow, str(Path(args.model).resolve()), [flow["steps"]])
    write_markdown(aggregate(report, run_of), evaluation.METRICS, seeds, facts, doc,
                   training_rewards(dirs, run_of, args.tasks.split(",")), title, tail)
    show = lambda f: f.relative_to(ROOT) if f.is_relative_to(ROOT) else f  # noqa: E731
    log(f"wrote {show(doc)} and {show(grid)} in {(time.time() - t0) / 60:.1f} min")
    return 0


def training_rewards(dirs: list, run_of: dict, tasks: list, n: int = 10) -> dict:
    """{(label, task): ([first-n-steps mean per seed], [last-n-steps mean per seed])} from metrics.jsonl:
    the reward each task trains on, at its start and its end."""
    out: dict = {}
    for d in dirs:
        info = json.loads((d / "run.json").read_text())
        for task, stage in zip(tasks, info.get("stages", [])):
            rows = [json.loads(line) for line in (d / stage / "metrics.jsonl").read_text().splitlines() if line.strip()]
            r = [row["reward"] for row in rows]
            first, last = out.setdefault((run_of[str(d.resolve())], task), ([], []))
            first.append(statistics.fmean(r[:n]))
            last.append(statistics.fmean(r[-n:]))
    return out


if __name__ == "__main__":
    sys.exit(main())
