"""rid.py and checkpoint.py against independent oracles: plain-torch LoRA math, diffusers'
DDIMScheduler and StableDiffusionPipeline, diffusers+peft's load_lora_weights, real file round
trips, a soup merged by hand from the saved files, fp32 gradients on bf16-rounded weights, and a
2-process gloo world against one process. Each method's defining property: tests/test_methods.py.
Tiny SD built from configs (tests/tiny.py); 2–4 DDIM steps."""
import copy
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checkpoint  # noqa: E402
import rid  # noqa: E402
from tiny import toy_reward  # noqa: E402

torch.set_num_threads(1)
PROMPTS = ["a photo of a cat", "a red car"]


def unet_out(m, seed=0):
    """The UNet's ε on fixed inputs; m = Models or a bare UNet."""
    unet = getattr(m, "unet", m)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 4, 8, 8, generator=g)
    emb = torch.randn(2, 16, 32, generator=g)
    with torch.no_grad():
        return unet(z, torch.tensor(501), encoder_hidden_states=emb).sample


def randomize(group, seed=1, std=0.05):
    """Non-zero B (and A) so adapters visibly change the output."""
    with torch.no_grad():
        group.flat.normal_(0, std, generator=torch.Generator().manual_seed(seed))


def noise(models, seed=0, n=2):
    return torch.randn(n, *models.latent_shape, generator=torch.Generator().manual_seed(seed))


# -- adapter group --------------------------------------------------------------------------------

def test_injection_leaves_output_unchanged(models):
    ref = unet_out(models)
    group = rid.inject(models.unet, rank=4, targets=rid.ATTN_TARGETS + rid.FF_TARGETS)
    # Same F.linear calls as before injection; the tolerance only absorbs BLAS rounding that can
    # depend on buffer alignment (seen once in CI at 1e-7), far below any adapter's effect.
    same = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unet_out(models), ref, **same)  # zero tasks
    group.add_task("a")
    torch.testing.assert_close(unet_out(models), ref, **same)  # B = 0 at creation
    randomize(group)
    group.add_task("b")
    assert not torch.allclose(unet_out(models), ref)
    names = list(group.layers)
    assert any(n.endswith("ff.net.0.proj") for n in names) and any(n.endswith("attn2.to_out.0") for n in names)
    # init: A Kaiming-uniform bound 1/√in (a=√5), B zero
    layer = group.layers[names[0]]
    A_t, B_t = layer.current(group.flat)
    assert A_t.abs().max() <= 1 / layer.in_features ** 0.5 and A_t.std() > 0 and not B_t.any()


def test_lora_forward_matches_plain_torch(models):
    group = rid.inject(models.unet, rank=2)
    group.add_task("a"), randomize(group, 1), group.add_task("b"), randomize(group, 2), group.add_task("c")
    randomize(group, 3)
    group.set_scale("a", 0.5), group.set_scale(2, -1.5)
    layer = next(l for l in group.layers.values() if l.bias is not None)  # to_out.0 has a bias
    x = torch.randn(3, 5, layer.in_features)
    # oracle: per-task tensors from the saved file, summed one by one
    A = [group.task_tensors(i)[layer.name][0] for i in range(3)]
    B = [group.task_tensors(i)[layer.name][1] for i in range(3)]
    ref = x @ layer.base.weight.T + layer.base.bias
    for s, a, b in zip([0.5, 1.0, -1.5], A, B):
        ref = ref + s * (x @ a.T) @ b.T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-6)


def test_add_task_freezes_old_and_grads_reach_only_current(models):
    group = rid.inject(models.unet, rank=2)
    group.add_task("a")
    randomize(group)
    a_before = {k: (A.clone(), B.clone()) for k, (A, B) in group.task_tensors(0).items()}
    base_before = [p.clone() for p in models.unet.parameters()]
    flat_b = group.add_task("b")
    assert group.parameters() == [flat_b] and flat_b.requires_grad
    opt = torch.optim.Adam(group.parameters(), lr=1e-2)
    cfg = rid.StepConfig(method="baseline", steps=2)
    loss, _ = rid.method_loss(models, group, toy_reward, PROMPTS, noise(models), cfg)
    loss.backward()
    assert flat_b.grad is not None and flat_b.grad.abs().sum() > 0
    assert all(p.grad is None for p in models.unet.parameters())  # base frozen
    assert all(not l.A_frozen.requires_grad and not l.B_frozen.requires_grad for l in group.layers.values())
    old_flat = flat_b.detach().clone()
    opt.step()
    assert not torch.equal(flat_b.detach(), old_flat)
    for k, (A, B) in group.task_tensors(0).items():
        assert torch.equal(A, a_before[k][0]) and torch.equal(B, a_before[k][1])
    assert all(torch.equal(p, q) for p, q in zip(models.unet.parameters(), base_before))


def test_teacher_swaps_and_restores(models):
    group = rid.inject(models.unet)
    group.add_task("a")
    randomize(group, 1)
    group.ema_update(0.0)  # teacher := student
    ema = group.ema.clone()
    randomize(group, 2)  # student moves away
    student = unet_out(models)
    with group.teacher():
        teacher = unet_out(models)
    assert torch.equal(unet_out(models), student)
    # oracle: write the EMA buffer into the student and run plainly
    saved = group.flat.detach().clone()
    with torch.no_grad():
        group.flat.copy_(ema)
    assert torch.equal(unet_out(models), teacher)
    with torch.no_grad():
        group.flat.copy_(saved)
    with pytest.raises(RuntimeError):
        with group.teacher():
            raise RuntimeError("boom")
    assert torch.equal(unet_out(models), student)
    # ema_update: α·teacher + (1−α)·student
    group.ema_update(0.9)
    torch.testing.assert_close(group.ema, 0.9 * ema + 0.1 * saved, rtol=1e-6, atol=1e-7)


# -- DDIM -----------------------------------------------------------------------------------------

def sd15_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def test_ddim_equals_diffusers(models):
    sched = sd15_scheduler()
    sched.set_timesteps(50)
    ddim = rid.DDIM(50)
    assert ddim.timesteps.tolist() == sched.timesteps.tolist()
    assert ddim.timesteps[0] == 981 and ddim.timesteps[-1] == 1
    assert torch.equal(ddim.alphas_cumprod, sched.alphas_cumprod)
    for steps in (4, 7):
        sched.set_timesteps(steps)
        ddim = rid.DDIM(steps)
        assert ddim.timesteps.tolist() == sched.timesteps.tolist()
        z = z_ref = noise(models)
        emb = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            for t in sched.timesteps:
                z_ref = sched.step(models.unet(z_ref, t, encoder_hidden_states=emb).sample, t, z_ref).prev_sample
                z = ddim.step(models.unet(z, t, encoder_hidden_states=emb).sample, int(t), z)
                torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-6)


def test_sample_equals_pipeline(models, sd_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_path)
    pipe.set_progress_bar_config(disable=True)
    z = noise(models)
    ref = pipe(PROMPTS, latents=z.clone(), num_inference_steps=3, guidance_scale=7.5, output_type="pt").images
    out = rid.sample(models, PROMPTS, z, steps=3, guidance=7.5)
    assert out.shape == ref.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# -- methods --------------------------------------------------------------------------------------

def test_every_method_takes_a_step(models):
    """One rid.train_step per method is the clipped gradient step of that method's loss: the logged
    grad_norm is ‖∇loss‖ and, with SGD, θ ← θ − lr·min(1, c/‖∇loss‖)·∇loss, the gradient taken by
    autograd on rid.method_loss with the same generator (clip c = half that norm, so clipping acts).
    Each method's loss itself is checked against an oracle in tests/test_methods.py."""
    group = rid.inject(models.unet, rank=2)
    group.add_task("a")
    randomize(group)  # non-zero B: every adapter gets a gradient
    lr = 1e-2
    for method in rid.METHODS:
        cfg = rid.StepConfig(method=method, steps=2, truncate=2, guidance=3.0, refl_m=50)
        before = group.flat.detach().clone()
        loss, _ = rid.method_loss(models, group, toy_reward, PROMPTS, noise(models), cfg,
                                  torch.Generator().manual_seed(0))
        (g,) = torch.autograd.grad(loss, group.flat)
        norm = g.norm().item()
        assert norm > 0, method
        opt = torch.optim.SGD(group.parameters(), lr=lr)
        logs = rid.train_step(models, group, toy_reward, [(PROMPTS, noise(models))], opt, cfg,
                              clip_grad=norm / 2, generator=torch.Generator().manual_seed(0))
        assert {"loss", "reward", "grad_norm"} <= set(logs), method
        assert ("distill" in logs) == (method == "rid"), method
        assert logs["grad_norm"] == pytest.approx(norm, rel=1e-5), method
        assert logs["loss"] == pytest.approx(loss.item(), rel=1e-6), method
        expected = before - lr * g * (norm / 2) / (norm + 1e-6)  # clip_grad_norm_'s coefficient
        torch.testing.assert_close(group.flat.detach(), expected, rtol=1e-5, atol=1e-8 * lr, msg=method)


def test_rid_teacher_decodes_same_z1(models, monkeypatch):
    """With teacher == student the distillation term is exactly zero; 1 extra UNet call, 1 extra decode."""
    group = rid.inject(models.unet, rank=2)
    group.add_task("a")
    randomize(group)
    group.ema_update(0.0)
    calls = {"unet": 0, "decode": 0}
    models.unet.register_forward_pre_hook(lambda *a: calls.__setitem__("unet", calls["unet"] + 1))
    orig = models.vae.decode
    monkeypatch.setattr(models.vae, "decode", lambda *a, **k: (calls.__setitem__("decode", calls["decode"] + 1),
                                                              orig(*a, **k))[1])
    cfg = rid.StepConfig(method="rid", steps=3)
    _, logs = rid.method_loss(models, group, toy_reward, PROMPTS, noise(models), cfg)
    assert logs["distill"] == 0.0 and calls == {"unet": 4, "decode": 2}
    calls.update(unet=0, decode=0)
    rid.method_loss(models, group, toy_reward, PROMPTS, noise(models), rid.StepConfig(method="baseline", steps=3))
    assert calls == {"unet": 3, "decode": 1}


def test_rid_distill_is_squared_norm_against_pipeline_oracle(models, sd_path):
    """distill = ‖x_s − x_t‖² summed over each image, mean over the batch, where x_t is diffusers'
    pipeline with the EMA weights swapped in for the last step only (same z_1); loss = −R̄ + λ·distill.
    Guidance 3 in both: a guidance hard-coded anywhere in rid would not match the pipeline."""
    from diffusers import StableDiffusionPipeline

    group = rid.inject(models.unet, rank=2)
    group.add_task("a")
    randomize(group, seed=1, std=0.5)  # large: the last step (t = 1) moves x₀ by √(1−ᾱ₁)·ε only
    student = group.flat.detach().clone()
    randomize(group, seed=2, std=0.5)
    group.ema_update(0.0)  # teacher := a different random adapter
    with torch.no_grad():
        group.flat.copy_(student)

    pipe = StableDiffusionPipeline.from_pretrained(sd_path, unet=models.unet)
    pipe.set_progress_bar_config(disable=True)
    steps, z = 3, noise(models)

    def swap_before_last(p, i, t, kw):  # runs after step i; step `steps - 1` is the last one
        if i == steps - 2:
            with torch.no_grad():
                group.flat.copy_(group.ema)
        return kw

    run = lambda **k: pipe(PROMPTS, latents=z.clone(), num_inference_steps=steps, guidance_scale=3.0,  # noqa: E731
                           output_type="pt", **k).images
    img_s = run()
    img_t = run(callback_on_step_end=swap_before_last)
    with torch.no_grad():
        group.flat.copy_(student)
    expected = (img_s - img_t).pow(2).sum(dim=(1, 2, 3)).mean().item()
    assert expected > 2e-5  # the teacher really differs

    lam = 20.0
    cfg = rid.StepConfig(method="rid", steps=steps, guidance=3.0, lam=lam)  # neither 7.5 nor the mini world's 5
    with torch.no_grad():
        loss, logs = rid.method_loss(models, group, toy_reward, PROMPTS, z, cfg)
    assert logs["distill"] == pytest.approx(expected, rel=1e-4)
    reward = toy_reward(img_s, PROMPTS).mean().item()
    assert logs["reward"] == pytest.approx(reward, rel=1e-5)
    # loss − (−R) = λ·d: the fp32 loss (≈ −0.5) is rounded to ~3e-8 (seen: 1e-9 off); λ·d ≈ 1e-3 is
    # ≥ 1000× the tolerance, so a dropped or hard-coded λ (or a dropped term) cannot pass
    tol = 1e-6
    assert lam * expected > 1000 * tol
    assert loss.item() + reward == pytest.approx(lam * expected, rel=0, abs=tol)


def bf16_rounded(models):
    """The same model in fp32 whose weights are exactly the bf16 ones (rounded, then widened)."""
    with torch.no_grad():
        for module in (models.unet, models.vae, models.text_encoder):
            for p in module.parameters():
                p.copy_(p.bfloat16().float())
    return models


def test_bf16_base_fp32_adapters(sd_path, _loaded):
    """DRaFT's precision split: bf16 base weights, fp32 adapter buffer and fp32 gradients. Oracle:
    the fp32 gradient of the same loss on the bf16-rounded weights (and bf16-rounded noise); only
    the bf16 activations differ, so the gradients agree to bf16 accuracy (seen: 0.9 % relative error
    in L2), while another noise draw gives a gradient 22 % away."""
    m16 = rid.load_models(sd_path, dtype=torch.bfloat16)
    m32 = bf16_rounded(copy.deepcopy(_loaded))
    cfg = rid.StepConfig(method="rid", steps=2, guidance=3.0)
    z = noise(m16).bfloat16().float()

    def grad(m, z):
        group = rid.group_of(m.unet) or rid.inject(m.unet, rank=2)
        if not group.trainable:
            group.add_task("a", generator=torch.Generator().manual_seed(0))
            randomize(group, 1)  # non-zero B: gradients reach A and B
            group.ema_update(0.0)
        loss, _ = rid.method_loss(m, group, toy_reward, PROMPTS, z, cfg)
        return group, torch.autograd.grad(loss, group.flat)[0]

    group, g16 = grad(m16, z)
    _, g32 = grad(m32, z)
    _, g_other = grad(m32, noise(m16, seed=7).bfloat16().float())
    assert m16.unet.conv_in.weight.dtype == torch.bfloat16 and group.flat.dtype == g16.dtype == torch.float32
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(g16, g32) < 0.03, rel(g16, g32)
    assert rel(g_other, g32) > 0.15, rel(g_other, g32)  # the tolerance can tell gradients apart

    opt = torch.optim.Adam(group.parameters(), lr=1e-2)
    before = group.flat.detach().clone()
    logs = rid.train_step(m16, group, toy_reward, [(PROMPTS, z)], opt, cfg)
    assert group.flat.grad.dtype == torch.float32 and logs["grad_norm"] > 0
    assert (group.flat.detach() - before).abs().max() > 1e-3  # the step reached the fp32 adapters


DDP_PROMPTS = ["a photo of a cat", "a red car", "a blue house", "the dog on a tree"]


def ddp_setup(models):
    """The same group on every process: random A, B and a different EMA teacher (so the RID loss and
    its gradient reach every entry); RID at guidance 3, SGD (its step is lr × the gradient: the toy
    reward's gradient is ~1e-5, so lr 100 moves the adapters by ~1e-3)."""
    group = rid.inject(models.unet, rank=2)
    group.add_task("a", generator=torch.Generator().manual_seed(0))
    randomize(group, 1)
    with torch.no_grad():
        group.ema.add_(torch.randn(group.ema.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    opt = torch.optim.SGD(group.parameters(), lr=100.0)
    cfg = rid.StepConfig(method="rid", steps=2, guidance=3.0, ema=0.9)
    micro = [(DDP_PROMPTS[2 * r:2 * r + 2], noise(models, seed=10 + r)) for r in range(2)]  # rank r's half
    return group, opt, cfg, micro


def _ddp_worker(rank, sd_path, store, out):
    """One process of a world of 2 (gloo): rid.train_step on its own micro-batch only."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        m = rid.load_models(sd_path)
        group, opt, cfg, micro = ddp_setup(m)
        rid.train_step(m, group, toy_reward, [micro[rank]], opt, cfg, clip_grad=None)
        torch.save({"grad": group.flat.grad, "flat": group.flat.detach(), "ema": group.ema}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_train_step_all_reduces_over_two_processes(models, sd_path, tmp_path):
    """World size 2 (gloo, two spawned processes), each holding one micro-batch, against one process
    holding both: the same averaged gradient, student and EMA teacher on both ranks. Each rank's own
    gradient (without the all-reduce) is far from it, so a skipped or unaveraged reduce fails."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(sd_path, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]

    group, opt, cfg, micro = ddp_setup(models)
    before = group.flat.detach().clone()
    own = []  # each micro-batch's gradient alone: what a rank holds before the all-reduce
    for mb in micro:
        loss, _ = rid.method_loss(models, group, toy_reward, *mb, cfg)
        own.append(torch.autograd.grad(loss, group.flat)[0])
    rid.train_step(models, group, toy_reward, micro, opt, cfg, clip_grad=None)
    want_grad = group.flat.grad
    torch.testing.assert_close(want_grad, (own[0] + own[1]) / 2, rtol=1e-5, atol=1e-7)
    scale = want_grad.abs().max().item()
    for r, got in enumerate(ranks):
        # the sum of two fp32 gradients in another order: a few ulps of the largest entry
        torch.testing.assert_close(got["grad"], want_grad, rtol=1e-5, atol=1e-6 * scale)
        # adapters ~0.1 (ulp 7e-9) moved by lr × that gradient error (≤ 1e-9)
        torch.testing.assert_close(got["flat"], group.flat.detach(), rtol=0, atol=5e-8)
        torch.testing.assert_close(got["ema"], group.ema, rtol=0, atol=5e-8)
        assert (own[r] - want_grad).abs().max() > 1e-2 * scale  # without the reduce: visibly another step
        assert (own[r] / 2 - want_grad).abs().max() > 1e-2 * scale  # summed but not divided by 2
    assert torch.equal(ranks[0]["flat"], ranks[1]["flat"])  # the ranks stay in lockstep
    assert (group.flat.detach() - before).abs().max() > 1e-4  # ≫ the tolerance above


@pytest.mark.parametrize("method", ["draft-k", "refl"])
def test_grad_checkpoint_gives_same_gradient(models, method):
    group = rid.inject(models.unet, rank=2)
    group.add_task("a")
    randomize(group)
    grads = []
    for ckpt in (False, True):
        group.flat.grad = None
        cfg = rid.StepConfig(method=method, steps=3, truncate=3, refl_m=50, gradient_checkpointing=ckpt)
        gen = torch.Generator().manual_seed(1)  # refl: the same random step j both times
        rid.method_loss(models, group, toy_reward, PROMPTS, noise(models), cfg, gen)[0].backward()
        grads.append(group.flat.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-9)
    assert grads[0].abs().sum() > 0


# -- checkpoints, soup, export ---------------------------------------------------------------------

def two_task_group(models):
    group = rid.inject(models.unet, rank=2)
    group.add_task("aesthetic"), randomize(group, 1), group.add_task("compress"), randomize(group, 2)
    group.ema_update(0.5)
    group.set_scale(0, 0.7)
    return group


def test_checkpoint_round_trip_bit_exact(models, _loaded, tmp_path):
    group = two_task_group(models)
    checkpoint.save(group, tmp_path, extra={"step": 7})
    assert sorted(os.listdir(tmp_path)) == ["adapters.json", "adapters.safetensors"]  # no temp files left
    fresh = copy.deepcopy(_loaded)
    fresh.unet.rid_base_model = _loaded.unet.rid_base_model
    loaded = checkpoint.load(fresh.unet, tmp_path)
    assert loaded.tasks == group.tasks and loaded.scales == group.scales and loaded.rank == 2
    assert torch.equal(loaded.flat, group.flat) and torch.equal(loaded.ema, group.ema)
    for name, layer in group.layers.items():
        assert torch.equal(loaded.layers[name].A_frozen, layer.A_frozen)
        assert torch.equal(loaded.layers[name].B_frozen, layer.B_frozen)
    assert torch.equal(unet_out(fresh), unet_out(models))
    with loaded.teacher(), group.teacher():
        assert torch.equal(unet_out(fresh), unet_out(models))
    assert json.load(open(tmp_path / "adapters.json"))["extra"] == {"step": 7}
    # loading again into the same UNet replaces its contents
    assert checkpoint.load(fresh.unet, tmp_path) is loaded and loaded.tasks == group.tasks


def test_checkpoint_mismatch_raises(models, _loaded, tmp_path):
    checkpoint.save(two_task_group(models), tmp_path)
    other = copy.deepcopy(_loaded)
    rid.inject(other.unet, rank=3)
    with pytest.raises(ValueError, match="rank"):
        checkpoint.load(other.unet, tmp_path)
    meta = json.load(open(tmp_path / "adapters.json"))
    meta.update(base_model="someone/other-model", fingerprint="0" * 16)
    (tmp_path / "adapters.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="base_model.*someone/other-model"):
        checkpoint.load(copy.deepcopy(_loaded).unet, tmp_path)
    with pytest.raises(ValueError, match="adapters.json"):
        checkpoint.load(copy.deepcopy(_loaded).unet, tmp_path / "nowhere")


def random_run(models, seed, first_scale):
    """A saved-run-like group of two tasks with random A and B, its own seed and first-task scale."""
    group = rid.inject(models.unet, rank=2)
    group.add_task("aesthetic", generator=torch.Generator().manual_seed(seed))
    randomize(group, seed)
    group.add_task("compress", generator=torch.Generator().manual_seed(seed + 1))
    randomize(group, seed + 1)
    group.ema_update(0.5)
    group.set_scale(0, first_scale)
    return group


def merged_deltas(run_dirs, weights):
    """Oracle, straight from the files: {layer: Σ_j w_j Σ_i s_i B_i A_i} (out, in), in plain torch.
    Also checks that every file holds every task's A and B of every layer (and the EMA)."""
    from safetensors.torch import load_file

    delta = {}
    for d, w in zip(run_dirs, weights):
        meta = json.load(open(os.path.join(d, "adapters.json")))
        tensors = load_file(os.path.join(d, "adapters.safetensors"))
        want_keys = {f"{i}/{n}/{m}" for i in range(len(meta["tasks"])) for n in meta["layers"] for m in "AB"}
        assert set(tensors) == want_keys | {"ema"}, sorted(set(tensors) ^ (want_keys | {"ema"}))[:4]
        for name in meta["layers"]:
            for i, s in enumerate(meta["scales"]):
                term = w * s * (tensors[f"{i}/{name}/B"].double() @ tensors[f"{i}/{name}/A"].double())
                delta[name] = delta.get(name, 0) + term
    return delta


def test_soup_of_different_runs_is_the_weighted_sum_of_their_deltas(models, _loaded, tmp_path):
    """Two runs with different random adapters and scales, weights 0.3/0.7: every wrapped layer of the
    souped UNet computes W + Σ_j w_j Σ_i s_i B_i A_i (its effective weight read back by feeding it
    the identity), and the whole UNet equals a plain UNet whose linears hold those merged weights.
    Reading run 1 twice or reversing the weights gives an oracle ≥ 100× the tolerance away."""
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    checkpoint.save(random_run(models, seed=1, first_scale=0.7), r1)
    other = copy.deepcopy(_loaded)
    checkpoint.save(random_run(other, seed=5, first_scale=-1.3), r2)
    weights = [0.3, 0.7]
    want = merged_deltas([r1, r2], weights)
    wrong = {"run 1 twice": merged_deltas([r1, r1], weights), "reversed": merged_deltas([r1, r2], weights[::-1])}
    souped = copy.deepcopy(_loaded)
    s = checkpoint.soup(souped.unet, [r1, r2], weights=weights)
    assert len(s.tasks) == 4 and not s.trainable
    tol = 1e-6  # fp32 LoRA vs the float64 product (seen: 3e-8); the wrong oracles are ≥ 9e-3 away
    for name, layer in s.layers.items():
        base = _loaded.unet.get_submodule(name)
        eye = torch.eye(layer.in_features)
        with torch.no_grad():
            w_eff = (layer(eye) - (0 if layer.bias is None else layer.bias)).T.double()  # (out, in)
        expected = base.weight.double() + want[name]
        torch.testing.assert_close(w_eff, expected, rtol=0, atol=tol)
        for what, bad in wrong.items():
            gap = (base.weight.double() + bad[name] - expected).abs().max().item()
            assert gap > 100 * tol, (what, name, gap)

    plain = copy.deepcopy(_loaded.unet)  # no adapters at all: merged weights written into the linears
    with torch.no_grad():
        for name, delta in want.items():
            plain.get_submodule(name).weight.add_(delta.float())
    out = unet_out(souped)
    torch.testing.assert_close(out, unet_out(plain), rtol=1e-5, atol=1e-5)
    assert (out - unet_out(_loaded)).abs().max() > 1e-3  # the soup changes the output

    with pytest.raises(ValueError, match="weights"):
        checkpoint.soup(souped.unet, [r1], weights=[0.5, 0.5])


def test_export_lora_loads_in_diffusers(models, sd_path, tmp_path):
    from diffusers import StableDiffusionPipeline

    group = two_task_group(models)
    path = checkpoint.export_lora(group, str(tmp_path / "rid_lora.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(sd_path)
    pipe.load_lora_weights(str(tmp_path), weight_name="rid_lora.safetensors")
    assert os.path.basename(path) == "rid_lora.safetensors"
    with group.teacher():  # any other adapter state differs, so the comparison can fail
        assert not torch.allclose(unet_out(pipe.unet), unet_out(models), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unet_out(pipe.unet), unet_out(models), rtol=1e-5, atol=1e-5)


# -- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"method": "dpo"}, "method"), ({"lam": -0.1}, "lam"), ({"ema": 1.0}, "ema"), ({"ema": -0.1}, "ema"),
    ({"truncate": 0}, "truncate"), ({"steps": 4, "truncate": 5}, "truncate"), ({"distill_space": "clip"}, "distill"),
    ({"steps": 0}, "steps"),
])
def test_bad_step_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rid.StepConfig(**kwargs)


def test_bad_inputs(models, tmp_path):
    with pytest.raises(ValueError, match="rank"):
        rid.inject(models.unet, rank=0)
    with pytest.raises(ValueError, match="to_query"):
        rid.inject(models.unet, targets=("to_q", "to_query"))
    group = rid.inject(models.unet)
    with pytest.raises(ValueError, match="add_task"):
        group.flat
    with pytest.raises(ValueError, match="add_task"):
        rid.method_loss(models, group, toy_reward, PROMPTS, noise(models), rid.StepConfig(steps=2))
    group.add_task("a")
    with pytest.raises(ValueError, match="task name"):
        group.add_task("a")
    with pytest.raises(ValueError, match="already"):
        rid.inject(models.unet)
    with pytest.raises(ValueError, match="model="):
        rid.load_models(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="lacks"):
        rid.load_models(str(tmp_path))


@pytest.mark.parametrize("wrapped", [False, True])
def test_import_failure_while_loading_names_the_module_and_versions(sd_path, tmp_path, monkeypatch, wrapped):
    """A library that fails to import while a model loads (transformers 5.25 importing a shadowed
    `kernels`) gives one line: the module that failed, the module importing it, and the installed
    torch / diffusers / transformers, also when the library wraps the ImportError (transformers'
    lazy modules raise RuntimeError from it)."""
    from importlib import metadata

    from diffusers import UNet2DConditionModel

    (tmp_path / "rid_broken_integration.py").write_text("from json import CUDAProperties\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def from_pretrained(*a, **k):
        try:
            import rid_broken_integration  # noqa: F401
        except ImportError as e:
            if wrapped:
                raise RuntimeError("Failed to import diffusers.models.unet (look up to see its traceback)") from e
            raise

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", from_pretrained)
    with pytest.raises(ValueError) as err:
        rid.load_models(sd_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert "importing 'json' failed in rid_broken_integration" in msg
    assert "cannot import name 'CUDAProperties' from 'json'" in msg
    for dist in ("torch", "diffusers", "transformers"):
        assert f"{dist} {metadata.version(dist)}" in msg


def test_hot_path_does_no_input_independent_work_per_call(models, monkeypatch):
    """Per wrapped-layer forward under no_grad (a sampling loop): no argument checks, no kernel-mode
    lookup, no dtype casts (Tensor.to: the UNet's own calls are the floor) and no concatenation of
    the frozen and current adapters after the first call; an optimizer step (an in-place change of
    the flat buffer) or the teacher's buffer rebuilds it once, with the new values."""
    import rid_kernels
    import rid_kernels.lora_group as lg

    monkeypatch.setenv("RID_KERNELS", "torch")  # the reference path's cache, whatever another file set
    plain = copy.deepcopy(models)  # the UNet's own torch.cat calls (skip connections) are the floor
    group = rid.inject(models.unet)
    for t in ("a", "b"):
        group.add_task(t)
        randomize(group, seed=len(group.tasks))
    calls = {"cat": 0, "validate": 0, "to": 0, "mode": 0}
    real_cat, real_validate, real_to, real_mode = torch.cat, lg._validate, torch.Tensor.to, rid_kernels.use_triton

    def counting_cat(*a, **k):
        calls["cat"] += 1
        return real_cat(*a, **k)

    def counting_validate(*a, **k):
        calls["validate"] += 1
        return real_validate(*a, **k)

    def counting_to(self, *a, **k):
        calls["to"] += 1
        return real_to(self, *a, **k)

    def counting_mode(*a, **k):
        calls["mode"] += 1
        return real_mode(*a, **k)

    monkeypatch.setattr(lg, "_validate", counting_validate)
    monkeypatch.setattr(rid_kernels, "use_triton", counting_mode)
    first = unet_out(models)
    assert calls["mode"] == 1  # resolved by the first layer call, once for the group
    calls["mode"] = 0
    monkeypatch.setattr(torch, "cat", counting_cat)
    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    unet_out(plain)
    floor, to_floor, calls["cat"], calls["to"] = calls["cat"], calls["to"], 0, 0
    again = unet_out(models)
    assert calls == {"cat": floor, "validate": 0, "to": to_floor, "mode": 0} and torch.equal(first, again)
    monkeypatch.setattr(torch.Tensor, "to", real_to)
    with torch.no_grad():
        group.flat.mul_(2.0)  # what an optimizer step does: an in-place update
    calls["cat"] = 0
    moved = unet_out(models)
    per_layer = (calls["cat"] - floor) / len(group.layers)
    assert per_layer == 2 and not torch.equal(moved, first)  # A_cat, B_cat once per layer (unit scales: no s_rep)
    monkeypatch.setattr(torch, "cat", real_cat)
    # the cached path equals the checked op on the same entries
    layer = next(iter(group.layers.values()))
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = layer(x)
    want = kernels_lora(layer, x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def kernels_lora(layer, x):
    import rid_kernels

    As, Bs, scales = layer._entries(layer.group._active)
    with torch.no_grad():
        return rid_kernels.lora_group_linear(x, layer.weight, layer.bias, As, Bs, scales)


def test_resolution_sets_the_latent_shape_as_diffusers_does(models, sd_path):
    """--resolution: latent side = px / the VAE factor, diffusers' own vae_scale_factor being the oracle,
    and decoded images come out px × px; sizes the UNet cannot halve enough are refused in one line."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_path, safety_checker=None, requires_safety_checker=False)
    assert models.vae_factor == pipe.vae_scale_factor
    assert models.latent_shape[1] * models.vae_factor == pipe.unet.config.sample_size * pipe.vae_scale_factor
    m = models.resolution_multiple
    models.set_resolution(2 * m)
    assert models.latent_shape == (4, 2 * m // pipe.vae_scale_factor, 2 * m // pipe.vae_scale_factor)
    noise = torch.randn(1, *models.latent_shape, generator=torch.Generator().manual_seed(0))
    assert rid.sample(models, ["a"], noise, steps=2, guidance=1.0).shape == (1, 3, 2 * m, 2 * m)
    for bad in (m + m // 2, 0, -m, True, 2.0 * m):
        with pytest.raises(ValueError, match=rf"--resolution {bad!r} is not allowed; allowed: a multiple of {m}"):
            models.set_resolution(bad, "--resolution")
    models.set_resolution(None)
    assert models.latent_shape[1] == pipe.unet.config.sample_size
