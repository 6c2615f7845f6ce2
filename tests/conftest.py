"""Shared fixtures. Environment first: Triton's interpreter must be chosen before any
``@triton.jit`` decorator runs, and one thread keeps tiny CPU jobs from swinging 50x."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(1)

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible")


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
