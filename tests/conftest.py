"""Shared test setup.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, so it is set here, at the
top of the root conftest, before any genkv module is imported. On CPU the Triton interpreter runs the
kernels; it computes bf16 wrongly, so kernel tests use fp16/fp32 there.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield
