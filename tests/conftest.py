import os

import pytest
import torch

# One thread per test process: the tests' tensors are tiny, so a second thread buys nothing and,
# on a busy 2-core machine, makes small kernels (BatchNorm's backward) many times slower.
# Subprocesses and the distributed workers the tests start use one thread too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
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
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)

