"""The pieces of a Gaussian mechanism: L2 clipping and per-rank noise.

Noise must be unpredictable to everyone but its own rank. Each rank draws it from its own
ChaCha20 keystream (:mod:`.csprng`) under a 256-bit key from the operating system, turned
into Gaussians with the floating-point defence of Opacus' ``secure_mode`` (a sum of four
draws). A torch ``Generator`` is not enough: Mersenne Twister keeps only 32 bits of its seed,
and an eavesdropper who tried all 2^32 seeds against one message subtracted the noise. The
noise never touches the global RNG and is independent of any shared (sketch) seed.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from .csprng import SecureGenerator


def clip_coefficient(norm: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """``min(1, clip_norm / norm)`` as a tensor (no host sync); 1 for a zero norm."""
    return torch.clamp(clip_norm / norm, max=1.0)


class NoiseSource:
    """Gaussian noise and private coins from a cryptographically secure generator.

    Args:
        seed: ``None`` (default): a fresh 256-bit key from ``secrets``, never saved. An int
            (with optional context ints, e.g. the rank) derives the key from it: repeatable
            for experiments, and **insecure** -- whoever knows the seed can regenerate the noise.
    """

    def __init__(self, seed: Optional[int] = None, *context: int):
        self.seeded = seed is not None
        self._gen = SecureGenerator() if seed is None else SecureGenerator.from_seed(int(seed), *context)

    def __repr__(self) -> str:
        return f"NoiseSource(ChaCha20, {'seeded: INSECURE' if self.seeded else 'secret key'})"

    def gaussian(self, n: int, std: float, device) -> torch.Tensor:
        """``n`` float32 samples of N(0, std^2) on ``device``."""
        return self._gen.normal(n, device, dtype=torch.float32).mul_(std)

    def bernoulli(self, p: float) -> bool:
        """One private coin: True with probability ``p``."""
        return self._gen.bernoulli(p)


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
