"""python -m rid_kernels.bench [time | compile | gpu-check] — the kernels measured and checked.

    time       (default) each kernel's dispatched path vs its reference vs the naive alternative,
               on whatever device is here (on a CPU the dispatched path is the torch reference)
    compile    no GPU needed: every Triton kernel × every autotune config it may try × dtype ×
               aligned/odd widths × the LoRA group's two modes (R = 12 fused, R = 64 streamed),
               compiled for sm_80 and sm_90; registers, shared memory, spills. --all: at every
               backbone's layer shapes and every total rank R ≤ 128
    gpu-check  run once on a GPU: every kernel against its reference at every backbone's layer
               shapes (R = 12 and 64), the autotuner's picks, timings against the unfused alternatives

Each validates before it times (llm.c's habit), prints medians, ratios and the roofline unit.
"""
import argparse
import importlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import backbones
import rid_kernels
from cli import Parser, UsageError, command
from rid_kernels import lora_group as lg
from rid_kernels.ema import ema_reference_


def timeit(fn, device, warmup=3, reps=20):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def path_name(*tensors):
    return "triton" if rid_kernels.use_triton(*tensors) else "torch-reference"


SD15_ADAPTER_SHAPES = [(4, 320), (320, 4)] * 32 + [(4, 640), (640, 4)] * 32 + [(4, 1280), (1280, 4)] * 64


def adapter_views(flat, shapes=SD15_ADAPTER_SHAPES):
    """An SD-1.5 attention adapter group at rank 4 as views of one flat buffer: 128 (A, B) pairs
    (q, k, v, out of SD-1.5's 32 attention layers at widths 320/640/1280), 0.90 M values; with flat
    None, the number of values."""
    if flat is None:
        return sum(a * b for a, b in shapes)
    views, o = [], 0
    for a, b in shapes:
        views.append(flat[o:o + a * b].view(a, b))
        o += a * b
    return views


# Every LoRA-target linear of each backbone (where, tokens per image, in, out) at its native resolution, kept
# beside the backbone (backbones/<name>.py's LORA_SHAPES), in REGISTRY's order: sd15, sdxl, sd3, flux.
BACKBONE_LORA_SHAPES = backbones.lora_shapes()


def naive_lora_loop(x, weight, bias, As, Bs, scales):
    """What a stack of T peft-style LoRA layers does under autocast: base linear, then T shrink+expand pairs."""
    dt = x.dtype
    y = F.linear(x, weight, bias)
    for A, B, s in zip(As, Bs, scales):
        y = y + s * F.linear(F.linear(x, A.to(dt)), B.to(dt))
    return y


# ================================================================ time (any device) ===============
def bench_ema(device, reps):
    print("\n== ema_: teacher <- a*teacher + (1-a)*student ==")
    n = adapter_views(None)
    flat_t, flat_s = torch.randn(n, device=device), torch.randn(n, device=device)
    views_t, views_s = adapter_views(flat_t), adapter_views(flat_s)

    def naive():
        for t, s in zip(views_t, views_s):
            t.mul_(0.99).add_(s, alpha=0.01)

    check_t = flat_t.clone()
    ema_reference_(check_t, flat_s, 0.99)
    probe = flat_t.clone()
    rid_kernels.ema_(probe, flat_s, 0.99)
    assert torch.equal(probe, check_t), "ema_ does not match torch.lerp_"
    print(f"All results match. {len(views_t)} adapter tensors in one buffer, {n / 1e6:.2f} M fp32 values, {device}.")
    t_fused = timeit(lambda: rid_kernels.ema_(flat_t, flat_s, 0.99), device, reps=reps)
    t_each = timeit(lambda: torch._foreach_lerp_(views_t, views_s, 0.01), device, reps=reps)
    t_naive = timeit(naive, device, reps=reps)
    gbs = 3 * 4 * n / t_fused / 1e9  # read t, read s, write t
    print(f"dispatched ({path_name(flat_t)}) {t_fused * 1e3:8.3f} ms  {gbs:7.1f} GB/s")
    print(f"_foreach_lerp_ per tensor  {t_each * 1e3:8.3f} ms  ratio {t_each / t_fused:5.2f}x")
    print(f"naive per-tensor loop      {t_naive * 1e3:8.3f} ms  ratio {t_naive / t_fused:5.2f}x")


def bench_jpeg(device, reps, shape=(8, 3, 256, 256), quality=80):
    print(f"\n== jpeg: differentiable round trip, fwd+bwd, {tuple(shape)} q{quality} ==")
    img, w = torch.rand(shape, device=device), torch.randn(shape, device=device)

    def fwd_bwd(f):
        def run():
            x = img.clone().requires_grad_()
            (f(x) * w).sum().backward()
        return run

    runs = {f"dispatched ({path_name(img)})": fwd_bwd(lambda x: rid_kernels.jpeg(x, quality)),
            "reference": fwd_bwd(lambda x: rid_kernels.jpeg_reference(x, quality))}
    out, ref = rid_kernels.jpeg(img, quality), rid_kernels.jpeg_reference(img, quality)
    assert torch.allclose(out, ref, atol=1e-4), f"jpeg: dispatched path differs by {(out - ref).abs().max()}"
    msg = "All results match."
    try:
        from kornia.enhance import jpeg_codec_differentiable as kjpeg

        q = torch.tensor([float(quality)], device=device)
        mse = ((kjpeg(img, q) - ref) ** 2).mean().item()
        msg += f" ours vs kornia at q{quality}: {10 * math.log10(1 / mse):.1f} dB PSNR."
        runs["kornia jpeg_codec_differentiable"] = fwd_bwd(lambda x: kjpeg(x, q))
    except ImportError:
        msg += " (kornia not installed: no naive comparison)"
    print(msg)
    mpix = shape[0] * shape[2] * shape[3] / 1e6
    base = None
    for name, fn in runs.items():
        t = timeit(fn, device, warmup=1, reps=max(3, reps // 3))
        base = base or t
        print(f"{name:34s} {t * 1e3:8.2f} ms {mpix / t:7.1f} Mpx/s  ratio {t / base:5.2f}x")


def bench_lora_group(device, reps, dtype=None, batch=2, tokens=1024, dim=320, rank=4, Ts=(1, 2, 4, 8)):
    """Forward+backward of one SD-like attention projection (x and the current adapter train).

    Per adapter count T: median ms of the dispatched op (Triton on CUDA), the plain-torch reference
    and the naive loop, the loop/op ratio and the op's TFLOP/s (2·M·N·K per GEMM-shaped product of
    the unfused formula: forward 1 + 2T, backward dx 1 + 2T, dA/dB 2).
    """
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    g = torch.Generator().manual_seed(0)
    M = batch * tokens
    x = torch.randn(batch, tokens, dim, generator=g).to(device, dtype)
    W = (torch.randn(dim, dim, generator=g) / dim ** 0.5).to(device, dtype)
    b = torch.zeros(dim, device=device, dtype=dtype)
    dy = torch.randn(batch, tokens, dim, generator=g).to(device, dtype)
    print(f"\n== lora_group_linear: x ({batch}, {tokens}, {dim}) {dtype}, rank {rank}, fwd+bwd; "
          f"op = {path_name(x, W)} ==")
    xb = x.clone().requires_grad_()

    def base_step():  # the frozen layer alone: what the adapters add on top of
        torch.autograd.backward(F.linear(xb, W, b), dy)
        xb.grad = None

    t_base = timeit(base_step, device, reps=reps)
    print(f"plain linear (T=0) fwd+bwd: {t_base * 1e3:.2f} ms")
    print(f"{'T':>3} {'op ms':>9} {'ref ms':>9} {'loop ms':>9} {'loop/op':>8} {'op/linear':>10} {'op TFLOP/s':>11}")
    for T in Ts:
        As = [(torch.randn(rank, dim, generator=g) / dim ** 0.5).to(device, dtype) for _ in range(T)]
        Bs = [(torch.randn(dim, rank, generator=g) * 0.01).to(device, dtype) for _ in range(T)]
        As[-1].requires_grad_()
        Bs[-1].requires_grad_()
        scales = [1.0] * T
        xg = x.clone().requires_grad_()

        def step(fn):
            def run():
                torch.autograd.backward(fn(xg, W, b, As, Bs, scales), dy)
                xg.grad = As[-1].grad = Bs[-1].grad = None
            return run

        outs = []  # validate before timing: op and reference vs the loop, forward and all grads
        for fn in (rid_kernels.lora_group_linear, rid_kernels.lora_group_reference, naive_lora_loop):
            y = fn(xg, W, b, As, Bs, scales)
            outs.append([y.float(), *[t.float() for t in torch.autograd.grad(y, [xg, As[-1], Bs[-1]], dy)]])
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        for name, got in zip(("op", "reference"), outs[:2]):
            for a, e in zip(got, outs[2]):
                err = ((a - e).abs().max() / e.abs().max()).item()
                assert err <= tol, f"lora_group {name} T={T}: rel err {err:.2e} > {tol}"
        t_op = timeit(step(rid_kernels.lora_group_linear), device, reps=reps)
        t_ref = timeit(step(rid_kernels.lora_group_reference), device, reps=reps)
        t_loop = timeit(step(naive_lora_loop), device, reps=reps)
        flops = 2 * M * dim * dim * 2 + 2 * M * dim * rank * (2 * T + 2 * T + 2)
        print(f"{T:>3} {t_op * 1e3:9.2f} {t_ref * 1e3:9.2f} {t_loop * 1e3:9.2f} {t_loop / t_op:8.2f} "
              f"{t_op / t_base:10.2f} {flops / t_op / 1e12:11.4f}")
    print("All results match (op, reference and loop agree at every T).")


SECTIONS = {"lora_group": bench_lora_group, "jpeg": bench_jpeg, "ema": bench_ema}


def cmd_time(argv):
    p = Parser(prog="python -m rid_kernels.bench [time]", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if present")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per measurement (median reported)")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in names if s not in SECTIONS]
    if bad:
        p.error(f"--only {','.join(bad)}: unknown; allowed: {', '.join(SECTIONS)}")
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"RID_KERNELS={rid_kernels.kernel_mode()}")
    for name in names:
        SECTIONS[name](device, args.reps)
    return 0


# ================================================================ compile (no GPU) ================
# triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))
# runs Triton's whole pipeline (TTIR → TTGIR → LLVM → PTX → ptxas → cubin) for a GPU that is not
# here; cuobjdump (shipped in triton's wheel beside ptxas) reads registers and stack off the cubin.
# A nonzero stack is local memory: register spills. Shared memory is the launch's dynamic shared
# memory, checked against the arch's opt-in maximum per block as Triton's launcher checks it.
ARCHS = {80: 163 * 1024, 90: 227 * 1024}  # max shared memory per block (opt-in): A100, H100
# (label, x/W dtype, adapter dtype, fp32 dot precision): what rid and DRaFT launch
LORA_CASES = [("fp16", torch.float16, torch.float16, "ieee"), ("bf16", torch.bfloat16, torch.bfloat16, "ieee"),
              ("bf16+fp32 LoRA", torch.bfloat16, torch.float32, "ieee"),
              ("fp32", torch.float32, torch.float32, "ieee"), ("fp32 tf32", torch.float32, torch.float32, "tf32")]
# Total ranks R = Σ r_i. The default compiles one of each kernel mode: R = 12 (the paper's 3 tasks ×
# rank 4, shrink fused) and R = 64 (RIL's 16 tasks × rank 4, or one rank-64 LoRA: h streamed).
# --all compiles every R up to 128.
LORA_RANKS = (12, 64)
LORA_RANKS_ALL = tuple(range(1, 129))
LORA_RANKS_REPORT = (1, 4, 12, 16, 17, 32, 36, 64, 100, 128)  # --all's summary lines
COMPILE_BATCH = 2  # images per UNet call with CFG: M = 2 · tokens
# Triton specialises a launch on which ints are multiples of 16 (or equal to 1) and which pointers
# are 16-byte aligned. "aligned": every backbone layer (widths multiples of 16, contiguous tensors) —
# 16-byte vector loads, cp.async/TMA pipelining. "odd": other widths and offset views — a second
# kernel with scalar loads and its own register use. (where, tokens, in, out) as in BACKBONE_LORA_SHAPES.
ODD_SHAPES = [("odd widths, offset views", 4096, 321, 319), ("odd widths, offset views", 500, 321, 319)]


def _t(dtype, aligned=True):
    return ("tensor", str(dtype).removeprefix("torch."), aligned)


def _cfg_name(c):
    return "{BLOCK_M}x{BLOCK_N}x{BLOCK_K} w{w} s{s}".format(**c.kwargs, w=c.num_warps, s=c.num_stages)


def lora_jobs(arch, M, K, N, R, aligned, label, dt, adt, precision, configs, kept):
    """Forward and backward-dx launches of lora_group_kernel at one layer shape and total rank R, one
    per config (tried: in kept), with the arguments lora_group.launch passes."""
    al, fuse = aligned, R <= lg.RANK_TILE
    for cfg in configs:
        for pas in ("fwd", "bwd"):  # forward; backward's dx: (dy, Wᵀ, B_catᵀ, A_catᵀ) views
            f = pas == "fwd"
            k, n = (K, N) if f else (N, K)  # the backward's dx maps out → in
            args = dict(x_ptr=_t(dt, al), w_ptr=_t(dt, al), bias_ptr=_t(dt, al), a_ptr=_t(adt, al),
                        b_ptr=_t(adt, al), s_ptr=_t(torch.float32), y_ptr=_t(dt, al), h_ptr=_t(dt, al),
                        M=M, N=n, K=k, R=R, stride_xm=k, stride_xk=1,
                        stride_wn=k if f else 1, stride_wk=1 if f else n,
                        stride_ar=k if f else 1, stride_ak=1 if f else R,
                        stride_bn=R if f else 1, stride_br=1 if f else n,
                        stride_ym=n, stride_yn=1, stride_hm=R, stride_hr=1)
            cx = dict(HAS_BIAS=f, HAS_LORA=True, FUSE_SHRINK=fuse, STORE_H=fuse, DOT_F32=False, PRECISION=precision,
                      BLOCK_R=lg.RANK_TILE, **cfg.kwargs)
            yield dict(kernel=f"lora_group {pas}", arch=arch, layout="aligned" if al else "odd", dtype=label,
                       mode="fused" if fuse else "streamed", config=_cfg_name(cfg), tried=cfg in kept,
                       module="rid_kernels.lora_group", fn="lora_group_kernel",
                       args=args, constexprs=cx, options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def specialisation(job):
    """What Triton compiles for this job: (signature, constexprs, attrs) as a launch specialises its
    arguments (ints equal to 1 become constants; multiples of 16 and 16-byte aligned pointers get
    divisibility hints). Two jobs with the same specialisation, arch and options compile to the same cubin."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import MockTensor, native_specialize_impl

    signature, constexprs, attrs = {}, dict(job["constexprs"]), {}
    for name, value in job["args"].items():
        if isinstance(value, (list, tuple)):
            value = (MockTensor if value[2] else _OffsetTensor)(getattr(torch, value[1]))
        kind, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = value
        elif isinstance(spec, str) and spec:
            attrs[name] = spec
    return signature, constexprs, attrs


def compile_jobs(archs=tuple(ARCHS), everything=False, candidates=False):
    """One dict per compilation: the kernel's launch arguments as the launcher passes them (sizes and
    strides decide Triton's specialisation), constexprs and options. The LoRA group runs at SD-1.5's
    64² self-attention and an odd-width layer with R in LORA_RANKS; everything=True: at every layer
    shape of every backbone in BACKBONE_LORA_SHAPES and every R in LORA_RANKS_ALL, where (shape, R)
    pairs that specialise alike are compiled once (their ranks, shapes and count ride along).
    candidates=True adds the tiles the pruning hook drops on that arch (tried=False)."""
    if everything:
        shapes = [(f"{bb} {where}", t, k, n) for bb, rows in BACKBONE_LORA_SHAPES.items() for where, t, k, n in rows]
        shapes, ranks = shapes + ODD_SHAPES, LORA_RANKS_ALL
    else:
        where, t, k, n = BACKBONE_LORA_SHAPES["sd15"][0]
        shapes, ranks = [(f"sd15 {where}", t, k, n), ODD_SHAPES[0]], LORA_RANKS
    groups = {}  # the (shape, R) launches of one specialisation, fwd and bwd together
    for where, tokens, K, N in shapes:
        aligned = K % 16 == 0 and N % 16 == 0
        for R in ranks:
            probe = lora_jobs(80, COMPILE_BATCH * tokens, K, N, R, aligned, *LORA_CASES[0], lg.CONFIGS[:1], [])
            groups.setdefault(repr([specialisation(j) for j in probe]), []).append((where, tokens, K, N, R))
    jobs = []
    for arch in archs:
        for group in groups.values():
            where, tokens, K, N, R = group[0]
            aligned = K % 16 == 0 and N % 16 == 0
            for label, dt, adt, precision in LORA_CASES:
                kept = lg.configs_for(arch, ARCHS[arch], (dt, dt, adt), precision, aligned)
                for job in lora_jobs(arch, COMPILE_BATCH * tokens, K, N, R, aligned, label, dt, adt,
                                     precision, lg.CONFIGS if candidates else kept, kept):
                    jobs.append(dict(job, launches=len(group), ranks=sorted({g[4] for g in group}),
                                     shapes=sorted({g[0] for g in group})))
        jp = importlib.import_module("rid_kernels.jpeg")  # the module (rid_kernels.jpeg is the function)
        n_blocks = 8 * 6144  # 8 images at 512²: 4096 luma + 2048 chroma blocks each
        for name, ptrs in (("_jpeg_blocks_fwd_kernel", ("x_ptr", "out_ptr")),
                           ("_jpeg_blocks_bwd_kernel", ("x_ptr", "g_ptr", "gx_ptr"))):
            args = {p: _t(torch.float32) for p in ptrs + ("k_ptr", "q_ptr")}
            args.update(n_blocks=n_blocks, n_luma=n_blocks * 2 // 3)
            jobs.append(dict(kernel="jpeg " + name.split("_")[3], arch=arch, layout="aligned", dtype="fp32", mode="-",
                             launches=1, ranks=[], shapes=["8×3×512²"], tried=True,
                             config=f"BB={jp._BB} w{jp._WARPS}", module="rid_kernels.jpeg", fn=name, args=args,
                             constexprs=dict(BB=jp._BB, PRECISION="tf32x3"), options=dict(num_warps=jp._WARPS)))
        em = importlib.import_module("rid_kernels.ema")
        for label, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
            args = dict(t_ptr=_t(dt), s_ptr=_t(dt), n=adapter_views(None), w=0.01, v=0.99)
            jobs.append(dict(kernel="ema", arch=arch, layout="aligned", dtype=label, mode="-", launches=1, ranks=[],
                             shapes=["0.90 M"], tried=True, config=f"BLOCK={em._BLOCK} w4", module="rid_kernels.ema",
                             fn="_ema_kernel", args=args, constexprs=dict(BLOCK=em._BLOCK, FMA64=False), options={}))
    return jobs


class _OffsetTensor:
    """A stand-in tensor whose data pointer is not 16-byte aligned (a view at an odd offset)."""

    def __init__(self, dtype):
        self.dtype = dtype

    @staticmethod
    def data_ptr():
        return 8


def compile_one(job):
    """Compile one job for its arch; returns the job with regs, stack (bytes), smem (bytes) or error."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(job["module"]), job["fn"])
    while hasattr(fn, "fn") and not isinstance(fn, JITFunction):  # through the autotuner
        fn = fn.fn
    if not isinstance(fn, JITFunction):
        raise RuntimeError("compile needs TRITON_INTERPRET=0 in the compiling process (kernels were interpreted)")
    sig, constexprs, specs = specialisation(job)
    signature = {name: "constexpr" if name in job["constexprs"] else sig[name] for name in fn.arg_names}
    attrs = {(i,): BaseBackend.parse_attr(specs[name]) for i, name in enumerate(fn.arg_names) if name in specs}
    t0 = time.perf_counter()
    try:
        k = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                           target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
    except Exception as e:  # a compile error is a result to report, not a crash of the table
        return dict(job, error=(str(e).strip().splitlines() or [type(e).__name__])[-1][:200])
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return dict(job, regs=int(m[1]), stack=int(m[2]), smem=int(k.metadata.shared), secs=time.perf_counter() - t0)


def problems(r):
    """Why a compiled job would fail or run slowly on its arch ('' when it is fine)."""
    if "error" in r:
        return "compile error: " + r["error"]
    out = []
    if r["stack"]:
        out.append(f"spills ({r['stack']} B stack)")
    if r["smem"] > ARCHS[r["arch"]]:
        out.append(f"shared memory {r['smem'] / 1024:.0f} KB > {ARCHS[r['arch']] // 1024} KB")
    return ", ".join(out)


def compile_all(jobs, workers):
    """Compile in a process pool whose workers import the kernels with TRITON_INTERPRET=0 (set in
    this process's environment, which they inherit: call it from a CLI, not from a test session)."""
    import concurrent.futures
    import multiprocessing

    os.environ["TRITON_INTERPRET"] = "0"  # read by each spawned worker when it decorates the kernels
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return list(pool.map(compile_one, jobs))


def _span(ranks):
    return "-" if not ranks else str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]} ({len(ranks)})"


def summary(rows, ranks):
    """Per total rank R and per backbone: compilations that serve it, problems, most registers, worst
    shared memory per arch (the LoRA group's rows)."""
    lora = [r for r in rows if r["fn"] == "lora_group_kernel" and r["tried"]]
    keys = [(f"R = {R}", lambda r, R=R: R in r["ranks"]) for R in ranks]
    keys += [(bb, lambda r, bb=bb: any(w.startswith(bb + " ") for w in r["shapes"])) for bb in BACKBONE_LORA_SHAPES]
    keys += [("odd widths", lambda r: r["layout"] == "odd")]
    lines = []
    for name, pick in keys:
        got = [r for r in lora if pick(r)]
        if not got:
            continue
        smem = ", ".join(f"sm_{a} {max(r.get('smem', 0) for r in got if r['arch'] == a) / 1024:.0f} of "
                         f"{ARCHS[a] // 1024} KB" for a in sorted({r["arch"] for r in got}))
        lines.append(f"  {name:14} {len(got):5} compilations, {sum(bool(problems(r)) for r in got)} with problems, "
                     f"≤ {max(r.get('regs', 0) for r in got)} registers, shared memory ≤ {smem}")
    return lines


def cmd_compile(argv):
    p = Parser(prog="python -m rid_kernels.bench compile",
               description="Compile every Triton kernel × autotune config × dtype for sm_80 and sm_90 (no GPU "
                           "needed); exit 1 if any fails, spills or overflows shared memory.")
    p.add_argument("--arch", default=",".join(map(str, ARCHS)), help="comma list of 80, 90 (default: both)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: all cores)")
    p.add_argument("--all", action="store_true", help="the full matrix: the LoRA group at every layer shape of every "
                   f"backbone ({', '.join(BACKBONE_LORA_SHAPES)}) and every total rank 1–{LORA_RANKS_ALL[-1]} "
                   f"(default: SD-1.5's 64² self-attention and odd widths at R = {', '.join(map(str, LORA_RANKS))})")
    p.add_argument("--candidates", action="store_true", help="also compile the LoRA-group tiles pruned on that arch")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = p.parse_args(argv)
    try:
        archs = [int(a) for a in args.arch.split(",")]
    except ValueError:
        archs = []
    if not archs or any(a not in ARCHS for a in archs):
        p.error(f"--arch {args.arch}: allowed: a comma list of {', '.join(map(str, ARCHS))}")
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: allowed: an int ≥ 1")
    t0 = time.perf_counter()
    rows = compile_all(compile_jobs(archs, args.all, args.candidates), args.jobs)
    wall = time.perf_counter() - t0
    print(f"{'kernel':15} {'arch':5} {'shapes':7} {'mode':8} {'R':13} {'dtype':14} {'config':17} {'regs':>4} "
          f"{'smem KB':>7} {'spill B':>7}  status")
    for r in rows:
        status = problems(r) or "ok"
        if not r["tried"]:
            status = f"not tried here ({status})"
        print(f"{r['kernel']:15} sm_{r['arch']:<2} {r['layout']:7} {r['mode']:8} {_span(r['ranks']):13} "
              f"{r['dtype']:14} {r['config']:17} {r.get('regs', '-'):>4} {r.get('smem', 0) / 1024:7.1f} "
              f"{r.get('stack', '-'):>7}  {status}")
    bad = [r for r in rows if r["tried"] and problems(r)]
    tried = [r for r in rows if r["tried"]]
    print(f"{len(tried)} compilations the autotuners may launch, standing for {sum(r['launches'] for r in tried)} "
          f"launches (kernel × arch × dtype × tile × pass × layer shape × total rank), {len(bad)} with problems; "
          f"{wall:.0f} s with {args.jobs} jobs")
    print("\n".join(summary(rows, LORA_RANKS_REPORT if args.all else LORA_RANKS)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=0)
    return 1 if bad else 0


# ================================================================ gpu-check (once, on a GPU) ======
# Every backbone's LoRA-target layers (where, tokens per image, in, out), and one odd-width layer
GPU_LORA_SHAPES = {**BACKBONE_LORA_SHAPES, "odd": [("odd widths (in no backbone)", 500, 321, 319)]}
GPU_LORA_RANK = 4  # rank of each adapter; R = T · 4
GPU_LORA_RANKS = (12, 64)  # total ranks: the paper's 3 tasks (shrink fused), RIL's 16 tasks (h streamed)
GPU_LORA_CASES = [("bf16+fp32 LoRA", torch.bfloat16, torch.float32), ("fp16+fp32 LoRA", torch.float16, torch.float32),
                  ("fp32", torch.float32, torch.float32)]
GPU_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}  # max |Δ| / max |reference|


def _rel(a, e):
    return ((a.float() - e.float()).abs().max() / e.float().abs().max().clamp_min(1e-30)).item()


def _lora_problem(batch, tokens, k, n, dt, adt, dev, rank=4, T=3):
    """Inputs as rid trains: x and the current (last) of T rank-r adapters require grad."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch * tokens, k, generator=g).to(dev, dt).requires_grad_()
    W = (torch.randn(n, k, generator=g) / k ** 0.5).to(dev, dt)
    b = (torch.randn(n, generator=g) * 0.1).to(dev, dt)
    As = [(torch.randn(rank, k, generator=g) / k ** 0.5).to(dev, adt) for _ in range(T)]
    Bs = [(torch.randn(n, rank, generator=g) * 0.1).to(dev, adt) for _ in range(T)]
    As[-1].requires_grad_()
    Bs[-1].requires_grad_()
    return x, W, b, As, Bs, [1.0] * T, torch.randn(batch * tokens, n, generator=g).to(dev, dt)


def _fwd_bwd(fn, x, W, b, As, Bs, s, dy):
    y = fn(x, W, b, As, Bs, s)
    return [y, *torch.autograd.grad(y, [x, As[-1], Bs[-1]], dy)]


GPU_JPEG_SHAPE = (8, 3, 512, 512)


def cmd_gpu_check(argv):
    p = Parser(prog="python -m rid_kernels.bench gpu-check",
               description="Once, on a GPU: every kernel against its reference at every backbone's layer shapes, "
                           "the autotuner's picks, timings against the unfused alternatives.")
    p.add_argument("--batch", type=int, default=2, help="images per UNet call, CFG included (default 2)")
    p.add_argument("--backbones", default=",".join(GPU_LORA_SHAPES),
                   help=f"comma list of {', '.join(GPU_LORA_SHAPES)} (default: all)")
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error(f"--batch {args.batch}: allowed: an int ≥ 1")
    names = [b.strip() for b in args.backbones.split(",") if b.strip()]
    if not names or any(b not in GPU_LORA_SHAPES for b in names):
        p.error(f"--backbones {args.backbones}: allowed: a comma list of {', '.join(GPU_LORA_SHAPES)}")
    if not torch.cuda.is_available():
        raise UsageError("gpu-check: no CUDA GPU is visible (torch.cuda.is_available() is False); "
                         "without one, run `python -m rid_kernels.bench compile`")
    if rid_kernels.INTERPRET or rid_kernels.kernel_mode() == "torch":
        raise UsageError(f"gpu-check: TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')} "
                         f"RID_KERNELS={rid_kernels.kernel_mode()} would bypass the compiled kernels; allowed: "
                         "TRITON_INTERPRET unset or 0, RID_KERNELS auto or triton")
    import triton
    from triton.testing import do_bench

    dev = torch.device("cuda")
    cap = torch.cuda.get_device_capability(dev)
    print(f"{torch.cuda.get_device_name(dev)} (sm_{''.join(map(str, cap))}), "
          f"torch {torch.__version__}, triton {triton.__version__}, "
          f"fp32 matmul precision {torch.get_float32_matmul_precision()}")
    return gpu_check(dev, args.batch, lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median"),
                     arch=10 * cap[0] + cap[1], max_smem=lg.max_shared_memory(dev.index or 0),
                     shapes={b: GPU_LORA_SHAPES[b] for b in names})


def gpu_check(dev, batch, bench_ms, arch, max_smem, shapes=GPU_LORA_SHAPES, ranks=GPU_LORA_RANKS,
              jpeg_shape=GPU_JPEG_SHAPE, ema_shapes=SD15_ADAPTER_SHAPES) -> int:
    """gpu-check's body on `dev`: validate every kernel against its reference (0 when all match, else the
    failures and 1), then print the timing tables; bench_ms(fn) -> ms. shapes: {backbone: [(where, tokens,
    in, out)]}; ranks: total ranks R, T = R / GPU_LORA_RANK adapters. tests/test_compile.py runs it on a
    CPU under the Triton interpreter at toy shapes, so no line of it meets its first run on a GPU."""
    tuner = lg.lora_group_kernel
    precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"  # as lora_group.launch
    tol = {**GPU_TOL, **({} if precision == "ieee" else {torch.float32: 5e-3})}
    failures, picks = [], {}

    layers = [(f"{bb} {where}", tokens, k, n) for bb, rows in shapes.items() for where, tokens, k, n in rows]

    # ---- validate everything first ----
    for where, tokens, k, n in layers:
        for R in ranks:
            for label, dt, adt in GPU_LORA_CASES:
                prob = _lora_problem(batch, tokens, k, n, dt, adt, dev, GPU_LORA_RANK, R // GPU_LORA_RANK)
                y = rid_kernels.lora_group_linear(*prob[:6])
                fwd = tuner.best_config
                got = [y, *torch.autograd.grad(y, [prob[0], prob[3][-1], prob[4][-1]], prob[6])]
                picks[where, R, label] = (_cfg_name(fwd), _cfg_name(tuner.best_config))
                ref = _fwd_bwd(rid_kernels.lora_group_reference, *prob)
                for name, a, e in zip(("y", "dx", "dA", "dB"), got, ref):
                    if not torch.isfinite(a).all() or _rel(a, e) > tol[dt]:
                        failures.append(f"lora_group {where} R={R} {label}: {name} differs from the reference by "
                                        f"{_rel(a, e):.2e} (allowed {tol[dt]:.0e})")
    img = torch.rand(*jpeg_shape, device=dev, generator=torch.Generator(dev).manual_seed(0))
    w = torch.randn(img.shape, device=dev, generator=torch.Generator(dev).manual_seed(1))
    outs = []
    for fn in (rid_kernels.jpeg, rid_kernels.jpeg_reference):
        x = img.clone().requires_grad_()
        out = fn(x, 80)
        (out * w).sum().backward()
        outs.append((out.detach(), x.grad))
    psnr = 10 * math.log10(1 / ((outs[0][0] - outs[1][0]) ** 2).mean().clamp_min(1e-20).item())
    if psnr < 60 or _rel(outs[0][1], outs[1][1]) > 1e-3:  # a coefficient at a rounding tie may flip
        failures.append(f"jpeg {'×'.join(map(str, jpeg_shape))} q80: {psnr:.1f} dB PSNR vs the reference (allowed ≥ 60), "
                        f"gradient off by {_rel(outs[0][1], outs[1][1]):.2e} (allowed 1e-3)")
    n_ema = adapter_views(None, ema_shapes)
    flat_t, flat_s = torch.randn(n_ema, device=dev), torch.randn(n_ema, device=dev)
    views_t, views_s = adapter_views(flat_t, ema_shapes), adapter_views(flat_s, ema_shapes)
    for alpha in (0.99, 0.3):  # both branches of lerp's formula
        t, e = flat_t.clone(), adapter_views(flat_t.clone(), ema_shapes)
        rid_kernels.ema_(t, flat_s, alpha)
        torch._foreach_lerp_(e, views_s, 1 - alpha)
        if not torch.equal(t, torch.cat([v.reshape(-1) for v in e])):
            failures.append(f"ema_ α={alpha}: not bit-identical to torch._foreach_lerp_")
    if failures:
        print("\n".join(failures))
        return 1
    print("All results match. Starting benchmarks.")

    # ---- time ----
    print(f"\n### LoRA group, R = {' and '.join(map(str, ranks))} (adapters of rank {GPU_LORA_RANK}; x and the last "
          f"adapter train), fwd+bwd, batch {batch}; R ≤ {lg.RANK_TILE}: shrink fused, larger R: h streamed\n")
    for label, dt, adt in GPU_LORA_CASES:
        for aligned in (True, False):
            tiles = lg.configs_for(arch, max_smem, (dt, dt, adt), precision, aligned)
            print(f"{label}, {'widths multiples of 16' if aligned else 'odd widths'}: the autotuner tries "
                  f"{len(tiles)} of {len(lg.CONFIGS)} tiles here: {', '.join(_cfg_name(c) for c in tiles)}")
    print("\n| layer | x (M, in) → out | R | dtype | autotune pick fwd / bwd | fused ms | loop ms | loop/fused "
          "| linear ms | fused/linear | fused TFLOP/s |")
    print("|" + " --- |" * 11)
    for where, tokens, k, n in layers:
        for R in ranks:
            for label, dt, adt in GPU_LORA_CASES:
                prob = _lora_problem(batch, tokens, k, n, dt, adt, dev, GPU_LORA_RANK, R // GPU_LORA_RANK)
                x, W, b = prob[:3]
                t_op = bench_ms(lambda: _fwd_bwd(rid_kernels.lora_group_linear, *prob))
                t_loop = bench_ms(lambda: _fwd_bwd(naive_lora_loop, *prob))
                t_lin = bench_ms(lambda: torch.autograd.grad(F.linear(x, W, b), x, prob[6]))
                M = x.shape[0]
                # base fwd + dx, then the group's shrink and expand (R) in the forward and in dx, dA_t and dB_t (r)
                flops = 2 * M * k * n * 2 + 2 * M * (k + n) * (2 * R + GPU_LORA_RANK)
                fwd, bwd = picks[where, R, label]
                print(f"| {where} | ({M}, {k}) → {n} | {R} | {label} | {fwd} / {bwd} | {t_op:.3f} | {t_loop:.3f} "
                      f"| {t_loop / t_op:.2f}× | {t_lin:.3f} | {t_op / t_lin:.2f}× | {flops / t_op / 1e9:.1f} |")

    print(f"\n### differentiable JPEG, {'×'.join(map(str, jpeg_shape))} fp32, q80, fwd+bwd\n")
    runs = {"triton": rid_kernels.jpeg, "torch reference": rid_kernels.jpeg_reference}
    note = ""
    try:
        from kornia.enhance import jpeg_codec_differentiable as kjpeg

        q = torch.tensor([80.0], device=dev)
        runs["kornia jpeg_codec_differentiable"] = lambda x, quality: kjpeg(x, q)
        mse = ((kjpeg(img, q) - outs[1][0]) ** 2).mean().item()
        note = f"kornia vs ours: {10 * math.log10(1 / mse):.1f} dB PSNR (different rounding and chroma filters)"
    except ImportError:
        note = "kornia not installed: `pip install kornia` adds its differentiable JPEG to the table"
    print("| path | ms | Mpx/s | ratio |\n| --- | --- | --- | --- |")
    base = None
    for name, fn in runs.items():
        def run(fn=fn):
            x = img.clone().requires_grad_()
            (fn(x, 80) * w).sum().backward()
        t = bench_ms(run)
        base = base or t
        print(f"| {name} | {t:.2f} | {img[:, 0].numel() / 1e3 / t:.0f} | {t / base:.2f}× |")
    print(note)

    which = "an SD-1.5" if ema_shapes is SD15_ADAPTER_SHAPES else "an"
    print(f"\n### EMA over {which} adapter group: {len(views_t)} tensors, {n_ema / 1e6:.2f} M fp32 values\n")
    print("| path | ms | GB/s | ratio |\n| --- | --- | --- | --- |")
    rows = [("triton, one flat buffer", lambda: rid_kernels.ema_(flat_t, flat_s, 0.99)),
            ("torch._foreach_lerp_ per tensor", lambda: torch._foreach_lerp_(views_t, views_s, 0.01)),
            ("per-tensor mul_/add_ loop", lambda: [t.mul_(0.99).add_(s, alpha=0.01) for t, s in zip(views_t, views_s)])]
    base = None
    for name, fn in rows:
        t = bench_ms(fn)
        base = base or t
        print(f"| {name} | {t:.4f} | {3 * 4 * n_ema / t / 1e6:.0f} | {t / base:.2f}× |")
    return 0


COMMANDS = {"time": cmd_time, "compile": cmd_compile, "gpu-check": cmd_gpu_check}


@command("python -m rid_kernels.bench")
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cmd = argv.pop(0) if argv and argv[0] in COMMANDS else "time"
    return COMMANDS[cmd](argv)


if __name__ == "__main__":
    sys.exit(main())
