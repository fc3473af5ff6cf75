"""samplers.py against diffusers' own schedulers, step by step on the same inputs.

Oracle: DDIMScheduler / LCMScheduler built with `from_config` from the same config dict, stepped with
the same model outputs (random tensors standing in for a UNet's), the same z and, where a step takes
fresh noise, the same noise (η-DDIM: variance_noise; LCM: a generator seeded alike, drawn as diffusers
draws it). Configs: SD-1.5's DDIM (leading, offset 1), SDXL-Turbo's trailing spacing, linspace, the three
prediction types, clip_sample, SDXL's EulerDiscreteScheduler config read as DDIM, LCM-SSD-1B's LCM.
Euler: EulerDiscreteScheduler from the same config (SDXL base's and variants: trailing, linspace, v and x₀
prediction, Karras / exponential σ's, log-linear interpolation, final σ_min, SD-1.5's DDIM config), its
timesteps and σ's bit for bit, each step on the scaled latent rid holds, the whole loop on a toy denoiser,
η = 1 against EulerAncestralDiscreteScheduler; the max |diff| of each is printed (pytest -s)."""
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
    assert type(samplers.build(SDXL_EULER, 4)) is samplers.Euler
    assert type(samplers.build(SDXL_EULER, 4, "ddim")) is samplers.DDIM  # --sampler ddim keeps DDIM
    assert type(samplers.build(TURBO, 4)) is samplers.DDIM  # Euler ancestral, PNDM, …: DDIM as before
    assert type(samplers.build({**SD15, "_class_name": "PNDMScheduler"}, 4)) is samplers.DDIM
    assert type(samplers.build(SD15, 4, "euler")) is samplers.Euler
    assert type(samplers.build(LCM_SSD1B, 4, "ddim")) is samplers.DDIM
    assert type(samplers.build(SD15, 4, "lcm")) is samplers.LCM


@pytest.mark.parametrize("call,words", [
    (lambda: samplers.build(SD15, 4, "heun"), "sampler 'heun' is not allowed; allowed: auto"),
    (lambda: samplers.DDIM(0, SD15), "steps 0 is not allowed; allowed: an integer in [1, 1000]"),
    (lambda: samplers.LCM(51, LCM_SSD1B), "steps 51 is not allowed with the LCM sampler"),
    (lambda: samplers.DDIM(4, {**SD15, "prediction_type": "flow"}), "prediction_type 'flow' is not allowed"),
    (lambda: samplers.DDIM(4, {**SD15, "timestep_spacing": "karras"}), "timestep_spacing 'karras' is not allowed"),
    (lambda: samplers.DDIM(4, {**SD15, "thresholding": True}), "thresholding True is not allowed"),
    (lambda: samplers.DDIM(4, {**SD15, "beta_schedule": "sigmoid"}), "beta_schedule 'sigmoid' is not allowed"),
    (lambda: samplers.Euler(4, {**SDXL_EULER, "use_beta_sigmas": True}), "use_beta_sigmas True is not allowed"),
    (lambda: samplers.Euler(4, {**SDXL_EULER, "timestep_type": "continuous"}), "timestep_type 'continuous' is not"),
    (lambda: samplers.Euler(4, {**SDXL_EULER, "interpolation_type": "cubic"}), "interpolation_type 'cubic' is not"),
    (lambda: samplers.Euler(0, SDXL_EULER), "steps 0 is not allowed; allowed: an integer in [1, 1000]"),
    (lambda: samplers.build({"_class_name": samplers.FLOW_CLASS}, 4, "euler"),
     "sampler 'euler' is not allowed for a FlowMatchEulerDiscreteScheduler model; allowed: auto, flow"),
])
def test_errors_name_the_value_and_what_is_allowed(call, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        call()


#### EULER (EulerDiscreteScheduler: SDXL base's own) ####

EULER_CONFIGS = {
    "sdxl": SDXL_EULER,
    "sdxl-trailing": {**SDXL_EULER, "timestep_spacing": "trailing", "steps_offset": 0},  # SDXL-Lightning's
    "linspace-v": {**SDXL_EULER, "timestep_spacing": "linspace", "prediction_type": "v_prediction"},
    "sample-pred": {**SDXL_EULER, "prediction_type": "sample"},
    "karras": {**SDXL_EULER, "use_karras_sigmas": True},
    "karras-range": {**SDXL_EULER, "use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0},
    "exponential": {**SDXL_EULER, "use_exponential_sigmas": True, "timestep_spacing": "trailing"},
    "log-linear": {**SDXL_EULER, "interpolation_type": "log_linear"},
    "final-sigma-min": {**SDXL_EULER, "final_sigmas_type": "sigma_min"},
    "sd15-ddim-config": SD15,  # --sampler euler on SD-1.5: what EulerDiscreteScheduler.from_config makes of it
    "euler-defaults": {"_class_name": "EulerDiscreteScheduler"},  # linear betas, linspace
}


def diffusers_euler(config, steps, cls="EulerDiscreteScheduler"):
    import diffusers

    s = getattr(diffusers, cls).from_config(config)
    s.set_timesteps(steps)
    return s


def scaled(sched, x, i):
    """What the UNet reads at step i (and what rid holds): x/√(σ_i² + 1); after the last step x itself."""
    return x if i >= len(sched.timesteps) else sched.scale_model_input(x, sched.timesteps[i])


@pytest.mark.parametrize("name", list(EULER_CONFIGS))
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 50])
def test_euler_timesteps_and_sigmas_equal_diffusers(name, steps):
    sched, ours = diffusers_euler(EULER_CONFIGS[name], steps), samplers.Euler(steps, EULER_CONFIGS[name])
    assert torch.equal(ours.timesteps, sched.timesteps) and torch.equal(ours.sigmas, sched.sigmas)
    assert ours.timesteps.dtype == ours.sigmas.dtype == torch.float32
    assert torch.equal(ours.alphas_cumprod, sched.alphas_cumprod)
    assert ours.init_noise_sigma == pytest.approx(float(sched.init_noise_sigma), rel=1e-7)


def test_sdxl_euler_schedule_is_sdxls():
    ours = samplers.Euler(50, SDXL_EULER)
    assert ours.timesteps[0] == 981 and ours.timesteps[-1] == 1 and ours.sigmas[-1] == 0
    assert ours.init_scale == pytest.approx(1.0, abs=1e-7)  # leading: rid's unit noise is the pipeline's start
    trailing = samplers.Euler(4, EULER_CONFIGS["sdxl-trailing"])
    assert trailing.timesteps.tolist() == [999, 749, 499, 249]
    assert trailing.init_scale == pytest.approx((1 + 1 / float(trailing.sigmas[0]) ** 2) ** 0.5)  # 1.0023


@pytest.mark.parametrize("name", list(EULER_CONFIGS))
@pytest.mark.parametrize("steps", [1, 4, 7])
def test_euler_step_equals_diffusers_step_by_step(name, steps):
    """Both fed diffusers' own trajectory: rid's step on the scaled latent == diffusers' step, scaled for the
    next UNet call (the last: unscaled, the latent the pipeline decodes); x̂₀ == pred_original_sample."""
    sched, ours = diffusers_euler(EULER_CONFIGS[name], steps), samplers.Euler(steps, EULER_CONFIGS[name])
    g = gen(steps)
    x = torch.randn(2, 4, 6, 5, generator=g) * sched.init_noise_sigma  # awkward latent size
    worst, scale = 0.0, 0.0
    for i, t in enumerate(sched.timesteps):
        z, pred = scaled(sched, x, i), torch.randn(x.shape, generator=g)
        assert ours.timestep(i) == float(t) and not ours.needs_noise(ours.timestep(i), 0.0)
        out = sched.step(pred, t, x)
        mine, x0 = ours.step(pred, ours.timestep(i), z), ours.x0(pred, ours.timestep(i), z)
        theirs = scaled(sched, out.prev_sample, i + 1)
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x0, out.pred_original_sample, rtol=1e-5, atol=1e-5)
        worst = max(worst, (mine - theirs).abs().max().item(), (x0 - out.pred_original_sample).abs().max().item())
        scale = max(scale, theirs.abs().max().item(), out.pred_original_sample.abs().max().item())
        x = out.prev_sample
    print(f"euler step {name} n={steps}: max |diff| {worst:.2e} (values ≤ {scale:.1f})")


class ToyDenoiser:
    """A fixed nonlinear function of (z, t) standing in for a UNet (samplers.denoise calls predict)."""

    def __init__(self, c=4, seed=0):
        self.w = torch.randn(c, c, generator=gen(seed)) / c ** 0.5

    def predict(self, z, t, cond, guidance):
        return torch.tanh(torch.einsum("oc,bchw->bohw", self.w, z)) + float(t) / 1000


@pytest.mark.parametrize("name", ["sdxl", "sdxl-trailing", "linspace-v", "karras", "final-sigma-min"])
@pytest.mark.parametrize("steps", [1, 4, 25])
def test_euler_loop_equals_a_loop_of_diffusers_steps(name, steps):
    """samplers.denoise with Euler from unit noise == diffusers' loop (scale_model_input → model → step) from
    noise × init_scale × init_noise_sigma, on the same toy denoiser: the whole trajectory, not one step."""
    sched, ours = diffusers_euler(EULER_CONFIGS[name], steps), samplers.Euler(steps, EULER_CONFIGS[name])
    toy = ToyDenoiser()
    noise = torch.randn(2, 4, 6, 5, generator=gen(1))
    x = noise * ours.init_scale * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(toy.predict(sched.scale_model_input(x, t), t, None, 1.0), t, x).prev_sample
    out = samplers.denoise(toy, None, noise, ours, range(steps), 1.0)
    print(f"euler loop {name} n={steps}: max |diff| {(out - x).abs().max().item():.2e} (values ≤ {x.abs().max():.1f})")
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["sdxl", "sdxl-trailing", "linspace-v"])
@pytest.mark.parametrize("steps", [1, 4, 7])
def test_euler_eta_one_is_euler_ancestral(name, steps):
    """η = 1 is EulerAncestralDiscreteScheduler's step (its noise drawn alike); the last step, to σ = 0, takes none."""
    config = {**EULER_CONFIGS[name], "_class_name": "EulerAncestralDiscreteScheduler"}
    sched, ours = diffusers_euler(config, steps, "EulerAncestralDiscreteScheduler"), samplers.Euler(steps, config)
    assert torch.equal(ours.timesteps, sched.timesteps) and torch.equal(ours.sigmas, sched.sigmas)
    g, g_theirs, g_ours = gen(steps), gen(50 + steps), gen(50 + steps)
    x = torch.randn(2, 4, 6, 5, generator=g) * sched.init_noise_sigma
    worst = 0.0
    for i, t in enumerate(sched.timesteps):
        z, pred = scaled(sched, x, i), torch.randn(x.shape, generator=g)
        out = sched.step(pred, t, x, generator=g_theirs)
        noise = torch.randn(x.shape, generator=g_ours)  # diffusers draws at every step, the last too
        assert ours.needs_noise(ours.timestep(i), 1.0) == (i < steps - 1)
        mine = ours.step(pred, ours.timestep(i), z, 1.0, noise if ours.needs_noise(ours.timestep(i), 1.0) else None)
        theirs = scaled(sched, out.prev_sample, i + 1)
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
        worst = max(worst, (mine - theirs).abs().max().item())
        x = out.prev_sample
    print(f"euler eta=1 vs ancestral {name} n={steps}: max |diff| {worst:.2e}")


def test_euler_eta_interpolates_and_keeps_the_marginal():
    """η ∈ (0, 1): σ↑ = η·σ'√(σ² − σ'²)/σ, σ↓ = √(σ'² − σ↑²): with x̂₀ exact (a perfect ε-model) the step lands on
    x₀ + σ↓ε + σ↑·noise, a sample of the forward marginal at σ' (variance σ'² around x₀)."""
    ours = samplers.Euler(4, SDXL_EULER)
    g = gen(3)
    x0, eps, noise = (torch.randn(20000, generator=g) for _ in range(3))
    t, t_next = ours.timestep(1), ours.timestep(2)
    s, s_next = float(ours.sigma(t)), float(ours.sigma(t_next))
    z = ours.add_noise(x0, eps, t)
    out = ours.step(eps, t, z, 0.5, noise) * (s_next ** 2 + 1) ** 0.5  # unscaled x'
    up = 0.5 * s_next * (s ** 2 - s_next ** 2) ** 0.5 / s
    torch.testing.assert_close(out, x0 + (s_next ** 2 - up ** 2) ** 0.5 * eps + up * noise, rtol=1e-5, atol=1e-5)
    assert ((out - x0).var() / s_next ** 2).item() == pytest.approx(1.0, abs=0.03)


def test_euler_add_noise_and_last_step_gradient():
    """add_noise is diffusers' x₀ + σε, scaled as the UNet reads it; the last step (to σ = 0) returns x̂₀ = x − σε̂,
    so the gradient reaching the model's output is −σ_last (what RID, DRaFT and ReFL backpropagate through)."""
    sched, ours = diffusers_euler(SDXL_EULER, 4), samplers.Euler(4, SDXL_EULER)
    g = gen(4)
    x0, eps = torch.randn(2, 4, 6, 5, generator=g), torch.randn(2, 4, 6, 5, generator=g)
    for i, t in enumerate(sched.timesteps):
        ref = sched.add_noise(x0, eps, t.reshape(1)) / (sched.sigmas[i] ** 2 + 1) ** 0.5
        torch.testing.assert_close(ours.add_noise(x0, eps, ours.timestep(i)), ref, rtol=1e-6, atol=1e-6)
    t1 = ours.timestep(-1)
    z1 = ours.add_noise(x0, eps, t1)
    pred = eps.clone().requires_grad_(True)
    out = ours.step(pred, t1, z1)
    torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)  # an exact ε lands on x₀
    out.sum().backward()
    torch.testing.assert_close(pred.grad, torch.full_like(eps, -float(ours.sigma(t1))))
