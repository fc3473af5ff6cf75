"""rid.py against independent oracles: plain-torch LoRA math, diffusers' DDIMScheduler and
StableDiffusionPipeline, diffusers+peft's load_lora_weights, real file round trips.
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
from tiny import tiny_sd, toy_reward  # noqa: E402

torch.set_num_threads(1)
PROMPTS = ["a photo of a cat", "a red car"]


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    return tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def _loaded(sd_path):
    return rid.load_models(sd_path)


@pytest.fixture
def models(_loaded):
    """A fresh copy per test (tests inject adapters in place)."""
    m = copy.deepcopy(_loaded)
    m.unet.rid_base_model = _loaded.unet.rid_base_model
    return m


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

@pytest.mark.parametrize("method", rid.METHODS)
def test_method_improves_toy_reward(models, method):
    group = rid.inject(models.unet, rank=2)
    group.add_task("a")
    cfg = rid.StepConfig(method=method, steps=3, truncate=2, lam=0.1)
    opt = torch.optim.Adam(group.parameters(), lr=1e-2)
    batch = [(PROMPTS, noise(models))]

    def loss_now():  # same noise, same re-noising draws (draft-lv), same ReFL stop step
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            return rid.method_loss(models, group, toy_reward, *batch[0], cfg, gen)[0].item()

    first = loss_now()
    for _ in range(5):
        logs = rid.train_step(models, group, toy_reward, batch, opt, cfg, generator=torch.Generator().manual_seed(0))
    assert {"loss", "reward", "grad_norm"} <= set(logs) and logs["grad_norm"] > 0
    assert loss_now() < first
    if method == "rid":
        assert "distill" in logs
        assert not torch.equal(group.ema, group.flat.detach())  # the teacher lags the student


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
    pipeline with the EMA weights swapped in for the last step only (same z_1); loss = −R̄ + λ·distill."""
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

    run = lambda **k: pipe(PROMPTS, latents=z.clone(), num_inference_steps=steps, guidance_scale=7.5,  # noqa: E731
                           output_type="pt", **k).images
    img_s = run()
    img_t = run(callback_on_step_end=swap_before_last)
    with torch.no_grad():
        group.flat.copy_(student)
    expected = (img_s - img_t).pow(2).sum(dim=(1, 2, 3)).mean().item()
    assert expected > 1e-4  # the teacher really differs

    cfg = rid.StepConfig(method="rid", steps=steps, lam=0.5)
    with torch.no_grad():
        loss, logs = rid.method_loss(models, group, toy_reward, PROMPTS, z, cfg)
    assert logs["distill"] == pytest.approx(expected, rel=1e-4)
    reward = toy_reward(img_s, PROMPTS).mean().item()
    assert logs["reward"] == pytest.approx(reward, rel=1e-4, abs=1e-6)
    assert loss.item() == pytest.approx(-reward + 0.5 * expected, rel=1e-4, abs=1e-6)


def test_bf16_base_fp32_adapters(sd_path):
    """DRaFT's precision split: bf16 base weights, fp32 adapter buffer and fp32 gradients."""
    m = rid.load_models(sd_path, dtype=torch.bfloat16)
    group = rid.inject(m.unet, rank=2)
    flat = group.add_task("a")
    opt = torch.optim.Adam(group.parameters(), lr=1e-2)
    logs = rid.train_step(m, group, toy_reward, [(PROMPTS, noise(m))], opt, rid.StepConfig(method="rid", steps=2))
    assert m.unet.conv_in.weight.dtype == torch.bfloat16 and flat.dtype == flat.grad.dtype == torch.float32
    B_t = next(iter(group.layers.values())).current(flat)[1]
    assert logs["grad_norm"] > 0 and B_t.abs().sum() > 0  # B left zero: the step reached the adapters


def test_train_step_all_reduces_under_torch_distributed(models, tmp_path):
    """A real (single-process, gloo) process group: the DDP path runs and averages to the same step."""
    import torch.distributed as dist

    results = []
    for distributed in (False, True):
        m = copy.deepcopy(models)
        group = rid.inject(m.unet, rank=2)
        group.add_task("a", generator=torch.Generator().manual_seed(0))
        opt = torch.optim.SGD(group.parameters(), lr=10.0)
        cfg = rid.StepConfig(method="baseline", steps=2)
        if distributed:
            dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
        try:
            rid.train_step(m, group, toy_reward, [(PROMPTS[:1], noise(m, n=1)), (PROMPTS[1:], noise(m, 1, n=1))],
                           opt, cfg, clip_grad=None)
        finally:
            if distributed:
                dist.destroy_process_group()
        results.append(group.flat.detach().clone())
    assert torch.equal(results[0], results[1])


def test_grad_checkpoint_gives_same_gradient(models):
    group = rid.inject(models.unet, rank=2)
    group.add_task("a")
    randomize(group)
    grads = []
    for ckpt in (False, True):
        group.flat.grad = None
        cfg = rid.StepConfig(method="draft-k", steps=3, truncate=3, gradient_checkpointing=ckpt)
        rid.method_loss(models, group, toy_reward, PROMPTS, noise(models), cfg)[0].backward()
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


def test_soup_of_identical_runs_equals_the_run(models, _loaded, tmp_path):
    group = two_task_group(models)
    checkpoint.save(group, tmp_path / "r1")
    checkpoint.save(group, tmp_path / "r2")
    souped = copy.deepcopy(_loaded)
    s = checkpoint.soup(souped.unet, [tmp_path / "r1", tmp_path / "r2"])
    assert len(s.tasks) == 4 and s.scales == [0.35, 0.5, 0.35, 0.5]
    torch.testing.assert_close(unet_out(souped), unet_out(models), rtol=1e-5, atol=1e-6)
    s2 = checkpoint.soup(souped.unet, [tmp_path / "r1", tmp_path / "r2"], weights=[2.0, -1.0])  # 2Δ − Δ = Δ
    torch.testing.assert_close(unet_out(souped), unet_out(models), rtol=1e-5, atol=1e-6)
    assert s2 is s
    with pytest.raises(ValueError, match="weights"):
        checkpoint.soup(souped.unet, [tmp_path / "r1"], weights=[0.5, 0.5])


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
