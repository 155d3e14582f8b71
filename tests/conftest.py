import os

import pytest
import torch

# One thread per test process: the tests' tensors are tiny, so a second thread buys nothing and,
# on a busy 2-core machine, makes small kernels (BatchNorm's backward) many times slower.
# Subprocesses and the distributed workers the tests start use one thread too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)

