"""python -m checkpoint export: a run's stage (or a soup of runs) as one diffusers LoRA file.

Oracles: checkpoint.export_lora of the group checkpoint.load / checkpoint.soup rebuild on the UNet
(tests/test_rid.py checks that file against diffusers' load_lora_weights), and, end to end, diffusers'
pipeline loading the exported file against rid's own forward with the stage's adapters."""
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


def make_run(models, out: Path, tasks=("aesthetic", "hps"), seed=0) -> Path:
    """A run directory with one finished stage per task: random non-zero adapters (add_task freezes the
    earlier ones), saved as train.py saves a finished stage."""
    group = rid.group_of(models.unet) or rid.inject(models.unet, rank=2)
    group.clear()
    stages = []
    for k, task in enumerate(tasks, 1):
        group.add_task(task, generator=torch.Generator().manual_seed(seed + k))
        with torch.no_grad():
            group.flat.normal_(0, 0.05, generator=torch.Generator().manual_seed(100 * seed + k))
        checkpoint.save(group, out / f"stage{k}-{task}")
        stages.append(f"stage{k}-{task}")
    (out / "run.json").write_text(json.dumps({"model": "tiny", "stages": stages, "test_prompts": "t.txt"}))
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


def test_export_stage_and_soup_equal_export_lora_of_the_loaded_groups(models, tmp_path):
    a = make_run(models, tmp_path / "a", seed=0)
    b = make_run(models, tmp_path / "b", seed=1)
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

    run = make_run(models, tmp_path / "run")
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


@pytest.mark.parametrize("argv, words", [
    (["nowhere", "x.safetensors"], ["RUN 'nowhere'", "run.json"]),
    (["RUN", "x.safetensors", "--stage", "3"], ["--stage 3", "1 to 2"]),
    (["RUN", "x.safetensors", "--stage", "1", "--soup", "RUN"], ["--stage and --soup"]),
    (["RUN", "x.txt"], ["x.txt' is not allowed", ".safetensors"]),
    (["RUN", "x.safetensors", "--soup", "RUN", "--weights", "a,b"], ["--weights 'a,b'"]),
])
def test_bad_input_exits_2_with_one_line(models, tmp_path, capsys, argv, words):
    run = make_run(models, tmp_path / "run")
    code = checkpoint.main(["export", *[str(run) if a == "RUN" else str(tmp_path / a) if a.startswith("x.") else a
                                        for a in argv]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    for w in words:
        assert w in err[0], (w, err[0])
