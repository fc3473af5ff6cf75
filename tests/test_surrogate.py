"""surrogate.py: the black-box rewards against PIL's own encoder, the Bradley–Terry loss and Kendall τ
against hand-worked values, the latent surrogate learning a known function of the latent, plugin
errors in one line, and a bit-exact continuation from the surrogate's state_dict."""
import io
import json
import math
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

import rid
import surrogate as S

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def images(n=3, seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=size, mode="bilinear")
    return (smooth + 0.2 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


def test_jpeg_and_png_kb_are_the_negated_pil_sizes():
    x = images()
    arr = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for task, fmt, kw in (("jpeg-kb", "JPEG", {"quality": 80}), ("png-kb", "PNG", {})):
        want = []
        for a in arr:
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format=fmt, **kw)
            want.append(-len(buf.getvalue()) / 1000)
        got = S.true_scores(task, S.black_box(task), x, ["p"] * 3)
        assert got.tolist() == want and len(set(want)) > 1


def test_bradley_terry_on_a_hand_worked_example():
    s = torch.tensor([0.0, math.log(3), 0.0, 5.0])
    r = torch.tensor([1.0, 2.0, 1.5, -9.0])
    pid = torch.tensor([0, 0, 0, 1])  # sample 3 is another prompt's: never paired
    pairs = S.same_prompt_pairs(pid, r)
    assert pairs.tolist() == [[0, 1], [0, 2], [1, 2]]
    # (0,1): 1 wins, −log σ(ln3 − 0) = ln(4/3); (0,2): 2 wins, −log σ(0) = ln 2; (1,2): 1 wins, ln(4/3)
    want = (2 * math.log(4 / 3) + math.log(2)) / 3
    assert S.bradley_terry(s, r, pairs).item() == pytest.approx(want, rel=1e-6)
    assert S.pair_accuracy(s, r, pairs) == pytest.approx(2 / 3)  # (0,2) is a tie in s: not a correct order
    assert len(S.same_prompt_pairs(pid, torch.tensor([1.0, 1.0, 1.0, 0.0]))) == 0  # equal rewards: no pair


def test_kendall_tau_hand_worked():
    assert S.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)  # 5 concordant, 1 discordant
    assert S.kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # one tie in x: τ-b = (C − D) / √((n0 − n1)(n0 − n2)) = (4 − 1) / √(5 · 6)
    assert S.kendall_tau([1, 1, 2, 3], [1, 2, 3, 0]) == pytest.approx((2 - 3) / math.sqrt(5 * 6))
    assert math.isnan(S.kendall_tau([1, 1, 1], [1, 2, 3]))


def latent_data(n, seed, shape):
    """Latents with a per-sample offset; the true reward is the latent's mean (a known monotone function)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, *shape, generator=g) * 0.5 + torch.randn(n, 1, 1, 1, generator=g)
    pid = torch.arange(n) % 4
    return z, pid, z.mean((1, 2, 3)).double()


PROMPTS = ["a red circle", "a blue square", "two green dots", "a yellow line"]


def test_surrogate_learns_a_known_function_of_the_latent(models):
    shape, emb = models.latent_shape, models.encode(PROMPTS)
    sur = S.Surrogate(models.unet, S.SurrogateConfig(hidden=32, lr=3e-3, pair_batch=32, buffer=192), emb, seed=1)
    z, pid, r = latent_data(192, 0, shape)
    sur.add(z, pid, r)
    zt, pidt, rt = latent_data(96, 1, shape)  # held out: other latents (the same prompts' embeddings)
    before = sur.evaluate(zt, emb[pidt], pidt, rt)
    sur.fit(100)
    after = sur.evaluate(zt, emb[pidt], pidt, rt)
    assert after["pair_acc"] > 0.95 and after["kendall_tau"] > 0.8, (before, after)
    # the backbone is frozen and the base model's: no gradient into it, adapters stripped
    assert not any(p.requires_grad for p in sur.model.encoder.parameters())
    # the generator's reward is differentiable in the latent and normalised by the buffer's statistics
    zg = zt[:4].clone().requires_grad_(True)
    out = sur(zg, pidt[:4])
    out.sum().backward()
    assert zg.grad is not None and zg.grad.abs().sum() > 0
    sur.refresh_stats()
    with torch.no_grad():
        s_all = sur.score(torch.stack(sur.buf["z"]), torch.stack(sur.buf["pid"])).double()
    assert sur.stats.mean == pytest.approx(s_all.mean().item(), rel=1e-6, abs=1e-9)
    assert sur.stats.std == pytest.approx(s_all.std().item(), rel=1e-6)
    assert torch.allclose(sur(zg.detach(), pidt[:4]).double(),
                          (sur.score(zg.detach(), pidt[:4]).double() - s_all.mean()) / s_all.std())
    before = (sur.stats.mean, sur.stats.var)
    batch = torch.tensor([1.0, 3.0])
    sur.stats.track(batch, 0.9)  # EMA: 0.9 · old + 0.1 · the batch's
    assert sur.stats.mean == pytest.approx(0.9 * before[0] + 0.1 * 2.0)
    assert sur.stats.var == pytest.approx(0.9 * before[1] + 0.1 * 2.0)


def test_backbone_is_the_base_model_without_adapters(models):
    emb = models.encode(["x", "y"])
    z = torch.randn(2, *models.latent_shape, generator=torch.Generator().manual_seed(0))
    plain = S.LatentSurrogate(models.unet, 16, torch.Generator().manual_seed(0))
    group = rid.inject(models.unet)
    group.add_task("a")
    with torch.no_grad():
        group.flat.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    wrapped = S.LatentSurrogate(models.unet, 16, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain(z, emb), wrapped(z, emb))
    assert not any(isinstance(m, rid.LoRALinear) for m in wrapped.modules())


def test_buffer_is_fifo_and_bounded(models):
    sur = S.Surrogate(models.unet, S.SurrogateConfig(hidden=8, buffer=5), torch.zeros(1, 2, 4))
    for k in range(3):
        sur.add(torch.full((3, 1), float(k)), torch.zeros(3), torch.tensor([k, k, k], dtype=torch.float64))
    assert [float(v) for v in sur.buf["r"]] == [1, 1, 2, 2, 2]
    # pairs: only within a prompt, only with different true scores (prompt 1's two samples tie)
    sur = S.Surrogate(models.unet, S.SurrogateConfig(hidden=8), models.encode(PROMPTS))
    sur.add(torch.zeros(5, *models.latent_shape), torch.tensor([0, 1, 0, 1, 2]), torch.tensor([1.0, 3.0, 2.0, 3.0, 4.0]))
    idx, pairs = sur._pairs(16)
    assert idx.tolist() == [0, 2] and pairs.tolist() == [[0, 1]]
    sur.buf["r"][2] = torch.tensor(1.0, dtype=torch.float64)
    assert sur._pairs(4) is None and math.isnan(sur.fit(3))  # nothing to rank: no step, no error
    sur.cfg.pairs = "any"  # any two samples with different scores, whatever their prompts
    idx, pairs = sur._pairs(64)
    assert idx.tolist() == [0, 1, 2, 3, 4] and len(pairs) == 8  # C(5,2) = 10 minus the ties (0, 2) and (1, 3)


def test_online_adaptation_is_the_hand_run_of_bradley_terry_steps_on_the_fifo_buffer(models):
    """LaSRO's stage 2 as observe() runs it, against a hand run: a FIFO buffer of the last `buffer` samples,
    every k-th step m Adam steps of −mean log σ(±(s_a − s_b)) over the buffer's same-prompt pairs, the
    running statistics an EMA of each step's scores. Oracle pairs: every same-prompt pair of the buffer
    (2 samples of each of 4 prompts, so 4 pairs; 64 draws per step take all of them), enumerated by hand."""
    import copy

    emb = models.encode(PROMPTS)
    k, m, lr, mom = 2, 3, 2e-2, 0.8
    cfg = S.SurrogateConfig(hidden=8, lr=lr, buffer=8, pair_batch=64, adapt_every=k, adapt_steps=m,
                            stats_momentum=mom)
    sur = S.Surrogate(models.unet, cfg, emb, seed=3)
    frozen = S.Surrogate(models.unet, S.SurrogateConfig(**{**cfg.__dict__, "adapt_every": 0}), emb, seed=3)
    head0 = copy.deepcopy(sur.model.head)
    hand = copy.deepcopy(sur.model.head)
    hand_opt = torch.optim.Adam(hand.parameters(), lr=lr)
    sur.stats.reset(torch.tensor([0.5, -1.0, 2.0]))  # as after pre-training
    mean, var = sur.stats.mean, sur.stats.var
    g = torch.Generator().manual_seed(11)
    buf_z, buf_pid, buf_r, adapted = [], [], [], []
    for step in range(1, 7):
        z = torch.randn(4, *models.latent_shape, generator=g)  # one sample of each prompt per step
        pid = torch.tensor([2, 0, 3, 1])
        r = torch.randn(4, generator=g, dtype=torch.float64)
        with torch.no_grad():
            raw = sur.score(z, pid)
        adapted.append(sur.observe(z, pid, r, raw))
        frozen.observe(z, pid, r, raw)
        # FIFO: the last 8 samples, oldest first
        buf_z, buf_pid, buf_r = (buf_z + list(z))[-8:], (buf_pid + pid.tolist())[-8:], (buf_r + r.tolist())[-8:]
        assert torch.equal(torch.stack(sur.buf["z"]), torch.stack(buf_z))
        assert torch.stack(sur.buf["pid"]).tolist() == buf_pid and torch.stack(sur.buf["r"]).tolist() == buf_r
        # running statistics: an EMA of the step's scores
        mean = mom * mean + (1 - mom) * raw.double().mean().item()
        var = mom * var + (1 - mom) * raw.double().var().item()
        assert sur.stats.mean == pytest.approx(mean, rel=1e-12) and sur.stats.var == pytest.approx(var, rel=1e-12)
        if step % k == 0:  # the hand run: m Bradley–Terry steps on every same-prompt pair of the buffer
            pairs = [(a, b) for a in range(8) for b in range(a + 1, 8) if buf_pid[a] == buf_pid[b]]
            assert len(pairs) == 4
            zb = torch.stack(buf_z)
            with torch.no_grad():
                feats = sur.model.features(zb, emb[torch.tensor(buf_pid)])
            for _ in range(m):
                s = hand(feats).squeeze(-1).double()
                terms = [-torch.nn.functional.logsigmoid((s[a] - s[b]) if buf_r[a] > buf_r[b] else (s[b] - s[a]))
                         for a, b in pairs]
                hand_opt.zero_grad()
                torch.stack(terms).mean().backward()
                hand_opt.step()
        for p, q in zip(sur.model.head.parameters(), hand.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert adapted == [False, True, False, True, False, True]  # every k-th step
    # the frozen ablation kept its pre-trained head; the adapted one moved away from it
    assert all(torch.equal(p, q) for p, q in zip(frozen.model.head.parameters(), head0.parameters()))
    moved = max((p - q).abs().max().item() for p, q in zip(sur.model.head.parameters(), head0.parameters()))
    assert moved > 10 * lr * 1e-2, moved
    with torch.no_grad():
        zt = torch.randn(8, *models.latent_shape, generator=g)
        assert (sur.score(zt, torch.arange(8) % 4) - frozen.score(zt, torch.arange(8) % 4)).abs().max() > 1e-4


def test_config_checks_every_knob():
    for bad in ({"hidden": 0}, {"lr": float("nan")}, {"pairs": "all"}, {"adapt_every": -1}, {"buffer": True},
                {"stats_momentum": 1.0}):
        with pytest.raises(ValueError, match=f"surrogate {next(iter(bad))}"):
            S.SurrogateConfig(**bad)


def test_state_dict_continues_bit_exactly(models):
    shape, emb = models.latent_shape, models.encode(PROMPTS)
    cfg = S.SurrogateConfig(hidden=16, pair_batch=8, buffer=40, adapt_every=2, adapt_steps=3)
    z, pid, r = latent_data(64, 3, shape)

    def run(sur, chunks):
        for c in chunks:
            sur.observe(z[8 * c:8 * c + 8], pid[8 * c:8 * c + 8], r[8 * c:8 * c + 8])

    a = S.Surrogate(models.unet, cfg, emb, seed=5)
    init = [p.clone() for p in a.model.head.parameters()]
    run(a, range(8))
    assert any(not torch.equal(p, q) for p, q in zip(init, a.model.head.parameters()))  # it did adapt
    b = S.Surrogate(models.unet, cfg, emb, seed=5)
    run(b, range(3))
    c = S.Surrogate(models.unet, cfg, emb, seed=99)  # a fresh object, then the saved state
    c.load_state_dict(b.state_dict())
    run(c, range(3, 8))
    for x, y in zip(a.model.head.parameters(), c.model.head.parameters()):
        assert torch.equal(x, y)
    assert a.stats.state_dict() == c.stats.state_dict() and a.steps == c.steps == 8
    assert all(torch.equal(x, y) for k in ("z", "pid", "r") for x, y in zip(a.buf[k], c.buf[k]))
    assert len(a.buf["r"]) == 40  # bounded
    frozen = S.Surrogate(models.unet, S.SurrogateConfig(hidden=16, adapt_every=0), emb, seed=5)
    head0 = [p.clone() for p in frozen.model.head.parameters()]
    run(frozen, range(4))  # adapt_every 0: the frozen-after-pre-training ablation never adapts
    assert all(torch.equal(p, q) for p, q in zip(head0, frozen.model.head.parameters()))


def test_plugin_rewards_and_their_errors(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def brightness(images, prompts):
            return [sum(im.convert("L").getdata()) / (im.width * im.height) for im in images]
        def short(images, prompts):
            return [1.0]
        def nan(images, prompts):
            return [float("nan")] * len(images)
        def boom(images, prompts):
            raise RuntimeError("service down")
        not_callable = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    x = images(2)
    got = S.true_scores("my_rewards:brightness", S.black_box("my_rewards:brightness"), x, ["a", "b"])
    gray = [sum(im.convert("L").getdata()) / 256 for im in S.to_pil(x)]
    assert got.tolist() == pytest.approx(gray)
    assert S.is_black_box("my_rewards:brightness") and S.is_black_box("jpeg-kb") and not S.is_black_box("hps")
    dark = S.true_scores("examples.black_box:darkness", S.black_box("examples.black_box:darkness"), x, ["a", "b"])
    assert dark.tolist() == pytest.approx([1 - g / 255 for g in gray])  # the README's worked example
    for task, match in (("nowhere_mod:f", "could not be imported"), ("my_rewards:missing", "no callable"),
                        ("my_rewards:not_callable", "no callable"), (":f", "not a black-box")):
        with pytest.raises(ValueError, match=match) as e:
            S.black_box(task)
        assert repr(task) in str(e.value) and "\n" not in str(e.value)
    for task, match in (("my_rewards:short", "1 scores for 2 images"), ("my_rewards:nan", "non-finite"),
                        ("my_rewards:boom", "RuntimeError: service down")):
        with pytest.raises(ValueError, match=match) as e:
            S.true_scores(task, S.black_box(task), x, ["a", "b"])
        assert repr(task) in str(e.value)


def test_surrogate_task_scores_the_latents_it_was_given_with_the_true_reward(models):
    prompts = PROMPTS[:3]
    cfg = S.SurrogateConfig(hidden=8, pretrain_noises=2, pretrain_steps=2, pair_batch=4, adapt_every=1, adapt_steps=1)
    task = S.SurrogateTask("jpeg-kb", S.black_box("jpeg-kb"), models, prompts, cfg, seed=0)
    noise = torch.randn(6, *models.latent_shape, generator=torch.Generator().manual_seed(0))
    assert task.explored(torch.Generator()) == prompts  # pretrain_prompts 0: all
    logs = task.pretrain(prompts, noise, steps=2, guidance=2.0)
    assert logs["pretrain_samples"] == 6 and len(task.sur.buf["r"]) == 4  # the last prompt is held out
    # the buffer's scores are the true reward of the decoded final latents, in prompt-major order
    z = torch.cat([torch.stack(task.sur.buf["z"]), task.held["z"]])
    want = S.true_scores("jpeg-kb", S.black_box("jpeg-kb"), rid.decode(models, z), [])  # prompts unused
    assert torch.equal(torch.cat([torch.stack(task.sur.buf["r"]), task.held["r"]]), want)
    assert torch.stack(task.sur.buf["pid"]).tolist() == [0, 0, 1, 1] and task.held["pid"].tolist() == [2, 2]
    # the running statistics after pre-training: the pre-trained surrogate's scores over the whole buffer
    with torch.no_grad():
        s_buf = task.sur.score(torch.stack(task.sur.buf["z"]), torch.stack(task.sur.buf["pid"])).double()
    assert task.sur.stats.mean == pytest.approx(s_buf.mean().item(), rel=1e-6, abs=1e-12)
    assert task.sur.stats.var == pytest.approx(s_buf.var().item(), rel=1e-6, abs=1e-12)
    # as the methods call it: on latents, differentiable; after the step the same latents are scored
    zs = z[[1, 4]].clone().requires_grad_(True)
    out = task(zs, [prompts[0], prompts[2]])
    out.sum().backward()
    assert zs.grad.abs().sum() > 0
    with torch.no_grad():
        raw = task.sur.score(z[[1, 4]], torch.tensor([0, 2])).double()  # the surrogate before it adapts
    before = (task.sur.stats.mean, task.sur.stats.var)
    logs = task.after_step()
    assert logs["true_reward"] == pytest.approx(float(want[[1, 4]].mean()))
    assert logs["surrogate"] == pytest.approx(raw.mean().item(), rel=1e-6)
    assert task.sur.stats.mean == pytest.approx(0.9 * before[0] + 0.1 * raw.mean().item(), rel=1e-6)
    assert task.sur.stats.var == pytest.approx(0.9 * before[1] + 0.1 * raw.var().item(), rel=1e-6)
    assert len(task.sur.buf["r"]) == 6 and task._seen == []
    # the logged pair accuracy is the adapted surrogate's on the held-out pair (prompt 2's two samples)
    with torch.no_grad():
        s_held = task.sur.score(task.held["z"], task.held["pid"]).double()
    r_held = task.held["r"]
    assert r_held[0] != r_held[1]
    assert logs["pair_acc"] == float((s_held[0] - s_held[1]) * (r_held[0] - r_held[1]) > 0)
    held = task.heldout(PROMPTS[3:], torch.randn(3, *models.latent_shape), steps=2, guidance=2.0, reps=3)
    assert set(held) == {"pair_acc", "kendall_tau", "true_reward"}


#### train.py with a black-box task ####

def bb_args(sd, prompts, out, *extra):
    """One jpeg-kb task (no reward weights needed) × 4 steps, DDIM 2, batch 2, a checkpoint every step."""
    return ["--model", sd, "--prompts", prompts, "--tasks", "jpeg-kb", "--steps", "2", "--batch", "2",
            "--max-steps", "4", "--lr", "1e-2", "--ckpt-every", "1", "--device", "cpu", "--out", str(out),
            "--surrogate-pretrain-prompts", "4", "--surrogate-pretrain-noises", "2", "--surrogate-pretrain-steps", "3",
            "--surrogate-hidden", "8", "--surrogate-pair-batch", "4", "--surrogate-adapt-steps", "2", *extra]


def test_black_box_task_trains_and_resumes_bit_exactly(sd_path, tmp_path):
    import subprocess

    from safetensors.torch import load_file
    from tiny import write_prompts

    import train

    prompts = write_prompts(tmp_path / "prompts.txt")
    full = tmp_path / "full"
    assert train.main(bb_args(sd_path, prompts, full)) == 0
    sdir = full / "stage1-jpeg-kb"
    rows = [json.loads(line) for line in (sdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"true_reward", "surrogate", "pair_acc"} <= set(r) for r in rows)
    report = json.loads((sdir / "surrogate.json").read_text())
    assert report["pretrain"]["pretrain_samples"] == 8 and set(report["final"]) == {"pair_acc", "kendall_tau", "true_reward"}

    crashed = tmp_path / "crashed"  # killed as step 3 starts (steps 1-2 and their checkpoint written)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
               OMP_NUM_THREADS=str(torch.get_num_threads()))
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "train_launcher.py"), "--die-after-step", "2", "--",
                        *bb_args(sd_path, prompts, crashed)], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 17, p.stderr[-2000:]
    assert (crashed / "stage1-jpeg-kb" / "ckpt" / "surrogate.pt").exists()
    assert train.main(bb_args(sd_path, prompts, crashed, "--resume")) == 0
    a, b = load_file(str(sdir / "adapters.safetensors")), load_file(str(crashed / "stage1-jpeg-kb" / "adapters.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    got = [json.loads(line) for line in (crashed / "stage1-jpeg-kb" / "metrics.jsonl").read_text().splitlines()]
    drop = lambda r: {k: v for k, v in r.items() if k != "time"}  # noqa: E731
    assert [drop(r) for r in got] == [drop(r) for r in rows]  # surrogate scores, true rewards, accuracies too
    assert json.loads((crashed / "stage1-jpeg-kb" / "surrogate.json").read_text())["final"] == report["final"]


def test_black_box_cli_errors_are_one_line(sd_path, tmp_path, capsys, monkeypatch):
    import train
    from tiny import write_prompts

    prompts = write_prompts(tmp_path / "prompts.txt")
    (tmp_path / "bad_boxes.py").write_text("def short(images, prompts):\n    return [0.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = [(["--tasks", "nowhere_mod:f"], "could not be imported"),
             (["--tasks", "bad_boxes:short"], "1 scores for"),
             (["--surrogate-pairs", "all"], "--surrogate-pairs 'all' is not allowed"),
             (["--surrogate-hidden", "x"], "--surrogate-hidden 'x' is not allowed"),
             (["--surrogate-adapt-every", "-1"], "--surrogate-adapt-every -1 is not allowed"),
             (["--method", "r0"], "--method r0 needs differentiable rewards")]
    for extra, match in cases:
        out = tmp_path / f"o{len(extra[1])}"
        assert train.main(bb_args(sd_path, prompts, out, *extra)) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert match in err[-1] and "Traceback" not in "\n".join(err), (extra, err)
