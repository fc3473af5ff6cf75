"""python -m kernels.bench — each kernel's dispatched path vs its reference vs the naive alternative.

On CUDA the dispatched path is the Triton kernel; on a CPU it is the plain-torch reference (the
interpreter is for correctness, not speed), so there the interesting ratio is reference vs naive.
Validates before timing (llm.c habit), prints medians, ratios and the roofline unit.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import kernels
from kernels.ema import ema_reference_


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
    return "triton" if kernels.use_triton(*tensors) else "torch-reference"


# ---------------------------------------------------------------- EMA -------------------------------
def bench_ema(device, reps):
    print("\n== ema_: teacher <- a*teacher + (1-a)*student ==")
    # An SD-1.5 attention adapter group at rank 4: 128 layers x 4 (q,k,v,out) x r(in+out) ≈ 3.2 M floats.
    shapes = [(4, 320), (320, 4)] * 32 + [(4, 640), (640, 4)] * 32 + [(4, 1280), (1280, 4)] * 64
    n = sum(a * b for a, b in shapes)
    flat_t, flat_s = torch.randn(n, device=device), torch.randn(n, device=device)
    views_t, views_s, o = [], [], 0
    for a, b in shapes:
        views_t.append(flat_t[o:o + a * b].view(a, b))
        views_s.append(flat_s[o:o + a * b].view(a, b))
        o += a * b

    def naive():
        for t, s in zip(views_t, views_s):
            t.mul_(0.99).add_(s, alpha=0.01)

    check_t = flat_t.clone()
    ema_reference_(check_t, flat_s, 0.99)
    probe = flat_t.clone()
    kernels.ema_(probe, flat_s, 0.99)
    assert torch.equal(probe, check_t), "ema_ does not match torch._foreach_lerp_"
    print(f"All results match. {len(shapes)} tensors, {n / 1e6:.2f} M fp32 elements, device {device}.")
    t_fused = timeit(lambda: kernels.ema_(views_t, views_s, 0.99), device, reps=reps)
    t_ref = timeit(lambda: ema_reference_(views_t, views_s, 0.99), device, reps=reps)
    t_naive = timeit(naive, device, reps=reps)
    gbs = 3 * 4 * n / t_fused / 1e9  # read t, read s, write t
    print(f"dispatched ({path_name(flat_t)}) {t_fused * 1e3:8.3f} ms  {gbs:7.1f} GB/s")
    print(f"_foreach_lerp_ reference   {t_ref * 1e3:8.3f} ms  ratio {t_ref / t_fused:5.2f}x")
    print(f"naive per-tensor loop      {t_naive * 1e3:8.3f} ms  ratio {t_naive / t_fused:5.2f}x")


# ---------------------------------------------------------------- JPEG ------------------------------
def bench_jpeg(device, reps, shape=(8, 3, 256, 256), quality=80):
    import math

    print(f"\n== jpeg: differentiable round trip, fwd+bwd, {tuple(shape)} q{quality} ==")
    img, w = torch.rand(shape, device=device), torch.randn(shape, device=device)

    def fwd_bwd(f):
        def run():
            x = img.clone().requires_grad_()
            (f(x) * w).sum().backward()
        return run

    runs = {f"dispatched ({path_name(img)})": fwd_bwd(lambda x: kernels.jpeg(x, quality)),
            "reference": fwd_bwd(lambda x: kernels.jpeg_reference(x, quality))}
    out, ref = kernels.jpeg(img, quality), kernels.jpeg_reference(img, quality)
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


# ---------------------------------------------------------------- LoRA group ------------------------
def _naive_lora_loop(x, weight, bias, As, Bs, scales):
    """What a stack of T peft-style LoRA layers does: base linear, then T shrink+expand pairs."""
    y = F.linear(x, weight, bias)
    for A, B, s in zip(As, Bs, scales):
        y = y + s * F.linear(F.linear(x, A), B)
    return y


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
        for fn in (kernels.lora_group_linear, kernels.lora_group_reference, _naive_lora_loop):
            y = fn(xg, W, b, As, Bs, scales)
            outs.append([y.float(), *[t.float() for t in torch.autograd.grad(y, [xg, As[-1], Bs[-1]], dy)]])
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        for name, got in zip(("op", "reference"), outs[:2]):
            for a, e in zip(got, outs[2]):
                err = ((a - e).abs().max() / e.abs().max()).item()
                assert err <= tol, f"lora_group {name} T={T}: rel err {err:.2e} > {tol}"
        t_op = timeit(step(kernels.lora_group_linear), device, reps=reps)
        t_ref = timeit(step(kernels.lora_group_reference), device, reps=reps)
        t_loop = timeit(step(_naive_lora_loop), device, reps=reps)
        flops = 2 * M * dim * dim * 2 + 2 * M * dim * rank * (2 * T + 2 * T + 2)
        print(f"{T:>3} {t_op * 1e3:9.2f} {t_ref * 1e3:9.2f} {t_loop * 1e3:9.2f} {t_loop / t_op:8.2f} "
              f"{t_op / t_base:10.2f} {flops / t_op / 1e12:11.4f}")
    print("All results match (op, reference and loop agree at every T).")


SECTIONS = {"lora_group": bench_lora_group, "jpeg": bench_jpeg, "ema": bench_ema}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
          f"RID_KERNELS={kernels.kernel_mode()}")
    for name in names:
        SECTIONS[name](device, args.reps)


if __name__ == "__main__":
    main()
