import gc
import os

import pytest

# One thread per test process: the tests' tensors are tiny, so a second thread buys nothing and,
# on a busy 2-core machine, makes small kernels (BatchNorm's backward) many times slower.
# Subprocesses and the distributed workers the tests start use one thread too.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return  # pytest-xdist's controller runs no test: its workers start without waiting for torch here
    import torch

    torch.set_num_threads(1)
    # torch 2.13's CPU convolution backward through oneDNN corrupted the heap in the test process
    # ("double free or corruption" in mkldnn_convolution_backward_weights, with the RGB tests' small
    # ResNets; not reproduced by the same model in a standalone loop): torch's native kernels here.
    torch.backends.mkldnn.enabled = False


@pytest.fixture
def fused_only(monkeypatch):
    """Every dense loss through its fused kernel, however small the batch."""
    import negbatch.losses._layout as layout

    monkeypatch.setattr(layout, "SMALL_DENSE_LOGITS", 0)


@pytest.fixture(params=["fused", "small"])
def dense_path(request, monkeypatch):
    """Both ways of a dense loss: the fused kernels (large banks) and, below
    ``SMALL_DENSE_LOGITS``, autograd on the logits (a plain call's short path)."""
    import negbatch.losses._layout as layout

    monkeypatch.setattr(layout, "SMALL_DENSE_LOGITS", 0 if request.param == "fused" else 1 << 30)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    # A pytest-xdist worker ends with its session: freeze what is left, so that the interpreter's last
    # garbage collections at exit skip it. They walked the whole heap of torch, transformers and the
    # tests' objects, for memory the OS takes back anyway: seconds per worker, which the controller
    # waits for before it reports. Only workers: a process calling pytest.main() may live on.
    if hasattr(config, "workerinput"):
        gc.freeze()
