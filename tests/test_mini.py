"""The mini world: domain, rating, the reduced build's artifacts, and the committed world.

Oracles: a hue classifier and caption regex written here (not the domain's parser), PIL's JPEG
encoder, diffusers/transformers/open_clip loaders, SD-1.5's schedule formula, a LAION MLP built
here from its published layout, and the vignette's gain worked out by hand at chosen pixels.
"""
import colorsys
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import mini
from mini import domain
from tiny import assert_same_build

# ---------------------------------------------------------------------------- domain

HUES = {"red": 0, "orange": 30, "yellow": 55, "green": 130, "blue": 225, "purple": 280}
THING = re.compile(r"a (small|big) (\w+) (circle|square|triangle|diamond) "
                   r"(on the left|on the right|at the top|at the bottom|in the center)")


def colour_name(rgb) -> str:
    """Independent colour classifier: achromatic by value, chromatic by nearest hue."""
    h, s, v = colorsys.rgb_to_hsv(*(np.asarray(rgb, dtype=float) / 255))
    if s < 0.2:
        return "black" if v < 0.2 else "white" if v > 0.85 else "gray"
    return min(HUES, key=lambda k: min(abs(h * 360 - HUES[k]), 360 - abs(h * 360 - HUES[k])))


def test_domain_is_deterministic_for_a_seed():
    a, ca = domain.sample(np.random.default_rng(7), 16, None)
    b, cb = domain.sample(np.random.default_rng(7), 16, None)
    c, _ = domain.sample(np.random.default_rng(8), 16, None)
    assert a.dtype == np.uint8 and a.shape == (16, 32, 32, 3)
    assert np.array_equal(a, b) and ca == cb
    assert not np.array_equal(a, c)


def test_captions_describe_the_rendered_scene():
    rng = np.random.default_rng(0)
    region = {"on the left": lambda x, y: x < 14, "on the right": lambda x, y: x > 18,
              "at the top": lambda x, y: y < 14, "at the bottom": lambda x, y: y > 18,
              "in the center": lambda x, y: 12 < x < 20 and 12 < y < 20}
    for _ in range(300):
        scene = domain.sample_scene(rng)
        text, img = scene.caption, domain.render(scene)
        things = THING.findall(text)
        assert len(things) == len(scene.shapes) and text.endswith(" background")
        for (size, color, kind, where), shape in zip(things, scene.shapes):
            assert colour_name(img[int(shape.cy), int(shape.cx)]) == color, (text, shape)
            assert region[where](shape.cx, shape.cy), (text, shape)
        if len(things) == 2 and things[0][0] != things[1][0] and things[0][1] != things[1][1] and ", plain " in text:  # 'big' covers more
            area = [sum(colour_name(p) == t[1] for p in img.reshape(-1, 3)) for t in things]
            big = 0 if things[0][0] == "big" else 1
            assert area[big] > area[1 - big], text
        if ", plain " in text:                                       # corners show the background
            bg = text.split(", plain ")[1].split()[0]
            assert colour_name(img[0, 0]) == bg and colour_name(img[-1, -1]) == bg, text


def test_parse_inverts_caption_and_rejects_other_text():
    rng = np.random.default_rng(3)
    for _ in range(50):
        scene = domain.sample_scene(rng)
        again = domain.scene_for(scene.caption, rng)
        assert again.caption == scene.caption
    with pytest.raises(ValueError, match="not a mini-world caption"):
        domain.parse("a photo of a cat")


def test_prompt_split_is_deterministic_and_disjoint():
    train, test = domain.prompt_sets(0, 200, 20)
    assert (train, test) == domain.prompt_sets(0, 200, 20)
    assert len(set(train)) == 200 and len(set(test)) == 20 and not set(train) & set(test)
    assert all(domain.split_of(t) == "test" for t in test)
    words = {w for t in train for w in t.replace(",", " ").split()}
    assert all(w in words for t in test for w in t.replace(",", " ").split())
    rng = np.random.default_rng(1)
    assert all(domain.split_of(domain.sample_scene(rng, "train").caption) == "train" for _ in range(100))


def _jpeg_error(u8, quality=80):
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="JPEG", quality=quality)
    back = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=float)
    return float(((u8 / 255.0 - back / 255.0) ** 2).mean())


def test_rating_is_deterministic_ranks_designed_images_and_conflicts_with_jpeg():
    rng = np.random.default_rng(0)
    good = domain.render(domain.scene_for(
        "a big yellow circle on the left and a big red square on the right, checkered blue background", rng))
    bad = domain.render(domain.scene_for("a small gray diamond in the center, plain white background", rng))
    r = domain.rating(np.stack([good, bad]))
    assert r[0] > r[1] + 3 and 1 <= r.min() and r.max() <= 10
    assert np.array_equal(domain.rating(good.copy()), domain.rating(good)) and float(domain.rating(good)) == r[0]
    # The conflict the RIL experiment needs: what the rating likes is what JPEG loses (PIL as oracle).
    imgs, _ = domain.sample(np.random.default_rng(1), 200, None)
    rank = lambda v: np.argsort(np.argsort(v))
    rho = np.corrcoef(rank(domain.rating(imgs)), rank([_jpeg_error(x) for x in imgs]))[0, 1]
    assert rho > 0.4
    with pytest.raises(ValueError, match="shape"):
        domain.rating(np.zeros((4, 4)))


def test_vignette_darkens_corners_by_the_documented_gain_and_preference_peaks_at_depth_1():
    img = np.full((2, 32, 32, 3), 200, np.uint8)
    out = domain.vignette(img, [0.0, 1.0])
    assert np.array_equal(out[0], img[0])                              # depth 0: unchanged
    # by hand: corner pixel (0, 0) is the farthest, rho^2 = 1, gain 1 - 0.5 = 0.5; the pixel nearest the
    # centre, (15, 15), has rho^2 = 2 * 0.5^2 / (2 * 15.5^2); the middle of the top edge (0, 15) 0.5 + tiny
    assert out[1, 0, 0, 0] == 100 and out[1, 31, 31, 2] == 100
    assert out[1, 15, 15, 1] == round(200 * (1 - 0.5 * 0.25 / 15.5 ** 2))
    assert out[1, 0, 15, 0] == round(200 * (1 - 0.5 * (15.5 ** 2 + 0.25) / (2 * 15.5 ** 2)))
    assert (domain.vignette(img[:1], 2.0)[0, 0, 0] == 0).all()          # depth 2: black corners
    p = domain.preference(np.array([0.0, 0.5, 1.0, 1.5, 2.0]))
    assert p.tolist() == [0.0, 0.5, 1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="shape"):
        domain.vignette(np.zeros((4, 4)), 1.0)
    # the build's torch version is the same function
    from mini import build
    real, _ = domain.sample(np.random.default_rng(5), 6, None)
    depth = np.linspace(0, 2, 6)
    x01 = torch.from_numpy(real).permute(0, 3, 1, 2).double() / 255
    ours = (build.vignette(x01, torch.from_numpy(depth)) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    assert np.abs(ours.astype(int) - domain.vignette(real, depth).astype(int)).max() <= 1


def test_domain_tokenizer_tokenises_like_clip(tmp_path):
    """The small CLIPTokenizer (derived BPE subset) gives CLIP's own BPE tokens for domain text."""
    import open_clip
    from mini import models
    tok = models.write_tokenizer(tmp_path)
    clip_bpe = open_clip.tokenizer.SimpleTokenizer()
    rng = np.random.default_rng(2)
    for _ in range(100):
        text = domain.sample_scene(rng).caption
        ours = tok.convert_ids_to_tokens(tok(text).input_ids)
        assert ours == ["<|startoftext|>"] + [clip_bpe.decoder[i] for i in clip_bpe.encode(text)] + ["<|endoftext|>"]
        assert len(ours) <= tok.model_max_length
    assert len(tok) < 1000 and tok.convert_ids_to_tokens(tok("zebra!").input_ids)[-1] == "<|endoftext|>"


# ---------------------------------------------------------------------------- the reduced build

@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    from mini.__main__ import main
    out = tmp_path_factory.mktemp("mini") / "world"
    assert main(["build", "--small", "--out", str(out)]) == 0
    return out


def _laion_mlp(state):
    """LAION's improved-aesthetic-predictor layout, sized from the checkpoint's shapes."""
    d = [state[f"layers.{i}.weight"].shape for i in (0, 2, 4, 6, 7)]
    return torch.nn.Sequential(torch.nn.Linear(d[0][1], d[0][0]), torch.nn.Dropout(0.2),
                               torch.nn.Linear(d[1][1], d[1][0]), torch.nn.Dropout(0.2),
                               torch.nn.Linear(d[2][1], d[2][0]), torch.nn.Dropout(0.1),
                               torch.nn.Linear(d[3][1], d[3][0]), torch.nn.Linear(d[4][1], d[4][0]))


def test_small_build_artifacts_load_with_the_sd_loaders(small_world):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTokenizer
    import open_clip

    m = small_world / "model"
    unet = UNet2DConditionModel.from_pretrained(m, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(m, subfolder="vae")
    te = CLIPTextModel.from_pretrained(m, subfolder="text_encoder")
    tok = CLIPTokenizer.from_pretrained(m, subfolder="tokenizer")
    sched = DDIMScheduler.from_pretrained(m, subfolder="scheduler")
    assert (m / "tokenizer" / "vocab.json").exists() and (m / "tokenizer" / "merges.txt").exists()
    # SD-1.5's schedule: betas = linspace(√0.00085, √0.012, 1000)²
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(sched.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-5)
    sched.set_timesteps(50)
    assert sched.timesteps[0] == 981 and sched.timesteps[-1] == 1 and not sched.config.set_alpha_to_one
    # rid's LoRA targets exist in every transformer block
    names = [n for n, _ in unet.named_modules()]
    for t in ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"):
        assert any(n.endswith("attn2." + t) or n.endswith(t) for n in names), t
    # text -> UNet -> VAE decode, at the world's shapes
    world = json.loads((small_world / "world.json").read_text())
    ids = tok(["a big red circle on the left, plain blue background"], padding="max_length",
              max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        cond = te(ids).last_hidden_state
        eps = unet(torch.randn(1, *world["latent_shape"]), 981, cond).sample
        img = vae.decode(eps / vae.config.scaling_factor).sample
    assert eps.shape == (1, 4, 8, 8) and img.shape == (1, 3, 32, 32)
    assert vae.config.scaling_factor == pytest.approx(world["scaling_factor"])
    # the domain CLIP through open_clip's own loader, and the LAION-layout head
    spec = json.loads((small_world / "rewards.json").read_text())
    clip = open_clip.model.CLIP(**json.loads((small_world / spec["clip_arch"]).read_text()))
    open_clip.load_checkpoint(clip, str(small_world / spec["clip_weights"]))
    state = load_file(str(small_world / spec["aesthetic_head"]))
    mlp = _laion_mlp(state)
    mlp.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})  # LAION keys: layers.N.*
    with torch.no_grad():
        f = clip.encode_image(torch.rand(2, 3, 32, 32), normalize=True)
    assert mlp(f).shape == (2, 1)
    # the hps model: same architecture, its own weights; only the image tower differs from the CLIP's
    hps = open_clip.model.CLIP(**json.loads((small_world / spec["hps_arch"]).read_text()))
    open_clip.load_checkpoint(hps, str(small_world / spec["hps_weights"]))
    assert spec["hps_weights"] != spec["clip_weights"]
    a, b = clip.state_dict(), hps.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("visual."))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("visual."))
    assert {"hps_pair_accuracy_test", "hps_real_test_depth0", "hps_generated_test"} <= world["quality"].keys()
    fid = load_file(str(small_world / "fid_ref.safetensors"))["images"]
    assert fid.dtype == torch.uint8 and fid.shape[1:] == (3, 32, 32)
    test = (small_world / "prompts" / "test.txt").read_text().splitlines()
    assert len(test) == 50 and len(fid) == world["fid_ref"]["n"]


def test_build_is_reproducible_bit_for_bit(small_world, tmp_path):
    """The README's claim that `python -m mini build` rebuilds the committed world exactly: a second build with
    the same seed (and thread count) writes the same tensors, prompts and measured quality."""
    from mini.__main__ import main
    assert main(["build", "--small", "--out", str(tmp_path / "again")]) == 0
    assert_same_build(small_world, tmp_path / "again", "world.json")


def test_build_refuses_a_directory_that_is_not_a_world(tmp_path, capsys):
    from mini.__main__ import main
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["build", "--small", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--out" in err and (tmp_path / "notes.txt").exists()
    assert main(["build", "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the committed world

committed = pytest.mark.skipif(not (mini.WORLD / "world.json").exists(), reason="mini/world not built yet")


@committed
def test_committed_world_is_small_and_plain():
    files = [p for p in mini.WORLD.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2 ** 20
    assert {p.suffix for p in files} <= {".safetensors", ".json", ".txt"}
    train = (mini.WORLD / "prompts" / "train.txt").read_text().splitlines()
    test = (mini.WORLD / "prompts" / "test.txt").read_text().splitlines()
    assert (train, test) == domain.prompt_sets(0, 750, 50)


@committed
def test_committed_model_loads_through_rid():
    import rid
    world = json.loads((mini.WORLD / "world.json").read_text())
    models = rid.load_models(str(mini.MODEL))
    assert tuple(models.latent_shape) == tuple(world["latent_shape"])
    prompts = (mini.WORLD / "prompts" / "test.txt").read_text().splitlines()[:2]
    noise = torch.randn(2, *world["latent_shape"], generator=torch.Generator().manual_seed(0))
    images = rid.sample(models, prompts, noise, steps=world["steps"], guidance=world["guidance"])
    assert images.shape == (2, 3, 32, 32)
    # the same model through diffusers' own pipeline (its saved DDIM scheduler, CFG): the same images
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(mini.MODEL))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompts, latents=noise.clone(), num_inference_steps=world["steps"], guidance_scale=world["guidance"],
               output_type="pt").images
    torch.testing.assert_close(images, ref, rtol=1e-4, atol=1e-4)
    assert (images[0] - images[1]).abs().max() > 0.1  # two prompts, two noises: two different scenes


@committed
def test_committed_rewards_load_through_rewards_py():
    import rewards
    from safetensors.torch import load_file
    spec = rewards.load_spec(str(mini.REWARD_SPEC))
    n = 20
    images = load_file(str(mini.WORLD / "fid_ref.safetensors"))["images"].float().div(255)
    per = json.loads((mini.WORLD / "world.json").read_text())["fid_ref"]["n"] // 50
    prompts = [p for p in (mini.WORLD / "prompts" / "test.txt").read_text().splitlines() for _ in range(per)]
    images, prompts = images[::per][:n], prompts[::per][:n]        # one image of each of n captions
    hps = rewards.get("hps", spec)
    matched = hps(images, prompts)
    shuffled = hps(images, prompts[1:] + prompts[:1])
    assert matched.shape == (n,) and torch.isfinite(matched).all()
    assert matched.mean() > shuffled.mean()                          # the CLIP recognises real images
    aesthetic = rewards.get("aesthetic", spec)(images, prompts)
    truth = torch.from_numpy(domain.rating((images * 255).round().byte().permute(0, 2, 3, 1).numpy()))
    assert aesthetic.shape == (n,) and np.corrcoef(aesthetic.numpy(), truth.numpy())[0, 1] > 0.5


@committed
def test_committed_hps_model_prefers_the_preferred_vignette_and_the_clip_does_not():
    """The hps reward has headroom over real (vignette-free) images, and only the hps model has it: the
    CLIP that scores CLIP score / FID was not trained on preferences."""
    import rewards
    from safetensors.torch import load_file
    spec = rewards.load_spec(str(mini.REWARD_SPEC))
    per = json.loads((mini.WORLD / "world.json").read_text())["fid_ref"]["n"] // 50
    real = load_file(str(mini.WORLD / "fid_ref.safetensors"))["images"][::per]            # one per caption
    prompts = (mini.WORLD / "prompts" / "test.txt").read_text().splitlines()
    u8 = real.permute(0, 2, 3, 1).numpy()
    at = lambda d: torch.from_numpy(domain.vignette(u8, d)).permute(0, 3, 1, 2).float() / 255
    hps = rewards.get("hps", spec)
    s0, s1, s2 = (hps(at(d), prompts) for d in (0.0, 1.0, 2.0))
    assert (s1 > s0).float().mean() >= 0.9 and (s1 > s2).float().mean() >= 0.9
    assert float((s1 - s0).mean()) > 0.02
    clip = lambda x: rewards.clip_score(x, prompts, spec) / 100
    assert float((clip(at(1.0)) - clip(at(0.0))).mean()) < 0.01               # the plain CLIP: no such taste
    assert float(s0.mean()) > float(hps(at(0.0), prompts[1:] + prompts[:1]).mean()) + 0.2  # still caption fidelity
