"""Test-session set-up shared by every test.

On a machine without CUDA the Triton kernels run under the Triton interpreter, which must be
switched on before any kernel is decorated, so it is set here before the package is imported.
GPU-only tests carry the `gpu` marker and are skipped without CUDA.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (compiled Triton)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
