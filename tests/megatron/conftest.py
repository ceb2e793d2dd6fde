"""Fixtures of the megatron-core integration tests."""

import pytest


@pytest.fixture(scope="module")
def model_parallel():
    """A single-process group and megatron's parallel state at TP=1, PP=1 for the module's tests (seed 1234);
    tests/conftest.py tears it down after the module."""
    from megatron_outeff.megatron.parallel import init_model_parallel

    init_model_parallel(1, 1, seed=1234)
    yield
