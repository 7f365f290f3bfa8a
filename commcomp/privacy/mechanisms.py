"""The pieces of a Gaussian mechanism: L2 clipping and per-rank noise.

Noise must be unpredictable to everyone but its own rank: each rank draws it from its own
generator, seeded from the operating system's entropy unless a seed is given (only for
reproducible experiments: whoever knows the seed can subtract the noise). It never touches
the global RNG and is independent of any shared (sketch) seed.
"""

from __future__ import annotations

import secrets
from typing import Dict, Iterable, Optional

import torch

from commcomp.hooks._common import mix_seed


def clip_coefficient(norm: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """``min(1, clip_norm / norm)`` as a tensor (no host sync); 1 for a zero norm."""
    return torch.clamp(clip_norm / norm, max=1.0)


class NoiseSource:
    """Gaussian noise from a private generator per device.

    Args:
        seed: ``None`` (default) draws 63 bits from ``secrets``; an int makes runs repeatable
            (give each rank its own, e.g. ``mix_seed(seed, rank)``).
    """

    def __init__(self, seed: Optional[int] = None):
        self.seed = secrets.randbits(63) if seed is None else int(seed)
        self._generators: Dict[torch.device, torch.Generator] = {}

    def generator(self, device) -> torch.Generator:
        dev = torch.device(device)
        if dev not in self._generators:
            self._generators[dev] = torch.Generator(device=dev).manual_seed(mix_seed(self.seed, 0x4E4F4953))
        return self._generators[dev]

    def gaussian(self, n: int, std: float, device) -> torch.Tensor:
        """``n`` float32 samples of N(0, std^2)."""
        z = torch.randn(n, generator=self.generator(device), device=device, dtype=torch.float32)
        return z.mul_(std)


def clip_per_sample_(params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Record-level clipping on top of Opacus' per-sample gradients.

    For parameters carrying ``p.grad_sample`` (``[B, *p.shape]``, as written by
    ``opacus.GradSampleModule``), clip each sample's whole gradient (across all the
    parameters) to L2 norm ``max_norm`` and store the **sum** over the batch in ``p.grad``
    (sensitivity ``max_norm`` under add/remove-one-record). Returns the per-sample norms
    before clipping. ``p.grad_sample`` is cleared.
    """
    if not max_norm > 0:
        raise ValueError(f"commcomp: max_norm must be > 0, got {max_norm!r}")
    params = [p for p in params if getattr(p, "grad_sample", None) is not None]
    if not params:
        raise ValueError(
            "commcomp: no parameter has .grad_sample; wrap the model in "
            "opacus.GradSampleModule(model) and run backward before clip_per_sample_"
        )
    batch = params[0].grad_sample.shape[0]
    sq = torch.zeros(batch, dtype=torch.float32, device=params[0].grad_sample.device)
    for p in params:
        sq += p.grad_sample.reshape(batch, -1).float().pow(2).sum(1)
    norms = sq.sqrt()
    coef = clip_coefficient(norms, float(max_norm))
    for p in params:
        summed = torch.einsum("b,b...->...", coef, p.grad_sample.float()).to(p.dtype)
        p.grad = summed
        p.grad_sample = None
    return norms
