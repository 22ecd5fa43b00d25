"""Shared fixtures: small seeded networks and random sources.

Every fixture builds its objects from a fixed seed without touching the global random
state, so tests can run in any order and still see the same numbers.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from torch import nn

SEED = 1234

# The tests use small tensors, where intra-op threads only add overhead, and a second
# thread per process thrashes when several test processes share a small machine.
torch.set_num_threads(1)

# Without a GPU, the Triton kernels run in Triton's interpreter (tests/test_cuda_kernels.py).
# Triton reads this switch when it is first imported, and torch imports it along with
# torch._dynamo (an optimiser's first step does), so it is set before any test runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _seeded(build: Callable[[], nn.Module], seed: int = SEED) -> nn.Module:
    """Build a module with its parameters drawn from ``seed``, leaving the global RNG alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


@pytest.fixture
def seeded_generator() -> torch.Generator:
    """A CPU generator seeded with the same value for every test."""
    return torch.Generator().manual_seed(SEED)


@pytest.fixture
def seeded_mlp() -> nn.Module:
    """``Linear(4, 8) -> ReLU -> Linear(8, 3)``, seeded."""
    return _seeded(lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))


@pytest.fixture
def seeded_convnet() -> nn.Module:
    """A small conv net with a norm layer: input ``(N, 1, 6, 6)``, output ``(N, 2)``, seeded."""
    return _seeded(
        lambda: nn.Sequential(
            nn.Conv2d(1, 4, kernel_size=3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 4 * 4, 2),
        )
    )


@pytest.fixture
def cuda_device() -> torch.device:
    """The first CUDA device; skips the test where there is none."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")
