"""rid_kernels.lora_group_linear: the Triton path (under the interpreter on CPU) and the plain-torch
reference, each against an independent oracle — torch autograd on the unfused formula (a Python
loop over adapters) in float64 — and against each other.

Shapes are deliberately awkward (in=37, out=53, tokens 2×5×7 = 70 rows over three 32-row blocks) and
tiny: the interpreter runs in numpy. Total ranks cover both kernel modes: R ≤ 16 (the shrink fused into
the K-loop: 4, and 16 = 3 + 9 + 4 filling the rank block) and R > 16 (h streamed in 16-wide chunks:
20 = 3 + 13 + 4, and 36, 100 — not multiples of the chunk, with a last chunk part-masked).
"""
import pytest
import torch

import rid_kernels  # conftest.py has set TRITON_INTERPRET=1 before this import on a machine without a GPU
from rid_kernels import lora_group_linear, lora_group_reference

IN, OUT, LEAD = 37, 53, (2, 5, 7)
RANKS = {0: (), 1: (4,), 3: (3, 13, 4)}  # T → ranks; the middle 13 stands for a pre-concatenated frozen block
# total rank R → ranks, frozen blocks first and the current adapter last (T = 3 scales 0.5, 1, 2)
GROUPS = {4: (4,), 16: (3, 9, 4), 20: (3, 13, 4), 36: (16, 16, 4), 100: (64, 32, 4)}
# max |a − oracle| / max |oracle|; bf16 keeps 8 mantissa bits, and h is rounded to x.dtype as under autocast
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

pytestmark = pytest.mark.skipif(
    not rid_kernels.HAS_TRITON or not (rid_kernels.INTERPRET or torch.cuda.is_available()),
    reason="the Triton path needs triton and either a GPU or TRITON_INTERPRET=1 set before rid_kernels was imported",
)


@pytest.fixture(autouse=True)
def triton_mode(monkeypatch):
    monkeypatch.setenv("RID_KERNELS", "triton")  # kernel_mode() re-reads the env on every call


def naive(x, weight, bias, As, Bs, scales):
    """The unfused formula: base linear plus one LoRA per adapter, looped."""
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    for A, B, s in zip(As, Bs, scales):
        y = y + s * ((x @ A.T) @ B.T)
    return y


def make(T, dtype, adapter_dtype=None, lead=LEAD, bias=True, trainable="last", seed=0, ranks=None):
    """Inputs as rid uses them: x and the current (last) adapter train, W, b and older adapters frozen.
    ranks overrides RANKS[T]."""
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(dt)

    x = rand(*lead, IN).requires_grad_()
    weight = rand(OUT, IN, scale=IN ** -0.5)
    b = rand(OUT, scale=0.1) if bias else None
    ranks = RANKS[T] if ranks is None else ranks
    T = len(ranks)
    As = [rand(r, IN, scale=IN ** -0.5, dt=adapter_dtype) for r in ranks]
    Bs = [rand(OUT, r, scale=r ** -0.5, dt=adapter_dtype) for r in ranks]
    for i in range(T):
        if trainable == "all" or (trainable == "last" and i == T - 1):
            As[i].requires_grad_()
            Bs[i].requires_grad_()
    scales = [0.5, 1.0, 2.0][:T] if T == 3 else [1.5] * T
    dy = rand(*lead, OUT)
    return x, weight, b, As, Bs, scales, dy


def run(fn, x, weight, bias, As, Bs, scales, dy, double=False):
    """Fresh leaf copies (same requires_grad), forward, backward with dy; returns y and grads."""
    def leaf(t):
        if t is None:
            return None
        c = t.detach().clone()
        c = c.double() if double else c
        return c.requires_grad_(t.requires_grad)

    ins = [leaf(x), leaf(weight), leaf(bias)] + [leaf(a) for a in As] + [leaf(b) for b in Bs]
    T = len(As)
    y = fn(ins[0], ins[1], ins[2], ins[3:3 + T], ins[3 + T:], scales)
    y.backward(dy.double() if double else dy)
    return y, [None if t is None else t.grad for t in ins]


def ran_kernel(y):
    """True when y's autograd graph holds the Triton op's Function (below the reshape back to (..., out))."""
    fn = y.grad_fn
    for _ in range(3):
        if fn is None:
            return False
        if "LoRAGroupLinear" in type(fn).__name__:
            return True
        fn = fn.next_functions[0][0] if fn.next_functions else None
    return False


def rel_err(a, ref):
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-12)).item()


def check_against_oracles(args, tol):
    y_k, g_k = run(lora_group_linear, *args)
    y_r, g_r = run(lora_group_reference, *args)
    y_o, g_o = run(naive, *args, double=True)
    x = args[0]
    assert y_k.dtype == x.dtype and y_k.shape == y_o.shape
    assert ran_kernel(y_k)
    assert rel_err(y_k, y_o) < tol and rel_err(y_r, y_o) < tol
    assert rel_err(y_k, y_r) < tol
    inputs = [args[0], args[1], args[2], *args[3], *args[4]]
    for i, (t, gk, gr, go) in enumerate(zip(inputs, g_k, g_r, g_o)):
        if t is None or not t.requires_grad:
            assert gk is None and gr is None, f"input {i} is frozen but got a gradient"
            continue
        assert gk is not None, f"input {i} requires grad but got none"
        assert gk.dtype == t.dtype and gk.shape == t.shape, f"input {i}: grad {gk.dtype} {tuple(gk.shape)}"
        assert rel_err(gk, go) < tol, f"input {i}: kernel grad off by {rel_err(gk, go):.2e}"
        assert rel_err(gr, go) < tol, f"input {i}: reference grad off by {rel_err(gr, go):.2e}"
        assert rel_err(gk, gr) < tol, f"input {i}: kernel vs reference {rel_err(gk, gr):.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [0, 1, 3])
def test_forward_and_grads_match_oracles(T, dtype):
    check_against_oracles(make(T, dtype), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("R", [16, 36, 100])
def test_rank_tiling_forward_and_grads_match_oracles(R, dtype, monkeypatch):
    """R ≤ RANK_TILE fuses the shrink; larger R streams h in RANK_TILE chunks (36 = 2 full + 4, 100 = 6 full
    + 4): forward and every gradient against the float64 loop, with every input trainable, at the mode the
    launcher must pick."""
    import rid_kernels.lora_group as lg

    modes = []
    real = lg.lora_group_kernel.run
    monkeypatch.setattr(lg.lora_group_kernel, "run", lambda *a, **k: modes.append(k["FUSE_SHRINK"]) or real(*a, **k))
    x, w, b, As, Bs, s, dy = make(3, dtype, ranks=GROUPS[R], trainable="all", seed=R)
    w.requires_grad_()
    check_against_oracles((x, w, b, As, Bs, s, dy), TOL[dtype])
    assert sum(a.shape[0] for a in As) == R
    assert modes == [R <= lg.RANK_TILE] * 2  # the forward's launch and dx's
    check_against_oracles(make(3, torch.bfloat16, torch.float32, ranks=GROUPS[R], seed=R), TOL[torch.bfloat16])


def test_unit_scales_skip_the_scale_pass_and_give_the_same_bits():
    """Every scale 1 (rid's default) passes s_rep=None: the reference skips h ⊙ s_rep, which changes no
    bit (h · 1.0 == h), and the result still matches the oracles; a single non-unit scale brings it back."""
    from rid_kernels.lora_group import lora_group_cat_reference

    x, w, b, As, Bs, _, dy = make(3, torch.float32, seed=2)
    unit = [1.0, 1.0, 1.0]
    check_against_oracles((x, w, b, As, Bs, unit, dy), TOL[torch.float32])
    A_cat, B_cat = torch.cat(As).detach(), torch.cat(Bs, 1).detach()
    with torch.no_grad():
        skipped = lora_group_cat_reference(x, w, b, A_cat, B_cat, None)
        ones = lora_group_cat_reference(x, w, b, A_cat, B_cat, torch.ones(A_cat.shape[0]))
        assert torch.equal(skipped, ones)
        assert torch.equal(lora_group_reference(x, w, b, As, Bs, unit), skipped)
        halved = lora_group_reference(x, w, b, As, Bs, [1.0, 1.0, 0.5])
        assert not torch.equal(halved, skipped)
        expected = naive(x.double(), w.double(), b.double(), [a.double() for a in As], [m.double() for m in Bs],
                         [1.0, 1.0, 0.5])
        assert rel_err(halved, expected) < TOL[torch.float32]


def test_every_input_trainable_2d_no_bias():
    # W, b and every adapter require grad here (rid freezes them, but the op must not assume it).
    x, w, _, As, Bs, s, dy = make(3, torch.float32, lead=(41,), trainable="all", seed=1)
    w.requires_grad_()
    b = torch.randn(OUT).requires_grad_()
    check_against_oracles((x, w, b, As, Bs, s, dy), TOL[torch.float32])
    check_against_oracles((x, w, None, As, Bs, s, dy), TOL[torch.float32])


def test_bf16_base_fp32_adapters():
    # DRaFT: bf16 x/W/b, fp32 LoRA. y is bf16; the fp32 adapters get fp32 gradients.
    args = make(3, torch.bfloat16, adapter_dtype=torch.float32, seed=2)
    check_against_oracles(args, TOL[torch.bfloat16])


def test_only_adapters_train():
    # x not requiring grad (first layer of a frozen model): adapter grads without a dx pass.
    x, w, b, As, Bs, s, dy = make(3, torch.float32, seed=3)
    x.requires_grad_(False)
    check_against_oracles((x, w, b, As, Bs, s, dy), TOL[torch.float32])


def test_non_contiguous_x():
    x, w, b, As, Bs, s, dy = make(3, torch.float32, lead=(3, 9), seed=4)
    xt = torch.randn(IN, 9, 3).permute(2, 1, 0).requires_grad_()  # (3, 9, IN), inner stride 27
    assert not xt.is_contiguous()
    y_k = lora_group_linear(xt, w, b, As, Bs, s)
    y_o = naive(xt.double(), w.double(), b.double(), [a.double() for a in As], [bb.double() for bb in Bs], s)
    assert rel_err(y_k, y_o) < TOL[torch.float32]
    (gk,) = torch.autograd.grad(y_k, xt, dy)
    (go,) = torch.autograd.grad(y_o, xt, dy.double())
    assert rel_err(gk, go) < TOL[torch.float32]


def test_no_grad_forward(monkeypatch):
    # Sampling runs under no_grad with the current adapter still requiring grad: no h is saved.
    import rid_kernels.lora_group as lg

    stored = []
    fused = lg.launch
    monkeypatch.setattr(lg, "launch", lambda *a, store_h: stored.append(store_h) or fused(*a, store_h=store_h))
    x, w, b, As, Bs, s, _ = make(3, torch.float32, seed=5)
    with torch.no_grad():
        y = lora_group_linear(x, w, b, As, Bs, s)
    assert y.grad_fn is None and stored == [False]
    assert rel_err(y, naive(x.double(), w.double(), b.double(), [a.double() for a in As],
                            [bb.double() for bb in Bs], s)) < TOL[torch.float32]


def test_torch_mode_uses_reference(monkeypatch):
    monkeypatch.setenv("RID_KERNELS", "torch")
    x, w, b, As, Bs, s, _ = make(1, torch.float32, seed=6)
    y = lora_group_linear(x, w, b, As, Bs, s)
    assert not ran_kernel(y)
    assert torch.equal(y, lora_group_reference(x, w, b, As, Bs, s))


def _bad(**over):
    x, w, b, As, Bs, s, _ = make(1, torch.float32)
    kw = dict(x=x, weight=w, bias=b, As=As, Bs=Bs, scales=s)
    kw.update(over)
    return kw


@pytest.mark.parametrize("fn", [lora_group_linear, lora_group_reference], ids=["kernel", "reference"])
@pytest.mark.parametrize("over, match", [
    (dict(x=torch.randn(4, IN + 1)), rf"x has last dim {IN + 1}.*\(\.\.\., {IN}\)"),
    (dict(weight=torch.randn(OUT)), r"weight must be .*\(out, in\)"),
    (dict(bias=torch.randn(OUT + 2)), rf"bias .*\({OUT},\).*\({OUT + 2},\)"),
    (dict(As=[torch.randn(4, IN + 3)], Bs=[torch.randn(OUT, 4)]), rf"As\[0\] has shape \(4, {IN + 3}\)"),
    (dict(As=[torch.randn(4, IN)], Bs=[torch.randn(OUT, 5)]), r"rank mismatch: As\[0\].*rank 4.*Bs\[0\].*rank 5"),
    (dict(Bs=[torch.randn(OUT - 1, 4)]), rf"Bs\[0\] has shape \({OUT - 1}, 4\).*\({OUT}, r\)"),
    (dict(scales=[1.0, 2.0]), r"scales has 2 entries; allowed: one per adapter \(1\)"),
    (dict(Bs=[]), r"As and Bs must have equal length"),
    (dict(scales=["big"]), r"scales must be a sequence of floats"),
])
def test_bad_input_names_argument(fn, over, match):
    with pytest.raises(ValueError, match=match):
        fn(**_bad(**over))
