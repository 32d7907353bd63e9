"""Fixtures shared by several test files."""
import pytest


@pytest.fixture(params=["reference", "triton"])
def kernel_backend(request, monkeypatch):
    """Run a test with the chunked torch loss head and with the Triton kernel (interpreted on CPU)."""
    monkeypatch.setenv("DSEL_KERNELS", request.param)
    return request.param
