"""Rectified flows (SD3 / SD3.5; FLUX.1): samplers.Flow, backbones/sd3.py, every method on a flow model.

    Flow sampler   == FlowMatchEulerDiscreteScheduler.from_config(config) after set_timesteps as
                      StableDiffusion3Pipeline (the scheduler's own σ's, static shift 3.0 or dynamic μ) and
                      FluxPipeline (sigmas linspace(1, 1/n, n), dynamic μ from the token count; schnell's
                      shift 1) call it: timesteps, σ's and every Euler step bit for bit, 1…50 steps
    η analogue     η = 0 is the Euler step bit for bit; η = 1 equals the DDPM posterior computed by Gaussian
                   conditioning of the Markov forward kernel (float64 covariances); every η keeps the marginal
                   x_σ' = (1 − σ')x₀ + σ'ε (coefficients read off by linearity)
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
