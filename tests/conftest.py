"""Shared pytest fixtures for the turboquant_hf test-suite."""

import pytest
import torch


@pytest.fixture
def generator() -> torch.Generator:
    """A freshly seeded CPU generator, so every test draws the same numbers on every run."""
    return torch.Generator(device="cpu").manual_seed(0)


@pytest.fixture(scope="module")
def one_cpu_thread():
    """One torch thread for a module of tiny models: their small matmuls only lose to OpenMP spin-waiting on a
    shared CPU. Use with ``pytestmark = pytest.mark.usefixtures("one_cpu_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
