"""ChaCha20 (Bernstein 2008; the IETF variant of RFC 8439: 256-bit key, 96-bit nonce, 32-bit
block counter): the keystream behind :class:`commcomp.privacy.csprng.SecureGenerator`.

Two implementations give identical bits: OpenSSL's, through the maintained ``cryptography``
package (CPU), and a pure-PyTorch **twin** (:func:`chacha20_words`) that runs on any device,
so that on CUDA the key and the keystream never leave the GPU. ``backend`` picks one:
``"auto"`` (OpenSSL on CPU when available, with a one-time warning when it is not; the twin
elsewhere), ``"cryptography"`` or ``"torch"``. :func:`chacha20_keystream` is the plain
keystream (encrypting is XOR with it), exposed for tests and cross-checks against RFC 8439's
vectors; the generator reads 53-bit words straight from the blocks
(:func:`words_to_mantissas`, :func:`openssl_keystream_into`).

Only ``torch``, the standard library and ``cryptography`` are imported.
"""

from __future__ import annotations

import operator
import struct
import sys
import warnings
from typing import Union

import torch

try:  # the maintained binding to OpenSSL's ChaCha20 (pip install "cryptography>=41")
    from cryptography.hazmat.primitives.ciphers import Cipher as _Cipher
    from cryptography.hazmat.primitives.ciphers import algorithms as _algorithms
except ImportError:  # pragma: no cover - exercised by monkeypatching _CRYPTOGRAPHY_OK
    _Cipher = None
    _algorithms = None

DeviceLike = Union[str, torch.device, int]

# --- ChaCha20 constants (RFC 8439 sec. 2.3) -------------------------------------------------
_SIGMA = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)  # "expand 32-byte k"
_MASK32 = 0xFFFFFFFF
BLOCK_BYTES = 64  # bytes per ChaCha20 block = 8 uniform 64-bit words
BACKENDS = ("auto", "cryptography", "torch")

# cryptography reads the keystream out of "encrypting" zeros: one shared read-only buffer,
# 1 MiB (2^14 blocks) at a time.
_ZEROS = bytes((1 << 14) * BLOCK_BYTES)

# torch.frombuffer reads native-endian int64; ChaCha20's words are little endian.
_CRYPTOGRAPHY_OK = _Cipher is not None and sys.byteorder == "little"
_fallback_warned = False


def cryptography_available() -> bool:
    """Whether CPU keystreams come from the ``cryptography`` package (OpenSSL)."""
    return _CRYPTOGRAPHY_OK


def _warn_fallback_once() -> None:
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        why = ("the 'cryptography' package is not installed" if _Cipher is None
               else f"this machine is {sys.byteorder}-endian")
        warnings.warn(
            f"commcomp.privacy.csprng: {why}, so ChaCha20 on CPU runs on the pure-PyTorch twin "
            "(the same keystream, about 10x slower); pip install 'cryptography>=41' for "
            "OpenSSL's.",
            RuntimeWarning, stacklevel=3)


# --- validation -----------------------------------------------------------------------------
def check_key(key) -> bytes:
    """``key`` as 32 bytes, or a TypeError/ValueError that says to pass None for a fresh one."""
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise TypeError(f"commcomp: key must be 32 bytes, got {type(key).__name__}; pass None to "
                        "draw a fresh one from secrets.token_bytes(32)")
    key = bytes(key)
    if len(key) != 32:
        raise ValueError(f"commcomp: ChaCha20 takes a 256-bit key (32 bytes), got {len(key)} "
                         "bytes; pass None to draw one from secrets.token_bytes(32)")
    return key


def check_count(n, what: str = "n") -> int:
    """``n`` as an int >= 0 (a count of bytes or samples)."""
    if isinstance(n, bool) or not isinstance(n, int):
        try:
            n = operator.index(n)
        except TypeError:
            raise TypeError(f"commcomp: {what} must be an int >= 0, got {type(n).__name__} {n!r}"
                            + (f"; use int({n!r})" if isinstance(n, float) else "")) from None
    if n < 0:
        raise ValueError(f"commcomp: {what} must be >= 0, got {n}")
    return int(n)


def check_backend(backend: str) -> str:
    """One of :data:`BACKENDS`; ``"cryptography"`` only where OpenSSL's ChaCha20 is available."""
    if backend not in BACKENDS:
        raise ValueError("commcomp: backend must be 'auto', 'cryptography' or 'torch', "
                         f"got {backend!r}")
    if backend == "cryptography" and not _CRYPTOGRAPHY_OK:
        raise ImportError("commcomp: backend='cryptography' needs the 'cryptography' package on "
                          "a little-endian machine; pip install 'cryptography>=41', or use "
                          "backend='auto'")
    return backend


def use_cryptography(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` makes ``device``'s keystream with OpenSSL (warns once on a fallback)."""
    if device.type != "cpu" or backend == "torch":
        return False
    if _CRYPTOGRAPHY_OK:
        return True
    _warn_fallback_once()
    return False


# --- the pure-PyTorch twin ------------------------------------------------------------------
def _rotl_(v: torch.Tensor, n: int) -> torch.Tensor:
    """In place: rotate the 32-bit values held in an int64 tensor left by ``n``."""
    low = v >> (32 - n)
    return v.bitwise_left_shift_(n).bitwise_and_(_MASK32).bitwise_or_(low)


def _quarter_round_(a, b, c, d) -> None:
    """RFC 8439 sec. 2.1 on 4 columns at once: each argument is [4, blocks], int64 < 2^32."""
    a.add_(b).bitwise_and_(_MASK32); d.bitwise_xor_(a); _rotl_(d, 16)  # noqa: E702
    c.add_(d).bitwise_and_(_MASK32); b.bitwise_xor_(c); _rotl_(b, 12)  # noqa: E702
    a.add_(b).bitwise_and_(_MASK32); d.bitwise_xor_(a); _rotl_(d, 8)  # noqa: E702
    c.add_(d).bitwise_and_(_MASK32); b.bitwise_xor_(c); _rotl_(b, 7)  # noqa: E702


def chacha20_words(key: bytes, nonce: bytes, counter: int, nblocks: int,
                          device: torch.device) -> torch.Tensor:
    """ChaCha20 blocks ``counter .. counter + nblocks - 1`` as 32-bit words: int64 [16, nblocks].

    Word ``k`` of block ``j`` is ``out[k, j]``; serialized little endian, word by word, they
    are the keystream. The state is a [4 rows, 4 columns, blocks] grid: a column round is one
    vectorised quarter round over the 4 columns; a diagonal round first rotates rows 1, 2, 3 by
    1, 2, 3 places so that the diagonals line up as columns (RFC 8439 sec. 2.3).
    """
    if not (0 <= counter and counter + nblocks <= 1 << 32):
        raise ValueError(f"commcomp: blocks {counter} .. {counter + nblocks - 1} overflow "
                         "ChaCha20's 32-bit block counter; split the request and use a fresh nonce")
    words = [*_SIGMA, *struct.unpack("<8I", key), 0, *struct.unpack("<3I", nonce)]
    init = torch.tensor(words, dtype=torch.int64, device=device).unsqueeze(1).repeat(1, nblocks)
    init[12] = torch.arange(counter, counter + nblocks, dtype=torch.int64, device=device)
    grid = init.view(4, 4, nblocks)
    a, b, c, d = (grid[r].clone() for r in range(4))
    for _ in range(10):  # 20 rounds = 10 x (column round, diagonal round)
        _quarter_round_(a, b, c, d)
        b, c, d = b.roll(-1, 0), c.roll(-2, 0), d.roll(-3, 0)
        _quarter_round_(a, b, c, d)
        b, c, d = b.roll(1, 0), c.roll(2, 0), d.roll(3, 0)
    out = torch.cat((a, b, c, d)).view(16, nblocks)
    return out.add_(init).bitwise_and_(_MASK32)


def _words_to_bytes(words: torch.Tensor) -> torch.Tensor:
    """[16, nblocks] int64 words -> the keystream as uint8 [64 * nblocks] (little endian)."""
    shifts = torch.arange(0, 32, 8, dtype=torch.int64, device=words.device)
    return (words.t().unsqueeze(-1) >> shifts).bitwise_and_(0xFF).to(torch.uint8).reshape(-1)


def words_to_mantissas(words: torch.Tensor) -> torch.Tensor:
    """[16, nblocks] 32-bit words -> the top 53 bits of each 64-bit LE word: int64 [nblocks, 8]."""
    lo, hi = words[0::2], words[1::2]  # 64-bit word k of a block = words 2k (low), 2k + 1 (high)
    return ((hi << 21) | (lo >> 11)).t()


# --- the cryptography (OpenSSL) path --------------------------------------------------------
def openssl_keystream_into(key: bytes, nonce: bytes, counter: int, buf: bytearray, nbytes: int) -> None:
    """Write ``nbytes`` of keystream from block ``counter`` into ``buf`` (OpenSSL, CPU)."""
    _keystream_into(_encryptor(key, nonce, counter), buf, nbytes)


def _encryptor(key: bytes, nonce: bytes, counter: int):
    # cryptography's 16-byte "nonce" is RFC 8439's 32-bit block counter (little endian)
    # followed by its 96-bit nonce.
    algorithm = _algorithms.ChaCha20(key, counter.to_bytes(4, "little") + nonce)
    return _Cipher(algorithm, mode=None).encryptor()


def _keystream_into(enc, buf: bytearray, nbytes: int) -> None:
    view = memoryview(buf)
    for start in range(0, nbytes, len(_ZEROS)):
        stop = min(nbytes, start + len(_ZEROS))
        enc.update_into(_ZEROS[: stop - start], view[start:stop])


def _check_segment(counter: int, nbytes: int) -> None:
    if not 0 <= counter < 1 << 32:
        raise ValueError(f"commcomp: counter must be in [0, 2^32), got {counter}")
    end = counter + -(-nbytes // BLOCK_BYTES)
    if end > 1 << 32:
        raise ValueError(f"commcomp: {nbytes} bytes from block {counter} need blocks up to "
                         f"{end - 1}, past ChaCha20's 32-bit block counter (2^32 blocks = 256 GiB "
                         "per nonce); ask for less, or continue with a fresh nonce")


def chacha20_keystream(key: bytes, nonce: bytes, nbytes: int, *, counter: int = 0,
                       device: DeviceLike = "cpu", backend: str = "auto") -> torch.Tensor:
    """The ChaCha20 keystream (RFC 8439 sec. 2.4) as a uint8 tensor of ``nbytes`` on ``device``.

    Args:
        key: 32 bytes. nonce: 12 bytes (the IETF 96-bit nonce).
        nbytes: how many keystream bytes; need not be a multiple of the 64-byte block.
        counter: the first block's 32-bit counter (RFC 8439 starts encryption at 1 and keeps
            block 0 for the Poly1305 key). The counter never wraps: a request that would pass
            block 2^32 - 1 raises.
        device: where the keystream is produced (and returned).
        backend: ``"auto"`` (OpenSSL through ``cryptography`` on CPU, the PyTorch twin
            elsewhere), ``"cryptography"`` (CPU only) or ``"torch"`` (the twin, any device).

    Encrypting is XOR with this; it is exposed for tests and cross-checks. A stream cipher's
    one rule: never reuse a (key, nonce) pair for two different purposes.
    """
    key = check_key(key)
    if not isinstance(nonce, (bytes, bytearray)) or len(nonce) != 12:
        raise ValueError("commcomp: nonce must be 12 bytes (RFC 8439's 96-bit nonce), "
                         f"got {nonce!r}")
    nonce = bytes(nonce)
    nbytes = check_count(nbytes, "nbytes")
    counter = operator.index(counter)
    _check_segment(counter, nbytes)
    backend = check_backend(backend)
    dev = torch.device(device)
    if backend == "cryptography" and dev.type != "cpu":
        raise ValueError(f"commcomp: backend='cryptography' runs on CPU only, got device {dev}; "
                         "use backend='auto' or 'torch' for other devices")
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8, device=dev)
    if use_cryptography(backend, dev):
        buf = bytearray(nbytes)
        _keystream_into(_encryptor(key, nonce, counter), buf, nbytes)
        return torch.frombuffer(buf, dtype=torch.uint8)
    nblocks = -(-nbytes // BLOCK_BYTES)
    return _words_to_bytes(chacha20_words(key, nonce, counter, nblocks, dev))[:nbytes]


__all__ = ["BACKENDS", "BLOCK_BYTES", "chacha20_keystream", "chacha20_words", "check_backend", "check_count",
           "check_key", "cryptography_available", "openssl_keystream_into", "use_cryptography",
           "words_to_mantissas"]
