"""The model the gradient-inversion attack (:mod:`commcomp.privacy.attack`) targets: DLG's
LeNet (Zhu et al. 2019, "Deep Leakage from Gradients") with **sigmoid** activations --
smooth, twice differentiable and with non-negative features, which is what DLG and iDLG's
label inference rely on (ReLU networks are much harder to invert this way)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..utils import validate


class LeNet(nn.Module):
    """DLG's LeNet: three 5x5 convolutions (stride 2, 2, 1) and one linear layer, sigmoid
    activations. For 1 x 28 x 28 inputs and width 12: 13,426 parameters.

    Args:
        channels: input channels (1 for MNIST).
        image_size: input height = width.
        num_classes: outputs.
        width: channels of every convolution (12 in DLG).
    """

    def __init__(self, channels: int = 1, image_size: int = 28, num_classes: int = 10,
                 width: int = 12):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(width, width, 5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(width, width, 5, padding=2, stride=1), nn.Sigmoid(),
        )
        side = (image_size + 1) // 2
        side = (side + 1) // 2
        self.fc = nn.Linear(width * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def make_attack_model(channels: int = 1, image_size: int = 28, num_classes: int = 10,
                      width: int = 12, seed: int = 0) -> LeNet:
    """A :class:`LeNet` with weights drawn U(-0.5, 0.5) from a private generator (DLG's
    initialization: an untrained model, the first step of training, is the easiest
    target). Deterministic in ``seed``; the global RNG is left as it was."""
    gen = torch.Generator().manual_seed(validate.seed(seed, "seed"))
    with torch.random.fork_rng(devices=[]):  # nn init draws from the global RNG; restore it
        model = LeNet(channels, image_size, num_classes, width)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 0.5, generator=gen)
    return model


def num_params(model: nn.Module) -> int:
    """Length of the flat gradient the message is built from."""
    return sum(p.numel() for p in model.parameters())


__all__ = ["LeNet", "make_attack_model", "num_params"]
