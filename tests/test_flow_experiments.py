"""experiments.r0 and experiments.ril on a mini flow world (--model), at toy size on the reduced build
(conftest's small_flow): train.py's runs on the flow model with the mini world's preset, ONE eval.py, a doc
whose numbers are eval's own report.json's; a second invocation reuses every run; --report-only rewrites the
doc from what is stored; a --model that is not a flow world exits 2 in one line."""
import argparse
import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cli  # noqa: E402
import eval as evaluation  # noqa: E402
import mini  # noqa: E402
from experiments import common, r0, ril  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TOY_TRAIN = "--batch 2 --max-steps 1"
TOY_EVAL = "--max-prompts 2 --images-per-prompt 1"


def mean_std_cell(cell: str) -> tuple[float, float, float]:
    """'7.59 ± 0.01' -> (mean, std, half a unit of the last digit shown: the rounding's tolerance)."""
    mean, std = cell.split(" ± ")
    decimals = len(mean.partition(".")[2])
    return float(mean), float(std), 0.5001 * 10 ** -decimals


def mtimes(out: Path) -> dict:
    """Every file the training wrote (not the eval's), with its modification time."""
    return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "eval" not in p.relative_to(out).parts
            and p.suffix != ".log" and p.name not in (".lock", "experiment.json")}


def test_r0_on_the_flow_world_end_to_end_resumed_and_report_only(small_flow, tmp_path, capsys):
    out, doc = tmp_path / "r0", tmp_path / "docs" / "r0_flow.md"
    argv = ["--model", str(small_flow), "--seeds", "0,1", "--jobs", "2", "--out", str(out), "--doc", str(doc),
            "--train-args", f"--steps 2 {TOY_TRAIN}", "--eval-args", TOY_EVAL]
    assert r0.main(argv) == 0
    flow = json.loads((small_flow / "flow.json").read_text())
    report = json.loads((out / "eval" / "report.json").read_text())
    text = doc.read_text()

    # train.py gave the flow model the mini world's preset: its rewards and prompts, the flow's model
    for run in ("r0-seed0", "r0-seed1", "r0plus-seed0", "r0plus-seed1"):
        info = json.loads((out / run / "run.json").read_text())
        assert Path(info["model"]) == small_flow.resolve() and info["config"]["method"] == "r0"
        assert Path(info["reward_spec"]) == mini.REWARD_SPEC and info["config"]["steps"] == 2
    assert not any(out.glob("r0-noreg-*"))  # no ablations by default on a flow world

    # Table 1: the base at the flow world's own steps (flow.json) and at K, R0 and R0+ as mean ± std of eval's rows
    bases = {r["name"]: r["metrics"] for r in report["rows"] if r["stage"] == 0}
    assert set(bases) == {f"stage0-base-{flow['steps']}steps", "stage0-base-2steps"}
    table = text.split("## Table 1 at mini scale", 1)[1].split("## Every seed", 1)[0].splitlines()
    cols = [m for m in r0.COLS if m in bases["stage0-base-2steps"]]
    assert "fid" in cols
    for steps in (flow["steps"], 2):
        row = next(line for line in table if line.startswith(f"| Base model | {steps} |")).split(" | ")[2:]
        for m, cell in zip(cols, row):
            assert float(cell.strip(" |")) == pytest.approx(bases[f"stage0-base-{steps}steps"][m],
                                                            abs=10 ** -evaluation.METRICS[m][2]), (steps, m)
    means = {}
    for name, label in (("r0", "R0"), ("r0plus", "R0+")):
        vals = {m: [r["metrics"][m] for r in report["rows"]
                    if r["stage"] == 1 and Path(r["run"]).name.startswith(f"{name}-seed")] for m in cols}
        assert all(len(v) == 2 for v in vals.values())
        row = next(line for line in table if line.startswith(f"| {label} | 2 |")).split(" | ")[2:]
        for m, cell in zip(cols, row):
            mean, std, tol = mean_std_cell(cell.strip(" |"))
            assert mean == pytest.approx(statistics.fmean(vals[m]), abs=tol), (label, m)
            assert std == pytest.approx(statistics.stdev(vals[m]), abs=tol), (label, m)
        means[name] = {m: statistics.fmean(v) for m, v in vals.items()}
    # the sentence on R0 against the base at K follows the numbers: the metrics it does not beat are named
    base_k = bases["stage0-base-2steps"]
    lost = [evaluation.METRICS[m][0] for m in cols if not r0.better(m, means["r0"][m], base_k[m])]
    sentence = next(line for line in table if line.startswith("R0's mean over seeds"))
    assert (f"**it does not on {', '.join(lost)}**" in sentence) if lost else "(every metric)" in sentence

    # the flow world's facts: title, the schedule the runs used, what does not carry over from DDIM
    assert text.startswith("# R0 in the mini flow world") and f"--model {small_flow}" in text
    assert "| R0 | joint | 2 | 2 |" in text  # label, task, steps, batch (--train-args) from run.json
    section = text.split("## What does not carry over from DDIM", 1)[1]
    assert "flow-matching Euler" in section and f"{flow['steps']} steps: 1.000" in section
    timing = json.loads((out / "experiment.json").read_text())
    assert timing["trained_runs"] == 4 and timing["peak_rss_gb"] > 0
    assert f"peak RSS of any one process {timing['peak_rss_gb']:.2f} GB" in text

    # a second invocation trains nothing (every run finished earlier) and reports the first one's timing
    trained = mtimes(out)
    capsys.readouterr()
    assert r0.main(argv) == 0
    assert capsys.readouterr().out.count("finished earlier, kept") == 4
    assert mtimes(out) == trained and json.loads((out / "experiment.json").read_text()) == timing
    assert doc.read_text() == text

    # --report-only: the same doc from the stored eval and timing, nothing run
    doc.unlink()
    stored = (out / "eval" / "report.json").stat().st_mtime_ns
    assert r0.main(argv + ["--report-only"]) == 0
    assert doc.read_text() == text and (out / "eval" / "report.json").stat().st_mtime_ns == stored
    assert mtimes(out) == trained


def test_ril_on_the_flow_world_end_to_end_resumed_and_report_only(small_flow, tmp_path, capsys):
    out, doc = tmp_path / "ril", tmp_path / "docs" / "mini_flow.md"
    argv = ["--model", str(small_flow), "--seeds", "0,1", "--tasks", "aesthetic,hps", "--jobs", "2",
            "--out", str(out), "--doc", str(doc), "--train-args", f"--steps 2 {TOY_TRAIN}", "--eval-args", TOY_EVAL]
    assert ril.main(argv) == 0
    report = json.loads((out / "eval" / "report.json").read_text())
    text = doc.read_text()
    for run in ("rid-seed0", "rid-seed1", "baseline-seed0", "baseline-seed1"):
        info = json.loads((out / run / "run.json").read_text())
        assert Path(info["model"]) == small_flow.resolve() and info["stages"] == ["stage1-aesthetic", "stage2-hps"]
        # the UNet world's schedule (train.py's mini_world preset) but for the toy flags
        cfg = info["config"]
        assert cfg["epochs"] == {"aesthetic": 1, "hps": 3} and cfg["lr_schedule"]["aesthetic"] == "constant"
        assert cfg["lr"]["hps"] == (5e-4 if run.startswith("rid") else 7e-4)
    # the last stage's every metric and its forgetting (Eq. 3), mean ± std, as eval computed them
    for label in ("rid", "baseline"):
        rows = [r for r in report["rows"] if r["stage"] == 2 and Path(r["run"]).name.startswith(f"{label}-seed")]
        assert len(rows) == 2
        line = next(x for x in text.splitlines() if x.startswith(f"| {label} | 2: "))
        cells = line.strip(" |").split(" | ")[2:]
        cols = [m for m in evaluation.METRICS if any(m in r["metrics"] for r in report["rows"])]
        for m, cell in zip(cols, cells):
            mean, std, tol = mean_std_cell(cell)
            vals = [r["metrics"][m] for r in rows]
            assert mean == pytest.approx(statistics.fmean(vals), abs=tol), (label, m)
            assert std == pytest.approx(statistics.stdev(vals), abs=tol), (label, m)
        forgetting = text.split("**Forgetting**", 1)[1].splitlines()
        f2 = next(x for x in forgetting if x.startswith(f"| {label} | 2: ")).strip(" |").split(" | ")[2:]
        aes = cols.index("aesthetic")
        want = statistics.fmean(r["forgetting"]["aesthetic"] for r in rows)
        mean, _, tol = mean_std_cell(f2[aes])
        assert mean == pytest.approx(want, abs=tol)
    assert text.startswith("# The mini flow world's RIL experiment")
    assert "| rid | hps | 2 | 2 | 3 | 0.0005 | constant |" in text
    assert "| baseline | hps | 2 | 2 | 3 | 0.0007 | cosine |" in text
    assert "## What does not carry over from DDIM" in text and "not retuned" in text
    for fig in ("_grid.png", "_stages.png", "_forgetting.png"):
        assert (doc.parent / (doc.stem + fig)).stat().st_size > 0
    timing = json.loads((out / "experiment.json").read_text())
    assert timing["trained_runs"] == 4 and f"{timing['train_min']:.1f} min training" in text

    trained = mtimes(out)
    capsys.readouterr()
    assert ril.main(argv) == 0
    assert capsys.readouterr().out.count("finished earlier, kept") == 4 and mtimes(out) == trained
    doc.unlink()
    assert ril.main(argv + ["--report-only"]) == 0
    assert doc.read_text() == text and mtimes(out) == trained


def _namespace(model):
    return argparse.Namespace(model=None if model is None else str(model), out=None, doc=None)


def test_model_flag_defaults(tmp_path):
    """The mini world: no train.py flag, the old defaults; a flow world: --model and names derived from it."""
    p = cli.Parser(prog="x")
    outs = (lambda t: f"out/r0-{t}" if t else "out/r0-experiment", lambda t: f"docs/r0_{t}_results.md" if t else "docs/r0_results.md")
    a = _namespace(None)
    assert common.resolve_model(p, a, *outs) == ([], None) and (a.out, a.doc) == ("out/r0-experiment", "docs/r0_results.md")
    if mini.MODEL.is_dir():
        a = _namespace(mini.MODEL)
        assert common.resolve_model(p, a, *outs) == ([], None) and a.out == "out/r0-experiment"
    fake = tmp_path / "flow"
    fake.mkdir()
    (fake / "model_index.json").write_text("{}")
    (fake / "flow.json").write_text('{"steps": 20}')
    a = _namespace(fake)
    assert common.resolve_model(p, a, *outs) == (["--model", str(fake)], {"steps": 20})
    assert (a.out, a.doc) == ("out/r0-flow", "docs/r0_flow_results.md")


@pytest.mark.parametrize("script", [r0, ril])
@pytest.mark.parametrize("what", ["missing", "empty", "not-flow"])
def test_a_model_that_is_not_a_flow_world_exits_2_in_one_line(script, what, tmp_path, capsys):
    d = tmp_path / "m"
    if what != "missing":
        d.mkdir()
    if what == "not-flow":
        (d / "model_index.json").write_text("{}")
    assert script.main(["--model", str(d), "--out", str(tmp_path / "out"), "--doc", str(tmp_path / "d.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"--model {str(d)!r}" in err, err
    assert not (tmp_path / "out").exists()
