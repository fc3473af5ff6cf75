"""Planted bugs: one-line mutations of the product code, each with the tests that must catch it.

    python tests/mutants.py                   every mutant (62: ≈ 35 min on 2 busy CPU cores)
    python tests/mutants.py --only NAME ...   the named mutants (repeat or comma-separate)
    python tests/mutants.py --file rid.py     the mutants of one product file
    python tests/mutants.py --list            the list, and whether each still applies; nothing run

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
from dataclasses import dataclass
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

MUTANTS = [
    # -- rid.py: RID's teacher -------------------------------------------------------------------
    M("ema-update-deleted", "rid.py", "group.ema_update(cfg.ema)", "pass", (EMA_STEP,),
      "RID's teacher never moves"),
    M("ema-alpha-hardcoded", "rid.py", "group.ema_update(cfg.ema)", "group.ema_update(DEFAULT_EMA)", (EMA_STEP,),
      "StepConfig.ema (--ema) ignored"),
    M("ema-alpha-flipped", "rid.py", "group.ema_update(cfg.ema)", "group.ema_update(1 - cfg.ema)", (EMA_STEP,),
      "α and 1−α swapped"),
    M("ema-for-every-method", "rid.py", 'if cfg.method == "rid":\n        group.ema_update',
      'if True:\n        group.ema_update', (OTHERS_NO_EMA,), "baselines move a teacher they do not have"),
    M("ema-updates-student", "rid.py", "rid_kernels.ema_(self.ema, self.flat.detach(), alpha)",
      "rid_kernels.ema_(self.flat.detach(), self.ema, alpha)", (EMA_STEP,), "teacher and student swapped in the EMA"),
    # -- rid.py: RID's loss ----------------------------------------------------------------------
    M("rid-lambda-dropped", "rid.py", "loss = -reward.mean() + cfg.lam * distill", "loss = -reward.mean() + distill",
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
    M("rid-teacher-own-trajectory", "rid.py", "x0_t = _denoise(models, text, z1, ddim, last, cfg.guidance)",
      "x0_t = _denoise(models, text, noise.to(z1), ddim, range(cfg.steps), cfg.guidance)", (RID_Z1, RID_LOSS),
      "the teacher samples its own z₁ instead of the student's"),
    M("rid-z1-one-step-short", "rid.py", "ddim, range(cfg.steps - 1), cfg.guidance)",
      "ddim, range(cfg.steps - 2), cfg.guidance)", (RID_LOSS,), "the last step starts from z₂"),
    # -- rid.py: guidance ------------------------------------------------------------------------
    M("guidance-hardcoded-7.5", "rid.py", "return eps_u + guidance * (eps_c - eps_u)",
      "return eps_u + 7.5 * (eps_c - eps_u)", (GUIDANCE, TRUNCATED), "--guidance ignored"),
    M("guidance-cond-uncond-swapped", "rid.py", "eps_u, eps_c = models.unet(", "eps_c, eps_u = models.unet(",
      (GUIDANCE,), "guidance pushes away from the prompt"),
    M("guidance-uncond-is-prompt", "rid.py", "return torch.cat([models._uncond.expand_as(cond), cond])",
      "return torch.cat([cond, cond])", (GUIDANCE,), 'the unconditional branch is not the "" prompt'),
    # -- rid.py: baseline, draft-k, draft --------------------------------------------------------
    M("draft-k-forced-1", "rid.py", '"draft-k": cfg.truncate,', '"draft-k": 1,', (TRUNCATED,), "--truncate ignored"),
    M("draft-k-one-too-many", "rid.py", '"draft-k": cfg.truncate,', '"draft-k": min(cfg.truncate + 1, cfg.steps),',
      (TRUNCATED,), "K+1 steps with gradient"),
    M("draft-is-K1", "rid.py", '"draft": cfg.steps,', '"draft": 1,', (TRUNCATED,), "DRaFT truncated to the last step"),
    M("baseline-is-K2", "rid.py", '"baseline": 1,', '"baseline": 2,', (TRUNCATED,), "baseline backprops 2 steps"),
    M("truncated-grad-through-all", "rid.py", "with torch.no_grad():  # steps N … K+1",
      "with contextlib.nullcontext():  # steps N … K+1", (TRUNCATED,), "no detach before step N−K"),
    # -- rid.py: draft-lv ------------------------------------------------------------------------
    M("draft-lv-no-renoise", "rid.py", "z1 = ddim.add_noise(x0.detach(), _randn(x0.shape, x0, generator), t1)",
      "z1 = x0.detach()", (LV,), "the copies are not re-noised"),
    M("draft-lv-noise-not-from-generator", "rid.py", "_randn(x0.shape, x0, generator)", "_randn(x0.shape, x0, None)",
      (LV,), "re-noising ignores the seeded generator (breaks resume)"),
    M("draft-lv-renoise-at-first-t", "rid.py", "t1 = int(ddim.timesteps[-1])", "t1 = int(ddim.timesteps[0])",
      (LV,), "re-noised to the first timestep's level"),
    M("draft-lv-sum", "rid.py", "loss = -torch.stack(rewards).mean()", "loss = -torch.stack(rewards).sum()",
      (LV,), "sum instead of mean over the n+1 rewards"),
    M("draft-lv-copies-dropped", "rid.py", "rewards.append(score(models, reward_fn, x0_i, prompts).mean())",
      "score(models, reward_fn, x0_i, prompts).mean()", (LV,), "the copies' rewards never reach the loss"),
    # -- rid.py: refl ----------------------------------------------------------------------------
    M("refl-wrong-timestep", "rid.py", "eps = _eps(models, z_t, t, text, cfg.guidance)",
      "t = int(ddim.timesteps[max(i - 1, 0)]); eps = _eps(models, z_t, t, text, cfg.guidance)",
      (REFL,), "x̂₀ predicted at the previous step's t"),
    M("refl-counts-from-start", "rid.py", "i = cfg.steps - j", "i = j - 1", (REFL,), "j counted from the first step"),
    M("refl-m-unscaled", "rid.py", "m = min(cfg.steps, max(1, round(cfg.refl_m * cfg.steps / 50)))",
      "m = min(cfg.steps, cfg.refl_m)", (REFL,), "m not scaled by steps/50"),
    M("refl-x0-is-a-ddim-step", "rid.py", "score(models, reward_fn, ddim.x0(eps, t, z_t), prompts)",
      "score(models, reward_fn, ddim.step(eps, t, z_t), prompts)",
      (REFL,), "one DDIM step instead of the direct x̂₀"),
    # -- kernels ---------------------------------------------------------------------------------
    M("jpeg-table-clamp-0", "rid_kernels/jpeg.py", "t = ((t * scale + 50) // 100).clamp(1, 255)",
      "t = ((t * scale + 50) // 100).clamp(0, 255)",
      ("tests/test_jpeg.py::test_quality_tables_are_libjpegs_at_every_quality",
       "tests/test_jpeg.py::test_extreme_qualities_are_finite"), "quality 100: zero quantiser, NaN"),
    M("jpeg-chroma-gets-luma-table", "rid_kernels/jpeg.py", "for base in (_LUMA_K1, _CHROMA_K2):",
      "for base in (_LUMA_K1, _LUMA_K1):", ("tests/test_jpeg.py::test_quality_tables_are_libjpegs_at_every_quality",),
      "wrong chroma table"),
    M("jpeg-no-rounding", "rid_kernels/jpeg.py", "return yr + (y - yr) ** 3", "return y",
      ("tests/test_jpeg.py::test_close_to_pil_and_reproduces_its_artefacts",), "reference JPEG quantises nothing"),
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
    M("lora-scale-ignored-reference", "rid_kernels/lora_group.py", "        h = h * (s_rep if s_rep.dtype == dt else s_rep.to(dt))\n",
      "        h = h\n", ("tests/test_lora_group.py::test_forward_and_grads_match_oracles",),
      "reference LoRA ignores the per-task scale"),
    M("lora-scale-ignored-triton", "rid_kernels/lora_group.py", "hs = (h * s[None, :]).to(cdt)", "hs = h.to(cdt)",
      ("tests/test_lora_group.py::test_forward_and_grads_match_oracles",), "fused LoRA ignores the per-task scale"),
    M("lora-dB-unscaled", "rid_kernels/lora_group.py", "dBs[t] = (_mm_f32(dy.t(), h[:, cols]) * s)",
      "dBs[t] = (_mm_f32(dy.t(), h[:, cols]))", ("tests/test_lora_group.py::test_forward_and_grads_match_oracles",),
      "dB_t misses its scale s_t"),
    # -- rewards.py ------------------------------------------------------------------------------
    M("clip-normalisation-removed", "rewards.py", "return (x - mean) / std  # (N, 3, size, size)",
      "return x  # (N, 3, size, size)", ("tests/test_rewards.py::test_aesthetic_equals_direct_open_clip",),
      "CLIP mean/std not applied"),
    M("aesthetic-embedding-not-normalised", "rewards.py",
      'emb = _encode_images(model, images, "shortest", normalize=True)',
      'emb = _encode_images(model, images, "shortest", normalize=False)',
      ("tests/test_rewards.py::test_aesthetic_equals_direct_open_clip",), "LAION MLP fed an unnormalised embedding"),
    M("hps-logit-scaled", "rewards.py", "return (img * txt).sum(-1)  # (N,) cosine",
      "return 100 * (img * txt).sum(-1)  # (N,) cosine", ("tests/test_rewards.py::test_hps_equals_direct_open_clip",),
      "HPS is not the plain cosine"),
    M("compress-sign-flipped", "rewards.py", "return -(x - rid_kernels.jpeg(x, quality=q))",
      "return (x - rid_kernels.jpeg(x, quality=q))",
      ("tests/test_rewards.py::test_compress_zero_for_constant_and_drops_with_noise",), "compression penalised"),
    M("joint-weights-ignored", "rewards.py", "return sum(w * fns[name](images, prompts)",
      "return sum(fns[name](images, prompts)", ("tests/test_rewards.py::test_joint_is_the_weighted_sum",),
      "joint reward ignores its weights"),
    # -- rid.py: DDP ---------------------------------------------------------------------------
    M("ddp-no-all-reduce", "rid.py", "torch.distributed.all_reduce(flat.grad)", "pass",
      (DDP,), "each rank steps on its own gradient (halved)"),
    M("ddp-sum-not-mean", "rid.py", "flat.grad.div_(torch.distributed.get_world_size())", "pass",
      (DDP,), "ranks' gradients summed, not averaged"),
    # -- checkpoint.py ---------------------------------------------------------------------------
    M("soup-weights-reversed", "checkpoint.py", "in enumerate(zip(weights, saved)):",
      "in enumerate(zip(weights[::-1], saved)):", (SOUP,), "run j gets the weight of run n−1−j"),
    M("soup-reads-first-run-for-all", "checkpoint.py", "in enumerate(zip(weights, saved)):",
      "in enumerate(zip(weights, [saved[0]] * len(saved))):", (SOUP,), "every soup entry is run 1"),
    M("load-drops-ema", "checkpoint.py", 'group.ema.copy_(tensors["ema"])', "pass",
      (ROUND_TRIP,), "a loaded group's teacher is zero, not the saved EMA"),
    M("save-skips-first-task", "checkpoint.py", "for i in range(len(group.tasks)):\n        for name, (A, B)",
      "for i in range(1, len(group.tasks)):\n        for name, (A, B)", (SOUP, ROUND_TRIP),
      "adapters.safetensors lacks task 0"),
    # -- train.py --------------------------------------------------------------------------------
    M("lr-schedule-off-by-one", "train.py", "lr_now = lr_at(lr, step, total,", "lr_now = lr_at(lr, step + 1, total,",
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
    # -- eval.py ---------------------------------------------------------------------------------
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
    if a.list:  # with whether each still applies to the working tree
        for m in chosen:
            why = why_stale(m, ROOT)
            print(f"{m.name:36s} {m.file:22s} {'STALE' if why else 'ok':5s}  {m.why}\n{'':36s} {' '.join(m.tests)}"
                  + (f"\n{'':36s} {why}" if why else ""))
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
