"""A small model and per-rank batches shared by the hook tests: every rank can recompute
every other rank's local gradient, so a hook's result can be checked exactly."""

import torch
from torch import nn


def make_model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 25), nn.ReLU(), nn.Linear(25, 5)).to(dtype)


def rank_batch(rank, dtype=torch.float32):
    g = torch.Generator().manual_seed(rank)
    return torch.randn(16, 20, generator=g).to(dtype), torch.randn(16, 5, generator=g).to(dtype)


def local_grads(model, rank, dtype=torch.float32):
    model.zero_grad()
    x, y = rank_batch(rank, dtype)
    ((model(x) - y) ** 2).mean().backward()
    return [p.grad.detach().float().clone() for p in model.parameters()]


def true_mean(world, dtype=torch.float32):
    """mean_r of every rank's local gradient, computed on this rank without DDP."""
    model = make_model(dtype)
    per_rank = [local_grads(model, r, dtype) for r in range(world)]
    return [torch.stack(gs).mean(0) for gs in zip(*per_rank)], per_rank
