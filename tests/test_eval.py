"""eval.py: Eq. 3 by hand, and a tiny end-to-end evaluation of real run directories (tiny SD from
tests/tiny.py + rid adapters saved with rid's own save, a tiny-CLIP reward spec), checked against
metrics recomputed directly (rewards on rid.sample's images, PIL file sizes, a Frechet distance
written out with eigh)."""
import dataclasses
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import eval as ev
import mini
import rewards
import rid
from test_rewards import tiny_spec
from tiny import tiny_sd, tiny_sdxl

PROMPTS = ["a photo of a cat", "a red car", "a blue house"]
SETTINGS = dict(images_per_prompt=2, seed=0, batch=6, device="cpu", dtype="fp32", fid_features="clip")


#### FORGETTING (Eq. 3), against the paper's own tables ####

# RIL paper (seed 000) Table 2: SD-1.5 (stage 0, from Table 3's "Stable Diffusion V1.5" row), then
# the rows after aesthetic, after HPS, after compress; the printed forgetting in the comments.
SD15 = {"aesthetic": 5.23, "hps": 0.259, "clip": 25.77, "fid": 71.54}
TABLE2 = {
    "baseline": {"aesthetic": [6.07, 5.79, 4.98], "hps": [0.257, 0.282, 0.249],
                 "clip": [22.74, 23.19, 22.39], "fid": [85.53, 89.71, 104.85]},
    "rid": {"aesthetic": [6.03, 5.94, 5.55], "hps": [0.267, 0.276, 0.272],
            "clip": [25.76, 25.46, 25.00], "fid": [79.40, 80.04, 80.28]},
}
PRINTED = {  # (stage, metric): the paper's number in parentheses; "-" where it prints a dash
    "baseline": {(1, "aesthetic"): "-", (1, "hps"): "-", (1, "clip"): 3.03, (1, "fid"): 13.99,
                 (2, "aesthetic"): 0.28, (2, "hps"): "-", (2, "clip"): 2.58, (2, "fid"): 18.17,
                 (3, "aesthetic"): 1.09, (3, "hps"): 0.033, (3, "clip"): 3.38, (3, "fid"): 33.31},
    "rid": {(1, "aesthetic"): "-", (1, "clip"): 0.01, (1, "fid"): 7.86,
            (2, "aesthetic"): 0.09, (2, "hps"): "-", (2, "clip"): 0.31, (2, "fid"): 8.50,
            (3, "aesthetic"): 0.48, (3, "hps"): 0.004, (3, "clip"): 0.77, (3, "fid"): 8.74},
}


@pytest.mark.parametrize("method", ["baseline", "rid"])
def test_forgetting_reproduces_the_papers_table_2(method):
    tasks = ["aesthetic", "hps", "compress"]
    for (stage, metric), printed in PRINTED[method].items():
        shown = ev.forgetting_shown(tasks[:stage - 1])
        if printed == "-":
            assert metric not in shown, (method, stage, metric)
            continue
        assert metric in shown, (method, stage, metric)
        values = [SD15[metric], *TABLE2[method][metric][:stage]]
        # the paper rounds its stage values and its forgetting separately: agree to the printed digits
        assert ev.forgetting(values, ev.METRICS[metric][1]) == pytest.approx(printed, abs=0.006 if printed > 1 else 6e-4)


def test_forgetting_is_never_negative_and_zero_for_a_metric_that_only_improved():
    # Table 3, order compress → HPS → aesthetic: PNG kB printed "(0.00)" (it fell from 425.13 and stayed lower)
    assert ev.forgetting([425.13, 300.0, 305.0, 307.13], False) == pytest.approx(7.13)
    assert ev.forgetting([425.13, 310.0, 309.0, 307.13], False) == 0.0
    assert ev.forgetting([1.0, 2.0, 3.0], True) == 0.0  # improving all along: no forgetting (was -1 before Eq. 3)
    assert ev.forgetting([30.0, 20.0], False) == 0.0
    assert ev.forgetting([5.0, 6.0, 5.5], True) == pytest.approx(0.5)  # the largest drop, from stage 1
    assert ev.forgetting([10.0, 8.0, 9.0], False) == pytest.approx(1.0)


def test_forgetting_shown_follows_the_tables():
    # Table 3: "Compress HPS Aesthetic" prints PNG/JPEG forgetting, not aesthetic (trained last)
    shown = ev.forgetting_shown(["compress", "hps"])
    assert {"png_kb", "jpeg_kb", "compress", "hps", "clip", "fid"} <= set(shown) and "aesthetic" not in shown
    assert ev.forgetting_shown([]) == ["clip", "fid"]  # after the first task: general metrics only


def test_forgetting_undefined():
    assert ev.forgetting([4.2], True) is None
    assert ev.forgetting([4.2, None], True) is None


#### A tiny world: model, reward spec, reference images, runs ####

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    model = tiny_sd(root / "model")
    (root / "spec").mkdir()
    tiny_spec(root / "spec")
    ref = root / "ref"
    ref.mkdir()
    g = np.random.default_rng(0)
    for i in range(8):  # reference images larger than the 16 x 16 samples: eval crops/resizes them
        Image.fromarray(g.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    return {"root": root, "model": model, "spec": str(root / "spec" / "rewards.json"), "ref": str(ref)}


def make_run(dir, world, tasks=("aesthetic", "hps"), method="rid", seed=1, model=None):
    """A run directory as train.py lays it out, with random non-zero adapters per stage (model: world's)."""
    model = model or world["model"]
    models = rid.load_models(model)
    group = rid.inject(models.unet, rank=2)
    g = torch.Generator().manual_seed(seed)
    stages = []
    for k, task in enumerate(tasks, 1):
        group.add_task(task)
        with torch.no_grad():
            group.flat.copy_(torch.randn(group.flat.shape, generator=g) * 0.3)
        stages.append(f"stage{k}-{task}")
        checkpoint.save(group, dir / stages[-1])
    (dir / "test_prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    run = {"tasks": list(tasks), "method": method, "model": model, "reward_spec": world["spec"],
           "stages": stages, "test_prompts": "test_prompts.txt", "seed": 0, "config": {"steps": 2, "guidance": 3.0}}
    (dir / "run.json").write_text(json.dumps(run))
    return dir


@pytest.fixture(scope="module")
def run_dir(world, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"), world)


@pytest.fixture(scope="module")
def report(world, run_dir):
    return ev.evaluate([str(run_dir)], s=ev.Settings(**SETTINGS, fid_ref=world["ref"]), log=lambda m: None)


def _direct_metrics(world, adapters, n_per_prompt=2):
    """The stage's images made and scored without eval.py's loop."""
    models = rid.load_models(world["model"])
    if adapters:
        checkpoint.load(models.unet, adapters)
    prompts = [p for p in PROMPTS for _ in range(n_per_prompt)]
    noise = torch.stack([ev.noise_for(0, p, i, models.latent_shape) for p in range(len(PROMPTS))
                         for i in range(n_per_prompt)])
    images = rid.sample(models, prompts, noise, steps=2, guidance=3.0)
    spec = rewards.load_spec(world["spec"])
    with torch.no_grad():
        out = {name: rewards.get(name, spec)(images, prompts).mean().item() for name in ("aesthetic", "hps")}
        # compress oracle: PIL's real JPEG at q80 (4:2:0), not the differentiable one eval.py uses
        pil = []
        for a in (images * 255).round().byte().permute(0, 2, 3, 1).numpy():
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="JPEG", quality=80)
            pil.append(torch.from_numpy(np.array(Image.open(buf).convert("RGB"))).permute(2, 0, 1) / 255)
        out["compress"] = -(images - torch.stack(pil)).square().sum(dim=(1, 2, 3)).mean().item()
        out["clip"] = rewards.clip_score(images, prompts, spec).mean().item()
        gen = rewards.clip_features(images, spec).double()
        ref = torch.cat(list(ev.reference_batches(world["ref"], (16, 16), batch=3)))
        real = rewards.clip_features(ref, spec).double()
    for fmt, key, kw in (("PNG", "png_kb", {}), ("JPEG", "jpeg_kb", {"quality": 80})):
        sizes = []
        for a in (images * 255).round().byte().permute(0, 2, 3, 1).numpy():
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format=fmt, **kw)
            sizes.append(len(buf.getvalue()) / 1000)
        out[key] = sum(sizes) / len(sizes)
    out["fid"] = _frechet(real, gen)
    return out


def _frechet(x, y):
    """||mu_x - mu_y||^2 + tr Sx + tr Sy - 2 tr (Sx^1/2 Sy Sx^1/2)^1/2, symmetric form via eigh."""
    mx, my = x.mean(0), y.mean(0)
    sx, sy = torch.cov(x.T), torch.cov(y.T)
    ex, vx = torch.linalg.eigh(sx)
    root = vx @ torch.diag(ex.clamp(min=0).sqrt()) @ vx.T
    cross = torch.linalg.eigvalsh(root @ sy @ root).clamp(min=0).sqrt().sum()
    return ((mx - my).square().sum() + sx.trace() + sy.trace() - 2 * cross).item()


#### END TO END ####

def test_report_rows_and_files(report, run_dir):
    rows = report["rows"]
    assert [(r["method"], r["stage"], r["name"]) for r in rows] == [
        ("base", 0, "stage0-base"), ("rid", 1, "stage1-aesthetic"), ("rid", 2, "stage2-hps")]
    assert rows[0]["forgetting"] is None  # the base model has no trajectory
    assert set(rows[2]["forgetting"]) == set(ev.METRICS) and set(rows[2]["metrics"]) == set(ev.METRICS)
    for k in (1, 2):  # Eq. 3 over stages 0..k, written out: max_i (a_i - a_k) (higher is better), ≥ 0
        for m, (_, higher, _) in ev.METRICS.items():
            vals = [r["metrics"][m] for r in rows[:k + 1]]
            want = max((v - vals[-1]) if higher else (vals[-1] - v) for v in vals)
            assert rows[k]["forgetting"][m] == pytest.approx(want) and rows[k]["forgetting"][m] >= 0
    assert rows[1]["forgetting_shown"] == ["clip", "fid"]  # run tasks aesthetic, hps
    assert rows[2]["forgetting_shown"] == ["aesthetic", "clip", "fid"]
    md = (run_dir / "report.md").read_text().splitlines()
    assert md[0].startswith("| Method | Stage | Aesthetic ↑ | HPS ↑ | CLIP ↑ | Compress ↑ | PNG kB ↓ | JPEG kB ↓ | FID ↓")
    body = [l for l in md[2:] if l.startswith("| ")]
    assert len(body) == 3 and "(" not in body[0]
    cells = body[2].split(" | ")[2:]  # Aesthetic, HPS, CLIP, Compress, PNG, JPEG, FID
    assert cells[1].endswith("(-)") and cells[3].endswith("(-)") and cells[4].endswith("(-)")
    assert cells[0].endswith(f"({rows[2]['forgetting']['aesthetic']:.3f})")
    assert cells[2].endswith(f"({rows[2]['forgetting']['clip']:.2f})")
    assert body[1].count("(-)") == 5 and body[1].count("(") == len(ev.METRICS)
    csv_rows = (run_dir / "report.csv").read_text().splitlines()
    assert len(csv_rows) == 4 and csv_rows[0].startswith("method,stage,name,run,aesthetic")
    assert json.loads((run_dir / "report.json").read_text())["rows"][2]["name"] == "stage2-hps"
    # the figures draw the report's own numbers (read back from the data written beside each PNG)
    drawn = json.loads((run_dir / "stages.json").read_text())["metrics"]
    for m in ev.METRICS:
        assert drawn[m]["rid"]["x"] == [0, 1, 2]
        assert drawn[m]["rid"]["mean"] == pytest.approx([r["metrics"][m] for r in rows], rel=1e-12)
    bars = json.loads((run_dir / "forgetting.json").read_text())
    for m in ev.METRICS:  # the last stage's F where the paper prints it, no bar where it prints "-"
        want = [rows[2]["forgetting"][m]] if m in rows[2]["forgetting_shown"] else []
        assert bars[m]["rid"]["values"] == pytest.approx(want, rel=1e-12), m
    assert all((run_dir / f).stat().st_size > 0 for f in ("stages.png", "forgetting.png"))
    assert "[forgetting](forgetting.png)" in (run_dir / "report.md").read_text()
    grid = Image.open(run_dir / "grid.png")
    assert grid.size == (160 + 3 * 64, 3 * 64)  # rows = stages, columns = prompts (16 px shown at 64)


@pytest.mark.parametrize("stage", [0, 2])
def test_metrics_match_direct_computation(report, run_dir, world, stage):
    got = report["rows"][stage]["metrics"]
    want = _direct_metrics(world, run_dir / "stage2-hps" if stage else None)
    for m in ("aesthetic", "hps", "clip", "png_kb", "jpeg_kb"):
        assert got[m] == pytest.approx(want[m], rel=1e-4, abs=1e-5), m
    assert got["compress"] < 0 and got["compress"] == pytest.approx(want["compress"], rel=0.25), "compress"
    assert got["fid"] == pytest.approx(want["fid"], rel=1e-3, abs=1e-3)
    assert report["rows"][0]["metrics"]["png_kb"] != report["rows"][2]["metrics"]["png_kb"]  # adapters matter


def test_rerun_computes_nothing(report, run_dir, world, monkeypatch):
    cache = sorted((run_dir / "eval").glob("*.json"))
    assert len(cache) == 3
    mtimes = [f.stat().st_mtime_ns for f in cache]
    monkeypatch.setattr(rid, "sample", lambda *a, **k: pytest.fail("re-run sampled images"))
    again = ev.evaluate([str(run_dir)], s=ev.Settings(**SETTINGS, fid_ref=world["ref"]), log=lambda m: None)
    assert again["computed"] == 0
    assert [f.stat().st_mtime_ns for f in cache] == mtimes
    assert [r["metrics"] for r in again["rows"]] == [r["metrics"] for r in report["rows"]]


def test_changed_setting_recomputes_only_what_it_changes(report, run_dir, world, tmp_path):
    calls = []
    orig = rid.sample
    s = ev.Settings(**{**SETTINGS, "images_per_prompt": 1}, fid_ref=world["ref"])
    import unittest.mock as um
    with um.patch.object(rid, "sample", lambda *a, **k: calls.append(1) or orig(*a, **k)):
        out = ev.evaluate([str(run_dir)], s=s, out=tmp_path, log=lambda m: None)
    assert out["computed"] == 3 and len(calls) == 3  # one batch per stage
    assert len(list((run_dir / "eval").glob("*.json"))) == 6  # both settings stay cached


def test_lcm_sdxl_eval_is_reproducible_and_its_sampler_a_setting(report, world, run_dir, tmp_path):
    """A tiny LCM-SDXL run (sampler auto -> lcm: it re-noises between steps): its fresh noise comes from eval's
    seeded generators, so two evals from scratch, the global RNG moved in between, give identical metrics.
    --sampler ddim is another setting (its own cache entry, other images). An SD run evaluated with the
    sampler left at auto keeps a cache key without "sampler": every cache written before --sampler holds
    (run_dir's cache comes from the `report` fixture, requested so the test holds when run alone)."""
    model = tiny_sdxl(tmp_path / "lcm", scheduler="lcm", time_cond_proj_dim=8)
    run = make_run(tmp_path / "run", world, tasks=("aesthetic",), model=model)
    s = ev.Settings(**{**SETTINGS, "images_per_prompt": 1}, fid_ref=world["ref"])
    results = []
    for seed in (1, 2):
        shutil.rmtree(run / "eval", ignore_errors=True)
        torch.manual_seed(seed)
        out = ev.evaluate([str(run)], s=s, out=tmp_path / f"report{seed}", log=lambda m: None)
        assert out["computed"] == 2
        results.append([r["metrics"] for r in out["rows"]])
    assert results[0] == results[1]
    assert ev.main(["--ckpt", str(run), "--sampler", "ddim", "--images-per-prompt", "1", "--batch", "6",
                    "--fid-ref", world["ref"], "--fid-features", "clip", "--device", "cpu", "--dtype", "fp32",
                    "--out", str(tmp_path / "ddim")]) == 0
    cached = [json.loads(p.read_text()) for p in (run / "eval").glob("*.json")]
    assert sorted(c["config"].get("sampler", "auto") for c in cached) == ["auto", "auto", "ddim", "ddim"]
    ddim = [c["metrics"] for c in cached if c["config"].get("sampler") == "ddim" and c["index"] == 1]
    assert ddim[0] != results[0][1]
    sd = [json.loads(p.read_text())["config"] for p in (run_dir / "eval").glob("*.json")]
    assert sd and all("sampler" not in c for c in sd)


def test_soup_of_identical_runs_equals_the_run(report, run_dir, world, tmp_path):
    out = ev.evaluate([], soup=[str(run_dir), str(run_dir)], s=ev.Settings(**SETTINGS, fid_ref=world["ref"]),
                      out=tmp_path, log=lambda m: None)
    soup = out["rows"][-1]
    assert soup["method"] == "soup" and out["computed"] == 1  # the base model comes from the run's cache
    for m in ev.METRICS:
        assert soup["metrics"][m] == pytest.approx(report["rows"][2]["metrics"][m], rel=1e-3, abs=1e-4), m
    assert (tmp_path / "report.md").is_file()


def test_runs_side_by_side_share_the_base(world, tmp_path):
    a = make_run(tmp_path / "rid", world, tasks=("aesthetic",), method="rid", seed=2)
    b = make_run(tmp_path / "base", world, tasks=("aesthetic",), method="baseline", seed=3)
    s = ev.Settings(**{**SETTINGS, "images_per_prompt": 1}, fid_ref=world["ref"])
    out = ev.evaluate([str(a), str(b)], s=s, log=lambda m: None)
    assert [(r["method"], r["stage"]) for r in out["rows"]] == [("base", 0), ("rid", 1), ("baseline", 1)]
    assert out["computed"] == 3  # one base model for both runs
    assert (tmp_path / "eval-rid+base" / "report.md").is_file()


def test_missing_weights_skip_with_one_line(world, tmp_path):
    run = make_run(tmp_path / "run", world, tasks=("aesthetic",))
    spec = json.loads(open(world["spec"]).read())
    spec = {k: (os.path.join(os.path.dirname(world["spec"]), v) if k != "hps_weights" else str(tmp_path / "gone.pt"))
            for k, v in spec.items()}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    lines = []
    s = ev.Settings(**{**SETTINGS, "images_per_prompt": 1}, reward_spec=str(tmp_path / "spec.json"))
    out = ev.evaluate([str(run)], s=s, log=lines.append)
    skips = [l for l in lines if l.startswith("skipping")]
    assert len(skips) == 2 and "gone.pt" in skips[0] and "--reward-spec" in skips[0] and "--fid-ref" in skips[1]
    assert "hps" not in out["rows"][1]["metrics"] and "fid" not in out["rows"][1]["metrics"]
    assert "HPS" not in (run / "report.md").read_text().splitlines()[0]
    assert not any("mini world" in line for line in lines)  # a run on another model is not called mini


def test_mini_world_run_uses_clip_fid_on_its_reference_set(world, run_dir, tmp_path, monkeypatch):
    """A run on the mini world's model: FID in CLIP space against mini/world/fid_ref.safetensors."""
    from pathlib import Path

    from safetensors.torch import save_file

    refs = torch.cat(list(ev.reference_batches(world["ref"], (16, 16))))
    save_file({"images": (refs * 255).round().to(torch.uint8)}, str(tmp_path / "fid_ref.safetensors"))
    monkeypatch.setattr(mini, "MODEL", Path(world["model"]))
    monkeypatch.setattr(mini, "WORLD", tmp_path)
    s = ev.Settings(**{k: v for k, v in SETTINGS.items() if k != "fid_features"})
    lines = []
    out = ev.evaluate([str(run_dir)], s=s, out=tmp_path / "report", log=lines.append)
    assert out["computed"] == 3  # another reference file: another cache key
    # The first log line says where it is evaluating and how to get the paper's setting.
    assert "mini world" in lines[0] and "--model stable-diffusion-v1-5/stable-diffusion-v1-5" in lines[0], lines
    got, want = out["rows"][2]["metrics"], _direct_metrics(world, run_dir / "stage2-hps")
    assert got["fid"] == pytest.approx(want["fid"], rel=1e-3, abs=1e-3)  # the same images, stored as uint8
    assert got["aesthetic"] == pytest.approx(want["aesthetic"], rel=1e-4)


def test_inception_unavailable_skips_fid(world, run_dir, tmp_path, monkeypatch):
    import torchmetrics.image.fid as tm_fid

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(tm_fid, "NoTrainInceptionV3", offline)  # what torchmetrics builds for feature=2048
    lines = []
    s = ev.Settings(**{**SETTINGS, "fid_features": "inception", "max_prompts": 1}, fid_ref=world["ref"])
    out = ev.evaluate([str(run_dir)], s=s, out=tmp_path, log=lines.append)
    assert [l for l in lines if l.startswith("skipping")] == [
        "skipping fid: Inception weights unavailable (OSError: no network); run once with network access so "
        "torch-fidelity caches them, or pass --fid-features clip"]
    assert all("fid" not in r["metrics"] for r in out["rows"]) and "aesthetic" in out["rows"][0]["metrics"]


#### CLI ####

@pytest.mark.parametrize("args,msg", [
    (["--ckpt", "{tmp}/nope"], "is not a run directory (no run.json"),
    (["--ckpt", "{tmp}"], "is not a run directory"),
    ([], "nothing to evaluate"),
    (["--ckpt", "{tmp}", "--images-per-prompt", "0"], "--images-per-prompt 0"),
    (["--ckpt", "{tmp}", "--weights", "0.5"], "--weights applies to --soup"),
    (["--soup", "{tmp}"], "is neither a run directory"),
    (["--ckpt", "{tmp}", "--sampler", "heun"], "--sampler 'heun' is not allowed; allowed: auto, ddim, euler, lcm"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, args, msg):
    assert ev.main([a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eval.py: error:") and msg in err[0]


def test_cli_bad_model_in_run_json(world, tmp_path, capsys):
    run = make_run(tmp_path / "run", world, tasks=("aesthetic",))
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "model": str(tmp_path / "no-model")}))
    capsys.readouterr()
    assert ev.main(["--ckpt", str(run), "--fid-features", "clip", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-model" in err[0]


def test_cli_crafted_run_json_sampler_exits_2_before_the_model_loads(world, tmp_path, capsys, monkeypatch):
    """run.json's sampler settings are checked against rid.StepConfig's declared ranges (2**70 DDIM steps
    would hang rid.sample after the model loaded)."""
    run = make_run(tmp_path / "run", world, tasks=("aesthetic",))
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "config": {"steps": 2**70, "guidance": 3.0}}))
    monkeypatch.setattr(rid, "load_models", lambda *a, **k: pytest.fail("the model loaded"))
    capsys.readouterr()
    assert ev.main(["--ckpt", str(run), "--fid-features", "clip", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(run / "run.json") in err[0] and "config steps" in err[0] and "[1, 1000]" in err[0]


#### THE PAPER'S ZERO-SHOT FID ON MS-COCO (--fid coco) ####

def fake_coco(root, split="val2017"):
    """COCO's layout at toy size: 5 images, listed out of id order; image 7 has no caption; image 3 has
    two (the one with the smaller annotation id, listed second, is the one used)."""
    (root / "annotations").mkdir(parents=True)
    (root / split).mkdir()
    g = np.random.default_rng(1)
    ids = [9, 3, 7, 5, 11]
    for i in ids:
        Image.fromarray(g.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(root / split / f"{i:012d}.jpg")
    anns = [{"id": 40, "image_id": 3, "caption": "a red car "}, {"id": 12, "image_id": 3, "caption": "a blue car"},
            {"id": 20, "image_id": 5, "caption": "a photo of a cat"}, {"id": 21, "image_id": 9, "caption": "a dog"},
            {"id": 22, "image_id": 11, "caption": "the tree"}]
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(
        {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids], "annotations": anns}))
    return root


def test_coco_fid_scores_one_image_per_caption_against_those_images(world, run_dir, tmp_path):
    coco = fake_coco(tmp_path / "coco")
    ev.coco_pairs.cache_clear()
    pairs, digest = ev.coco_pairs(str(coco), 3)
    # the first 3 captioned images by id: 3, 5, 9 (7 has no caption), each with its first caption by annotation id
    assert [(c, f.name) for c, f in pairs] == [("a blue car", "000000000003.jpg"), ("a photo of a cat", "000000000005.jpg"),
                                               ("a dog", "000000000009.jpg")]
    out = tmp_path / "report"
    report = ev.evaluate([str(run_dir)], s=ev.Settings(**SETTINGS, coco=str(coco), coco_n=3), out=out, log=lambda m: None)
    # oracle: the same captions sampled directly, CLIP features, the three images through the folder reader
    ref_dir = tmp_path / "ref3"
    ref_dir.mkdir()
    for _, f in pairs:
        (ref_dir / f.name).write_bytes(f.read_bytes())
    spec = rewards.load_spec(world["spec"])
    for stage, adapters in ((0, None), (2, run_dir / "stage2-hps")):
        models = rid.load_models(world["model"])
        if adapters:
            checkpoint.load(models.unet, adapters)
        noise = torch.stack([ev.noise_for(0, "coco", j, models.latent_shape) for j in range(3)])
        images = rid.sample(models, [c for c, _ in pairs], noise, steps=2, guidance=3.0)
        with torch.no_grad():
            gen = rewards.clip_features(images, spec).double()
            real = rewards.clip_features(torch.cat(list(ev.reference_batches(str(ref_dir), (16, 16)))), spec).double()
        assert report["rows"][stage]["metrics"]["fid"] == pytest.approx(_frechet(real, gen), rel=1e-3, abs=1e-3)
    # the other metrics stay the test prompts' (the module's report, which has no COCO)
    assert report["rows"][2]["metrics"]["clip"] == pytest.approx(ev.evaluate(
        [str(run_dir)], s=ev.Settings(**SETTINGS, fid_ref=world["ref"]), log=lambda m: None)["rows"][2]["metrics"]["clip"])
    # cached by content: a re-run samples nothing; one re-encoded image is a new key
    again = ev.evaluate([str(run_dir)], s=ev.Settings(**SETTINGS, coco=str(coco), coco_n=3), out=out, log=lambda m: None)
    assert again["computed"] == 0
    Image.open(pairs[0][1]).save(pairs[0][1], quality=50)
    ev.coco_pairs.cache_clear()
    assert ev.coco_pairs(str(coco), 3)[1] != digest


@pytest.mark.parametrize("argv, words", [
    (["--fid", "coco"], ["--fid coco needs --coco DIR"]),
    (["--fid", "coco", "--coco", "EMPTY"], ["--coco", "captions_val2017.json"]),
    (["--fid", "coco", "--coco", "COCO", "--coco-n", "1"], ["--coco-n 1", "[2, 40504]"]),
    (["--coco", "COCO"], ["--coco", "add --fid coco"]),
])
def test_coco_flag_errors_are_one_line(run_dir, tmp_path, capsys, argv, words):
    coco = fake_coco(tmp_path / "coco")
    (tmp_path / "empty").mkdir()
    argv = [str(coco) if a == "COCO" else str(tmp_path / "empty") if a == "EMPTY" else a for a in argv]
    assert ev.main(["--ckpt", str(run_dir), "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eval.py: error:"), err
    for w in words:
        assert w in err[0], (w, err[0])
