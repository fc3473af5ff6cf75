"""Planted bugs: one-line mutations of the product code, each with the tests that must catch it.

    python tests/mutants.py                   every mutant (110: ≈ 70 min on 2 busy CPU cores)
    python tests/mutants.py --only NAME ...   the named mutants (repeat or comma-separate)
    python tests/mutants.py --file rid.py     the mutants of one product file
    python tests/mutants.py --list            the list by method, whether each still applies, its tests; nothing run

For each mutant: copy the working tree (what `git ls-files --cached --others --exclude-standard`
lists: committed and uncommitted work, not .venv/ or out/) into a temporary directory, check that
the old text occurs exactly once in the file, replace it, and run the mutant's tests there with
`python -m pytest -o addopts= -x -q` (one process: not pytest.ini's xdist workers; TRITON_INTERPRET=1).
Before that, each distinct set of tests runs once on the unmutated copy: a mutant only counts as
caught when its tests pass without it.

Statuses: caught (a test failed; "how" says whether by an assertion — an oracle saw the bug — or by
a crash, a weaker catch) · SURVIVED (every test passed: a bug the suite cannot see) ·
stale (the old text is not in the file, or not exactly once: the code moved; update the mutant's
old text) · no-tests (pytest found none of the named tests) · error (import/collection failed, or
the baseline already fails) · timeout. Exit status 0 when every mutant run is caught, 1 otherwise.
Not collected by pytest (no test_ prefix); run it by hand after changing a method or its tests.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    old: str  # must occur exactly once in the file: keep it short and distinctive
    new: str
    tests: tuple  # pytest node ids or test files, relative to the repository root
    why: str = ""  # the property the mutation breaks
    group: str = ""  # the method or part it belongs to (set by `section`; --list groups by it)


def section(group: str, *mutants: Mutant) -> list:
    return [replace(m, group=group) for m in mutants]


M = Mutant
T_METHODS = "tests/test_methods.py"
EMA_STEP = f"{T_METHODS}::test_rid_step_moves_teacher_by_ema_of_the_updated_student"
OTHERS_NO_EMA = f"{T_METHODS}::test_other_methods_leave_the_teacher_alone"
RID_LOSS = f"{T_METHODS}::test_rid_loss_is_reward_minus_lambda_distance_to_teacher_from_same_z1"
RID_Z1 = f"{T_METHODS}::test_rid_teacher_sees_the_students_z1_not_its_own_trajectory"
GUIDANCE = f"{T_METHODS}::test_guidance_is_uncond_plus_w_times_difference"
TRUNCATED = f"{T_METHODS}::test_truncated_backprop_gradient_equals_unrolled_loop_detached_before_step_n_minus_k"
LV = f"{T_METHODS}::test_draft_lv_is_the_mean_over_renoised_copies_with_the_generators_noise"
REFL = f"{T_METHODS}::test_refl_reward_is_taken_at_the_generators_timestep"
T_RID, T_INTEGRATION = "tests/test_rid.py", "tests/test_integration.py"
DDP = f"{T_RID}::test_train_step_all_reduces_over_two_processes"
SOUP = f"{T_RID}::test_soup_of_different_runs_is_the_weighted_sum_of_their_deltas"
ROUND_TRIP = f"{T_RID}::test_checkpoint_round_trip_bit_exact"
RESUME_BOUNDARY = f"{T_INTEGRATION}::test_resume_at_a_stage_boundary_is_bit_exact"
JOINT = f"{T_INTEGRATION}::test_joint_reward_is_the_weighted_sum_of_three_rewards"
FIRST_STEP = f"{T_INTEGRATION}::test_first_step_is_rid_train_step_and_ema_follows_the_flag"
EVAL_OVERRIDES = f"{T_INTEGRATION}::test_eval_steps_and_guidance_override_the_runs_sampler"
GUIDANCE_ZERO = f"{T_INTEGRATION}::test_eval_guidance_zero_is_used_as_zero"
FORGETTING_EVAL = "tests/test_eval.py::test_forgetting_is_never_negative_and_zero_for_a_metric_that_only_improved"
T_R0 = "tests/test_r0.py"
R0_ETA_DDIM = f"{T_R0}::test_eta_ddim_step_is_diffusers_step_by_step"
SAMPLERS_ETA = "tests/test_samplers.py::test_ddim_step_equals_diffusers_step_by_step"
R0_NORM = f"{T_R0}::test_normalised_reward_gradient_has_unit_norm_per_sample_times_weight"
R0_REG = f"{T_R0}::test_weight_regularizer_gradient_is_two_lam_w_theta_minus_theta0"
R0_CHAIN = f"{T_R0}::test_r0_gradient_is_the_hand_unrolled_chain_with_random_eta"
R0_PLUS = f"{T_R0}::test_r0_plus_passes_no_gradient_before_the_chosen_step"
T_SUR = "tests/test_surrogate.py"
BT = f"{T_SUR}::test_bradley_terry_on_a_hand_worked_example"
ADAPT = f"{T_SUR}::test_online_adaptation_is_the_hand_run_of_bradley_terry_steps_on_the_fifo_buffer"
FIFO = f"{T_SUR}::test_buffer_is_fifo_and_bounded"
SUR_LEARNS = f"{T_SUR}::test_surrogate_learns_a_known_function_of_the_latent"
SUR_TASK = f"{T_SUR}::test_surrogate_task_scores_the_latents_it_was_given_with_the_true_reward"
SUR_STATE = f"{T_SUR}::test_state_dict_continues_bit_exactly"
EXPORT = f"{T_RID}::test_export_lora_loads_in_diffusers"
EXPORT_BOTH = "tests/test_export.py::test_export_loads_in_diffusers_as_rids_forward_for_both_backbones"

MUTANTS = [
    *section("RID: the EMA teacher (rid.py)",
        M("ema-update-deleted", "rid.py", "group.ema_update(cfg.ema)", "pass", (EMA_STEP,),
          "RID's teacher never moves"),
        M("ema-alpha-hardcoded", "rid.py", "group.ema_update(cfg.ema)", "group.ema_update(DEFAULT_EMA)", (EMA_STEP,),
          "StepConfig.ema (--ema) ignored"),
        M("ema-alpha-flipped", "rid.py", "group.ema_update(cfg.ema)", "group.ema_update(1 - cfg.ema)", (EMA_STEP,),
          "α and 1−α swapped"),
        M("ema-for-every-method", "rid.py", 'if cfg.method == "rid":\n        group.ema_update',
          'if True:\n        group.ema_update', (OTHERS_NO_EMA,), "baselines move a teacher they do not have"),
        M("ema-updates-student", "rid.py", "rid_kernels.ema_(self.ema, self.flat.detach(), alpha)",
          "rid_kernels.ema_(self.flat.detach(), self.ema, alpha)", (EMA_STEP,),
          "teacher and student swapped in the EMA"),
    ),
    *section("RID: the loss (rid.py)",
        M("rid-lambda-dropped", "rid.py", "loss = -reward.mean() + cfg.lam * distill",
          "loss = -reward.mean() + distill",
          (RID_LOSS,), "λ does not reach the loss"),
        M("rid-lambda-hardcoded", "rid.py", "loss = -reward.mean() + cfg.lam * distill",
          "loss = -reward.mean() + 0.1 * distill", (RID_LOSS,), "--lam ignored"),
        M("rid-distill-dropped", "rid.py", "loss = -reward.mean() + cfg.lam * distill", "loss = -reward.mean()",
          (RID_LOSS,), "RID degenerates to the baseline"),
        M("rid-latent-distance-zero", "rid.py", "distill = sq_norm(x0_s.float(), x0_t.float())",
          "distill = sq_norm(x0_s.float(), x0_s.float())", (RID_LOSS,), "distill_space=latent is a no-op"),
        M("rid-latent-distance-mse", "rid.py", "distill = sq_norm(x0_s.float(), x0_t.float())",
          "distill = (x0_s.float() - x0_t.float()).pow(2).mean()", (RID_LOSS,), "per-element mean, not ‖·‖²"),
        M("rid-pixel-distance-in-latents", "rid.py", "distill = sq_norm(img_s, img_t)",
          "distill = sq_norm(x0_s.float(), x0_t.float())", (RID_LOSS,), "pixel space measured on latents"),
        M("sq-norm-is-mse", "rid.py", "return (a - b).pow(2).flatten(1).sum(1).mean()", "return (a - b).pow(2).mean()",
          (RID_LOSS,), "the distance divided by C·H·W"),
        M("rid-teacher-is-student", "rid.py", "with torch.no_grad(), group.teacher():", "with torch.no_grad():",
          (RID_LOSS,), "the teacher runs the student's adapters"),
        M("rid-teacher-own-trajectory", "rid.py", "x0_t = denoise(models, text, z1, ddim, last, cfg.guidance)",
          "x0_t = denoise(models, text, noise.to(z1), ddim, range(cfg.steps), cfg.guidance)", (RID_Z1, RID_LOSS),
          "the teacher samples its own z₁ instead of the student's"),
        M("rid-z1-one-step-short", "rid.py", "ddim, range(cfg.steps - 1), cfg.guidance)",
          "ddim, range(cfg.steps - 2), cfg.guidance)", (RID_LOSS,), "the last step starts from z₂"),
    ),
    *section("sampling: classifier-free guidance (backbones/)",
        M("guidance-hardcoded-7.5", "backbones/__init__.py", "return out_u + guidance * (out_c - out_u)",
          "return out_u + 7.5 * (out_c - out_u)", (GUIDANCE, TRUNCATED), "--guidance ignored"),
        M("guidance-cond-uncond-swapped", "backbones/__init__.py", "out_u, out_c = self._forward(",
          "out_c, out_u = self._forward(",
          (GUIDANCE,), "guidance pushes away from the prompt"),
        M("guidance-uncond-is-prompt", "backbones/sd.py", "return torch.cat([uncond.expand_as(cond), cond])",
          "return torch.cat([cond, cond])", (GUIDANCE,), 'the unconditional branch is not the "" prompt'),
    ),
    *section("DRaFT family: baseline, DRaFT-K, DRaFT (rid.py)",
        M("draft-k-forced-1", "rid.py", '"draft-k": cfg.truncate,', '"draft-k": 1,', (TRUNCATED,),
          "--truncate ignored"),
        M("draft-k-one-too-many", "rid.py", '"draft-k": cfg.truncate,', '"draft-k": min(cfg.truncate + 1, cfg.steps),',
          (TRUNCATED,), "K+1 steps with gradient"),
        M("draft-is-K1", "rid.py", '"draft": cfg.steps,', '"draft": 1,', (TRUNCATED,),
          "DRaFT truncated to the last step"),
        M("baseline-is-K2", "rid.py", '"baseline": 1,', '"baseline": 2,', (TRUNCATED,), "baseline backprops 2 steps"),
        M("truncated-grad-through-all", "rid.py", "with torch.no_grad():  # steps N … K+1",
          "with contextlib.nullcontext():  # steps N … K+1", (TRUNCATED,), "no detach before step N−K"),
    ),
    *section("DRaFT family: DRaFT-LV (rid.py)",
        M("draft-lv-no-renoise", "rid.py", "z1 = ddim.add_noise(x0.detach(), _randn(x0.shape, x0, generator), t1)",
          "z1 = x0.detach()", (LV,), "the copies are not re-noised"),
        M("draft-lv-noise-not-from-generator", "rid.py", "_randn(x0.shape, x0, generator)",
          "_randn(x0.shape, x0, None)",
          (LV,), "re-noising ignores the seeded generator (breaks resume)"),
        M("draft-lv-renoise-at-first-t", "rid.py", "t1 = ddim.timestep(-1)", "t1 = ddim.timestep(0)",
          (LV,), "re-noised to the first timestep's level"),
        M("draft-lv-sum", "rid.py", "loss = -torch.stack(rewards).mean()", "loss = -torch.stack(rewards).sum()",
          (LV,), "sum instead of mean over the n+1 rewards"),
        M("draft-lv-copies-dropped", "rid.py", "rewards.append(score(models, reward_fn, x0_i, prompts).mean())",
          "score(models, reward_fn, x0_i, prompts).mean()", (LV,), "the copies' rewards never reach the loss"),
    ),
    *section("DRaFT family: ReFL (rid.py)",
        M("refl-wrong-timestep", "rid.py", "eps = models.predict(z_t, t, text, cfg.guidance)",
          "t = ddim.timestep(max(i - 1, 0)); eps = models.predict(z_t, t, text, cfg.guidance)",
          (REFL,), "x̂₀ predicted at the previous step's t"),
        M("refl-counts-from-start", "rid.py", "i = cfg.steps - j", "i = j - 1", (REFL,),
          "j counted from the first step"),
        M("refl-m-unscaled", "rid.py", "m = min(cfg.steps, max(1, round(cfg.refl_m * cfg.steps / 50)))",
          "m = min(cfg.steps, cfg.refl_m)", (REFL,), "m not scaled by steps/50"),
        M("refl-x0-is-a-ddim-step", "rid.py", "score(models, reward_fn, ddim.x0(eps, t, z_t), prompts)",
          "score(models, reward_fn, ddim.step(eps, t, z_t), prompts)",
          (REFL,), "one DDIM step instead of the direct x̂₀"),
    ),
    *section("R0: η-DDIM, per-reward normalisation, λ_w, R0+ (rid.py; η-DDIM in samplers.py)",
        M("r0-eta-always-zero", "rid.py",
          "etas = (lo + (hi - lo) * torch.rand(K, generator=generator, device=dev, dtype=torch.float64)).tolist()",
          "etas = [0.0] * K", (R0_CHAIN,), "no random η: deterministic DDIM whatever --eta-range says"),
        M("r0-one-eta-for-all-steps", "rid.py",
          "etas = (lo + (hi - lo) * torch.rand(K, generator=generator, device=dev, dtype=torch.float64)).tolist()",
          "etas = (lo + (hi - lo) * torch.rand(1, generator=generator, device=dev, dtype=torch.float64)).tolist() * K",
          (R0_CHAIN,), "one η drawn per sample chain instead of one per step"),
        M("r0-eta-range-ignored", "rid.py", "lo, hi = cfg.eta_range", "lo, hi = 0.0, 1.0", (R0_CHAIN,),
          "--eta-range ignored: always U[0, 1]"),
        M("r0-eta-noise-not-from-generator", "samplers.py", "randn(z.shape, z, generator) if",
          "randn(z.shape, z, None) if", (R0_CHAIN,),
          "an η > 0 step's fresh noise ignores the seeded generator (breaks resume)"),
        M("ddim-eta-sigma-missing-factor", "samplers.py",
          "sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5",
          "sigma = eta * ((1 - a_prev) / (1 - a_t)) ** 0.5", (R0_ETA_DDIM, SAMPLERS_ETA), "σ(η) is not DDIM's Eq. 16"),
        M("ddim-eta-eps-keeps-full-variance", "samplers.py", "(1 - a_prev - sigma ** 2) ** 0.5 * eps + sigma * noise",
          "(1 - a_prev) ** 0.5 * eps + sigma * noise", (R0_ETA_DDIM, SAMPLERS_ETA),
          "the direction term not shrunk by σ²: too much variance at η > 0"),
        M("r0-normalised-over-the-batch", "rid.py",
          "g = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (g.dim() - 1))",
          "g = g / g.norm().clamp_min(1e-12)", (R0_NORM,), "one norm for the whole batch, not per sample"),
        M("r0-normalised-weights-ignored", "rid.py", "direction += w * g", "direction += g", (R0_NORM,),
          "the reward weights w_i do not reach the normalised gradient"),
        M("r0-joint-normalised-as-one", "rid.py",
          'return getattr(reward_fn, "parts", None) or {"reward": (1.0, reward_fn)}',
          'return {"reward": (1.0, reward_fn)}', (R0_CHAIN,),
          "a joint reward normalised as one sum, not per reward"),
        M("r0-raw-grads-inverted", "rid.py", "normalize = cfg.steps, reward_parts(reward_fn), not cfg.raw_grads",
          "normalize = cfg.steps, reward_parts(reward_fn), cfg.raw_grads", (R0_CHAIN,),
          "--raw-grads inverted: the default step uses raw gradients"),
        M("r0-surrogate-summed-over-batch", "rid.py", "surrogate = -(d * images).flatten(1).sum(1).mean()",
          "surrogate = -(d * images).flatten(1).sum(1).sum()", (R0_NORM,),
          "the normalised gradient B times too large"),
        M("r0-loss-value-is-the-surrogate", "rid.py", "loss = surrogate - surrogate.detach() - total.mean()",
          "loss = surrogate", (R0_NORM,), "the logged/returned loss is not the weighted reward"),
        M("r0-lam-w-dropped", "rid.py", "loss = loss + cfg.lam_w * reg", "loss = loss + reg", (R0_REG,),
          "λ_w does not reach the regulariser"),
        M("r0-lam-w-hardcoded", "rid.py", "loss = loss + cfg.lam_w * reg", "loss = loss + DEFAULT_LAM_W * reg",
          (R0_REG,), "--lam-w ignored"),
        M("r0-reg-towards-zero", "rid.py", "reg = (group.flat - group.ema).pow(2).sum()",
          "reg = group.flat.pow(2).sum()", (R0_REG,), "weight decay towards 0, not towards θ₀"),
        M("r0-reg-mean", "rid.py", "reg = (group.flat - group.ema).pow(2).sum()",
          "reg = (group.flat - group.ema).pow(2).mean()", (R0_REG,), "‖θ − θ₀‖² divided by the parameter count"),
        M("r0-plus-no-stop-gradient", "rid.py", "z_j, t = z_j.detach(), ddim.timestep(j)",
          "z_j, t = z_j, ddim.timestep(j)", (R0_PLUS,), "R0+'s term backpropagates through the steps before j"),
        M("r0-plus-wrong-timestep", "rid.py", "z_j, t = z_j.detach(), ddim.timestep(j)",
          "z_j, t = z_j.detach(), ddim.timestep(j - 1)", (R0_PLUS,), "x̂₀ at step j predicted at step j−1's t"),
        M("r0-plus-term-dropped", "rid.py", "loss = loss + inter", "loss = loss + 0 * inter", (R0_PLUS,),
          "R0+ adds nothing to the gradient"),
        M("r0-plus-etas-restart", "rid.py", "etas[j:], generator)", "etas[:K - j], generator)", (R0_PLUS,),
          "after step j the η's start over from the first"),
    ),
    *section("LaSRO: Bradley–Terry, replay buffer, adaptation, running statistics (surrogate.py)",
        M("bt-sign-flipped", "surrogate.py", "sign = torch.sign(r[a] - r[b]).to(s.dtype)",
          "sign = torch.sign(r[b] - r[a]).to(s.dtype)", (BT, ADAPT), "the surrogate learns to prefer the worse sample"),
        M("bt-summed-over-pairs", "surrogate.py", "return F.softplus(-sign * (s[a] - s[b])).mean()",
          "return F.softplus(-sign * (s[a] - s[b])).sum()", (BT, ADAPT),
          "sum over pairs: the step grows with the batch"),
        M("bt-pairs-across-prompts", "surrogate.py", "keep = (ids[i] == ids[j]) & (s[i] != s[j])",
          "keep = s[i] != s[j]", (BT,), "pairs of different prompts (their rewards are not comparable)"),
        M("bt-pairs-keep-ties", "surrogate.py", "keep = (ids[i] == ids[j]) & (s[i] != s[j])",
          "keep = ids[i] == ids[j]", (BT,), "tied pairs ranked with sign 0"),
        M("buffer-pairs-ignore-prompt", "surrogate.py",
          'by_prompt.setdefault(p if self.cfg.pairs == "prompt" else 0, []).append(i)',
          "by_prompt.setdefault(0, []).append(i)", (FIFO, ADAPT), '--surrogate-pairs prompt draws any two samples'),
        M("buffer-pairs-allow-ties", "surrogate.py", "if r[ix[a]] != r[ix[b]]:", "if True:", (FIFO, ADAPT),
          "a sample paired with itself or a tie"),
        M("fifo-keeps-the-oldest", "surrogate.py", "del self.buf[key][:max(0, len(self.buf[key]) - self.cfg.buffer)]",
          "del self.buf[key][self.cfg.buffer:]", (FIFO, ADAPT), "a full buffer drops the new samples, not the old"),
        M("buffer-unbounded", "surrogate.py", "del self.buf[key][:max(0, len(self.buf[key]) - self.cfg.buffer)]",
          "pass", (FIFO, ADAPT), "--surrogate-buffer ignored"),
        M("adapt-never", "surrogate.py", "if k and self.steps % k == 0:", "if False:", (ADAPT,),
          "the surrogate is never adapted during training"),
        M("adapt-every-step", "surrogate.py", "if k and self.steps % k == 0:", "if k:", (ADAPT,),
          "--surrogate-adapt-every ignored (every step)"),
        M("frozen-ablation-adapts", "surrogate.py", "if k and self.steps % k == 0:",
          "if self.steps % max(k, 1) == 0:", (ADAPT, SUR_STATE), "adapt_every 0 still adapts: no frozen ablation"),
        M("adapt-steps-ignored", "surrogate.py", "self.fit(self.cfg.adapt_steps)", "self.fit(1)", (ADAPT,),
          "--surrogate-adapt-steps ignored"),
        M("adapt-no-optimizer-step", "surrogate.py", "self.opt.step()", "pass", (ADAPT, SUR_LEARNS),
          "Bradley–Terry steps compute a loss and never step"),
        M("stats-momentum-flipped", "surrogate.py",
          "self.mean = momentum * self.mean + (1 - momentum) * float(x.mean())",
          "self.mean = (1 - momentum) * self.mean + momentum * float(x.mean())", (ADAPT, SUR_LEARNS),
          "the running mean follows the batch, not the history"),
        M("stats-variance-not-tracked", "surrogate.py",
          "self.var = momentum * self.var + (1 - momentum) * float(x.var())", "self.var = self.var",
          (ADAPT, SUR_LEARNS), "the normalising std is frozen at pre-training's"),
        M("stats-not-tracked", "surrogate.py", "self.stats.track(scores, self.cfg.stats_momentum)", "pass",
          (ADAPT,), "the generator's reward normalised by stale statistics"),
        M("stats-not-set-after-pretraining", "surrogate.py", "        self.sur.refresh_stats()\n", "",
          (SUR_TASK,), "training starts with mean 0, std 1 instead of the buffer's statistics"),
        M("after-step-passes-no-scores", "surrogate.py", "if self.sur.observe(z, pid, r, raw):",
          "if self.sur.observe(z, pid, r):", (SUR_TASK,), "train.py's steps never move the running statistics"),
        M("reward-not-normalised", "surrogate.py", "return self.stats.normalise(self.score(z, pid))",
          "return self.score(z, pid)", (SUR_LEARNS,), "the generator maximises the raw score"),
        M("held-out-prompts-in-the-buffer", "surrogate.py", "self.sur.add(z[:cut], pid[:cut], r[:cut])",
          "self.sur.add(z, pid, r)", (SUR_TASK,), "the held-out pair accuracy is measured on training data"),
    ),
    *section("LoRA export: diffusers and kohya files (checkpoint.py, backbones/)",
        M("export-scale-dropped", "checkpoint.py", "B = torch.cat([s * t[name][1] for s, t in zip(",
          "B = torch.cat([t[name][1] for s, t in zip(", (EXPORT,), "the tasks' scales s_i not in the file"),
        M("export-scale-squared", "checkpoint.py", "B = torch.cat([s * t[name][1] for s, t in zip(",
          "B = torch.cat([s * s * t[name][1] for s, t in zip(", (EXPORT,), "s_i² instead of s_i in the product"),
        M("export-last-task-only", "checkpoint.py",
          "per_task = [group.task_tensors(i) for i in range(len(group.tasks))]",
          "per_task = [group.task_tensors(len(group.tasks) - 1)]", (EXPORT,), "the frozen tasks are not exported"),
        M("export-key-map-drops-the-prefix", "backbones/__init__.py",
          'return f"{self.lora_prefix}.{layer}.lora_A.weight", f"{self.lora_prefix}.{layer}.lora_B.weight"',
          'return f"{layer}.lora_A.weight", f"{self.lora_prefix}.{layer}.lora_B.weight"', (EXPORT,),
          "the diffusers key map loses 'unet.' on A: diffusers finds no UNet key for it"),
        M("export-kohya-alpha-of-one-task", "checkpoint.py", "alpha: torch.tensor(float(A.shape[0]))})",
          "alpha: torch.tensor(float(A.shape[0] // len(per_task)))})", (EXPORT_BOTH,),
          "kohya alpha = r (one task's rank) at rank T·r: the loader scales the sum by 1/T"),
    ),
    *section("kernels (rid_kernels/)",
        M("jpeg-table-clamp-0", "rid_kernels/jpeg.py", "t = ((t * scale + 50) // 100).clamp(1, 255)",
          "t = ((t * scale + 50) // 100).clamp(0, 255)",
          ("tests/test_jpeg.py::test_quality_tables_are_libjpegs_at_every_quality",
           "tests/test_jpeg.py::test_extreme_qualities_are_finite"), "quality 100: zero quantiser, NaN"),
        M("jpeg-chroma-gets-luma-table", "rid_kernels/jpeg.py", "for base in (_LUMA_K1, _CHROMA_K2):",
          "for base in (_LUMA_K1, _LUMA_K1):",
          ("tests/test_jpeg.py::test_quality_tables_are_libjpegs_at_every_quality",),
          "wrong chroma table"),
        M("jpeg-no-rounding", "rid_kernels/jpeg.py", "return yr + (y - yr) ** 3", "return y",
          ("tests/test_jpeg.py::test_close_to_pil_and_reproduces_its_artefacts",), "reference JPEG quantises nothing"),
        M("jpeg-straight-through-rounding", "rid_kernels/jpeg.py", "return yr + (y - yr) ** 3",
          "return y + (yr - y).detach()", ("tests/test_jpeg.py::test_compress_reward_gradient_sees_quantisation",),
          "straight-through rounding: the compress reward's luma gradient is zero"),
        M("jpeg-triton-bwd-straight-through", "rid_kernels/jpeg.py", "* (3.0 * d * d)  # (G Kᵀ) ⊙ r'(Y)",
          "* (1.0 + 0.0 * d)  # (G Kᵀ) ⊙ r'(Y)", ("tests/test_jpeg.py::test_triton_matches_reference",),
          "Triton backward ignores the rounding derivative"),
        M("jpeg-ycc-constant", "rid_kernels/jpeg.py", "_RGB2YCC = ((0.299, 0.587, 0.114),",
          "_RGB2YCC = ((0.299, 0.587, 0.144),",
          ("tests/test_jpeg.py::test_close_to_pil_and_reproduces_its_artefacts",), "wrong JFIF luma weights"),
        M("ema-kernel-weight-swapped", "rid_kernels/ema.py", "out = tl.fma(d, w, t)", "out = tl.fma(d, 1.0 - w, t)",
          ("tests/test_ema.py::test_matches_formula",), "Triton EMA: α and 1−α swapped (α > 0.5)"),
        M("ema-torch-weight-swapped", "rid_kernels/ema.py", "teacher.lerp_(student, 1.0 - float(alpha))",
          "teacher.lerp_(student, float(alpha))", ("tests/test_ema.py::test_matches_formula", EMA_STEP),
          "CPU EMA path (what rid runs without a GPU): α and 1−α swapped"),
        M("lora-scale-ignored-reference", "rid_kernels/lora_group.py",
          "        h = h * (s_rep if s_rep.dtype == dt else s_rep.to(dt))\n",
          "        h = h\n", ("tests/test_lora_group.py::test_forward_and_grads_match_oracles",),
          "reference LoRA ignores the per-task scale"),
        M("lora-scale-ignored-triton", "rid_kernels/lora_group.py", "hs = (h * s[None, :]).to(cdt)", "hs = h.to(cdt)",
          ("tests/test_lora_group.py::test_forward_and_grads_match_oracles",), "fused LoRA ignores the per-task scale"),
        M("lora-dB-unscaled", "rid_kernels/lora_group.py", "dBs[t] = (_mm_f32(dy.t(), h[:, cols]) * s)",
          "dBs[t] = (_mm_f32(dy.t(), h[:, cols]))", ("tests/test_lora_group.py::test_forward_and_grads_match_oracles",),
          "dB_t misses its scale s_t"),
    ),
    *section("rewards (rewards.py)",
        M("clip-normalisation-removed", "rewards.py", "return (x - mean) / std  # (N, 3, size, size)",
          "return x  # (N, 3, size, size)", ("tests/test_rewards.py::test_aesthetic_equals_direct_open_clip",),
          "CLIP mean/std not applied"),
        M("aesthetic-embedding-not-normalised", "rewards.py",
          'emb = _encode_images(model, images, "shortest", normalize=True)',
          'emb = _encode_images(model, images, "shortest", normalize=False)',
          ("tests/test_rewards.py::test_aesthetic_equals_direct_open_clip",),
          "LAION MLP fed an unnormalised embedding"),
        M("hps-logit-scaled", "rewards.py", "return (img * txt).sum(-1)  # (N,) cosine",
          "return 100 * (img * txt).sum(-1)  # (N,) cosine",
          ("tests/test_rewards.py::test_hps_equals_direct_open_clip",),
          "HPS is not the plain cosine"),
        M("compress-sign-flipped", "rewards.py", "return -(x - rid_kernels.jpeg(x, quality=q))",
          "return (x - rid_kernels.jpeg(x, quality=q))",
          ("tests/test_rewards.py::test_compress_zero_for_constant_and_drops_with_noise",), "compression penalised"),
        M("joint-weights-ignored", "rewards.py", "return sum(w * fns[name](images, prompts)",
          "return sum(fns[name](images, prompts)", ("tests/test_rewards.py::test_joint_is_the_weighted_sum",),
          "joint reward ignores its weights"),
    ),
    *section("training step: DDP (rid.py)",
        M("ddp-no-all-reduce", "rid.py", "torch.distributed.all_reduce(flat.grad)", "pass",
          (DDP,), "each rank steps on its own gradient (halved)"),
        M("ddp-sum-not-mean", "rid.py", "flat.grad.div_(torch.distributed.get_world_size())", "pass",
          (DDP,), "ranks' gradients summed, not averaged"),
    ),
    *section("checkpoint: soup, save, load (checkpoint.py)",
        M("soup-weights-reversed", "checkpoint.py", "in enumerate(zip(weights, saved)):",
          "in enumerate(zip(weights[::-1], saved)):", (SOUP,), "run j gets the weight of run n−1−j"),
        M("soup-reads-first-run-for-all", "checkpoint.py", "in enumerate(zip(weights, saved)):",
          "in enumerate(zip(weights, [saved[0]] * len(saved))):", (SOUP,), "every soup entry is run 1"),
        M("load-drops-ema", "checkpoint.py", 'group.ema.copy_(tensors["ema"])', "pass",
          (ROUND_TRIP,), "a loaded group's teacher is zero, not the saved EMA"),
        M("save-skips-first-task", "checkpoint.py", "for i in range(len(group.tasks)):\n        for name, (A, B)",
          "for i in range(1, len(group.tasks)):\n        for name, (A, B)", (SOUP, ROUND_TRIP),
          "adapters.safetensors lacks task 0"),
    ),
    *section("train.py",
        M("lr-schedule-off-by-one", "train.py", "lr_now = lr_at(lr, step, total,",
          "lr_now = lr_at(lr, step + 1, total,",
          (FIRST_STEP,), "step s runs at the lr of step s+1 (cosine: the last step at 0)"),
        M("ema-flag-not-passed", "train.py", "for f in fields(rid.StepConfig)})",
          'for f in fields(rid.StepConfig) if f.name != "ema"})', (FIRST_STEP,), "--ema ignored: always 0.99"),
        M("resume-boundary-loads-first-stage", "train.py", 'Path(cfg.out) / f"stage{k - 1}-{cfg.tasks[k - 2]}")',
          'Path(cfg.out) / f"stage1-{cfg.tasks[0]}")', (RESUME_BOUNDARY,),
          "resuming at stage k loads stage 1's adapters, not stage k−1's"),
        M("resume-boundary-starts-fresh", "train.py", "    if k == 1:\n        group = rid.group_of(",
          "    if True:\n        group = rid.group_of(", (RESUME_BOUNDARY,),
          "resuming at a stage boundary forgets the finished stages' adapters"),
        M("train-joint-weights-dropped", "train.py", "rewards.joint(cfg.joint, spec, cfg.device)",
          "rewards.joint(dict.fromkeys(cfg.joint, 1.0), spec, cfg.device)", (JOINT,), "--joint weights ignored"),
    ),
    *section("reliability: locks and child processes (checkpoint.py, experiments/)",
        M("stale-lock-never-taken-over", "checkpoint.py", "    except ProcessLookupError:\n        return False",
          "    except ProcessLookupError:\n        return True",
          ("tests/test_reliability.py::test_stale_lock_is_taken_over_and_a_foreign_host_refused",),
          "a lock left by a dead process blocks the run directory for ever"),
        M("runs-outlive-a-killed-experiment", "experiments/common.py", "_PRCTL(1, 15)  # SIGTERM", "pass  # SIGTERM",
          ("tests/test_experiment.py::test_a_killed_experiment_takes_its_runs_with_it",),
          "kill -9 of an experiment leaves its training runs writing"),
    ),
    *section("eval.py",
        M("forgetting-range-excludes-last", "eval.py",
          "return max(m - last for m in values) if higher_is_better else max(last - m for m in values)",
          "return max(m - last for m in values[:-1]) if higher_is_better else max(last - m for m in values[:-1])",
          (EVAL_OVERRIDES, FORGETTING_EVAL),
          "Eq. 3 over i < T only: F < 0 for a metric that improved"),
        M("noise-seed-ignores-image-index", "eval.py", 'f"{seed}/{p}/{i}"', 'f"{seed}/{p}"', (EVAL_OVERRIDES,),
          "every image of a prompt starts from the same noise"),
        M("eval-steps-override-ignored", "eval.py",
          "value = cfg.get(name, default) if getattr(s, name) is None else getattr(s, name)",
          "value = cfg.get(name, default)", (EVAL_OVERRIDES,), "--steps / --guidance ignored: the run's own"),
        M("eval-guidance-zero-replaced", "eval.py",
          "value = cfg.get(name, default) if getattr(s, name) is None else getattr(s, name)",
          "value = getattr(s, name) or cfg.get(name, default)", (GUIDANCE_ZERO,),
          "--guidance 0 falls back to the run's guidance"),
    ),
]


# ------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------

def copy_tree(dst: Path) -> None:
    """The working tree as git sees it (tracked + untracked, minus ignored) into dst."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, check=True).stdout
        files = [f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything but the usual junk
        skip = {".git", ".venv", "out", "__pycache__", ".pytest_cache"}
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]
    for f in files:
        src = ROOT / f
        if not src.is_file():  # deleted in the worktree but still in the index
            continue
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / f)


def why_stale(m: Mutant, tree: Path) -> str | None:
    """None when the mutant applies to `tree` (its old text occurs exactly once), else why not."""
    path = tree / m.file
    if not path.is_file():
        return f"{m.file} not found"
    n = path.read_text().count(m.old)
    return None if n == 1 else f"old text {'not found' if n == 0 else f'found {n} times'} in {m.file}: {m.old!r}"


def apply(m: Mutant, tree: Path) -> None:
    path = tree / m.file
    path.write_text(path.read_text().replace(m.old, m.new))


def env_for(tree: Path) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(tree))
    env.pop("RID_KERNELS", None)
    return env


def run_pytest(tree: Path, tests: tuple, timeout: float) -> tuple:
    """(return code or 'timeout', seconds, output tail)."""
    # -o addopts=: not pytest.ini's `-n auto` (xdist workers for a handful of tests, and -x that does
    # not stop the other worker); one process, the tests in the order given
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tree, env=env_for(tree), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # pytest and anything it started (DDP workers)
        out, _ = proc.communicate()
        rc = "timeout"
    except BaseException:  # Ctrl-C: its own session does not get the terminal's SIGINT
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    lines = out.strip().splitlines()
    first_e = [l[1:].strip() for l in lines if l.startswith("E ") and l[1:].strip()][:1]
    return rc, time.perf_counter() - t0, "\n".join(first_e + lines[-6:])


def reason(tail: str) -> str:
    """How a caught mutant failed, from pytest's first "E" line: "assert" when an oracle saw it;
    "crash: <exception>" when the mutant broke the code instead (a weaker catch)."""
    first = tail.splitlines()[0] if tail else ""
    if first.startswith(("assert ", "AssertionError", "Failed:")):
        return "assert"
    return f"crash: {first.split(':', 1)[0][:30]}" if first else "?"


def check_imports(tree: Path) -> None:
    """The copy's product modules must be the ones imported (not an installed or the original copy)."""
    code = "import sys, rid, rewards, rid_kernels; print('\\n'.join(m.__file__ for m in (rid, rewards, rid_kernels)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env_for(tree), capture_output=True, text=True)
    paths = out.stdout.split()
    if out.returncode or not paths or not all(Path(p).resolve().is_relative_to(tree.resolve()) for p in paths):
        sys.exit(f"mutants: the copy in {tree} does not import its own modules ({out.stdout.strip()} "
                 f"{out.stderr.strip()[-300:]}); nothing would be mutated")


def status_of(rc) -> str:
    return {0: "SURVIVED", 1: "caught", 4: "no-tests", 5: "no-tests", "timeout": "timeout"}.get(rc, "error")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tests/mutants.py", description=__doc__.split("\n")[0])
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run these mutants (repeatable, or comma-separated)")
    p.add_argument("--file", action="append", default=[], help="run the mutants of this product file (e.g. rid.py)")
    p.add_argument("--list", action="store_true", help="list the mutants and their tests; run nothing")
    p.add_argument("--no-baseline", action="store_true", help="skip running each test set on the unmutated copy")
    p.add_argument("--timeout", type=float, default=600, help="seconds per pytest run (default 600)")
    p.add_argument("--keep", action="store_true", help="keep the temporary copies (paths printed)")
    a = p.parse_args(argv)

    names = {n for group in a.only for n in group.split(",") if n}
    unknown = names - {m.name for m in MUTANTS}
    if unknown:
        p.error(f"--only {sorted(unknown)}: no such mutant; known: {', '.join(m.name for m in MUTANTS)}")
    chosen = [m for m in MUTANTS if (not names or m.name in names) and (not a.file or m.file in a.file)]
    if a.list:  # grouped by method, with whether each still applies to the working tree
        for group in dict.fromkeys(m.group for m in chosen):
            ms = [m for m in chosen if m.group == group]
            print(f"\n== {group} ({len(ms)}) ==")
            for m in ms:
                why = why_stale(m, ROOT)
                print(f"{m.name:36s} {m.file:22s} {'STALE' if why else 'ok':5s}  {m.why}\n{'':36s} "
                      f"caught by: {' '.join(m.tests)}" + (f"\n{'':36s} {why}" if why else ""))
        print(f"\n{len(chosen)} mutants")
        return 0
    if not chosen:
        p.error("no mutant selected")

    work = Path(tempfile.mkdtemp(prefix="rid-mutants-"))
    results = []  # (mutant, status, seconds, detail)
    try:
        clean = work / "clean"
        copy_tree(clean)
        check_imports(clean)
        stale = {m.name: why_stale(m, clean) for m in chosen}
        baseline = {}
        if not a.no_baseline:
            for tests in dict.fromkeys(m.tests for m in chosen if not stale[m.name]):
                rc, sec, tail = run_pytest(clean, tests, a.timeout)
                baseline[tests] = (rc, tail)
                print(f"baseline  {'passes' if rc == 0 else 'FAILS':9s} {sec:6.1f}s  {' '.join(tests)}", flush=True)
        for i, m in enumerate(chosen):
            if stale[m.name]:
                results.append((m, "stale", 0.0, stale[m.name]))
            elif baseline.get(m.tests, (0, ""))[0] != 0:
                rc, tail = baseline[m.tests]
                st = "no-tests" if status_of(rc) == "no-tests" else "error"
                results.append((m, st, 0.0, "the tests do not pass without the mutation:\n" + tail))
            else:
                tree = work / f"m{i:02d}"
                shutil.copytree(clean, tree)
                apply(m, tree)
                rc, sec, tail = run_pytest(tree, m.tests, a.timeout)
                results.append((m, status_of(rc), sec, reason(tail) if rc == 1 else tail))
                if not a.keep:
                    shutil.rmtree(tree, ignore_errors=True)
            _, st, sec, _ = results[-1]
            print(f"{st:9s} {sec:6.1f}s  {m.name}", flush=True)
    finally:
        if a.keep:
            print(f"copies kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'mutant':36s} {'file':22s} {'status':9s} {'time':>7s}  {'how':14s} tests")
    for m, st, sec, detail in results:
        how = detail if st == "caught" else ""
        print(f"{m.name:36s} {m.file:22s} {st:9s} {sec:6.1f}s  {how:14s} "
              f"{' '.join(t.split('::')[-1] for t in m.tests)}")
    bad = [(m, st, detail) for m, st, _, detail in results if st != "caught"]
    for m, st, detail in bad:
        print(f"\n{st}: {m.name} ({m.why})\n  {detail.replace(chr(10), chr(10) + '  ')}")
    counts = {s: sum(st == s for _, st, _, _ in results) for s in dict.fromkeys(st for _, st, _, _ in results)}
    print("\n" + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
