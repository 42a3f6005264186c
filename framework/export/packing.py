"""Weight codes bit-packed at their own bit-width (numpy only).

safetensors has no sub-byte dtypes, so a layer quantized to `b` bits (2..8) stores its integer weight
codes as one U8 blob of exactly ``ceil(n * b / 8)`` bytes: a 3-bit layer takes 3 bits per weight, not 8.

Layout: the codes, flattened in C order, are written one after another, each as its `b` low-order bits
(two's complement for signed codes), LSB-first. The first code's bit 0 is bit 0 of byte 0, its bit 1 is
bit 1 of byte 0, and so on; code ``i``'s bit ``j`` is stream bit ``i * b + j``, i.e. bit
``(i * b + j) % 8`` of byte ``(i * b + j) // 8``. A code may straddle a byte boundary; the unused high
bits of the last byte are zero. For example, the unsigned 2-bit codes ``[1, 2, 3]`` pack to the single
byte ``0b00111001`` (0x39). This is also how ONNX packs its 2- and 4-bit integer types (first element in
the lowest bits).

Packing and unpacking are vectorised and work in chunks of :data:`CHUNK` codes (a multiple of 8, so
every chunk starts on a byte boundary), so a layer of tens of millions of weights needs only small
temporaries.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np

MIN_BITS = 2
MAX_BITS = 8
CHUNK = 1 << 20  # codes per chunk; a multiple of 8, so chunk boundaries are byte boundaries

__all__ = ["CHUNK", "MAX_BITS", "MIN_BITS", "code_range", "pack_codes", "packed_nbytes", "unpack_codes"]


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool):
        raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    try:
        b = operator.index(bits)
    except TypeError:
        raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}") from None
    if not MIN_BITS <= b <= MAX_BITS:
        raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS} to be bit-packed, got {b}")
    return b


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    """The (lowest, highest) code of a `bits`-bit signed (two's complement) or unsigned integer."""
    b = _check_bits(bits)
    if signed:
        return -(1 << (b - 1)), (1 << (b - 1)) - 1
    return 0, (1 << b) - 1


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that `count` codes of `bits` bits take when packed: ``ceil(count * bits / 8)``."""
    n = operator.index(count)
    if n < 0:
        raise ValueError(f"count must be >= 0, got {n}")
    return (n * _check_bits(bits) + 7) // 8


def _unpacked_dtype(bits: int, signed: bool) -> np.dtype:
    # int8 holds every signed code and every unsigned code below 8 bits; unsigned 8-bit needs uint8.
    return np.dtype(np.uint8) if (bits == 8 and not signed) else np.dtype(np.int8)


def pack_codes(codes: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """Bit-pack integer `codes` at `bits` bits each (LSB-first, C order): a 1-D uint8 array.

    Raises ValueError for a bit-width outside 2..8, non-integer codes, or codes outside the range of a
    `bits`-bit signed/unsigned integer.
    """
    b = _check_bits(bits)
    arr = np.asarray(codes)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"codes must be an integer array, got dtype {arr.dtype}")
    flat = arr.reshape(-1)  # C order; a view when possible
    n = flat.size
    out = np.zeros(packed_nbytes(n, b), dtype=np.uint8)
    if n == 0:
        return out
    low, high = code_range(b, signed)
    found_min, found_max = int(flat.min()), int(flat.max())
    if found_min < low or found_max > high:
        kind = "signed" if signed else "unsigned"
        raise ValueError(
            f"codes out of range for {b}-bit {kind} packing: found min {found_min}, max {found_max}; "
            f"allowed {low}..{high}"
        )
    mask = np.int64((1 << b) - 1)
    for start in range(0, n, CHUNK):
        chunk = flat[start : start + CHUNK]
        # The low `b` bits (two's complement for negatives), one byte per code.
        low_bits = (chunk.astype(np.int64) & mask).astype(np.uint8)
        # (m, 8) bit matrix, bit j of each code in column j; keep the low `b` columns.
        bit_matrix = np.unpackbits(low_bits[:, None], axis=1, bitorder="little")[:, :b]
        packed = np.packbits(bit_matrix.reshape(-1), bitorder="little")
        first = start * b // 8  # exact: start is a multiple of CHUNK, a multiple of 8
        out[first : first + packed.size] = packed
    return out


def _as_blob(blob) -> np.ndarray:
    if isinstance(blob, (bytes, bytearray, memoryview)):
        return np.frombuffer(blob, dtype=np.uint8)
    arr = np.asarray(blob)
    if arr.dtype != np.uint8:
        raise ValueError(f"a packed blob must be uint8 bytes, got dtype {arr.dtype}")
    return arr.reshape(-1)


def unpack_codes(blob, bits: int, signed: bool, shape: int | Sequence[int]) -> np.ndarray:
    """The codes :func:`pack_codes` packed, with `shape` (C order).

    Returns int8 (uint8 for unsigned 8-bit codes, which int8 cannot hold). `blob` is a uint8 array or
    bytes and must hold exactly ``packed_nbytes(prod(shape), bits)`` bytes, else ValueError.
    """
    b = _check_bits(bits)
    if isinstance(shape, (int, np.integer)):
        dims: tuple[int, ...] = (operator.index(shape),)
    else:
        dims = tuple(operator.index(s) for s in shape)
    if any(d < 0 for d in dims):
        raise ValueError(f"shape must have non-negative dimensions, got {dims}")
    n = math.prod(dims)
    data = _as_blob(blob)
    expected = packed_nbytes(n, b)
    if data.size != expected:
        raise ValueError(
            f"packed blob for {n} codes of {b} bits with shape {dims} must hold {expected} bytes, "
            f"found {data.size}"
        )
    dtype = _unpacked_dtype(b, signed)
    out = np.empty(n, dtype=dtype)
    shift_u, shift_s = np.uint8(8 - b), np.int8(8 - b)  # same dtype as the array: no promotion
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        first = start * b // 8
        stream = np.unpackbits(data[first : first + packed_nbytes(m, b)], bitorder="little", count=m * b)
        # Each row of `b` bits back into one byte (the high bits zero).
        values = np.packbits(stream.reshape(m, b), axis=1, bitorder="little")[:, 0]
        if signed:
            # Sign-extend: move the sign bit to bit 7, reinterpret as int8, shift back arithmetically.
            values = (values << shift_u).view(np.int8) >> shift_s
        out[start : start + m] = values.view(dtype)
    return out.reshape(dims)
