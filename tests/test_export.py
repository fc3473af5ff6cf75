"""python -m checkpoint export: a run's stage (or a soup of runs) as one LoRA file, diffusers or kohya format.

Oracles: checkpoint.export_lora of the group checkpoint.load / checkpoint.soup rebuild on the UNet
(tests/test_rid.py checks that file against diffusers' load_lora_weights), and, end to end, diffusers'
pipeline loading the exported file against rid's own forward with the stage's adapters: SD-1.5 and SDXL in
both formats (diffusers detects a kohya file and converts it with its own kohya converter), SD3 and FLUX in
diffusers' (transformer.<layer>), exported with every weights file of the base model hidden (the key names
come from its configs alone)."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import rid

ROOT = Path(__file__).resolve().parents[1]


def make_run(models, out: Path, tasks=("aesthetic", "hps"), seed=0, model="tiny", scale=1.0) -> Path:
    """A run directory with one finished stage per task: random non-zero adapters (add_task freezes the
    earlier ones; the first task's scale set to `scale` from stage 2 on), saved as train.py saves a finished
    stage. `model`: run.json's base model."""
    group = rid.group_of(models.unet) or rid.inject(models.unet, rank=2)
    group.clear()
    stages = []
    for k, task in enumerate(tasks, 1):
        group.add_task(task, generator=torch.Generator().manual_seed(seed + k))
        with torch.no_grad():
            group.flat.normal_(0, 0.05, generator=torch.Generator().manual_seed(100 * seed + k))
        if k > 1:
            group.set_scale(0, scale)
        checkpoint.save(group, out / f"stage{k}-{task}")
        stages.append(f"stage{k}-{task}")
    (out / "run.json").write_text(json.dumps({"model": str(model), "stages": stages, "test_prompts": "t.txt"}))
    group.clear()
    return out


def cli(*argv):
    return subprocess.run([sys.executable, "-m", "checkpoint", *map(str, argv)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def same_file(a, b):
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys() and x
    for k in x:
        assert torch.equal(x[k], y[k]), k


def test_export_stage_and_soup_equal_export_lora_of_the_loaded_groups(sd_path, models, tmp_path):
    a = make_run(models, tmp_path / "a", seed=0, model=sd_path)
    b = make_run(models, tmp_path / "b", seed=1, model=sd_path)
    for argv, oracle in (
        ([a, tmp_path / "last.safetensors"], lambda: checkpoint.load(models.unet, a / "stage2-hps")),
        ([a, tmp_path / "first.safetensors", "--stage", "1"], lambda: checkpoint.load(models.unet, a / "stage1-aesthetic")),
        ([a, tmp_path / "soup.safetensors", "--soup", b, "--weights", "0.3,0.7"],
         lambda: checkpoint.soup(models.unet, [a / "stage2-hps", b / "stage2-hps"], [0.3, 0.7])),
    ):
        p = cli("export", *argv)
        assert p.returncode == 0, p.stderr
        assert "load_lora_weights(" in p.stdout
        want = checkpoint.export_lora(oracle(), tmp_path / "oracle.safetensors")
        same_file(argv[1], want)
    d = tmp_path / "dir"
    d.mkdir()
    assert checkpoint.main(["export", str(a), str(d)]) == 0
    p = cli("export", "nowhere", "x.safetensors")  # as a command: one line, no traceback
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "python -m checkpoint: error: RUN 'nowhere' is not a run directory (no run.json); allowed: a train.py --out"]
    same_file(d / "pytorch_lora_weights.safetensors", tmp_path / "last.safetensors")


def test_exported_stage_loads_in_diffusers_as_rids_forward(sd_path, models, tmp_path):
    """The README's two lines of diffusers code on the exported file give rid's UNet output."""
    from diffusers import StableDiffusionPipeline

    run = make_run(models, tmp_path / "run", model=sd_path)
    assert cli("export", run, tmp_path / "lora.safetensors").returncode == 0
    group = checkpoint.load(models.unet, run / "stage2-hps")
    pipe = StableDiffusionPipeline.from_pretrained(sd_path, safety_checker=None)
    pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = models.unet(z, torch.tensor(500), encoder_hidden_states=ctx).sample
        theirs = pipe.unet(z, torch.tensor(500), encoder_hidden_states=ctx).sample
    assert group.tasks == ["aesthetic", "hps"]
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def xl_path(tmp_path_factory):
    from tiny import tiny_sdxl

    return tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


class hidden_weights:
    """Every weights file of a model directory renamed away: what reads it now fails."""

    def __init__(self, model):
        self.files = [p for p in Path(model).rglob("*") if p.suffix in (".safetensors", ".bin")]

    def __enter__(self):
        for p in self.files:
            p.rename(p.with_name(p.name + ".hidden"))

    def __exit__(self, *exc):
        for p in self.files:
            p.with_name(p.name + ".hidden").rename(p)


@pytest.fixture(scope="module")
def mmdit_paths(tmp_path_factory):
    from tiny import tiny_flux, tiny_sd3

    d = tmp_path_factory.mktemp("mmdit")
    return {"sd3": tiny_sd3(d / "sd3"), "flux": tiny_flux(d / "flux")}


def model_path(request, kind):
    return {"sd": lambda: request.getfixturevalue("sd_path"), "sdxl": lambda: request.getfixturevalue("xl_path"),
            "sd3": lambda: request.getfixturevalue("mmdit_paths")["sd3"],
            "flux": lambda: request.getfixturevalue("mmdit_paths")["flux"]}[kind]()


@pytest.mark.parametrize("fmt", checkpoint.FORMATS)
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_export_loads_in_diffusers_as_rids_forward_for_both_backbones(request, tmp_path, capsys, kind, fmt):
    """Round trip: a run's last stage (two tasks, the first at scale 0.5) -> `export --format fmt` with the base
    model's weights hidden -> DiffusionPipeline.load_lora_weights (diffusers' own kohya converter for kohya)
    -> its UNet's CFG prediction == rid's with checkpoint.load's group."""
    round_trip(model_path(request, kind), kind, fmt, tmp_path, capsys)


@pytest.mark.parametrize("fmt", checkpoint.FORMATS)
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_export_of_the_mmdit_backbones(request, tmp_path, capsys, kind, fmt):
    """The same round trip on SD3 and FLUX (transformer.<layer> keys); they have no kohya format: exit 2, one line."""
    round_trip(model_path(request, kind), kind, fmt, tmp_path, capsys)


def round_trip(path, kind, fmt, tmp_path, capsys):
    from diffusers import DiffusionPipeline

    models = rid.load_models(path)
    run = make_run(models, tmp_path / "run", model=path, scale=0.5)
    out = tmp_path / f"{fmt}.safetensors"
    mmdit = kind in ("sd3", "flux")
    capsys.readouterr()
    with hidden_weights(path):
        code = checkpoint.main(["export", str(run), str(out), "--format", fmt])
    if mmdit and fmt == "kohya":
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "kohya-format LoRA export is for UNet models" in err[0], err
        return
    assert code == 0
    saved = load_file(str(out))
    group = checkpoint.load(models.denoiser, run / "stage2-hps")
    assert group.scales == [0.5, 1.0]
    name = next(iter(group.layers))
    want = models.kohya_keys(name) if fmt == "kohya" else models.lora_keys(name)
    assert set(want) <= set(saved) and len(saved) == len(want) * len(group.layers)
    if fmt == "kohya":
        assert all(float(saved[models.kohya_keys(n)[2]]) == 2 * group.rank for n in group.layers)  # alpha = rank
        if kind == "sdxl":
            assert any(k.startswith("lora_unet_input_blocks_") for k in saved)  # sgm names, not diffusers'
    field = "transformer" if mmdit else "unet"
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.load_lora_weights(str(tmp_path), weight_name=out.name)
    z = torch.randn(2, *models.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = models.conditioning(["a photo of a cat", "a red car"], 3.0)
    with torch.no_grad():
        ours = models.predict(z, 501, cond, 3.0)
        theirs = dataclasses.replace(models, **{field: getattr(pipe, field)}).predict(z, 501, cond, 3.0)
        plain = getattr(type(pipe).from_pretrained(path), field)
        base = dataclasses.replace(models, **{field: plain}).predict(z, 501, cond, 3.0)
    moved, diff = (ours - base).abs().max().item(), (ours - theirs).abs().max().item()
    assert moved > 1e-3, f"the adapters change the output by only {moved:.3g}: the comparison could not fail"
    assert diff <= 1e-5, f"{kind} {fmt}: max |diffusers - rid| = {diff:.3g} (the adapters move it {moved:.3g})"


def test_export_reads_the_key_map_from_configs_only(xl_path, tmp_path):
    """The SDXL kohya names need the UNet's layers_per_block: key_map reads it from unet/config.json (the
    export tests above hide every weights file) and names every layer as the loaded backbone does. A run whose
    model moved falls back to the base model its adapters were saved with, or takes --model."""
    models = rid.load_models(xl_path)
    run = make_run(models, tmp_path / "run", model=tmp_path / "moved", scale=0.5)
    keys = checkpoint.key_map(xl_path)
    group = checkpoint.load(models.denoiser, run / "stage2-hps")
    assert keys.pipeline == "StableDiffusionXLPipeline"
    assert [keys.kohya_keys(n) for n in group.layers] == [models.kohya_keys(n) for n in group.layers]
    assert [keys.lora_keys(n) for n in group.layers] == [models.lora_keys(n) for n in group.layers]
    oracle = checkpoint.export_lora(group, tmp_path / "oracle.safetensors", models, "kohya")
    for extra in ([], ["--model", xl_path]):
        assert checkpoint.main(["export", str(run), str(tmp_path / "a.safetensors"), "--format", "kohya", *extra]) == 0
        same_file(tmp_path / "a.safetensors", oracle)


@pytest.mark.parametrize("argv, words", [
    (["RUN", "x.safetensors", "--format", "ckpt"], ["--format 'ckpt' is not allowed", "diffusers, kohya"]),
    (["RUN", "x.safetensors", "--model", "nowhere/at/all"], ["--model 'nowhere/at/all'"]),
    (["MOVED", "x.safetensors"], ["base model cannot be read", "'tiny'", "--model"]),

    (["nowhere", "x.safetensors"], ["RUN 'nowhere'", "run.json"]),
    (["RUN", "x.safetensors", "--stage", "3"], ["--stage 3", "1 to 2"]),
    (["RUN", "x.safetensors", "--stage", "1", "--soup", "RUN"], ["--stage and --soup"]),
    (["RUN", "x.txt"], ["x.txt' is not allowed", ".safetensors"]),
    (["RUN", "x.safetensors", "--soup", "RUN", "--weights", "a,b"], ["--weights 'a,b'"]),
])
def test_bad_input_exits_2_with_one_line(sd_path, models, tmp_path, capsys, argv, words):
    run = make_run(models, tmp_path / "run", model=sd_path)
    moved = make_run(models, tmp_path / "moved")  # run.json's model "tiny": nowhere
    meta = json.loads((moved / "stage2-hps" / "adapters.json").read_text())
    (moved / "stage2-hps" / "adapters.json").write_text(json.dumps({**meta, "base_model": "gone"}))  # nor this
    named = {"RUN": str(run), "MOVED": str(moved)}
    code = checkpoint.main(["export", *[named.get(a) or (str(tmp_path / a) if a.startswith("x.") else a)
                                        for a in argv]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    for w in words:
        assert w in err[0], (w, err[0])
