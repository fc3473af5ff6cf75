"""kernels.ema_ against torch._foreach_lerp_ and the written-out formula (oracles)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels is imported: the Triton path on CPU

import pytest
import torch

import kernels
import kernels.ema as ema_mod

ALPHAS = [0.0, 0.3, 0.5, 0.9, 0.99, 0.999, 1.0]


def _flat_pair(sizes, dtype=torch.float32, seed=0):
    """Teacher and student as views into one buffer each, as rid's AdapterGroup stores them."""
    g = torch.Generator().manual_seed(seed)
    n = sum(torch.Size(s).numel() for s in sizes)
    bt, bs = torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)

    def views(buf):
        out, o = [], 0
        for s in sizes:
            k = torch.Size(s).numel()
            out.append(buf[o:o + k].view(s))
            o += k
        return out

    return bt, bs, views(bt), views(bs)


SIZES = [(4, 37), (53, 4), (3,), (1029,)]  # odd sizes, a tail that is not a multiple of BLOCK


@pytest.mark.parametrize("mode", ["triton", "torch"])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_bit_exact_vs_foreach_lerp(monkeypatch, mode, alpha):
    monkeypatch.setenv("RID_KERNELS", mode)
    _, _, ts, ss = _flat_pair(SIZES)
    expect = [t.clone() for t in ts]
    torch._foreach_lerp_(expect, ss, 1.0 - alpha)
    kernels.ema_(ts, ss, alpha)
    for t, e in zip(ts, expect):
        assert torch.equal(t, e)


@pytest.mark.parametrize("mode", ["triton", "torch"])
def test_matches_formula(monkeypatch, mode):
    """α·teacher + (1−α)·student, evaluated in float64 as the oracle: within one fp32 rounding."""
    monkeypatch.setenv("RID_KERNELS", mode)
    t0, s0 = torch.randn(777), torch.randn(777)
    for alpha in ALPHAS:
        t = t0.clone()
        kernels.ema_(t, s0, alpha)
        expect = alpha * t0.double() + (1 - alpha) * s0.double()
        assert torch.allclose(t.double(), expect, rtol=0, atol=4 * torch.finfo(torch.float32).eps * 4)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2**-7), (torch.float16, 2**-10)])
def test_half_dtypes(monkeypatch, dtype, tol):
    monkeypatch.setenv("RID_KERNELS", "triton")
    _, _, ts, ss = _flat_pair(SIZES, dtype=dtype)
    expect = [(0.9 * t.float() + 0.1 * s.float()) for t, s in zip(ts, ss)]
    kernels.ema_(ts, ss, 0.9)
    for t, e in zip(ts, expect):
        assert t.dtype == dtype
        assert torch.allclose(t.float(), e, atol=1e-3, rtol=tol)  # one rounding to the storage dtype


def test_one_launch_for_a_flat_buffer(monkeypatch):
    """Adjacent views of one storage collapse to a single launch; unrelated tensors do not."""
    monkeypatch.setenv("RID_KERNELS", "triton")
    calls = []
    real = ema_mod._launch
    monkeypatch.setattr(ema_mod, "_launch", lambda t, s, a: (calls.append(t.numel()), real(t, s, a)))
    bt, _, ts, ss = _flat_pair(SIZES)
    kernels.ema_(ts, ss, 0.99)
    assert calls == [bt.numel()]
    calls.clear()
    separate_t = [torch.randn(5), torch.randn(7)]
    kernels.ema_(separate_t, [torch.randn(5), torch.randn(7)], 0.99)
    assert calls == [5, 7]


def test_non_contiguous_tensor(monkeypatch):
    monkeypatch.setenv("RID_KERNELS", "triton")
    t = torch.randn(6, 8)[:, ::2]
    s = torch.randn(6, 4)
    expect = t.clone()
    torch._foreach_lerp_([expect], [s], 0.25)
    kernels.ema_(t, s, 0.75)
    assert torch.equal(t, expect)


def test_bad_input():
    with pytest.raises(ValueError, match="alpha=1.5"):
        kernels.ema_(torch.zeros(3), torch.zeros(3), 1.5)
    with pytest.raises(ValueError, match="equal length"):
        kernels.ema_([torch.zeros(3)], [torch.zeros(3), torch.zeros(2)], 0.5)
    with pytest.raises(ValueError, match=r"teacher\[0\] and student\[0\]"):
        kernels.ema_(torch.zeros(3), torch.zeros(4), 0.5)
    with pytest.raises(ValueError, match="floating-point"):
        kernels.ema_(torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), 0.5)


def test_bad_mode(monkeypatch):
    monkeypatch.setenv("RID_KERNELS", "cuda")
    with pytest.raises(ValueError, match="RID_KERNELS='cuda'.*auto, triton, torch"):
        kernels.ema_(torch.zeros(3), torch.zeros(3), 0.5)
