"""experiments.lasro_fast (issue 34, items 2-3): the budget of true-reward calls by hand, the generator rule
both ways and the report builder on synthetic records, the aesthetic black box, the command end to end at
toy size on the committed mini world (a rerun reuses every run, --report-only rewrites the same doc), and
bad flags in one line."""
import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments import lasro_fast as lf  # noqa: E402

needs_mini = pytest.mark.skipif(not (ROOT / "mini" / "world" / "world.json").exists(),
                                reason="the committed mini world is missing")
SURROGATE_TOY = ("--surrogate-pretrain-prompts 4 --surrogate-pretrain-noises 2 --surrogate-pretrain-steps 3 "
                 "--surrogate-hidden 8 --surrogate-pair-batch 4 --surrogate-adapt-steps 2")


#### THE BUDGET ####

def test_reward_calls_by_hand():
    cfg = lambda method, prompts, noises=4: SimpleNamespace(  # noqa: E731
        method=method, batch={"jpeg-kb": 8, "aesthetic": 8, lf.PLUGIN: 8},
        surrogate={"pretrain_prompts": prompts, "pretrain_noises": noises})
    assert lf.reward_calls(cfg("draft", 64), "jpeg-kb", 750) == (64 * 4, 8)  # pre-training, then a batch a step
    assert lf.reward_calls(cfg("draft", 0), "jpeg-kb", 750) == (750 * 4, 8)  # 0: every training prompt
    assert lf.reward_calls(cfg("draft", 900, 2), lf.PLUGIN, 750) == (750 * 2, 8)  # more than there are: all
    assert lf.reward_calls(cfg("ddpo", 64), "jpeg-kb", 750) == (0, 8)  # a round scores its samples, no surrogate
    assert lf.reward_calls(cfg("draft", 64), "aesthetic", 750) == (0, 8)  # the direct gradient: each sample
    with pytest.raises(ValueError, match="--method rid"):
        lf.reward_calls(cfg("rid", 64), "jpeg-kb", 750)
    assert lf.steps_for(1024, 256, 8) == 96 and lf.steps_for(1024, 0, 8) == 128 and lf.steps_for(100, 15, 6) == 14


@needs_mini
def test_every_method_gets_the_same_budget_from_its_own_settings(tmp_path):
    plans = lf.plan_runs(tmp_path, [0, 1], list(lf.REWARDS), list(lf.METHODS), 1024, [])
    got = {(p["reward"], p["method"]): (p["fixed"], p["per_step"], p["steps"], p["calls"]) for p in plans if p["seed"] == 1}
    # the mini preset: batch 8; LaSRO pre-trains on 64 prompts × 4 noises = 256 calls, then (1024 − 256) / 8 = 96
    # steps; DDPO 1024 / 8 = 128 rounds; the direct gradient 128 steps; jpeg-kb has no direct gradient
    lasro, other = (256, 8, 96, 1024), (0, 8, 128, 1024)
    assert got == {("jpeg-kb", "lasro"): lasro, ("jpeg-kb", "lasro-frozen"): lasro, ("jpeg-kb", "ddpo"): other,
                   ("aesthetic", "lasro"): lasro, ("aesthetic", "lasro-frozen"): lasro, ("aesthetic", "ddpo"): other,
                   ("aesthetic", "direct"): other}
    flags = {(p["reward"], p["method"], p["seed"]): list(map(str, p["flags"])) for p in plans}
    direct = flags[("aesthetic", "direct", 1)]
    value = lambda f, flag: f[len(f) - 1 - f[::-1].index(flag) + 1]  # noqa: E731  the last one given wins
    assert value(direct, "--tasks") == "aesthetic" and value(direct, "--method") == "draft"
    assert value(direct, "--max-steps") == "128" and value(direct, "--epochs") == "2"  # ⌈128·8 / 750⌉
    assert value(direct, "--seed") == "1" and value(direct, "--steps") == "2"
    frozen = flags[("jpeg-kb", "lasro-frozen", 0)]
    assert value(frozen, "--surrogate-adapt-every") == "0" and value(frozen, "--max-steps") == "96"
    assert value(flags[("aesthetic", "lasro", 0)], "--tasks") == lf.PLUGIN
    assert value(flags[("aesthetic", "ddpo", 0)], "--method") == "ddpo"
    # other settings: 5 prompts × 3 noises = 15 calls first, batch 6: (100 − 15) // 6 = 14 steps, 99 calls
    plans = lf.plan_runs(tmp_path, [0], ["jpeg-kb"], ["lasro", "ddpo"], 100, "--batch 6 --ddpo-minibatches 3 "
                         "--surrogate-pretrain-prompts 5 --surrogate-pretrain-noises 3".split())
    assert [(p["fixed"], p["per_step"], p["steps"], p["calls"]) for p in plans] == [(15, 6, 14, 99), (0, 6, 16, 96)]
    with pytest.raises(ValueError, match="--budget 1024"):  # every prompt explored: 750 × 4 calls before step 1
        lf.plan_runs(tmp_path, [0], ["jpeg-kb"], ["lasro"], 1024, ["--surrogate-pretrain-prompts", "0"])


#### THE GENERATOR RULE AND THE REPORT, ON SYNTHETIC RECORDS ####

def generator_report(per_seed: dict, base2: dict) -> dict:
    usual = {"hps": 0.8, "aesthetic": 6.0, "clip": 90.0, "fid": 2.0}
    rows = [{"stage": 0, "method": "base", "run": "/x/generator-seed0", "metrics": base2},
            {"stage": 0, "method": "base (20 steps)", "run": "/x/generator-seed0", "metrics": usual}]
    return {"rows": rows + [{"stage": 1, "method": "r0", "run": f"/x/generator-seed{s}", "metrics": m}
                            for s, m in per_seed.items()]}


def test_generator_rule_both_ways():
    base2 = {"hps": 0.5, "aesthetic": 6.0, "clip": 60.0, "fid": 10.0}
    s0 = {"hps": 0.6, "aesthetic": 6.1, "clip": 70.0, "fid": 9.0}
    # means 0.55, 6.025, 67.5 above; FID (9 + 12) / 2 = 10.5 above 10: misses on FID alone
    dec = lf.decide(generator_report({0: s0, 1: {"hps": 0.5, "aesthetic": 5.95, "clip": 65.0, "fid": 12.0}}, base2), [0, 1])
    assert dec["mean"] == pytest.approx({"hps": 0.55, "aesthetic": 6.025, "clip": 67.5, "fid": 10.5})
    assert dec["pass"] == {"hps": True, "aesthetic": True, "clip": True, "fid": False} and not dec["ok"]
    text = "\n".join(lf.generator_section(dec, [0, 1]))
    assert "**R0@2 is not the generator**: it misses the rule on FID (✗)" in text and "LCM" in text
    assert "no comparison ran" in text and "| base, its usual steps | 0.8000 |" in text
    # FID (9 + 11) / 2 = 10, not higher: the rule holds
    dec = lf.decide(generator_report({0: s0, 1: {"hps": 0.5, "aesthetic": 5.95, "clip": 65.0, "fid": 11.0}}, base2), [0, 1])
    assert dec["ok"] and "**R0@2 is the generator**" in "\n".join(lf.generator_section(dec, [0, 1]))
    assert "| **R0@2, mean** | 0.5500 ✓ | 6.025 ✓ | 67.50 ✓ | 10.00 ✓ |" in lf.generator_section(dec, [0, 1])
    # an equal mean is not higher; a seed outside --seeds does not count
    dec = lf.decide(generator_report({0: {**s0, "aesthetic": 6.0}, 5: {"hps": 0, "aesthetic": 0, "clip": 0, "fid": 99}},
                                     base2), [0])
    assert dec["pass"]["aesthetic"] is False and list(dec["per_seed"]) == [0] and not dec["ok"]


START = {"aesthetic": 6.0, "jpeg_kb": 1.0, "hps": 0.5, "clip": 60.0, "fid": 10.0}


def record(method, seed, final_kb, values, fixed, per_step):
    pre = [(0, 0.0, values[0]), (fixed, 3.0, values[0])] if fixed else []
    curve = pre + [(fixed + per_step * (i + 1), 3.0 * bool(fixed) + i + 1.0, v) for i, v in enumerate(values)]
    return {"reward": "jpeg-kb", "method": method, "seed": seed, "fixed": fixed, "per_step": per_step,
            "steps": len(values), "calls": fixed + per_step * len(values), "start": START,
            "final": {**START, "jpeg_kb": final_kb}, "curve": curve, "pretrained": bool(fixed), "seconds": curve[-1][1]}


def synthetic(ddpo_kb=(0.95, 1.05), ddpo_curve=(-1.0, -1.0, -0.98, -0.97, -0.96, -0.95)):
    """Budget 12: LaSRO 4 calls of pre-training + 4 steps of 2; DDPO 6 rounds of 2. Window round(12/10/2) → 1."""
    las = [-1.0, -0.9, -0.8, -0.7]
    return [record("lasro", 0, 0.8, las, 4, 2), record("lasro", 1, 0.9, las, 4, 2),
            record("ddpo", 0, ddpo_kb[0], list(ddpo_curve), 0, 2), record("ddpo", 1, ddpo_kb[1], list(ddpo_curve), 0, 2)]


def test_report_builder_on_synthetic_records(tmp_path):
    summary = lf.summarize(synthetic(), budget=12)
    las, dd = summary[("jpeg-kb", "lasro")], summary[("jpeg-kb", "ddpo")]
    # gains in true reward (−kB) over the generator's 1.0 kB: LaSRO 0.2, 0.1; DDPO 0.05, −0.05
    assert las["gain"] == pytest.approx([0.2, 0.1]) and dd["gain"] == pytest.approx([0.05, -0.05])
    assert las["window"] == dd["window"] == 1 and las["calls_x"] == [6, 8, 10, 12] and dd["calls_x"] == [2, 4, 6, 8, 10, 12]
    assert (las["curve_start"], las["curve_end"]) == (-1.0, -0.7) and (dd["curve_start"], dd["curve_end"]) == (-1.0, -0.95)
    # half the larger training gain, 0.3 / 2 = 0.15: LaSRO's −0.8 (gain 0.2) at 4 + 3·2 = 10 calls; DDPO never
    assert lf.calls_to_reach(las, 0.15) == 10 and lf.calls_to_reach(dd, 0.15) is None
    claims = {c: (holds, text) for c, _, holds, text in lf.verdicts(summary, ["jpeg-kb"])}
    assert claims["beats policy-gradient RL at ≤ 2 steps"][0] is True
    assert "LaSRO gains +0.15 " in claims["beats policy-gradient RL at ≤ 2 steps"][1] and "in 2 of 2 seeds" in \
        claims["beats policy-gradient RL at ≤ 2 steps"][1]
    assert claims["more sample-efficient"] == (True, "JPEG size (jpeg-kb): to gain 0.15 (half the larger training gain) "
                                                     "LaSRO needs 10 calls, DDPO not within its 12 (pre-training's 4 included)")
    assert claims["stable"][0] is True and "stable by the rule: LaSRO yes, DDPO no" in claims["stable"][1]

    args = argparse.Namespace(seeds="0,1", rewards="jpeg-kb", methods="lasro,ddpo", budget=12, jobs=2)
    timing = {"date": "2026-12-06", "train_min": 1.0, "trained_runs": 6, "total_min": 2.0, "cpu": "2 CPU cores",
              "peak_rss_gb": 1.0}
    dec = lf.decide(generator_report({0: {"hps": 0.6, "aesthetic": 6.1, "clip": 70.0, "fid": 9.0}},
                                     {"hps": 0.5, "aesthetic": 6.0, "clip": 60.0, "fid": 10.0}), [0])
    doc = tmp_path / "r.md"
    text = lf.write_report(dec, summary, args, [0, 1], ["jpeg-kb"], ["lasro", "ddpo"], timing, doc, tmp_path / "r_curves.png")
    assert doc.read_text() == text
    assert "| jpeg-kb | LaSRO | 4 | 2 | 4 | 12 |" in text and "| jpeg-kb | DDPO | 0 | 2 | 6 rounds | 12 |" in text
    # mean ± std by hand: gain (0.2, 0.1) → 0.150 ± 0.071; JPEG kB (0.8, 0.9) → 0.850 ± 0.071; seconds 7 (3 + 4 steps)
    assert "| jpeg-kb | LaSRO | 0.150 ± 0.071 | 6.00 ± 0.00 | 0.850 ± 0.071 | 0.500 ± 0.000 | 60.0 ± 0.0 | 10.0 ± 0.0 | " \
           "7.00 ± 0.00 |" in text
    assert "| jpeg-kb | DDPO | 0.0000 ± 0.0707 | 6.00 ± 0.00 | 1.00 ± 0.07 |" in text  # gain (0.05, −0.05), kB (0.95, 1.05)
    assert "| jpeg-kb | generator (R0@2) | – | 6.00 ± 0.00 | 1.00 ± 0.00 | 0.500 ± 0.000 | 60.0 ± 0.0 | 10.0 ± 0.0 | – |" in text
    assert "| jpeg-kb | LaSRO | +0.2 | +0.1 |" in text and "| jpeg-kb | DDPO | +0.05 | -0.05 |" in text
    assert "- *beats policy-gradient RL at ≤ 2 steps*, jpeg-kb: **holds**." in text
    assert "- *stable*, jpeg-kb: **holds**." in text and "![curves](r_curves.png)" in text
    # what the gain cost (CLIP, FID: generator → final, means) and a DDPO inside its seed spread (0 ± 0.071)
    assert "- Quality, jpeg-kb (generator → after training): LaSRO CLIP 60 → 60, FID 10 → 10; DDPO CLIP 60 → 60, " \
           "FID 10 → 10." in text
    assert "- DDPO, jpeg-kb: its gain (+0 ± 0.071) is inside its seed spread" in text

    # the other way: DDPO ends at 0.7 kB in both seeds and its curve rises faster than LaSRO's
    summary = lf.summarize(synthetic((0.7, 0.7), (-1.0, -0.6, -0.5, -0.5, -0.5, -0.5)), budget=12)
    claims = {c: holds for c, _, holds, _ in lf.verdicts(summary, ["jpeg-kb"])}
    assert claims == {"beats policy-gradient RL at ≤ 2 steps": False, "more sample-efficient": False, "stable": True}
    text = lf.write_report(dec, summary, args, [0, 1], ["jpeg-kb"], ["lasro", "ddpo"], timing, doc, None)
    assert "- *beats policy-gradient RL at ≤ 2 steps*, jpeg-kb: **does not hold**." in text
    assert "- DDPO, jpeg-kb:" not in text  # gain 0.3 in both seeds: it moved
    assert "## 4. Training curves" not in text


def test_curves_start_lasro_at_its_pre_training():
    summary = lf.summarize(synthetic(), budget=12)
    panels = lf.curves(summary, ["jpeg-kb"], ["lasro", "ddpo"])
    lines = panels["jpeg-kb: true reward (−JPEG kB) vs calls"][1]
    # LaSRO: the generator's samples at 0 and after the 4 pre-training calls, then a point per step
    assert lines["LaSRO"]["x"] == [0, 4, 6, 8, 10, 12] and lines["LaSRO"]["mean"] == pytest.approx([-1, -1, -1, -0.9, -0.8, -0.7])
    assert lines["DDPO"]["x"] == [2, 4, 6, 8, 10, 12] and lines["DDPO"]["std"] == [0.0] * 6
    assert panels["jpeg-kb: true reward (−JPEG kB) vs time"][1]["LaSRO"]["x"] == [0.0, 3.0, 4.0, 5.0, 6.0, 7.0]


@needs_mini
def test_the_aesthetic_black_box_is_the_aesthetic_model_on_uint8_images():
    import mini
    import rewards
    import surrogate

    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    want = rewards.get("aesthetic", rewards.load_spec(str(mini.REWARD_SPEC)))((x * 255).round() / 255, ["a"] * 3)
    got = surrogate.true_scores(lf.PLUGIN, surrogate.black_box(lf.PLUGIN), x, ["a"] * 3)
    assert torch.allclose(got, want.double(), atol=1e-5)


#### END TO END, TOY SIZE ####

@needs_mini
def test_end_to_end_rerun_reuses_everything_and_report_only(tmp_path):
    """One seed, the aesthetic black box, LaSRO, DDPO and the direct gradient at a 16-call budget (batch 4:
    LaSRO 8 calls of pre-training + 2 steps, DDPO 4 rounds, direct 4 steps) from a 1-step R0@2 generator
    (which misses the rule: --ignore-rule). ~1 min of CPU."""
    from safetensors.torch import load_file

    out, doc = tmp_path / "exp", tmp_path / "docs" / "fast.md"
    argv = ["--seeds", "0", "--rewards", "aesthetic", "--methods", "lasro,ddpo,direct", "--budget", "16", "--jobs", "2",
            "--ignore-rule", "--out", str(out), "--doc", str(doc), "--gen-args", "--max-steps 1 --batch 2",
            "--train-args", f"--batch 4 --ddpo-minibatches 2 {SURROGATE_TOY}",
            "--eval-args", "--max-prompts 2 --images-per-prompt 1"]
    assert lf.main(argv) == 0
    gen = out / "generator-seed0"
    assert json.loads((gen / "run.json").read_text())["config"]["steps"] == 2
    steps = {"lasro": 2, "ddpo": 4, "direct": 4}
    for method, n in steps.items():
        d = out / f"aesthetic-{method}-seed0"
        info = json.loads((d / "run.json").read_text())
        task = "aesthetic" if method == "direct" else lf.PLUGIN
        assert info["tasks"] == ["joint", task] and info["stages"] == ["stage1-joint", f"stage2-{task}"]
        assert info["method"] == ("ddpo" if method == "ddpo" else "draft") and info["branched_from"]["run"] == str(gen)
        a, b = (load_file(str(x / "stage1-joint" / "adapters.safetensors")) for x in (d, gen))  # the generator, copied
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        rows = [json.loads(line) for line in (d / f"stage2-{task}" / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == n  # the budget's steps
    timing = json.loads((out / "experiment.json").read_text())
    assert timing["trained_runs"] == 4
    text = doc.read_text()
    gen_dec = lf.decide(json.loads((out / "eval-generator" / "report.json").read_text()), [0])
    assert ("**R0@2 is the generator**" in text) == gen_dec["ok"]
    assert "| aesthetic | LaSRO | 8 | 4 | 2 | 16 |" in text and "| aesthetic | DDPO | 0 | 4 | 4 rounds | 16 |" in text
    assert "| aesthetic | direct gradient | 0 | 4 | 4 | 16 |" in text
    report = json.loads((out / "eval" / "report.json").read_text())
    for method, label in (("lasro", "LaSRO"), ("ddpo", "DDPO"), ("direct", "direct gradient")):
        aes = {r["stage"]: r["metrics"]["aesthetic"] for r in report["rows"]
               if Path(r["run"]).name == f"aesthetic-{method}-seed0"}
        assert f"| aesthetic | {label} | {aes[2] - aes[1]:+.4g} |" in text  # the per-seed gain is eval's
    drawn = json.loads((doc.parent / "fast_curves.json").read_text())["panels"]
    lines = drawn["aesthetic: true reward (aesthetic) vs calls"]["lines"]
    sdir = out / "aesthetic-lasro-seed0" / f"stage2-{lf.PLUGIN}"
    pre = json.loads((sdir / "surrogate_pretrain.json").read_text())
    true = [json.loads(line)["true_reward"] for line in (sdir / "metrics.jsonl").read_text().splitlines()]
    assert lines["LaSRO"]["x"] == [0, 8, 12, 16] and lines["LaSRO"]["mean"] == pytest.approx([pre["true_reward"]] * 2 + true)
    assert lines["DDPO"]["x"] == [4, 8, 12, 16] and lines["direct gradient"]["x"] == [4, 8, 12, 16]
    assert (doc.parent / "fast_grid.png").stat().st_size > 0

    # A second call trains nothing and reads every stage from eval's cache; the doc is the same.
    mtimes = {p: p.stat().st_mtime for p in out.glob("*/stage*/adapters.safetensors")}
    assert lf.main(argv) == 0
    assert mtimes == {p: p.stat().st_mtime for p in out.glob("*/stage*/adapters.safetensors")}
    assert json.loads((out / "experiment.json").read_text()) == timing and doc.read_text() == text
    # --report-only rewrites it from what is stored, and keeps a hand-written "## Notes" section.
    doc.unlink()
    assert lf.main([*argv, "--report-only"]) == 0
    assert doc.read_text() == text
    doc.write_text(text + "\n## Notes\n\nBy hand.\n")
    assert lf.main([*argv, "--report-only"]) == 0
    assert doc.read_text().endswith("## Notes\n\nBy hand.\n")


#### BAD INPUT ####

@pytest.mark.parametrize("argv,flag", [
    (["--seeds", "0,a"], "--seeds"), (["--jobs", "0"], "--jobs"), (["--rewards", "png-kb"], "--rewards"),
    (["--methods", "ppo"], "--methods"), (["--budget", "0"], "--budget"),
    pytest.param(["--budget", "100"], "--budget", marks=needs_mini),  # LaSRO's pre-training alone takes 256
    pytest.param(["--train-args", "--bogus 1"], "--train-args", marks=needs_mini)])
def test_bad_flags_are_one_line(argv, flag, capsys):
    assert lf.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and flag in err, err


def test_report_only_without_a_run_is_one_line(tmp_path, capsys):
    if not (ROOT / "mini" / "world" / "world.json").exists():
        pytest.skip("the committed mini world is missing")
    assert lf.main(["--out", str(tmp_path / "none"), "--doc", str(tmp_path / "d.md"), "--report-only"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--report-only" in err


@needs_mini
def test_branch_refuses_what_is_not_a_generator_in_one_line(tmp_path, capsys):
    assert lf.main(["branch"]) == 2
    assert "usage: branch GEN_RUN" in capsys.readouterr().err
    assert lf.main(["branch", str(tmp_path), "--tasks", "jpeg-kb", "--steps", "2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "run.json" in err and not (tmp_path / "o" / "run.json").exists()
