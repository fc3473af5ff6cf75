"""The experiment scripts at toy size: `python -m experiments.ril` end to end on the committed mini world
(methods × λ × seeds → train.py runs → one eval.py → a docs-style report whose mean ± std match eval's own
report.json), experiments.table3's builder on synthetic reports, and `python -m experiments.lasro` end to end."""
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

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
    assert experiment.main([flag, value]) == 2
    assert flag in capsys.readouterr().err


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


def test_a_second_experiment_on_the_same_out_exits_2_with_one_line(tmp_path, capsys):
    import checkpoint

    out = tmp_path / "exp"
    held = checkpoint.RunLock(out)
    try:
        assert experiment.main(["--seeds", "0", "--methods", "baseline", "--out", str(out),
                                "--doc", str(tmp_path / "d.md")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "in use by" in err[0], err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        held.release()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_experiment_takes_its_runs_with_it(tmp_path):
    """kill -9 of an experiment script: the runs it started get SIGTERM (no orphan left writing a run
    that a restarted experiment would start over beside it). Events, not deadlines: each run blocks
    SIGTERM, then reports its pid through a FIFO; once the killed experiment is reaped, SIGTERM must be
    pending on every run (the kernel queues the parent-death signal while the parent exits, before
    wait() returns it), where it stays, blocked, for the test to read in /proc."""
    import os
    import select
    import signal
    import subprocess

    fifo = tmp_path / "pids"
    os.mkfifo(fifo)
    rd = os.open(fifo, os.O_RDWR)  # read end that is also a writer: no EOF between the runs' writes
    child = [sys.executable, "-c", "import os, signal, threading; "
             "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}); "
             f"fd = os.open({str(fifo)!r}, os.O_WRONLY); os.write(fd, b'%d\\n' % os.getpid()); os.close(fd); "
             "threading.Event().wait()", "--out", str(tmp_path / "run")]
    parent = subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                               "from experiments.common import run_parallel; "
                               f"run_parallel([{child!r}] * 2, 2, __import__('pathlib').Path({str(tmp_path)!r}), "
                               "'t', print)", str(ROOT)])
    parent_fd, pids, got = os.pidfd_open(parent.pid), [], b""
    try:
        while len(pids) < 2:  # both runs started and blocked SIGTERM; or the experiment ended: fail
            ready, _, _ = select.select([rd, parent_fd], [], [])
            assert rd in ready, f"the experiment exited ({parent.wait()}) before both runs reported"
            got += os.read(rd, 64)
            pids = [int(x) for x in got.split(b"\n")[:-1]]  # complete lines only
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        term = 1 << (signal.SIGTERM - 1)
        for pid in pids:
            status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                          if ":\t" in line)
            pending = int(status["ShdPnd"], 16) | int(status["SigPnd"], 16)
            assert pending & term, f"run {pid} got no SIGTERM when its experiment died (pending {pending:#x})"
    finally:
        os.close(rd), os.close(parent_fd)
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in pids:  # the runs: SIGKILL, then wait for their exit (a pidfd turns readable)
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            os.kill(pid, signal.SIGKILL)
            select.select([fd], [], [])
            os.close(fd)


#### experiments.table3: the paper's Tables 3 and 6 ####

from experiments import table3  # noqa: E402


def _row(run, stage, metrics, forgetting=None, shown=(), method="rid"):
    return {"run": run, "stage": stage, "name": f"stage{stage}", "method": method, "metrics": metrics,
            "forgetting": forgetting, "forgetting_shown": list(shown)}


def test_table3_builder_on_synthetic_reports():
    """Averages over orders and the count of orders in which RID forgets less, computed by hand."""
    m = dict.fromkeys(table3.COLS, 0.0)
    rows = [_row("base", 0, {**m, "aesthetic": 5.0}, method="base")]
    runs, final = {}, {}
    # two orders × two methods; stage 1 rows carry forgetting too but only the last stage counts
    spec = {("rid", "AHC"): (6.0, 0.2), ("baseline", "AHC"): (7.0, 0.5),
            ("rid", "ACH"): (5.0, 0.9), ("baseline", "ACH"): (4.0, 0.4)}
    for (method, order), (aes, f_aes) in spec.items():
        d = f"{method}-{order}"
        runs[d] = (method, order, 0)
        rows.append(_row(d, 1, {**m, "aesthetic": 99.0}, dict.fromkeys(table3.COLS, 50.0), ["clip", "fid"], method))
        fg = {**dict.fromkeys(table3.COLS, 1.0 if method == "rid" else 2.0), "aesthetic": f_aes}
        final[method, order] = _row(d, 3, {**m, "aesthetic": aes}, fg, ["aesthetic", "clip", "fid"], method)
        rows.append(final[method, order])
    rows.append(_row("soup", 1, {**m, "aesthetic": 6.5}, method="soup"))
    data = table3.build_tables(rows, runs, ["a", "b", "c"], [])
    assert data["final"][("rid", "AHC")] == [final["rid", "AHC"]]
    assert data["average"]["rid"]["aesthetic"] == [6.0, 5.0] and data["average"]["baseline"]["aesthetic"] == [7.0, 4.0]
    # aesthetic: RID below the baseline in AHC (0.2 < 0.5), not in ACH (0.9 > 0.4); clip: both orders (1 < 2);
    # hps is not shown (its task came last or never): no order compared
    assert data["counts"]["aesthetic"] == (1, 2) and data["counts"]["clip"] == (2, 2) and data["counts"]["hps"] == (0, 0)
    assert data["soup"]["metrics"]["aesthetic"] == 6.5 and data["base"]["metrics"]["aesthetic"] == 5.0
    assert table3._cell([final["rid", "AHC"]], "aesthetic") == "6.000 (0.200)"
    assert table3._cell([final["rid", "AHC"]], "hps") == "0.0000 (-)"


def test_table3_paper_counts_are_the_papers():
    # read off the paper's Table 3 by hand: RID forgets less than the baseline in every order on aesthetic,
    # HPS, CLIP and FID; on PNG kB and JPEG kB in 3 of the 4 orders where compress is not last (CHA: both 0.00
    # PNG, and JPEG 0.08 vs 0.00)
    assert table3.paper_counts() == {"aesthetic": (4, 4), "hps": (4, 4), "png_kb": (3, 4), "jpeg_kb": (3, 4),
                                     "clip": (6, 6), "fid": (6, 6)}
    assert sorted(table3.ORDERS) == sorted(["AHC", "ACH", "HAC", "HCA", "CAH", "CHA"])


def _wilcoxon_by_enumeration(d):
    """The exact two-sided Wilcoxon p by listing every sign assignment (the oracle for table3.wilcoxon_p)."""
    import itertools
    d = [x for x in d if x != 0]
    a = [abs(x) for x in d]
    rank = [statistics.fmean([1 + sorted(a).index(v) + i for i in range(a.count(v))]) for v in a]  # mid-ranks
    w = sum(r for r, x in zip(rank, d) if x > 0)
    w_min = min(w, sum(rank) - w)
    hits = sum(sum(r for r, s in zip(rank, signs) if s) <= w_min + 1e-9
               for signs in itertools.product((0, 1), repeat=len(d)))
    return min(1.0, 2 * hits / 2 ** len(d))


def test_table3_paired_tests_by_hand():
    # six pairs, RID lower in all: sign test 2·(1/2)^6, Wilcoxon W+ = 0 → 2·1/64
    six = [(0.1 * i, 0.1 * i + 1) for i in range(6)]
    t = table3.pair_tests(six)
    assert (t["n"], t["less"], t["more"], t["ties"]) == (6, 6, 0, 0)
    assert t["sign_p"] == pytest.approx(2 / 64) and t["wilcoxon_p"] == pytest.approx(2 / 64)
    # 4 less, 1 more, 1 tie: the sign test drops the tie: 2·P(X ≤ 1 | n=5) = 2·6/32
    t = table3.pair_tests([(0, 1), (0, 2), (0, 3), (0, 4), (5, 0), (2, 2)])
    assert (t["less"], t["more"], t["ties"]) == (4, 1, 1) and t["sign_p"] == pytest.approx(12 / 32)
    # d = -1,-2,-3,-4,+5: W+ = 5, W− = 10; the rank sets of sum ≤ 5 are {}, {1}, {2}, {3}, {4}, {5}, {1,2},
    # {1,3}, {1,4}, {2,3}: 10 of 32, p = 2·10/32
    assert table3.wilcoxon_p([-1, -2, -3, -4, 5]) == pytest.approx(20 / 32)
    # ties in |d| (mid-ranks) and zeros, against the enumeration
    for d in ([-1, -1, 2, -3, -3, -3, 0, 4], [0.5, -0.5, 0.5, -2.0, -7.0, 1.0], [-0.2] * 9 + [0.1]):
        assert table3.wilcoxon_p(d) == pytest.approx(_wilcoxon_by_enumeration(d))
    assert table3.sign_test_p(0, 0) is None and table3.wilcoxon_p([0.0, 0.0]) is None
    assert table3.sign_test_p(3, 6) == 1.0


def test_table3_builder_over_seeds_pairs_by_seed(tmp_path):
    """Three seeds of two orders: pairs are matched by (order, seed); the joint rows per seed; Table 6's average
    rows are the seeds' averages over the orders."""
    m = dict.fromkeys(table3.COLS, 0.0)
    rows = [_row("base", 0, dict(m), method="base")]
    runs = {}
    # aesthetic forgetting: RID's, the baseline's per (order, seed)
    f = {("AHC", 0): (0.1, 0.5), ("AHC", 1): (0.9, 0.4), ("AHC", 2): (0.2, 0.3),
         ("ACH", 0): (0.3, 0.3), ("ACH", 1): (0.1, 0.8), ("ACH", 2): (0.6, 0.7)}
    for (order, seed), pair in f.items():
        for method, fa in zip(("rid", "baseline"), pair):
            d = f"{method}-{order}-{seed}"
            runs[d] = (method, order, seed)
            aes = 10.0 * seed + (1.0 if method == "rid" else 2.0) + (0.5 if order == "ACH" else 0.0)
            rows.append(_row(d, 3, {**m, "aesthetic": aes}, {**dict.fromkeys(table3.COLS, 0.0), "aesthetic": fa},
                             ["aesthetic"], method))
    # only two orders exist here, so the per-seed averages over all six orders are not defined
    for seed in range(3):
        rows.append(_row(f"joint{seed}", 1, {**m, "aesthetic": 1.0 + seed}, method="baseline"))
    data = table3.build_tables(rows, runs, ["a", "b", "c"], ["joint0", "joint1", "joint2", "missing"])
    assert [r["metrics"]["aesthetic"] for r in data["joint"]] == [1.0, 2.0, 3.0]
    pairs = data["pairs"]["aesthetic"]
    assert [(o, s) for o, s, _, _ in pairs] == [("AHC", 0), ("AHC", 1), ("AHC", 2), ("ACH", 0), ("ACH", 1), ("ACH", 2)]
    assert [(r, b) for _, _, r, b in pairs] == [f[o, s] for o, s, _, _ in pairs]
    t = data["tests"]["aesthetic"]
    assert (t["n"], t["less"], t["more"], t["ties"]) == (6, 4, 1, 1)
    assert t["sign_p"] == pytest.approx(12 / 32)
    # orders by mean over seeds: AHC 0.4 vs 0.4 (not less), ACH 0.333 vs 0.6 (less)
    assert data["counts"]["aesthetic"] == (1, 2)
    assert data["by_seed"]["rid"]["aesthetic"] == []  # not every order ran
    assert data["tests"]["hps"]["n"] == 0 and data["tests"]["hps"]["sign_p"] is None
    doc = tmp_path / "t3.md"
    table3.write_markdown(data, ["facts"], doc, {"aesthetic": 1.0, "hps": 1.0, "compress": 1.0}, "f.png")
    text = doc.read_text()
    assert "| (order, seed) pairs: RID less | 4 of 6 | 0 of 0 |" in text
    assert "| (order, seed) pairs: RID more | 1 of 6 |" in text and "| sign test p | 0.38 | – |" in text
    assert "| AHC | 2 of 3 | – |" in text and "| ACH | 2 of 3 | – |" in text and "| HAC | – |" in text
    assert "| Joint tuning (baseline) | 2.00 ± 1.00 |" in text


@pytest.mark.parametrize("flag,value", [("--seeds", "0,a"), ("--seeds", "-1"), ("--jobs", "0")])
def test_table3_bad_flags_name_the_flag(flag, value, capsys):
    assert table3.main([flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0]


#### experiments.lasro: a black-box task through LaSRO's surrogate ####

from experiments import lasro  # noqa: E402

SURROGATE_TOY = ("--surrogate-pretrain-prompts 4 --surrogate-pretrain-noises 2 --surrogate-pretrain-steps 3 "
                 "--surrogate-hidden 8 --surrogate-pair-batch 4 --surrogate-adapt-steps 2")


def test_lasro_end_to_end(tmp_path):
    """Toy size, one seed: the compress runs train all three stages, the black-box runs (and the frozen
    ablation) branch from them and train stage 3 only; one eval; the doc's per-seed JPEG kB are eval's own;
    --report-only rewrites the same doc from what is stored."""
    from safetensors.torch import load_file

    if not (Path(lasro.ROOT) / "mini" / "world" / "world.json").exists():
        pytest.skip("the committed mini world is missing")
    out, ril_out, doc = tmp_path / "lasro", tmp_path / "ril", tmp_path / "docs" / "lasro.md"
    argv = ["--methods", "rid,baseline", "--seeds", "0", "--jobs", "2", "--out", str(out), "--ril-out", str(ril_out),
            "--doc", str(doc), "--train-args", f"--steps 2 --batch 2 --max-steps 1 {SURROGATE_TOY}",
            "--eval-args", "--steps 2 --max-prompts 2 --images-per-prompt 1"]
    assert lasro.main(argv) == 0
    timing = json.loads((out / "experiment.json").read_text())
    assert timing["trained_runs"] == 5  # rid, baseline (compress); rid, baseline, rid-frozen (jpeg-kb)
    for name, source in (("rid-seed0", "rid-seed0"), ("baseline-seed0", "baseline-seed0"), ("rid-frozen-seed0", "rid-seed0")):
        for stage in ("stage1-aesthetic", "stage2-hps"):  # branched: the shared stages are the compress run's
            a = load_file(str(out / name / stage / "adapters.safetensors"))
            b = load_file(str(ril_out / source / stage / "adapters.safetensors"))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert (out / name / "stage3-jpeg-kb" / "surrogate.json").exists()
    # the frozen ablation is rid with the surrogate's adaptation off and nothing else changed: the same
    # settings but adapt_every, the same pre-training; after its one step (taken before any adaptation
    # could act) the same adapters
    rid3, frozen3 = out / "rid-seed0" / "stage3-jpeg-kb", out / "rid-frozen-seed0" / "stage3-jpeg-kb"
    sur_rid, sur_frozen = (json.loads((d / "config.json").read_text())["surrogate"] for d in (rid3, frozen3))
    assert sur_rid["adapt_every"] == 1 and sur_frozen == {**sur_rid, "adapt_every": 0}
    pre = [json.loads((d / "surrogate_pretrain.json").read_text()) for d in (rid3, frozen3)]
    timeless = [{k: v for k, v in p.items() if k != "seconds"} for p in pre]
    assert timeless[0] == timeless[1] and timeless[0]["pretrain_samples"] == 8
    a, b = (load_file(str(d / "adapters.safetensors")) for d in (rid3, frozen3))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (rid3, frozen3)]
    assert [(r["surrogate"], r["true_reward"]) for r in rows[0]] == [(r["surrogate"], r["true_reward"]) for r in rows[1]]
    report = json.loads((out / "eval" / "report.json").read_text())
    text = doc.read_text()
    for label, run_dir, task in (("rid", out / "rid-seed0", "jpeg-kb"), ("rid-frozen", out / "rid-frozen-seed0", "jpeg-kb"),
                                 ("baseline (compress)", ril_out / "baseline-seed0", "compress")):
        kb = {r["stage"]: r["metrics"]["jpeg_kb"] for r in report["rows"] if Path(r["run"]).resolve() == run_dir.resolve()}
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} | 0 | "))
        assert row == (f"| {label} | 0 | {kb[2]:.3f} | {kb[3]:.3f} | {'yes' if kb[3] < kb[2] else '**no**'} |"), row
    assert "**The surrogate**" in text and "**Cost** of the surrogate" in text
    doc.unlink()
    assert lasro.main([*argv, "--report-only"]) == 0
    assert doc.read_text() == text


@pytest.mark.parametrize("argv", [["--seeds", "0,a"], ["--jobs", "0"], ["--methods", "baseline"]])
def test_lasro_bad_flags_are_one_line(argv, capsys):
    assert lasro.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and argv[0] in err
