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
    "countsketch": "countsketch(Tensor x, int sketch_size, int seed) -> Tensor",
    "countsketch_transpose": "countsketch_transpose(Tensor y, int numel, int seed) -> Tensor",
    "srht": "srht(Tensor x, int sketch_size, int block, int seed) -> Tensor",
    "srht_transpose": "srht_transpose(Tensor y, int numel, int block, int seed) -> Tensor",
}
