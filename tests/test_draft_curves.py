"""experiments.draft: the curve builder on synthetic run files against hand-computed numbers, and the UNet
calls of every DRaFT-family method per training step, counted by hooks during a real rid.train_step on
the tiny SD and compared with the DRaFT paper's Algorithm 1:

    method        forward calls (no recompute)   calls with a gradient (= backward passes)
    baseline      N                              1, at the last timestep
    draft-k       N                              K, the last K timesteps
    draft         N                              N, every timestep
    draft-lv      N + n                          1 + n, all at the last timestep
    refl          N − j + 1                      1, at timestep[N − j], j drawn from the method's generator
with --gradient-checkpointing every call with a gradient is also recomputed in the backward pass: block by block
when it is the step's only one (up to 1 UNet's worth), else whole and then block by block (up to 2;
samplers.predict). "Up to": a unit diffusers does not checkpoint (the mid block's first resnet) or whose
output needs no gradient (the first resnet when the call's input has none) is not recomputed."""
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import plots  # noqa: E402
import rid  # noqa: E402
from experiments import draft  # noqa: E402
from tiny import toy_reward  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


#### THE CURVE BUILDER, on synthetic run files ####

# test.jsonl points (step, calls, time, test_reward) per method and seed; budget 100 calls.
BUDGET = 100
TESTS = {
    "baseline": [[(0, 0, 0, 1.0), (5, 50, 10, 2.0), (10, 100, 20, 3.0)],
                 [(0, 0, 0, 1.0), (5, 50, 12, 2.4), (10, 100, 24, 3.2)]],
    "draft-lv2": [[(0, 0, 0, 1.0), (4, 50, 9, 2.6), (8, 100, 18, 2.9)],
                  [(0, 0, 0, 1.0), (4, 50, 9, 2.0), (8, 100, 18, 3.0)]],
    "refl": [[(0, 0, 0, 1.0), (6, 50, 8, 1.5), (12, 100, 16, 2.1)],
             [(0, 0, 0, 1.0), (6, 54, 8, 2.2), (11, 100, 15, 2.15)]],
}


def write_piece(out: Path, reward: str, method: str, seed: int, points: list) -> None:
    d = out / draft.piece_name(reward, method, seed)
    d.mkdir(parents=True)
    tests = [{"step": s, "calls": c, "time": t, "test_reward": r} for s, c, t, r in points]
    steps, calls, time_ = points[-1][0], points[-1][1], points[-1][2]
    rows = [{"step": i, "reward": float(i + seed), "calls": calls / steps, "calls_total": calls * i / steps,
             "time": time_ * i / steps} for i in range(1, steps + 1)]
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tests))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "done.json").write_text("{}")


@pytest.fixture
def synthetic(tmp_path):
    for method, seeds in TESTS.items():
        for seed, points in enumerate(seeds):
            write_piece(tmp_path, "aesthetic", method, seed, points)
    (tmp_path / draft.piece_name("aesthetic", "draft-k2", 0)).mkdir()  # unfinished: no done.json
    return tmp_path


def test_reach_interpolates_the_first_crossing():
    pts = [{"step": s, "calls": c, "time": t, "test_reward": r} for s, c, t, r in TESTS["baseline"][0]]
    # level 2.2 between (5, 50, 10, 2.0) and (10, 100, 20, 3.0): a fifth of the way
    assert draft.reach(pts, 2.2) == pytest.approx({"step": 6, "calls": 60, "time": 12})
    assert draft.reach(pts, 1.0) == {"step": 0.0, "calls": 0.0, "time": 0.0}  # the base model already is there
    assert draft.reach(pts, 3.01) is None
    # the FIRST crossing counts, not a later one after a dip
    dip = pts[:2] + [{"step": 7, "calls": 70, "time": 14, "test_reward": 1.5}] + pts[2:]
    assert draft.reach(dip, 1.9)["calls"] == pytest.approx(45)


def test_curves_level_and_time_to_level_by_hand(synthetic):
    pieces = draft.load_pieces(synthetic, "aesthetic", [0, 1])
    assert set(pieces) == {"baseline", "draft-lv2", "refl"}  # draft-k2 has no done.json for both seeds
    c = draft.curves(pieces, BUDGET, n_bins=2)
    assert c["level"] == pytest.approx((2.0 + 2.4) / 2)  # K=1's test reward at half its budget, mean of seeds

    k1 = c["by_method"]["baseline"]["reach"]
    assert k1[0] == pytest.approx({"step": 6, "calls": 60, "time": 12})
    f = 1.2 / 1.4  # seed 1: from 1.0 at 0 to 2.4 at (5, 50, 12)
    assert k1[1] == pytest.approx({"step": 5 * f, "calls": 50 * f, "time": 12 * f})
    lv = c["by_method"]["draft-lv2"]["reach"]
    assert lv[0] == pytest.approx({"step": 3, "calls": 37.5, "time": 6.75})  # 1.2/1.6 of (4, 50, 9)
    assert lv[1] == pytest.approx({"step": 4.8, "calls": 60, "time": 10.8})  # 0.2 of the way from (4, 50, 9)
    refl = c["by_method"]["refl"]["reach"]
    assert refl[0] is None  # never above 2.1
    assert refl[1] == pytest.approx({"step": 6, "calls": 54, "time": 8})  # 2.2 exactly at the point

    sp, n = draft.speedup(c, "draft-lv2", "calls")
    assert n == 2 and sp == pytest.approx(((60 + 50 * f) / 2) / ((37.5 + 60) / 2))
    sp, n = draft.speedup(c, "draft-lv2", "step")
    assert sp == pytest.approx(((6 + 5 * f) / 2) / ((3 + 4.8) / 2))
    sp, n = draft.speedup(c, "refl", "calls")
    assert n == 1 and sp == pytest.approx(((60 + 50 * f) / 2) / 54)

    # test reward against calls on a grid 0, 50, 100: mean ± sample std of the seeds
    band = c["by_method"]["draft-lv2"]["test_calls"]
    assert band["x"] == [0, 50, 100]
    assert band["mean"] == pytest.approx([1.0, 2.3, 2.95])
    assert band["std"] == pytest.approx([0, statistics.stdev([2.6, 2.0]), statistics.stdev([2.9, 3.0])])
    # against time, up to the seed that ends first (K=1: 20 s and 24 s -> grid 0, 10, 20)
    tb = c["by_method"]["baseline"]["test_time"]
    assert tb["x"] == [0, 10, 20]
    assert tb["mean"] == pytest.approx([1.0, (2.0 + (1.0 + 1.4 * 10 / 12)) / 2, (3.0 + (2.4 + 0.8 * 8 / 12)) / 2])
    assert c["by_method"]["refl"]["final"] == pytest.approx([2.1, 2.15])
    # training reward, binned by calls (0, 50], (50, 100]: K=1 seed s logs reward step + s at calls 10·step
    tr = c["by_method"]["baseline"]["train_calls"]
    assert tr["x"] == [25, 75] and tr["mean"] == pytest.approx([3.5, 8.5])  # seeds: 3 and 4, then 8 and 9
    assert tr["std"] == pytest.approx([statistics.stdev([3, 4]), statistics.stdev([8, 9])])


def test_report_on_synthetic_runs(synthetic):
    doc = synthetic / "docs" / "draft_results.md"
    summary = draft.write_report(synthetic, doc, ["aesthetic"], [0, 1], BUDGET, ["facts line"])
    text = doc.read_text()
    assert "facts line" in text and "Level: 2.2000" in text
    row = next(line for line in text.splitlines() if line.startswith("| DRaFT-LV n=2 |"))
    cells = row.split(" | ")
    assert cells[5] == "2/2"  # reached
    assert cells[7] == draft.mean_std([37.5, 60]), row  # UNet calls to the level
    f = 1.2 / 1.4
    assert cells[9] == f"{((60 + 50 * f) / 2) / ((37.5 + 60) / 2):.2f} |", row  # calls speed-up vs K=1
    refl = next(line for line in text.splitlines() if line.startswith("| ReFL")).split(" | ")
    assert refl[5] == "1/2" and refl[7] == draft.mean_std([54]), refl
    drawn = json.loads((doc.parent / "draft_aesthetic.json").read_text())  # the figure's own data
    lines = drawn["panels"]["test reward vs UNet calls"]["lines"]
    assert lines["DRaFT-LV n=2"]["mean"] == pytest.approx(summary["aesthetic"]["by_method"]["draft-lv2"]["test_calls"]["mean"])
    assert drawn["hline"][1] == pytest.approx(2.2)


def test_curves_figure_writes_its_data(tmp_path):
    from PIL import Image

    m1 = {"x": [0, 1], "mean": [1, 2], "std": [0, 0.5]}
    panels = {"test a": ("x", {"m1": m1, "m2": {"x": [], "mean": [], "std": []}}),
              "train b": ("calls", {"m1": {"x": [5], "mean": [-1.5], "std": [0]}})}
    plots.curves_figure(panels, tmp_path / "c.png", title="t", hline=("level", 1.5))
    # the JSON beside the figure is the data it was given, written out by hand here
    assert json.loads((tmp_path / "c.json").read_text()) == {
        "title": "t", "hline": ["level", 1.5],
        "panels": {"test a": {"xlabel": "x", "lines": {"m1": {"x": [0, 1], "mean": [1, 2], "std": [0, 0.5]},
                                                       "m2": {"x": [], "mean": [], "std": []}}},
                   "train b": {"xlabel": "calls", "lines": {"m1": {"x": [5], "mean": [-1.5], "std": [0]}}}}}
    with Image.open(tmp_path / "c.png") as im:  # a real PNG, two panels side by side
        assert im.format == "PNG" and im.width > im.height


@pytest.mark.parametrize("argv", [["--seeds", "0,x"], ["--rewards", "compress"], ["--methods", "refl"], ["--jobs", "0"]])
def test_bad_flags_name_the_flag(argv, capsys):
    assert draft.main(argv) == 2
    assert argv[0] in capsys.readouterr().err


#### UNET CALLS PER STEP, by hooks, against Algorithm 1 ####

N = 4  # DDIM steps


def one_step(models, method: str, gen_seed: int = 7, **kw):
    """One real rid.train_step on the tiny SD with the counter attached -> (counter, the DDIM timesteps)."""
    group = rid.inject(models.unet, rank=2)
    group.add_task("t", generator=torch.Generator().manual_seed(0))
    cfg = rid.StepConfig(method=method, steps=N, guidance=3.0, **kw)
    counter = draft.UNetCalls(models.unet)
    noise = torch.randn(2, *models.latent_shape, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([group.flat], lr=1e-3)
    rid.train_step(models, group, toy_reward, [(["a photo of a cat", "a red car"], noise)], opt, cfg,
                   generator=torch.Generator().manual_seed(gen_seed))
    assert group.flat.grad is not None and group.flat.grad.abs().sum() > 0
    return counter, [int(t) for t in rid.DDIM(N).timesteps]


@pytest.mark.parametrize("gc", [False, True])
def test_k1_one_call_with_gradient(models, gc):
    c, ts = one_step(models, "baseline", gradient_checkpointing=gc)
    assert (c.forward, c.backward) == (N, 1)
    assert 0.75 < c.recompute <= 1 if gc else c.recompute == 0  # the tiny UNet: 10 of its 12 units
    assert c.grad_timesteps == [ts[-1]]


@pytest.mark.parametrize("K,gc", [(2, False), (3, True), (4, False)])
def test_draft_k_k_calls_with_gradient(models, K, gc):
    c, ts = one_step(models, "draft-k", truncate=K, gradient_checkpointing=gc)
    assert (c.forward, c.backward) == (N, K)
    assert 1.75 * K < c.recompute <= 2 * K if gc else c.recompute == 0
    assert c.grad_timesteps == ts[-K:]
    assert c.calls == N + K + c.recompute


@pytest.mark.parametrize("gc", [False, True])
def test_draft_every_call_with_gradient(models, gc):
    c, ts = one_step(models, "draft", gradient_checkpointing=gc)
    assert (c.forward, c.backward) == (N, N)
    assert 1.75 * N < c.recompute <= 2 * N if gc else c.recompute == 0
    assert c.grad_timesteps == ts


@pytest.mark.parametrize("n", [1, 2, 3])
def test_lv_one_plus_n_calls_with_gradient(models, n):
    c, ts = one_step(models, "draft-lv", lv_n=n)
    assert (c.forward, c.backward, c.recompute) == (N + n, 1 + n, 0)
    assert c.grad_timesteps == [ts[-1]] * (1 + n)


@pytest.mark.parametrize("gen_seed", [0, 1, 3, 5])  # j = 1, 2, 3, 4
def test_refl_one_call_at_the_drawn_step(models, gen_seed):
    m = max(1, round(50 * N / 50))  # refl_m = 50 at 50 steps (j over all N here), scaled to N
    j = int(torch.randint(1, m + 1, (), generator=torch.Generator().manual_seed(gen_seed)))  # Algorithm 1's draw
    c, ts = one_step(models, "refl", gen_seed=gen_seed, refl_m=50)
    assert (c.forward, c.backward, c.recompute) == (N - j + 1, 1, 0)
    assert c.grad_timesteps == [ts[N - j]]


def test_counter_ignores_sampling_and_detaches(models):
    c, _ = one_step(models, "baseline")
    c.reset()
    with torch.no_grad():
        rid.sample(models, ["a cat"], torch.randn(1, *models.latent_shape), steps=N, guidance=3.0)
    assert (c.forward, c.backward, c.grad_timesteps) == (N, 0, [])
    c.remove()
    rid.sample(models, ["a cat"], torch.randn(1, *models.latent_shape), steps=N, guidance=3.0)
    assert c.forward == N


#### THE TRAINING LOOP is train.py's stage 1 ####

def test_trainer_matches_train_py(tmp_path):
    """Two steps of experiments.draft's loop and of train.py with the same flags log the same numbers (same
    prompts, noise, LoRA init, method draws, AdamW): the curves are those of train.py's own runs."""
    import train

    if not (ROOT / "mini" / "world" / "world.json").exists():
        pytest.skip("the committed mini world is missing")
    extra = ["--steps", "3", "--batch", "2", "--max-steps", "2"]
    tr = draft.Trainer("aesthetic", "draft-lv2", 3, tmp_path / "x", extra)
    mine = [tr.train_step() for _ in range(2)]
    assert [r["calls"] for r in mine] == [3 + 2 + 3] * 2  # N + n forwards, 1 + n backwards
    argv = ["--tasks", "aesthetic", *draft.CONFIGS["draft-lv2"][1], "--seed", "3", "--out", str(tmp_path / "run"),
            "--lr", f"aesthetic={draft.LR['aesthetic']}", "--lr-schedule", "constant", *extra]
    assert train.main(argv) == 0
    theirs = draft.read_jsonl(tmp_path / "run" / "stage1-aesthetic" / "metrics.jsonl")
    assert len(theirs) == 2
    for a, b in zip(mine, theirs):
        for k in ("loss", "reward", "grad_norm", "lr"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), (k, a, b)


#### THE WHOLE COMMAND at toy size: pieces in subprocesses, resume, the refusal of other settings ####

def test_command_end_to_end_resumes_and_refuses_other_settings(tmp_path, capsys):
    """5 DDIM steps, batch 2, two methods, a 3-step budget: the side-by-side cost, a memory probe per config
    and every training piece run as the default does (2 at a time, in subprocesses); a second call finds
    every piece done and rewrites the same doc without training; other settings on the same --out exit 2
    with one line."""
    if not (ROOT / "mini" / "world" / "world.json").exists():
        pytest.skip("the committed mini world is missing")
    out, doc = tmp_path / "out", tmp_path / "draft.md"
    argv = ["--rewards", "aesthetic", "--methods", "baseline,refl", "--seeds", "0", "--budget", "18", "--evals", "2",
            "--cost-rounds", "1", "--jobs", "2", "--out", str(out), "--doc", str(doc),
            "--train-args", "--steps 5 --batch 2"]
    assert draft.main(argv) == 0
    text = doc.read_text()
    for m in ("baseline", "refl"):
        d = out / draft.piece_name("aesthetic", m, 0)
        done = json.loads((d / "done.json").read_text())
        assert done["budget"] == 18 and done["evals"] == 2 and done["calls"] >= 18 and done["ddim_steps"] == 5
        tests = draft.read_jsonl(d / "test.jsonl")
        assert tests[0]["calls"] == 0 and tests[-1]["calls"] == done["calls"] and len(tests) == 3  # base + 2
    k1 = draft.read_jsonl(out / draft.piece_name("aesthetic", "baseline", 0) / "metrics.jsonl")
    assert [r["calls"] for r in k1] == [6, 6, 6]  # 5 forwards + 1 backward per K = 1 step
    cost = json.loads((out / "cost.json").read_text())
    assert set(cost["configs"]) == set(draft.CONFIGS) and cost["configs"]["baseline"]["ratio"] == 1.0
    assert all((out / f"memory-{n}" / "memory.json").exists() for n in draft.CONFIGS)
    assert "## Cost per step, side by side" in text and "## aesthetic" in text and "| ReFL" in text
    mtimes = {p: p.stat().st_mtime for p in out.glob("*/done.json")}
    assert draft.main(argv) == 0  # everything done: nothing runs, the same doc
    assert doc.read_text() == text and mtimes == {p: p.stat().st_mtime for p in out.glob("*/done.json")}
    capsys.readouterr()
    assert draft.main([*argv[:argv.index("--evals")], "--evals", "3", *argv[argv.index("--evals") + 2:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and "evals" in err[0], err


def test_a_second_command_on_the_same_out_exits_2_with_one_line(tmp_path, capsys):
    """Pieces are not train.py runs (no lock of their own): the orchestrator holds <out>/.lock, so a second one
    on the same --out cannot delete a piece the first is writing; nothing is run, nothing written."""
    import checkpoint

    out = tmp_path / "out"
    held = checkpoint.RunLock(out)
    try:
        assert draft.main(["--rewards", "aesthetic", "--methods", "baseline", "--seeds", "0", "--out", str(out),
                          "--doc", str(tmp_path / "d.md")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "in use by" in err[0] and str(out) in err[0], err
        assert sorted(p.name for p in out.iterdir()) == [".lock"] and not (tmp_path / "d.md").exists()
    finally:
        held.release()
