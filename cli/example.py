"""The example network that ``rockq demo`` quantises: small, deterministic, torch-only."""

from __future__ import annotations

from typing import Any


def build_example(seed: int = 0) -> Any:
    """A small convolutional classifier for 8x8 single-channel images, seeded.

    It uses only torch's own layers, so its whole-module file loads through the safe
    loader without ``--trust``.
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 8, kernel_size=3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )
    net.eval()
    return net
