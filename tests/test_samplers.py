"""samplers.py against diffusers' own schedulers, step by step on the same inputs.

Oracle: DDIMScheduler / LCMScheduler built with `from_config` from the same config dict, stepped with
the same model outputs (random tensors standing in for a UNet's), the same z and, where a step takes
fresh noise, the same noise (η-DDIM: variance_noise; LCM: a generator seeded alike, drawn as diffusers
draws it). Configs: SD-1.5's DDIM (leading, offset 1), SDXL-Turbo's trailing spacing, linspace, the three
prediction types, clip_sample, SDXL's EulerDiscreteScheduler config read as DDIM, LCM-SSD-1B's LCM."""
import pytest
import torch

import samplers

SD15 = samplers.SD15_SCHEDULER
# SDXL base ships this (EulerDiscreteScheduler); rid reads it as DDIMScheduler.from_config would.
SDXL_EULER = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
              "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
              "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
              "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
TURBO = {**SDXL_EULER, "_class_name": "EulerAncestralDiscreteScheduler", "timestep_spacing": "trailing",
         "steps_offset": 0}
LCM_SSD1B = {"_class_name": "LCMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "clip_sample": False, "clip_sample_range": 1.0, "num_train_timesteps": 1000,
             "original_inference_steps": 50, "prediction_type": "epsilon", "set_alpha_to_one": True,
             "steps_offset": 1, "timestep_scaling": 10.0, "timestep_spacing": "leading"}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def diffusers_ddim(config, steps):
    from diffusers import DDIMScheduler

    s = DDIMScheduler.from_config(config)
    s.set_timesteps(steps)
    return s


CONFIGS = {
    "sd15": SD15,
    "sdxl-euler-config": SDXL_EULER,
    "turbo-trailing": TURBO,
    "linspace-v": {**SD15, "timestep_spacing": "linspace", "prediction_type": "v_prediction"},
    "sample-pred-clipped": {**SD15, "prediction_type": "sample", "clip_sample": True, "clip_sample_range": 1.5},
    "linear-betas-alpha-one": {"num_train_timesteps": 1000, "beta_schedule": "linear", "set_alpha_to_one": True,
                               "clip_sample": False, "timestep_spacing": "trailing"},
    "cosine-betas": {**SD15, "beta_schedule": "squaredcos_cap_v2"},
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 50])
def test_ddim_timesteps_and_alphas_equal_diffusers(name, steps):
    sched, ours = diffusers_ddim(CONFIGS[name], steps), samplers.DDIM(steps, CONFIGS[name])
    assert ours.timesteps.tolist() == sched.timesteps.tolist()
    assert ours.timesteps.dtype == torch.int64
    assert torch.equal(ours.alphas_cumprod, sched.alphas_cumprod)
    assert torch.equal(torch.as_tensor(ours.final_alpha), torch.as_tensor(sched.final_alpha_cumprod))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("steps", [1, 4, 7])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_step_equals_diffusers_step_by_step(name, steps, eta):
    sched, ours = diffusers_ddim(CONFIGS[name], steps), samplers.DDIM(steps, CONFIGS[name])
    g = gen(steps)
    z = torch.randn(2, 4, 6, 5, generator=g)  # awkward latent size
    for t in sched.timesteps:
        pred, noise = torch.randn(z.shape, generator=g), torch.randn(z.shape, generator=g)
        out = sched.step(pred, t, z, eta=eta, variance_noise=noise if eta else None)
        assert ours.needs_noise(int(t), eta) == (eta > 0)
        torch.testing.assert_close(ours.step(pred, int(t), z, eta, noise), out.prev_sample, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.x0(pred, int(t), z), out.pred_original_sample, rtol=1e-5, atol=1e-6)
        z = out.prev_sample


def test_sd15_ddim_is_the_default_and_its_step_keeps_the_old_formula_bit_for_bit():
    ours = samplers.DDIM(50)
    assert ours.timesteps[0] == 981 and ours.timesteps[-1] == 1
    g = gen(0)
    z, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t in ours.timesteps.tolist():
        a_t, a_prev = ours.alpha(t), ours.alpha(t - ours.ratio)
        before = a_prev ** 0.5 * ((z - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5) + (1 - a_prev) ** 0.5 * eps
        assert torch.equal(ours.step(eps, t, z), before)


def test_turbo_timesteps_are_the_trailing_ones():
    assert samplers.DDIM(1, TURBO).timesteps.tolist() == [999]
    assert samplers.DDIM(4, TURBO).timesteps.tolist() == [999, 749, 499, 249]


def diffusers_lcm(config, steps):
    from diffusers import LCMScheduler

    s = LCMScheduler.from_config(config)
    s.set_timesteps(steps)
    return s


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 50])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_lcm_equals_diffusers_step_by_step(steps, prediction):
    config = {**LCM_SSD1B, "prediction_type": prediction}
    sched, ours = diffusers_lcm(config, steps), samplers.LCM(steps, config)
    assert ours.timesteps.tolist() == sched.timesteps.tolist()
    assert torch.equal(ours.alphas_cumprod, sched.alphas_cumprod)
    g = gen(steps)
    z = torch.randn(2, 4, 6, 5, generator=g)
    g_theirs, g_ours = gen(100 + steps), gen(100 + steps)
    for t in sched.timesteps:
        pred = torch.randn(z.shape, generator=g)
        out = sched.step(pred, t, z, generator=g_theirs)
        noise = torch.randn(z.shape, generator=g_ours) if ours.needs_noise(int(t), 0.0) else None
        torch.testing.assert_close(ours.step(pred, int(t), z, 0.0, noise), out.prev_sample, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.x0(pred, int(t), z), out.denoised, rtol=1e-5, atol=1e-6)
        z = out.prev_sample
    assert torch.equal(g_ours.get_state(), g_theirs.get_state())  # the same number of draws


def test_build_follows_the_config_and_the_choice():
    assert type(samplers.build(LCM_SSD1B, 4)) is samplers.LCM
    assert type(samplers.build(SDXL_EULER, 4)) is samplers.DDIM
    assert type(samplers.build(LCM_SSD1B, 4, "ddim")) is samplers.DDIM
    assert type(samplers.build(SD15, 4, "lcm")) is samplers.LCM


@pytest.mark.parametrize("call,words", [
    (lambda: samplers.build(SD15, 4, "euler"), "sampler 'euler' is not allowed; allowed: auto"),
    (lambda: samplers.DDIM(0, SD15), "steps 0 is not allowed; allowed: an integer in [1, 1000]"),
    (lambda: samplers.LCM(51, LCM_SSD1B), "steps 51 is not allowed with the LCM sampler"),
    (lambda: samplers.DDIM(4, {**SD15, "prediction_type": "flow"}), "prediction_type 'flow' is not allowed"),
    (lambda: samplers.DDIM(4, {**SD15, "timestep_spacing": "karras"}), "timestep_spacing 'karras' is not allowed"),
    (lambda: samplers.DDIM(4, {**SD15, "thresholding": True}), "thresholding True is not allowed"),
    (lambda: samplers.DDIM(4, {**SD15, "beta_schedule": "sigmoid"}), "beta_schedule 'sigmoid' is not allowed"),
])
def test_errors_name_the_value_and_what_is_allowed(call, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        call()
