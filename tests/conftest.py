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


@pytest.fixture
def host_reads(monkeypatch):
    """Records every tensor method that reads a value back to the host (``.item()``, ``int()``,
    ``float()``, ``bool()``, ``.nonzero()``, ``.tolist()``, ``.cpu()``, ``.numpy()``) while the test
    runs; ``host_reads.stop()`` ends the recording and returns the names seen."""
    calls = []
    for name in ("item", "__int__", "__float__", "__bool__", "nonzero", "tolist", "cpu", "numpy"):
        orig = getattr(torch.Tensor, name)

        def spy(*a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(*a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)

    class Reads(list):
        def stop(self):
            monkeypatch.undo()
            return list(calls)

    return Reads()
