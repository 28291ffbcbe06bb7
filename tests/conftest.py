"""Test setup: run the real Triton kernels through Triton's interpreter when there is no GPU.

TRITON_INTERPRET must be set before the first `import triton` anywhere in the process
(importing diffusers or torch._dynamo imports triton too), so it is set here, at the top of
the first file pytest imports.
"""
import os

import pytest

if not os.environ.get("FASTDIFF_TEST_CUDA"):
    # Without a GPU the kernels can only run through the interpreter. With FASTDIFF_TEST_CUDA=1
    # (the GPU machine) they are compiled and run on the device instead.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# The tests use small tensors, where intra-op threads only add synchronisation; on a shared
# 2-core machine a second thread that is descheduled made an 8x8 convolution 40x slower.
torch.set_num_threads(int(os.environ.get("FASTDIFF_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    """The device the kernels run on: CUDA when present, else the CPU via the interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
