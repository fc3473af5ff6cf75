"""plots.py: the figures exist as small PNGs, and the data they were drawn from (read back from the
JSON beside each PNG) equals the input: means and stds recomputed here by hand with statistics over
synthetic report rows (several runs per method), step offsets and stage boundaries worked out by
hand for a synthetic run dir (a torn last line, an unfinished stage), TensorBoard scalars read back
with tensorboard's own EventAccumulator."""
import json
import statistics
import sys

import numpy as np
import pytest
from PIL import Image

import plots

# eval.METRICS' shape: name -> (label, higher is better, decimals)
METRICS = {"aesthetic": ("Aesthetic", True, 3), "hps": ("HPS", True, 4), "png_kb": ("PNG kB", False, 2),
           "fid": ("FID", False, 2)}
TASKS = ["aesthetic", "hps"]


def _row(method, stage, run, metrics, forgetting=None):
    name = f"stage{stage}-{'base' if stage == 0 else TASKS[stage - 1]}"
    return {"method": method, "stage": stage, "name": name, "run": run, "metrics": metrics, "forgetting": forgetting}


def _report_rows():
    """Base once, then stages 1..2 of three rid runs and two draft runs, and a soup - eval's table order.
    Values differ per run so means and stds are non-trivial; draft lacks FID at stage 1."""
    rows = [_row("base", 0, "base", {"aesthetic": 5.0, "hps": 0.25, "png_kb": 40.0, "fid": 30.0})]
    runs = {"rid": [("r0", 0.0), ("r1", 0.1), ("r2", -0.3)], "draft": [("d0", 0.2), ("d1", 0.5)]}
    for stage in (1, 2):
        for method, rs in runs.items():
            for run, e in rs:
                m = {"aesthetic": 5.0 + stage + e, "hps": 0.25 + 0.01 * stage * (1 + e), "png_kb": 40.0 - 3 * stage + e,
                     "fid": 30.0 + 2 * stage + e}
                if method == "draft" and stage == 1:
                    del m["fid"]
                fg = None
                if stage == 2:  # the last stage carries forgetting; None = not defined (the paper's "-")
                    fg = {"aesthetic": 0.4 + e if method == "rid" else 1.5 + e, "hps": None,
                          "png_kb": 0.0 if run != "r1" else None, "fid": 3.0 + e}
                rows.append(_row(method, stage, run, m, fg))
    rows.append(_row("soup", 2, "soup", {"aesthetic": 6.5, "hps": 0.26, "png_kb": 35.0, "fid": 33.0},
                     {"aesthetic": 0.5, "hps": None, "png_kb": 0.0, "fid": 3.0}))
    return rows


def _check_png(path):
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(raw) < 300_000, (path, len(raw))
    with Image.open(path) as im:
        assert im.width > 100 and im.height > 100


#### METRICS ACROSS STAGES ####

def test_stage_figure_plots_the_rows_values(tmp_path):
    rows = _report_rows()
    out = tmp_path / "stages.png"
    data = plots.stage_figure(rows, METRICS, out)
    _check_png(out)
    assert json.loads((tmp_path / "stages.json").read_text()) == data  # what was drawn, read back

    assert data["ticks"] == ["stage0-base", "stage1-aesthetic", "stage2-hps"]
    base = rows[0]["metrics"]
    for m in METRICS:
        for method in ("rid", "draft"):
            got = data["metrics"][m][method]
            want_x, want_mean, want_std = [0], [base[m]], [0.0]  # the base model is every method's stage 0
            for stage in (1, 2):
                vals = [r["metrics"][m] for r in rows
                        if r["method"] == method and r["stage"] == stage and m in r["metrics"]]
                if vals:
                    want_x.append(stage), want_mean.append(statistics.fmean(vals))
                    want_std.append(statistics.stdev(vals))
            assert got["x"] == want_x, (m, method)
            assert got["mean"] == pytest.approx(want_mean, rel=1e-12), (m, method)
            assert got["std"] == pytest.approx(want_std, rel=1e-12, abs=1e-15), (m, method)
        # the soup: one model, one point at its stage, no stage-0 line
        assert data["metrics"][m]["soup"] == {"x": [2], "mean": [rows[-1]["metrics"][m]], "std": [0.0], "n": [1]}
    assert data["metrics"]["fid"]["draft"]["x"] == [0, 2]  # draft has no FID at stage 1
    assert data["metrics"]["aesthetic"]["rid"]["n"] == [1, 3, 3]


def test_stage_figure_without_metrics_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="none of the metrics"):
        plots.stage_figure(_report_rows(), {"clip": ("CLIP", True, 2)}, tmp_path / "x.png")


#### FORGETTING ####

def test_forgetting_figure_means_stds_and_missing(tmp_path):
    rows = _report_rows()
    out = tmp_path / "forgetting.png"
    data = plots.forgetting_figure(rows, METRICS, out)
    _check_png(out)
    assert json.loads((tmp_path / "forgetting.json").read_text()) == data

    for m in METRICS:
        for method in ("rid", "draft", "soup"):
            vals = [r["forgetting"][m] for r in rows
                    if r["method"] == method and r["forgetting"] and r["forgetting"][m] is not None]
            got = data[m][method]
            assert got["values"] == vals and got["n"] == len(vals)
            if not vals:  # HPS: None everywhere -> no bar ("–"), no number
                assert got["mean"] is None and got["std"] is None
                continue
            assert got["mean"] == pytest.approx(statistics.fmean(vals), rel=1e-12)
            assert got["std"] == pytest.approx(statistics.stdev(vals) if len(vals) > 1 else 0.0, abs=1e-12)
    assert data["png_kb"]["rid"]["n"] == 2  # run r1's None is left out, not counted as 0
    assert data["aesthetic"]["draft"]["mean"] == pytest.approx(1.5 + 0.35)


def test_forgetting_figure_without_forgetting_is_an_error(tmp_path):
    rows = [r for r in _report_rows() if r["stage"] < 2]
    with pytest.raises(ValueError, match="no row carries forgetting"):
        plots.forgetting_figure(rows, METRICS, tmp_path / "f.png")


#### TRAINING CURVES ####

def _step(step, k, distill=True):
    r = {"step": step, "epoch": 0, "loss": -k - 0.1 * step, "reward": k + 0.1 * step, "grad_norm": 1.0 / step,
         "lr": 5e-5, "time": 0.5 * step}
    if distill:
        r["distill"] = 0.01 * step
    return r


def _run_dir(tmp_path, distill=True):
    """stage1 finished (5 steps, a torn last line from a crash mid-write), stage2 on disk, unfinished
    (3 steps), a stage3 directory without metrics.jsonl yet (ignored)."""
    run = tmp_path / "run"
    for name, n in (("stage1-aesthetic", 5), ("stage2-hps", 3)):
        (run / name).mkdir(parents=True)
        lines = [json.dumps(_step(s, int(name[5]), distill)) for s in range(1, n + 1)]
        if name == "stage1-aesthetic":
            lines.append('{"step": 6, "epoch": 0, "lo')
        (run / name / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "stage3-compress").mkdir()
    (run / "run.json").write_text(json.dumps({"stages": ["stage1-aesthetic"], "tasks": TASKS + ["compress"]}))
    return run


def test_training_figure_offsets_and_boundaries(tmp_path):
    run = _run_dir(tmp_path)
    out = tmp_path / "training.png"
    data = plots.training_figure(run, out)
    _check_png(out)
    assert json.loads((tmp_path / "training.json").read_text()) == data

    assert data["stages"] == [
        {"name": "stage1-aesthetic", "task": "aesthetic", "finished": True, "offset": 0, "steps": 5},
        {"name": "stage2-hps", "task": "hps", "finished": False, "offset": 5, "steps": 3}]
    assert data["boundaries"] == [0, 5]
    x = [1, 2, 3, 4, 5, 6, 7, 8]  # stage 2's steps 1..3 continue at 6..8; the torn line is skipped
    rows = [_step(s, 1) for s in range(1, 6)] + [_step(s, 2) for s in range(1, 4)]
    for k in ("reward", "distill", "grad_norm", "lr"):
        assert data["series"][k] == {"x": x, "y": [r[k] for r in rows]}, k


def test_training_figure_without_distill(tmp_path):
    data = plots.training_figure(_run_dir(tmp_path, distill=False), tmp_path / "t.png")
    assert set(data["series"]) == {"reward", "grad_norm", "lr"}


def test_torn_line_before_the_last_is_an_error(tmp_path):
    run = _run_dir(tmp_path)
    f = run / "stage2-hps" / "metrics.jsonl"
    f.write_text("{not json\n" + f.read_text())
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        plots.training_figure(run, tmp_path / "t.png")


def test_cli_writes_training_png_and_exits_2_on_a_bad_dir(tmp_path, capsys):
    run = _run_dir(tmp_path)
    assert plots.main([str(run)]) == 0 and (run / "training.png").exists()
    assert plots.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no run.json" in err[0]
    assert plots.main([]) == 2  # RUN_DIR is required
    assert capsys.readouterr().err.strip() == "plots.py: error: the following arguments are required: RUN_DIR"


#### TENSORBOARD ####

def test_tensorboard_logger_scalars_and_image_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = [_step(s, 1) for s in range(1, 4)]
    png = tmp_path / "samples.png"
    Image.fromarray(np.arange(16 * 24 * 3, dtype=np.uint8).reshape(16, 24, 3)).save(png)
    log = plots.TensorBoardLogger(tmp_path / "tb")
    for r in rows:
        log.scalars("stage1-aesthetic/", r["step"], {**r, "distill": None})
    log.image("stage1-aesthetic/samples", 3, png)
    log.close()

    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    tags = ea.Tags()
    assert "stage1-aesthetic/distill" not in tags["scalars"]  # None is skipped
    for k in ("loss", "reward", "grad_norm", "lr", "epoch", "time"):
        events = ea.Scalars(f"stage1-aesthetic/{k}")
        assert [e.step for e in events] == [1, 2, 3]
        assert [e.value for e in events] == pytest.approx([r[k] for r in rows], rel=1e-6)  # stored as fp32
    (img,) = ea.Images("stage1-aesthetic/samples")
    assert (img.step, img.width, img.height) == (3, 24, 16)


def test_tensorboard_missing_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ValueError) as e:
        plots.TensorBoardLogger(tmp_path / "tb")
    assert str(e.value) == "--report-to tensorboard needs the tensorboard package: pip install tensorboard"
