"""What every experiment script shares: running train.py / eval.py (several
runs at once, one CPU thread each), finished-run detection, mean ± std formatting, the hand-written
notes a regenerated doc keeps."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cli import Parser, UsageError

ROOT = Path(__file__).resolve().parents[1]
NOTES = "\n## Notes"  # a doc's hand-written part starts here; regenerating keeps it


def logger(prog: str):
    return lambda msg: print(f"[{prog} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list, prog: str, log) -> None:
    """One command in the repository root; a failure ends the experiment with one line."""
    log("$ " + " ".join(map(str, cmd)))
    r = subprocess.run(list(map(str, cmd)), cwd=ROOT, preexec_fn=_die_with_parent)
    if r.returncode != 0:
        raise SystemExit(f"{prog}: `{' '.join(map(str, cmd))}` exited {r.returncode}")


def _pdeathsig():
    """prctl, resolved in the parent (the child only calls it), or None off Linux."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _pdeathsig()


def _die_with_parent() -> None:
    """In a child, before exec: SIGTERM when the parent dies (Linux's PR_SET_PDEATHSIG = 1), so a killed
    experiment (even by kill -9) leaves no run behind that a restarted one would meet half-written.
    Off Linux, children outlive a killed parent (train.py's own lock still guards its run directory)."""
    if _PRCTL is not None:
        _PRCTL(1, 15)  # SIGTERM


def run_parallel(cmds: list, jobs: int, out: Path, prog: str, log) -> None:
    """Up to `jobs` training runs at once, one CPU thread each; each run's output goes to <out>/<name>.log
    (name: the run's --out directory name)."""
    if jobs == 1:
        for cmd in cmds:
            run(cmd, prog, log)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out.mkdir(parents=True, exist_ok=True)
    running, queue = [], [list(map(str, c)) for c in cmds]
    while queue or running:
        while queue and len(running) < jobs:
            cmd = queue.pop(0)
            name = Path(cmd[cmd.index("--out") + 1]).name
            log(f"start {name} (log: {out / (name + '.log')})")
            running.append((cmd, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(out / f"{name}.log", "a"),
                                                  stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)))
        time.sleep(2)
        for item in list(running):
            cmd, proc = item
            if proc.poll() is not None:
                running.remove(item)
                if proc.returncode != 0:
                    for _, other in running:
                        other.terminate()
                    raise SystemExit(f"{prog}: `{' '.join(cmd)}` exited {proc.returncode}")


def train_cmd(out_dir: Path, tasks: str | None, method: str, seed: int, *extra) -> list:
    """train.py for one run; --resume when the directory already holds part of it."""
    resume = ["--resume"] if (out_dir / "run.json").exists() else []
    what = ["--tasks", tasks] if tasks else []
    return [sys.executable, "train.py", *what, "--method", method, "--seed", str(seed), "--out", str(out_dir),
            *resume, *extra]


def finished(run_dir: Path, n_tasks: int) -> bool:
    try:
        return len(json.loads((run_dir / "run.json").read_text()).get("stages", [])) == n_tasks
    except (OSError, json.JSONDecodeError):
        return False


def mean_std(xs: list, sig: int = 3) -> str:
    """mean ± sample std; `sig` significant digits for the larger of the two (min 1 decimal)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    m = statistics.fmean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    top = max(abs(m), s)
    digits = max(1, sig - 1 - math.floor(math.log10(top))) if top > 0 else 1
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def write_doc(path: Path, text: str) -> None:
    """Write a generated doc, keeping the hand-written "## Notes" section of the previous version; atomically (a
    kill leaves the old doc or the new one, and never loses the Notes)."""
    from checkpoint import atomic_write

    old = path.read_text() if path.exists() else ""
    if NOTES in old:
        text += "\n" + old[old.index(NOTES):].lstrip("\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)


def timing(t0: float, t_train: float, trained: int, jobs: int) -> dict:
    import resource

    return {"train_min": round(t_train / 60, 1), "trained_runs": trained, "total_min": round((time.time() - t0) / 60, 1),
            "jobs": jobs, "cpu": f"{os.cpu_count()} CPU cores",
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2),  # kB→GB
            "date": time.strftime("%Y-%m-%d")}


def take_lock(out: Path, p: Parser, log):
    """<out>/.lock (checkpoint.RunLock): one experiment writing --out at a time; a second one exits 2 with
    one line naming the holder. Release it when done; a killed holder's lock is taken over with a message."""
    import checkpoint

    try:
        return checkpoint.RunLock(out, log=log)
    except UsageError as e:
        p.error(str(e))


def train_then_eval(phases: list, dirs: list, out: Path, args, p: Parser, t0: float, prog: str, log) -> tuple[Path, dict]:
    """Train the train.py commands of each phase in turn (a list of command lists: runs of a later phase
    may branch from those of an earlier one; args.jobs at once within a phase), then ONE eval.py over
    `dirs` into <out>/eval. The timing is stored in <out>/experiment.json before evaluating, so an
    evaluation killed and rerun still reports the training it followed; args.report_only runs nothing
    and reads both back. -> (eval dir, timing)."""
    ev, timing_file = out / "eval", out / "experiment.json"
    if args.report_only:
        if not (ev / "report.json").exists() or not timing_file.exists():
            p.error(f"--report-only: {ev / 'report.json'} or {timing_file} is missing; run without --report-only first")
        return ev, json.loads(timing_file.read_text())
    lock = take_lock(out, p, log)
    try:
        for todo in phases:
            run_parallel(todo, args.jobs, out, prog, log)
        trained = sum(map(len, phases))
        fresh = bool(trained) or not timing_file.exists()  # else the stored timing describes the real work
        if fresh:
            timing_file.parent.mkdir(parents=True, exist_ok=True)
            timing_file.write_text(json.dumps(timing(t0, time.time() - t0, trained, args.jobs), indent=1) + "\n")
        run([sys.executable, "eval.py", "--ckpt", *dirs, "--out", ev, *args.eval_args.split()], prog, log)
        stored = json.loads(timing_file.read_text())
        if fresh:  # the evaluation's wall time and memory count too
            stored["total_min"] = round((time.time() - t0) / 60, 1)
            stored["peak_rss_gb"] = max(stored["peak_rss_gb"], timing(t0, 0, 0, args.jobs)["peak_rss_gb"])
            timing_file.write_text(json.dumps(stored, indent=1) + "\n")
    finally:
        lock.release()
    return ev, stored


def ints(p: Parser, flag: str, text: str) -> list:
    """A comma list of integers from flag `flag` ('' → []); a one-line error naming the flag otherwise."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        p.error(f"{flag} {text!r}: expected a comma list of integers, e.g. 0,1,2")


#### --model: the mini world (default) or a mini flow world ####

def add_model_flag(p: Parser) -> None:
    p.add_argument("--model", metavar="DIR",
                   help="the model every run trains: a mini flow world (mini/flow, `python -m mini build-flow`); "
                        "--out and --doc then default to names derived from it (default: the mini world's model, "
                        "as train.py without --model)")


def resolve_model(p: Parser, args, out_of, doc_of) -> tuple[list, dict | None]:
    """Check --model once and fill args.out / args.doc left None: out_of(tag) / doc_of(tag) with tag the model
    directory's name ('flow' for mini/flow), or out_of(None) / doc_of(None) for the mini world. -> (the
    train.py flags that select the model, the flow world's flow.json or None)."""
    flags, flow = [], None
    if args.model is not None:
        import mini

        d = Path(args.model).resolve()  # train.py runs in ROOT: hand it an absolute path
        if not (d / "model_index.json").is_file():
            p.error(f"--model {args.model!r} is not a model directory (no model_index.json in it); give a mini "
                    f"flow world, e.g. --model mini/flow (`python -m mini build-flow` builds it)")
        if not mini.is_model(d):
            if not (d / "flow.json").is_file():
                p.error(f"--model {args.model!r} is neither the mini world's model nor a mini flow world (no "
                        f"flow.json in it); these experiments score with the mini world's rewards")
            flags, flow = ["--model", str(d)], json.loads((d / "flow.json").read_text())
    tag = Path(args.model).resolve().name if flow is not None else None
    if args.out is None:
        args.out = out_of(tag)
    if args.doc is None:
        args.doc = doc_of(tag)
    return flags, flow


def flow_section(flow: dict, model: str, steps: list, last_step_only: bool = True) -> list:
    """The doc's "what does not carry over from DDIM" section for a flow world: its sampler and its σ's at
    each step count in `steps` (samplers.Flow, built from the model's scheduler config), the prediction and
    what it means for the gradient (last_step_only: rid and the baseline; else R0, through every step), R0's
    η, the conditioning and the adapter targets."""
    import samplers

    import mini

    config = json.loads((Path(model) / "scheduler" / "scheduler_config.json").read_text())
    world = json.loads((mini.WORLD / "world.json").read_text())
    sig = {n: samplers.build(config, n).sigmas.tolist() for n in steps}  # (n + 1,) each, 0 last
    # how much x̂₀ of the last step moves per unit of the prediction: σ (flow) vs √(1−ᾱ)/√ᾱ (DDIM, ε)
    ddim = samplers.build(json.loads((mini.MODEL / "scheduler" / "scheduler_config.json").read_text()), world["steps"])
    a = float(ddim.alpha(ddim.timestep(-1)))
    gain, ddim_gain = min(s[-2] for s in sig.values()), ((1 - a) / a) ** 0.5

    def show(s: list) -> str:
        return ", ".join(f"{x:.3f}" for x in s) if len(s) <= 6 else f"{s[0]:.3f}, {s[1]:.3f}, …, {s[-2]:.3f}, 0"
    return ["## What does not carry over from DDIM", "",
            f"- **Sampler**: {flow['sampler']}, not DDIM. Default {flow['steps']} steps at guidance "
            f"{flow['guidance']:g} (flow.json); the UNet world's base samples with DDIM {world['steps']} steps at "
            f"guidance {world['guidance']:g}. Shift {config.get('shift', 1.0):g}; σ at each step, ending at 0: "
            + "; ".join(f"{n} steps: {show(s)}" for n, s in sig.items()) + ".",
            "- **Prediction**: the transformer predicts the velocity v = ε − x₀ at timestep 1000σ, and x̂₀ = z − σv "
            "(samplers.Flow), not DDIM's ε with x̂₀ = (z − √(1−ᾱ)ε)/√ᾱ. "
            + ("The methods' reward gradient (and RID's distillation) goes through the last step's prediction only, "
               "and x̂₀ moves by σ per unit of it: "
               f"{gain:.4f} at the flow's last σ (at {max(sig)} steps), against √(1−ᾱ)/√ᾱ = {ddim_gain:.4f} at DDIM's "
               f"last timestep ({ddim.timestep(-1)}, {world['steps']} steps), {ddim_gain / gain:.0f}× less. AdamW "
               "normalises the gradient's scale, not its direction: what the adapters learn from the last step may "
               "differ." if last_step_only else
               "R0 differentiates through all of its steps; an Euler step x' = x + (σ' − σ)v (at η = 0) moves it by "
               "the σ gap per unit of the prediction (the σ's above), so its last step, from σ "
               f"{gain:.4f}, adds almost nothing to the gradient, as DDIM's from t = {ddim.timestep(-1)} "
               f"(√(1−ᾱ)/√ᾱ = {ddim_gain:.4f}) adds little."),
            "- **R0's η**: the η drawn per step is the flow's η analogue (samplers.Flow: fresh noise of scale "
            "c(η) that keeps every marginal of the flow, DDPM's posterior at η = 1), not η-DDIM's Eq. 16; the "
            "last step (to σ = 0) takes no noise in either.",
            "- **Conditioning**: the world's one CLIP text encoder in both of SD3's CLIP slots and 256 zero T5 "
            "tokens (no T5), so the transformer attends to 24 + 256 text tokens per image; the unconditional "
            "branch of CFG is the empty prompt's conditioning, as in the UNet world.",
            "- **Adapters**: LoRA on the joint blocks' attention, both streams (to_q/k/v/out, add_q/k/v_proj, "
            "to_add_out; backbones/sd3.py), where the UNet world adapts the UNet's attention projections. Same "
            "rank, so a different number of adapted parameters.",
            "- **Rewards, prompts, metrics**: unchanged (the flow world reuses the UNet world's VAE, so images "
            "are the same 32² domain and every reward, the CLIP FID reference and the test prompts apply as they are)."]


def schedule_lines(dirs: list, label_of) -> list:
    """One line per (label, task): the batch, epochs, lr and lr schedule the runs trained with (their run.json
    config, the resolved train.py preset), the same for every seed of a label."""
    seen, lines = {}, []
    for d in dirs:
        cfg = json.loads((d / "run.json").read_text())["config"]
        for task in cfg["tasks"]:
            row = (cfg["steps"], cfg["batch"][task], cfg["epochs"][task], cfg["lr"][task], cfg["lr_schedule"][task])
            seen.setdefault((label_of(d), task), row)
    for (label, task), (steps, batch, epochs, lr, schedule) in seen.items():
        lines.append(f"| {label} | {task} | {steps} | {batch} | {epochs} | {lr:g} | {schedule} |")
    return ["| Method | Task | Steps | Batch | Epochs | lr | lr schedule |", "|---|---|---|---|---|---|---|", *lines]
