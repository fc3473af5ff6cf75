"""rid's three kernels, each a Triton kernel beside its plain-torch reference.

    lora_group_linear(x, weight, bias, As, Bs, scales)  y = xWᵀ + b + Σ s_i (xA_iᵀ)B_iᵀ
    jpeg(img, quality)                                   differentiable JPEG round trip
    ema_(teacher, student, alpha)                        teacher ← α·teacher + (1−α)·student, flat buffers

Dispatch is chosen by the environment variable RID_KERNELS:
    auto   (default) Triton for CUDA tensors, the plain-torch reference otherwise
    triton force Triton; on a CPU it runs under the Triton interpreter (TRITON_INTERPRET=1,
           set here before any kernel is decorated when no GPU is present)
    torch  force the reference
The kernel functions read it at every call; rid's LoRA layers once per change of their adapter
group's tasks or scales (rid.AdapterGroup._kernel), not at each of their 128 × N calls per sample.
"""
import os

import torch

_MODES = ("auto", "triton", "torch")


def kernel_mode() -> str:
    mode = os.environ.get("RID_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"RID_KERNELS={mode!r} is not a kernel mode; allowed: {', '.join(_MODES)}")
    return mode


# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when the kernel modules below are
# imported; forcing Triton on a machine without a GPU therefore has to set it now.
if kernel_mode() == "triton" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401  (the Linux torch wheels ship it; elsewhere the references run)

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the platform
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton path should run for these tensors (see the module docstring)."""
    mode = kernel_mode()
    if mode == "torch":
        return False
    if mode == "triton":
        if not HAS_TRITON:
            raise ValueError("RID_KERNELS=triton but triton is not installed; use RID_KERNELS=auto or torch")
        on_cpu = any(not t.is_cuda for t in tensors)
        if on_cpu and not INTERPRET:
            raise ValueError(
                "RID_KERNELS=triton with CPU tensors needs TRITON_INTERPRET=1 set before rid's kernels "
                "are imported (the Triton interpreter); allowed otherwise: RID_KERNELS=auto or torch"
            )
        return True
    if INTERPRET or not HAS_TRITON:
        return False
    for t in tensors:
        if not t.is_cuda:
            return False
    return True


from .ema import ema_, ema_reference_  # noqa: E402
from .jpeg import jpeg, jpeg_reference, quality_tables  # noqa: E402
from .lora_group import lora_group_cat_reference, lora_group_linear, lora_group_reference  # noqa: E402

__all__ = [
    "kernel_mode", "use_triton", "HAS_TRITON", "INTERPRET",
    "lora_group_linear", "lora_group_reference", "lora_group_cat_reference",
    "jpeg", "jpeg_reference", "quality_tables",
    "ema_", "ema_reference_",
]
