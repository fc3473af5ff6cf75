"""Fused EMA update: teacher ← α·teacher + (1−α)·student, over one flat buffer in one launch.

rid keeps every trainable adapter tensor of the current task as a view into one contiguous fp32
buffer (rid.AdapterGroup), and the EMA teacher is a second buffer of the same size, so the whole
teacher update is a single elementwise kernel over two flat tensors.

The update is written as torch.lerp(teacher, student, w) with w = 1 − α, using lerp's own two-sided
formula so that the kernel is bit-identical to torch.lerp_ / torch._foreach_lerp_ in fp32:
    w < 0.5:  t + w·(s − t)            (fused multiply-add)
    else:     s − (1 − w)·(s − t)
α is not range-checked here: the caller's boundary (rid.StepConfig, train.py's --ema) does it once.
"""
import torch

from . import HAS_TRITON, INTERPRET, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _ema_kernel(
        t_ptr,  # teacher, flat, updated in place
        s_ptr,  # student, flat, same dtype and length
        n,  # number of elements
        w,  # fp32 lerp weight, 1 − α
        v,  # fp32 1 − w (lerp's coefficient for w ≥ 0.5), rounded on the host as ATen does
        BLOCK: tl.constexpr,  # elements per program
        FMA64: tl.constexpr,  # interpreter only: emulate the fused multiply-add in fp64
    ):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        t = tl.load(t_ptr + offs, mask=mask).to(tl.float32)
        s = tl.load(s_ptr + offs, mask=mask).to(tl.float32)
        d = s - t
        if FMA64:
            # The interpreter computes tl.fma as x*y + z with two roundings; an fp64 product of two
            # fp32 values is exact, so this reproduces the GPU's (and ATen's) single rounding.
            d, t, s = d.to(tl.float64), t.to(tl.float64), s.to(tl.float64)
        if w < 0.5:
            out = tl.fma(d, w, t)
        else:
            out = tl.fma(-d, v, s)
        # via fp32: the interpreter turns a direct fp64→bf16 cast into NaN
        tl.store(t_ptr + offs, out.to(tl.float32).to(t_ptr.dtype.element_ty), mask=mask)


_BLOCK = 1024  # elements per program: 4 warps × 32 threads × 8 elements


def _launch(teacher: torch.Tensor, student: torch.Tensor, alpha: float) -> None:
    """The kernel reads and writes teacher.numel() elements of both buffers as flat arrays."""
    if not (teacher.is_contiguous() and student.is_contiguous() and teacher.shape == student.shape
            and teacher.dtype == student.dtype and teacher.device == student.device):
        raise ValueError(f"ema_: teacher and student must be contiguous tensors of one shape, dtype and device; "
                         f"got {tuple(teacher.shape)} {teacher.dtype} {teacher.device} and "
                         f"{tuple(student.shape)} {student.dtype} {student.device}")
    n = teacher.numel()
    if n == 0:
        return
    w = torch.tensor(1.0 - float(alpha), dtype=torch.float32)  # ATen rounds the weight to fp32
    v = 1.0 - w
    _ema_kernel[(triton.cdiv(n, _BLOCK),)](teacher, student, n, w.item(), v.item(), BLOCK=_BLOCK, FMA64=INTERPRET)


@torch.no_grad()
def ema_reference_(teacher: torch.Tensor, student: torch.Tensor, alpha: float) -> None:
    """Plain-torch reference and CPU fallback: teacher.lerp_(student, 1 − α)."""
    teacher.lerp_(student, 1.0 - float(alpha))


@torch.no_grad()
def ema_(teacher: torch.Tensor, student: torch.Tensor, alpha: float) -> None:
    """teacher ← α·teacher + (1−α)·student, in place; teacher, student: flat buffers of one shape.

    Naive alternative (what one launch over the flat buffer replaces), per adapter tensor:
        for t, s in zip(teacher_tensors, student_tensors): t.mul_(alpha).add_(s, alpha=1 - alpha)
    """
    if use_triton(teacher, student):
        _launch(teacher, student, alpha)
    else:
        ema_reference_(teacher, student, alpha)
