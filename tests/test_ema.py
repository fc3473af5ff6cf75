"""rid_kernels.ema_ against torch._foreach_lerp_ and the written-out formula (oracles)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before rid_kernels is imported: the Triton path on CPU

import pytest
import torch

import rid_kernels
import rid_kernels.ema as ema_mod

ALPHAS = [0.0, 0.3, 0.5, 0.9, 0.99, 0.999, 1.0]
N = 4 * 37 + 53 * 4 + 3 + 1029  # odd total, a tail that is not a multiple of the kernel's BLOCK


def _pair(n=N, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)


@pytest.mark.parametrize("mode", ["triton", "torch"])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_bit_exact_vs_foreach_lerp(monkeypatch, mode, alpha):
    monkeypatch.setenv("RID_KERNELS", mode)
    t, s = _pair()
    expect = [t.clone()]
    torch._foreach_lerp_(expect, [s], 1.0 - alpha)
    rid_kernels.ema_(t, s, alpha)
    assert torch.equal(t, expect[0])


@pytest.mark.parametrize("mode", ["triton", "torch"])
def test_matches_formula(monkeypatch, mode):
    """α·teacher + (1−α)·student, evaluated in float64 as the oracle: within one fp32 rounding."""
    monkeypatch.setenv("RID_KERNELS", mode)
    t0, s0 = _pair(777)
    for alpha in ALPHAS:
        t = t0.clone()
        rid_kernels.ema_(t, s0, alpha)
        expect = alpha * t0.double() + (1 - alpha) * s0.double()
        assert torch.allclose(t.double(), expect, rtol=0, atol=4 * torch.finfo(torch.float32).eps * 4)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2**-7), (torch.float16, 2**-10)])
def test_half_dtypes(monkeypatch, dtype, tol):
    monkeypatch.setenv("RID_KERNELS", "triton")
    t, s = _pair(dtype=dtype)
    expect = 0.9 * t.float() + 0.1 * s.float()
    rid_kernels.ema_(t, s, 0.9)
    assert t.dtype == dtype
    assert torch.allclose(t.float(), expect, atol=1e-3, rtol=tol)  # one rounding to the storage dtype


def test_one_launch_over_the_flat_buffer(monkeypatch):
    monkeypatch.setenv("RID_KERNELS", "triton")
    calls = []
    real = ema_mod._launch
    monkeypatch.setattr(ema_mod, "_launch", lambda t, s, a: (calls.append(t.numel()), real(t, s, a)))
    t, s = _pair()
    rid_kernels.ema_(t, s, 0.99)
    assert calls == [N]


def test_launcher_refuses_what_it_would_read_out_of_bounds(monkeypatch):
    """The kernel treats both buffers as flat arrays of teacher.numel() elements."""
    monkeypatch.setenv("RID_KERNELS", "triton")
    with pytest.raises(ValueError, match=r"one shape.*\(3,\).*\(4,\)"):
        rid_kernels.ema_(torch.zeros(3), torch.zeros(4), 0.5)
    with pytest.raises(ValueError, match="contiguous"):
        rid_kernels.ema_(torch.zeros(6, 8)[:, ::2], torch.zeros(6, 4), 0.5)
    with pytest.raises(ValueError, match="float16"):
        rid_kernels.ema_(torch.zeros(3), torch.zeros(3, dtype=torch.float16), 0.5)


def test_bad_mode(monkeypatch):
    monkeypatch.setenv("RID_KERNELS", "cuda")
    with pytest.raises(ValueError, match="RID_KERNELS='cuda'.*auto, triton, torch"):
        rid_kernels.ema_(torch.zeros(3), torch.zeros(3), 0.5)
