"""R0 (issue 17): DDIM with η, the r0 method's loss and gradient, its CLI checks, and the few-step eval.

Oracles, each computed a different way from rid.py:
    η-DDIM          diffusers' DDIMScheduler.step(eps, t, z, eta=η, variance_noise=n), step by step,
                    every step of 4 and 7 step schedules (the last one's ᾱ_prev = ᾱ_0 included)
    normalisation   per-sample autograd on one image at a time: ∂loss/∂x_b = −(1/B) Σ_i w_i ĝ_ib with
                    ‖ĝ_ib‖ = 1, i.e. each reward's share has norm w_i / B per sample; the forward value
                    is the plain −Σ_i w_i mean R_i; raw_grads gives the ordinary gradient of that value
    weight reg      a reward with zero image-gradient leaves ∂loss/∂θ = 2λ_w(θ − θ₀) alone
    r0 chain        the K-step chain unrolled by hand on diffusers' scheduler (η's and noise drawn from
                    the same generator in the documented order), UNet/VAE called directly; gradient
                    checkpointing changes nothing
    R0+             the hand chain plus the rewards of x̂₀ from z_j *detached* at the drawn j; differs
                    clearly from the same term without the detach
    CLI             bad --eta-range / --steps / --joint weights / --lam-w / --r0-plus: exit 2, one line
    end to end      train.py --method r0 with a joint and as a sequence on the tiny SD with real tiny
                    rewards, then eval.py: the base at K and at its usual steps, the clip-metric note
Tiny SD (tests/tiny.py), fp32.
"""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rid  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a photo of a cat", "a red car"]
W = 3.0  # guidance: neither the paper's 7.5 nor the mini world's 5


def scheduler(steps):
    from diffusers import DDIMScheduler

    s = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    s.set_timesteps(steps)
    return s


def gen(seed):
    return torch.Generator().manual_seed(seed)


#### η-DDIM ####

@pytest.mark.parametrize("steps", [4, 7])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_eta_ddim_step_is_diffusers_step_by_step(steps, eta):
    sched, ddim = scheduler(steps), rid.DDIM(steps)
    assert [int(t) for t in sched.timesteps] == ddim.timesteps.tolist()
    g = gen(steps)
    z = torch.randn(2, 4, 6, 5, generator=g)  # awkward latent size
    for t in sched.timesteps:
        eps, noise = torch.randn(z.shape, generator=g), torch.randn(z.shape, generator=g)
        expected = sched.step(eps, t, z, eta=eta, variance_noise=noise).prev_sample
        actual = ddim.step(eps, int(t), z, eta, noise)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
        z = expected


def test_eta_zero_keeps_the_deterministic_step_bit_for_bit():
    ddim = rid.DDIM(20)
    g = gen(0)
    z, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t in ddim.timesteps.tolist():
        a_t, a_prev = ddim.alpha(t), ddim.alpha(t - ddim.ratio)
        before = a_prev ** 0.5 * ((z - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5) + (1 - a_prev) ** 0.5 * eps
        assert torch.equal(ddim.step(eps, t, z), before) and torch.equal(ddim.step(eps, t, z, 0.0, None), before)
    # and a step with η > 0 does add its noise
    assert not torch.allclose(ddim.step(eps, 501, z, 1.0, torch.ones_like(z)), ddim.step(eps, 501, z))


#### PER-REWARD GRADIENT NORMALISATION ####

def red(x, p):
    return 10 * x[:, 0].mean(dim=(1, 2))


def green_peak(x, p):
    return -3 * (x[:, 1] - 0.3).pow(2).mean(dim=(1, 2)) + x[:, 2].pow(3).mean(dim=(1, 2))


def with_parts(parts: dict):
    """A weighted-sum reward carrying .parts, as rewards.joint builds one."""
    def total(x, p):
        return sum(w * fn(x, p) for w, fn in parts.values())
    total.parts = dict(parts)
    return total


PARTS = {"red": (0.5, red), "green": (2.0, green_peak)}


def per_sample_grad(fn, x):
    """∇_x R(x_b) one image at a time (the oracle of the batched autograd.grad in rid)."""
    out = []
    for b in range(len(x)):
        xb = x[b:b + 1].detach().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(xb, PROMPTS[:1]).sum(), xb)
        out.append(g[0])
    return torch.stack(out)


@pytest.mark.parametrize("B", [1, 3])
def test_normalised_reward_gradient_has_unit_norm_per_sample_times_weight(B):
    x = torch.rand(B, 3, 10, 7, generator=gen(B), requires_grad=True)
    prompts = (PROMPTS * B)[:B]
    for name, (w, fn) in PARTS.items():  # each reward alone: ‖∂loss/∂x_b‖ = w / B
        loss, _ = rid.r0_reward_loss(x, prompts, {name: (w, fn)})
        (g,) = torch.autograd.grad(loss, x)
        torch.testing.assert_close(g.flatten(1).norm(dim=1) * B, torch.full((B,), w), rtol=1e-5, atol=0)
        raw = per_sample_grad(fn, x)
        direction = raw / raw.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        torch.testing.assert_close(g, -w * direction / B, rtol=1e-5, atol=1e-7)
    # both: the sum of the two unit directions, each times its weight; the value is the plain weighted reward
    loss, means = rid.r0_reward_loss(x, prompts, PARTS)
    (g,) = torch.autograd.grad(loss, x)
    expected = sum(-w * (lambda r: r / r.flatten(1).norm(dim=1).view(-1, 1, 1, 1))(per_sample_grad(fn, x))
                   for w, fn in PARTS.values()) / B
    torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-7)
    value = -sum(w * fn(x, prompts).mean() for w, fn in PARTS.values())
    torch.testing.assert_close(loss, value)
    assert means == pytest.approx({n: fn(x, prompts).mean().item() for n, (_, fn) in PARTS.items()})
    # the rewards' own gradient scales differ (that is what the normalisation removes)
    r, gp = per_sample_grad(red, x).flatten(1).norm(dim=1), per_sample_grad(green_peak, x).flatten(1).norm(dim=1)
    assert (r / gp).min() > 3 or (gp / r).min() > 3


def test_raw_grads_give_the_plain_gradient_of_the_weighted_reward():
    x = torch.rand(3, 3, 8, 8, generator=gen(0), requires_grad=True)
    loss, _ = rid.r0_reward_loss(x, PROMPTS + PROMPTS[:1], PARTS, normalize=False)
    (g,) = torch.autograd.grad(loss, x)
    (expected,) = torch.autograd.grad(-sum(w * fn(x, None).mean() for w, fn in PARTS.values()), x)
    torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-8)


#### THE r0 STEP ON THE TINY SD ####

def adapters(models, std=0.1):
    """One trainable task whose θ differs from θ₀ (= the group's second buffer, set by add_task)."""
    group = rid.inject(models.unet, rank=2)
    group.add_task("a", generator=gen(0))
    with torch.no_grad():
        group.flat.add_(torch.randn(group.flat.shape, generator=gen(1)) * std)
    return group


def zero_gradient_reward(x, p):
    return x.sum(dim=(1, 2, 3)) * 0.0


@pytest.mark.parametrize("lam_w", [0.5, 2.0])
def test_weight_regularizer_gradient_is_two_lam_w_theta_minus_theta0(models, lam_w):
    group = adapters(models)
    theta0 = group.ema.clone()
    assert (group.flat.detach() != theta0).any()
    cfg = rid.StepConfig(method="r0", steps=2, guidance=W, lam_w=lam_w)
    z = torch.randn(2, *models.latent_shape, generator=gen(0))
    loss, logs = rid.method_loss(models, group, zero_gradient_reward, PROMPTS, z, cfg, gen(3))
    (g,) = torch.autograd.grad(loss, group.flat)
    expected = 2 * lam_w * (group.flat.detach() - theta0)
    torch.testing.assert_close(g, expected, rtol=1e-6, atol=1e-9)
    assert logs["weight_reg"] == pytest.approx((group.flat.detach() - theta0).pow(2).sum().item(), rel=1e-6)


class HandChain:
    """The r0 chain unrolled on diffusers' scheduler; UNet, text encoder and VAE called directly."""

    def __init__(self, models, K, eta_range, seed, plus=False):
        self.m, self.K, self.sched = models, K, scheduler(K)
        tok = models.tokenizer

        def encode(prompts):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            with torch.no_grad():
                return models.text_encoder(ids)[0]
        self.text = torch.cat([encode([""] * 2), encode(PROMPTS)])
        self.g = gen(seed)  # the documented order: K η's, then j (R0+), then each η > 0 step's noise
        lo, hi = eta_range
        self.etas = (lo + (hi - lo) * torch.rand(K, generator=self.g, dtype=torch.float64)).tolist()
        self.j = int(torch.randint(1, K, (), generator=self.g)) if plus else None

    def eps(self, z, t):
        e_u, e_c = self.m.unet(torch.cat([z, z]), t, encoder_hidden_states=self.text).sample.chunk(2)
        return e_u + W * (e_c - e_u)

    def decode(self, z):
        vae = self.m.vae
        return (vae.decode(z / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)

    def run(self, z):
        """-> (final latent, {step index: the latent entering it})"""
        seen = {}
        for i, t in enumerate(self.sched.timesteps):
            seen[i] = z
            eta = self.etas[i]
            noise = torch.randn(z.shape, generator=self.g) if eta > 0 else None
            z = self.sched.step(self.eps(z, t), t, z, eta=eta, variance_noise=noise).prev_sample
        return z, seen

    def x0(self, z, i):
        t = self.sched.timesteps[i]
        a = self.sched.alphas_cumprod[int(t)]
        return (z - (1 - a).sqrt() * self.eps(z, t)) / a.sqrt()


def surrogate(images, parts):
    """−(1/B) Σ_b ⟨Σ_i w_i ĝ_ib, x_b⟩ with ĝ from per-sample autograd: the gradient R0 backpropagates."""
    d = sum(w * (lambda r: r / r.flatten(1).norm(dim=1).view(-1, 1, 1, 1))(per_sample_grad(fn, images))
            for w, fn in parts.values())
    return -(d * images).flatten(1).sum(1).mean()


def assert_grad_close(actual, expected):
    scale = expected.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale)


def test_r0_gradient_is_the_hand_unrolled_chain_with_random_eta(models):
    """η ~ U[0, 1] and η = 0 (deterministic DDIM) each against the hand chain, and the gradient changes
    with η exactly as the hand chain's does (random η is a regulariser, not a no-op)."""
    group = adapters(models)
    K, lam_w, seed = 3, 0.7, 5
    z = torch.randn(2, *models.latent_shape, generator=gen(0))
    grads, hands = {}, {}
    for eta_range in ((0.0, 1.0), (0.0, 0.0)):
        hand = HandChain(models, K, eta_range, seed)
        if eta_range[1] > 0:
            assert len({round(e, 6) for e in hand.etas}) == K and all(0 < e < 1 for e in hand.etas)
        z0, _ = hand.run(z)
        expected_loss = surrogate(hand.decode(z0), PARTS) + lam_w * (group.flat - group.ema).pow(2).sum()
        (expected,) = torch.autograd.grad(expected_loss, group.flat)
        hands[eta_range] = expected
        for checkpointing in (False, True):
            cfg = rid.StepConfig(method="r0", steps=K, guidance=W, lam_w=lam_w, eta_range=eta_range,
                                 gradient_checkpointing=checkpointing)
            loss, logs = rid.method_loss(models, group, with_parts(PARTS), PROMPTS, z, cfg, gen(seed))
            (g,) = torch.autograd.grad(loss, group.flat)
            assert_grad_close(g, expected)
            grads[eta_range] = g
            with torch.no_grad():
                img = hand.decode(z0)
            assert logs["reward"] == pytest.approx(
                sum(w * fn(img, PROMPTS).mean().item() for w, fn in PARTS.values()), rel=1e-4)
            assert set(logs) >= {"reward_red", "reward_green", "weight_reg"}
    # η > 0 against η = 0: rid's change of the gradient is the hand chain's, and it is not small
    change, hand_change = grads[(0.0, 1.0)] - grads[(0.0, 0.0)], hands[(0.0, 1.0)] - hands[(0.0, 0.0)]
    reward_part = hands[(0.0, 0.0)] - 2 * lam_w * (group.flat - group.ema).detach()  # the λ_w term does not move
    assert hand_change.norm() > 0.02 * reward_part.norm()  # measured: 5.7 %
    tol = 2e-5 * hands[(0.0, 0.0)].abs().max().item()  # the two gradients' own tolerances, added
    assert hand_change.abs().max() > 100 * tol
    torch.testing.assert_close(change, hand_change, rtol=0, atol=tol)


def test_r0_plus_passes_no_gradient_before_the_chosen_step(models):
    group = adapters(models)
    K, seed = 4, 2
    z = torch.randn(2, *models.latent_shape, generator=gen(0))
    cfg = rid.StepConfig(method="r0", steps=K, guidance=W, lam_w=0.0, r0_plus=True)
    loss, logs = rid.method_loss(models, group, with_parts(PARTS), PROMPTS, z, cfg, gen(seed))
    (g,) = torch.autograd.grad(loss, group.flat)

    hand = HandChain(models, K, (0.0, 1.0), seed, plus=True)
    assert 1 <= hand.j <= K - 1
    z0, seen = hand.run(z)
    final = surrogate(hand.decode(z0), PARTS)
    stopped = surrogate(hand.decode(hand.x0(seen[hand.j].detach(), hand.j)), PARTS)
    (expected,) = torch.autograd.grad(final + stopped, group.flat, retain_graph=True)
    assert_grad_close(g, expected)
    assert "reward_mid" in logs
    # the detach matters: the same term with gradient through the steps before j is far from it
    (through,) = torch.autograd.grad(final + surrogate(hand.decode(hand.x0(seen[hand.j], hand.j)), PARTS),
                                     group.flat)
    assert (through - expected).abs().max() > 1e-2 * expected.abs().max()


#### CLI: bad input exits 2 with one line ####

BAD = [
    (["--eta-range", "0.5,0.2"], ["--eta-range", "0 ≤ LO ≤ HI ≤ 1"]),
    (["--eta-range", "0,1.5"], ["--eta-range", "HI ≤ 1"]),
    (["--eta-range", "-0.1,0.5"], ["--eta-range"]),
    (["--eta-range", "nan,1"], ["--eta-range"]),
    (["--eta-range", "0.5"], ["--eta-range", "LO,HI"]),
    (["--eta-range", "a,b"], ["--eta-range", "LO,HI"]),
    (["--steps", "0"], ["--steps", "[1, 1000]"]),
    (["--steps", "1", "--r0-plus"], ["--r0-plus", "--steps"]),
    (["--lam-w", "-1"], ["--lam-w"]),
    (["--lam-w", "inf"], ["--lam-w"]),
    (["--joint", "hps:-1,clip:1"], ["--joint", "> 0"]),
    (["--joint", "hps:1,clip:nan"], ["--joint", "> 0"]),
    (["--joint", "hps:1,beauty:2"], ["--joint", "clip"]),
]


@pytest.mark.parametrize("argv,words", BAD)
def test_bad_r0_flags_exit_2_with_one_line(sd_path, tmp_path, capsys, argv, words):
    import train

    base = ["--model", sd_path, "--method", "r0", "--device", "cpu", "--out", str(tmp_path / "out")]
    if "--joint" not in argv:
        base += ["--tasks", "clip"]
    assert train.main(base + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: "), err
    assert all(w in err[0] for w in words), err[0]
    assert not (tmp_path / "out").exists()


def test_r0_plus_needs_the_r0_method(sd_path, tmp_path, capsys):
    import train

    assert train.main(["--model", sd_path, "--method", "draft", "--r0-plus", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--r0-plus" in err[0] and "--method r0" in err[0]


def test_r0_preset_is_k4_and_flags_override(sd_path):
    import config

    resolve = lambda *a: config.resolve(config.build_parser().parse_args(["--model", sd_path, *a]))[0]  # noqa: E731
    cfg = resolve("--method", "r0", "--joint", "hps:1,aesthetic:0.5,clip:2")
    assert (cfg.steps, cfg.eta_range, cfg.raw_grads, cfg.r0_plus) == (4, (0.0, 1.0), False, False)
    assert cfg.joint == {"hps": 1.0, "aesthetic": 0.5, "clip": 2.0}
    cfg = resolve("--method", "r0", "--tasks", "clip", "--steps", "6", "--eta-range", "0.2,0.2", "--raw-grads")
    assert (cfg.steps, cfg.eta_range, cfg.raw_grads) == (6, (0.2, 0.2), True)
    assert resolve("--method", "rid").steps == 50  # other methods keep their steps


#### END TO END: train.py then eval.py on the tiny SD with real (tiny) rewards ####

def test_r0_runs_joint_and_as_a_sequence_and_eval_compares_the_base_at_k_and_usual_steps(sd_path, tmp_path, capsys):
    import eval as ev
    import rewards
    import train
    from test_rewards import tiny_spec
    from tiny import write_prompts

    (tmp_path / "spec").mkdir()
    tiny_spec(tmp_path / "spec")
    spec = str(tmp_path / "spec" / "rewards.json")
    prompts = write_prompts(tmp_path / "prompts.txt")
    common = ["--model", sd_path, "--prompts", prompts, "--reward-spec", spec, "--method", "r0", "--batch", "2",
              "--max-steps", "2", "--lr", "1e-2", "--device", "cpu"]
    joint, seq = tmp_path / "joint", tmp_path / "seq"
    assert train.main(common + ["--joint", "hps:1,clip:0.5", "--out", str(joint)]) == 0
    assert train.main(common + ["--tasks", "clip,aesthetic", "--r0-plus", "--out", str(seq)]) == 0
    for d, n in ((joint, 1), (seq, 2)):
        info = json.loads((d / "run.json").read_text())
        assert len(info["stages"]) == n and info["config"]["steps"] == 4
    rows = [json.loads(line) for line in (joint / "stage1-joint" / "metrics.jsonl").read_text().splitlines()]
    assert all({"reward_hps", "reward_clip", "weight_reg"} <= set(r) for r in rows)
    assert rows[-1]["weight_reg"] > 0  # the adapters moved away from θ₀ after the first step

    capsys.readouterr()
    report = ev.evaluate([str(joint), str(seq)], s=ev.Settings(images_per_prompt=2, max_prompts=1, device="cpu",
                                                               fid_features="clip"), out=tmp_path / "ev", log=print)
    names = {(r["method"], r["name"]) for r in report["rows"]}
    assert ("base", "stage0-base-4steps") in names and ("base (50 steps)", "stage0-base-50steps") in names
    steps = {r["name"]: json.loads(open(r["strip"].replace(".png", ".json")).read())["config"]["steps"]
             for r in report["rows"]}
    assert steps["stage0-base-4steps"] == 4 and steps["stage0-base-50steps"] == 50
    assert steps["stage1-joint"] == steps["stage2-aesthetic"] == 4  # each r0 stage at its own K
    assert sum(r["name"].startswith("stage0-base") for r in report["rows"]) == 2  # each base once
    on_metric = report["clip_metric_trained_on"]
    assert any("stage1-joint" in x for x in on_metric) and any("stage2-aesthetic" in x for x in on_metric)
    assert "Trained on the CLIP metric's own model" in (tmp_path / "ev" / "report.md").read_text()

    # the clip reward is the CLIP metric's score, differentiable
    x = torch.rand(2, 3, 16, 16, generator=gen(0), requires_grad=True)
    fn = rewards.get("clip", rewards.load_spec(spec))
    torch.testing.assert_close(fn(x, PROMPTS), rewards.clip_score(x, PROMPTS, rewards.load_spec(spec)))
    (g,) = torch.autograd.grad(fn(x, PROMPTS).sum(), x)
    assert g.abs().sum() > 0
