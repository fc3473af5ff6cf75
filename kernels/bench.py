"""python -m kernels.bench — each kernel's dispatched path vs its reference vs the naive alternative.

On CUDA the dispatched path is the Triton kernel; on a CPU it is the plain-torch reference (the
interpreter is for correctness, not speed), so there the interesting ratio is reference vs naive.
Validates before timing (llm.c habit), prints medians, ratios and the roofline unit.
"""
import argparse
import statistics
import time

import torch

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


SECTIONS = {"ema": bench_ema}


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
