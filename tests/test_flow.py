"""Rectified flows (SD3 / SD3.5; FLUX.1): samplers.Flow, backbones/sd3.py, every method on a flow model.

    Flow sampler   == FlowMatchEulerDiscreteScheduler.from_config(config) after set_timesteps as
                      StableDiffusion3Pipeline (the scheduler's own σ's, static shift 3.0 or dynamic μ) and
                      FluxPipeline (sigmas linspace(1, 1/n, n), dynamic μ from the token count; schnell's
                      shift 1) call it: timesteps, σ's and every Euler step bit for bit, 1…50 steps
    η analogue     η = 0 is the Euler step bit for bit; η = 1 equals the DDPM posterior computed by Gaussian
                   conditioning of the Markov forward kernel (float64 covariances); every η keeps the marginal
                   x_σ' = (1 − σ')x₀ + σ'ε (coefficients read off by linearity)
    SD3 (tiny_sd3) conditioning == StableDiffusion3Pipeline.encode_prompt, with T5 and without (its part zeros);
                   sampling == the pipeline on the same latents (CFG on/off; dynamic shift); decode's VAE
                   shift/scale; LoRA targets = diffusers' SD3 LoRA script's
    SD3 without T5 --text-encoder-3 none on a directory saved with T5 whose T5 files are then deleted (so nothing
                   may read them) == StableDiffusion3Pipeline(text_encoder_3=None): conditioning, sampled latents;
                   refused for FLUX and unknown values; a train.py step stores it in run.json, --resume holds to
                   it (an older run.json reads as auto), eval.py follows it
    one zero T5    without T5 rid carries the 256 zero tokens as one (RepeatedLastToken on the joint attention
                   only; literal_zero_t5 switches back): prediction == diffusers' transformer with its own
                   attention on the pipeline's 16 + 256 tokens (CFG), latents == the pipeline's; rid, baseline,
                   r0 loss and adapter gradient == the 256 literal zeros; every method steps
    every method   rid (pixel, latent), baseline, draft-k, draft, draft-lv, refl: loss and gradient == `Hand`, an
                   unrolled loop on the pipeline's encode_prompt, diffusers' FlowMatchEuler σ's and the
                   transformer called directly (CFG, Euler, re-noising (1 − σ)x̂₀ + σε, x̂₀ = z − σv written out);
                   r0 at η = 0.5: gradient through every η step (noise from the generator after the η's) ==
                   the hand loop with the η analogue written out; one train_step of each method moves the adapters
    LoRA export    a diffusers-format file from the backbone's key map loads with StableDiffusion3Pipeline.
                   load_lora_weights and gives the transformer output of rid's adapter group
    LaSRO          the MMDiT encoder (first half of the joint blocks) reads the pooled text and the tokens
    FLUX (tiny_flux) pack/unpack/img_ids == FluxPipeline's; conditioning == encode_prompt; sampling == the pipeline
                   (dev with its guidance embedding, schnell); rid and baseline loss and gradient == `FluxHand`;
                   every method steps; LoRA targets = diffusers' FLUX script's, the file loads with
                   FluxPipeline.load_lora_weights and gives rid's output; LaSRO's encoder on packed latents
"""
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import samplers  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# The shipped scheduler configs (SD3-medium / SD3.5; FLUX.1-dev; FLUX.1-schnell).
SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX_DEV = {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
            "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
            "use_dynamic_shifting": True}
FLUX_SCHNELL = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
                "use_dynamic_shifting": False}
SD3_DYNAMIC = {**SD3, "use_dynamic_shifting": True}  # SD3.5-style dynamic shifting through the SD3 pipeline
STEPS = [1, 2, 3, 4, 28, 50]


def flow_cases():
    # (name, config, mu, pipeline_sigmas): as each pipeline calls set_timesteps
    return [("sd3-static-shift", SD3, None, False),
            ("sd3-dynamic-shift", SD3_DYNAMIC, samplers.flow_mu(SD3_DYNAMIC, 64 * 64, max_shift=1.16), False),
            ("flux-dev-dynamic-1024px", FLUX_DEV, samplers.flow_mu(FLUX_DEV, 4096), True),
            ("flux-dev-dynamic-256px", FLUX_DEV, samplers.flow_mu(FLUX_DEV, 256), True),
            ("flux-schnell", FLUX_SCHNELL, None, True)]


def diffusers_flow(config, steps, mu, pipeline_sigmas):
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler.from_config(config)
    sigmas = np.linspace(1.0, 1 / steps, steps) if pipeline_sigmas else None
    s.set_timesteps(steps, sigmas=sigmas, **({"mu": mu} if mu is not None else {}))
    return s


def test_flow_mu_is_diffusers_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for n in (16, 256, 1024, 4096, 9000):
        assert samplers.flow_mu(FLUX_DEV, n) == calculate_shift(n, 256, 4096, 0.5, 1.15)
        assert samplers.flow_mu(SD3_DYNAMIC, n, max_shift=1.16) == calculate_shift(n, 256, 4096, 0.5, 1.16)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name,config,mu,pipeline_sigmas", flow_cases(), ids=[c[0] for c in flow_cases()])
def test_flow_equals_diffusers_step_by_step(name, config, mu, pipeline_sigmas, steps):
    ours = samplers.build(config, steps, mu=mu, pipeline_sigmas=pipeline_sigmas)
    ref = diffusers_flow(config, steps, mu, pipeline_sigmas)
    assert type(ours) is samplers.Flow
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
    g = torch.Generator().manual_seed(steps)
    z = torch.randn(2, 16, 5, 7, generator=g)
    z_ref = z.clone()
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(z.shape, generator=g)
        assert ours.timestep(i) == float(t)
        torch.testing.assert_close(ours.x0(v, ours.timestep(i), z), z - ref.sigmas[i] * v, rtol=0, atol=0)
        z = ours.step(v, ours.timestep(i), z, eta=0.0)
        z_ref = ref.step(v, t, z_ref, return_dict=False)[0]
        assert torch.equal(z, z_ref), (name, steps, i)


def test_flow_bf16_step_follows_diffusers_casts():
    ours, ref = samplers.Flow(4, SD3), diffusers_flow(SD3, 4, None, False)
    z, v = torch.randn(1, 16, 4, 4).bfloat16(), torch.randn(1, 16, 4, 4).bfloat16()
    out, theirs = ours.step(v, ours.timestep(0), z), ref.step(v, ref.timesteps[0], z, return_dict=False)[0]
    assert out.dtype == theirs.dtype == torch.bfloat16 and torch.equal(out, theirs)


def test_flow_rejects_mismatched_samplers_and_missing_mu():
    with pytest.raises(ValueError, match="sampler 'ddim' is not allowed for a FlowMatchEulerDiscreteScheduler"):
        samplers.build(SD3, 4, "ddim")
    with pytest.raises(ValueError, match="sampler 'flow' is not allowed for a DDIMScheduler"):
        samplers.build(samplers.SD15_SCHEDULER, 4, "flow")
    with pytest.raises(ValueError, match="needs mu"):
        samplers.build(FLUX_DEV, 4)


#### THE η ANALOGUE ####

def _coefficients(flow, i, eta):
    """The step's output is linear in (x₀, ε, noise) when v = ε − x₀ is exact: read the three
    coefficients off by feeding unit vectors (float64)."""
    s = float(flow.sigmas[i])
    t = flow.timestep(i)
    out = []
    for x0, eps, noise in ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)):
        x0, eps, noise = (torch.tensor([v], dtype=torch.float64) for v in (x0, eps, noise))
        z = (1 - s) * x0 + s * eps
        out.append(float(flow.step(eps - x0, t, z, eta, noise)))
    return out


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_flow_eta_keeps_the_marginals(eta):
    flow = samplers.Flow(6, SD3)
    flow.sigmas = flow.sigmas.double()
    tol = 1e-6 if eta == 0 else 1e-12  # η = 0 is diffusers' Euler step, computed in float32
    for i in range(6):
        s_next = float(flow.sigmas[i + 1])
        a, b, c = _coefficients(flow, i, eta)
        assert a == pytest.approx(1 - s_next, abs=tol)  # the clean part: (1 − σ')x₀
        assert (b ** 2 + c ** 2) ** 0.5 == pytest.approx(s_next, abs=tol)  # total noise σ'
        assert (c == 0) == (eta == 0 or s_next == 0)


def test_flow_eta_one_is_the_ddpm_posterior_by_gaussian_conditioning():
    """Independent oracle: the joint Gaussian of (x_σ', x_σ) given x₀ under the Markov forward kernel
    x_σ = k x_σ' + N(0, s² − k²s'²), k = a/a', conditioned on x_σ (Schur complement), in float64."""
    flow = samplers.Flow(5, SD3)
    flow.sigmas = flow.sigmas.double()
    for i in range(1, 4):
        s, s_next = float(flow.sigmas[i]), float(flow.sigmas[i + 1])
        a, a_next = 1 - s, 1 - s_next
        k = a / a_next
        cov = torch.tensor([[s_next ** 2, k * s_next ** 2], [k * s_next ** 2, s ** 2]], dtype=torch.float64)
        x0, eps = torch.tensor(0.7, dtype=torch.float64), torch.tensor(-1.3, dtype=torch.float64)
        x_t = a * x0 + s * eps
        mean = a_next * x0 + cov[0, 1] / cov[1, 1] * (x_t - a * x0)
        var = cov[0, 0] - cov[0, 1] ** 2 / cov[1, 1]
        t = flow.timestep(i)
        zero = torch.zeros((), dtype=torch.float64)
        got_mean = flow.step((eps - x0).view(1), t, x_t.view(1), 1.0, zero.view(1))
        got_std = flow.step((eps - x0).view(1), t, x_t.view(1), 1.0, torch.ones(1, dtype=torch.float64)) - got_mean
        assert float(got_mean) == pytest.approx(float(mean), abs=1e-12)
        assert float(got_std) ** 2 == pytest.approx(float(var), abs=1e-12)


def test_flow_eta_zero_is_the_euler_step_bit_for_bit():
    flow, ref = samplers.Flow(8, SD3), diffusers_flow(SD3, 8, None, False)
    z, v = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    for i, t in enumerate(ref.timesteps):
        assert torch.equal(flow.step(v, flow.timestep(i), z, 0.0, None), z + (ref.sigmas[i + 1] - ref.sigmas[i]) * v)
        assert not flow.needs_noise(flow.timestep(i), 0.0)
    assert flow.needs_noise(flow.timestep(0), 0.5) and not flow.needs_noise(flow.timestep(7), 0.5)  # last: σ' = 0


#### SD3 (tiny, tests/tiny.py) ####

import dataclasses  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402

import backbones  # noqa: E402
import backbones.sd3  # noqa: E402
import rid  # noqa: E402
from tiny import tiny_sd3, toy_reward  # noqa: E402

PROMPTS = ["a photo of a cat", "a red car"]
W = 3.0


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def sd3_path(tmp_path_factory):
    return tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"))


@pytest.fixture(scope="module")
def sd3(sd3_path):
    return load_sd3(sd3_path)


def load_sd3(path):
    """A StableDiffusion3Pipeline directory through the registry, as train.py and eval.py load it."""
    models = rid.load_models(str(path))
    assert isinstance(models, backbones.sd3.SD3)
    return models


def sd3_pipeline(path):
    from diffusers import StableDiffusion3Pipeline

    t5 = os.path.isdir(os.path.join(path, "text_encoder_3"))  # without: the pipeline needs them passed as None
    pipe = StableDiffusion3Pipeline.from_pretrained(path, **({} if t5 else {"text_encoder_3": None, "tokenizer_3": None}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(models, seed=0, n=2):
    return torch.randn(n, *models.latent_shape, generator=gen(seed))


@pytest.mark.parametrize("t5", [True, False], ids=["with-t5", "without-t5"])
def test_sd3_conditioning_equals_the_pipelines_encode_prompt(tmp_path, t5):
    path = tiny_sd3(tmp_path, t5=t5)
    models, pipe = load_sd3(path), sd3_pipeline(path)
    assert isinstance(models, backbones.sd3.SD3) and (models.text_encoder_3 is None) == (not t5)
    with torch.no_grad():
        pe, ne, pp, npp = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True)
    cond = models.conditioning(PROMPTS, W)  # [uncond; cond]
    n = 256 if t5 else 1  # without T5: one zero token for the pipeline's 256 (RepeatedLastToken)
    assert cond.hidden.shape == (4, 16 + n, 80) and cond.extra["pooled"].shape == (4, 64)
    torch.testing.assert_close(cond.hidden, torch.cat([ne, pe])[:, :16 + n], rtol=0, atol=0)
    if not t5:  # literal_zero_t5: the pipeline's 256 zeros, byte for byte
        literal = dataclasses.replace(models, literal_zero_t5=True).conditioning(PROMPTS, W)
        torch.testing.assert_close(literal.hidden, torch.cat([ne, pe]), rtol=0, atol=0)
    # the pipeline encodes B copies of the "" prompt, rid one: the projection GEMM rounds by batch size
    torch.testing.assert_close(cond.extra["pooled"], torch.cat([npp, pp]), rtol=1e-6, atol=1e-6)
    assert cond.hidden[:, :16, 64:].abs().max() == 0  # CLIP-L ⊕ CLIP-G (64) zero-padded to T5's 80
    assert (cond.hidden[:, 16:].abs().max() > 0) == t5  # no T5: its part is zeros
    if t5:  # the T5 part reads its tokens: another prompt, other states
        other = models.encode(["a blue house"]).hidden[0, 16:]
        assert not torch.allclose(other, cond.hidden[2, 16:])


@pytest.mark.parametrize("guidance", [1.0, W])
def test_sd3_sample_equals_the_pipeline(sd3, sd3_path, guidance):
    pipe, z = sd3_pipeline(sd3_path), latents(sd3)
    ref = pipe(PROMPTS, latents=z.clone(), num_inference_steps=3, guidance_scale=guidance, output_type="pt").images
    out = rid.sample(sd3, PROMPTS, z, steps=3, guidance=guidance)
    assert out.shape == ref.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_sd3_dynamic_shift_sample_equals_the_pipeline(tmp_path):
    path = tiny_sd3(tmp_path, t5=False, dynamic_shift=True)
    models, pipe = load_sd3(path), sd3_pipeline(path)
    mu = samplers.flow_mu(models.scheduler_config, 4 * 4, max_shift=1.16)  # (8/2)·(8/2) image tokens
    assert torch.equal(models.sampler(4).sigmas, samplers.Flow(4, models.scheduler_config, mu=mu).sigmas)
    z = latents(models, 1)
    ref = pipe(PROMPTS, latents=z.clone(), num_inference_steps=4, guidance_scale=W, output_type="pt").images
    torch.testing.assert_close(rid.sample(models, PROMPTS, z, steps=4, guidance=W), ref, rtol=1e-5, atol=1e-5)


def test_sd3_decode_uses_the_vae_shift_and_scale(sd3):
    c = sd3.vae.config
    assert (c.scaling_factor, c.shift_factor, c.latent_channels) == (1.5305, 0.0609, 16)
    z = latents(sd3)
    with torch.no_grad():
        want = (sd3.vae.decode(z / 1.5305 + 0.0609).sample / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(sd3.decode(z), want, rtol=0, atol=0)


#### SD3 WITHOUT T5 FROM A DIRECTORY THAT HAS IT (--text-encoder-3 none) ####

@pytest.fixture(scope="module")
def t5_gone(tmp_path_factory):
    """A tiny SD3 saved WITH T5 (model_index.json lists text_encoder_3 and tokenizer_3), then T5's weights and
    its tokenizer's files deleted: loading succeeds only if nothing ever reads them."""
    path = tiny_sd3(tmp_path_factory.mktemp("tiny_sd3_t5_gone"))
    gone = [os.path.join(path, "text_encoder_3", f) for f in os.listdir(os.path.join(path, "text_encoder_3"))
            if f.endswith(".safetensors")] + [os.path.join(path, "tokenizer_3", f)
                                              for f in os.listdir(os.path.join(path, "tokenizer_3"))]
    assert any(f.endswith(".safetensors") for f in gone) and len(gone) > 1
    for f in gone:
        os.remove(f)
    return path


@pytest.mark.parametrize("guidance", [1.0, W])
def test_sd3_text_encoder_3_none_equals_the_pipeline_with_text_encoder_3_none(t5_gone, guidance):
    from diffusers import StableDiffusion3Pipeline

    assert json.load(open(os.path.join(t5_gone, "model_index.json")))["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    with pytest.raises(ValueError, match="could not be loaded"):  # auto reads T5, whose files are gone
        rid.load_models(t5_gone)
    models = rid.load_models(t5_gone, text_encoder_3="none")
    assert models.text_encoder_3 is None and models.tokenizer_3 is None
    pipe = StableDiffusion3Pipeline.from_pretrained(t5_gone, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pe, ne, pp, npp = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=guidance > 1)
    cond = models.conditioning(PROMPTS, guidance)  # [uncond; cond] under CFG
    want = torch.cat([ne, pe]) if guidance > 1 else pe
    assert want.shape == (len(want), 16 + 256, 80)  # 77 → 16 CLIP tokens here, 256 zeros of joint_attention_dim
    assert cond.hidden.shape == (len(want), 16 + 1, 80)  # ... which rid carries as one (RepeatedLastToken)
    assert cond.hidden[:, 16:].abs().max() == 0 and want[:, 16:].abs().max() == 0
    torch.testing.assert_close(cond.hidden, want[:, :17], rtol=0, atol=0)
    torch.testing.assert_close(cond.extra["pooled"], torch.cat([npp, pp]) if guidance > 1 else pp, rtol=1e-6, atol=1e-6)
    z = latents(models, 3)
    ref = pipe(PROMPTS, latents=z.clone(), num_inference_steps=3, guidance_scale=guidance, output_type="latent").images
    with torch.no_grad():
        out = samplers.denoise(models, cond, z, models.sampler(3), range(3), guidance)
    print(f"\n--text-encoder-3 none vs StableDiffusion3Pipeline(text_encoder_3=None), guidance {guidance}: conditioning "
          f"max |diff| {(cond.hidden - want[:, :17]).abs().max():.1e} (pooled "
          f"{(cond.extra['pooled'] - (torch.cat([npp, pp]) if guidance > 1 else pp)).abs().max():.1e}); latents after "
          f"3 steps max |diff| {(out - ref).abs().max():.1e} (|latent| ≤ {ref.abs().max():.1f})")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


#### WITHOUT T5: ITS 256 ZERO TOKENS AS ONE (RepeatedLastToken) ####

@pytest.fixture(scope="module")
def no_t5_path(tmp_path_factory):
    return tiny_sd3(tmp_path_factory.mktemp("tiny_sd3_no_t5"), t5=False)


def test_sd3_without_t5_sets_the_repeated_token_on_the_joint_attention_only(no_t5_path, sd3):
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    models = load_sd3(no_t5_path)
    joint = backbones.sd3.joint_attentions(models.transformer)
    assert len(joint) == len(models.transformer.transformer_blocks) == 2
    assert all(isinstance(a.processor, backbones.sd3.RepeatedLastToken) for a in joint)
    assert all(isinstance(p, JointAttnProcessor2_0) for p in sd3.transformer.attn_processors.values())  # with T5
    literal = dataclasses.replace(models, literal_zero_t5=True)  # the same transformer, diffusers' own attention again
    assert literal.transformer is models.transformer
    assert all(isinstance(p, JointAttnProcessor2_0) for p in literal.transformer.attn_processors.values())
    assert literal.encode(PROMPTS).hidden.shape == (2, 16 + 256, 80)
    fast = dataclasses.replace(literal, literal_zero_t5=False)
    assert all(isinstance(a.processor, backbones.sd3.RepeatedLastToken) for a in joint)
    assert fast.encode(PROMPTS).hidden.shape == (2, 16 + 1, 80)


@pytest.mark.parametrize("guidance", [1.0, W])
def test_sd3_without_t5_one_zero_token_predicts_as_the_pipelines_256(no_t5_path, guidance):
    """rid's prediction (one zero T5 token at logit + log 256) == diffusers' transformer with its own
    JointAttnProcessor2_0 on the pipeline's encode_prompt (16 CLIP + 256 zero tokens), CFG written out; and
    the sampled latents == the pipeline's."""
    models, pipe = load_sd3(no_t5_path), sd3_pipeline(no_t5_path)
    g = gen(7)
    for p in models.transformer.parameters():  # a trained-looking net: the zero-initialised gates open
        torch.nn.init.normal_(p, std=0.1 if p.ndim >= 2 else 0.3, generator=g)
    pipe.transformer.load_state_dict(models.transformer.state_dict())
    z, cond = latents(models, 5), models.conditioning(PROMPTS, guidance)
    with torch.no_grad():
        pe, ne, pp, npp = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=guidance > 1)
        text, pooled = (torch.cat([ne, pe]), torch.cat([npp, pp])) if guidance > 1 else (pe, pp)
        worst = 0.0
        for i in range(3):
            t = models.sampler(3).timestep(i)
            ours = models.predict(z, t, cond, guidance)
            zz = torch.cat([z, z]) if guidance > 1 else z
            out = pipe.transformer(hidden_states=zz, timestep=torch.full((len(zz),), t), encoder_hidden_states=text,
                                   pooled_projections=pooled).sample
            want = out.chunk(2)[0] + guidance * (out.chunk(2)[1] - out.chunk(2)[0]) if guidance > 1 else out
            worst = max(worst, (ours - want).abs().max().item())
            torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
        # the log-multiplicity is what makes it exact: the one token counted once moves the prediction
        for a in backbones.sd3.joint_attentions(models.transformer):
            a.set_processor(backbones.sd3.RepeatedLastToken(1))
        once = models.predict(z, t, cond, guidance)
        for a in backbones.sd3.joint_attentions(models.transformer):
            a.set_processor(backbones.sd3.RepeatedLastToken(256))
        assert (once - want).abs().max() > 100 * max(worst, 1e-7)
        ref = pipe(PROMPTS, latents=z.clone(), num_inference_steps=3, guidance_scale=guidance, output_type="latent").images
        lat = samplers.denoise(models, cond, z.clone(), models.sampler(3), range(3), guidance)
    print(f"\none zero T5 token vs the pipeline's 256, guidance {guidance}: prediction max |diff| {worst:.1e} "
          f"(|v| ≤ {want.abs().max():.1f}; counted once: {(once - want).abs().max():.1e}); latents after 3 steps "
          f"{(lat - ref).abs().max():.1e} (|latent| ≤ {ref.abs().max():.1f})")
    torch.testing.assert_close(lat, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["rid", "baseline", "r0"])
def test_sd3_without_t5_gradient_into_the_adapter_group_equals_the_256_tokens(no_t5_path, method):
    """The same adapter group, the same loss: one zero token (RepeatedLastToken calling the LoRA-wrapped
    to_q/k/v, add_*_proj, to_out.0, to_add_out) and the 256 literal zeros (diffusers' JointAttnProcessor2_0)."""
    fast = load_sd3(no_t5_path)
    group = sd3_adapters(fast, teacher_std=0.5)
    assert isinstance(backbones.sd3.joint_attentions(fast.transformer)[0].to_q, rid.LoRALinear)
    z = latents(fast, 6)
    cfg = rid.StepConfig(method=method, steps=3, guidance=W, lam=0.7)
    runs = []
    for literal in (False, True):  # replace() sets the shared transformer's processors: fast first, then literal
        models = dataclasses.replace(fast, literal_zero_t5=literal)
        loss, _ = rid.method_loss(models, group, toy_reward, PROMPTS, z, cfg, gen(4))
        runs.append((loss.detach(), _grad(loss, group)))
    (loss, grad), (want, want_grad) = runs
    assert want_grad.abs().max() > 0
    print(f"\n{method} without T5, one token vs 256: loss {loss.item():.6f} vs {want.item():.6f}; adapter gradient "
          f"max |diff| {(grad - want_grad).abs().max():.1e} (max |grad| {want_grad.abs().max():.1e})")
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-4 * want_grad.abs().max().item())


@pytest.mark.parametrize("method", rid.METHODS)
def test_every_method_steps_on_sd3_without_t5(no_t5_path, method):
    one_step_moves_the_adapters(load_sd3(no_t5_path), method)


def test_sd3_text_encoder_3_none_on_a_directory_without_t5_is_what_it_loads_today(tmp_path):
    path = tiny_sd3(tmp_path, t5=False)
    today, none = rid.load_models(path), rid.load_models(path, text_encoder_3="none")
    assert today.text_encoder_3 is None and none.text_encoder_3 is None
    assert torch.equal(today.conditioning(PROMPTS, W).hidden, none.conditioning(PROMPTS, W).hidden)


def test_text_encoder_3_is_refused_for_other_models_and_values(flux_path, sd3_path, tmp_path, capsys):
    import train
    from tiny import write_prompts

    with pytest.raises(ValueError, match=r"^text_encoder_3 'none' is not allowed for model=.*, a FluxPipeline; "
                                         r"allowed: auto \(only a StableDiffusion3Pipeline has a text_encoder_3"):
        rid.load_models(flux_path, text_encoder_3="none")
    with pytest.raises(ValueError, match=r"^text_encoder_3 'off' is not allowed; allowed: auto, none$"):
        rid.load_models(sd3_path, text_encoder_3="off")
    out = tmp_path / "out"
    assert train.main(["--model", flux_path, "--prompts", write_prompts(tmp_path / "p.txt"), "--text-encoder-3", "none",
                       "--device", "cpu", "--out", str(out)]) == 2  # before any weight is read, nothing written
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.py: error: --text-encoder-3 'none' is not allowed for model=") and "FluxPipeline" in err
    assert len(err.splitlines()) == 1 and not (out / "run.json").exists()


def test_train_and_eval_without_t5_store_it_in_the_run(t5_gone, tmp_path, capsys):
    """train.py --text-encoder-3 none on the SD3 whose T5 files are gone: one rid step on compress, the setting
    in run.json, --resume holding to it, a run.json from before the setting read as auto, eval.py following the run."""
    import config
    import eval as ev
    import train
    from test_rewards import tiny_spec
    from tiny import write_prompts

    (tmp_path / "spec").mkdir()
    tiny_spec(tmp_path / "spec")
    out = tmp_path / "run"
    args = ["--model", t5_gone, "--prompts", write_prompts(tmp_path / "prompts.txt"), "--reward-spec",
            str(tmp_path / "spec" / "rewards.json"), "--tasks", "compress", "--steps", "2", "--guidance", "3",
            "--batch", "2", "--micro-batch", "1", "--max-steps", "1", "--lr", "1e-2", "--resolution", "16",
            "--device", "cpu"]
    assert train.main(args + ["--out", str(out), "--text-encoder-3", "none"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["text_encoder_3"] == "none" and run["stages"] == ["stage1-compress"]
    assert (out / "stage1-compress" / "pytorch_lora_weights.safetensors").is_file()
    capsys.readouterr()
    assert train.main(args + ["--out", str(out), "--resume"]) == 2  # auto is another setting: refused up front
    assert "text_encoder_3: was 'none', now 'auto'" in capsys.readouterr().err
    assert train.main(args + ["--out", str(out), "--resume", "--text-encoder-3", "none"]) == 0

    # a run.json written before the setting existed resumes with its default (auto: what it loaded then)
    old = tmp_path / "old"
    shutil.copytree(out, old)
    info = json.loads((old / "run.json").read_text())
    del info["config"]["text_encoder_3"]
    (old / "run.json").write_text(json.dumps(info))
    cfg, _ = config.resolve(config.build_parser().parse_args(args + ["--out", str(old), "--resume"]))
    assert train.open_run(cfg, resume=True)[0]["config"]["text_encoder_3"] == "auto" == cfg.text_encoder_3

    # eval.py samples the run as it was trained (no T5; its files are gone), and --text-encoder-3 overrides it
    flags = ["--ckpt", str(out), "--images-per-prompt", "1", "--batch", "2", "--max-prompts", "2",
             "--fid-features", "clip", "--device", "cpu", "--dtype", "fp32"]
    assert ev.main(flags) == 0
    cached = [json.loads(p.read_text()) for p in (out / "eval").glob("*.json")]
    assert len(cached) == 2 and all(c["config"]["text_encoder_3"] == "none" for c in cached)  # base and stage 1
    capsys.readouterr()
    assert ev.main(flags + ["--text-encoder-3", "auto"]) == 2  # with T5: reads text_encoder_3, whose weights are gone
    err = capsys.readouterr().err.strip()
    assert "could not be loaded" in err and len(err.splitlines()) == 1


#### EVERY METHOD ON SD3 ####

class Hand:
    """The oracle: the pipeline's encode_prompt, diffusers' FlowMatchEulerDiscreteScheduler, the transformer
    called directly with CFG written out, the VAE decode written out (SD3's shift and scale)."""

    def __init__(self, models, pipe, steps, w):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.models, self.w = models, w
        with torch.no_grad():
            pe, ne, pp, npp = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True)
        self.text, self.pooled = torch.cat([ne, pe]), torch.cat([npp, pp])
        self.sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self.sched.set_timesteps(steps)

    def v(self, z, i):
        t = self.sched.timesteps[i].expand(2 * len(z))
        out = self.models.transformer(hidden_states=torch.cat([z, z]), timestep=t, encoder_hidden_states=self.text,
                                      pooled_projections=self.pooled).sample
        u, c = out.chunk(2)
        return u + self.w * (c - u)

    def step(self, i, z):  # Euler: z + (σ_{i+1} − σ_i) v
        return z + (self.sched.sigmas[i + 1] - self.sched.sigmas[i]) * self.v(z, i)

    def unrolled(self, z, K):
        """All steps, gradient only through the last K."""
        n = len(self.sched.timesteps)
        with torch.no_grad():
            for i in range(n - K):
                z = self.step(i, z)
        for i in range(n - K, n):
            z = self.step(i, z)
        return z

    def decode(self, z):
        vae = self.models.vae
        return (vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample / 2 + 0.5).clamp(0, 1)


def sd3_adapters(models, teacher_std=None):
    group = rid.inject(models.denoiser, rank=2)
    group.add_task("a", generator=gen(0))
    with torch.no_grad():
        group.flat.normal_(0, 0.2, generator=gen(1))
        group.ema.copy_(group.flat if teacher_std is None else group.flat + teacher_std * torch.randn(
            group.flat.shape, generator=gen(2)))
    return group


@pytest.fixture
def fresh_sd3(sd3_path):
    return load_sd3(sd3_path)


def test_sd3_lora_targets_are_diffusers_sd3_scripts(fresh_sd3):
    group = rid.inject(fresh_sd3.denoiser)
    assert {n.split(".", 2)[-1] for n in group.layers} == set(backbones.sd3.LORA_TARGETS)  # transformer_blocks.i.…
    assert "transformer_blocks.0.attn.add_q_proj" in group.layers and "transformer_blocks.0.attn.to_add_out" in group.layers
    assert "transformer_blocks.1.attn.to_add_out" not in group.layers  # the last block is context_pre_only


def _grad(loss, group):
    return torch.autograd.grad(loss, group.flat)[0]


@pytest.mark.parametrize("space", ["pixel", "latent"])
def test_sd3_rid_loss_and_gradient_equal_the_hand_unrolled_loop(fresh_sd3, sd3_path, space):
    models, steps, lam = fresh_sd3, 3, 0.7
    group = sd3_adapters(models, teacher_std=1.0)
    hand, z = Hand(models, sd3_pipeline(sd3_path), steps, W), latents(models)
    with torch.no_grad():
        z1 = z
        for i in range(steps - 1):
            z1 = hand.step(i, z1)
        student = group.flat.detach().clone()
        group.flat.copy_(group.ema)
        x_t = hand.step(steps - 1, z1)
        group.flat.copy_(student)
    x_s = hand.step(steps - 1, z1)  # the Euler step to σ = 0 is x̂₀ = z₁ − σ₁v
    img_s = hand.decode(x_s)
    reward = toy_reward(img_s, PROMPTS).mean()
    a, b = (img_s, hand.decode(x_t).detach()) if space == "pixel" else (x_s, x_t)
    distill = (a - b).pow(2).flatten(1).sum(1).mean()
    want = -reward + lam * distill
    want_grad = _grad(want, group)

    cfg = rid.StepConfig(method="rid", steps=steps, guidance=W, lam=lam, distill_space=space)
    loss, logs = rid.method_loss(models, group, toy_reward, PROMPTS, z, cfg)
    assert logs["distill"] == pytest.approx(distill.item(), rel=1e-4) and distill.item() > 1e-6
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(_grad(loss, group), want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method,K", [("baseline", 1), ("draft-k", 2), ("draft", 3)])
def test_sd3_truncated_gradient_equals_the_hand_unrolled_loop(fresh_sd3, sd3_path, method, K):
    models = fresh_sd3
    group = sd3_adapters(models)
    hand, z = Hand(models, sd3_pipeline(sd3_path), 3, W), latents(models)
    want = -toy_reward(hand.decode(hand.unrolled(z, K)), PROMPTS).mean()
    want_grad = _grad(want, group)
    cfg = rid.StepConfig(method=method, steps=3, guidance=W, truncate=2)
    loss, _ = rid.method_loss(models, group, toy_reward, PROMPTS, z, cfg)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(_grad(loss, group), want_grad, rtol=1e-4, atol=1e-6)


def test_sd3_draft_lv_renoises_along_the_flow(fresh_sd3, sd3_path):
    """draft-lv: x̂₀, then n copies z₁ = (1 − σ₁)x̂₀ + σ₁ε_i (ε_i in order from the generator) stepped again."""
    models, steps, n = fresh_sd3, 3, 2
    group = sd3_adapters(models)
    hand, z = Hand(models, sd3_pipeline(sd3_path), steps, W), latents(models)
    x0 = hand.unrolled(z, 1)
    g, s1 = gen(5), hand.sched.sigmas[steps - 1]
    rewards = [toy_reward(hand.decode(x0), PROMPTS).mean()]
    for _ in range(n):
        eps = torch.randn(x0.shape, generator=g)
        rewards.append(toy_reward(hand.decode(hand.step(steps - 1, (1 - s1) * x0.detach() + s1 * eps)), PROMPTS).mean())
    want = -torch.stack(rewards).mean()
    want_grad = _grad(want, group)
    cfg = rid.StepConfig(method="draft-lv", steps=steps, guidance=W, lv_n=n)
    loss, _ = rid.method_loss(models, group, toy_reward, PROMPTS, z, cfg, gen(5))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(_grad(loss, group), want_grad, rtol=1e-4, atol=1e-6)


def test_sd3_refl_predicts_x0_at_a_random_sigma_among_the_last_m(fresh_sd3, sd3_path):
    models, steps = fresh_sd3, 4
    group = sd3_adapters(models)
    hand, z = Hand(models, sd3_pipeline(sd3_path), steps, W), latents(models)
    cfg = rid.StepConfig(method="refl", steps=steps, guidance=W, refl_m=50)  # m = 4: any step
    m = min(steps, max(1, round(cfg.refl_m * steps / 50)))
    j = int(torch.randint(1, m + 1, (), generator=gen(3)))
    i = steps - j
    with torch.no_grad():
        for k in range(i):
            z = hand.step(k, z)
    x0 = z - hand.sched.sigmas[i] * hand.v(z, i)
    want = -toy_reward(hand.decode(x0), PROMPTS).mean()
    want_grad = _grad(want, group)
    loss, logs = rid.method_loss(models, group, toy_reward, PROMPTS, latents(models), cfg, gen(3))
    assert logs["t"] == pytest.approx(float(hand.sched.timesteps[i]))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(_grad(loss, group), want_grad, rtol=1e-4, atol=1e-6)


def one_step_moves_the_adapters(models, method):
    """One train_step of `method` on a fresh task: finite logs, the adapters moved."""
    group = rid.inject(models.denoiser)
    group.add_task("t", generator=gen(0))
    before = group.flat.detach().clone()
    opt = torch.optim.AdamW(group.parameters(), lr=1e-2)
    cfg = rid.StepConfig(method=method, steps=3, guidance=W, truncate=2)
    logs = rid.train_step(models, group, toy_reward, [(PROMPTS, latents(models))], opt, cfg, generator=gen(0))
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values()), logs
    assert not torch.equal(group.flat.detach(), before)


@pytest.mark.parametrize("method", rid.METHODS)
def test_every_method_steps_on_sd3(fresh_sd3, method):
    one_step_moves_the_adapters(fresh_sd3, method)


def test_sd3_r0_draws_a_random_eta_per_step(fresh_sd3):
    """r0 on the flow: the η's come from the generator (η > 0 adds noise), η = 0 is deterministic Euler."""
    models = fresh_sd3
    group = sd3_adapters(models)
    z = latents(models)

    def loss(eta_range, seed):
        cfg = rid.StepConfig(method="r0", steps=3, guidance=W, eta_range=eta_range)
        with torch.no_grad():
            return rid.method_loss(models, group, toy_reward, PROMPTS, z, cfg, gen(seed))[0].item()

    assert loss((0.0, 0.0), 1) == loss((0.0, 0.0), 2)  # deterministic: the generator is not read for noise
    assert loss((0.5, 1.0), 1) != loss((0.5, 1.0), 2)
    assert loss((0.5, 1.0), 1) == loss((0.5, 1.0), 1)


#### LORA EXPORT ####

def test_sd3_lora_keys_load_in_diffusers(tmp_path, sd3_path):
    from safetensors.torch import save_file

    models = load_sd3(sd3_path)
    group = rid.inject(models.denoiser)
    for task in ("a", "b"):
        group.add_task(task, generator=gen(len(task)))
        with torch.no_grad():
            group.flat.normal_(0, 0.05, generator=gen(3))
    group.set_scale(0, 0.5)
    per_task = [group.task_tensors(i) for i in range(len(group.tasks))]
    tensors = {}
    for name in group.layers:
        a_key, b_key = models.lora_keys(name)
        assert a_key.startswith("transformer.transformer_blocks.")
        tensors[a_key] = torch.cat([t[name][0] for t in per_task]).float().contiguous()
        tensors[b_key] = torch.cat([s * t[name][1] for s, t in zip(group.scales, per_task)], 1).float().contiguous()
    save_file(tensors, str(tmp_path / "lora.safetensors"))
    pipe = sd3_pipeline(sd3_path)
    pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    z, cond = latents(models), models.conditioning(PROMPTS, 1.0)
    t = models.sampler(3).timestep(1)
    with torch.no_grad():
        ours = models.predict(z, t, cond, 1.0)
        theirs = dataclasses.replace(models, transformer=pipe.transformer).predict(z, t, cond, 1.0)
        base = dataclasses.replace(models, transformer=sd3_pipeline(sd3_path).transformer).predict(z, t, cond, 1.0)
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


#### LASRO'S ENCODER ON AN MMDIT ####

def test_lasro_encoder_on_sd3_reads_the_first_half_of_the_joint_blocks(sd3):
    enc = backbones.surrogate_encoder(sd3.transformer)
    n = len(sd3.transformer.transformer_blocks)
    assert len(enc["joint_blocks"]) == (n + 1) // 2 and enc["joint_blocks"][0] is sd3.transformer.transformer_blocks[0]
    emb, z = sd3.encode(PROMPTS), latents(sd3)
    with torch.no_grad():
        f = backbones.encoder_features(enc, z, emb)
        assert [x.shape[1] for x in f] == backbones.encoder_widths(enc) and all(torch.isfinite(x).all() for x in f)
        moved = backbones.Cond(emb.hidden, pooled=emb.extra["pooled"] * 2)
        assert not torch.allclose(backbones.encoder_features(enc, z, moved)[0], f[0])  # pooled text reaches it
        moved = backbones.Cond(emb.hidden * 2, pooled=emb.extra["pooled"])
        assert not torch.allclose(backbones.encoder_features(enc, z, moved)[0], f[0])  # and the text tokens
        torch.testing.assert_close(backbones.encoder_features(enc, z[[1, 0]], emb[[1, 0]])[0], f[0][[1, 0]])


#### FLUX.1 (tiny, tests/tiny.py) ####

import backbones.flux  # noqa: E402
from tiny import tiny_flux  # noqa: E402

G = 3.5  # FLUX-dev's default guidance


def load_flux(path):
    """A FluxPipeline directory through the registry, as train.py and eval.py load it, at 16 px."""
    models = rid.load_models(str(path))
    assert isinstance(models, backbones.flux.Flux)
    models.set_resolution(16)
    return models


def flux_pipeline(path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux_path(tmp_path_factory):
    return tiny_flux(tmp_path_factory.mktemp("tiny_flux"))


@pytest.fixture
def flux(flux_path):
    return load_flux(flux_path)


def test_flux_packing_round_trip_is_the_pipelines():
    from diffusers import FluxPipeline

    z = torch.randn(2, 16, 6, 10, generator=gen(0))
    packed = backbones.flux.pack(z)
    assert packed.shape == (2, 15, 64)
    assert torch.equal(packed, FluxPipeline._pack_latents(z, 2, 16, 6, 10))
    assert torch.equal(backbones.flux.unpack(packed, 6, 10), z)
    assert torch.equal(backbones.flux.unpack(packed, 6, 10), FluxPipeline._unpack_latents(packed, 12, 20, 2))
    assert torch.equal(backbones.flux.image_ids(6, 10), FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))


def test_flux_conditioning_equals_the_pipelines_encode_prompt(flux, flux_path):
    with torch.no_grad():
        pe, pp, text_ids = flux_pipeline(flux_path).encode_prompt(PROMPTS, None)
    cond = flux.conditioning(PROMPTS, G)  # no CFG batch
    assert cond.hidden.shape == (2, 512, 32) and cond.extra["pooled"].shape == (2, 32)
    torch.testing.assert_close(cond.hidden, pe, rtol=0, atol=0)
    torch.testing.assert_close(cond.extra["pooled"], pp, rtol=0, atol=0)
    assert text_ids.abs().max() == 0 and text_ids.shape == (512, 3)


@pytest.mark.parametrize("dev", [True, False], ids=["dev-guidance-embedding", "schnell"])
def test_flux_sample_equals_the_pipeline(tmp_path, flux_path, dev):
    path = flux_path if dev else tiny_flux(tmp_path, dev=False)
    models, pipe = load_flux(path), flux_pipeline(path)
    z = latents(models)
    assert z.shape == (2, 16, 64)  # packed: (8/2)·(8/2) tokens of 4·16 channels
    steps = 3 if dev else 2
    ref = pipe(PROMPTS, latents=z.clone(), num_inference_steps=steps, guidance_scale=G, height=16, width=16,
               output_type="pt").images
    out = rid.sample(models, PROMPTS, z, steps=steps, guidance=G)
    assert out.shape == ref.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    other = rid.sample(models, PROMPTS, z, steps=steps, guidance=1.0)
    assert (not torch.allclose(other, ref, atol=1e-4)) == dev  # dev reads w as an embedding; schnell ignores it


class FluxHand:
    """The oracle: the pipeline's encode_prompt, its scheduler set as FluxPipeline sets it (sigmas, μ), the
    transformer called directly (t/1000, guidance w, ids), Euler written out, the pipeline's unpack + VAE."""

    def __init__(self, models, pipe, steps, w):
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        self.models, self.pipe = models, pipe
        with torch.no_grad():
            self.text, self.pooled, self.text_ids = pipe.encode_prompt(PROMPTS, None)
        self.sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self.sched.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(16))
        self.w, self.img_ids = w, pipe._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)

    def step(self, i, z):
        t = self.sched.timesteps[i].expand(len(z))
        v = self.models.transformer(hidden_states=z, timestep=t / 1000, guidance=torch.full([len(z)], self.w),
                                    pooled_projections=self.pooled, encoder_hidden_states=self.text,
                                    txt_ids=self.text_ids, img_ids=self.img_ids).sample
        return z + (self.sched.sigmas[i + 1] - self.sched.sigmas[i]) * v

    def decode(self, z):
        vae = self.models.vae
        z = self.pipe._unpack_latents(z, 16, 16, 2) / vae.config.scaling_factor + vae.config.shift_factor
        return (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)


def test_flux_rid_and_baseline_gradients_equal_the_hand_unrolled_loop(flux, flux_path):
    models, steps, lam = flux, 3, 0.7
    group = sd3_adapters(models, teacher_std=1.0)
    hand, z = FluxHand(models, flux_pipeline(flux_path), steps, G), latents(models)
    with torch.no_grad():
        z1 = z
        for i in range(steps - 1):
            z1 = hand.step(i, z1)
        student = group.flat.detach().clone()
        group.flat.copy_(group.ema)
        img_t = hand.decode(hand.step(steps - 1, z1))
        group.flat.copy_(student)
    img_s = hand.decode(hand.step(steps - 1, z1))
    reward = toy_reward(img_s, PROMPTS).mean()
    want_base = -reward
    want_rid = -reward + lam * (img_s - img_t).pow(2).flatten(1).sum(1).mean()
    want_rid_grad = torch.autograd.grad(want_rid, group.flat, retain_graph=True)[0]
    want_base_grad = torch.autograd.grad(want_base, group.flat)[0]
    assert (want_rid_grad - want_base_grad).abs().max() > 1e-6  # the distillation term matters
    for method, want, want_grad in (("rid", want_rid, want_rid_grad), ("baseline", want_base, want_base_grad)):
        cfg = rid.StepConfig(method=method, steps=steps, guidance=G, lam=lam)
        loss, _ = rid.method_loss(models, group, toy_reward, PROMPTS, z, cfg)
        assert loss.item() == pytest.approx(want.item(), rel=1e-5), method
        torch.testing.assert_close(_grad(loss, group), want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", rid.METHODS)
def test_every_method_steps_on_flux(flux, method):
    group = rid.inject(flux.denoiser)
    group.add_task("t", generator=gen(0))
    before = group.flat.detach().clone()
    opt = torch.optim.AdamW(group.parameters(), lr=1e-2)
    cfg = rid.StepConfig(method=method, steps=3, guidance=G, truncate=2)
    logs = rid.train_step(flux, group, toy_reward, [(PROMPTS, latents(flux))], opt, cfg, generator=gen(0))
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values()), logs
    assert not torch.equal(group.flat.detach(), before)


def test_flux_lora_targets_and_keys_load_in_diffusers(tmp_path, flux, flux_path):
    from safetensors.torch import save_file

    group = rid.inject(flux.denoiser)
    assert {n.split(".", 2)[-1] for n in group.layers if n.startswith("transformer_blocks.")} == set(
        backbones.flux.LORA_TARGETS)
    assert {n.split(".", 2)[-1] for n in group.layers if n.startswith("single_")} == {"attn.to_q", "attn.to_k", "attn.to_v"}
    group.add_task("a", generator=gen(1))
    with torch.no_grad():
        group.flat.normal_(0, 0.05, generator=gen(3))
    tensors = {}
    for name in group.layers:
        a_key, b_key = flux.lora_keys(name)
        A, B = group.task_tensors(0)[name]
        tensors[a_key], tensors[b_key] = A.float().contiguous(), (group.scales[0] * B).float().contiguous()
    save_file(tensors, str(tmp_path / "lora.safetensors"))
    pipe = flux_pipeline(flux_path)
    pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    z, cond = latents(flux), flux.conditioning(PROMPTS, G)
    t = flux.sampler(3).timestep(1)
    with torch.no_grad():
        ours = flux.predict(z, t, cond, G)
        theirs = dataclasses.replace(flux, transformer=pipe.transformer).predict(z, t, cond, G)
        base = dataclasses.replace(flux, transformer=flux_pipeline(flux_path).transformer).predict(z, t, cond, G)
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_lasro_encoder_on_flux_reads_packed_latents_and_text(flux):
    enc = backbones.surrogate_encoder(flux.transformer)
    emb, z = flux.encode(PROMPTS), latents(flux)
    with torch.no_grad():
        f = backbones.encoder_features(enc, z, emb)
        assert [x.shape[1] for x in f] == backbones.encoder_widths(enc) and all(torch.isfinite(x).all() for x in f)
        moved = backbones.Cond(emb.hidden * 2, pooled=emb.extra["pooled"])
        assert not torch.allclose(backbones.encoder_features(enc, z, moved)[0], f[0])
        torch.testing.assert_close(backbones.encoder_features(enc, z[[1, 0]], emb[[1, 0]])[0], f[0][[1, 0]])


def test_sd3_r0_gradient_through_eta_steps_equals_the_hand_unrolled_loop(fresh_sd3, sd3_path):
    """r0 at a fixed η = 0.5: every step is the η analogue written out here on the scheduler's σ's
    (x' = (1−σ')x̂₀ + √(σ'² − c²)ε̂ + c·noise, c = η(σ'/σ)√(σ² − ((1−σ)σ'/(1−σ'))²)), its noise drawn from the
    generator after the K η's, the last step x̂₀; loss gradient = −(normalised ∇R)·img/B + λ_w‖θ − θ₀‖²'s."""
    models, K, eta, lam_w = fresh_sd3, 3, 0.5, 0.3
    group = sd3_adapters(models, teacher_std=0.1)
    hand, z0 = Hand(models, sd3_pipeline(sd3_path), K, W), latents(models)
    g = gen(4)
    torch.rand(K, generator=g, dtype=torch.float64)  # r0 draws its K η's first
    z = z0
    for i in range(K):
        s, s_next = float(hand.sched.sigmas[i]), float(hand.sched.sigmas[i + 1])
        v = hand.v(z, i)
        if s_next == 0:
            z = z - s * v
            continue
        c = eta * s_next / s * (s ** 2 - ((1 - s) * s_next / (1 - s_next)) ** 2) ** 0.5
        noise = torch.randn(z.shape, generator=g)
        z = (1 - s_next) * (z - s * v) + (s_next ** 2 - c ** 2) ** 0.5 * (z + (1 - s) * v) + c * noise
    img = hand.decode(z)
    x = img.detach().requires_grad_(True)
    (d,) = torch.autograd.grad(toy_reward(x, PROMPTS).sum(), x)
    d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    want = -(d * img).flatten(1).sum(1).mean() + lam_w * (group.flat - group.ema).pow(2).sum()
    want_grad = _grad(want, group)
    cfg = rid.StepConfig(method="r0", steps=K, guidance=W, eta_range=(eta, eta), lam_w=lam_w)
    loss, logs = rid.method_loss(models, group, toy_reward, PROMPTS, z0, cfg, gen(4))
    assert logs["reward"] == pytest.approx(toy_reward(img, PROMPTS).mean().item(), rel=1e-5)
    torch.testing.assert_close(_grad(loss, group), want_grad, rtol=1e-4, atol=1e-6)
