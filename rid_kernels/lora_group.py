"""Fused LoRA-group linear: y = x Wᵀ + b + Σ_i s_i (x A_iᵀ) B_iᵀ in one pass over x (two for R > 16).

An adapter group is T adapters (A_i: r_i × in, B_i: out × r_i, scale s_i) on one frozen linear
layer. Concatenated, A_cat is (R × in) and B_cat is (out × R) with R = Σ r_i, s_rep repeats s_i
r_i times, and the whole group is one shrink and one expand:

    h = x A_catᵀ                      (M, R)     skinny: R = T·r, e.g. 8·4 = 32
    y = x Wᵀ + b + (h ⊙ s_rep) B_catᵀ   (M, out)

The Triton kernel has two modes, chosen per launch by R:

  R ≤ RANK_TILE = 16 (the paper's 3 tasks × rank 4 = 12)   the shrink is fused into the base GEMM's K-loop:
      the x tile it loads feeds `acc += x·Wᵀ` and `h += x·A_catᵀ`, and the epilogue adds
      `(h ⊙ s)·B_catᵀ` while `acc` is still fp32. Compared with base GEMM + shrink + expand as separate
      launches (how multi-LoRA servers run it) x is read once and y written once. The price is that
      every N-tile recomputes its rows' h: RANK_TILE/BLOCK_N extra MMA work (16/128).
  R > RANK_TILE (many tasks, or users' rank 16–64)   h = x A_catᵀ is one skinny matmul before the
      launch (cuBLAS; x read once more, h is M × R) and the kernel's epilogue streams h and B_cat in
      RANK_TILE-wide chunks into the fp32 acc. Fusing the shrink here would cost R/BLOCK_N extra MMA
      work per N-tile (50 % at R = 64) and h's BLOCK_M × R accumulator in registers, which spills as R
      grows (fused at R = 64, 49 of 180 tile configs spilled: issue 30); streamed, one chunk is live
      at a time, so registers and shared memory are those of R = 16 whatever R is.

A block of frozen adapters concatenated once by the caller is just one entry of As/Bs.

Precision follows torch.autocast: every matmul runs on operands in x.dtype (adapters or a weight
stored in another dtype are cast per tile, in registers) with fp32 accumulation, and y has
x.dtype. So DRaFT's bf16 base + fp32 LoRA computes like autocast would, and the fp32 adapters get
fp32 gradients.

Measured (CPU, 1 thread, reference path, fp32, x (2, 1024, 320), r = 4, x and the current
adapter training): fwd+bwd stays ~18–20 ms for T = 1..8 while a loop of T LoRA linears goes
~20 → ~40 ms (2.1–2.35× slower at T = 8). GPU numbers: `python -m rid_kernels.bench gpu-check`.
"""
import functools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import HAS_TRITON, INTERPRET, use_triton

RANK_TILE = 16  # the kernel's rank block (tl.dot's minimum): R ≤ RANK_TILE fuses the shrink, larger R streams

if HAS_TRITON:
    import triton
    import triton.language as tl

    # Tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) that compile without register spills,
    # biggest first, per MMA family, operand kind and alignment: every candidate compiled for sm_80
    # and sm_90 with triton 3.8 in both modes (fused shrink, streamed h), at every total rank up to
    # 128 and every backbone's layer shapes (`python -m rid_kernels.bench compile --all --candidates`;
    # tests/test_compile.py keeps them honest). "mma" is Ampere's mma.sync, used on every GPU but
    # Hopper; "wgmma" is Hopper's, whose accumulators cost fewer registers, so 128×256 tiles fit
    # there and nowhere else. fp32 "ieee" dots run on CUDA cores (FMA) and need the most registers;
    # "tf32" is torch's "high" precision. Aligned launches (widths multiples of 16, 16-byte aligned
    # tensors: every SD layer) get 16-byte vector loads; other launches compile to scalar loads with
    # more address registers, where only small tiles stay spill-free.
    _TILES = {
        ("mma", "half", True): [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 32, 4, 4), (64, 64, 64, 4, 3),
                                (64, 64, 32, 2, 5), (32, 64, 32, 2, 5)],
        ("mma", "tf32", True): [(128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3),  # 128×128: R = 1 spills
                                (64, 64, 32, 2, 5), (32, 64, 32, 2, 5)],
        ("mma", "ieee", True): [(128, 128, 32, 8, 4), (64, 128, 32, 4, 4), (32, 64, 32, 2, 5)],
        ("wgmma", "half", True): [(128, 256, 64, 8, 3), (256, 128, 32, 8, 3), (128, 128, 64, 8, 3),
                                  (128, 128, 32, 8, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3),
                                  (32, 64, 32, 2, 5)],
        ("wgmma", "tf32", True): [(128, 256, 32, 8, 3), (256, 128, 32, 8, 3), (128, 128, 64, 8, 3),
                                  (128, 128, 32, 8, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3),
                                  (32, 64, 32, 2, 5)],
        ("wgmma", "ieee", True): [(32, 64, 32, 2, 5)],  # every bigger tile spills 8–32 B at some R: use TF32
        ("mma", "half", False): [(64, 64, 32, 4, 4), (32, 64, 32, 4, 4)],
        ("mma", "tf32", False): [(64, 64, 32, 4, 4), (32, 64, 32, 4, 4)],
        ("mma", "ieee", False): [(32, 64, 32, 4, 4)],
        ("wgmma", "half", False): [(128, 128, 32, 8, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4),
                                   (32, 64, 32, 4, 4)],  # 128×64 spills at odd M, R ≤ 16
        ("wgmma", "tf32", False): [(128, 128, 32, 8, 4), (64, 64, 32, 4, 4), (32, 64, 32, 4, 4)],
        ("wgmma", "ieee", False): [(32, 64, 32, 4, 4)],
    }

    def _tile(c) -> tuple:
        return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages

    # Every tile any GPU may try, biggest first; configs_for picks this launch's share.
    CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in sorted({t for ts in _TILES.values() for t in ts},
                                       key=lambda t: (-t[0] * t[1], -t[2], -t[3], t[4]))
    ]

    def smem_bytes(cfg, all_stages: bool, sizes) -> int:
        """Shared memory of the K-loop's pipeline: x, W and A_cat tiles (element sizes `sizes`) in
        num_stages buffers when all_stages (Hopper's wgmma), one fewer on mma.sync and FMA (Triton
        3.8's pipeliner; tests/test_compile.py checks that this bounds every compiled kernel's, the
        streamed mode's included: its K-loop has no A_cat tile and its epilogue's h, B_cat chunks are
        RANK_TILE ≤ BLOCK_K wide)."""
        bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
        return (cfg.num_stages - (not all_stages)) * bk * (bm * sizes[0] + bn * sizes[1] + RANK_TILE * sizes[2])

    def configs_for(arch: int, max_smem: int, dtypes, precision: str, aligned: bool) -> list:
        """The tiles the autotuner may try on a GPU of compute capability `arch` (80, 86, 90, ...)
        with `max_smem` bytes of shared memory per block, for operands of dtypes (x, W, A_cat)."""
        kind = "half" if dtypes[0].itemsize == 2 else precision
        tiles = _TILES["wgmma" if arch == 90 else "mma", kind, aligned]
        all_stages = arch >= 90 and kind != "ieee"  # archs after Hopper: assume its pipelining
        sizes = [d.itemsize for d in dtypes]
        fits = [c for c in CONFIGS if _tile(c) in tiles and smem_bytes(c, all_stages, sizes) <= max_smem]
        return fits or [c for c in CONFIGS if _tile(c) == tiles[-1]]

    def _prune(configs, named_args, **meta):
        """The autotuner's early_config_prune: only this GPU's spill-free tiles that fit its shared memory."""
        x = named_args["x_ptr"]
        major, minor = torch.cuda.get_device_capability(x.device)
        dtypes = (x.dtype, named_args["w_ptr"].dtype, named_args["a_ptr"].dtype)
        # Triton's 16-byte specialisation of this launch (every SD layer has it): widths multiples of
        # 16, x, W, A_cat and B_cat at 16-byte aligned addresses
        aligned = (named_args["K"] % 16 == 0 and named_args["N"] % 16 == 0
                   and all(named_args[p].data_ptr() % 16 == 0 for p in ("x_ptr", "w_ptr", "a_ptr", "b_ptr")))
        keep = configs_for(10 * major + minor, max_shared_memory(x.device.index), dtypes, meta["PRECISION"], aligned)
        return [c for c in configs if c in keep]

    @functools.lru_cache(maxsize=None)
    def max_shared_memory(device_index: int) -> int:
        """Shared memory per block (bytes, opt-in maximum) of CUDA device `device_index`."""
        return triton.compiler.max_shared_mem(device_index)

    # Under the interpreter autotuning would re-run every config in numpy: one small config.
    _INTERPRET_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=1)]

    @triton.autotune(configs=_INTERPRET_CONFIGS if INTERPRET else CONFIGS, key=["M", "N", "K", "R"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def lora_group_kernel(
        x_ptr,  # (M, K) input rows; its dtype is the dot-operand dtype
        w_ptr,  # (N, K) base weight, any float dtype, any strides
        bias_ptr,  # (N,) bias, or a dummy when HAS_BIAS is False
        a_ptr,  # (R, K) concatenated shrink matrix A_cat
        b_ptr,  # (N, R) concatenated expand matrix B_cat
        s_ptr,  # (R,) fp32 per-rank scale s_rep
        y_ptr,  # (M, N) output, x.dtype
        h_ptr,  # (M, R) h = x A_catᵀ (unscaled): written here if FUSE_SHRINK and STORE_H, else read
        M, N, K, R,  # problem sizes (autotune key)
        stride_xm, stride_xk,  # x strides
        stride_wn, stride_wk,  # W strides (the backward passes Wᵀ as a strided view)
        stride_ar, stride_ak,  # A_cat strides
        stride_bn, stride_br,  # B_cat strides
        stride_ym, stride_yn,  # y strides
        stride_hm, stride_hr,  # h strides
        HAS_BIAS: tl.constexpr,  # add bias in the epilogue
        HAS_LORA: tl.constexpr,  # R > 0
        FUSE_SHRINK: tl.constexpr,  # R ≤ BLOCK_R: h computed in the K-loop; else h_ptr holds it, streamed
        STORE_H: tl.constexpr,  # FUSE_SHRINK: write h for the backward
        DOT_F32: tl.constexpr,  # interpreter + bf16: dots on fp32 operands (tl.dot on bf16 is wrong there)
        PRECISION: tl.constexpr,  # fp32 dots: "tf32" or "ieee", following torch's matmul precision
        BLOCK_M: tl.constexpr,  # rows per program
        BLOCK_N: tl.constexpr,  # output columns per program
        BLOCK_K: tl.constexpr,  # reduction step
        BLOCK_R: tl.constexpr,  # rank block, RANK_TILE: ≥ R when FUSE_SHRINK, else the chunk streamed
        GROUP_M: tl.constexpr,  # M-tiles sharing one W column panel in L2 (grouped ordering)
    ):
        # Grouped program ordering (Triton tutorial 03): neighbouring programs reuse W tiles.
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        group = GROUP_M * num_pid_n
        first_m = (pid // group) * GROUP_M
        size_m = min(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % size_m
        pid_n = (pid % group) // size_m

        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        mask_m = offs_m < M
        mask_n = offs_n < N
        mask_r = offs_r < R
        if DOT_F32:
            cdt = tl.float32
        else:
            cdt = x_ptr.dtype.element_ty

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # x Wᵀ
        h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)  # x A_catᵀ
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=mask_m[:, None] & mask_k[None, :], other=0.0,
            ).to(cdt)  # (BM, BK)
            w = tl.load(
                w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                mask=mask_k[:, None] & mask_n[None, :], other=0.0,
            ).to(cdt)  # (BK, BN) tile of Wᵀ
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
            if FUSE_SHRINK:
                a = tl.load(
                    a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0,
                ).to(cdt)  # (BK, BR) tile of A_catᵀ
                h = tl.dot(x, a, h, input_precision=PRECISION)  # the shrink, same x tile

        if FUSE_SHRINK:
            if STORE_H:  # one N-tile per row block writes h
                tl.store(
                    h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                    h.to(h_ptr.dtype.element_ty),
                    mask=mask_m[:, None] & mask_r[None, :] & (pid_n == 0),
                )
            s = tl.load(s_ptr + offs_r, mask=mask_r, other=0.0)  # (BR,) fp32
            bt = tl.load(
                b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                mask=mask_r[:, None] & mask_n[None, :], other=0.0,
            ).to(cdt)  # (BR, BN) tile of B_catᵀ
            hs = (h * s[None, :]).to(cdt)  # rounded to x.dtype, as autocast rounds h
            acc = tl.dot(hs, bt, acc, input_precision=PRECISION)  # the expand, into the fp32 acc
        elif HAS_LORA:  # the expand of a precomputed h, BLOCK_R ranks at a time: registers bounded in R
            # not software-pipelined: R / BLOCK_R is a few steps, and the prefetch made 5 fp32 tiles spill
            h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr  # (BM, BR) first chunk of h
            b_ptrs = b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn  # (BR, BN) of B_catᵀ
            for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
                mask_c = r0 + offs_r < R
                hc = tl.load(h_ptrs, mask=mask_m[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
                s = tl.load(s_ptr + r0 + offs_r, mask=mask_c, other=0.0)  # (BR,) fp32
                bt = tl.load(b_ptrs, mask=mask_c[:, None] & mask_n[None, :], other=0.0).to(cdt)
                acc = tl.dot((hc * s[None, :]).to(cdt), bt, acc, input_precision=PRECISION)
                h_ptrs += BLOCK_R * stride_hr
                b_ptrs += BLOCK_R * stride_br
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(
            y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
            acc.to(y_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_n[None, :],
        )


def launch(x, w, bias, a, b, s_rep, store_h: bool):
    """y = x wᵀ + bias + ((x aᵀ) ⊙ s_rep) bᵀ and h = x aᵀ, for any strides of w, a, b.

    x (M, K); w (N, K); bias (N,) or None; a (R, K) or None; b (N, R) or None; s_rep (R,) fp32.
    Returns y (M, N) in x.dtype and h (M, R) in x.dtype (None unless store_h). The backward calls
    this with (dy, Wᵀ, None, B_catᵀ, A_catᵀ) — the same fusion, transposed views, no copies.
    R ≤ RANK_TILE: the kernel computes h in its K-loop; larger R: one matmul here, streamed by the kernel.
    """
    if x.stride(-1) != 1:
        x = x.contiguous()  # the kernel takes strides, but a strided K axis defeats coalescing
    M, K = x.shape
    N = w.shape[0]
    R = 0 if a is None else a.shape[0]
    fuse = R <= RANK_TILE
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if not fuse:
        h = torch.mm(x, a.t().to(x.dtype))  # (M, R) the shrink, in x.dtype as autocast computes it
    else:
        h = torch.empty((M, R), dtype=x.dtype, device=x.device) if (store_h and R) else None
    dummy = y  # never read: its branch is compiled out by a constexpr flag
    a_, b_, s_, h_ = (a, b, s_rep, h if h is not None else dummy) if R else (dummy, dummy, dummy, dummy)
    a_str = a.stride() if R else (0, 0)
    b_str = b.stride() if R else (0, 0)
    h_str = h.stride() if h is not None else (0, 0)
    fp32_tf32 = torch.get_float32_matmul_precision() != "highest" and not INTERPRET

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    lora_group_kernel[grid](
        x, w, bias if bias is not None else dummy, a_, b_, s_, y, h_,
        M, N, K, R,
        *x.stride(), *w.stride(), *a_str, *b_str, *y.stride(), *h_str,
        HAS_BIAS=bias is not None, HAS_LORA=R > 0, FUSE_SHRINK=0 < R <= RANK_TILE, STORE_H=fuse and h is not None,
        DOT_F32=INTERPRET and x.dtype == torch.bfloat16,
        PRECISION="tf32" if fp32_tf32 else "ieee",
        BLOCK_R=RANK_TILE,
    )
    return y, h if store_h else None


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 output; half inputs keep their tensor-core matmul on CUDA."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and b.dtype == a.dtype:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


@functools.lru_cache(maxsize=256)
def _scale_vector(scales: tuple, ranks: tuple, device: torch.device) -> torch.Tensor:
    """s_rep (R,) fp32: s_i repeated r_i times; cached so a training step does no H2D copies."""
    return torch.cat([torch.full((r,), s, dtype=torch.float32) for s, r in zip(scales, ranks)]).to(device)


def scale_vector(scales: Sequence[float], ranks: Sequence[int], device: torch.device) -> Optional[torch.Tensor]:
    """s_rep for the reference path: None when every scale is 1 (h · 1.0 == h, so the pass is skipped)."""
    return None if all(s == 1.0 for s in scales) else _scale_vector(tuple(scales), tuple(ranks), device)


def _concat(tensors: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors), dim)


class _LoRAGroupLinear(torch.autograd.Function):
    """Autograd for the fused op; grads only for inputs that require grad.

    With dy (M, out), h = x A_catᵀ (M, R, saved by the forward), c = dy B_cat (M, R):
        dx   = dy W + (c ⊙ s_rep) A_cat      the forward's fusion on (dy, Wᵀ, B_catᵀ, A_catᵀ):
                                             one pass over dy, c computed in the same K-loop
        dB_t = s_t · dyᵀ h_t                 (out, r_t)  columns t of h
        dA_t = s_t · c_tᵀ x                  (r_t, in)   columns t of c
        dW   = dyᵀ x,  db = Σ_m dy           only if W / b require grad (frozen in rid)
    dB_t and dA_t are reductions over all M tokens into r_t·(out or in) numbers: torch matmuls
    (cuBLAS picks split-K for such long-K skinny products; a Triton kernel would need split-K
    and atomics to fill the GPU). They use fp32 output so fp32 adapters get fp32 gradients.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scales, n, grad_enabled, *adapters):
        As, Bs = adapters[:n], adapters[n:]
        ranks = tuple(a.shape[0] for a in As)
        A_cat = _concat(As, 0) if n else None  # (R, in)
        B_cat = _concat(Bs, 1) if n else None  # (out, R)
        s_rep = _scale_vector(scales, ranks, x.device) if n else None
        need = ctx.needs_input_grad
        # Under no_grad (sampling) needs_input_grad still reflects requires_grad: ask grad mode.
        need_A = [grad_enabled and q for q in need[6 : 6 + n]]
        need_B = [grad_enabled and q for q in need[6 + n :]]
        # naive: y = F.linear(x, weight, bias) + sum(s * F.linear(F.linear(x, A), B) for A, B, s in ...)
        y, h = launch(x, weight, bias, A_cat, B_cat, s_rep, store_h=any(need_B))
        ctx.save_for_backward(x, weight, A_cat, B_cat, s_rep, h)
        ctx.scales, ctx.ranks, ctx.n = scales, ranks, n
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.need_A, ctx.need_B = need_A, need_B
        ctx.dtypes = [t.dtype for t in adapters]
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, A_cat, B_cat, s_rep, h = ctx.saved_tensors
        n, scales, ranks = ctx.n, ctx.scales, ctx.ranks
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        dx = dW = db = c = None
        if need_x:
            # naive: dx = dy @ W + sum(s * (dy @ B) @ A for A, B, s in ...)
            dx, c = launch(dy, weight.t(), None, B_cat.t() if n else None, A_cat.t() if n else None,
                           s_rep, store_h=any(ctx.need_A))
            dx = dx.to(x.dtype)
        elif any(ctx.need_A):
            c = _mm_f32(dy, B_cat.to(dy.dtype)).to(dy.dtype)
        if need_w:
            dW = _mm_f32(dy.t(), x).to(weight.dtype)
        if need_b:
            db = dy.float().sum(0).to(ctx.bias_dtype)
        dAs, dBs = [None] * n, [None] * n
        start = 0
        for t, (r, s) in enumerate(zip(ranks, scales)):
            cols = slice(start, start + r)
            start += r
            if ctx.need_B[t]:
                dBs[t] = (_mm_f32(dy.t(), h[:, cols]) * s).to(ctx.dtypes[n + t])  # (out, r)
            if ctx.need_A[t]:
                dAs[t] = (_mm_f32(c[:, cols].t(), x) * s).to(ctx.dtypes[t])  # (r, in)
        return (dx, dW, db, None, None, None, *dAs, *dBs)


def _validate(x, weight, bias, As, Bs, scales):
    """Shapes, dtypes, devices; returns (As, Bs, scales) as lists/tuple of floats."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"x must be a floating-point tensor of shape (..., in); got {type(x).__name__} "
                         f"{getattr(x, 'dtype', '')} {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point (out, in) matrix; got shape {tuple(getattr(weight, 'shape', ()))}")
    out, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has last dim {x.shape[-1]} (shape {tuple(x.shape)}); weight {tuple(weight.shape)} "
                         f"needs x of shape (..., {k})")
    if bias is not None and (bias.shape != (out,) or not bias.is_floating_point()):
        raise ValueError(f"bias must be None or a float vector of shape ({out},); got {tuple(bias.shape)}")
    As, Bs = list(As), list(Bs)
    if len(As) != len(Bs):
        raise ValueError(f"As and Bs must have equal length; got {len(As)} A's and {len(Bs)} B's")
    try:
        scales = tuple(float(s) for s in scales)
    except (TypeError, ValueError):
        raise ValueError(f"scales must be a sequence of floats; got {scales!r}") from None
    if len(scales) != len(As):
        raise ValueError(f"scales has {len(scales)} entries; allowed: one per adapter ({len(As)})")
    for i, (a, b) in enumerate(zip(As, Bs)):
        if a.dim() != 2 or a.shape[1] != k or not a.is_floating_point():
            raise ValueError(f"As[{i}] has shape {tuple(a.shape)}; allowed: a float (r, {k}) matrix")
        if b.dim() != 2 or b.shape[0] != out or not b.is_floating_point():
            raise ValueError(f"Bs[{i}] has shape {tuple(b.shape)}; allowed: a float ({out}, r) matrix (out = weight's rows)")
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"rank mismatch: As[{i}] {tuple(a.shape)} has rank {a.shape[0]} but Bs[{i}] "
                             f"{tuple(b.shape)} has rank {b.shape[1]}; allowed: Bs[{i}] of shape ({out}, {a.shape[0]})")
    for name, t in [("weight", weight), ("bias", bias)] + [(f"As[{i}]", a) for i, a in enumerate(As)] + \
            [(f"Bs[{i}]", b) for i, b in enumerate(Bs)]:
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; allowed: all on one device")
    return As, Bs, scales


def lora_group_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor],
                      scales: Sequence[float], check: bool = True) -> torch.Tensor:
    """y = x Wᵀ + b + Σ_i s_i (x A_iᵀ) B_iᵀ.   x (..., in) → y (..., out) in x.dtype.

    weight (out, in); bias (out,) or None; As[i] (r_i, in); Bs[i] (out, r_i); scales: floats
    (not differentiated). Triton (fused, one pass over x) when rid_kernels.use_triton says so, else
    lora_group_reference. Gradients go only to inputs with requires_grad. check=False skips the
    argument checks, for a caller that built the arguments itself (rid.LoRALinear: lists, a tuple of
    floats, shapes fixed when its adapters change) and calls this 100+ times per UNet forward.
    """
    if check:
        As, Bs, scales = _validate(x, weight, bias, As, Bs, scales)
    if x.numel() == 0 or not use_triton(x, weight):
        return _reference(x, weight, bias, As, Bs, scales)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (M, in)
    y = _LoRAGroupLinear.apply(x2, weight, bias, scales, len(As), torch.is_grad_enabled(), *As, *Bs)
    return y.reshape(*lead, weight.shape[0])


def _reference(x, weight, bias, As, Bs, scales):
    if not As:
        return lora_group_cat_reference(x, weight, bias, None, None, None)
    A_cat = torch.cat(list(As), 0)  # (R, in)
    B_cat = torch.cat(list(Bs), 1)  # (out, R)
    s_rep = scale_vector(scales, [a.shape[0] for a in As], x.device)  # (R,) or None
    return lora_group_cat_reference(x, weight, bias, A_cat, B_cat, s_rep)


def lora_group_cat_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             A_cat: Optional[torch.Tensor], B_cat: Optional[torch.Tensor],
                             s_rep: Optional[torch.Tensor]) -> torch.Tensor:
    """The reference on an already concatenated group: A_cat (R, in), B_cat (out, R), s_rep (R,)
    fp32 or None when every scale is 1 (A_cat None: no adapters). No checks: rid.LoRALinear builds
    these once per change of its adapters (under no_grad, once per optimizer step for the whole
    sampling loop)."""
    dt = x.dtype  # autocast's rule: operands in x.dtype; a dtype test costs 0.06 µs, a no-op .to() 0.6 µs
    weight = weight if weight.dtype == dt else weight.to(dt)
    bias = bias if bias is None or bias.dtype == dt else bias.to(dt)
    y = F.linear(x, weight, bias)  # (..., out)
    if A_cat is None:
        return y
    A_cat = A_cat if A_cat.dtype == dt else A_cat.to(dt)
    B_cat = B_cat if B_cat.dtype == dt else B_cat.to(dt)
    # naive: y + sum(s_i * F.linear(F.linear(x, A_i), B_i) for A_i, B_i, s_i in the group)
    h = F.linear(x, A_cat)  # (..., R) one shrink for the whole group
    if s_rep is not None:  # h * 1.0 == h exactly: unit scales (the default) skip a pass over h
        h = h * (s_rep if s_rep.dtype == dt else s_rep.to(dt))
    return y.add_(F.linear(h, B_cat))  # one expand, added in place (autograd saves no linear output)


def lora_group_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor],
                         scales: Sequence[float]) -> torch.Tensor:
    """Plain torch, same math and precision rule: one shrink over A_cat, one expand over B_cat.

    The CPU fallback. Mixed dtypes are cast to x.dtype as torch.autocast would (the casts are
    differentiable, so an fp32 adapter under a bf16 x gets an fp32 gradient).
    """
    As, Bs, scales = _validate(x, weight, bias, As, Bs, scales)
    return _reference(x, weight, bias, As, Bs, scales)
