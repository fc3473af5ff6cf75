"""`python -m experiments.ril` end to end on the committed mini world at toy size: methods × λ × seeds
→ train.py runs → one eval.py → docs-style report whose mean ± std match eval's own report.json."""
import json
import os
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments import ril as experiment  # noqa: E402


def test_variants_and_run_names():
    assert experiment.variants(["rid", "baseline"], [0.1, 1.0]) == [("rid", 0.1), ("rid", 1.0), ("baseline", None)]
    assert experiment.run_name("rid", 0.1, 2) == "rid-seed2"  # the paper's λ keeps the pre-sweep name
    assert experiment.run_name("rid", 10.0, 0) == "rid-lam10-seed0"
    assert experiment.run_name("baseline", None, 1) == "baseline-seed1"
    assert experiment.label("rid", 1.0, [0.1, 1.0]) == "rid λ=1" and experiment.label("rid", 0.1, [0.1]) == "rid"


@pytest.mark.parametrize("flag,value", [("--lams", "0.1,x"), ("--lams", "-1"), ("--seeds", "0,a"), ("--jobs", "0")])
def test_bad_flags_name_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        experiment.main([flag, value])
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_experiment_end_to_end(tmp_path):
    if not (Path(experiment.ROOT) / "mini" / "world" / "world.json").exists():
        pytest.skip("the committed mini world is missing")
    out, doc = tmp_path / "exp", tmp_path / "docs" / "results.md"
    argv = ["--methods", "rid,baseline", "--lams", "0.1,1", "--seeds", "0,1", "--tasks", "aesthetic,compress",
            "--jobs", "2", "--out", str(out), "--doc", str(doc),
            "--train-args", "--steps 2 --batch 2 --max-steps 1",
            "--eval-args", "--steps 2 --max-prompts 2 --images-per-prompt 1"]
    assert experiment.main(argv) == 0

    names = {p.name for p in out.iterdir() if p.is_dir()}
    assert {"rid-seed0", "rid-seed1", "rid-lam1-seed0", "rid-lam1-seed1", "baseline-seed0", "baseline-seed1"} <= names
    for seed in (0, 1):
        assert json.loads((out / f"rid-seed{seed}" / "run.json").read_text())["config"]["lam"] == 0.1
        assert json.loads((out / f"rid-lam1-seed{seed}" / "run.json").read_text())["config"]["lam"] == 1.0
    assert doc.exists() and (doc.parent / "results_grid.png").exists()

    # Mean ± std of the last stage's aesthetic per variant, recomputed from eval's own report.json.
    report = json.loads((out / "eval" / "report.json").read_text())
    text = doc.read_text()
    for label, prefix in (("rid λ=0.1", "rid-seed"), ("rid λ=1", "rid-lam1-seed"), ("baseline", "baseline-seed")):
        vals = [r["metrics"]["aesthetic"] for r in report["rows"]
                if r["stage"] == 2 and Path(r["run"]).name.startswith(prefix)]
        assert len(vals) == 2
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} | 2: "))
        mean, std = (float(x) for x in row.split(" | ")[2].split(" ± "))  # the Aesthetic column
        assert mean == pytest.approx(statistics.fmean(vals), abs=0.006), (label, row)
        assert std == pytest.approx(statistics.stdev(vals), abs=0.006), (label, row)
        # the forgetting table (after the "**Forgetting**" line): Eq. 3 at stage 2 as eval computed it, and
        # "-" where the paper prints a dash (aesthetic at stage 1: its task was not trained before it)
        forgetting = text.split("**Forgetting**", 1)[1].split("**Training reward**", 1)[0].splitlines()
        f1 = next(line for line in forgetting if line.startswith(f"| {label} | 1: "))
        f2 = next(line for line in forgetting if line.startswith(f"| {label} | 2: "))
        assert f1.split(" | ")[2] == "-" and f2.split(" | ")[2] != "-"
        want = [r["forgetting"]["aesthetic"] for r in report["rows"]
                if r["stage"] == 2 and Path(r["run"]).name.startswith(prefix)]
        assert min(want) >= 0
        assert float(f2.split(" | ")[2].split(" ± ")[0]) == pytest.approx(statistics.fmean(want), abs=0.006), f2
    # Training rewards: start/end of every task for every variant, from the runs' own metrics.jsonl.
    for label in ("rid λ=0.1", "rid λ=1", "baseline"):
        for task in ("aesthetic", "compress"):
            assert any(line.startswith(f"| {label} | {task} | ") for line in text.splitlines()), (label, task)
    timing = json.loads((out / "experiment.json").read_text())
    assert timing["trained_runs"] == 6 and timing["peak_rss_gb"] > 0
    assert (doc.parent / "results_grid.png").stat().st_size > 0
    drawn = json.loads((doc.parent / "results_forgetting.json").read_text())  # forgetting.png's own data
    for label, prefix in (("rid λ=0.1", "rid-seed"), ("baseline", "baseline-seed")):
        want = [r["forgetting"]["fid"] for r in report["rows"]
                if r["stage"] == 2 and Path(r["run"]).name.startswith(prefix)]
        assert drawn["fid"][label]["values"] == pytest.approx(want, rel=1e-12)
    assert "results_stages.png" in text and (doc.parent / "results_stages.png").stat().st_size > 0
    # --report-only rewrites the doc from the stored report and timings, computing nothing.
    doc.unlink()
    assert experiment.main([*argv, "--report-only"]) == 0
    assert doc.read_text() == text
    # ... and keeps a hand-written "## Notes" section.
    doc.write_text(text + "\n## Notes\n\nRID forgot less here.\n")
    assert experiment.main([*argv, "--report-only"]) == 0
    assert doc.read_text().startswith(text) and doc.read_text().endswith("## Notes\n\nRID forgot less here.\n")
    # A second call trains nothing (every run finished) and reads every stage from eval's cache.
    mtimes = {p: p.stat().st_mtime for p in out.glob("*/stage*/adapters.safetensors")}
    assert experiment.main(argv) == 0
    assert "RID forgot less here." in doc.read_text()
    assert mtimes == {p: p.stat().st_mtime for p in out.glob("*/stage*/adapters.safetensors")}
