"""Each training method's defining property, against an oracle computed a different way from rid.py.

The oracle (`Hand`) rebuilds what a method should compute from the parts, without rid's DDIM or
the backbone's conditioning, predict, denoise or decode: the tokenizer, text encoder, UNet and VAE
are called directly; classifier-free guidance is written out as ε_u + w(ε_c − ε_u) with the "" prompt as
the unconditional one (the guidance test makes separate UNet calls for ε_u and ε_c; the method
tests one batched call, see Hand.eps); DDIM is written out below on diffusers' DDIMScheduler
constants (ᾱ, timesteps, final ᾱ); the EMA teacher is run by copying the EMA buffer into the
student's buffer, not through group.teacher(). Adapters have non-zero up matrices, so every
gradient is non-trivial, and the guidance weight is 3 (neither the paper's 7.5 nor the mini
world's 5), so a hard-coded weight cannot pass. draft-lv and refl also record what the VAE
decodes, since their rewards barely move on the tiny VAE while the latents differ clearly.

    method      property checked
    guidance    ε = ε_u + w(ε_c − ε_u) for w ∈ {1, 3, 7.5}
    rid         teacher ← α·teacher + (1−α)·student after the optimizer step (α from StepConfig.ema);
                loss = −R(x_s) + λ‖x_s − x_t‖², x_t the EMA teacher's last step from the student's
                own z₁, for two λ, in pixel and latent space; its gradient
    baseline    gradient = the unrolled loop with gradient through the last step only (K = 1)
    draft-k     gradient = the unrolled loop detached exactly before step N−K, ≠ K−1 and K+1
    draft       gradient = the unrolled loop with no detach (K = N)
    draft-lv    loss = −mean of n+1 rewards: x̂₀ and n re-noisings z₁ = √ᾱ₁ x̂₀ + √(1−ᾱ₁) ε_i with
                ε_i drawn in order from the generator passed in; its gradient
    refl        loss = −R(x̂₀(z_t)) at t = timesteps[N − j], j = randint(1, m+1) from the generator,
                m = round(refl_m · N/50); x̂₀ = (z_t − √(1−ᾱ_t) ε)/√ᾱ_t; its gradient

tests/mutants.py plants one-line bugs in rid.py that these tests must catch.
Tiny SD (tests/tiny.py), 2–4 DDIM steps, batch 1–2, fp32.
"""
import contextlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rid  # noqa: E402
from tiny import toy_reward  # noqa: E402

torch.set_num_threads(1)
PROMPTS = ["a photo of a cat", "a red car"]
W = 3.0  # guidance of the method tests: not 7.5 (the paper) nor 5 (the mini world)
STEPS = 3


def gen(seed):
    return torch.Generator().manual_seed(seed)


def noise(models, seed=0, n=2):
    return torch.randn(n, *models.latent_shape, generator=gen(seed))


def adapters(models, std=0.2, teacher_std=None):
    """One trainable task with random (non-zero) down AND up matrices; with teacher_std, an EMA
    teacher that differs from the student by that much noise (else teacher = student)."""
    group = rid.inject(models.unet, rank=2)
    group.add_task("a", generator=gen(0))
    with torch.no_grad():
        group.flat.normal_(0, std, generator=gen(1))
        group.ema.copy_(group.flat)
        if teacher_std:
            group.ema.add_(torch.randn(group.ema.shape, generator=gen(2)) * teacher_std)
    return group


def assert_grad_close(actual, expected):
    """fp32 gradients through 1–3 UNet calls: the same UNet calls as rid's, DDIM written out
    differently (seen: within 1e-7 relative, 1e-8 of the largest entry); the planted bugs move
    them by ≥ 1 % of the largest entry."""
    scale = expected.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * scale)


def assert_grad_differs(actual, other):
    """Much further apart than assert_grad_close allows: ≥ 1 % of the largest entry."""
    assert (actual - other).abs().max().item() > 1e-2 * other.abs().max().item()


class Hand:
    """What rid should compute, from the parts (see the module docstring)."""

    def __init__(self, models, prompts, steps, guidance, batched=True):
        from diffusers import DDIMScheduler

        sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, prediction_type="epsilon")  # SD-1.5's shipped config
        sched.set_timesteps(steps)
        self.m, self.steps, self.w, self.batched = models, steps, guidance, batched
        self.timesteps = [int(t) for t in sched.timesteps]
        self.ac, self.final_ac = sched.alphas_cumprod, sched.final_alpha_cumprod
        self.ratio = 1000 // steps
        self.cond = self.encode(prompts)
        self.uncond = self.encode([""] * len(prompts))

    def encode(self, prompts):
        tok = self.m.tokenizer
        ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        with torch.no_grad():
            return self.m.text_encoder(ids)[0]

    def eps(self, z, t):
        """ε_u + w(ε_c − ε_u). Separate UNet calls for ε_u and ε_c when not batched; batched (one
        call on [z; z] with [uncond; cond], how rid calls it) for the method tests: same values up
        to rounding, but rounding that guidance amplifies (∂ε = (1−w)∂ε_u + w∂ε_c nearly cancels
        with the tiny text encoder) would force tolerances 100× looser on the methods' gradients."""
        unet, t = self.m.unet, torch.tensor(t)
        if self.batched:
            both = unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([self.uncond, self.cond])).sample
            eps_u, eps_c = both.chunk(2)
        else:
            eps_c = unet(z, t, encoder_hidden_states=self.cond).sample
            eps_u = unet(z, t, encoder_hidden_states=self.uncond).sample
        return eps_u + self.w * (eps_c - eps_u)

    def alpha(self, t):
        return self.ac[t] if t >= 0 else self.final_ac

    def x0(self, z, t, eps):
        a = self.alpha(t)
        return (z - torch.sqrt(1 - a) * eps) / torch.sqrt(a)

    def step(self, i, z):
        """DDIM step i (0-based, at timesteps[i]), η = 0: z_prev = √ᾱ_prev x̂₀ + √(1−ᾱ_prev) ε."""
        t = self.timesteps[i]
        eps = self.eps(z, t)
        a_prev = self.alpha(t - self.ratio)
        return torch.sqrt(a_prev) * self.x0(z, t, eps) + torch.sqrt(1 - a_prev) * eps

    def unrolled(self, z, K):
        """All N steps from z; gradient only through the last K (detached before step N−K)."""
        for i in range(self.steps):
            with torch.set_grad_enabled(i >= self.steps - K):
                z = self.step(i, z)
        return z

    def decode(self, z):
        vae = self.m.vae
        return (vae.decode(z / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)

    def add_noise(self, x0, eps, t):
        a = self.alpha(t)
        return torch.sqrt(a) * x0 + torch.sqrt(1 - a) * eps


@contextlib.contextmanager
def decoded_latents(models):
    """Records every latent the VAE decodes inside the block (as rid hands it over, before its
    division by the VAE's scaling factor)."""
    seen, vae = [], models.vae
    decode = vae.decode

    def recording(z, *args, **kwargs):
        seen.append(z.detach() * vae.config.scaling_factor)
        return decode(z, *args, **kwargs)

    vae.decode = recording
    try:
        yield seen
    finally:
        del vae.decode  # the instance attribute; the class's method shows through again


def rid_loss_and_grad(models, group, cfg, z, generator=None, prompts=PROMPTS):
    loss, logs = rid.method_loss(models, group, toy_reward, prompts, z, cfg, generator)
    return loss, logs, torch.autograd.grad(loss, group.flat)[0]


# -- guidance ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("w", [1.0, 3.0, 7.5])
def test_guidance_is_uncond_plus_w_times_difference(models, w):
    adapters(models)  # the formula holds with adapters in the UNet too
    hand = Hand(models, PROMPTS, STEPS, w, batched=False)
    z = noise(models)
    with torch.no_grad():
        for t in (hand.timesteps[0], hand.timesteps[-1]):
            expected = hand.eps(z, t)
            eps = models.predict(z, t, models.conditioning(PROMPTS, w), w)
            # |ε| ≈ 1; one call on 2B rows vs two on B round differently, and w amplifies it
            torch.testing.assert_close(eps, expected, rtol=1e-5, atol=3e-6 * w)
            if w != 1.0:  # the weight matters: it differs from the conditional ε alone
                cond = models.unet(z, torch.tensor(t), encoder_hidden_states=hand.cond).sample
                assert (eps - cond).abs().max() > 1e-2
        # and end to end through rid.sample
        img = rid.sample(models, PROMPTS, z, steps=STEPS, guidance=w)
        torch.testing.assert_close(img, hand.decode(hand.unrolled(z, 0)), rtol=1e-5, atol=1e-5)


# -- rid ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.9, 0.5])
def test_rid_step_moves_teacher_by_ema_of_the_updated_student(models, alpha):
    group = adapters(models, teacher_std=0.2)
    teacher_before, student_before = group.ema.clone(), group.flat.detach().clone()
    opt = torch.optim.Adam(group.parameters(), lr=1e-2)
    cfg = rid.StepConfig(method="rid", steps=2, guidance=W, ema=alpha)
    rid.train_step(models, group, toy_reward, [(PROMPTS[:1], noise(models, n=1))], opt, cfg)
    student = group.flat.detach()
    assert (student - student_before).abs().max() > 1e-3  # the optimizer moved the student
    expected = alpha * teacher_before + (1 - alpha) * student
    # lerp vs α·t + (1−α)·s: a few ulps (values ≲ 1, ulp ≤ 6e-8); any other α or student is ≥ 1e-4 off
    torch.testing.assert_close(group.ema, expected, rtol=0, atol=2e-7)
    assert (group.ema - teacher_before).abs().max() > 1e-2


def test_other_methods_leave_the_teacher_alone(models):
    group = adapters(models, teacher_std=0.2)
    teacher_before = group.ema.clone()
    opt = torch.optim.Adam(group.parameters(), lr=1e-2)
    cfg = rid.StepConfig(method="baseline", steps=2, guidance=W)
    rid.train_step(models, group, toy_reward, [(PROMPTS[:1], noise(models, n=1))], opt, cfg)
    assert torch.equal(group.ema, teacher_before)


def hand_rid(models, group, z, lam, space, steps=STEPS):
    """(loss, reward, distill, grad): student to z₁ (no grad); the last step from that z₁ by the
    student (grad) and by the EMA teacher (the EMA buffer copied into the student's, no grad)."""
    hand = Hand(models, PROMPTS, steps, W)
    with torch.no_grad():
        z1 = z
        for i in range(steps - 1):
            z1 = hand.step(i, z1)
        student = group.flat.detach().clone()
        group.flat.copy_(group.ema)
        x_t = hand.step(steps - 1, z1)
        img_t = hand.decode(x_t)
        group.flat.copy_(student)
    x_s = hand.step(steps - 1, z1)
    img_s = hand.decode(x_s)
    reward = toy_reward(img_s, PROMPTS).mean()
    a, b = (img_s, img_t) if space == "pixel" else (x_s, x_t)
    distill = (a - b).pow(2).sum(dim=(1, 2, 3)).mean()  # ‖·‖² per sample, mean over the batch
    loss = -reward + lam * distill
    return loss.item(), reward.item(), distill.item(), torch.autograd.grad(loss, group.flat)[0]


@pytest.mark.parametrize("lam,space", [(0.1, "pixel"), (30.0, "pixel"), (0.1, "latent"), (2.0, "latent")])
def test_rid_loss_is_reward_minus_lambda_distance_to_teacher_from_same_z1(models, lam, space):
    group = adapters(models, teacher_std=3.0)
    z = noise(models)
    want_loss, want_reward, want_distill, want_grad = hand_rid(models, group, z, lam, space)
    cfg = rid.StepConfig(method="rid", steps=STEPS, guidance=W, lam=lam, distill_space=space)
    loss, logs, grad = rid_loss_and_grad(models, group, cfg, z)

    assert want_distill > 1e-5  # the teacher really differs (pixel ≈ 1e-4, latent ≈ 1e-2 here)
    assert logs["distill"] == pytest.approx(want_distill, rel=1e-5)
    assert logs["reward"] == pytest.approx(want_reward, rel=1e-6)
    # loss − (−R) = λ‖x_s − x_t‖²: the fp32 loss ≈ −0.5 is rounded to ~3e-8, hence an absolute
    # floor; a dropped λ, a dropped term or a hard-coded λ moves it by ≥ 1e-5 here
    assert loss.item() + want_reward == pytest.approx(lam * want_distill, rel=1e-4, abs=1e-7)
    assert loss.item() == pytest.approx(want_loss, rel=1e-6)
    assert_grad_close(grad, want_grad)


def test_rid_teacher_sees_the_students_z1_not_its_own_trajectory(models):
    """The teacher's x_t is the EMA's last step from the STUDENT's z₁: a teacher that sampled its
    own z₁ (the EMA adapters for all N steps) gives a visibly different distance."""
    group = adapters(models, teacher_std=3.0)
    z = noise(models)
    hand = Hand(models, PROMPTS, STEPS, W)
    with torch.no_grad():
        student = group.flat.detach().clone()
        group.flat.copy_(group.ema)
        own_x_t = hand.unrolled(z, 0)  # the teacher's own trajectory
        group.flat.copy_(student)
        x_s = hand.unrolled(z, 0)
    _, _, want_distill, _ = hand_rid(models, group, z, 1.0, "latent")
    own_distill = (x_s - own_x_t).pow(2).sum(dim=(1, 2, 3)).mean().item()
    cfg = rid.StepConfig(method="rid", steps=STEPS, guidance=W, lam=1.0, distill_space="latent")
    with torch.no_grad():
        _, logs = rid.method_loss(models, group, toy_reward, PROMPTS, z, cfg)
    assert logs["distill"] == pytest.approx(want_distill, rel=1e-5)
    assert abs(own_distill - want_distill) > 0.1 * want_distill


# -- baseline, draft-k, draft ---------------------------------------------------------------------

def hand_truncated_grad(models, group, z, K, steps=STEPS):
    hand = Hand(models, PROMPTS, steps, W)
    loss = -toy_reward(hand.decode(hand.unrolled(z, K)), PROMPTS).mean()
    return loss.item(), torch.autograd.grad(loss, group.flat)[0]


@pytest.mark.parametrize("method,K", [("baseline", 1), ("draft-k", 2), ("draft", 3), ("draft-k", 3)])
def test_truncated_backprop_gradient_equals_unrolled_loop_detached_before_step_n_minus_k(models, method, K):
    group = adapters(models)
    z = noise(models)
    cfg = rid.StepConfig(method=method, steps=STEPS, guidance=W, truncate=K if method == "draft-k" else 1)
    loss, _, grad = rid_loss_and_grad(models, group, cfg, z)
    want_loss, want = hand_truncated_grad(models, group, z, K)
    assert loss.item() == pytest.approx(want_loss, rel=1e-6)
    assert_grad_close(grad, want)
    for other in (K - 1, K + 1):
        if 1 <= other <= STEPS:
            assert_grad_differs(grad, hand_truncated_grad(models, group, z, other)[1])


# -- draft-lv -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 3])
def test_draft_lv_is_the_mean_over_renoised_copies_with_the_generators_noise(models, n):
    group = adapters(models)
    z = noise(models)
    cfg = rid.StepConfig(method="draft-lv", steps=STEPS, guidance=W, lv_n=n)
    with decoded_latents(models) as seen:
        loss, logs, grad = rid_loss_and_grad(models, group, cfg, z, generator=gen(5))

    hand = Hand(models, PROMPTS, STEPS, W)
    g, t1 = gen(5), hand.timesteps[-1]
    x0 = hand.unrolled(z, 1)  # the final latent, gradient through the last step
    latents = [x0]
    for _ in range(n):  # re-noise to the last timestep with ε_i from the generator, last step again
        z1 = hand.add_noise(x0.detach(), torch.randn(x0.shape, generator=g), t1)
        latents.append(hand.step(STEPS - 1, z1))
    rewards = [toy_reward(hand.decode(x), PROMPTS).mean() for x in latents]
    want = -torch.stack(rewards).mean()

    # what was decoded: x̂₀, then the n copies in the generator's order (they differ by ≈ 0.1)
    assert len(seen) == n + 1
    for got, x in zip(seen, latents):
        torch.testing.assert_close(got, x.detach(), rtol=1e-5, atol=1e-6)
    assert min((x.detach() - x0.detach()).abs().max() for x in latents[1:]) > 1e-2
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)  # one copy's weight moves it ≥ 2e-5
    assert logs["reward"] == pytest.approx(rewards[0].item(), rel=1e-6)
    assert_grad_close(grad, torch.autograd.grad(want, group.flat)[0])


# -- refl -----------------------------------------------------------------------------------------

def hand_refl(models, group, z, steps, j):
    """−R(x̂₀) predicted in one UNet call from z_t, t = timesteps[N − j], z_t sampled without grad."""
    hand = Hand(models, PROMPTS[:1], steps, W)
    i = steps - j
    with torch.no_grad():
        z_t = z
        for k in range(i):
            z_t = hand.step(k, z_t)
    t = hand.timesteps[i]
    x0 = hand.x0(z_t, t, hand.eps(z_t, t))
    loss = -toy_reward(hand.decode(x0), PROMPTS[:1]).mean()
    return t, x0.detach(), loss.item(), torch.autograd.grad(loss, group.flat)[0]


@pytest.mark.parametrize("seed", [3, 5])  # draws j = 1 and j = 2
def test_refl_reward_is_taken_at_the_generators_timestep(models, seed):
    steps, refl_m = 4, 25  # m = round(25 · 4/50) = 2: j ∈ {1, 2}, never 3 or 4
    m = round(refl_m * steps / 50)
    j = int(torch.randint(1, m + 1, (), generator=gen(seed)))
    assert j != int(torch.randint(1, min(refl_m, steps) + 1, (), generator=gen(seed)))  # m not scaled: another j
    group = adapters(models)
    z = noise(models, n=1)
    cfg = rid.StepConfig(method="refl", steps=steps, guidance=W, refl_m=refl_m)
    with decoded_latents(models) as seen:
        loss, logs, grad = rid_loss_and_grad(models, group, cfg, z, gen(seed), prompts=PROMPTS[:1])
    hand = {jj: hand_refl(models, group, z, steps, jj) for jj in range(1, steps + 1)}
    t, x0, want_loss, want_grad = hand[j]
    assert logs["t"] == t
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], x0, rtol=1e-5, atol=1e-6)
    assert loss.item() == pytest.approx(want_loss, rel=1e-6)
    assert_grad_close(grad, want_grad)
    for other, (_, other_x0, _, other_grad) in hand.items():  # every other stop step is distinguishable
        if other != j:
            assert (other_x0 - x0).abs().max() > 1e-3
            assert_grad_differs(grad, other_grad)
