"""Figures and training logs people look at: metrics across stages, forgetting, training curves,
and an optional TensorBoard logger for train.py.

Data flows eval.py / train.py → plots.py; this file imports neither. Every figure function returns
the data it drew as a plain dict and writes it beside the PNG as <png stem>.json, so a test (or a
reader) checks the numbers that were plotted, not pixels.

Readable in grayscale and by colour-blind readers: the Okabe–Ito palette (Okabe & Ito 2008, the
set Wong recommends in Nature Methods 2011) and, per method, its own line style, marker and hatch,
so methods stay apart without colour. Matplotlib runs headless through Agg, without pyplot's
global state.

    python plots.py RUN_DIR [RUN_DIR ...]   # training.png beside each run's run.json
"""
import json
import re
import statistics
import sys
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from cli import Parser, UsageError, command

# Okabe–Ito without black (kept for the base model) and with yellow last (faint on white).
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442"]
LINESTYLES = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3))]
MARKERS = ["o", "s", "^", "D", "v", "P", "X"]
HATCHES = ["", "//", "..", "xx", "\\\\", "oo", "++"]
BASE = "base"    # eval's method label of stage 0, shared by every method
SOUP = "soup"    # eval's method label of a model soup: one model, drawn as a marker at its stage
DPI = 100        # with the figure sizes below, PNGs stay well under 300 kB
TRAIN_KEYS = [("reward", "reward"), ("distill", "distill (RID)"), ("grad_norm", "grad norm"), ("lr", "lr")]
STAGE_DIR = re.compile(r"stage(\d+)-(.+)")


def _style(i: int) -> dict:
    """Method i's look; cycles after len(PALETTE) methods (line style and marker cycle together)."""
    n = len(PALETTE)
    return {"color": PALETTE[i % n], "linestyle": LINESTYLES[i % n], "marker": MARKERS[i % n],
            "hatch": HATCHES[i % n]}


def _mean_std(values: list) -> tuple[float, float]:
    """Mean and sample std (0.0 for a single value) - what a test recomputes with statistics."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _panels(n: int, panel_w: float = 4.0, panel_h: float = 3.0, ncols: int = 3):
    """A Figure with n axes in a grid of at most ncols columns; the unused cells are removed."""
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(panel_w * ncols, panel_h * nrows + 0.8), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.remove()
    return fig, list(axes[:n])


def _save(fig: Figure, data: dict, path) -> dict:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    # A 256-colour palette: indistinguishable for lines, bands and bars, and ~3x smaller than RGB.
    with Image.open(path) as im:
        im = im.convert("RGB").quantize(256)
    im.save(path, optimize=True)
    path.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    return data


def _methods(rows: list) -> list:
    """Method labels in the order the rows first show them (the report's table order), base excluded."""
    return list(dict.fromkeys(r["method"] for r in rows if r["method"] != BASE))


def _title(metrics: dict, m: str) -> str:
    label, higher, _ = metrics[m]
    return f"{label} {'↑' if higher else '↓'}"


#### METRICS ACROSS STAGES ####

def stage_figure(rows: list, metrics: dict, path) -> dict:
    """One panel per metric (in `metrics` order, those present in the rows): its value at stages 0..T,
    one line per method, mean over that method's runs with a ±std band when there are several. The
    base model's rows (stage 0, method "base", averaged if several) are every method's stage-0 point.
    A soup ("soup" rows) is one model, not a trajectory: a lone marker (± std) at its stage.

    rows: eval's report.json "rows"; metrics: name -> (label, higher_is_better, decimals).
    Returns (and writes as <stem>.json) {"ticks": [stage names, index 0..T],
    "metrics": {metric: {method: {"x", "mean", "std", "n"}}}}.
    """
    present = [m for m in metrics if any(r["metrics"].get(m) is not None for r in rows)]
    if not present:
        raise ValueError(f"stage_figure: none of the metrics {list(metrics)} is in the rows")
    names = {}
    for r in rows:
        names.setdefault(r["stage"], []).append(r["name"])
    last = max(names)
    ticks = ["/".join(dict.fromkeys(names.get(k, [""]))) for k in range(last + 1)]
    methods = _methods(rows)
    base = [r for r in rows if r["method"] == BASE]

    data = {"ticks": ticks, "metrics": {}}
    fig, axes = _panels(len(present))
    for ax, m in zip(axes, present):
        data["metrics"][m] = per_method = {}
        base_vals = [r["metrics"][m] for r in base if r["metrics"].get(m) is not None]
        for i, method in enumerate(methods):
            by_stage = {}
            for r in rows:
                if r["method"] == method and r["metrics"].get(m) is not None:
                    by_stage.setdefault(r["stage"], []).append(r["metrics"][m])
            if base_vals and method != SOUP:
                by_stage.setdefault(0, base_vals)
            if not by_stage:
                continue
            x = sorted(by_stage)
            stats = [_mean_std(by_stage[k]) for k in x]
            mean, std = [s[0] for s in stats], [s[1] for s in stats]
            per_method[method] = {"x": x, "mean": mean, "std": std, "n": [len(by_stage[k]) for k in x]}

            st = _style(i)
            if method == SOUP:
                ax.errorbar(x, mean, yerr=std, color=st["color"], marker="*", markersize=12, linestyle="none",
                            capsize=3, label=method)
                continue
            ax.plot(x, mean, color=st["color"], linestyle=st["linestyle"], marker=st["marker"], label=method)
            if any(s > 0 for s in std):
                lo, hi = np.subtract(mean, std), np.add(mean, std)
                ax.fill_between(x, lo, hi, color=st["color"], alpha=0.18, linewidth=0)
        if base_vals:  # the shared stage-0 point, in black, on top of every line
            ax.plot([0], [_mean_std(base_vals)[0]], color="black", marker="o", linestyle="none", zorder=5,
                    label=BASE)
        ax.set_title(_title(metrics, m))
        ax.set_xticks(range(len(ticks)))
        ax.set_xticklabels(ticks, rotation=30, ha="right", fontsize=8)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:  # a method may lack a metric in the first panel
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h), labels.append(lab)
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / fig.get_figheight()))
    return _save(fig, data, path)


#### FORGETTING ####

def forgetting_figure(rows: list, metrics: dict, path) -> dict:
    """Forgetting (Eq. 3, ≥ 0, lower is better for every metric) as bars, one panel per metric (their
    scales differ by orders of magnitude: FID vs HPS), one bar per method: the mean over that method's
    runs, error bar = std. Read from the rows' "forgetting" dicts (a run's last stage carries them);
    None values are left out, and a method with none for a metric gets "–" instead of a bar.

    Returns (and writes as <stem>.json) {metric: {method: {"mean", "std", "n", "values"}}}, with mean
    and std None where n = 0.
    """
    carriers = [r for r in rows if r.get("forgetting")]
    present = [m for m in metrics if any(m in r["forgetting"] for r in carriers)]
    if not present:
        raise ValueError("forgetting_figure: no row carries forgetting values (a run's last stage does, "
                         "when the run has more than one stage)")
    methods = _methods(carriers)
    data = {}
    fig, axes = _panels(len(present), panel_w=max(3.0, 0.7 * len(methods) + 1.5))
    for ax, m in zip(axes, present):
        data[m] = {}
        for i, method in enumerate(methods):
            vals = [r["forgetting"][m] for r in carriers
                    if r["method"] == method and r["forgetting"].get(m) is not None]
            mean, std = _mean_std(vals) if vals else (None, None)
            data[m][method] = {"mean": mean, "std": std, "n": len(vals), "values": vals}
            st = _style(i)
            if vals:  # the value on top, so a zero bar still reads "0.00"
                err = [[min(std, max(mean, 0.0))], [std]] if len(vals) > 1 else None  # F ≥ 0: no bar below 0
                ax.bar(i, mean, yerr=err, capsize=4, color=st["color"],
                       hatch=st["hatch"], edgecolor="black", linewidth=0.8, label=method)
                ax.annotate(f"{mean:.{metrics[m][2]}f}", (i, max(mean + std, 0)), xytext=(0, 2),
                            textcoords="offset points", ha="center", va="bottom", fontsize=7)
            else:
                ax.annotate("–", (i, 0), xytext=(0, 2), textcoords="offset points", ha="center",
                            va="bottom", fontsize=18, fontweight="bold")
        ax.margins(y=0.15)
        if all(v["mean"] is None or v["mean"] >= 0 for v in data[m].values()):
            ax.set_ylim(bottom=0)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.set_title(f"{metrics[m][0]} forgetting ↓")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Forgetting F (Eq. 3): the largest drop from any stage to the last; –: not defined")
    fig.tight_layout()
    return _save(fig, data, path)


#### TRAINING CURVES ####

def _read_jsonl(path: Path) -> list:
    """metrics.jsonl rows; a torn last line (a crash mid-write) is skipped, a torn earlier one is an error."""
    lines = [l for l in path.read_text().splitlines() if l.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
    return rows


def run_stages(run_dir) -> list:
    """The stages of a train.py run in order: those run.json lists as finished, then any stageK-task
    directory with a metrics.jsonl that is not finished yet. -> [{"name", "task", "finished", "rows"}]."""
    run_dir = Path(run_dir)
    run_path = run_dir / "run.json"
    if not run_path.exists():
        raise ValueError(f"run dir {run_dir}: no run.json (is it a train.py --out?)")
    finished = json.loads(run_path.read_text()).get("stages", [])
    on_disk = [p.name for p in run_dir.iterdir() if STAGE_DIR.fullmatch(p.name) and (p / "metrics.jsonl").exists()]
    names = sorted(set(finished) | set(on_disk), key=lambda s: int(STAGE_DIR.fullmatch(s).group(1)))
    stages = []
    for name in names:
        f = run_dir / name / "metrics.jsonl"
        stages.append({"name": name, "task": STAGE_DIR.fullmatch(name).group(2), "finished": name in finished,
                       "rows": _read_jsonl(f) if f.exists() else []})
    return stages


def training_figure(run_dir, path) -> dict:
    """Training curves of one train.py run: reward, distill (RID only), grad norm and lr against the
    global optimizer step (stages concatenated with a running offset: global = offset + step), with
    stage boundaries marked and labelled by task; an unfinished stage is labelled so.

    Returns (and writes as <stem>.json) {"stages": [{"name", "task", "finished", "offset", "steps"}],
    "boundaries": [global step where each stage starts], "series": {key: {"x", "y"}}}.
    """
    stages = run_stages(run_dir)
    if not any(s["rows"] for s in stages):
        raise ValueError(f"run dir {run_dir}: no stage has logged a step yet (no metrics.jsonl rows)")
    series = {k: {"x": [], "y": []} for k, _ in TRAIN_KEYS}
    info, offset = [], 0
    for s in stages:
        steps = max((r["step"] for r in s["rows"]), default=0)
        info.append({"name": s["name"], "task": s["task"], "finished": s["finished"], "offset": offset,
                     "steps": steps})
        for r in s["rows"]:
            for k, _ in TRAIN_KEYS:
                if r.get(k) is not None:
                    series[k]["x"].append(offset + r["step"])
                    series[k]["y"].append(r[k])
        offset += steps
    series = {k: v for k, v in series.items() if v["x"]}
    data = {"stages": info, "boundaries": [s["offset"] for s in info], "series": series}

    keys = [(k, label) for k, label in TRAIN_KEYS if k in series]
    fig, axes = _panels(len(keys), panel_w=6.0, panel_h=2.6, ncols=2)
    for ax, (k, label) in zip(axes, keys):
        x, y = np.asarray(series[k]["x"]), np.asarray(series[k]["y"], dtype=float)
        for j, s in enumerate(info):  # one segment per stage: no line drawn across a boundary
            inside = (x > s["offset"]) & (x <= s["offset"] + s["steps"])
            ax.plot(x[inside], y[inside], color=PALETTE[0], linewidth=1.2, marker="o" if inside.sum() == 1 else None)
            if j:
                ax.axvline(s["offset"] + 0.5, color="black", linestyle="--", linewidth=0.8)
            ax.text(s["offset"] + 1, 0.97, s["task"] + ("" if s["finished"] else " (unfinished)"),
                    transform=ax.get_xaxis_transform(), va="top", fontsize=8,
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 1})
        ax.set_title(label)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if k == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.suptitle(Path(run_dir).resolve().name)
    fig.tight_layout()
    return _save(fig, data, path)


#### CURVES AGAINST COMPUTE ####

def curves_figure(panels: dict, path, title: str = "", hline: tuple | None = None) -> dict:
    """One panel per entry of panels {title: (x label, {method: {"x", "mean", "std"}})}: a line per
    method with a ±std band where std > 0 (experiments.draft: reward against UNet calls and wall time).
    hline: (label, y), a dashed reference level drawn in every panel whose title says "test".
    Returns (and writes as <stem>.json) {"title", "hline", "panels": {title: {"xlabel", "lines"}}}."""
    data = {"title": title, "hline": list(hline) if hline else None,
            "panels": {t: {"xlabel": xl, "lines": lines} for t, (xl, lines) in panels.items()}}
    fig, axes = _panels(len(panels), panel_w=5.0, panel_h=3.4, ncols=2)
    for ax, (t, (xlabel, lines)) in zip(axes, panels.items()):
        for i, (method, c) in enumerate(lines.items()):
            if not c["x"]:
                continue
            st = _style(i)
            ax.plot(c["x"], c["mean"], color=st["color"], linestyle=st["linestyle"], marker=st["marker"],
                    markersize=4, label=method)
            if any(s > 0 for s in c["std"]):
                ax.fill_between(c["x"], np.subtract(c["mean"], c["std"]), np.add(c["mean"], c["std"]),
                                color=st["color"], alpha=0.15, linewidth=0)
        if hline and "test" in t:
            ax.axhline(hline[1], color="black", linestyle="--", linewidth=0.8, label=hline[0])
        ax.set_title(t)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h), labels.append(lab)
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 4), frameon=False, fontsize=8)
    if title:
        fig.suptitle(title, y=0.02, va="bottom", fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 1 - 0.75 / fig.get_figheight()))
    return _save(fig, data, path)


#### TENSORBOARD ####

class TensorBoardLogger:
    """train.py's --report-to tensorboard: per optimizer step the metrics.jsonl scalars under
    "stage{k}-{task}/", per stage end its samples.png. An optional dependency: without it, a ValueError
    with one line."""

    @staticmethod
    def writer_class():
        """torch's SummaryWriter; a ValueError with one line when the tensorboard package is missing
        (train.py calls this at set-up, before anything is written)."""
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        except ImportError:
            raise ValueError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") from None
        return SummaryWriter

    def __init__(self, log_dir):
        self.writer = self.writer_class()(log_dir=str(log_dir))

    def scalars(self, tag_prefix: str, step: int, values: dict):
        """One scalar per numeric entry of values, tagged "<tag_prefix>/<key>"; None and non-numbers are
        skipped (as they are in metrics.jsonl's optional keys)."""
        prefix = tag_prefix.rstrip("/")
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"{prefix}/{k}", float(v), global_step=step)

    def image(self, tag: str, step: int, image):
        """image: a path (a stage's samples.png) or an array (H, W) / (H, W, C), uint8 or float in [0, 1]."""
        if isinstance(image, (str, Path)):
            image = np.asarray(Image.open(image).convert("RGB"))
        image = np.asarray(image)
        if image.dtype != np.uint8:
            image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        self.writer.add_image(tag, image, global_step=step, dataformats="HW" if image.ndim == 2 else "HWC")

    def close(self):
        self.writer.close()


@command("plots.py")
def main(argv=None) -> int:
    p = Parser(prog="plots.py", description="Training curves of train.py runs (reward, distill, grad norm and lr against "
                                            "the optimizer step): training.png beside each run's run.json.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by train.py")
    for d in p.parse_args(argv).runs:
        try:
            training_figure(d, Path(d) / "training.png")
        except (ValueError, OSError) as e:
            raise UsageError(str(e)) from None
        print(Path(d) / "training.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
