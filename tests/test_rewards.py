"""rewards.py against independent oracles: open_clip's own model/transforms, a plain nn.Sequential MLP,
real file round trips (.safetensors and torch.save'd .pt/.pth). A tiny custom-config CLIP stands in
for ViT-L/14 and ViT-H-14; nothing downloads.

    tiny_spec(dir) -> RewardSpec   writes the tiny CLIP config + weights + aesthetic head (test_eval uses it)
"""
import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn as nn
import torchvision.transforms.functional as TF
from PIL import Image
from safetensors.torch import load_file, save_file

import rewards

CLIP_CFG = {  # open_clip model_configs format; the SimpleTokenizer needs vocab 49408, context 77
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
HEAD_DIMS = [16, 32, 8, 4, 2, 1]  # LAION's 768-1024-128-64-16-1, shrunk
MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD


class LaionMLP(nn.Module):
    """The predictor as LAION's improved-aesthetic-predictor defines it (minus the Lightning wrapper)."""

    def __init__(self, d):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(d[0], d[1]), nn.Dropout(0.2), nn.Linear(d[1], d[2]), nn.Dropout(0.2),
            nn.Linear(d[2], d[3]), nn.Dropout(0.1), nn.Linear(d[3], d[4]), nn.Linear(d[4], d[5]))

    def forward(self, x):
        return self.layers(x)


def tiny_spec(root, hps_as_pt=True, **overrides) -> rewards.RewardSpec:
    """Tiny CLIP (config JSON + .safetensors), LAION-layout head (.pth), HPS copy as a DDP-style .pt; a spec JSON."""
    torch.manual_seed(0)
    (root / "clip_config.json").write_text(json.dumps(CLIP_CFG))
    clip = open_clip.CLIP(**CLIP_CFG)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(root / "clip.safetensors"))
    torch.save(LaionMLP(HEAD_DIMS).state_dict(), root / "aesthetic.pth")
    # HPSv2 ships {'state_dict': ...} with DDP's 'module.' prefixes; a second CLIP so HPS != clip
    hps = open_clip.CLIP(**CLIP_CFG)
    torch.save({"state_dict": {"module." + k: v for k, v in hps.state_dict().items()}, "epoch": 3}, root / "hps.pt")
    spec = {"clip_arch": "clip_config.json", "clip_weights": "clip.safetensors", "aesthetic_head": "aesthetic.pth",
            "hps_arch": "clip_config.json", "hps_weights": "hps.pt", **overrides}
    (root / "rewards.json").write_text(json.dumps(spec))
    return rewards.load_spec(root / "rewards.json")


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return tiny_spec(tmp_path_factory.mktemp("spec"))


def _oracle_clip(cfg_path, weights):
    """The same tiny CLIP built straight from open_clip and the file, not through rewards.py."""
    model = open_clip.CLIP(**json.loads(open(cfg_path).read())).eval()
    if weights.endswith(".safetensors"):
        state = load_file(weights)
    else:
        state = {k.removeprefix("module."): v for k, v in torch.load(weights, weights_only=True)["state_dict"].items()}
    model.load_state_dict(state)
    return model


def _images(n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g).float() / 255  # exact uint8 values


#### PREPROCESSING ####

# Tolerance in CLIP-normalised units (1/255 of a pixel is ~0.015 there): PIL rounds to uint8 after each
# pass, torch keeps float. Uniform noise (maximal bicubic overshoot) is the worst case for that.
PIL_MAX_ERR, PIL_MEAN_ERR = 1.5 / 255 / min(STD), 0.5 / 255 / min(STD)


@pytest.mark.parametrize("h,w,size,mode", [
    (37, 53, 16, "shortest"),   # downsample, landscape, odd crop
    (53, 37, 16, "shortest"),   # portrait
    (12, 20, 16, "shortest"),   # upsample
    (16, 16, 16, "shortest"),   # already the model size
    (128, 128, 56, "shortest"), # square downsample, as SD 512 -> CLIP 224
    (37, 53, 16, "longest"),    # HPSv2: resize longest side + pad
    (20, 9, 16, "longest"),     # upsample + pad, odd padding
])
def test_preprocess_matches_open_clip_pil(h, w, size, mode):
    img = _images(1, h, w)
    pil = Image.fromarray((img[0] * 255).round().byte().permute(1, 2, 0).numpy())
    oracle = open_clip.image_transform(size, is_train=False, mean=MEAN, std=STD, resize_mode=mode)(pil)
    ours = rewards.clip_preprocess(img, size, MEAN, STD, mode)[0]
    assert ours.shape == oracle.shape == (3, size, size)
    err = (ours - oracle).abs()
    assert err.max() < PIL_MAX_ERR and err.mean() < PIL_MEAN_ERR, (err.max(), err.mean())


def test_preprocess_rejects_bad_mode():
    with pytest.raises(ValueError, match="resize_mode='squash'"):
        rewards.clip_preprocess(_images(1, 8, 8), 8, MEAN, STD, "squash")


#### SCORES vs DIRECT COMPUTATION ####

def test_aesthetic_equals_direct_open_clip(spec):
    img = _images(3, 16, 16)  # model size: preprocessing is exactly the normalisation
    ours = rewards.get("aesthetic", spec)(img, ["a"] * 3)
    model = _oracle_clip(spec.clip_arch, spec.clip_weights)
    head = LaionMLP(HEAD_DIMS).eval()
    head.load_state_dict(torch.load(spec.aesthetic_head, weights_only=True))
    with torch.no_grad():
        emb = model.encode_image(TF.normalize(img, MEAN, STD))
        ref = head(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    assert ours.shape == (3,)
    torch.testing.assert_close(ours.detach(), ref, rtol=1e-5, atol=1e-6)
    assert ref.std() > 1e-4  # the images really score differently, so the comparison has teeth


def test_aesthetic_head_loads_from_safetensors(spec, tmp_path):
    head = LaionMLP(HEAD_DIMS)
    head.load_state_dict(torch.load(spec.aesthetic_head, weights_only=True))
    save_file(head.state_dict(), str(tmp_path / "head.safetensors"))
    img = _images(2, 16, 16)
    a = rewards.get("aesthetic", spec)(img, ["a", "b"])
    b = rewards.get("aesthetic", rewards.RewardSpec(**{**spec.__dict__, "aesthetic_head": str(tmp_path / "head.safetensors")}))(img, ["a", "b"])
    torch.testing.assert_close(a, b)


def test_hps_equals_direct_open_clip(spec):
    img = _images(2, 16, 16, seed=1)
    prompts = ["a photo of a cat", "a red car on the street"]
    ours = rewards.get("hps", spec)(img, prompts)
    model = _oracle_clip(spec.hps_arch, spec.hps_weights)
    with torch.no_grad():
        i = model.encode_image(TF.normalize(img, MEAN, STD))
        t = model.encode_text(open_clip.tokenize(prompts))
        ref = torch.diagonal((i / i.norm(dim=-1, keepdim=True)) @ (t / t.norm(dim=-1, keepdim=True)).T)
    torch.testing.assert_close(ours.detach(), ref, rtol=1e-5, atol=1e-6)
    clip = rewards.clip_score(img, prompts, spec)  # the other CLIP: a different number
    assert not torch.allclose(clip / 100, ours)


def test_clip_score_and_features(spec):
    img = _images(2, 16, 16, seed=2)
    prompts = ["a dog", "a tree"]
    model = _oracle_clip(spec.clip_arch, spec.clip_weights)
    with torch.no_grad():
        i = model.encode_image(TF.normalize(img, MEAN, STD))
        t = model.encode_text(open_clip.tokenize(prompts))
        cos = torch.nn.functional.cosine_similarity(i, t, dim=-1)
        torch.testing.assert_close(rewards.clip_score(img, prompts, spec), 100 * cos, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(rewards.clip_features(img, spec), i, rtol=1e-5, atol=1e-6)


def test_models_load_once(spec):
    rewards.get("hps", spec)
    hits = rewards.load_clip.cache_info().hits
    rewards.get("hps", spec)
    assert rewards.load_clip.cache_info().hits == hits + 1


#### GRADIENTS ####

def _jpeg_ready():
    import rid_kernels

    try:
        rid_kernels.jpeg(torch.rand(1, 3, 16, 16), quality=80)
        return True
    except NotImplementedError:
        return False


@pytest.mark.parametrize("name", rewards.REWARDS)
def test_gradient_reaches_image_not_weights(spec, name):
    if name == "compress" and not _jpeg_ready():
        pytest.skip("rid_kernels.jpeg is not implemented yet (raises NotImplementedError)")
    img = _images(2, 24, 20).requires_grad_(True)  # non-square, not the model size: resize is in the graph
    score = rewards.get(name, spec)(img, ["a cat", "a dog"])
    assert score.shape == (2,) and torch.isfinite(score).all()
    score.sum().backward()
    assert img.grad is not None and torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0
    frozen = [*rewards.load_clip(spec.clip_arch, spec.clip_weights, "cpu")[0].parameters(),
              *rewards.load_clip(spec.hps_arch, spec.hps_weights, "cpu")[0].parameters(),
              *rewards.load_aesthetic_head(spec.aesthetic_head, "cpu").parameters()]
    assert all(not p.requires_grad and p.grad is None for p in frozen)


#### COMPRESS ####

def test_compress_zero_for_constant_and_drops_with_noise(spec):
    if not _jpeg_ready():
        pytest.skip("rid_kernels.jpeg is not implemented yet (raises NotImplementedError)")
    fn = rewards.get("compress", spec)
    flat = torch.full((1, 3, 32, 32), 0.5)
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    images = [(flat + a * noise).clamp(0, 1) for a in (0.0, 0.05, 0.2)]
    scores = [fn(x, ["x"]).item() for x in images]
    n = flat[0].numel()  # the reward sums over the image's 3·32·32 values
    assert abs(scores[0]) < 1e-4 * n  # a flat block is all DC: JPEG keeps it up to rounding
    assert scores[0] > scores[1] > scores[2]
    assert scores[2] < -1e-3 * n
    # each value is −‖x − JPEG(x)‖², summed over the image, with the plain-torch JPEG at the spec's quality
    import rid_kernels

    for x, got in zip(images, scores):
        x64 = x.double()
        want = -(x64 - rid_kernels.jpeg_reference(x64, spec.jpeg_quality)).square().sum().item()
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_compress_measures_pils_jpeg_error(spec):
    """-‖img − JPEG(img)‖² with PIL's own JPEG at the spec's quality (libjpeg, integer DCT and rounding, which the
    differentiable JPEG relaxes: 1 % apart on noise, ~15 % on smooth images whose error is tiny)."""
    if not _jpeg_ready():
        pytest.skip("rid_kernels.jpeg is not implemented yet (raises NotImplementedError)")
    import io

    g = torch.Generator().manual_seed(0)
    noise = torch.rand(1, 3, 48, 64, generator=g)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 7, 9, generator=g), (48, 64), mode="bicubic")
    img = (torch.cat([noise, smooth.clamp(0, 1)]) * 255).round() / 255
    ours = rewards.get("compress", spec)(img, ["a", "b"])
    ref = []
    for a in (img * 255).round().byte().permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=spec.jpeg_quality)
        back = torch.from_numpy(np.array(Image.open(buf))).float() / 255
        ref.append(-(torch.from_numpy(a).float() / 255 - back).square().sum())  # ‖img − JPEG(img)‖²
    torch.testing.assert_close(ours, torch.stack(ref), rtol=0.2, atol=0)


#### SPEC, REGISTRY, ERRORS ####

def test_unknown_reward_lists_valid_names():
    with pytest.raises(ValueError, match="unknown reward 'beauty'.*aesthetic, hps, compress"):
        rewards.get("beauty")


def test_missing_aesthetic_file_names_it(spec, tmp_path):
    bad = rewards.RewardSpec(**{**spec.__dict__, "aesthetic_head": str(tmp_path / "nope.pth")})
    with pytest.raises(ValueError, match=r"aesthetic_head=.*nope\.pth.*--reward-spec"):
        rewards.get("aesthetic", bad)


def test_missing_hps_weights_says_where_it_looked(spec, tmp_path, monkeypatch):
    monkeypatch.setenv("HPS_ROOT", str(tmp_path))

    def offline(repo, filename):
        raise OSError("no network")

    monkeypatch.setattr(rewards, "_hub_download", offline)
    bad = rewards.RewardSpec(**{**spec.__dict__, "hps_weights": None})
    with pytest.raises(ValueError, match=r"HPS_v2_compressed\.pt.*xswu/HPSv2.*hps_weights.*--reward-spec"):
        rewards.get("hps", bad)
    # ...and the hpsv2 package's cache folder is the second place looked
    (tmp_path / "HPS_v2_compressed.pt").write_bytes(open(spec.hps_weights, "rb").read())
    img = _images(1, 16, 16)
    torch.testing.assert_close(rewards.get("hps", bad)(img, ["a"]), rewards.get("hps", spec)(img, ["a"]))


def test_missing_aesthetic_hub_copy_explains(spec, monkeypatch):
    monkeypatch.setattr(rewards, "_hub_download", lambda repo, filename: (_ for _ in ()).throw(OSError("offline")))
    bad = rewards.RewardSpec(**{**spec.__dict__, "aesthetic_head": None})
    with pytest.raises(ValueError, match=r"sac\+logos\+ava1-l14-linearMSE\.pth.*aesthetic_head.*--reward-spec"):
        rewards.get("aesthetic", bad)


def test_head_must_match_clip(spec, tmp_path):
    torch.save(LaionMLP([8, 4, 4, 4, 2, 1]).state_dict(), tmp_path / "small.pth")
    with pytest.raises(ValueError, match="takes 8 features .* embeds to 16"):
        rewards.get("aesthetic", rewards.RewardSpec(**{**spec.__dict__, "aesthetic_head": str(tmp_path / "small.pth")}))
    torch.save({"layers.0.weight": torch.zeros(4, 16), "layers.0.bias": torch.zeros(4),
                "layers.2.weight": torch.zeros(1, 5), "layers.2.bias": torch.zeros(1)}, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="layer 2 takes 5 features, previous gives 4"):
        rewards.get("aesthetic", rewards.RewardSpec(**{**spec.__dict__, "aesthetic_head": str(tmp_path / "broken.pth")}))


def test_load_spec_resolves_and_validates(tmp_path):
    assert rewards.load_spec(None) == rewards.RewardSpec()
    (tmp_path / "s.json").write_text(json.dumps({"clip_arch": "ViT-B-32", "aesthetic_head": "w/head.pth"}))
    s = rewards.load_spec(tmp_path / "s.json")
    assert s.clip_arch == "ViT-B-32" and s.aesthetic_head == str(tmp_path / "w" / "head.pth")
    (tmp_path / "bad.json").write_text(json.dumps({"clip_model": "x"}))
    with pytest.raises(ValueError, match="unknown keys \\['clip_model'\\]; allowed: clip_arch"):
        rewards.load_spec(tmp_path / "bad.json")
    (tmp_path / "q.json").write_text(json.dumps({"jpeg_quality": 0}))
    with pytest.raises(ValueError, match="jpeg_quality=0 .* 1..100"):
        rewards.load_spec(tmp_path / "q.json")
    with pytest.raises(ValueError, match="is not a file"):
        rewards.load_spec(tmp_path / "missing.json")


def test_checkpoint_that_does_not_fit_names_the_file(spec, tmp_path):
    save_file({"visual.proj": torch.zeros(3, 3)}, str(tmp_path / "wrong.safetensors"))
    bad = rewards.RewardSpec(**{**spec.__dict__, "hps_weights": str(tmp_path / "wrong.safetensors")})
    with pytest.raises(ValueError, match=r"wrong\.safetensors.* does not fit CLIP config"):
        rewards.get("hps", bad)


@pytest.mark.parametrize("weights,quick_gelu", [("openai", True), ("laion2b_s32b_b82k", False)])
def test_openai_weights_get_quick_gelu(monkeypatch, weights, quick_gelu):
    """open_clip 3 only warns when OpenAI's QuickGELU weights meet ViT-L-14's GELU config; the aesthetic
    MLP was fitted on QuickGELU features. open_clip's own tag table says which tags need it."""
    seen = {}

    def fake_create_model(arch, pretrained=None, **kw):  # no download: record what would be built
        seen.update(kw, arch=arch, pretrained=pretrained)
        return open_clip.CLIP(**CLIP_CFG)

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    rewards.load_clip.__wrapped__("ViT-L-14", weights, "cpu")
    assert seen == {"arch": "ViT-L-14", "pretrained": weights, "force_quick_gelu": quick_gelu}
    assert open_clip.get_pretrained_cfg("ViT-L-14", weights).get("quick_gelu", False) is quick_gelu


def test_custom_arch_needs_a_checkpoint(spec):
    with pytest.raises(ValueError, match="needs a checkpoint file"):
        rewards.get("aesthetic", rewards.RewardSpec(**{**spec.__dict__, "clip_weights": "openai"}))


#### JOINT ####

def test_parse_joint():
    assert rewards.parse_joint("aesthetic:0.01,hps:2,compress:1") == {"aesthetic": 0.01, "hps": 2.0, "compress": 1.0}
    for bad, msg in [("aesthetic=1", "not name:weight"), ("beauty:1", "not name:weight"),
                     ("hps:x", "weight 'x' of 'hps' is not a number"), ("hps:1,hps:2", "given twice"),
                     ("hps:0", "finite number > 0"), ("hps:-1", "finite number > 0"), ("hps:nan", "finite number > 0"),
                     ("hps:inf", "finite number > 0")]:
        with pytest.raises(ValueError, match=msg):
            rewards.parse_joint(bad)


def test_joint_is_the_weighted_sum(spec):
    img = _images(2, 16, 16, seed=3)
    prompts = ["a cat", "a car"]
    fn = rewards.joint({"aesthetic": 0.01, "hps": 2.0}, spec)
    ref = 0.01 * rewards.get("aesthetic", spec)(img, prompts) + 2.0 * rewards.get("hps", spec)(img, prompts)
    torch.testing.assert_close(fn(img, prompts), ref)
