"""The pieces end to end, each against an oracle computed outside the code path it checks.

    resume at a stage boundary   a hard crash after stage 2 finished, before stage 3's first step
                                 (tests/train_launcher.py --die-after-step), then --resume: every
                                 stage's adapters bit-identical to an uninterrupted run
    --joint with three rewards   the reward train.py logs = Σ w_i R_i recomputed on the very images
                                 each reward was given (recorded), unequal weights
    train.py's first step        the saved student = rid.train_step on the documented batch, noise,
                                 LoRA init and lr (seed_of, batch_prompts, AdamW from config.json);
                                 the saved EMA = α·init + (1−α)·student for the --ema given
    eval --steps / --guidance    the report's metrics = those of rid.sample at the overriding steps and
                                 guidance (≠ the run's own); --guidance 0 is used as 0; every image has
                                 its own noise, shared by the stages; forgetting by hand (Eq. 3)

Tiny SD (tests/tiny.py), a tiny-CLIP reward spec (tests/test_rewards.py's tiny_spec), DDIM 2–3
steps, 1 optimizer step per stage, batch 2. tests/mutants.py plants the bugs these must catch.
"""
import inspect
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import checkpoint
import eval as ev
import rewards
import rid
import tiny
import train
from test_rewards import tiny_spec

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = str(ROOT / "tests" / "train_launcher.py")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    prompts = tiny.write_prompts(d / "prompts.txt")
    (d / "spec").mkdir()
    tiny_spec(d / "spec")
    return SimpleNamespace(dir=d, sd=tiny.tiny_sd(d / "sd"), prompts=str(prompts),
                           spec=str(d / "spec" / "rewards.json"))


def tiny_args(world, out, *extra):
    """DDIM 2, batch 2 as 2 micro-batches of 1, 1 optimizer step per task, lr 1e-2."""
    return ["--model", world.sd, "--prompts", world.prompts, "--steps", "2", "--batch", "2", "--micro-batch", "1",
            "--max-steps", "1", "--lr", "1e-2", "--ckpt-every", "1", "--device", "cpu", "--out", str(out), *extra]


def adapters(stage_dir):
    return load_file(str(Path(stage_dir) / "adapters.safetensors"))


def counting_toy_reward(mp):
    """Every task's reward becomes tiny.toy_reward; returns the list its calls are appended to."""
    calls = []

    def reward(images, prompts):
        calls.append(list(prompts))
        return tiny.toy_reward(images, prompts)

    mp.setattr(train, "reward_fn", lambda task, cfg: reward)
    return calls


#### RESUME AT A STAGE BOUNDARY ####

TASKS3 = ("--tasks", "aesthetic,hps,compress")
STAGES3 = ["stage1-aesthetic", "stage2-hps", "stage3-compress"]


@pytest.fixture(scope="module")
def reference_run(world):
    """Three tasks, one step each, uninterrupted (in this process)."""
    out = world.dir / "reference"
    with pytest.MonkeyPatch.context() as mp:
        counting_toy_reward(mp)
        assert train.main(tiny_args(world, out, *TASKS3)) == 0
    return out


def test_resume_at_a_stage_boundary_is_bit_exact(world, reference_run, tmp_path, monkeypatch):
    """The crash falls after stage 2 finished (adapters saved, run.json lists it) and before stage 3
    wrote any checkpoint: --resume must rebuild the group from stage 2's adapters (not stage 1's, not a
    fresh one) and train stage 3 from its seeded init. Stage 2 → 3, not 1 → 2, so that loading
    "the first stage" instead of "the previous one" is told apart."""
    out = tmp_path / "crashed"
    # train_launcher ends the process as optimizer step N+1 starts: N = 2 = stages 1 and 2 (one step each)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, LAUNCHER, "--reward", "tiny:toy_reward", "--die-after-step", "2", "--",
                        *tiny_args(world, out, *TASKS3)], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 17, p.stderr[-2000:]
    assert json.loads((out / "run.json").read_text())["stages"] == STAGES3[:2]
    assert checkpoint.find_ckpt(out / "stage3-compress") is None  # nothing of stage 3 to resume from
    assert not (out / "stage3-compress" / "adapters.safetensors").exists()

    calls = counting_toy_reward(monkeypatch)
    assert train.main(tiny_args(world, out, *TASKS3, "--resume")) == 0
    assert len(calls) == 2  # only stage 3's step ran: its two micro-batches
    assert json.loads((out / "run.json").read_text())["stages"] == STAGES3
    for stage in STAGES3:
        ref, got = adapters(reference_run / stage), adapters(out / stage)
        assert sorted(got) == sorted(ref), stage  # the same tasks and layers (and the EMA)
        for key in ref:
            assert torch.equal(got[key], ref[key]), (stage, key)
    meta = json.loads((out / "stage3-compress" / "adapters.json").read_text())
    assert meta["tasks"] == ["aesthetic", "hps", "compress"]
    rows = [json.loads(l) for l in (out / "stage3-compress" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]


#### --joint WITH THREE REWARDS; train.py's FIRST STEP AND ITS EMA ####

JOINT = {"aesthetic": 0.3, "hps": 2.0, "compress": 0.7}  # unequal; in this order on the command line
EMA = 0.5


@pytest.fixture(scope="module")
def joint_run(world):
    """--joint aesthetic:0.3,hps:2,compress:0.7 with the real rewards on the tiny spec, --ema 0.5,
    cosine lr, one step; every reward call recorded as (name, images, prompts)."""
    out = world.dir / "joint"
    calls, orig_get = [], rewards.get

    def recording_get(name, spec=None, device="cpu"):
        fn = orig_get(name, spec, device)

        def recorded(images, prompts):
            calls.append((name, images.detach().clone(), list(prompts)))
            return fn(images, prompts)

        return recorded

    joint = ",".join(f"{k}:{v}" for k, v in JOINT.items())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rewards, "get", recording_get)
        argv = tiny_args(world, out, "--joint", joint, "--reward-spec", world.spec, "--ema", str(EMA),
                         "--lr-schedule", "cosine")
        assert train.main(argv) == 0
    return SimpleNamespace(out=out, stage=out / "stage1-joint", calls=calls)


def test_joint_reward_is_the_weighted_sum_of_three_rewards(world, joint_run):
    spec = rewards.load_spec(world.spec)
    fns = {name: rewards.get(name, spec) for name in JOINT}
    calls = joint_run.calls
    assert len(calls) == 2 * len(JOINT)  # one call per reward per micro-batch
    per_mb = []  # {reward: R̄ on that micro-batch's images}
    for b in range(0, len(calls), len(JOINT)):
        names, images, prompts = zip(*calls[b:b + len(JOINT)])
        assert list(names) == list(JOINT)
        assert all(torch.equal(x, images[0]) for x in images) and len(set(map(tuple, prompts))) == 1
        with torch.no_grad():
            per_mb.append({n: fns[n](images[0], list(prompts[0])).mean().item() for n in JOINT})

    def total(weights):  # the logged reward: the mean over the step's micro-batches of Σ w_i R̄_i
        return sum(sum(weights[n] * r[n] for n in JOINT) for r in per_mb) / len(per_mb)

    want = total(JOINT)
    row = json.loads((joint_run.stage / "metrics.jsonl").read_text().splitlines()[0])
    tol = 1e-5  # fp32 rewards summing to ≈ −6 (seen: 3e-8 off); each term moves it by ≥ 0.15
    assert row["reward"] == pytest.approx(want, rel=0, abs=tol)
    for n in JOINT:  # every term counts: dropping one moves the sum ≥ 100× the tolerance
        assert abs(total({**JOINT, n: 0.0}) - want) > 100 * tol, n
    shifted = dict(zip(JOINT, list(JOINT.values())[1:] + list(JOINT.values())[:1]))  # weights on other rewards
    assert abs(total(shifted) - want) > 100 * tol
    run = json.loads((joint_run.out / "run.json").read_text())
    assert run["tasks"] == ["joint"] and run["config"]["joint"] == JOINT


def flat_of(group, tensors, i):
    """Task i's A and B from a saved file, laid out as the group's flat buffer."""
    flat = torch.zeros_like(group.flat)
    for name, layer in group.layers.items():
        A, B = layer.current(flat)
        A.copy_(tensors[f"{i}/{name}/A"]), B.copy_(tensors[f"{i}/{name}/B"])
    return flat


def test_first_step_is_rid_train_step_and_ema_follows_the_flag(world, joint_run):
    """Rebuild train.py's step 0 from its documented parts: LoRA init from seed_of(seed, 1, INIT), the
    global batch batch_prompts(train, 0), noise from seed_of(seed, 1, NOISE, 0), AdamW with config.json's
    betas/weight decay at the cosine's step-0 lr (the peak: torch's CosineAnnealingLR starts there),
    micro-batches of 1. The saved student must equal that step's, and the saved EMA teacher
    0.5·init + 0.5·student for --ema 0.5 (the default 0.99 would put it ≥ 2e-3 away)."""
    cfg = json.loads((joint_run.stage / "config.json").read_text())
    assert cfg["ema"] == EMA and cfg["total_steps"] == 1 and cfg["lr_schedule"] == {"joint": "cosine"}
    models = rid.load_models(world.sd)
    group = rid.inject(models.unet, rank=cfg["rank"])
    seed = cfg["seed"]
    group.add_task("joint", generator=torch.Generator().manual_seed(train.seed_of(seed, 1, train.INIT)))
    init = group.flat.detach().clone()

    train_prompts = (joint_run.out / "train_prompts.txt").read_text().split("\n")[:-1]
    prompts = train.batch_prompts(train_prompts, 0, 2, seed)
    z = torch.randn((2, *models.latent_shape),
                    generator=torch.Generator().manual_seed(train.seed_of(seed, 1, train.NOISE, 0)))
    opt = torch.optim.AdamW([group.flat], lr=1e-2, betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"])
    step_cfg = rid.StepConfig(method="rid", steps=2, guidance=cfg["guidance"], lam=cfg["lam"], ema=EMA)
    reward = rewards.joint(JOINT, rewards.load_spec(world.spec))
    rid.train_step(models, group, reward, [(prompts[:1], z[:1]), (prompts[1:], z[1:])], opt, step_cfg,
                   clip_grad=cfg["clip_grad"],
                   generator=torch.Generator().manual_seed(train.seed_of(seed, 1, train.METHOD, 0)))

    saved = adapters(joint_run.stage)
    student = flat_of(group, saved, 0)
    assert (student - init).abs().max() > 5e-3  # the step moved it (Adam: ≈ lr per entry of B)
    torch.testing.assert_close(student, group.flat.detach(), rtol=1e-5, atol=1e-7)
    # lerp vs α·t + (1−α)·s: a few ulps of values ≲ 0.2
    torch.testing.assert_close(saved["ema"], EMA * init + (1 - EMA) * student, rtol=0, atol=1e-7)
    assert (saved["ema"] - (0.99 * init + 0.01 * student)).abs().max() > 1e-3


#### eval.py: --steps / --guidance, noise per image, forgetting ####

PROMPTS = ["a photo of a cat", "a red car"]
EVAL_ARGS = ["--images-per-prompt", "2", "--batch", "3", "--device", "cpu", "--dtype", "fp32"]
RUN_STEPS, RUN_GUIDANCE = 2, 3.0  # the run's own sampler (run.json config)


def make_run(dir, world, seed=1):
    """A one-stage run directory as train.py lays it out, with random non-zero adapters."""
    models = rid.load_models(world.sd)
    group = rid.inject(models.unet, rank=2)
    group.add_task("aesthetic")
    with torch.no_grad():
        group.flat.copy_(torch.randn(group.flat.shape, generator=torch.Generator().manual_seed(seed)) * 0.3)
    checkpoint.save(group, dir / "stage1-aesthetic")
    (dir / "test_prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    run = {"tasks": ["aesthetic"], "method": "rid", "model": world.sd, "reward_spec": world.spec,
           "stages": ["stage1-aesthetic"], "test_prompts": "test_prompts.txt", "seed": 0,
           "config": {"steps": RUN_STEPS, "guidance": RUN_GUIDANCE}}
    (dir / "run.json").write_text(json.dumps(run))
    return dir


def direct_metrics(world, adapter_dir, steps, guidance):
    """Every image of the stage in one rid.sample call at (steps, guidance), scored without eval.py."""
    models = rid.load_models(world.sd)
    group = checkpoint.load(models.unet, adapter_dir) if adapter_dir else None
    jobs = [(p, i) for p in range(len(PROMPTS)) for i in range(2)]
    noise = torch.stack([ev.noise_for(0, p, i, models.latent_shape) for p, i in jobs])
    texts = [PROMPTS[p] for p, _ in jobs]
    images = rid.sample(models, texts, noise, steps=steps, guidance=guidance, group=group)
    spec = rewards.load_spec(world.spec)
    with torch.no_grad():
        out = {n: rewards.get(n, spec)(images, texts).mean().item() for n in ("aesthetic", "hps", "compress")}
        out["clip"] = rewards.clip_score(images, texts, spec).mean().item()
    for fmt, key, kw in (("PNG", "png_kb", {}), ("JPEG", "jpeg_kb", {"quality": 80})):
        sizes = []
        for a in (images * 255).round().byte().permute(0, 2, 3, 1).numpy():
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format=fmt, **kw)
            sizes.append(len(buf.getvalue()) / 1000)
        out[key] = float(np.mean(sizes))
    return out


CONTINUOUS = ("aesthetic", "hps", "compress", "clip")


def assert_metrics(got, want, what):
    for m in CONTINUOUS:  # batches of 3 vs all 4 at once: float rounding only (seen: ≤ 4e-7 relative)
        assert got[m] == pytest.approx(want[m], rel=1e-5, abs=1e-6), (what, m)
    for m in ("png_kb", "jpeg_kb"):
        assert got[m] == pytest.approx(want[m], abs=0.002), (what, m)


def assert_metrics_differ(got, other, what):
    """At least one continuous metric ≥ 100× assert_metrics' tolerance away (seen: 1–3 % for compress
    and HPS at the other steps or guidance)."""
    gaps = {m: abs(got[m] - other[m]) / max(abs(other[m]), 1e-2) for m in CONTINUOUS}
    assert max(gaps.values()) > 1e-3, (what, gaps)


def recording_sample(monkeypatch):
    """rid.sample as eval.py calls it, recording (noise, steps, guidance) per call."""
    seen, orig = [], rid.sample
    sig = inspect.signature(orig)

    def sample(*args, **kwargs):
        a = sig.bind(*args, **kwargs)
        a.apply_defaults()
        seen.append((a.arguments["noise"].clone(), a.arguments["steps"], a.arguments["guidance"]))
        return orig(*args, **kwargs)

    monkeypatch.setattr(rid, "sample", sample)
    return seen


def test_eval_steps_and_guidance_override_the_runs_sampler(world, tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", world)
    seen = recording_sample(monkeypatch)
    assert ev.main(["--ckpt", str(run), "--steps", "3", "--guidance", "2", *EVAL_ARGS]) == 0
    seen = list(seen)  # eval's calls (direct_metrics below samples too)
    rows = json.loads((run / "report.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["stage0-base", "stage1-aesthetic"]
    assert {(s, g) for _, s, g in seen} == {(3, 2.0)}
    for row, adapter_dir in zip(rows, (None, run / "stage1-aesthetic")):
        want = direct_metrics(world, adapter_dir, steps=3, guidance=2.0)
        assert_metrics(row["metrics"], want, row["name"])
    own = direct_metrics(world, run / "stage1-aesthetic", RUN_STEPS, RUN_GUIDANCE)
    assert_metrics_differ(rows[1]["metrics"], own, "the run's own steps and guidance")

    # noise: one draw per (prompt, image), the same for every stage, whatever the batching (3 here)
    per_stage = [torch.cat([n for n, _, _ in seen[:2]]), torch.cat([n for n, _, _ in seen[2:]])]
    assert len(seen) == 4 and per_stage[0].shape[0] == 4  # 2 stages × (3 + 1)
    assert torch.equal(per_stage[0], per_stage[1])
    flat = per_stage[0].flatten(1)
    assert all(not torch.allclose(flat[a], flat[b]) for a in range(4) for b in range(a + 1, 4))

    # forgetting (Eq. 3) by hand: F = max over stages i ∈ {0..T} of the drop from i to T, i = T included
    for m, (_, higher, _) in ev.METRICS.items():
        if m not in rows[1]["metrics"]:
            continue
        v0, v1 = rows[0]["metrics"][m], rows[1]["metrics"][m]
        assert rows[1]["forgetting"][m] == pytest.approx(max(v0 - v1, 0.0) if higher else max(v1 - v0, 0.0)), m
    improved = [m for m, (_, higher, _) in ev.METRICS.items() if m in rows[1]["metrics"]
                and (rows[1]["metrics"][m] - rows[0]["metrics"][m]) * (1 if higher else -1) > 0]
    assert improved  # so a range without i = T would give these a negative F


def test_eval_guidance_zero_is_used_as_zero(world, tmp_path, monkeypatch):
    """--guidance 0 (ε = ε_u, the unconditional model) must not fall back to the run's 3."""
    run = make_run(tmp_path / "run", world)
    seen = recording_sample(monkeypatch)
    assert ev.main(["--ckpt", str(run), "--guidance", "0", *EVAL_ARGS]) == 0
    assert {(s, g) for _, s, g in seen} == {(RUN_STEPS, 0.0)}
    row = json.loads((run / "report.json").read_text())["rows"][1]
    assert_metrics(row["metrics"], direct_metrics(world, run / "stage1-aesthetic", RUN_STEPS, 0.0), "guidance 0")
    own = direct_metrics(world, run / "stage1-aesthetic", RUN_STEPS, RUN_GUIDANCE)
    assert_metrics_differ(row["metrics"], own, "the run's guidance")
