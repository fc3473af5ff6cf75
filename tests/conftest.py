"""Test-session set-up shared by every test file.

The Triton interpreter must be chosen before any kernel is decorated, i.e. before `rid_kernels` is
imported; without a GPU the kernel tests run the Triton path through it (RID_KERNELS=triton is
set per test with monkeypatch, since rid_kernels.kernel_mode() re-reads it on every call).
"""
import os

# MKL's GEMMs may round differently depending on buffer alignment (no Conditional Numerical
# Reproducibility by default); the bit-exact resume tests need run-to-run identical matmuls.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
# One OpenMP thread per process, for every process the tests start too (train.py, eval.py, torchrun
# workers inherit it): the pytest-xdist workers already fill the cores, and OpenMP threads that spin
# on an oversubscribed machine (or a container whose CPU quota is below its visible core count) make
# a tiny-model run 10-50x slower. Measured: eval.py at 0.16 img/s with 2 threads beside 4 busy
# processes on 2 cores, 13 img/s with 1.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# One intra-op thread per pytest-xdist worker; a single-process run (-n 0) takes up to two when
# OMP_NUM_THREADS says so.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, torch.get_num_threads())))


import copy  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model runs, and for its subprocesses (they inherit the
    count through OMP_NUM_THREADS): bit-exact comparisons across processes, and much faster than
    contended OpenMP threads on a shared machine. Modules opt in with usefixtures("one_thread")."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    """tests/tiny.py's tiny SD, saved once per module."""
    from tiny import tiny_sd

    return tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def _loaded(sd_path):
    import rid

    return rid.load_models(sd_path)


@pytest.fixture
def models(_loaded):
    """A fresh copy of the tiny SD per test (tests inject adapters in place)."""
    return copy.deepcopy(_loaded)


@pytest.fixture(scope="session")
def small_flow(tmp_path_factory):
    """The reduced mini flow world (`python -m mini build-flow --small`), built once per session (per
    pytest-xdist worker); skipped while the mini world it is built from is missing."""
    import mini
    from mini.__main__ import main

    if not (mini.WORLD / "world.json").exists():
        pytest.skip("mini/world not built yet")
    out = tmp_path_factory.mktemp("mini_flow") / "flow"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as one_thread: the build is bit-exact for a given thread count
    try:
        assert main(["build-flow", "--small", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(before)
    return out
