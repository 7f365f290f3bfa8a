"""Cryptographically secure noise for differential privacy: ChaCha20 + Box-Muller + the 4-sum.

Why this exists
---------------
DP noise only protects a gradient if whoever sees the noisy message cannot predict the noise.
``torch.Generator`` is a Mersenne Twister seeded with a 64-bit integer of which the CPU
generator keeps only the low 32 bits in its state (the regression test in
``tests/privacy/test_csprng.py`` shows ``manual_seed(s)`` and ``manual_seed(s & 0xFFFFFFFF)``
give the same stream). An eavesdropper tries all 2^32 seeds, finds the one that makes the
message look least noisy, and subtracts the noise. Even with a long seed, MT19937 is linear:
624 consecutive 32-bit outputs determine its state. It is a statistical generator, not a
cryptographic one.

What is secure here
-------------------
* **Keystream**: ChaCha20 (Bernstein 2008; the IETF variant of RFC 8439: 256-bit key,
  96-bit nonce, 32-bit block counter). Without the key its output is indistinguishable from
  uniform bits, and seeing any amount of it does not help to predict the rest.
* **Key**: 32 bytes from :func:`secrets.token_bytes` (the operating system's CSPRNG) unless
  you pass one. The key never leaves the rank: on CUDA the keystream is computed on the
  device by a pure-PyTorch twin of the cipher (the key is copied to the device, 32 bytes), so
  the noise never makes a host round trip. It is not shown by ``repr``, and the generator
  refuses to be pickled or copied (a copy would repeat the same noise; see "What is not").
* **Nonces**: every draw (one call of :meth:`SecureGenerator.normal`, ``uniform`` or
  ``bernoulli``) takes the next value of an internal 64-bit counter as its nonce, under a
  lock, so no (key, nonce) pair is ever used twice by one generator, even when draws come
  from several threads (e.g. a communication thread). Draw ``i`` uses the 96-bit nonce
  ``i (8 bytes LE) || segment (4 bytes LE)``, where ``segment`` counts 2^32-block segments
  inside one draw: the 32-bit block counter never wraps (a draw longer than 2^32 blocks =
  256 GiB moves on to a fresh nonce instead).
* **Floating point**: a correctly sampled real Gaussian rounded to a float is *not* a safe
  mechanism: the set of floats that a sampler can output depends on the (secret) mean, so
  an output can reveal the input (Mironov 2012, "On significance of the least significant
  bits for differential privacy", CCS, for the Laplace mechanism; Jin et al. 2021,
  arXiv:2112.05307, for Gaussian samplers including Opacus'). Following Holohan & Braghin
  2021, "Secure Random Sampling in Differential Privacy" (ESORICS, arXiv:2107.10138, sec.
  5.1), each output is the sum of 4 independent standard normals divided by 2 (still
  N(0, 1)): inverting it means searching 2^(53 * 3) uniform inputs instead of 2^53. This is
  what Opacus' ``secure_mode`` does (see ``_SUMMANDS`` below), done here in float64 with a
  single cast at the end.

What is not
-----------
* :meth:`SecureGenerator.from_seed` derives the key from an integer: **insecure**, for
  repeatable experiments only. Anyone who knows (or guesses) the seed regenerates the noise.
* Draws are a deterministic function of ``(key, number of previous draws)``: two generators
  with the same key produce the same noise. Never give two ranks (or two processes) the same
  key; a generator used after ``os.fork`` in the child raises rather than repeat its parent's
  noise.
* The 4-sum is a defence for the sampler's floating-point leak; adding float32 noise to a
  float32 gradient still rounds, and this module does nothing about the accuracy of the
  privacy accounting or the clipping.
* Nothing here is constant-time, and the key sits in ordinary (swappable, dumpable) memory.

Layout of the randomness
------------------------
A 64-bit uniform word is 8 consecutive keystream bytes, little endian (word ``i`` of a draw
is bytes ``8i .. 8i+7``). Its top 53 bits ``m`` give ``m / 2^53`` in [0, 1) (``uniform``,
``bernoulli``, Box-Muller's angle) or ``(m + 1) / 2^53`` in (0, 1] (Box-Muller's radius,
so ``log`` never sees 0). :meth:`SecureGenerator.normal` spends one ChaCha20 block (8 words)
per pair of outputs: the 4 (radius, angle) pairs of block ``j`` give outputs ``2j`` (the 4
cosines) and ``2j + 1`` (the 4 sines). Every output thus sums normals from 4 *different*
Box-Muller pairs.

The cipher itself is :mod:`commcomp.privacy.chacha20`. Only ``torch``, the standard library
and the ``cryptography`` package are imported (no ``commcomp.hooks``: this module sits below
them).
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import threading
from typing import Optional

import torch

from .chacha20 import (  # noqa: F401 - chacha20_keystream, cryptography_available were importable from here
    BLOCK_BYTES,
    DeviceLike,
    chacha20_keystream,
    chacha20_words,
    check_backend,
    check_count,
    check_key,
    cryptography_available,
    openssl_keystream_into,
    use_cryptography,
    words_to_mantissas,
)

__all__ = ["SecureGenerator", "chacha20_keystream", "cryptography_available"]

_MASK53 = (1 << 53) - 1
_TWO_M53 = 2.0 ** -53
_WORDS = BLOCK_BYTES // 8  # uniform 64-bit words per block

# A 32-bit block counter covers 2^32 blocks per nonce; a draw that needs more moves on to the
# next nonce segment (tests lower this to exercise the switch).
_BLOCKS_PER_NONCE = 1 << 32
_MAX_DRAWS = 1 << 64  # the draw index fills 8 bytes of the nonce

# Outputs are sums of this many standard normals, divided by sqrt(_SUMMANDS) = 2. Opacus:
# opacus/optimizers/optimizer.py, _generate_noise(secure_mode=True), pytorch/opacus@4d0ebc8
# (4d0ebc84613d214fbfd37fbfd1390e3747a625ce, 2025-09-16; the same 4-sum as in 2021, 2d4ea8c,
# but since then accumulated in the gradient's dtype): it draws and discards one sample, then
# returns the sum of 4 torch.normal(0, std) calls / 2, from a torchcsprng generator (an
# archived package that does not build on current torch). We sum in float64 and cast once,
# and need no discarded sample: each draw starts from a fresh nonce.
_SUMMANDS = 4

# Blocks per piece of work: bounds memory (the twin's state is 16 int64 words per block, plus
# temporaries) and keeps CPU pieces cache sized, while amortizing the twin's ~620 tensor ops
# per piece. Pieces never change the result. Tuned with benchmarks/noise.py.
_CPU_PIECE_BLOCKS = 1 << 14  # OpenSSL path: 1 MiB of keystream, 32,768 outputs
_TWIN_CPU_PIECE_BLOCKS = 1 << 16
_DEVICE_PIECE_BLOCKS = 1 << 20


# --- from uniform words to Gaussians --------------------------------------------------------
def _gaussians_from_mantissas(m: torch.Tensor) -> torch.Tensor:
    """[blocks, 8] 53-bit integers -> [blocks, 2] float64 N(0, 1) samples (the secure 4-sum).

    Columns 0-3 are Box-Muller radii ``u1 = (m + 1) / 2^53`` in (0, 1], columns 4-7 angles
    ``u2 = m / 2^53`` in [0, 1). Pair ``k`` gives ``r_k cos(t_k)`` and ``r_k sin(t_k)`` with
    ``r_k = sqrt(-2 ln u1_k)``, ``t_k = 2 pi u2_k`` (Box & Muller 1958), two independent
    N(0, 1). Output 0 is ``sum_k r_k cos(t_k) / 2``, output 1 ``sum_k r_k sin(t_k) / 2``:
    each a sum of 4 independent normals from 4 different pairs, divided by sqrt(4).
    """
    u1 = m[:, :_SUMMANDS].to(torch.float64).add_(1.0).mul_(_TWO_M53)  # m + 1 <= 2^53: exact
    t = m[:, _SUMMANDS:].to(torch.float64).mul_(2.0 * math.pi * _TWO_M53)
    r = u1.log_().mul_(-2.0).sqrt_()
    out = torch.stack(((r * t.cos()).sum(1), r.mul_(t.sin_()).sum(1)), dim=1)
    return out.mul_(1.0 / math.sqrt(_SUMMANDS))


# --- the generator --------------------------------------------------------------------------
class SecureGenerator:
    """Uniforms, Gaussians and coins from ChaCha20 under a secret 256-bit key.

    Args:
        key: 32 bytes, or ``None`` (default) for ``secrets.token_bytes(32)``: the only
            secure choice unless you manage keys yourself. Give every rank its own generator.
        backend: how CPU keystreams are made: ``"auto"`` (OpenSSL through ``cryptography``,
            falling back to the PyTorch twin with a one-time warning if that is missing),
            ``"cryptography"`` (required) or ``"torch"`` (the twin; for cross-checks).
            Non-CPU devices always use the twin. Every backend gives identical bits.

    Determinism: draw ``i`` (the i-th call of :meth:`normal`, :meth:`uniform` or
    :meth:`bernoulli`, counting from 0, whatever its size; a call with ``n = 0`` counts too)
    uses nonce ``i``, so its output is a function of ``(key, i, n)`` only: the same key
    replays the same draws in the same order; a different order of calls gives different
    noise. Threads may draw concurrently: each call reserves its index under a lock.

    A generator cannot be pickled, copied or used after ``os.fork`` in the child: any copy
    would replay the original's future noise.

    Example::

        gen = SecureGenerator()                 # a fresh secret key
        noise = gen.normal(grad.numel(), grad.device).mul_(sigma * clip)
        take_part = gen.bernoulli(q)            # private participation coin
    """

    def __init__(self, key: Optional[bytes] = None, *, backend: str = "auto"):
        self._key = secrets.token_bytes(32) if key is None else check_key(key)
        self._backend = check_backend(backend)
        self._lock = threading.Lock()
        self._draws = 0
        self._pid = os.getpid()

    @classmethod
    def from_seed(cls, seed: int, *context: int, backend: str = "auto") -> "SecureGenerator":
        """A generator keyed by ``SHA-256(seed, *context)``. **INSECURE**: for repeatable runs.

        Anyone who knows the seed and context (or can guess them: a small seed, a timestamp,
        a rank) can rebuild the key and subtract the noise; the DP guarantee is then void.
        Use it for experiments that must replay bit for bit, and ``SecureGenerator()`` in
        anything that leaves your machine. ``context`` separates streams, e.g.
        ``from_seed(seed, rank)`` gives each rank its own key. Integers of any size and sign
        are hashed whole and unambiguously (length-prefixed), so ``from_seed(s)`` and
        ``from_seed(s & 0xFFFFFFFF)`` differ, unlike ``torch.Generator().manual_seed``.
        """
        h = hashlib.sha256(b"commcomp.privacy.csprng.SecureGenerator.from_seed/v1\0")
        for i, v in enumerate((seed, *context)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"commcomp: from_seed takes ints, got {type(v).__name__} {v!r} "
                                f"at position {i}")
            b = v.to_bytes(v.bit_length() // 8 + 1, "big", signed=True)
            h.update(len(b).to_bytes(8, "big") + b)
        return cls(h.digest(), backend=backend)

    def __repr__(self) -> str:
        return f"SecureGenerator(key=<secret>, draws={self._draws}, backend={self._backend!r})"

    def __reduce__(self):
        raise TypeError("commcomp: a SecureGenerator cannot be pickled: its key would be written "
                        "to disk and the copy would replay the same noise. Make a new "
                        "SecureGenerator() after loading (a fresh key), or keep the seed for "
                        "from_seed if the run must be replayable (insecure)")

    def __copy__(self):
        raise TypeError("commcomp: a SecureGenerator cannot be copied: the copy would draw the "
                        "same noise as the original. Share the object, or make a new "
                        "SecureGenerator()")

    __deepcopy__ = lambda self, memo: self.__copy__()  # noqa: E731

    @property
    def draws(self) -> int:
        """How many draws (calls) this generator has made: the next draw's nonce."""
        return self._draws

    @property
    def backend(self) -> str:
        """The CPU backend asked for: ``"auto"``, ``"cryptography"`` or ``"torch"``."""
        return self._backend

    # -- internals --
    def _next_draw(self) -> int:
        if os.getpid() != self._pid:
            raise RuntimeError(
                f"commcomp: this SecureGenerator was created in process {self._pid} and copied "
                f"into process {os.getpid()} by fork; parent and child would draw identical noise. "
                "Create a new SecureGenerator() in the child")
        with self._lock:
            i = self._draws
            if i >= _MAX_DRAWS:
                raise OverflowError("commcomp: 2^64 draws made with this key; "
                                    "make a new SecureGenerator()")
            self._draws = i + 1
        return i

    def _mantissas(self, draw: int, first: int, nblocks: int, device: torch.device,
                   buf: Optional[bytearray] = None) -> torch.Tensor:
        """Blocks ``first .. first + nblocks - 1`` of draw ``draw`` as 53-bit ints [nblocks, 8].

        Block ``g`` of a draw is block ``g mod 2^32`` under nonce ``(draw, g div 2^32)``, so the
        32-bit block counter never wraps. ``buf`` (CPU, OpenSSL path) is scratch space for the
        keystream, reused across pieces; it selects that path.
        """
        parts = []
        g, stop = first, first + nblocks
        while g < stop:
            seg, counter = divmod(g, _BLOCKS_PER_NONCE)
            nb = min(stop - g, _BLOCKS_PER_NONCE - counter)
            nonce = draw.to_bytes(8, "little") + seg.to_bytes(4, "little")
            if buf is not None:
                nbytes = nb * BLOCK_BYTES
                if len(buf) < nbytes:
                    buf = bytearray(nbytes)
                openssl_keystream_into(self._key, nonce, counter, buf, nbytes)
                w = torch.frombuffer(buf, dtype=torch.int64, count=nb * _WORDS).view(nb, _WORDS)
                parts.append((w >> 11).bitwise_and_(_MASK53))  # a new tensor: buf may be reused
            else:
                words = chacha20_words(self._key, nonce, counter, nb, device)
                parts.append(words_to_mantissas(words))
            g += nb
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _pieces(self, draw: int, nblocks: int, device: torch.device):
        """Yield ``(first block, mantissas [blocks, 8])`` of draw ``draw``, a piece at a time."""
        crypto = use_cryptography(self._backend, device)
        if device.type != "cpu":
            step = _DEVICE_PIECE_BLOCKS
        else:
            step = _CPU_PIECE_BLOCKS if crypto else _TWIN_CPU_PIECE_BLOCKS
        buf = bytearray(min(nblocks, step) * BLOCK_BYTES) if crypto else None
        for start in range(0, nblocks, step):
            yield start, self._mantissas(draw, start, min(step, nblocks - start), device, buf)

    # -- public draws --
    def normal(self, n: int, device: DeviceLike = "cpu",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``n`` independent N(0, 1) samples on ``device``, computed in float64, cast to ``dtype``.

        Each sample is a sum of 4 Box-Muller normals divided by 2 (the floating-point defence
        of Holohan & Braghin 2021, as in Opacus' ``secure_mode``; see the module docstring).
        Scale it yourself: ``gen.normal(n, dev).mul_(std)``. One draw (one nonce) per call;
        32 keystream bytes per sample.
        """
        n = check_count(n)
        dev = torch.device(device)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError("commcomp: dtype must be a floating torch.dtype (float16, bfloat16, "
                            f"float32 or float64), got {dtype!r}")
        draw = self._next_draw()
        out = torch.empty(n, dtype=dtype, device=dev)
        for start, m in self._pieces(draw, -(-n // 2), dev):  # one block per pair of outputs
            z = _gaussians_from_mantissas(m).view(-1)
            lo, hi = 2 * start, min(n, 2 * start + z.numel())
            out[lo:hi] = z[: hi - lo]
        return out

    def uniform(self, n: int, device: DeviceLike = "cpu") -> torch.Tensor:
        """``n`` float64 samples uniform on the grid ``{k / 2^53 : 0 <= k < 2^53}`` in [0, 1)."""
        n = check_count(n)
        dev = torch.device(device)
        draw = self._next_draw()
        out = torch.empty(n, dtype=torch.float64, device=dev)
        for start, m in self._pieces(draw, -(-n // _WORDS), dev):
            m = m.reshape(-1)
            lo, hi = _WORDS * start, min(n, _WORDS * start + m.numel())
            out[lo:hi] = m[: hi - lo].to(torch.float64).mul_(_TWO_M53)
        return out

    def bernoulli(self, p: float) -> bool:
        """One private coin: ``True`` with probability ``p`` (``p`` rounded to a multiple of 2^-53).

        For client participation sampling (Poisson subsampling): the coin must be as secret
        as the noise, since amplification by subsampling assumes nobody knows who took part.
        ``p = 0`` is never ``True`` and ``p = 1`` always.
        """
        try:
            p = float(p)
        except (TypeError, ValueError):
            raise TypeError("commcomp: p must be a probability (a float in [0, 1]), "
                            f"got {p!r}") from None
        if not 0.0 <= p <= 1.0:  # also rejects NaN
            raise ValueError(f"commcomp: p must be in [0, 1], got {p}")
        draw = self._next_draw()
        _, m = next(self._pieces(draw, 1, torch.device("cpu")))
        return int(m[0, 0]) * _TWO_M53 < p
