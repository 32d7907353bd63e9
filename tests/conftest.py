"""Fixtures shared by several test files, and the `gpu` marker's skip rule."""
import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Skip @pytest.mark.gpu tests without a CUDA GPU, or when TRITON_INTERPRET=1 would interpret Triton."""
    if not torch.cuda.is_available():
        reason = "needs a CUDA GPU"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        reason = "needs compiled Triton: unset TRITON_INTERPRET"
    else:
        return
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(params=["reference", "triton"])
def kernel_backend(request, monkeypatch):
    """Run a test with the chunked torch loss head and with the Triton kernel (interpreted on CPU)."""
    monkeypatch.setenv("DSEL_KERNELS", request.param)
    return request.param
