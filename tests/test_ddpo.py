"""DDPO (issue 34): the per-step Gaussian policy, the PPO-clip objective, per-prompt advantages, and a
black-box run through train.py.

Oracles, each computed another way than ddpo.py:
    log-prob      torch.distributions.Normal's density of a given x_{t−1}, averaged over a sample's elements;
                  the step's mean from diffusers' DDIMScheduler.step with zero variance noise; σ_t written out
                  (DDIM's Eq. 16, the flow η analogue's c(η), LCM's √(1−ᾱ_next))
    rollout       samplers.denoise with the same η's and generator: the same chain end, bit for bit
    first epoch   the ratio exactly 1 and the PPO-clip gradient == the plain policy gradient −mean_b A_b ∇log π
    clip          max(−Aρ, −A·clip(ρ)) and its gradient evaluated by hand, ratios inside and outside, A ≷ 0
    tracker       means and stds over hand-tracked buffers, three rounds
    end to end    train.py --method ddpo on jpeg-kb (PIL's JPEG size, no gradient): round 1's reward is the
                  black box on the hand-sampled chains; the run directory is what eval.py reads; a crash and
                  --resume end bit-identical (the per-prompt statistics restored); bad flags exit 2, one line
Tiny SD (tests/tiny.py), fp32.
"""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import config
import ddpo
import rid
import samplers
import surrogate
import tiny
import train

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a photo of a cat", "a red car"]
W = 3.0  # guidance


def gen(seed):
    return torch.Generator().manual_seed(seed)


def cfg_of(**kw):
    return ddpo.DDPOConfig(**{"method": "ddpo", "steps": 3, "guidance": W, **kw})


#### THE POLICY: ONE STEP AS A GAUSSIAN ####

def test_gaussian_log_prob_is_the_normal_density_averaged_per_sample():
    g = gen(0)
    x, mean = torch.randn(3, 4, 5, 7, generator=g), torch.randn(3, 4, 5, 7, generator=g)
    for std in (0.02, 0.7, 3.0):
        want = torch.distributions.Normal(mean.double(), std).log_prob(x.double()).flatten(1).mean(1)
        torch.testing.assert_close(ddpo.gaussian_log_prob(x.double(), mean.double(), std), want, rtol=1e-12, atol=1e-12)
    by_hand = (-(x - mean) ** 2 / (2 * 0.7 ** 2) - math.log(0.7 * math.sqrt(2 * math.pi))).flatten(1).mean(1)
    torch.testing.assert_close(ddpo.gaussian_log_prob(x, mean, 0.7), by_hand)


@pytest.mark.parametrize("eta", [1.0, 0.4])
def test_ddim_step_log_prob_is_the_density_of_diffusers_mean_and_eq16_std(eta):
    from diffusers import DDIMScheduler

    steps = 10
    sched = DDIMScheduler.from_config(samplers.SD15_SCHEDULER)
    sched.set_timesteps(steps)
    ddim = rid.DDIM(steps)
    abar = sched.alphas_cumprod.double()
    g = gen(1)
    for i in (0, 4, steps - 1):  # the last step's ᾱ_prev is ᾱ_0 (set_alpha_to_one False)
        t = int(sched.timesteps[i])
        a_t, a_prev = abar[t], abar[t - 100] if t >= 100 else abar[0]
        std = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
        # the sampler's σ_t, computed in float32 (1 − ᾱ_t/ᾱ_prev cancels at the last step: 7e-6 relative)
        assert ddpo.step_std(ddim, t, eta) == pytest.approx(float(std), rel=1e-4)
        pred, z, noise = (torch.randn(2, 4, 6, 5, generator=g) for _ in range(3))
        z_prev = ddim.step(pred, t, z, eta, noise)
        mean = sched.step(pred, t, z, eta=eta, variance_noise=torch.zeros_like(z)).prev_sample
        want = torch.distributions.Normal(mean.double(), float(std)).log_prob(z_prev.double()).flatten(1).mean(1)
        torch.testing.assert_close(ddpo.log_prob(ddim, pred, t, z, z_prev, eta).double(), want, rtol=1e-5, atol=1e-5)
    assert ddpo.step_std(ddim, int(sched.timesteps[0]), 0.0) == 0.0  # η = 0: deterministic, no action


def test_flow_and_lcm_steps_are_policies_but_their_last_step_is_not():
    flow = samplers.Flow(4, {"shift": 3.0})
    eta = 0.7
    for i in range(3):
        s, s_next = float(flow.sigmas[i]), float(flow.sigmas[i + 1])
        c = eta * s_next / s * math.sqrt(s ** 2 - ((1 - s) * s_next / (1 - s_next)) ** 2)
        assert ddpo.step_std(flow, flow.timestep(i), eta) == pytest.approx(c, rel=1e-6)
    assert ddpo.step_std(flow, flow.timestep(3), eta) == 0.0  # to σ = 0: x̂₀
    assert ddpo.policy_steps(flow, 4, eta) == [0, 1, 2]

    lcm = samplers.LCM(4, samplers.SD15_SCHEDULER)
    for i in range(3):
        a_next = lcm.alphas_cumprod[lcm.timestep(i + 1)].double()
        assert ddpo.step_std(lcm, lcm.timestep(i), 1.0) == pytest.approx(float((1 - a_next).sqrt()), rel=1e-6)
    assert ddpo.policy_steps(lcm, 4, 0.3) == [0, 1, 2]  # η plays no part in LCM
    with pytest.raises(ValueError, match="needs a stochastic sampler step"):
        ddpo.policy_steps(samplers.Flow(1, {"shift": 3.0}), 1, 1.0)


def test_rollout_is_the_samplers_eta_ddim(models):
    cfg = cfg_of()
    noise = torch.randn(2, *models.latent_shape, generator=gen(2))
    z, logp = ddpo.sample_chain(models, models.sampler(3), PROMPTS, noise, cfg, gen(3))
    text = models.conditioning(PROMPTS, W)
    with torch.no_grad():
        want = samplers.denoise(models, text, noise, models.sampler(3), range(3), W, etas=[1.0] * 3, generator=gen(3))
    assert z.shape == (2, 4, *models.latent_shape) and logp.shape == (2, 3)
    assert torch.equal(z[:, 0], noise) and torch.equal(z[:, -1], want)
    assert torch.isfinite(logp).all()


#### PPO-CLIP ####

def randomized_group(models):
    group = rid.inject(models.unet, rank=2)
    group.add_task("t")
    with torch.no_grad():  # non-zero B: the adapters change the prediction, every entry gets a gradient
        group.flat.normal_(0, 0.05, generator=gen(4))
    return group


def test_first_inner_epoch_ratio_is_one_and_the_gradient_is_the_policy_gradient(models):
    group = randomized_group(models)
    cfg, sampler = cfg_of(), models.sampler(3)
    noise = torch.randn(2, *models.latent_shape, generator=gen(5))
    z, logp_old = ddpo.sample_chain(models, sampler, PROMPTS, noise, cfg, gen(6))
    text, adv = models.conditioning(PROMPTS, W), torch.tensor([1.5, -0.7])
    for j, i in enumerate(ddpo.policy_steps(sampler, 3, cfg.ddpo_eta)):
        t = sampler.timestep(i)
        logp = ddpo.log_prob(sampler, models.predict(z[:, i], t, text, W), t, z[:, i], z[:, i + 1], cfg.ddpo_eta)
        loss, ratio = ddpo.ppo_loss(logp, logp_old[:, j], adv, cfg.ddpo_clip_range)
        assert torch.equal(ratio, torch.ones(2))  # the policy that sampled, on the same inputs
        (g_ppo,) = torch.autograd.grad(loss, group.flat, retain_graph=True)
        (g_pg,) = torch.autograd.grad(-(adv * logp).mean(), group.flat)  # REINFORCE: −mean A ∇log π
        assert g_pg.norm() > 0
        torch.testing.assert_close(g_ppo, g_pg, rtol=1e-6, atol=1e-12)


def test_clipped_objective_by_hand():
    eps = 0.1
    r = torch.tensor([0.8, 0.95, 1.05, 1.2] * 2, dtype=torch.float64)
    adv = torch.tensor([2.0] * 4 + [-2.0] * 4, dtype=torch.float64)
    # per sample max(−Aρ, −A·clip(ρ, 0.9, 1.1)) and its derivative in log π (dρ/dlog π = ρ), by hand:
    #   A = 2:  ρ 0.8 → max(−1.6, −1.8) = −1.6 (unclipped), 0.95 → −1.9, 1.05 → −2.1,
    #           ρ 1.2 → max(−2.4, −2.2) = −2.2 (clipped)
    #   A = −2: ρ 0.8 → max(1.6, 1.8) = 1.8 (clipped), 0.95 → 1.9, 1.05 → 2.1,
    #           ρ 1.2 → max(2.4, 2.2) = 2.4 (unclipped)
    values = [-1.6, -1.9, -2.1, -2.2, 1.8, 1.9, 2.1, 2.4]
    d_logp = [-1.6, -1.9, -2.1, 0.0, 0.0, 1.9, 2.1, 2.4]  # −Aρ where unclipped, 0 where clipped
    logp_old = torch.linspace(-3, -1, 8, dtype=torch.float64)
    logp = (logp_old + r.log()).requires_grad_(True)
    loss, ratio = ddpo.ppo_loss(logp, logp_old, adv, eps)
    torch.testing.assert_close(ratio.detach(), r)
    assert loss.item() == pytest.approx(sum(values) / 8, abs=1e-12)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, torch.tensor(d_logp, dtype=torch.float64) / 8, rtol=0, atol=1e-12)


#### ADVANTAGES ####

def test_per_prompt_stat_tracker_by_hand():
    tr = ddpo.PerPromptStatTracker(buffer_size=3, min_count=2)
    sd = lambda xs: math.sqrt(sum((x - sum(xs) / len(xs)) ** 2 for x in xs) / len(xs)) + 1e-6  # noqa: E731
    # round 1: a has 2 rewards (its own stats), b has 1 (< min_count: the round's [1, 3, 5])
    adv = tr.update(["a", "a", "b"], torch.tensor([1.0, 3.0, 5.0]))
    want = [(1 - 2) / sd([1, 3]), (3 - 2) / sd([1, 3]), (5 - 3) / sd([1, 3, 5])]
    torch.testing.assert_close(adv, torch.tensor(want, dtype=torch.float64))
    # round 2: a's buffer [1, 3, 7]; b's [5, 9] reaches min_count
    adv = tr.update(["b", "a"], torch.tensor([9.0, 7.0]))
    want = [(9 - 7) / sd([5, 9]), (7 - 11 / 3) / sd([1, 3, 7])]
    torch.testing.assert_close(adv, torch.tensor(want, dtype=torch.float64))
    # a saved and restored tracker continues the same: round 3, a's buffer keeps its last 3 ([3, 7, 0])
    again = ddpo.PerPromptStatTracker(3, 2)
    again.load_state_dict(json.loads(json.dumps(tr.state_dict())))
    want = torch.tensor([(0 - 10 / 3) / sd([3, 7, 0]), (4 - 2) / sd([0, 4])], dtype=torch.float64)
    for t in (tr, again):
        torch.testing.assert_close(t.update(["a", "c"], torch.tensor([0.0, 4.0])), want)
    # min_count above the buffer: always the round's statistics
    batch_only = ddpo.PerPromptStatTracker(2, 3)
    for _ in range(3):
        torch.testing.assert_close(batch_only.update(["a", "a"], torch.tensor([1.0, 2.0])),
                                   torch.tensor([-0.5, 0.5], dtype=torch.float64) / (0.5 + 1e-6))


def test_a_round_is_on_policy_at_its_first_update(models):
    """One minibatch, one inner epoch: the one update sees ratio 1 everywhere (the same samples in another order)."""
    group = randomized_group(models)
    before = group.flat.detach().clone()
    opt = torch.optim.AdamW([group.flat], lr=1e-3)
    cfg = cfg_of(ddpo_minibatches=1)
    noise = torch.randn(4, *models.latent_shape, generator=gen(7))
    prompts = PROMPTS + ["a blue tree", "a dog"]
    tr = ddpo.PerPromptStatTracker(16, 16)
    logs = ddpo.train_round(models, group, tiny.toy_reward, [(prompts[:2], noise[:2]), (prompts[2:], noise[2:])],
                            opt, cfg, tr, generator=gen(8))
    assert logs["clipfrac"] == 0 and logs["approx_kl"] == 0 and logs["grad_norm"] > 0
    assert not torch.equal(group.flat.detach(), before)
    assert {"loss", "reward", "reward_std", "approx_kl", "clipfrac", "grad_norm"} == set(logs)


#### TRAIN.PY ####

def ddpo_args(sd, prompts, out, *extra):
    """jpeg-kb (a black box) × 4 rounds of 4 samples (8 training prompts: each prompt twice, so its own
    statistics take over in rounds 3-4 at min count 2), DDIM 2, 2 minibatches of 2, 2 inner epochs."""
    return ["--model", sd, "--prompts", prompts, "--tasks", "jpeg-kb", "--method", "ddpo", "--steps", "2",
            "--batch", "4", "--micro-batch", "2", "--max-steps", "4", "--lr", "1e-2", "--ckpt-every", "1",
            "--ddpo-minibatches", "2", "--ddpo-inner-epochs", "2", "--ddpo-buffer", "4", "--ddpo-min-count", "2",
            "--device", "cpu", "--out", str(out), *extra]


class Crash(Exception):
    pass


def test_black_box_run_end_to_end_eval_reads_it_and_resume_is_bit_exact(sd_path, tmp_path, monkeypatch):
    import eval as evaluate

    prompts = tiny.write_prompts(tmp_path / "prompts.txt")
    full = tmp_path / "full"
    assert train.main(ddpo_args(sd_path, prompts, full)) == 0
    sdir = full / "stage1-jpeg-kb"
    rows = [json.loads(line) for line in (sdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"loss", "reward", "approx_kl", "clipfrac", "grad_norm"} <= set(r) for r in rows)
    assert not (sdir / "surrogate.json").exists()  # the black box itself, no LaSRO surrogate

    # round 1's reward is the true JPEG size of the chains the base model samples from the round's seeds
    run = json.loads((full / "run.json").read_text())
    assert run["method"] == "ddpo" and run["stages"] == ["stage1-jpeg-kb"]
    train_prompts = (full / "train_prompts.txt").read_text().splitlines()
    models = rid.load_models(sd_path)
    cfg = cfg_of(steps=2, guidance=run["config"]["guidance"])
    noise = torch.randn((4, *models.latent_shape), generator=gen(train.seed_of(0, 1, train.NOISE, 0)))
    g = gen(train.seed_of(0, 1, train.METHOD, 0, 0))
    sampler = models.sampler(2, "auto", g)
    batch = train.batch_prompts(train_prompts, 0, 4, 0)
    finals = [ddpo.sample_chain(models, sampler, batch[i:i + 2], noise[i:i + 2], cfg, g)[0][:, -1] for i in (0, 2)]
    with torch.no_grad():
        images = models.decode(torch.cat(finals))
    true = surrogate.true_scores("jpeg-kb", surrogate.black_box("jpeg-kb"), images, batch)
    assert rows[0]["reward"] == pytest.approx(float(true.mean()), rel=1e-9)
    assert rows[0]["reward"] == pytest.approx(-sum(surrogate.encoded_kb(surrogate.to_pil(images), "JPEG")) / 4)

    # what eval.py and the LoRA loaders read
    loaded = evaluate.load_run(full)
    assert [s.name for s in evaluate.stages_of(loaded)] == ["stage0-base", "stage1-jpeg-kb"]
    checkpoint.verify(sdir)
    group = checkpoint.load(models.unet, sdir)
    assert group.tasks == ["jpeg-kb"]
    ups = [t for k, t in load_file(str(sdir / "adapters.safetensors")).items() if k.endswith("/B")]
    assert any(t.abs().max() > 0 for t in ups)  # trained
    assert (sdir / "pytorch_lora_weights.safetensors").exists() and (sdir / "lora_kohya.safetensors").exists()

    # a crash as round 3 starts (rounds 1-2 and their checkpoint written), then --resume
    crashed, calls, real = tmp_path / "crashed", [0], ddpo.train_round

    def crashing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise Crash
        return real(*args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(ddpo, "train_round", crashing)
        with pytest.raises(Crash):
            train.main(ddpo_args(sd_path, prompts, crashed))
    assert "tracker" in torch.load(crashed / "stage1-jpeg-kb" / "ckpt" / "trainer.pt", weights_only=True)
    assert train.main(ddpo_args(sd_path, prompts, crashed, "--resume")) == 0
    a = load_file(str(sdir / "adapters.safetensors"))
    b = load_file(str(crashed / "stage1-jpeg-kb" / "adapters.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    got = [json.loads(line) for line in (crashed / "stage1-jpeg-kb" / "metrics.jsonl").read_text().splitlines()]
    drop = lambda r: {k: v for k, v in r.items() if k != "time"}  # noqa: E731
    assert [drop(r) for r in got] == [drop(r) for r in rows]


def test_paper_preset_flags_and_help(capsys):
    cfg = config.resolve(config.build_parser().parse_args(["--model", config.SD15, "--method", "ddpo"]))[0]
    assert (cfg.batch["aesthetic"], cfg.lr["aesthetic"], cfg.steps) == (256, 3e-4, 50)
    assert (cfg.ddpo_eta, cfg.ddpo_clip_range, cfg.ddpo_adv_clip, cfg.ddpo_inner_epochs, cfg.ddpo_minibatches,
            cfg.ddpo_timestep_fraction, cfg.ddpo_buffer, cfg.ddpo_min_count) == (1.0, 1e-4, 5.0, 1, 4, 1.0, 16, 16)
    assert config.micro_plan(cfg, "aesthetic", 1) == (8, 32)
    step = config.step_config(cfg)
    assert isinstance(step, ddpo.DDPOConfig) and step.method == "ddpo" and step.ddpo_minibatches == 4
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--ddpo-clip-range", "--ddpo-inner-epochs", "--ddpo-minibatches", "--ddpo-timestep-fraction",
                 "--ddpo-eta", "--ddpo-adv-clip", "--ddpo-buffer", "--ddpo-min-count"):
        assert flag in out, flag
    assert "r0, ddpo)" in " ".join(out.split())  # among --method's choices


def test_micro_batch_auto_plans_the_ddpo_step_on_black_boxes_too(monkeypatch):
    """The planner is asked for DDPO's step (bounded by the baseline's, with a differentiable stand-in for the
    reward) even on a black box, where LaSRO's latent step is not planned."""
    import memplan

    asked = []

    def plan(models, reward_fn, method, budget, **kw):
        asked.append((method, reward_fn(torch.rand(3, 3, 8, 8), ["a"] * 3).shape))
        return {"top": 2, "fixed": 0, "per_sample": 1, "usable": budget}

    monkeypatch.setattr(memplan, "plan_micro_batch", plan)
    argv = ["--model", config.SD15, "--method", "ddpo", "--tasks", "jpeg-kb", "--batch", "4", "--device", "cpu"]
    cfg = config.resolve(config.build_parser().parse_args(argv))[0]
    assert train.plan_micro_batch(cfg, None, {"jpeg-kb": surrogate.black_box("jpeg-kb")}, 1, free=10) == 2
    assert asked == [("baseline", (3,))]


def test_runs_from_before_ddpo_resume(tmp_path):
    """A run.json written before the ddpo settings existed trained with their defaults (only ddpo reads them)."""
    cfg = config.Config()
    old = {k: v for k, v in train.config_dict(cfg).items() if not k.startswith("ddpo_")}
    (tmp_path / "run.json").write_text(json.dumps({"config": old, "stages": [], "train_prompts": "a.txt",
                                                   "test_prompts": "b.txt"}))
    assert train.config_diff(train.saved_run(tmp_path)["config"], train.config_dict(cfg)) == []
    cfg.ddpo_clip_range = 0.2
    assert train.config_diff(train.saved_run(tmp_path)["config"], train.config_dict(cfg)) == [
        "ddpo_clip_range: was 0.0001, now 0.2"]


@pytest.mark.parametrize("extra, env, words", [
    (["--ddpo-clip-range", "0"], {}, ["--ddpo-clip-range 0.0 is not allowed", "> 0"]),
    (["--ddpo-eta", "1.5"], {}, ["--ddpo-eta 1.5 is not allowed", "(0, 1]"]),
    (["--ddpo-inner-epochs", "0"], {}, ["--ddpo-inner-epochs 0 is not allowed", "≥ 1"]),
    (["--ddpo-timestep-fraction", "nan"], {}, ["--ddpo-timestep-fraction nan is not allowed"]),
    (["--ddpo-buffer", "0"], {}, ["--ddpo-buffer 0 is not allowed"]),
    (["--ddpo-minibatches", "3"], {}, ["--ddpo-minibatches 3 does not divide", "4 samples"]),
    (["--steps", "1", "--sampler", "lcm"], {}, ["needs a stochastic sampler step"]),
    ([], {"WORLD_SIZE": "2"}, ["--method ddpo trains on one process only", "WORLD_SIZE is 2"]),
])
def test_bad_ddpo_input_is_one_line(sd_path, tmp_path, monkeypatch, capsys, extra, env, words):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    prompts = tiny.write_prompts(tmp_path / "prompts.txt")
    assert train.main(ddpo_args(sd_path, prompts, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error:"), err
    for w in words:
        assert w in err[0], (w, err[0])
    assert not (Path(tmp_path / "out") / "run.json").exists()
