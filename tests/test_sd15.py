"""experiments/sd15.py: the SD-1.5- and SDXL-shaped dry runs. Always: the configs give SD-1.5's and SDXL
base's published parameter counts (built on the meta device, no memory), the locally built tokenizer
tokenises as CLIP's own BPE (open_clip's SimpleTokenizer is the oracle), and a tiny SDXL built by the same
code loads through diffusers' StableDiffusionXLPipeline and rid's backbone, trains one step through
train.py and exports a LoRA file diffusers loads. Opt-in (RID_SD15_DRY_RUN=1; about 10 GB of disk, 16 GB of
memory, 15 min on 2 cores): the full SD-1.5 build and every CLI on it at 64², export equal through
diffusers; RID_SDXL_DRY_RUN=1 the same for SDXL in bf16 (12 GB of disk, 13 GB of memory, ~40 CPU-minutes)."""
import json
import os
from pathlib import Path

import pytest
import torch

from experiments import sd15


def test_configs_are_sd15_sized():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        built = {"unet": UNet2DConditionModel(**sd15.UNET), "vae": AutoencoderKL(**sd15.VAE),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**sd15.TEXT))}
    for k, m in built.items():
        assert sum(p.numel() for p in m.parameters()) == sd15.PARAMS[k], k


def test_tokenizer_is_clips_own(tmp_path):
    from open_clip.tokenizer import SimpleTokenizer

    tok = sd15.clip_tokenizer(tmp_path / "tok")
    oracle = SimpleTokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    for text in ("a photo of a cat", "An astronaut riding a horse, 4k, trending on artstation!",
                 "pneumonoultramicroscopic naïve café 😀"):
        ids = tok(text).input_ids
        assert ids == [49406] + oracle.encode(text) + [49407], text


@pytest.mark.skipif(os.environ.get("RID_SD15_DRY_RUN") != "1", reason="opt-in: RID_SD15_DRY_RUN=1 (10 GB disk, 15 min)")
def test_dry_run_at_sd15_size(tmp_path):
    d = tmp_path / "sd15"
    assert sd15.main(["build", str(d)]) == 0
    counts = json.loads((d / "build.json").read_text())
    assert all(counts[k] == v for k, v in sd15.PARAMS.items())
    code = sd15.main(["run", str(d)])
    result = json.loads((d / "dry_run.json").read_text())
    assert code == 0, [s for s in result["steps"] if s["rc"]]
    assert result["checks"]["export_rel_err"] < 1e-4
    from safetensors.torch import load_file

    for s in result["steps"]:  # the step changed the trainable adapter, and nothing is non-finite
        stage = d / "runs" / f"{s['method']}-{s['resolution']}" / f"stage1-{s['task']}"
        w = load_file(str(stage / "adapters.safetensors"))
        assert all(torch.isfinite(v).all() for v in w.values()) and any(v.abs().sum() > 0 for v in w.values())
        rows = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 1 and all(abs(v) < float("inf") for v in rows[0].values() if isinstance(v, float))


def test_configs_are_sdxl_sized():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    c = sd15.sdxl_configs()
    with torch.device("meta"):
        built = {"unet": UNet2DConditionModel(**c["unet"]), "vae": AutoencoderKL(**c["vae"]),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**c["text_encoder"])),
                 "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**c["text_encoder_2"]))}
    for k, m in built.items():
        assert sum(p.numel() for p in m.parameters()) == sd15.XL_PARAMS[k], k
    assert built["text_encoder_2"].text_projection.weight.shape == (1280, 1280)


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory):
    """A tiny SDXL built by build_sdxl (the real build's code, widths cut) and one rid step on it through train.py."""
    import train

    d = tmp_path_factory.mktemp("xl")
    counts = sd15.build_sdxl(d, tiny=True)
    (d / "prompts.txt").write_text("a photo of a cat\na red car\n")
    run = d / "run"
    code = train.main(["--model", str(d / "model"), "--prompts", str(d / "prompts.txt"), "--tasks", "compress",
                       "--method", "rid", "--steps", "2", "--batch", "1", "--max-steps", "1", "--resolution", "64",
                       "--dtype", "bf16", "--device", "cpu", "--out", str(run)])
    return d, counts, run, code


def test_tiny_sdxl_build_loads_through_diffusers_and_rid(tiny_xl):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    import rid

    d, counts, _, _ = tiny_xl
    model = d / "model"
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    sched = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "EulerDiscreteScheduler"
    assert all(sched[k] == v for k, v in {**sd15.XL_SCHEDULE, **sd15.XL_SCHEDULE_EXTRA}.items())
    pipe = StableDiffusionXLPipeline.from_pretrained(str(model), torch_dtype=torch.float32)  # stored in bf16
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler) and pipe.config.force_zeros_for_empty_prompt
    u = pipe.unet.config
    assert u.addition_embed_type == "text_time" and tuple(u.transformer_layers_per_block) == (1, 2, 10)
    assert counts["unet"] == sum(p.numel() for p in pipe.unet.parameters())
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's BPE

    models = rid.load_models(str(model))
    assert type(models).__name__ == "SDXL" and models.dtype == torch.float32
    prompts = ["a photo of a cat", "a red car"]
    cond = models.conditioning(prompts, 7.5)  # [uncond; cond]
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompts, device="cpu")
    torch.testing.assert_close(cond.hidden[2:], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.extra["text_embeds"][2:], pooled, rtol=0, atol=0)
    assert not cond.hidden[:2].any() and not negative.any()  # force_zeros_for_empty_prompt: the zeroed uncond
    assert cond.hidden.shape == (4, 77, 64) and cond.extra["time_ids"].shape == (4, 6)


def test_tiny_sdxl_trains_a_step_and_exports_what_diffusers_loads(tiny_xl):
    import checkpoint
    from safetensors.torch import load_file

    d, _, run, code = tiny_xl
    assert code == 0
    stage = run / "stage1-compress"
    w = load_file(str(stage / "adapters.safetensors"))
    assert all(torch.isfinite(v).all() for v in w.values())
    assert any(k.endswith("/B") and v.abs().sum() > 0 for k, v in w.items())  # B starts at zero: the step moved it
    assert checkpoint.main(["export", str(run), str(run / "exported.safetensors")]) == 0
    check = sd15.export_check(d / "model", run, run / "exported.safetensors", 64)
    assert check["export_rel_err"] < 1e-5 and check["lora_effect"] > 1e-4, check


@pytest.mark.skipif(os.environ.get("RID_SDXL_DRY_RUN") != "1", reason="opt-in: RID_SDXL_DRY_RUN=1 (12 GB disk, 13 GB RAM)")
def test_dry_run_at_sdxl_size(tmp_path):
    d = Path(os.environ.get("RID_SDXL_DIR", tmp_path / "sdxl"))  # RID_SDXL_DIR: build there (or reuse a build)
    if not (d / "build.json").is_file():
        assert sd15.main(["build", str(d), "--backbone", "sdxl"]) == 0
    counts = json.loads((d / "build.json").read_text())
    assert all(counts[k] == v for k, v in sd15.XL_PARAMS.items())
    code = sd15.main(["run", str(d)])
    result = json.loads((d / "dry_run.json").read_text())
    assert code == 0, [s for s in result["steps"] if s["rc"]]
    assert result["backbone"] == "sdxl" and result["dtype"] == "bf16"
    assert result["checks"]["export_rel_err"] < 1e-4 and result["checks"]["lora_effect"] > 0
    from safetensors.torch import load_file

    for s in result["steps"]:
        stage = d / "runs" / f"{s['method']}-{s['resolution']}" / f"stage1-{s['task']}"
        w = load_file(str(stage / "adapters.safetensors"))
        assert all(torch.isfinite(v).all() for v in w.values()) and any(v.abs().sum() > 0 for v in w.values())
