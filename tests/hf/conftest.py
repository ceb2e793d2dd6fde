"""Fixtures for the Hugging Face export tests."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_inputs():
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(3, 256, (2, 9), generator=g)
    am = torch.ones(2, 9, dtype=torch.long)
    am[1, :3] = 0  # left padding in the second row
    ids[1, :3] = 1  # pad token
    return ids, am
