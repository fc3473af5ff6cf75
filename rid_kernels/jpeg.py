"""Differentiable JPEG round trip (encode + decode), libjpeg's baseline 4:2:0 pipeline.

    jpeg(img, quality)            img (N, 3, H, W) in [0, 1] -> JPEG(img), same shape and dtype
    jpeg_reference(img, quality)  the same math in plain torch (CPU fallback, test oracle)
    quality_tables(quality)       libjpeg's scaled Annex K tables (luma (8, 8), chroma (8, 8))

The stages, each as libjpeg (PIL's encoder, `quality=q, subsampling=2`) does them:
  1. pad H, W up to the 16×16 MCU grid by edge replication (libjpeg's expand_right_edge /
     bottom-row replication); the output is cropped back at the end
  2. RGB → YCbCr with the JFIF constants on the 0..255 scale, chroma offset 128
  3. 4:2:0 chroma subsampling by 2×2 averaging (libjpeg's h2v2_downsample, minus its
     alternating 1/2 rounding bias)
  4. per 8×8 block: level shift −128, orthonormal 2-D DCT-II, divide by the quality-scaled
     table, round, multiply back, inverse DCT, +128
  5. chroma upsampling 2× with libjpeg's default "fancy" triangular filter: 3/4 nearer + 1/4
     farther sample per axis, edge samples replicated. That is exactly bilinear interpolation
     with half-pixel centres (align_corners=False), so F.interpolate computes it
  6. YCbCr → RGB, /255, clamp to [0, 1] (torch.clamp: gradient 1 inside, 0 where clamped)

Rounding. Quantisation uses the cubic rounding of Shin & Song (2017), in forward and backward:
    r(y) = ⌊y⌉ + (y − ⌊y⌉)³,     r'(y) = 3 (y − ⌊y⌉)²      (⌊·⌉: half away from zero, as libjpeg)
chosen over straight-through rounding (forward ⌊y⌉, backward identity) because rid's compress
reward is −‖img − JPEG(img)‖². With straight-through, the backward of the luma chain is DCT → ÷Q →
×Q → IDCT = identity, so ∂(img − JPEG(img))/∂img vanishes on luma and the reward's gradient
cannot see quantisation at all. With the cubic, each coefficient's error is Q·(d − d³), d = y − ⌊y⌉,
whose derivative 1 − 3d² > 0 pulls coefficients onto the quantisation grid: the gradient the
reward needs. The price is a forward value off by Q·d³ per coefficient (≤ Q/8, mean energy ≈ 3 % of
the quantisation error itself), measured against PIL in tests/test_jpeg.py. It is also a true
function with its own derivative, so gradcheck is meaningful (kornia's differentiable JPEG makes
the same choice). r jumps by 3/4 instead of 1 at half-integers, like ⌊·⌉ it is piecewise smooth.

Split between torch and Triton. Padding, colour conversion, subsampling and upsampling are cheap
pointwise/pooling ops and stay in torch (autograd differentiates them). Stage 4 — the per-block
DCT → quantise/round → dequantise → IDCT — is one Triton kernel forward and one backward over all
blocks of all planes at once (luma blocks first, then chroma, each row picks its table).

Block math, on 64-vectors (8×8 block flattened row-major). With D the orthonormal 8-point DCT-II
matrix, the 2-D DCT D X Dᵀ is the 64×64 matrix K = D ⊗ D (orthogonal, K⁻¹ = Kᵀ). For a tile of
blocks as rows X (BB, 64):
    forward   C = X Kᵀ;  Y = C / Q;  Z = r(Y) · Q;  out = Z K
    backward  given G = ∂L/∂out:  ∂L/∂Z = G Kᵀ;  ∂L/∂C = (∂L/∂Z · Q · r'(Y)) / Q = (G Kᵀ) ⊙ 3d²
              ∂L/∂X = ((G Kᵀ) ⊙ 3 (Y − ⌊Y⌉)²) K
i.e. per block the Jacobian is Kᵀ diag(3d²) K: a block-wise linear map (symmetric) in which Q
cancels and only the rounding derivative remains. The backward recomputes Y from the saved input
block rather than storing it (one extra 64×64 product, no extra memory).

Why tl.dot with the 64×64 Kronecker matrix instead of two separable 8×8 products: the separable
form needs 8-wide matmuls, below tl.dot's minimum of 16, so on a GPU it would run as broadcast-and-
reduce on CUDA cores with register-hungry (BB, 8, 8, 8) temporaries. The Kronecker form is a plain
(BB×64)·(64×64) GEMM for the tensor cores: 4× the FLOPs of the separable form (16 kFLOP per block
forward, for 512 bytes moved), which the tensor cores absorb. Operands are fp32 throughout (images
are computed in fp32 whatever their dtype), so the interpreter's bf16 tl.dot pitfall cannot arise.
Precision: single TF32 (10-bit mantissa) would move a DCT coefficient near 1000 by up to ~0.5 and
flip rounding decisions at quality 100, so on GPUs with TF32 the dot runs as "tf32x3" (three TF32
MMAs, ≈ fp32 accuracy; ~96 tensor-FLOP/B, near an A100's TF32 ridge of ~100), elsewhere as "ieee"
(fp32 FMA; compute-bound, ridge ~13 FLOP/B).

Conventions: fp16/bf16/fp32 inputs are computed in fp32 and returned in the input dtype; fp64
inputs are computed in fp64 by the reference (for gradcheck; the kernel is fp32 only). Tables
are constants built per call on the input's device — never parameters. Inputs may exceed [0, 1]
by _RANGE_TOL = 1e-3 (fp16 rounding just above 1.0; the output is clamped anyway); the range
check costs one device sync.
"""
import functools
import math
import operator

import torch
import torch.nn.functional as F

from . import HAS_TRITON, INTERPRET, use_triton

_RANGE_TOL = 1e-3
# Blocks per Triton program, and warps. Every program holds the 64×64 K (and Kᵀ) in registers
# beside its (BB, 64) tiles, and tf32x3 splits each dot operand in two: at BB = 64 both kernels
# spill kilobytes on sm_80 (4 or 8 warps); at BB = 16 with 8 warps neither spills on sm_80 or
# sm_90 (python -m rid_kernels.bench compile).
_BB, _WARPS = 16, 8
_MCU = 16  # 4:2:0 minimum coded unit: 16×16 pixels = 4 luma blocks + 1 Cb + 1 Cr

# ITU-T T.81 Annex K.1 tables, natural (row-major) order, as libjpeg's jcparam.c has them.
_LUMA_K1 = (
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
)
_CHROMA_K2 = (
    17, 18, 24, 47, 99, 99, 99, 99,
    18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
)

# JFIF colour conversion (0..255 scale, chroma offset 128).
_RGB2YCC = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))
_YCC2RGB = ((1.0, 0.0, 1.402), (1.0, -0.344136, -0.714136), (1.0, 1.772, 0.0))


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _round_half_away(y):
        return tl.where(y >= 0, tl.floor(y + 0.5), -tl.floor(0.5 - y))

    @triton.jit
    def _jpeg_blocks_fwd_kernel(
        x_ptr,  # (M, 64) fp32 level-shifted blocks, row-major 8×8; luma rows first
        out_ptr,  # (M, 64) fp32 round-tripped blocks
        k_ptr,  # (64, 64) fp32 Kronecker DCT matrix K = D ⊗ D
        q_ptr,  # (2, 64) fp32 quantisation tables: row 0 luma, row 1 chroma
        n_blocks,  # M
        n_luma,  # rows < n_luma use the luma table
        BB: tl.constexpr,  # blocks per program (≥ 16 for tl.dot)
        PRECISION: tl.constexpr,  # tl.dot input_precision: "tf32x3" or "ieee"
    ):
        rows = tl.program_id(0).to(tl.int64) * BB + tl.arange(0, BB)  # (BB,)
        i = tl.arange(0, 64)
        mask = rows[:, None] < n_blocks
        x = tl.load(x_ptr + rows[:, None] * 64 + i[None, :], mask=mask, other=0.0)  # (BB, 64)
        k = tl.load(k_ptr + i[:, None] * 64 + i[None, :])  # K
        kt = tl.load(k_ptr + i[None, :] * 64 + i[:, None])  # Kᵀ
        q = tl.where(rows[:, None] < n_luma, tl.load(q_ptr + i)[None, :], tl.load(q_ptr + 64 + i)[None, :])
        c = tl.dot(x, kt, input_precision=PRECISION)  # DCT coefficients
        y = c / q
        yr = _round_half_away(y)
        d = y - yr
        z = (yr + d * d * d) * q  # cubic rounding, dequantised
        out = tl.dot(z, k, input_precision=PRECISION)  # IDCT
        tl.store(out_ptr + rows[:, None] * 64 + i[None, :], out, mask=mask)

    @triton.jit
    def _jpeg_blocks_bwd_kernel(
        x_ptr,  # (M, 64) fp32 forward input blocks (saved)
        g_ptr,  # (M, 64) fp32 ∂L/∂out
        gx_ptr,  # (M, 64) fp32 ∂L/∂x, written
        k_ptr,  # (64, 64) fp32 K
        q_ptr,  # (2, 64) fp32 tables
        n_blocks,  # M
        n_luma,  # rows < n_luma use the luma table
        BB: tl.constexpr,  # blocks per program
        PRECISION: tl.constexpr,  # tl.dot input_precision
    ):
        rows = tl.program_id(0).to(tl.int64) * BB + tl.arange(0, BB)
        i = tl.arange(0, 64)
        mask = rows[:, None] < n_blocks
        offs = rows[:, None] * 64 + i[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        k = tl.load(k_ptr + i[:, None] * 64 + i[None, :])
        kt = tl.load(k_ptr + i[None, :] * 64 + i[:, None])
        q = tl.where(rows[:, None] < n_luma, tl.load(q_ptr + i)[None, :], tl.load(q_ptr + 64 + i)[None, :])
        y = tl.dot(x, kt, input_precision=PRECISION) / q  # recompute the forward's Y
        d = y - _round_half_away(y)
        gc = tl.dot(g, kt, input_precision=PRECISION) * (3.0 * d * d)  # (G Kᵀ) ⊙ r'(Y)
        gx = tl.dot(gc, k, input_precision=PRECISION)
        tl.store(gx_ptr + offs, gx, mask=mask)


def _precision(device: torch.device) -> str:
    if INTERPRET or device.type != "cuda" or torch.version.hip is not None:
        return "ieee"
    return "tf32x3" if torch.cuda.get_device_capability(device)[0] >= 8 else "ieee"


class _JpegBlocks(torch.autograd.Function):
    """(M, 64) level-shifted fp32 blocks -> round-tripped blocks, Triton forward and backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor, n_luma: int) -> torch.Tensor:
        # naive: _blocks_reference(x, q, n_luma), six (M, 8, 8) batched matmuls + elementwise passes
        x = x.contiguous()
        k = _dct_kron(x.device, torch.float32)
        out = torch.empty_like(x)
        n = x.shape[0]
        _jpeg_blocks_fwd_kernel[(triton.cdiv(n, _BB),)](x, out, k, q, n, n_luma, BB=_BB,
                                                        PRECISION=_precision(x.device), num_warps=_WARPS)
        ctx.save_for_backward(x, q)
        ctx.n_luma = n_luma
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, q = ctx.saved_tensors
        g = g.contiguous()
        k = _dct_kron(x.device, torch.float32)
        gx = torch.empty_like(x)
        n = x.shape[0]
        _jpeg_blocks_bwd_kernel[(triton.cdiv(n, _BB),)](x, g, gx, k, q, n, ctx.n_luma, BB=_BB,
                                                        PRECISION=_precision(x.device), num_warps=_WARPS)
        return gx, None, None


# ---------------------------------------------------------------------------------------------
# constants: DCT basis and quantisation tables (built per device, never parameters)
# ---------------------------------------------------------------------------------------------
# Cached per (device, dtype) and built outside inference mode: a cached tensor born under
# torch.inference_mode() could never again be saved for backward.
def _dct_matrix_f64() -> torch.Tensor:
    """Orthonormal 8-point DCT-II D (8, 8): D[u, x] = c(u) cos((2x + 1)uπ/16); JPEG's FDCT is D X Dᵀ."""
    u = torch.arange(8, dtype=torch.float64)[:, None]
    x = torch.arange(8, dtype=torch.float64)[None, :]
    d = torch.cos((2 * x + 1) * u * math.pi / 16) * math.sqrt(2 / 8)
    d[0] = math.sqrt(1 / 8)
    return d


@functools.lru_cache(maxsize=None)
def _dct_matrix(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False):
        return _dct_matrix_f64().to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=None)
def _dct_kron(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """K = D ⊗ D (64, 64): the 2-D DCT of a row-major flattened block is K · vec(X)."""
    with torch.inference_mode(False):
        d = _dct_matrix_f64()
        return torch.kron(d, d).to(device=device, dtype=dtype).contiguous()


@functools.lru_cache(maxsize=None)
def _constants(quality: int, device: torch.device, dtype: torch.dtype):
    """(2, 64) stacked tables, RGB->YCbCr and YCbCr->RGB (3, 3) matrices, on device, cached."""
    with torch.inference_mode(False):
        luma, chroma = quality_tables(quality)
        q = torch.stack([luma.reshape(64), chroma.reshape(64)])
        mats = (torch.tensor(_RGB2YCC, dtype=torch.float64), torch.tensor(_YCC2RGB, dtype=torch.float64))
        return tuple(t.to(device=device, dtype=dtype).contiguous() for t in (q, *mats))


def _check_quality(quality) -> int:
    try:
        q = operator.index(quality)
    except TypeError:
        q = None
    if q is None or isinstance(quality, bool) or not 1 <= q <= 100:
        raise ValueError(f"quality={quality!r} is not allowed; quality must be an int in 1..100")
    return q


def quality_tables(quality: int, device=None) -> tuple:
    """libjpeg's jpeg_set_quality(quality, force_baseline=TRUE): luma, chroma (8, 8) float32.

    scale = 5000 / q for q < 50, else 200 − 2q;  table = clamp((T · scale + 50) // 100, 1, 255).
    """
    q = _check_quality(quality)
    scale = 5000 // q if q < 50 else 200 - 2 * q  # libjpeg uses integer division too
    tables = []
    for base in (_LUMA_K1, _CHROMA_K2):
        t = torch.tensor(base, dtype=torch.int64)
        t = ((t * scale + 50) // 100).clamp(1, 255)
        tables.append(t.reshape(8, 8).to(device=device, dtype=torch.float32))
    return tuple(tables)


# ---------------------------------------------------------------------------------------------
# block stage, plain torch (reference): separable D X Dᵀ, not the kernel's Kronecker form
# ---------------------------------------------------------------------------------------------
def _round_cubic(y: torch.Tensor) -> torch.Tensor:
    """Shin & Song's r(y) = ⌊y⌉ + (y − ⌊y⌉)³, ⌊·⌉ rounding half away from zero like libjpeg."""
    yr = torch.sign(y) * torch.floor(y.abs() + 0.5)  # no gradient: floor's derivative is 0
    return yr + (y - yr) ** 3


def _blocks_reference(x: torch.Tensor, q: torch.Tensor, n_luma: int) -> torch.Tensor:
    """(M, 64) level-shifted blocks -> DCT -> ÷Q -> r -> ×Q -> IDCT, autograd by torch."""
    d = _dct_matrix(x.device, x.dtype)
    qsel = torch.where(torch.arange(x.shape[0], device=x.device)[:, None] < n_luma, q[0], q[1])  # (M, 64)
    xb = x.reshape(-1, 8, 8)
    c = d @ xb @ d.T  # (M, 8, 8) FDCT
    z = _round_cubic(c.reshape(-1, 64) / qsel) * qsel
    return (d.T @ z.reshape(-1, 8, 8) @ d).reshape(-1, 64)  # IDCT


def _blocks_triton(x: torch.Tensor, q: torch.Tensor, n_luma: int) -> torch.Tensor:
    return _JpegBlocks.apply(x, q, n_luma)


# ---------------------------------------------------------------------------------------------
# the round trip around the block stage (torch)
# ---------------------------------------------------------------------------------------------
def _check_img(img) -> None:
    if not isinstance(img, torch.Tensor):
        raise ValueError(f"img must be a torch.Tensor (N, 3, H, W) in [0, 1]; got {type(img).__name__}")
    if img.dim() != 4 or img.shape[1] != 3 or img.shape[2] < 1 or img.shape[3] < 1:
        raise ValueError(f"img must have shape (N, 3, H, W) with H, W ≥ 1 (RGB); got {tuple(img.shape)}")
    if not img.is_floating_point():
        raise ValueError(f"img must be a floating-point tensor (float16, bfloat16, float32, float64); got {img.dtype}")
    if img.numel():
        lo, hi = torch.aminmax(img.detach())
        lo, hi = float(lo), float(hi)  # one device sync
        if not (lo >= -_RANGE_TOL and hi <= 1 + _RANGE_TOL):
            raise ValueError(f"img values must lie in [0, 1] (tolerance {_RANGE_TOL}); got min {lo:.4g}, max {hi:.4g}")


def _to_blocks(p: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B·H/8·W/8, 64), each row one 8×8 block flattened row-major."""
    B, H, W = p.shape
    return p.reshape(B, H // 8, 8, W // 8, 8).permute(0, 1, 3, 2, 4).reshape(-1, 64)


def _from_blocks(b: torch.Tensor, B: int, H: int, W: int) -> torch.Tensor:
    return b.reshape(B, H // 8, W // 8, 8, 8).permute(0, 1, 3, 2, 4).reshape(B, H, W)


def _round_trip(img: torch.Tensor, quality: int, blocks) -> torch.Tensor:
    N, _, H, W = img.shape
    dt = torch.float64 if img.dtype == torch.float64 else torch.float32
    q, rgb2ycc, ycc2rgb = _constants(quality, img.device, dt)  # (2, 64), (3, 3), (3, 3)

    # pad to the MCU grid by edge replication, RGB -> YCbCr on the 0..255 scale
    Hp, Wp = -(-H // _MCU) * _MCU, -(-W // _MCU) * _MCU
    x = F.pad(img.to(dt) * 255.0, (0, Wp - W, 0, Hp - H), mode="replicate")  # (N, 3, Hp, Wp)
    ycc = torch.einsum("cd,ndhw->nchw", rgb2ycc, x)
    # Chroma's +128 offset and the DCT's −128 level shift cancel, so Cb, Cr enter the DCT as they
    # are; Y gets the level shift.
    y = ycc[:, 0] - 128.0  # (N, Hp, Wp)
    cbcr = F.avg_pool2d(ycc[:, 1:], 2).reshape(N * 2, Hp // 2, Wp // 2)  # 4:2:0, 2×2 average

    # block stage: all luma blocks, then all chroma blocks, in one call
    yb, cb = _to_blocks(y), _to_blocks(cbcr)
    out = blocks(torch.cat([yb, cb]), q, yb.shape[0])  # (M, 64)
    y = _from_blocks(out[: yb.shape[0]], N, Hp, Wp) + 128.0
    cbcr = _from_blocks(out[yb.shape[0]:], N * 2, Hp // 2, Wp // 2).reshape(N, 2, Hp // 2, Wp // 2)

    # fancy (triangular) upsampling == bilinear with half-pixel centres; YCbCr -> RGB; crop; clamp
    cbcr = F.interpolate(cbcr, scale_factor=2, mode="bilinear", align_corners=False)  # (N, 2, Hp, Wp)
    ycc = torch.cat([y[:, None], cbcr], dim=1)
    rgb = torch.einsum("cd,ndhw->nchw", ycc2rgb, ycc)
    return (rgb[:, :, :H, :W] / 255.0).clamp(0.0, 1.0).to(img.dtype)


def jpeg_reference(img: torch.Tensor, quality: int = 80) -> torch.Tensor:
    """Plain-torch JPEG round trip (CPU fallback and oracle of the Triton path); see module doc."""
    _check_img(img)
    return _round_trip(img, _check_quality(quality), _blocks_reference)


def jpeg(img: torch.Tensor, quality: int = 80) -> torch.Tensor:
    """Differentiable JPEG round trip of img (N, 3, H, W) in [0, 1] at quality 1..100 (4:2:0).

    Triton block stage when rid_kernels.use_triton(img) (fp16/bf16/fp32 inputs; fp64 always runs
    the reference), plain torch otherwise. Returns the same shape and dtype as img.
    """
    _check_img(img)
    quality = _check_quality(quality)
    if img.dtype != torch.float64 and use_triton(img):
        return _round_trip(img, quality, _blocks_triton)
    return _round_trip(img, quality, _blocks_reference)
