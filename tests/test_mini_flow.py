"""The mini flow world (mini/flow_build.py): an SD3-architecture model on the mini world, reduced build.

Oracles: the world's own files (bytes, and its CLIPTextModel's states), diffusers' StableDiffusion3Pipeline
(conditioning, latents, images), the transformer with diffusers' own attention on the 256 zero T5 tokens
written out, and train.py end to end.
"""
import json
from pathlib import Path

import pytest
import torch

import mini
from tiny import assert_same_build

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not (mini.WORLD / "world.json").exists(), reason="mini/world not built yet")]

PROMPTS = ["a big red circle on the left, plain blue background",
           "a small green square at the top and a big yellow triangle at the bottom, striped white background"]


def _build(out):
    from mini.__main__ import main
    assert main(["build-flow", "--small", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def pipe(small_flow):
    from mini.flow_build import load_pipeline
    return load_pipeline(small_flow)


def test_small_flow_build_is_reproducible_bit_for_bit(small_flow, tmp_path):
    files = assert_same_build(small_flow, _build(tmp_path / "again"), "flow.json")
    assert Path("transformer/diffusion_pytorch_model.safetensors") in files and Path("flow.json") in files


def test_flow_reuses_the_worlds_vae_tokenizer_and_text_encoder(small_flow):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    wm = mini.MODEL
    assert (small_flow / "vae/diffusion_pytorch_model.safetensors").read_bytes() == \
        (wm / "vae/diffusion_pytorch_model.safetensors").read_bytes()
    world_cfg, flow_cfg = (json.loads((d / "vae/config.json").read_text()) for d in (wm, small_flow))
    assert world_cfg.pop("shift_factor") is None and flow_cfg.pop("shift_factor") == 0.0
    assert world_cfg == flow_cfg
    for sub in ("tokenizer", "tokenizer_2"):
        for f in (wm / "tokenizer").iterdir():
            assert (small_flow / sub / f.name).read_bytes() == f.read_bytes(), (sub, f.name)
    assert (small_flow / "text_encoder/model.safetensors").read_bytes() == \
        (small_flow / "text_encoder_2/model.safetensors").read_bytes()
    # the world's encoder's states, and pooled = its final-layer-normed EOS state (identity projection)
    tok = CLIPTokenizer.from_pretrained(wm, subfolder="tokenizer")
    ids = tok(PROMPTS + [""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    world = CLIPTextModel.from_pretrained(wm, subfolder="text_encoder")
    ours = CLIPTextModelWithProjection.from_pretrained(small_flow, subfolder="text_encoder")
    with torch.no_grad():
        a, b = world(ids, output_hidden_states=True), ours(ids, output_hidden_states=True)
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.testing.assert_close(b.text_embeds, a.pooler_output, rtol=0, atol=0)
    assert torch.equal(ours.text_projection.weight, torch.eye(64))


def test_flow_pipeline_and_rid_backbone_give_the_same_latents_and_images(small_flow, pipe):
    import backbones.sd3
    import rid
    import samplers
    flow = json.loads((small_flow / "flow.json").read_text())
    models = rid.load_models(str(small_flow))
    assert isinstance(models, backbones.sd3.SD3) and models.text_encoder_3 is None
    assert tuple(models.latent_shape) == tuple(flow["latent_shape"]) == (4, 8, 8)
    steps, w = flow["steps"], flow["guidance"]
    cond = models.conditioning(PROMPTS, w)                               # [uncond; cond]
    # the 256 zero T5 tokens as one (backbones.sd3.RepeatedLastToken, set on the transformer at load)
    assert cond.hidden.shape == (4, 24 + 1, 128) and cond.extra["pooled"].shape == (4, 128)
    with torch.no_grad():
        pe, ne, pp, npp = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True)
    torch.testing.assert_close(cond.hidden, torch.cat([ne, pe])[:, :25], rtol=0, atol=0)
    torch.testing.assert_close(cond.extra["pooled"], torch.cat([npp, pp]), rtol=1e-6, atol=1e-6)
    noise = torch.randn(2, *models.latent_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        z = samplers.denoise(models, cond, noise.clone(), models.sampler(steps), range(steps), w)
        ref_z = pipe(PROMPTS, latents=noise.clone(), num_inference_steps=steps, guidance_scale=w,
                     output_type="latent").images
    torch.testing.assert_close(z, ref_z, rtol=1e-5, atol=1e-5)
    images = rid.sample(models, PROMPTS, noise.clone(), steps=steps, guidance=w)
    ref = pipe(PROMPTS, latents=noise.clone(), num_inference_steps=steps, guidance_scale=w, output_type="pt").images
    assert images.shape == ref.shape == (2, 3, 32, 32)
    torch.testing.assert_close(images, ref, rtol=1e-5, atol=1e-5)


def test_one_repeated_token_equals_the_256_zero_t5_tokens(pipe):
    """Training's shortcut (RepeatedLastToken on 24 + 1 text tokens) == diffusers' own attention on the
    pipeline's 24 + 256: the transformer's output and every parameter's gradient."""
    import copy

    from backbones.sd3 import RepeatedLastToken
    from mini import models
    from mini.flow_build import T5_TOKENS
    torch.manual_seed(0)
    net = models.flow_transformer(128, 128)
    for p in net.parameters():       # a trained-looking net: the zero-initialised gates and output open
        torch.nn.init.normal_(p, std=0.05) if p.ndim >= 2 else torch.nn.init.normal_(p, std=0.3)
    short = copy.deepcopy(net)
    short.set_attn_processor(RepeatedLastToken(T5_TOKENS))
    with torch.no_grad():
        full_c, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
        one_c, _, _, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=1)
    assert full_c.shape == (2, 24 + T5_TOKENS, 128) and one_c.shape == (2, 25, 128)
    torch.testing.assert_close(one_c, full_c[:, :25], rtol=0, atol=0)
    z, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([900.0, 250.0])
    outs, grads = [], []
    for m, c in ((net, full_c), (short, one_c)):
        v = m(hidden_states=z, timestep=t, encoder_hidden_states=c, pooled_projections=pooled).sample
        v.square().mean().backward()
        outs.append(v.detach())
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert outs[0].abs().mean() > 0.1
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)
    # the log-multiplicity is what makes it exact: as a plain single token the output moves
    net.set_attn_processor(RepeatedLastToken(1))
    with torch.no_grad():
        plain = net(hidden_states=z, timestep=t, encoder_hidden_states=one_c, pooled_projections=pooled).sample
    assert (plain - outs[0]).abs().max() > 1e-3


def test_a_train_py_step_on_the_flow_model(small_flow, tmp_path):
    """RID (the default method) on the flow model, toy size: one optimizer step on the aesthetic reward."""
    from safetensors.torch import load_file

    import train
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    assert train.main(["--model", str(small_flow), "--reward-spec", str(mini.REWARD_SPEC), "--prompts", str(prompts),
                       "--tasks", "aesthetic", "--steps", "2", "--batch", "2", "--micro-batch", "1", "--max-steps", "1",
                       "--lr", "1e-2", "--device", "cpu", "--out", str(out)]) == 0
    saved = [load_file(str(f)) for f in out.rglob("adapters.safetensors")]
    assert saved and all(torch.isfinite(v).all() for s in saved for v in s.values())
    assert any(v.abs().max() > 0 for s in saved for k, v in s.items() if k.endswith("/B"))   # B starts at 0


def test_build_flow_refuses_what_is_not_a_world_or_a_flow_world(tmp_path, capsys):
    from mini.__main__ import main
    (tmp_path / "notes.txt").write_text("mine")
    for argv, flag in ((["--world", str(tmp_path / "nowhere")], "--world"), (["--out", str(tmp_path)], "--out"),
                       (["--threads", "0"], "--threads")):
        assert main(["build-flow", "--small", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and flag in err, err
    assert (tmp_path / "notes.txt").exists()


# ---------------------------------------------------------------------------- the committed flow world

committed_flow = pytest.mark.skipif(not (mini.FLOW / "flow.json").exists(), reason="mini/flow not built yet")


@committed_flow
def test_committed_flow_world_is_small_plain_and_loads_through_rid_and_diffusers_alike():
    import rid
    from mini.flow_build import load_pipeline
    files = [p for p in mini.FLOW.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".safetensors", ".json", ".txt"}
    # beside the world's files it repeats byte for byte (git stores each once): the transformer, one text encoder
    assert sum(p.stat().st_size for p in files if "transformer" in p.parts or "text_encoder" in p.parts) <= 5 * 2 ** 20
    flow = json.loads((mini.FLOW / "flow.json").read_text())
    models = rid.load_models(str(mini.FLOW))
    noise = torch.randn(2, *flow["latent_shape"], generator=torch.Generator().manual_seed(0))
    images = rid.sample(models, PROMPTS, noise.clone(), steps=flow["steps"], guidance=flow["guidance"])
    ref = load_pipeline(mini.FLOW)(PROMPTS, latents=noise.clone(), num_inference_steps=flow["steps"],
                                   guidance_scale=flow["guidance"], output_type="pt").images
    torch.testing.assert_close(images, ref, rtol=1e-4, atol=1e-4)
    assert (images[0] - images[1]).abs().max() > 0.1  # two prompts, two noises: two different scenes
