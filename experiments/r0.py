"""R0 at CPU scale: the mini world's 20-step model made a 4-step generator, in the form of R0's Table 1.

    python -m experiments.r0 --jobs 2               r0 and r0+ × seeds 0,1,2, the ablations on seed 0
                                                    → docs/r0_results.md (+ _grid.png)
    python -m experiments.r0 --model mini/flow --jobs 2
                                                    the same on the mini flow world (SD3 transformer, Euler),
                                                    no ablations → out/r0-flow, docs/r0_flow_results.md

For every seed it runs `train.py --method r0 --joint <mix> --seed S` (K = 4, the r0 preset) and the same
with --r0-plus; for each ablation seed one run per ablation (no weight regularization: --lam-w 0; fixed
η = 0: --eta-range 0,0; unnormalised reward gradients: --raw-grads). Then ONE eval.py over every run
(same test prompts and initial noise everywhere): each run at its own K, the base model at K and at its
usual 20 steps. The doc gives the Table-1 rows (mean ± std over seeds), every seed's r0 against the base
at K with the issue's targets checked, the ablations, and a sample grid. Runs already finished are kept
(a re-run only evaluates); --report-only rewrites the doc from the stored eval.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import eval as evaluation  # the repo's eval.py: METRICS, the sample grid
from cli import Parser, command
from experiments.common import (ROOT, add_model_flag, finished, flow_section, ints, logger, mean_std,
                                resolve_model, schedule_lines, train_cmd, train_then_eval, write_doc)

PROG = "python -m experiments.r0"
# R0's mix is HPS + ImageReward + CLIP; the mini world has no ImageReward, its aesthetic stands in. With
# each reward's gradient normalised the weights set each reward's share of the update direction, not a
# scale fix (docs/r0_results.md's notes).
JOINT = "hps:1,aesthetic:2,clip:1"
VARIANTS = {  # name: (label, extra train.py flags)
    "r0": ("R0", []),
    "r0plus": ("R0+", ["--r0-plus"]),
}
ABLATIONS = {
    "r0-noreg": ("R0, no weight regularization (λ_w = 0)", ["--lam-w", "0"]),
    "r0-eta0": ("R0, fixed η = 0", ["--eta-range", "0,0"]),
    "r0-rawgrad": ("R0, unnormalised reward gradients", ["--raw-grads"]),
}
GRID_LABEL = {"r0-noreg": "R0, lam_w = 0", "r0-eta0": "R0, eta = 0", "r0-rawgrad": "R0, raw grads"}  # PIL's font: ASCII
COLS = ("hps", "aesthetic", "clip", "fid")  # Table 1's HPS, Aes, CS, FID (no ImageReward here)
# R0's Table 1 (SD-1.5, Realistic-vision base at 25 steps; COCO-5k FID), for the doc's comparison.
PAPER = {"base@25": {"hps": 30.19, "aesthetic": 5.87, "clip": 34.28, "fid": 29.11},
         "R0@4": {"hps": 33.70, "aesthetic": 6.11, "clip": 32.13, "fid": 33.79},
         "R0+@4": {"hps": 34.37, "aesthetic": 6.20, "clip": 32.97, "fid": 37.53}}


def better(m: str, a: float, b: float) -> bool:
    """a is better than b on metric m (FID: lower)."""
    return a > b if evaluation.METRICS[m][1] else a < b


def fmt(m: str, v) -> str:
    return "–" if v is None else f"{v:.{evaluation.METRICS[m][2]}f}"


@command(PROG)
def main(argv=None) -> int:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="training seeds of r0 and r0+ (default: 0,1,2)")
    p.add_argument("--ablation-seeds", help="seeds of the ablation runs, '' for none (default: 0; none with --model)")
    p.add_argument("--joint", default=JOINT, help=f"the reward mix, train.py --joint (default: {JOINT})")
    add_model_flag(p)
    p.add_argument("--out", help="directory of the runs and the eval (default: out/r0-experiment; with --model "
                                 "mini/flow: out/r0-flow)")
    p.add_argument("--doc", help="report to write (default: docs/r0_results.md; with --model mini/flow: "
                                 "docs/r0_flow_results.md)")
    p.add_argument("--jobs", type=int, default=1, help="training runs at once, each on 1 CPU thread (default: 1)")
    p.add_argument("--train-args", default="", help="extra train.py flags for every run, quoted (default: none)")
    p.add_argument("--eval-args", default="", help="extra eval.py flags, quoted (default: none)")
    p.add_argument("--report-only", action="store_true",
                   help="train and evaluate nothing: rewrite --doc from --out's eval/report.json")
    args = p.parse_args(argv)
    model_flags, flow = resolve_model(p, args, lambda tag: f"out/r0-{tag}" if tag else "out/r0-experiment",
                                      lambda tag: f"docs/r0_{tag}_results.md" if tag else "docs/r0_results.md")
    if args.ablation_seeds is None:  # the ablations are the mini world's study; a flow world gets Table 1
        args.ablation_seeds = "" if flow else "0"
    seeds, ablation_seeds = ints(p, "--seeds", args.seeds), ints(p, "--ablation-seeds", args.ablation_seeds)
    if not seeds:
        p.error("--seeds: give at least one seed")
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: must be ≥ 1")
    out, log, t0 = ROOT / args.out, logger(PROG), time.time()

    #### TRAIN: r0 and r0+ per seed, each ablation per ablation seed ####
    runs = [(name, label, seed, extra) for seed in seeds for name, (label, extra) in VARIANTS.items()]
    runs += [(name, label, seed, extra) for seed in ablation_seeds for name, (label, extra) in ABLATIONS.items()]
    dirs, todo, label_of = [], [], {}
    for name, label, seed, extra in runs:
        d = out / f"{name}-seed{seed}"
        dirs.append(d)
        label_of[str(d.resolve())] = (name, label, seed)
        if finished(d, 1):
            log(f"{d.name}: finished earlier, kept")
            continue
        todo.append(train_cmd(d, None, "r0", seed, *model_flags, "--joint", args.joint, *extra,
                              *args.train_args.split()))
    ev, timing = train_then_eval([todo], dirs, out, args, p, t0, PROG, log)

    #### REPORT ####
    report = json.loads((ev / "report.json").read_text())
    doc = ROOT / args.doc
    grid = doc.with_name(doc.stem + "_grid.png")
    write_report(report, label_of, seeds, ablation_seeds, args, timing, doc, grid, flow, dirs)
    log(f"wrote {doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else doc} in {(time.time() - t0) / 60:.1f} min")
    return 0


def versus_base(by_variant: dict, seeds: list, base_k: dict, cols: list, K) -> str:
    """One sentence from the means over seeds: where R0 and R0+ beat the base model at K steps, and where not."""
    out = []
    for name, label in (("r0", "R0"), ("r0plus", "R0+")):
        vals = by_variant.get(name, {})
        if not all(s in vals for s in seeds):
            continue
        mean = {m: statistics.fmean(vals[s][m] for s in seeds) for m in cols}
        won = [evaluation.METRICS[m][0] for m in cols if better(m, mean[m], base_k[m])]
        lost = [evaluation.METRICS[m][0] for m in cols if not better(m, mean[m], base_k[m])]
        out.append(f"{label}'s mean over seeds beats the base model at {K} steps on "
                   f"{', '.join(won) if won else 'no metric'}" + (f"; **it does not on {', '.join(lost)}**" if lost else
                                                                   " (every metric)") + ".")
    return " ".join(out) or f"No R0 run finished for every seed; nothing to compare with the base at {K} steps."


def collect(report: dict, label_of: dict) -> tuple[dict, dict, dict, dict]:
    """-> (base rows by name, {variant name: {seed: metrics}}, {variant: label}, {variant/seed: row})."""
    bases, by_variant, labels, rows = {}, {}, {}, {}
    for r in report["rows"]:
        if r["stage"] == 0:
            bases[r["name"]] = r
            continue
        name, label, seed = label_of.get(str(Path(r["run"]).resolve()), (r["method"], r["method"], None))
        by_variant.setdefault(name, {})[seed] = r["metrics"]
        labels[name] = label
        rows[f"{name}/{seed}"] = r
    return bases, by_variant, labels, rows


def write_report(report, label_of, seeds, ablation_seeds, args, timing, doc: Path, grid: Path,
                 flow: dict | None = None, dirs: list = ()) -> None:
    bases, by_variant, labels, rows = collect(report, label_of)
    k_name = next((n for n, r in bases.items() if r["method"] == "base"), None)  # the base at the runs' K
    usual = next((n for n, r in bases.items() if r["method"] != "base"), None)  # "base (N steps)"
    K = int(k_name.removeprefix("stage0-base-").removesuffix("steps")) if k_name else None
    N = int(usual.removeprefix("stage0-base-").removesuffix("steps")) if usual else None
    base_k = bases[k_name]["metrics"] if k_name else {}
    cols = [m for m in COLS if m in base_k]
    head = lambda first: ["| " + " | ".join(first + [f"{evaluation.METRICS[m][0]} {'↑' if evaluation.METRICS[m][1] else '↓'}"  # noqa: E731
                                                      for m in cols]) + " |", "|" + "---|" * (len(first) + len(cols))]

    #### Table 1 ####
    lines = ["## Table 1 at mini scale", "", f"Mean ± std over seeds {', '.join(map(str, seeds))} (the base model is "
             "deterministic: one evaluation). HPS is the mini world's hps model (cosine, 0–1), Aes its LAION-layout "
             "aesthetic head (1–10), CLIP 100·cos with the domain CLIP, FID in that CLIP's feature space against "
             "500 held-out renderings.", ""]
    lines += head(["Model", "Steps"])
    for name, steps in ((usual, N), (k_name, K)):
        if name:
            lines.append(f"| Base model | {steps} | " + " | ".join(fmt(m, bases[name]["metrics"].get(m)) for m in cols) + " |")
    for name in VARIANTS:
        if name in by_variant:
            vals = by_variant[name]
            lines.append(f"| {labels[name]} | {K} | " + " | ".join(mean_std([vals[s].get(m) for s in seeds if s in vals])
                                                                for m in cols) + " |")
    lines += ["", versus_base(by_variant, seeds, base_k, cols, K)]

    #### Per seed, against the targets ####
    lines += ["", f"## Every seed against the base model at {K} steps", "",
              f"Targets (issue 17): R0 at {K} steps above the base at {K} steps on HPS, aesthetic and CLIP in every "
              f"seed, FID not worse. ✓ met, ✗ not met.", ""]
    lines += head(["Run", "Seed"])
    met, missed = [], []
    for name in VARIANTS:
        for seed in seeds:
            m_ = by_variant.get(name, {}).get(seed)
            if m_ is None:
                continue
            cells = []
            for m in cols:
                ok = better(m, m_[m], base_k[m]) or (m == "fid" and m_[m] == base_k[m])
                (met if ok else missed).append((labels[name], seed, m))
                cells.append(f"{fmt(m, m_[m])} ({m_[m] - base_k[m]:+.{evaluation.METRICS[m][2]}f}) {'✓' if ok else '✗'}")
            lines.append(f"| {labels[name]} | {seed} | " + " | ".join(cells) + " |")
    r0_missed = [x for x in missed if x[0] == "R0"]
    verdict = ("**Every target is met**: R0 beats the base at its own step count on HPS, aesthetic and CLIP in every "
               "seed, with an FID no worse." if not r0_missed else
               "**Not reproduced**: " + "; ".join(f"R0 seed {s} on {evaluation.METRICS[m][0]}" for _, s, m in r0_missed)
               + " (marked ✗ above).")
    plus_missed = [x for x in missed if x[0] == "R0+"]
    verdict += (" R0+ meets them as well." if not plus_missed and "r0plus" in by_variant else
                (" R0+ misses: " + "; ".join(f"seed {s} {evaluation.METRICS[m][0]}" for _, s, m in plus_missed) + "."
                 if plus_missed else ""))
    lines += ["", verdict]

    #### Ablations ####
    if ablation_seeds and any(a in by_variant for a in ABLATIONS):
        lines += ["", "## Ablations", "", f"Seed(s) {', '.join(map(str, ablation_seeds))}; full R0 of the same seed(s) "
                  "first, then each regularizer or normalisation removed alone (difference to full R0 in parentheses).", ""]
        lines += head(["Run", "Steps"])
        full = {m: statistics.fmean(by_variant["r0"][s][m] for s in ablation_seeds if s in by_variant.get("r0", {}))
                for m in cols} if all(s in by_variant.get("r0", {}) for s in ablation_seeds) else None
        if full:
            lines.append(f"| R0 | {K} | " + " | ".join(fmt(m, full[m]) for m in cols) + " |")
        for name in ABLATIONS:
            vals = [by_variant.get(name, {}).get(s) for s in ablation_seeds]
            if any(v is None for v in vals):
                continue
            mean = {m: statistics.fmean(v[m] for v in vals) for m in cols}
            lines.append(f"| {labels[name]} | {K} | " + " | ".join(
                fmt(m, mean[m]) + (f" ({mean[m] - full[m]:+.{evaluation.METRICS[m][2]}f})" if full else "")
                for m in cols) + " |")

    #### Paper, grid, facts ####
    lines += ["", "## R0's own Table 1 (SD-1.5, for comparison; not reproducible here)", "",
              "| Model | HPS | Aes | CS | FID |", "|---|---|---|---|---|"]
    lines += [f"| {k} | " + " | ".join(f"{v[m]:.2f}" for m in COLS) + " |" for k, v in PAPER.items()]
    grid.parent.mkdir(parents=True, exist_ok=True)
    grid_rows = [bases[n] for n in (usual, k_name) if n]
    first = seeds[0]
    grid_rows += [{**rows[f"{n}/{s}"], "method": GRID_LABEL.get(n, labels[n])} for n in [*VARIANTS, *ABLATIONS]
                  for s in [first] if f"{n}/{s}" in rows]
    evaluation.write_grid(grid_rows, grid)
    on_metric = report.get("clip_metric_trained_on") or []
    model = f" --model {args.model}" if flow else ""
    ablation = args.ablation_seeds or "''"
    facts = [f"`{PROG}{model} --seeds {args.seeds} --ablation-seeds {ablation} --jobs {args.jobs}` "
             f"({timing['date']}; reward mix `--joint {args.joint}`). Wall time {timing['train_min']:.1f} min training "
             f"({timing['trained_runs']} runs, {timing['jobs']} at a time), {timing['total_min']:.1f} min with "
             f"evaluation, on {timing['cpu']}; peak RSS of any one process {timing['peak_rss_gb']:.2f} GB.",
             "",
             f"Sample grid (rows: the base model at {N} and at {K} steps, then seed {first}'s run of each variant; "
             f"columns: the first test prompts, the same noise everywhere): [{grid.name}]({grid.name})",
             "", f"![samples]({grid.name})"]
    if on_metric:
        facts += ["", f"**The CLIP column of every trained row is scored by the model its clip reward maximised** "
                  f"(the mini world's domain CLIP is both the clip reward and the CLIP metric, and the aesthetic head "
                  f"and the FID features sit on the same CLIP): {len(on_metric)} stage(s), eval's report.md lists them."]
    world = "the mini world"
    if flow:  # what the flow world's runs trained with, and what differs from the UNet world's DDIM
        world = "the mini flow world"
        facts += ["", f"Model: {args.model}, an SD3 transformer on a rectified flow (flow.json). Every run trains "
                  f"with train.py's mini-world R0 schedule, the UNet world's unchanged (the same prompts, rewards "
                  f"and batch, so the two worlds compare; not retuned for the flow model):", "",
                  *schedule_lines(dirs, lambda d: label_of[str(d.resolve())][1])]
        lines += ["", *flow_section(flow, str(Path(args.model).resolve()), [N, K] if N else [K],
                                    last_step_only=False)]
    text = "\n".join([f"# R0 in {world}: a 4-step generator by regularized reward maximization", "", *facts, "",
                      *lines, ""])
    write_doc(doc, text)


if __name__ == "__main__":
    sys.exit(main())
