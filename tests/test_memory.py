"""memplan (train.py's --micro-batch auto) and experiments.memory (docs/sd15_memory.md, sd15_cost.md): the
live-tensor counter against hand-counted allocations, the fake-tensor step against the same step on real
tensors (SD, and SDXL through memplan.fake_copy), the planner, and the doc's arithmetic."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import memplan
import rid
from experiments import memory
from tiny import tiny_sdxl, toy_reward


def test_counter_counts_each_storage_once_while_it_lives():
    with memplan.PeakMemory() as m:
        a = torch.ones(1000)                        # 4000 B
        b = torch.ones(2000)                        # + 8000 = 12000
        v = b[:10].view(2, 5)                       # a view: no new storage
        del a                                       # 8000
        c = torch.ones(500, dtype=torch.float64)    # + 4000 = 12000 again, not more
        d = torch.ones(10, dtype=torch.bfloat16)    # + 20 = 12020: the peak
        del b, v                                    # 4020 (v kept b's storage alive until now)
        now = m.now
    assert (m.peak, now) == (12020, 4020)
    del c, d
    assert m.now == 0


def test_counter_starts_from_the_tensors_it_is_given_and_reads_fake_scalars_as_one():
    w = torch.zeros(256)  # 1024 B alive before
    with memplan.PeakMemory(w, w[3:]) as m:  # the same storage twice counts once
        x = torch.ones(64)
        y = (x * w[:64]).sum()
        now = m.now
    assert m.peak == 1024 + 256 + 256 + 4  # w, x, the product and the sum, alive together while sum() ran
    assert now == 1024 + 256 + 4 and y.shape == ()  # then the unnamed product was freed
    with FakeTensorMode(), memplan.PeakMemory() as m:
        t = torch.zeros(3)
        assert float(t.sum()) == 1.0 and bool(torch.isfinite(t).all()) and int(t.long().sum()) == 1


def _fake_like(real):
    """The same architecture as `real` built from its configs; call inside FakeTensorMode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_config(real.unet.config)
    vae = AutoencoderKL.from_config(real.vae.config)
    text = CLIPTextModel(real.text_encoder.config)
    for m in (unet, vae, text):
        m.eval().requires_grad_(False)
    unet.rid_base_model = "fake"
    return rid.Models(unet, vae, text, real.tokenizer)


@pytest.mark.parametrize("method,gc", [("rid", False), ("baseline", False), ("draft-k", True), ("r0", False)])
def test_fake_step_needs_the_memory_of_the_real_step(sd_path, method, gc):
    """The estimate's premise: fake tensors go through the same ops with the same shapes, so a step on
    them holds exactly the live bytes the real step holds (tiny SD, real weights vs fake)."""
    steps = memplan.steps_for(method, 6, 2)
    models = rid.load_models(sd_path)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = memplan.step_memory(_fake_like(models), toy_reward, [], method, 2, gc, steps,
                                   truncate=2 if method == "draft-k" else 1)
    real = memplan.step_memory(models, toy_reward, [], method, 2, gc, steps,
                               truncate=2 if method == "draft-k" else 1)
    assert real["static"] == fake["static"] and real["static"] > 0
    assert fake["peak"] == real["peak"], (real, fake)  # byte for byte
    assert real["peak"] > real["static"]


def test_fake_copy_of_sdxl_needs_the_memory_of_the_real_step(tmp_path):
    """memplan.fake_copy rebuilds any backbone from its configs (SDXL: both text encoders, the added
    embedding): the step on it holds the live bytes of the same step on the real tiny SDXL, byte for byte."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    models = rid.load_models(tiny_sdxl(tmp_path / "xl"))
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake_models = memplan.fake_copy(models)
        assert type(fake_models) is type(models) and fake_models.text_encoder_2 is not models.text_encoder_2
        fake = memplan.step_memory(fake_models, toy_reward, [], "rid", 2, False, 2)
    real = memplan.step_memory(models, toy_reward, [], "rid", 2, False, 2)
    assert real["static"] == fake["static"] > 0 and fake["peak"] == real["peak"] > real["static"], (real, fake)


def test_experiments_memory_runs_memplans_planner():
    """No second copy: the doc's generator and train.py's --micro-batch auto share one model."""
    for name in ("PeakMemory", "step_memory", "fake_copy", "free_bytes", "plan_micro_batch", "steps_for", "fits"):
        assert getattr(memory, name) is getattr(memplan, name), name


def test_fits_is_the_largest_batch_under_the_budget():
    assert memplan.fits(4e9, 2e9, 24) == 10          # 4 + 10·2 = 24 GB exactly
    assert memplan.fits(4e9, 2.1e9, 24) == 9
    assert memplan.fits(30e9, 1e9, 24) == 0


@pytest.mark.parametrize("argv,words", [(["--resolution", "100"], "--resolution '100'"),
                                        (["--batches", "2,1"], "--batches '2,1'"),
                                        (["--methods", "nope"], "unknown ['nope']"),
                                        (["--dtypes", "fp16"], "--dtypes 'fp16'")])
def test_bad_flags_exit_2_with_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        memory.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and words in err[0], err


def test_step_flops_rid_costs_one_teacher_call_and_one_decode_more_than_the_baseline(models):
    """docs/sd15_cost.md's counts: RID's step = the baseline's + the teacher's CFG UNet call at z₁ and its
    decode (rid.py's rid_loss), and FLOPs grow linearly with the micro-batch; attention on CPU counted."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    f = {(m, b): memory.step_flops(models, toy_reward, m, b, steps=3) for m in ("rid", "baseline") for b in (1, 2)}
    for m in ("rid", "baseline"):
        assert f[m, 1]["total"] < f[m, 2]["total"] <= 2 * f[m, 1]["total"]  # the prompts' encoding is shared
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        models.vae.decode(torch.zeros(2, *models.latent_shape))
    decode = fc.get_total_flops()
    # to 1 %: the teacher's call runs its LoRA terms apart (frozen tasks, then the EMA adapter), a few more matmuls
    assert f["rid", 2]["total"] - f["baseline", 2]["total"] == pytest.approx(f["rid", 2]["unet_call"] + decode, rel=0.01)
    # the CPU attention op is counted as torch counts the CUDA kernels: one 64-token self-attention
    q = torch.zeros(1, 1, 64, 8)
    with FlopCounterMode(display=False, custom_mapping={
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: memory._cpu_sdpa_flops}) as fc:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert fc.get_total_flops() == sdpa_flop_count(q.shape, q.shape, q.shape) == 2 * 2 * 64 * 64 * 8


def test_planning_leaves_the_real_run_working(models):
    """train.py plans before training, with the run's own reward functions: nothing the fake step caches
    (the compress reward's JPEG constants are cached per device) may leak fake tensors into the real run."""
    import rewards

    compress = rewards.get("compress")
    plan = memplan.plan_micro_batch(models, compress, "rid", 10**12, steps=2, frozen_tasks=0)
    assert plan["top"] > 0 and plan["per_sample"] > 0
    images = torch.rand(2, 3, 16, 16)
    assert torch.isfinite(compress(images, ["a", "b"])).all()
