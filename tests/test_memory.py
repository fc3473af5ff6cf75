"""memplan (train.py's --micro-batch auto) and experiments.memory (docs/sd15_memory.md, sd15_cost.md,
docs/backbone_memory.md): the live-tensor counter against hand-counted allocations, the fake-tensor step against
the same step on real tensors (SD, and SDXL, SD3 and FLUX through memplan.fake_copy), the planner against real
steps on SD3 and FLUX, the full-size configs against the released models' parameter counts, and the docs'
arithmetic."""
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import memplan
import rid
from experiments import memory
from tiny import tiny_flux, tiny_sd3, tiny_sdxl, toy_reward


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


@pytest.mark.parametrize("method", ["baseline", "refl"])
def test_checkpointing_lowers_the_peak_of_one_step_with_gradient(sd_path, method):
    """With --gradient-checkpointing the denoiser's activations are not held while the decoder and the reward
    run: they are recomputed after the reward's backward, so the peak is lower (refl used to skip it: at
    1024² SD3.5-L and FLUX refl were the only steps over 80 GB, docs/backbone_memory.md)."""
    models = rid.load_models(sd_path)
    peak = {gc: memplan.step_memory(models, toy_reward, [], method, 2, gc, 4)["peak"] for gc in (False, True)}
    assert peak[True] < peak[False], peak


def test_checkpointed_decode_gives_the_same_image_and_gradient_and_holds_less(sd_path):
    """samplers.decode(checkpoint=True) with gradient: diffusers' per-block checkpointing of the VAE decoder for
    this call only. Oracle: the plain decode (models.decode) — the same image and the same gradient with
    respect to the latents, bit for bit; fewer bytes held between the forward and the backward pass and a
    lower peak; the VAE's switch off again afterwards, also when the decode raises."""
    from samplers import decode

    models = rid.load_models(sd_path)
    z0 = torch.randn(2, *models.latent_shape, generator=torch.Generator().manual_seed(0))
    out, held, peak = {}, {}, {}
    for gc in (False, True):
        z = z0.clone().requires_grad_(True)
        with memplan.PeakMemory(z) as mem:
            img = decode(models, z, gc)
            held[gc] = mem.now
            (img * torch.linspace(0, 1, img.numel()).view_as(img)).sum().backward()
            peak[gc] = mem.peak
        out[gc] = (img.detach(), z.grad)
        assert not models.vae.is_gradient_checkpointing
    assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])
    assert out[False][1].abs().sum() > 0
    assert held[True] < held[False] and peak[True] < peak[False], (held, peak)

    def broken(z):
        assert models.vae.is_gradient_checkpointing  # switched on during the call
        raise RuntimeError("boom")

    models.decode = broken
    with pytest.raises(RuntimeError, match="boom"):
        decode(models, z0.clone().requires_grad_(True), True)
    assert not models.vae.is_gradient_checkpointing
    with torch.no_grad():  # without gradient nothing to keep: the plain decode, the switch never touched
        models.decode = lambda z: (models.vae.is_gradient_checkpointing, z)
        assert decode(models, z0, True)[0] is False


def test_checkpointing_covers_the_decode_in_the_step(sd_path, monkeypatch):
    """draft-lv's three decodes with gradient go through the checkpointed decode: with --gradient-checkpointing
    its step's peak is lower than the same step whose VAE ignores the switch (the denoiser still checkpointed)."""
    models = rid.load_models(sd_path)
    with_decode = memplan.step_memory(models, toy_reward, [], "draft-lv", 2, True, 4)["peak"]
    monkeypatch.setattr(type(models.vae), "enable_gradient_checkpointing", lambda self, *a, **k: None)
    without = memplan.step_memory(models, toy_reward, [], "draft-lv", 2, True, 4)["peak"]
    assert with_decode < without, (with_decode, without)


@pytest.mark.parametrize("method,plus", [("rid", False), ("baseline", False), ("draft-k", False), ("draft", False),
                                         ("draft-lv", False), ("refl", False), ("r0", False), ("r0", True)])
def test_every_decode_with_gradient_is_checkpointed_under_the_flag(models, method, plus, monkeypatch):
    """Every method's step: each decode that runs with gradient asks for the checkpointed decode when
    --gradient-checkpointing is on, and none does when it is off (the spy wraps rid.decode, which every
    loss calls; rid's teacher decodes without gradient)."""
    calls = []
    real = rid.decode

    def spy(models, z, checkpoint=False):
        calls.append((torch.is_grad_enabled(), checkpoint))
        return real(models, z, checkpoint)

    monkeypatch.setattr(rid, "decode", spy)
    group = rid.group_of(models.unet) or rid.inject(models.unet, rank=2)
    group.clear()
    group.add_task("t")
    opt = torch.optim.AdamW([group.flat], lr=1e-4)
    noise = torch.randn(2, *models.latent_shape, generator=torch.Generator().manual_seed(0))
    for gc in (True, False):
        calls.clear()
        cfg = rid.StepConfig(method=method, steps=3, truncate=2, gradient_checkpointing=gc, r0_plus=plus)
        rid.train_step(models, group, toy_reward, [(["a cat", "a dog"], noise)], opt, cfg)
        with_grad = [c for g, c in calls if g]
        assert len(with_grad) == {"draft-lv": 3, "r0": 1 + plus}.get(method, 1), calls
        assert all(c == gc for c in with_grad), (gc, calls)


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
                                        (["--dtypes", "fp16"], "--dtypes 'fp16'"),
                                        (["--backbone", "sd4"], "--backbone 'sd4': unknown; valid: sdxl, "
                                                                "sd3-medium, sd35-large, flux-dev, all"),
                                        (["--backbone", "flux-dev", "--dtypes", "fp32"], "--dtypes 'fp32'"),
                                        (["--backbone", "sdxl", "--flops"], "--flops"),
                                        (["--backbone", "sdxl", "--checkpointing", "maybe"], "--checkpointing 'maybe'"),
                                        (["--checkpointing", "yes"], "--checkpointing yes: only with --backbone"),
                                        (["--backbone", "sdxl", "--methods", "draft", "--checkpointing", "no"],
                                         "--methods draft --checkpointing no")])
def test_bad_flags_exit_2_with_one_line(argv, words, capsys):
    assert memory.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


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


FLOW_RES = {"sd3": 32, "flux": 32}  # tiny images (the tiny VAEs halve each side): a few dozen latent tokens


@pytest.fixture(scope="module")
def flow_models(tmp_path_factory):
    """{name: loader} of the tiny SD3 and FLUX-dev (tests/tiny.py) at FLOW_RES, saved once per module."""
    paths = {"sd3": tiny_sd3(tmp_path_factory.mktemp("sd3")), "flux": tiny_flux(tmp_path_factory.mktemp("flux"))}

    def load(name):
        models = rid.load_models(paths[name])
        models.set_resolution(FLOW_RES[name])
        return models
    return load


@pytest.mark.parametrize("name,method,gc", [("sd3", "rid", False), ("sd3", "r0", True), ("sd3", "draft-lv", True),
                                            ("flux", "rid", False), ("flux", "r0", True), ("flux", "draft-k", False)])
def test_fake_copy_of_a_flow_backbone_needs_the_memory_of_the_real_step(flow_models, name, method, gc):
    """SD3 (three text encoders, CFG) and FLUX-dev (packed latents, guidance embedding) through memplan.fake_copy:
    the step on fake tensors holds the real step's live bytes, byte for byte. r0 draws η > 0: its flow step reads
    σ, σ' in Python, which fake constants read as 1 (it divided by 1 − σ' = 0 before the sampler stayed real)."""
    models = flow_models(name)
    steps = memplan.steps_for(method, 6, 2)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = memplan.step_memory(memplan.fake_copy(models), toy_reward, [], method, 2, gc, steps, truncate=2)
    real = memplan.step_memory(models, toy_reward, [], method, 2, gc, steps, truncate=2)
    assert real["static"] == fake["static"] > 0 and fake["peak"] == real["peak"] > real["static"], (real, fake)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_planner_on_a_flow_backbone_picks_the_largest_micro_batch_whose_real_step_fits(flow_models, name):
    """--micro-batch auto on SD3 and FLUX: for budgets whose usable part (85 %) lies halfway between the real
    steps' needs at micro-batches b and b + 1 (beyond the loaded weights, as train.py's free memory counts), the
    planner picks b; its choice grows with the budget; a budget below one sample's step picks 0."""
    models = flow_models(name)
    base = memplan.PeakMemory(*memplan.weights(models)).now
    need = {b: memplan.step_memory(models, toy_reward, [], "rid", b, False, 2)["peak"] - base for b in (1, 2, 3, 4)}
    tops = []
    for b in (1, 2, 3):
        budget = int((need[b] + need[b + 1]) / 2 / (1 - memplan.MARGIN))
        plan = memplan.plan_micro_batch(models, toy_reward, "rid", budget, steps=2)
        assert plan["usable"] == int(budget * (1 - memplan.MARGIN))
        assert all(plan["need"][k] == need[k] for k in plan["need"] if k in need)  # its fake steps: the real ones
        tops.append(plan["top"])
    assert tops == [1, 2, 3], (tops, need)
    assert memplan.plan_micro_batch(models, toy_reward, "rid", need[1] // 2, steps=2)["top"] == 0


def test_search_finds_the_largest_fitting_micro_batch_in_few_steps():
    """memplan._search against every micro-batch tried: a need on the line takes the line's guess and the one
    after it; one that bends up above 2 (the tiny FLUX's) or flattens still ends on the largest that fits."""
    def run(need, usable, limit=1024):
        probed = []

        def at(b):
            probed.append(b)
            return need(b)
        per = need(2) - need(1)
        guess = memplan.fits(need(1) - per, per, usable / 1e9)
        return memplan._search(at, guess, usable, limit), probed

    line = lambda b: 100 + 10 * b  # noqa: E731
    assert run(line, 175) == (7, [1, 2, 7, 8])
    assert run(line, 105) == (0, [1])
    assert run(line, 10**9, limit=16) == (16, [1, 2, 16])
    for need in (lambda b: 100 + 10 * b + 40 * max(0, b - 2) ** 2, lambda b: 100 + int(60 * b ** 0.5)):
        for usable in range(100, 2000, 37):
            top, probed = run(need, usable)
            assert top == max([0] + [b for b in range(1, 1025) if need(b) <= usable]) and len(probed) <= 30  # ~2·log₂ 1024


def test_full_size_configs_are_the_released_models():
    """experiments.backbone_memory's configs, built as fake tensors: each component's parameter count is the
    released model's (a wrong key, e.g. SD3's caption width or FLUX's single-block count, changes it), and the
    layout is train.py's bf16 one (VAE fp32)."""
    from experiments import backbone_memory as bm

    toks = bm.tokenizers()
    with FakeTensorMode(allow_non_fake_inputs=True):
        got = {name: bm.components(bm.build(name, toks)) for name in ("sdxl", "sd3-medium", "flux-dev")}
    counts = {"sdxl unet": got["sdxl"]["unet"], "sd3-medium transformer": got["sd3-medium"]["transformer"],
              "flux-dev transformer": got["flux-dev"]["transformer"], "sdxl vae": got["sdxl"]["vae"],
              "clip-l": got["sdxl"]["text_encoder"], "clip-g": got["sdxl"]["text_encoder_2"],
              "t5-xxl encoder": got["flux-dev"]["text_encoder_2"]}
    assert {k: n for k, (n, _) in counts.items()} == bm.PARAMS
    assert counts["sdxl unet"][1] == 2 * bm.PARAMS["sdxl unet"]  # bf16 (no buffers)
    assert got["flux-dev"]["vae"][1] == 4 * got["flux-dev"]["vae"][0]  # fp32: force_upcast


def test_over_80_lists_what_fits_no_card_and_the_gpus_sharding_would_take():
    """The doc's FSDP2 estimate: the better of checkpointing on/off; listed only above 80 GB; the fewest GPUs N
    with peak − base·(1 − 1/N) ≤ 80 GB."""
    from experiments import backbone_memory as bm

    def row(method, gc, peak_gb):
        return {"backbone": "flux-dev", "resolution": 1024, "method": method, "checkpointing": gc,
                "peak_gib": [peak_gb * 1e9 / memory.GIB, 0]}

    rows = [row("rid", False, 95), row("rid", True, 90), row("baseline", False, 70), row("draft", True, 200)]
    info = {"flux-dev": {"base_bytes": 40e9}}
    got = {r[2]: r for r in bm.over_80(rows, info)}
    assert set(got) == {"rid", "draft"}
    _, _, _, peak, gc, by, _, gpus = got["rid"]
    assert gc and peak == pytest.approx(90e9) and by == pytest.approx(10e9) and gpus == 2  # 90 − 20 ≤ 80
    assert got["draft"][-1] is None  # 200 − 40·7/8 = 165 > 80 on 8 GPUs too


def test_backbone_table_remeasures_only_the_chosen_checkpointing_rows(tmp_path, monkeypatch):
    """python -m experiments.memory --backbone sdxl --methods rid --checkpointing yes: only sdxl's rid rows with
    checkpointing are measured again; its rows without, and other backbones' rows, stay as the .json had them
    (the table after a change that only moves checkpointed steps, without re-running the others)."""
    from experiments import backbone_memory

    class Fake:
        def set_resolution(self, res):
            self.res = res

    def row(name, method, gc, peak):
        return {"backbone": name, "resolution": 1024, "method": method, "checkpointing": gc, "peak_gib": [peak],
                "fixed_gib": 1.0, "per_sample_gib": 1.0, "fits": {}}

    old = [row("sdxl", "rid", False, 1.0), row("sdxl", "rid", True, 2.0), row("sd3-medium", "rid", True, 3.0)]
    out = tmp_path / "table.md"
    out.with_suffix(".json").write_text(__import__("json").dumps({"rows": old, "models": {}}))
    measured, written = [], []
    monkeypatch.setattr(backbone_memory, "tokenizers", lambda: {})
    monkeypatch.setattr(backbone_memory, "build", lambda name, toks: Fake())
    monkeypatch.setattr(backbone_memory, "components", lambda m: {})
    monkeypatch.setattr(memory, "reward_world", lambda: ({"hps": None}, []))
    monkeypatch.setattr(memplan, "weights", lambda *a: [])
    monkeypatch.setattr(memplan, "choose", lambda *a: {"top": 0})

    def measure(m, fn, modules, method, gc, batches, steps, truncate):
        measured.append((method, gc, m.res))
        return {"method": method, "checkpointing": gc, "peak_gib": [9.0], "fixed_gib": 1.0, "per_sample_gib": 1.0}

    monkeypatch.setattr(memory, "measure", measure)
    monkeypatch.setattr(backbone_memory, "_write", lambda out, rows, *a, **k: written.append(list(rows)))
    assert backbone_memory.run(["sdxl"], [1024], ["rid"], [1, 2], None, 10, str(out), [], (True,)) == 0
    assert measured == [("rid", True, 1024)]
    assert not list(tmp_path.glob(".*lock*"))  # the run's lock is gone with it
    final = {(r["backbone"], r["method"], r["checkpointing"]): r["peak_gib"][0] for r in written[-1]}
    assert final == {("sdxl", "rid", False): 1.0, ("sd3-medium", "rid", True): 3.0, ("sdxl", "rid", True): 9.0}


def test_backbone_table_from_several_runs_is_complete_only_with_every_row(tmp_path):
    """The table is measured piece by piece (--methods/--checkpointing/--resolution keep the other rows): the doc
    is complete when its rows are the full table, 5 (backbone, size) pairs × (6 methods × checkpointing on/off +
    draft with it on) = 65 by hand, and then names the command that measures it all, keeping this run's other
    flags; its minutes are the rows' own. One row short: PARTIAL, with the count, and this run's own command."""
    import json

    from experiments import backbone_memory as bm

    table = json.loads((Path(__file__).parents[1] / "docs" / "backbone_memory.json").read_text())
    assert len(bm.table_rows()) == 65
    argv = ["--backbone", "sdxl", "--methods=draft", "--checkpointing", "yes", "--resolution", "1024", "--truncate", "10"]
    out = tmp_path / "t.md"
    bm._write(out, table["rows"], table["models"], table["batches"], table["truncate"], argv)
    got = json.loads(out.with_suffix(".json").read_text())
    assert got["complete"] and got["command"] == "python -m experiments.memory --backbone all --truncate 10"
    assert got["minutes"] == round(sum(r["seconds"] for r in table["rows"]) / 60, 1)
    assert "PARTIAL" not in out.read_text() and "`python -m experiments.memory --backbone all --truncate 10`" in out.read_text()
    bm._write(out, table["rows"][1:], table["models"], table["batches"], table["truncate"], argv)
    got = json.loads(out.with_suffix(".json").read_text())
    assert not got["complete"] and got["command"] == "python -m experiments.memory " + " ".join(argv)
    assert "PARTIAL: 64 of the full table's 65 rows" in out.read_text()


def test_backbone_table_one_run_at_a_time(tmp_path, capsys, monkeypatch):
    """Each run rewrites the table from the rows it read at its start: a second run on the same --out while
    one holds it is refused in one line naming the holder (it would drop the first's rows), before any model is
    built; another table in the same folder is not blocked."""
    import checkpoint
    from experiments import backbone_memory

    monkeypatch.setattr(backbone_memory, "build", lambda *a: pytest.fail("built a model"))
    out = tmp_path / "t.md"
    holder = checkpoint.RunLock(tmp_path, name=".t.md.lock")  # a first run, still measuring
    try:
        assert memory.main(["--backbone", "sdxl", "--methods", "rid", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--out {out} is in use by pid" in err[0], err
        other = checkpoint.RunLock(tmp_path, name=".u.md.lock")
        other.release()
    finally:
        holder.release()
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_backbone_table_killed_while_writing_keeps_the_previous_table(tmp_path, monkeypatch):
    """A run keeps the .json's rows for the next: a kill while the table is written (here, at the file's
    replacement) leaves the previous .json and doc byte for byte, and no stray file beside them."""
    import json

    import checkpoint
    from experiments import backbone_memory as bm

    table = json.loads((Path(__file__).parents[1] / "docs" / "backbone_memory.json").read_text())
    out = tmp_path / "t.md"
    bm._write(out, table["rows"], table["models"], table["batches"], table["truncate"], [])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def killed(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        bm._write(out, table["rows"][1:], table["models"], table["batches"], table["truncate"], [])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("text", ["{garbage", '{"rows": [{"backbone": "sdxl"}]}', "[1, 2]", '{"rows": 3}', "\udcff"])
def test_backbone_table_refuses_a_foreign_json_beside_out_before_building(tmp_path, text, capsys, monkeypatch):
    """Its rows would be kept: a .json beside --out that this command did not write is refused in one line
    (exit 2), before any model is built, and left as it was."""
    from experiments import backbone_memory

    monkeypatch.setattr(backbone_memory, "build", lambda *a: pytest.fail("built a model"))
    out = tmp_path / "t.md"
    out.with_suffix(".json").write_text(text, errors="surrogateescape")
    before = out.with_suffix(".json").read_bytes()
    assert memory.main(["--backbone", "sdxl", "--methods", "rid", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a table this command wrote" in err[0], err
    assert out.with_suffix(".json").read_bytes() == before and not out.exists()


@pytest.mark.parametrize("name,whole", [("sd", True), ("sd", False), ("sd3", True), ("sd3", False), ("flux", True)])
def test_checkpointed_prediction_recomputes_block_by_block(sd_path, flow_models, name, whole, monkeypatch):
    """samplers.predict(checkpoint=True) with gradient: the denoiser's own blocks are checkpointed (diffusers'
    switch, on inside the call, off after); whole: the call also keeps only its inputs until the backward pass.
    Oracle: the plain call — the same prediction and the same gradients (latents and adapters) bit for bit;
    the backward pass's peak below that of the call checkpointed whole without the blocks (the switch made a
    no-op); whole=False holds more than whole=True between forward and backward, but less than the plain call."""
    from samplers import predict

    models = rid.load_models(sd_path) if name == "sd" else flow_models(name)
    group = rid.inject(models.denoiser, rank=2)
    group.add_task("t")
    with torch.no_grad():
        group.flat.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, *models.latent_shape, generator=g)
    text = models.conditioning(["a cat", "a dog"], 3.0)
    t = models.sampler(4).timestep(3)
    w = torch.randn(z0.shape, generator=g)

    def run(gc, whole):
        group.flat.grad = None
        z = z0.clone().requires_grad_(True)
        with memplan.PeakMemory(z, group.flat) as mem:
            out = predict(models, z, t, text, 3.0, gc, whole)
            held = mem.now
            assert not models.denoiser.is_gradient_checkpointing
            (out * w).sum().backward()
        return out.detach(), z.grad, group.flat.grad.clone(), mem.peak, held

    plain, blocks = run(False, whole), run(True, whole)
    for a, b in zip(plain[:3], blocks[:3]):
        assert torch.equal(a, b)
    assert plain[2].abs().sum() > 0
    assert blocks[4] < plain[4] and (blocks[4] > run(True, True)[4]) is not whole
    monkeypatch.setattr(type(models.denoiser), "enable_gradient_checkpointing", lambda self, *a, **k: None)
    call_only = run(True, True)
    assert torch.equal(call_only[2], plain[2])
    assert blocks[3] < call_only[3], (blocks[3], call_only[3])
