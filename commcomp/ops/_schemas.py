"""Operator schemas of the ``commcomp`` library.

The native extension declares these in ``csrc/ops.cpp`` (``TORCH_LIBRARY(commcomp, m)``).
When the extension is not built, :mod:`commcomp.ops._loader` declares the same strings from
Python so that ``torch.ops.commcomp.*`` exists either way; ``tests/ops/test_registration.py``
checks that both lists agree.
"""

SCHEMAS = {
    "ternarize_pack": "ternarize_pack(Tensor x, Tensor scales, int[]? segments, int seed, int offset) -> Tensor",
    "ternarize_int8": "ternarize_int8(Tensor x, Tensor scales, int[]? segments, int seed, int offset) -> Tensor",
    "unpack": "unpack(Tensor packed, int numel, Tensor scales, int[]? segments, ScalarType dtype) -> Tensor",
    "unpack_accumulate": "unpack_accumulate(Tensor packed, Tensor scales, int[]? segments, Tensor(a!) out) -> ()",
    "segment_stats": "segment_stats(Tensor x, int[]? segments) -> (Tensor, Tensor)",
    "ternarize_base3": "ternarize_base3(Tensor x, Tensor scales, int[]? segments, int seed, int offset) -> Tensor",
    "unpack_base3": "unpack_base3(Tensor packed, int numel, Tensor scales, int[]? segments, ScalarType dtype) -> Tensor",
    "mix_stats": "mix_stats(Tensor v, Tensor hat, int[]? segments) -> Tensor",
    "mix_encode": ("mix_encode(Tensor(a!) v, Tensor(b!) hat, Tensor(c!) acc, Tensor scales, Tensor hat_scales, "
                   "Tensor acc_scales, int[]? segments, int seed, int offset, bool base3) -> Tensor"),
    "mix_decode": ("mix_decode(Tensor(a!) v, Tensor hat, Tensor(b!) acc, Tensor[] packed, Tensor scales, "
                   "int[]? segments, float gamma, bool base3) -> ()"),
    "track_prep": "track_prep(Tensor(a!) y, Tensor g, Tensor(b!) g_prev) -> Tensor",
    "countsketch": "countsketch(Tensor x, int sketch_size, int seed) -> Tensor",
    "countsketch_transpose": "countsketch_transpose(Tensor y, int numel, int seed) -> Tensor",
    "srht": "srht(Tensor x, int sketch_size, int block, int seed) -> Tensor",
    "srht_transpose": "srht_transpose(Tensor y, int numel, int block, int seed) -> Tensor",
}
