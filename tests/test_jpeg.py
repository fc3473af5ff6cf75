"""rid_kernels.jpeg: the differentiable JPEG round trip.

Oracles: PIL's real JPEG codec (libjpeg-turbo: its quantisation tables and its encode/decode),
torch.autograd.gradcheck (finite differences) for the reference's gradients, the plain-torch
reference for the Triton path (under the Triton interpreter), numpy edge padding for the crop.
"""
import io
import math
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # read when the Triton kernels are decorated, i.e. at import

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import rid_kernels  # noqa: E402
from rid_kernels import jpeg, jpeg_reference, quality_tables  # noqa: E402

jmod = sys.modules["rid_kernels.jpeg"]  # the module (rid_kernels.jpeg is the function)
needs_triton = pytest.mark.skipif(not rid_kernels.HAS_TRITON, reason="triton is not installed")


def scene(h: int, w: int, seed: int, noise: float = 0.02) -> torch.Tensor:
    """Natural-ish RGB image (3, h, w) on the uint8 grid: smooth gradients, a disk, a box, mild noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.stack([0.2 + 0.6 * xx, 0.3 + 0.4 * yy, 0.5 + 0.3 * torch.sin(3 * xx + 2 * yy)])
    cy, cx, r = torch.rand(3, generator=g)
    disk = ((yy - cy) ** 2 + (xx - cx) ** 2 < (0.15 + 0.2 * r) ** 2).float()
    img = img * (1 - disk) + torch.rand(3, 1, 1, generator=g) * disk
    box = ((yy > 0.6) & (yy < 0.85) & (xx > 0.1) & (xx < 0.4)).float()
    img = img * (1 - box) + torch.rand(3, 1, 1, generator=g) * box
    img = (img + noise * torch.randn(3, h, w, generator=g)).clamp(0, 1)
    return (img * 255).round() / 255  # what PIL sees is exactly what we see


def pil_jpeg(img: torch.Tensor, quality: int):
    """PIL's real 4:2:0 JPEG round trip of img (3, H, W) -> ((3, H, W) in [0, 1], the decoded Image)."""
    a = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=quality, subsampling=2)
    im = Image.open(io.BytesIO(buf.getvalue()))
    out = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float() / 255
    return out, im


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1.0 / ((a.float() - b.float()) ** 2).mean().item())


# ---------------------------------------------------------------------------------------------
# agreement with libjpeg (PIL)
# ---------------------------------------------------------------------------------------------
def test_quality_tables_are_libjpegs_at_every_quality():
    for q in range(1, 101):
        _, im = pil_jpeg(torch.full((3, 8, 8), 0.5), q)
        luma, chroma = quality_tables(q)
        assert luma.shape == chroma.shape == (8, 8) and luma.dtype == torch.float32 and not luma.requires_grad
        assert luma.flatten().tolist() == list(im.quantization[0]), q  # Pillow reports natural order
        assert chroma.flatten().tolist() == list(im.quantization[1]), q


# Both codecs quantise the same DCT coefficients with the same tables, so they agree up to
# libjpeg's integer pipeline (uint8 YCbCr before the DCT, fixed-point DCT, rounded IDCT output
# and colour conversion: a fraction of a level per sample) plus the rare coefficient that those
# small differences push across a rounding boundary (one flip moves a whole quantisation step, which
# is why chroma, with its large tables, dominates the residual) and our cubic rounding (≤ Q/8 per
# coefficient). Measured on these scenes (3 seeds, 64×96 and 45×70): 40.5–45.4 dB at q 50–95 (on
# grey images, luma alone, 51–53 dB), while the input itself is 23–32 dB from PIL's output.
@pytest.mark.parametrize("quality", [50, 75, 95])
@pytest.mark.parametrize("size", [(64, 96), (45, 70)])
def test_close_to_pil_and_reproduces_its_artefacts(quality, size):
    imgs = torch.stack([scene(*size, seed) for seed in range(2)])
    ours = jpeg_reference(imgs, quality)
    for img, o in zip(imgs, ours):
        ref, _ = pil_jpeg(img, quality)
        assert psnr(o, ref) > 38.0
        assert psnr(o, ref) > psnr(img, ref) + 10.0  # it does JPEG's damage, not the identity


def test_low_quality_artefacts_match_pil():
    # At quality 10 the JPEG is far from the input (blocking, colour bleeding); ours stays close
    # to PIL's (measured 37.7–39.3 dB, the input 22.0–25.1 dB).
    for seed in range(3):
        img = scene(64, 96, seed)
        ref, _ = pil_jpeg(img, 10)
        o = jpeg_reference(img[None], 10)[0]
        assert psnr(o, ref) > 35.0
        assert psnr(o, ref) > psnr(img, ref) + 11.0


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------
def test_reference_gradcheck_float64():
    # The cubic rounding is a genuine function with its derivative, so finite differences check
    # the whole analytic chain (DCT, ÷Q, r', ×Q, IDCT, sub/upsampling, padding, colour). It jumps
    # at half-integer coefficients; a random image is almost surely eps-far from them, and the
    # [0.2, 0.8] range keeps the output clamp inactive.
    g = torch.Generator().manual_seed(0)
    img = (0.2 + 0.6 * torch.rand(1, 3, 8, 12, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: jpeg_reference(x, 50), (img,), eps=1e-6, atol=1e-5)


def _straight_through(y):
    """Straight-through rounding: forward ⌊y⌉ (half away from zero), backward the identity."""
    return y + (torch.sign(y) * torch.floor(y.abs() + 0.5) - y).detach()


def _luma_only_gradient(quality):
    """d‖x − JPEG(x)‖²/ds for a grey image x = (s, s, s): its chroma is zero whatever s is (the JFIF chroma
    rows sum to 0), so only the luma chain carries this gradient. Values in [0.2, 0.8] keep the clamp off."""
    g = torch.Generator().manual_seed(1)
    s = (0.2 + 0.6 * torch.rand(1, 1, 16, 16, generator=g, dtype=torch.float64)).requires_grad_()
    grey = s.expand(1, 3, 16, 16)
    loss = ((grey - jpeg_reference(grey, quality)) ** 2).sum()
    (grad,) = torch.autograd.grad(loss, s)
    return grad, loss.detach()


def test_compress_reward_gradient_sees_quantisation(monkeypatch):
    # Straight-through rounding makes the luma chain's backward DCT → ÷Q → ×Q → IDCT = identity, so
    # ∂(x − JPEG(x))/∂s vanishes on luma and the reward's gradient cannot see quantisation; the cubic
    # rounding gives it one. Taken over s (luma alone): over full RGB the chroma path (2×2 average, then
    # bilinear upsampling: not the identity) keeps a gradient even under straight-through.
    grad, loss = _luma_only_gradient(30)
    assert loss > 1e-2 and grad.abs().max() > 1e-3 * loss.item() ** 0.5
    # the oracle's own check: with straight-through built here, the same gradient is zero (up to fp64 rounding)
    monkeypatch.setattr(jmod, "_round_cubic", _straight_through)
    st_grad, st_loss = _luma_only_gradient(30)
    assert st_loss > 1e-2 and st_grad.abs().max() < 1e-9 * st_loss.item() ** 0.5


@pytest.mark.parametrize("quality", [1, 100])
def test_extreme_qualities_are_finite(quality):
    img = torch.zeros(2, 3, 16, 16)
    img[0, :, ::2] = 1.0  # saturated stripes: extreme coefficients, clamp active
    img[1] = scene(16, 16, 0)
    img.requires_grad_()
    out = jpeg_reference(img, quality)
    out.square().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(img.grad).all()
    # and right: PIL's JPEG at the same quality (q 100: a unit quantiser, near the input; q 1: the table
    # clamped at 255, far from it); measured 49 and 75 dB at q 100, 35 and 79 dB at q 1 (the input 16, 33)
    for x, o in zip(img.detach(), out.detach()):
        ref, _ = pil_jpeg(x, quality)
        assert psnr(o, ref) > (40.0 if quality == 100 else 30.0), (quality, psnr(o, ref))
        if quality == 1:
            assert psnr(o, ref) > psnr(x, ref) + 10.0
    # the gradients by finite differences, in float64 away from the clamp
    g = torch.Generator().manual_seed(quality)
    x = (0.2 + 0.6 * torch.rand(1, 3, 8, 8, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: jpeg_reference(v, quality), (x,), eps=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Triton path (interpreter on CPU) against the reference
# ---------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("quality", [1, 50, 100])
def test_triton_matches_reference(monkeypatch, quality):
    monkeypatch.setenv("RID_KERNELS", "triton")
    # 40×56 pads to 48×64: 48 luma + 24 chroma blocks = 72, several programs of jmod._BB blocks and
    # a masked tail; continuous values keep coefficients off rounding ties
    g = torch.Generator().manual_seed(quality)
    img = torch.rand(1, 3, 40, 56, generator=g)
    w = torch.randn(1, 3, 40, 56, generator=g)  # a random upstream gradient
    x_ref = img.clone().requires_grad_()
    ref = jpeg_reference(x_ref, quality)
    (ref * w).sum().backward()

    def no_fallback(*a):
        raise AssertionError("the Triton path fell back to the reference")

    monkeypatch.setattr(jmod, "_blocks_reference", no_fallback)
    x = img.clone().requires_grad_()
    out = jpeg(x, quality)
    (out * w).sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-4)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision_inputs(monkeypatch, dtype):
    monkeypatch.setenv("RID_KERNELS", "triton")
    img = scene(17, 20, 3)[None].to(dtype).requires_grad_()
    out = jpeg(img, 75)
    out.float().sum().backward()
    assert out.dtype == dtype and img.grad.dtype == dtype and out.shape == img.shape
    ref = jpeg_reference(img.detach().float(), 75)  # computed in fp32 internally, rounded once
    torch.testing.assert_close(out, ref.to(dtype), atol=1e-2, rtol=0)


# ---------------------------------------------------------------------------------------------
# shapes, reward sanity, errors
# ---------------------------------------------------------------------------------------------
def test_odd_size_pads_by_edge_replication_and_crops_back():
    img = scene(17, 29, 5)[None]
    out = jpeg_reference(img, 60)
    assert out.shape == img.shape
    # oracle: numpy's edge padding to the 16-grid (32×32), the round trip there, the top-left crop
    padded = torch.from_numpy(np.pad(img.numpy(), ((0, 0), (0, 0), (0, 15), (0, 3)), mode="edge"))
    torch.testing.assert_close(out, jpeg_reference(padded, 60)[:, :, :17, :29], atol=1e-6, rtol=0)


def test_compress_reward_zero_for_flat_grows_with_noise():
    g = torch.Generator().manual_seed(2)
    flat = torch.full((1, 3, 32, 32), 0.5)
    flat[:, 0] = 0.3
    assert ((flat - jpeg_reference(flat, 80)) ** 2).mean() < 1e-6
    noise = torch.randn(1, 3, 32, 32, generator=g)
    errs = [((x - jpeg_reference(x, 80)) ** 2).mean().item()
            for x in ((flat + a * noise).clamp(0, 1) for a in (0.01, 0.03, 0.1))]
    assert errs[0] < errs[1] < errs[2] and errs[0] > 1e-6


@pytest.mark.parametrize("kwargs,words", [
    (dict(quality=0), ["quality", "0", "1..100"]),
    (dict(quality=101), ["quality", "101", "1..100"]),
    (dict(quality=50.5), ["quality", "50.5", "int"]),
    (dict(quality=True), ["quality", "True", "int"]),
    (dict(img=torch.rand(3, 16, 16)), ["img", "(3, 16, 16)", "(N, 3, H, W)"]),
    (dict(img=torch.rand(1, 4, 16, 16)), ["img", "(1, 4, 16, 16)", "(N, 3, H, W)"]),
    (dict(img=torch.zeros(1, 3, 8, 8, dtype=torch.uint8)), ["img", "uint8", "floating-point"]),
    (dict(img=torch.full((1, 3, 8, 8), 1.5)), ["img", "1.5", "[0, 1]"]),
    (dict(img=torch.full((1, 3, 8, 8), -0.01)), ["img", "-0.01", "[0, 1]"]),
    (dict(img=torch.full((1, 3, 8, 8), float("nan"))), ["img", "nan", "[0, 1]"]),
    (dict(img=np.zeros((1, 3, 8, 8))), ["img", "ndarray", "torch.Tensor"]),
])
def test_bad_input(kwargs, words):
    args = dict(img=torch.rand(1, 3, 8, 8), quality=50) | kwargs
    for fn in (jpeg, jpeg_reference):
        with pytest.raises(ValueError) as e:
            fn(**args)
        assert all(w in str(e.value) for w in words), str(e.value)
    with pytest.raises(ValueError, match="quality"):
        quality_tables(0)


def test_cached_constants_survive_inference_mode():
    # The DCT basis and tables are cached per device; if the first call happens under
    # inference_mode they must still be usable by a later call that records autograd.
    jmod._constants.cache_clear(), jmod._dct_matrix.cache_clear(), jmod._dct_kron.cache_clear()
    img = scene(16, 16, 4)[None]
    with torch.inference_mode():
        first = jpeg_reference(img, 42)
    x = img.clone().requires_grad_()
    out = jpeg_reference(x, 42)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (out * w).sum().backward()
    # the same values and gradient as with constants built outside inference mode
    jmod._constants.cache_clear(), jmod._dct_matrix.cache_clear(), jmod._dct_kron.cache_clear()
    y = img.clone().requires_grad_()
    ref = jpeg_reference(y, 42)
    (ref * w).sum().backward()
    assert torch.equal(first, ref.detach()) and torch.equal(out.detach(), ref.detach())
    assert torch.equal(x.grad, y.grad) and x.grad.abs().sum() > 0


def test_slightly_out_of_range_input_is_accepted():
    img = torch.full((1, 3, 8, 8), 1.0 + 5e-4)  # fp16's next value above 1 is 1 + 9.8e-4
    assert jpeg_reference(img, 50).max() <= 1.0
