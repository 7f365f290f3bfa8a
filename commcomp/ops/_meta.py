"""Fake (meta) kernels: output shapes and dtypes for torch.compile and FakeTensor tracing."""

from __future__ import annotations

import torch


def _nbytes(n: int) -> int:
    return (n + 3) // 4


# Long function: one registration per operator, each a few lines; splitting them by family
# would only scatter the list of fakes that must match commcomp/ops/_schemas.py.
def register() -> None:
    @torch.library.register_fake("commcomp::ternarize_pack")
    def _(x, scales, segments, seed, offset):
        return x.new_empty((_nbytes(x.numel()),), dtype=torch.uint8)

    @torch.library.register_fake("commcomp::ternarize_int8")
    def _(x, scales, segments, seed, offset):
        return x.new_empty((x.numel(),), dtype=torch.int8)

    @torch.library.register_fake("commcomp::unpack")
    def _(packed, numel, scales, segments, dtype):
        return packed.new_empty((numel,), dtype=dtype)

    @torch.library.register_fake("commcomp::unpack_accumulate")
    def _(packed, scales, segments, out):
        return None

    @torch.library.register_fake("commcomp::segment_stats")
    def _(x, segments):
        nseg = 1 if segments is None else len(segments)
        return (
            x.new_empty((nseg,), dtype=torch.float32),
            x.new_empty((nseg,), dtype=torch.float32),
        )

    @torch.library.register_fake("commcomp::ternarize_base3")
    def _(x, scales, segments, seed, offset):
        return x.new_empty(((x.numel() + 4) // 5,), dtype=torch.uint8)

    @torch.library.register_fake("commcomp::unpack_base3")
    def _(packed, numel, scales, segments, dtype):
        return packed.new_empty((numel,), dtype=dtype)

    @torch.library.register_fake("commcomp::mix_stats")
    def _(v, hat, segments):
        return v.new_empty((1 if segments is None else len(segments), 4), dtype=torch.float32)

    @torch.library.register_fake("commcomp::mix_encode")
    def _(v, hat, acc, scales, hat_scales, acc_scales, segments, seed, offset, base3):
        n = v.numel()
        return v.new_empty(((n + 4) // 5 if base3 else (n + 3) // 4,), dtype=torch.uint8)

    @torch.library.register_fake("commcomp::mix_decode")
    def _(v, hat, acc, packed, scales, segments, gamma, base3):
        return None

    @torch.library.register_fake("commcomp::track_prep")
    def _(y, g, g_prev):
        return y.new_empty((), dtype=torch.bool)

    @torch.library.register_fake("commcomp::countsketch")
    def _(x, sketch_size, seed):
        return x.new_empty((sketch_size,), dtype=torch.float32)

    @torch.library.register_fake("commcomp::countsketch_transpose")
    def _(y, numel, seed):
        return y.new_empty((numel,), dtype=torch.float32)

    @torch.library.register_fake("commcomp::srht")
    def _(x, sketch_size, block, seed):
        return x.new_empty((sketch_size,), dtype=torch.float32)

    @torch.library.register_fake("commcomp::srht_transpose")
    def _(y, numel, block, seed):
        return y.new_empty((numel,), dtype=torch.float32)
