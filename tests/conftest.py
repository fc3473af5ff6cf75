"""Test-session set-up shared by every test file.

The Triton interpreter must be chosen before any kernel is decorated, i.e. before `kernels` is
imported; without a GPU the kernel tests run the Triton path through it (RID_KERNELS=triton is
set per test with monkeypatch, since kernels.kernel_mode() re-reads it on every call).
"""
import os

# MKL's GEMMs may round differently depending on buffer alignment (no Conditional Numerical
# Reproducibility by default); the bit-exact resume tests need run-to-run identical matmuls.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# One intra-op thread per pytest-xdist worker (the workers already fill the cores), else up to two.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, torch.get_num_threads())))
