"""DDPO — denoising diffusion policy optimization (Black et al. 2023, DDPO_IS), as ddpo-pytorch runs it.

The sampler is a policy: with η > 0 every step z_t → z_{t−1} draws from a Gaussian N(μ_θ(z_t, t), σ_t² I),
so the log-probability of a sampled chain is known and the reward needs no gradient (a black box such as
jpeg-kb is simply called). One *round* (ddpo-pytorch's epoch):
    sample chains with the current adapters, storing z_T … z_0 and log π_old of each stochastic step
    → score the final images (no gradient) → advantages: rewards normalised by each prompt's running
    mean/std (the round's while a prompt has too few), clipped → inner epochs over the stored chains:
    minibatches of PPO-clip steps, ρ = exp(log π_θ − log π_old), gradient accumulated over the timesteps.

Reading order: the settings (`DDPOConfig`, rid.StepConfig's plus DDPO's, every knob declared once) → the
per-step Gaussian policy (`step_std`, `gaussian_log_prob`, `log_prob`) → the rollout (`sample_chain`) →
advantages (`PerPromptStatTracker`) → the PPO-clip objective (`ppo_loss`) → one round (`train_round`),
which train.py calls in place of rid.train_step. The sampler and the denoiser are read only through the
seam (samplers.py's step; backbones/' conditioning and predict), so every backbone and every sampler step
that adds fresh noise is a policy: η-DDIM, the flow η analogue (SD3, FLUX), LCM's re-noising (η unused).
docs/methods.md says what differs from ddpo-pytorch.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, fields

import torch
from torch import nn

import rid
import samplers

METHODS = rid.METHODS + ("ddpo",)  # rid.train_step's methods, and this file's


def _number_in(lo: float, hi: float = math.inf):
    """(allowed, check) of a setting that is a number in (lo, hi] (hi = inf: any finite number > lo)."""
    text = f"a finite number > {lo:g}" if math.isinf(hi) else f"a number in ({lo:g}, {hi:g}]"
    return text, lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                            and lo < v <= hi)


_METHOD = {f.name: f for f in fields(rid.StepConfig)}["method"]


@dataclass
class DDPOConfig(rid.StepConfig):
    """rid.StepConfig's settings and DDPO's; defaults are ddpo-pytorch's config/base.py. config.Config inherits
    them and derives a --flag from each (--ddpo-clip-range, ...)."""
    method: str = rid.setting(_METHOD.default, _METHOD.metadata["help"], choices=METHODS)
    ddpo_eta: float = rid.setting(1.0, "ddpo: η of every sampling step, the policy's noise (ddpo-pytorch: 1, "
                                  "DDPM's variance; LCM ignores it, its re-noising is the policy's noise)",
                                  *_number_in(0, 1))
    ddpo_clip_range: float = rid.setting(1e-4, "ddpo: ε of PPO's clip, the importance ratio clipped to "
                                         "[1 − ε, 1 + ε] (ddpo-pytorch: 1e-4)", *_number_in(0))
    ddpo_adv_clip: float = rid.setting(5.0, "ddpo: advantages clipped to [−A, A] (ddpo-pytorch's adv_clip_max: 5)",
                                       *_number_in(0))
    ddpo_inner_epochs: int = rid.setting(1, "ddpo: passes over a round's samples, each in a new order "
                                         "(ddpo-pytorch's num_inner_epochs: 1)", *rid.int_at_least(1))
    ddpo_minibatches: int = rid.setting(4, "ddpo: optimizer steps per inner epoch, each on an equal share of the "
                                        "round's samples (--batch is the round); ddpo-pytorch's 4 = 256 samples "
                                        "/ 64 per update", *rid.int_at_least(1))
    ddpo_timestep_fraction: float = rid.setting(1.0, "ddpo: fraction of a chain's stochastic steps trained on, a "
                                                "random subset per micro-batch (ddpo-pytorch's timestep_fraction: 1)",
                                                *_number_in(0, 1))
    ddpo_buffer: int = rid.setting(16, "ddpo: rewards kept per prompt for its running mean and std "
                                   "(ddpo-pytorch's per_prompt_stat_tracking buffer_size: 16)", *rid.int_at_least(1))
    ddpo_min_count: int = rid.setting(16, "ddpo: rewards a prompt's buffer needs before they normalise its "
                                      "advantages; until then the round's mean and std do (above --ddpo-buffer: "
                                      "always the round's; ddpo-pytorch's min_count: 16)", *rid.int_at_least(1))


############################################################################################
# The policy: one stochastic sampler step as a Gaussian
############################################################################################

def step_std(sampler, t, eta: float) -> float:
    """σ_t of the step at timestep t: the scale of the fresh noise it adds (0 for a deterministic step), read
    from the sampler's own step. Every sampler's step is μ + σ_t·noise with μ = 0 where z and the prediction
    are 0. DDIM: σ_t = η√((1−ᾱ_prev)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_prev); flow: c(η); LCM: √(1−ᾱ_next)."""
    zero = torch.zeros(1, dtype=torch.float64)
    return float(sampler.step(zero, t, zero, eta, torch.ones(1, dtype=torch.float64)))


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """log N(x; mean, std²) per element, averaged over each sample's elements (ddpo-pytorch's
    ddim_step_with_logprob; its clip range 1e-4 is calibrated to this per-element mean): (B, ...) → (B,)."""
    lp = -(x - mean) ** 2 / (2 * std ** 2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


def log_prob(sampler, pred: torch.Tensor, t, z: torch.Tensor, z_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """log π(z_prev | z_t) (B,) float32 of a stochastic step given the denoiser's prediction at (z_t, t):
    μ_θ is the sampler's step without its fresh noise, computed in float32 whatever the model's dtype."""
    mean = sampler.step(pred.float(), t, z.float(), eta, torch.zeros_like(z, dtype=torch.float32))
    return gaussian_log_prob(z_prev.float(), mean, step_std(sampler, t, eta))


def policy_steps(sampler, steps: int, eta: float) -> list:
    """The step indices whose step draws fresh noise: DDPO's actions (a deterministic step has no log-prob)."""
    policy = [i for i in range(steps) if sampler.needs_noise(sampler.timestep(i), eta)]
    if not policy:
        raise ValueError(f"--method ddpo needs a stochastic sampler step; this {type(sampler).__name__} sampler at "
                         f"{steps} step(s) has none (flow and LCM: their last step is deterministic); use more --steps")
    return policy


@torch.no_grad()
def sample_chain(models, sampler, prompts: list, noise: torch.Tensor, cfg: DDPOConfig, generator=None):
    """The policy's rollout (ddpo-pytorch's pipeline_with_logprob): the sampler's η-steps from `noise`, fresh
    noise from `generator` in step order, exactly samplers.denoise(..., etas=[η]*steps). → (z (B, N+1, ...)
    z_T … z_0 in the model's dtype, logp (B, P) float32: log π_old of each of the P policy steps)."""
    text = models.conditioning(prompts, cfg.guidance)
    generator = sampler.generator if generator is None else generator
    z = noise.to(models.device, models.dtype)
    chain, logps = [z], []
    for i in range(cfg.steps):
        t = sampler.timestep(i)
        pred = models.predict(z, t, text, cfg.guidance)
        fresh = samplers.randn(z.shape, z, generator) if sampler.needs_noise(t, cfg.ddpo_eta) else None
        z_prev = sampler.step(pred, t, z, cfg.ddpo_eta, fresh)
        if fresh is not None:
            logps.append(log_prob(sampler, pred, t, z, z_prev, cfg.ddpo_eta))
        z = z_prev
        chain.append(z)
    return torch.stack(chain, 1), torch.stack(logps, 1)


############################################################################################
# Advantages: per-prompt running statistics
############################################################################################

class PerPromptStatTracker:
    """ddpo-pytorch's per_prompt_stat_tracking: each prompt keeps its last `buffer_size` rewards; a sample's
    advantage is (r − mean)/(std + 1e-6) over its prompt's buffer (this round's rewards included) once that
    holds `min_count`, else over the whole round's rewards. Population std (numpy's default)."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict = {}  # prompt -> deque of its latest rewards

    def update(self, prompts: list, rewards: torch.Tensor) -> torch.Tensor:
        """rewards (B,) of the round's samples in prompt order → advantages (B,) float64 (CPU)."""
        r = rewards.detach().double().cpu()
        adv = torch.empty_like(r)
        for prompt in dict.fromkeys(prompts):
            idx = [i for i, p in enumerate(prompts) if p == prompt]
            buf = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(r[idx].tolist())
            ref = torch.tensor(list(buf), dtype=torch.float64) if len(buf) >= self.min_count else r
            adv[idx] = (r[idx] - ref.mean()) / (ref.std(correction=0) + 1e-6)
        return adv

    def state_dict(self) -> dict:
        return {"stats": {p: list(buf) for p, buf in self.stats.items()}}

    def load_state_dict(self, state: dict):
        self.stats = {p: deque(v, maxlen=self.buffer_size) for p, v in state["stats"].items()}


############################################################################################
# PPO-clip and one round
############################################################################################

def ppo_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, clip_range: float):
    """PPO's clipped objective at one step, as ddpo-pytorch: mean over the batch of
        max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)),  ρ = exp(log π_θ − log π_old)
    the importance ratio of the current policy to the one that sampled. → (loss (), ρ (B,))."""
    ratio = torch.exp(logp - logp_old)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    return loss, ratio


def _randperm(n: int, generator) -> torch.Tensor:
    return torch.randperm(n, generator=generator, device=generator.device if generator is not None else "cpu").cpu()


def train_round(models, group, reward_fn, micro_batches, optimizer, cfg: DDPOConfig, tracker: PerPromptStatTracker,
                clip_grad=1.0, generator=None) -> dict:
    """One DDPO round over micro-batches [(prompts, noise), …] (the round's samples, one process): sample, score,
    advantages, then cfg.ddpo_inner_epochs × cfg.ddpo_minibatches optimizer steps. The gradient reaches only
    group.flat. Draws from `generator`, in this order: every step's fresh noise, micro-batch by micro-batch;
    then per inner epoch the sample order and, per training micro-batch, the order of the policy steps."""
    sampler = models.sampler(cfg.steps, cfg.sampler, generator)
    policy = policy_steps(sampler, cfg.steps, cfg.ddpo_eta)
    flat, eta = group.flat, cfg.ddpo_eta

    #### SAMPLING: chains of the current policy, no gradient ####
    prompts, chains, logps, rewards = [], [], [], []
    for p, noise in micro_batches:
        z, logp = sample_chain(models, sampler, p, noise, cfg, generator)
        #### REWARD of the final latent, no gradient (a black box is just called) ####
        with torch.no_grad():
            rewards.append(rid.score(models, reward_fn, z[:, -1], p).detach().double().cpu())
        prompts += list(p)
        chains.append(z), logps.append(logp)
    z, logp_old, reward = torch.cat(chains), torch.cat(logps), torch.cat(rewards)  # (n, N+1, C, h, w), (n, P), (n,)

    #### ADVANTAGES: per-prompt running mean/std, clipped ####
    adv = tracker.update(prompts, reward).clamp(-cfg.ddpo_adv_clip, cfg.ddpo_adv_clip)
    adv = adv.to(device=logp_old.device, dtype=torch.float32)

    #### TRAINING: inner epochs of PPO-clip minibatch steps over the stored chains ####
    n, micro = len(prompts), len(micro_batches[0][0])
    k = max(1, int(len(policy) * cfg.ddpo_timestep_fraction))  # trained steps per sample
    logs = {"loss": [], "approx_kl": [], "clipfrac": [], "grad_norm": []}
    for _ in range(cfg.ddpo_inner_epochs):
        for mb in _randperm(n, generator).chunk(cfg.ddpo_minibatches):  # n is a multiple (config.micro_plan)
            optimizer.zero_grad(set_to_none=True)
            for idx in mb.split(micro):
                text = models.conditioning([prompts[i] for i in idx.tolist()], cfg.guidance)
                idx = idx.to(z.device)
                for j in _randperm(len(policy), generator)[:k].tolist():
                    i, t = policy[j], sampler.timestep(policy[j])
                    z_t, z_prev = z[idx, i], z[idx, i + 1]
                    logp = log_prob(sampler, models.predict(z_t, t, text, cfg.guidance), t, z_t, z_prev, eta)
                    loss, ratio = ppo_loss(logp, logp_old[idx, j], adv[idx], cfg.ddpo_clip_range)
                    (loss * len(idx) / (len(mb) * k)).backward()  # the mean over the minibatch's samples and steps
                    with torch.no_grad():
                        logs["loss"].append(loss.item())
                        logs["approx_kl"].append(0.5 * (logp - logp_old[idx, j]).pow(2).mean().item())
                        logs["clipfrac"].append(((ratio - 1).abs() > cfg.ddpo_clip_range).float().mean().item())
            logs["grad_norm"].append(float(nn.utils.clip_grad_norm_([flat], clip_grad if clip_grad else float("inf"))))
            optimizer.step()
    out = {key: sum(v) / len(v) for key, v in logs.items()}
    return {**out, "reward": reward.mean().item(), "reward_std": reward.std(correction=0).item()}
