"""Fused EMA update: teacher ← α·teacher + (1−α)·student, over one flat buffer in one launch.

rid keeps every trainable adapter tensor of the current task as a view into one contiguous fp32
buffer (rid.AdapterGroup), and the EMA teacher is a second buffer of the same size, so the whole
teacher update is a single elementwise kernel. Lists of tensors that are adjacent views of one
storage are collapsed to that flat buffer here; lists of unrelated tensors fall back to one launch
per tensor (still correct, just not one launch).

The update is written as torch.lerp(teacher, student, w) with w = 1 − α, using lerp's own two-sided
formula so that the kernel is bit-identical to torch._foreach_lerp_ in fp32:
    w < 0.5:  t + w·(s − t)            (fused multiply-add)
    else:     s − (1 − w)·(s − t)
"""
from typing import Optional, Sequence, Union

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


def _launch(teacher: torch.Tensor, student: torch.Tensor, alpha: float) -> None:
    n = teacher.numel()
    if n == 0:
        return
    BLOCK = 1024
    grid = (triton.cdiv(n, BLOCK),)
    w = torch.tensor(1.0 - float(alpha), dtype=torch.float32)  # ATen rounds the weight to fp32
    v = 1.0 - w
    _ema_kernel[grid](teacher, student, n, w.item(), v.item(), BLOCK=BLOCK, FMA64=INTERPRET)


def _flat_view(tensors: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """A 1-D view covering `tensors` when they are contiguous, adjacent views of one storage."""
    first = tensors[0]
    if not all(t.is_contiguous() and t.dtype == first.dtype and t.device == first.device for t in tensors):
        return None
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for t in tensors:
        if t.untyped_storage().data_ptr() != storage or t.storage_offset() != offset:
            return None
        offset += t.numel()
    total = offset - first.storage_offset()
    return first.as_strided((total,), (1,), first.storage_offset())


def _as_list(name: str, x: Union[torch.Tensor, Sequence[torch.Tensor]]) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    x = list(x)
    if not all(isinstance(t, torch.Tensor) for t in x):
        raise ValueError(f"{name} must be a tensor or a sequence of tensors; got {[type(t).__name__ for t in x]}")
    return x


def _check(teacher, student, alpha: float):
    ts, ss = _as_list("teacher", teacher), _as_list("student", student)
    if len(ts) != len(ss):
        raise ValueError(f"teacher and student must have equal length; got {len(ts)} and {len(ss)} tensors")
    for i, (t, s) in enumerate(zip(ts, ss)):
        if t.shape != s.shape or t.dtype != s.dtype or t.device != s.device:
            raise ValueError(
                f"teacher[{i}] and student[{i}] must match in shape, dtype and device; got "
                f"{tuple(t.shape)} {t.dtype} {t.device} and {tuple(s.shape)} {s.dtype} {s.device}"
            )
        if not t.is_floating_point():
            raise ValueError(f"teacher[{i}] must be a floating-point tensor; got {t.dtype}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha={alpha} is outside the allowed range [0, 1]")
    return ts, ss


@torch.no_grad()
def ema_reference_(teacher, student, alpha: float) -> None:
    """Plain-torch reference and CPU fallback: torch._foreach_lerp_ with weight 1 − α."""
    ts, ss = _check(teacher, student, alpha)
    if ts:
        torch._foreach_lerp_(ts, ss, 1.0 - float(alpha))


@torch.no_grad()
def ema_(teacher, student, alpha: float) -> None:
    """teacher ← α·teacher + (1−α)·student, in place, for a tensor or equal-length tensor lists.

    Naive alternative (what the fused launch replaces):
        for t, s in zip(teacher, student): t.mul_(alpha).add_(s, alpha=1 - alpha)
    """
    ts, ss = _check(teacher, student, alpha)
    if not ts or not use_triton(*ts, *ss):
        if ts:
            torch._foreach_lerp_(ts, ss, 1.0 - float(alpha))
        return
    ft, fs = _flat_view(ts), _flat_view(ss)
    if ft is not None and fs is not None:
        _launch(ft, fs, alpha)  # the rid case: one flat buffer, one launch
        return
    for t, s in zip(ts, ss):
        if not (t.is_contiguous() and s.is_contiguous()):
            # Strided tensors: update a contiguous copy, write it back.
            tc = t.contiguous()
            _launch(tc, s.contiguous(), alpha)
            t.copy_(tc)
        else:
            _launch(t, s, alpha)
