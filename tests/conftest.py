"""Shared pytest fixtures for the turboquant_hf test-suite."""

import pytest
import torch


@pytest.fixture
def generator() -> torch.Generator:
    """A freshly seeded CPU generator, so every test draws the same numbers on every run."""
    return torch.Generator(device="cpu").manual_seed(0)
