"""experiments/sd15.py: the SD-1.5-, SDXL- and SD3-Medium-shaped dry runs. Always: the configs give SD-1.5's,
SDXL base's and SD3-Medium's published parameter counts (built on the meta device, no memory), the locally
built tokenizer tokenises as CLIP's own BPE (open_clip's SimpleTokenizer is the oracle), and a tiny SDXL and a
tiny SD3 built by the same code load through diffusers' pipelines and rid's backbones, train one step through
train.py and export a LoRA file diffusers loads. Opt-in (RID_SD15_DRY_RUN=1; about 10 GB of disk, 16 GB of
memory, 15 min on 2 cores): the full SD-1.5 build and every CLI on it at 64², export equal through
diffusers; RID_SDXL_DRY_RUN=1 the same for SDXL in bf16 (12 GB of disk, 13 GB of memory, ~40 CPU-minutes);
RID_SD3_DRY_RUN=1 for SD3-Medium without T5 in bf16 (11 GB of disk with the reward models, 12 GB of memory,
~20 CPU-minutes; docs/sd3_dry_run.md)."""
import json
import os
import sys
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


def test_configs_are_sd3_medium_sized():
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from experiments import backbone_memory

    c = sd15.sd3_configs()
    assert c["transformer"] is backbone_memory.SD3_MEDIUM and c["vae"] is backbone_memory.SD3_VAE  # one copy
    with torch.device("meta"):
        built = {"transformer": SD3Transformer2DModel(**c["transformer"]), "vae": AutoencoderKL(**c["vae"]),
                 "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**c["text_encoder"])),
                 "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**c["text_encoder_2"]))}
    for k, m in built.items():
        assert sum(p.numel() for p in m.parameters()) == sd15.SD3_PARAMS[k], k
    assert sd15.SD3_PARAMS["transformer"] == backbone_memory.PARAMS["sd3-medium transformer"]
    assert sd15.SD3_PARAMS["text_encoder_2"] == backbone_memory.PARAMS["clip-g"]
    t = built["transformer"].config  # the pooled text is both projections; the CLIP states fit T5's width
    assert t.pooled_projection_dim == c["text_encoder"]["projection_dim"] + c["text_encoder_2"]["projection_dim"]
    assert t.joint_attention_dim >= c["text_encoder"]["hidden_size"] + c["text_encoder_2"]["hidden_size"]
    assert built["vae"].config.latent_channels == t.in_channels == 16


def test_an_existing_rewards_dir_is_kept(tmp_path):
    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards" / "rewards.json").write_text("{}")
    assert sd15.build_rewards(tmp_path) == {} and (tmp_path / "prompts.txt").is_file()
    assert [p.name for p in (tmp_path / "rewards").iterdir()] == ["rewards.json"]


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    """A tiny SD3 built by build_sd3 (the real build's code, widths cut, no T5) and one rid step through train.py
    (at lr 1e-2: at rid's 5e-5 one step moves this MMDiT's output by ~4e-6 of its size, too little to compare)."""
    import train

    d = tmp_path_factory.mktemp("sd3")
    counts = sd15.build_sd3(d, tiny=True)
    (d / "prompts.txt").write_text("a photo of a cat\na red car\n")
    run = d / "run"
    code = train.main(["--model", str(d / "model"), "--prompts", str(d / "prompts.txt"), "--tasks", "compress",
                       "--method", "rid", "--steps", "2", "--batch", "1", "--max-steps", "1", "--resolution", "48",
                       "--dtype", "bf16", "--device", "cpu", "--lr", "1e-2", "--out", str(run)])  # lr: a visible LoRA
    return d, counts, run, code


def test_tiny_sd3_build_loads_through_diffusers_and_rid(tiny_sd3):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    import rid

    d, counts, _, _ = tiny_sd3
    model = d / "model"
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"] == [None, None]
    sched = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler" and sched["shift"] == 3.0
    vae = json.loads((model / "vae" / "config.json").read_text())
    assert (vae["scaling_factor"], vae["shift_factor"], vae["latent_channels"]) == (1.5305, 0.0609, 16)
    # a model_index.json with text_encoder_3 null loads only when told so (diffusers 0.42); rid's loader is
    pipe = StableDiffusion3Pipeline.from_pretrained(str(model), text_encoder_3=None, tokenizer_3=None,
                                                    torch_dtype=torch.float32)  # stored in bf16
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert counts["transformer"] == sum(p.numel() for p in pipe.transformer.parameters())
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"

    models = rid.load_models(str(model))
    assert type(models).__name__ == "SD3" and models.text_encoder_3 is None and models.resolution_multiple == 16
    prompts = ["a photo of a cat", "a red car"]
    cond = models.conditioning(prompts, 7.0)  # [uncond; cond]
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device="cpu",
                                                  do_classifier_free_guidance=False)
    # the pipeline puts 256 zero T5 tokens after CLIP's 77; rid carries them as one, counted 256 times by the
    # attention (backbones/sd3.py, equal outputs: tests/test_flow.py)
    assert embeds.shape == (2, 77 + 256, 80) and not embeds[:, 77:].any()
    torch.testing.assert_close(cond.hidden[2:], embeds[:, :78], rtol=0, atol=0)
    torch.testing.assert_close(cond.extra["pooled"][2:], pooled, rtol=0, atol=0)
    assert cond.hidden.shape == (4, 77 + 1, 80) and not cond.hidden[:, 77:].any()


def test_tiny_sd3_trains_a_step_and_exports_what_diffusers_loads(tiny_sd3):
    import checkpoint
    from safetensors.torch import load_file

    d, _, run, code = tiny_sd3
    assert code == 0
    stage = run / "stage1-compress"
    w = load_file(str(stage / "adapters.safetensors"))
    assert all(torch.isfinite(v).all() for v in w.values())
    assert any(k.endswith("/B") and v.abs().sum() > 0 for k, v in w.items())
    assert checkpoint.main(["export", str(run), str(run / "exported.safetensors")]) == 0
    check = sd15.export_check(d / "model", run, run / "exported.safetensors", 48)
    assert check["export_rel_err"] < 1e-5 and check["lora_effect"] > 1e-4, check
    # as `run` calls it: in a child process, the result its last line
    args = json.dumps([str(d / "model"), str(run), str(run / "exported.safetensors"), 48])
    r = sd15.measured([sys.executable, "-c", sd15.EXPORT_CHECK, args], print)
    assert r["rc"] == 0 and json.loads(r["tail"][-1]) == check, r


def test_run_rejects_a_size_off_sd3s_multiple(tiny_sd3, tmp_path, capsys):
    d = tmp_path / "d"
    (d / "rewards").mkdir(parents=True)
    (d / "rewards" / "rewards.json").write_text("{}")
    (d / "model").symlink_to(tiny_sd3[0] / "model")
    assert sd15.main(["run", str(d), "--resolution", "40"]) == 2
    assert "multiple of 16" in capsys.readouterr().err


@pytest.mark.skipif(os.environ.get("RID_SD3_DRY_RUN") != "1",
                    reason="opt-in: RID_SD3_DRY_RUN=1 (11 GB disk, 12 GB RAM)")
def test_dry_run_at_sd3_medium_size(tmp_path):
    d = Path(os.environ.get("RID_SD3_DIR", tmp_path / "sd3"))  # RID_SD3_DIR: build there (or reuse a build)
    if not (d / "build.json").is_file():
        assert sd15.main(["build", str(d), "--backbone", "sd3"]) == 0
    counts = json.loads((d / "build.json").read_text())
    assert all(counts[k] == v for k, v in sd15.SD3_PARAMS.items())
    code = sd15.main(["run", str(d)])
    result = json.loads((d / "dry_run.json").read_text())
    assert code == 0, [s for s in result["steps"] if s["rc"]]
    assert result["backbone"] == "sd3" and result["dtype"] == "bf16"
    assert result["checks"]["export_rel_err"] < 1e-4 and result["checks"]["lora_effect"] > 0
    from safetensors.torch import load_file

    for s in result["steps"]:
        stage = d / "runs" / f"{s['method']}-{s['resolution']}" / f"stage1-{s['task']}"
        w = load_file(str(stage / "adapters.safetensors"))
        assert all(torch.isfinite(v).all() for v in w.values()) and any(v.abs().sum() > 0 for v in w.values())
