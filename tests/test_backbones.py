"""backbones/ (the model behind one seam) against diffusers' own pipelines, on tiny random SDXL
and SD directories written by the pipelines' save_pretrained (tests/tiny.py).

    conditioning   == StableDiffusionXLPipeline.encode_prompt (zeroed or "" negative) and _get_add_time_ids
    sampling       == StableDiffusionXLPipeline(...) with the same latents: its own EulerDiscreteScheduler
                      (leading, SDXL base's; trailing) with and without CFG, latents and images, max |diff|
                      printed (pytest -s); DDIM (--sampler ddim; trailing as SDXL-Turbo, one step, guidance
                      off); LCM with a seeded generator
    LoRA keys      a file written with backbone.lora_keys, loaded by pipe.load_lora_weights, gives the
                   UNet output of rid's adapter group (SD and SDXL)
    every method   one rid.train_step of each method on tiny SDXL moves the adapters, finitely; LaSRO's
                   surrogate reads SDXL's conditioning (its features move with the pooled text and time ids)
    fp16 / bf16    the VAE stays fp32 where its config says force_upcast
    registry       an unsupported pipeline class: one line naming the supported ones, train.py exits 2;
                   each file's LORA_SHAPES collected for the kernel benchmarks (rid_kernels/bench.py)
"""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import backbones  # noqa: E402
import rid  # noqa: E402
from tiny import tiny_sd, tiny_sdxl, toy_reward  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a photo of a cat", "a red car"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def xl_path(tmp_path_factory):
    return tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="module")
def xl(xl_path):
    return rid.load_models(xl_path)


def pipeline(path, scheduler=None):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(models, seed=0, n=2):
    return torch.randn(n, *models.latent_shape, generator=torch.Generator().manual_seed(seed))


#### CONDITIONING ####

@pytest.mark.parametrize("force_zeros", [True, False])
def test_sdxl_conditioning_equals_the_pipelines_encode_prompt_and_time_ids(tmp_path, force_zeros):
    path = tiny_sdxl(tmp_path, force_zeros=force_zeros)
    models, pipe = rid.load_models(path), pipeline(path)
    assert models.force_zeros is force_zeros
    pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=True)
    h, w = models.size
    time_ids = pipe._get_add_time_ids((h, w), (0, 0), (h, w), dtype=pe.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    cond = models.conditioning(PROMPTS, 3.0)  # [uncond; cond]
    # the "" branch is encoded once at batch 1 (the pipeline: once per prompt), so equal up to GEMM rounding
    torch.testing.assert_close(cond.hidden, torch.cat([npe, pe]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cond.extra["text_embeds"], torch.cat([npooled, pooled]), rtol=1e-6, atol=1e-6)
    assert torch.equal(cond.hidden[2:], pe) and torch.equal(cond.extra["text_embeds"][2:], pooled)
    assert torch.equal(cond.extra["time_ids"], time_ids.repeat(4, 1))
    assert (cond.hidden[:2] == 0).all() == force_zeros
    one = models.conditioning(PROMPTS, 1.0)  # guidance off: the prompts only
    assert torch.equal(one.hidden, pe) and torch.equal(one.extra["text_embeds"], pooled)
    assert (h, w) == (16, 16) and models.latent_shape == (4, 8, 8)


def test_time_ids_follow_the_resolution(xl):
    xl.set_resolution(32)
    try:
        assert xl.encode(["a cat"]).extra["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]]
        assert xl.latent_shape == (4, 16, 16)
    finally:
        xl.set_resolution(None)


#### SAMPLING ####

@pytest.mark.parametrize("steps", [1, 3, 8])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_sdxl_euler_sample_equals_the_pipeline(xl, xl_path, guidance, steps):
    """SDXL base's own scheduler (EulerDiscreteScheduler, leading): rid's default sampler on it, from the same
    noise, ends at the pipeline's latents (output_type latent) and decodes to its images."""
    import samplers

    pipe = pipeline(xl_path)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    sampler = xl.sampler(steps)
    assert type(sampler) is samplers.Euler and sampler.init_scale == pytest.approx(1.0, abs=1e-7)
    z = latents(xl)
    ref = pipe(PROMPTS, latents=z.clone(), num_inference_steps=steps, guidance_scale=guidance,
               output_type="latent").images
    with torch.no_grad():
        out = samplers.denoise(xl, xl.conditioning(PROMPTS, guidance), z, sampler, range(steps), guidance)
    print(f"sdxl euler pipeline latents, guidance {guidance}, {steps} steps: max |diff| "
          f"{(out - ref).abs().max().item():.2e} (|latent| ≤ {ref.abs().max().item():.2f})")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    images = pipe(PROMPTS, latents=z.clone(), num_inference_steps=steps, guidance_scale=guidance,
                  output_type="pt").images
    torch.testing.assert_close(rid.sample(xl, PROMPTS, z, steps=steps, guidance=guidance), images, rtol=1e-5, atol=1e-5)


def test_sdxl_euler_trailing_equals_the_pipeline_from_its_scaled_latents(tmp_path):
    """EulerDiscreteScheduler with trailing spacing (SDXL-Lightning's): diffusers starts at x = σ_max·noise, rid
    at the unit scaled latent, i.e. x = √(σ_max² + 1)·noise; the pipeline given latents × init_scale matches."""
    path = tiny_sdxl(tmp_path, scheduler="turbo")  # an EulerDiscreteScheduler config with trailing spacing
    models, pipe = rid.load_models(path), pipeline(path)
    z = latents(models, 1)
    for steps in (1, 4):
        sampler = models.sampler(steps)
        assert type(sampler).__name__ == "Euler" and sampler.timestep(0) == 999.0
        ref = pipe(PROMPTS, latents=z * sampler.init_scale, num_inference_steps=steps, guidance_scale=0.0,
                   output_type="latent").images
        with torch.no_grad():
            out = rid.denoise(models, models.conditioning(PROMPTS, 1.0), z, sampler, range(steps), 1.0)
        print(f"sdxl euler trailing pipeline latents, {steps} steps: max |diff| {(out - ref).abs().max().item():.2e}")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_sdxl_ddim_sample_equals_the_pipeline(xl, xl_path, guidance):
    """--sampler ddim keeps DDIM on SDXL base (DDIMScheduler.from_config of its Euler config)."""
    from diffusers import DDIMScheduler

    pipe = pipeline(xl_path, DDIMScheduler)
    z = latents(xl)
    ref = pipe(PROMPTS, latents=z.clone(), num_inference_steps=3, guidance_scale=guidance, output_type="pt").images
    out = rid.sample(xl, PROMPTS, z, steps=3, guidance=guidance, sampler="ddim")
    assert out.shape == ref.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(rid.sample(xl, PROMPTS, z, steps=3, guidance=guidance), ref, atol=1e-4)  # Euler's


def test_turbo_one_step_trailing_without_guidance_equals_the_pipeline(tmp_path):
    from diffusers import DDIMScheduler

    path = tiny_sdxl(tmp_path, scheduler="turbo")
    models, pipe = rid.load_models(path), pipeline(path, DDIMScheduler)
    assert models.sampler(1, "ddim").timesteps.tolist() == [999]
    z = latents(models, 1)
    for steps in (1, 4):
        ref = pipe(PROMPTS, latents=z.clone(), num_inference_steps=steps, guidance_scale=0.0, output_type="pt").images
        out = rid.sample(models, PROMPTS, z, steps=steps, guidance=1.0, sampler="ddim")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_lcm_with_guidance_embedding_equals_the_pipeline(tmp_path):
    """A w-conditioned LCM UNet (time_cond_proj_dim): no CFG batch, w − 1 as an embedding."""
    path = tiny_sdxl(tmp_path, scheduler="lcm", time_cond_proj_dim=8)
    models, pipe = rid.load_models(path), pipeline(path)
    assert models.guidance_embedded and len(models.conditioning(PROMPTS, 5.0)) == 2
    z = latents(models, 3)
    ref = pipe(PROMPTS, latents=z.clone(), num_inference_steps=2, guidance_scale=5.0, output_type="pt",
               generator=torch.Generator().manual_seed(1)).images
    out = rid.sample(models, PROMPTS, z, steps=2, guidance=5.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(rid.sample(models, PROMPTS, z, steps=2, guidance=2.0,
                                         generator=torch.Generator().manual_seed(1)), ref, atol=1e-4)


def test_lcm_sample_equals_the_pipeline_with_the_same_generator(tmp_path):
    path = tiny_sdxl(tmp_path, scheduler="lcm")
    models, pipe = rid.load_models(path), pipeline(path)
    assert type(models.sampler(4)).__name__ == "LCM"
    z = latents(models, 2)
    ref = pipe(PROMPTS, latents=z.clone(), num_inference_steps=4, guidance_scale=1.0, output_type="pt",
               generator=torch.Generator().manual_seed(7)).images
    out = rid.sample(models, PROMPTS, z, steps=4, guidance=1.0, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # and --sampler ddim on the same model is another trajectory
    assert not torch.allclose(rid.sample(models, PROMPTS, z, steps=4, guidance=1.0, sampler="ddim"), ref, atol=1e-3)


@pytest.mark.parametrize("method", ["rid", "draft", "refl"])
def test_lcm_training_draws_its_fresh_noise_from_the_steps_generator(tmp_path, method):
    """LCM re-noises between steps: in training that noise comes from the step's seeded generator (resume
    stays bit-exact), not from the global RNG."""
    models = rid.load_models(tiny_sdxl(tmp_path, scheduler="lcm"))
    group = rid.inject(models.denoiser)
    group.add_task("t", generator=torch.Generator().manual_seed(0))
    cfg = rid.StepConfig(method=method, steps=3, guidance=1.0)

    def loss(seed, global_seed):
        torch.manual_seed(global_seed)
        with torch.no_grad():
            return rid.method_loss(models, group, toy_reward, PROMPTS, latents(models), cfg,
                                   torch.Generator().manual_seed(seed))[0].item()

    assert loss(5, 0) == loss(5, 1)
    assert loss(5, 0) != loss(6, 0)


#### HALF PRECISION: THE VAE STAYS FP32 ####

def test_half_precision_model_keeps_an_fp32_vae_when_its_config_says_force_upcast(xl_path):
    models = rid.load_models(xl_path, dtype=torch.bfloat16)
    assert models.dtype == torch.bfloat16 and models.vae.dtype == torch.float32
    fp32 = rid.load_models(xl_path)
    z = latents(fp32)
    out = models.decode(z.to(torch.bfloat16))
    torch.testing.assert_close(out, fp32.decode(z.to(torch.bfloat16).float()), rtol=0, atol=0)


#### LORA EXPORT KEYS ####

def _export_with_backbone_keys(models, group, path, kohya: bool):
    """A LoRA file written from the backbone's key map: A = [A_i], B = [s_i B_i] per layer (rank T·r);
    kohya's also gets alpha = rank, so its scale alpha / rank is 1."""
    from safetensors.torch import save_file

    per_task = [group.task_tensors(i) for i in range(len(group.tasks))]
    tensors = {}
    for name in group.layers:
        A = torch.cat([t[name][0] for t in per_task]).float().contiguous()
        B = torch.cat([s * t[name][1] for s, t in zip(group.scales, per_task)], 1).float().contiguous()
        if kohya:
            down, up, alpha = models.kohya_keys(name)
            tensors.update({down: A, up: B, alpha: torch.tensor(float(A.shape[0]))})
        else:
            a_key, b_key = models.lora_keys(name)
            tensors.update({a_key: A, b_key: B})
    save_file(tensors, path)


@pytest.mark.parametrize("kohya", [False, True], ids=["diffusers", "kohya"])
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_lora_keys_load_in_diffusers_for_both_backbones(tmp_path, kind, kohya):
    from diffusers import DiffusionPipeline

    path = (tiny_sd if kind == "sd" else tiny_sdxl)(tmp_path / "model")
    models = rid.load_models(path)
    group = rid.inject(models.denoiser, targets=rid.ATTN_TARGETS + rid.FF_TARGETS)
    for task in ("a", "b"):
        group.add_task(task, generator=torch.Generator().manual_seed(len(task)))
        with torch.no_grad():
            group.flat.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    group.set_scale(0, 0.5)
    _export_with_backbone_keys(models, group, str(tmp_path / "lora.safetensors"), kohya)
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    z, cond = latents(models), models.conditioning(PROMPTS, 1.0)
    with torch.no_grad():
        ours = models.predict(z, 501, cond, 1.0)
        theirs = dataclasses.replace(models, unet=pipe.unet).predict(z, 501, cond, 1.0)  # the same call, their UNet
        base = dataclasses.replace(models, unet=type(pipe).from_pretrained(path).unet).predict(z, 501, cond, 1.0)
    assert (ours - base).abs().max() > 1e-3  # the adapters matter, so the comparison can fail
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


#### EVERY METHOD ON SDXL ####

@pytest.mark.parametrize("method", rid.METHODS)
def test_every_method_steps_on_sdxl(xl_path, method):
    models = rid.load_models(xl_path)
    group = rid.inject(models.denoiser)
    group.add_task("t", generator=torch.Generator().manual_seed(0))
    before = group.flat.detach().clone()
    opt = torch.optim.AdamW(group.parameters(), lr=1e-2)
    cfg = rid.StepConfig(method=method, steps=3, guidance=3.0, truncate=2)
    logs = rid.train_step(models, group, toy_reward, [(PROMPTS, latents(models))], opt, cfg,
                          generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values()), logs
    assert not torch.equal(group.flat.detach(), before)


def test_lasro_surrogate_reads_sdxl_conditioning(xl):
    import surrogate as S

    emb = xl.encode(PROMPTS)
    sur = S.Surrogate(xl.unet, S.SurrogateConfig(hidden=8), emb)
    assert "add_embedding" in sur.model.encoder
    z = latents(xl)
    f = sur.model.features(z, emb)
    assert torch.isfinite(f).all() and f.shape[0] == 2
    moved = backbones.Cond(emb.hidden, text_embeds=emb.extra["text_embeds"], time_ids=emb.extra["time_ids"] * 2)
    assert not torch.allclose(sur.model.features(z, moved), f)  # the time ids reach the encoder, as in the UNet
    torch.testing.assert_close(sur.model.features(z[[1, 0]], emb[[1, 0]]), f[[1, 0]])  # per-prompt indexing


#### REGISTRY ####

def test_unsupported_pipeline_class_is_one_line_naming_the_supported(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError) as e:
        rid.load_models(str(tmp_path))
    msg = str(e.value)
    assert "KandinskyPipeline" in msg and "\n" not in msg
    assert all(name in msg for name in backbones.REGISTRY)
    (tmp_path / "p.txt").write_text("a red cat\na blue dog\na red car\na blue tree\n")
    out = subprocess.run([sys.executable, "train.py", "--model", str(tmp_path), "--tasks", "compress", "--max-steps",
                          "1", "--out", str(tmp_path / "out"), "--prompts", str(tmp_path / "p.txt")],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "KandinskyPipeline" in lines[0] and "FluxPipeline" in lines[0], lines


def test_sd_and_sdxl_are_chosen_from_model_index(xl, sd_path):
    assert type(xl).__name__ == "SDXL" and type(rid.load_models(sd_path)).__name__ == "SD"
    assert backbones.REGISTRY == {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
                                  "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}


def test_lora_shapes_live_beside_each_backbone_and_the_kernel_bench_reads_them():
    """Each registered file owns its LoRA-target layer shapes; backbones.lora_shapes() collects them in REGISTRY's
    order and rid_kernels.bench's BACKBONE_LORA_SHAPES is that collection (the widths are checked against the
    modules diffusers builds in tests/test_compile.py)."""
    from importlib import import_module

    from rid_kernels import bench

    shapes = backbones.lora_shapes()
    assert list(shapes) == ["sd15", "sdxl", "sd3", "flux"]
    for name in backbones.REGISTRY.values():
        own = import_module(f"backbones.{name}").LORA_SHAPES
        assert all(shapes[k] is v for k, v in own.items())
        assert all(isinstance(w, str) and all(isinstance(n, int) and n > 0 for n in rest)
                   for rows in own.values() for w, *rest in rows)
    assert bench.BACKBONE_LORA_SHAPES == shapes
