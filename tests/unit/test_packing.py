"""Bit-packing of weight codes (framework.export.packing): round trips, sizes, the LSB-first layout, errors.

Hypothesis draws a bit-width (2..8), signedness and a shape (0-D excluded; 1-D to 4-D, empty and odd
element counts included), fills it with codes over the whole allowed range, and checks that unpacking the
packed bytes gives back exactly the codes, in a dtype that holds them, from ceil(n * bits / 8) bytes.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from framework.export import packing
from framework.export.packing import pack_codes, packed_nbytes, unpack_codes

SETTINGS = settings(
    max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
BITS = list(range(2, 9))


def _range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


@st.composite
def cases(draw):
    bits = draw(st.sampled_from(BITS))
    signed = draw(st.booleans())
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=9))
    low, high = _range(bits, signed)
    dtype = draw(st.sampled_from([np.int16, np.int32, np.int64] + ([np.int8] if signed or bits < 8 else [])))
    codes = draw(hnp.arrays(dtype, shape, elements=st.integers(low, high)))
    return bits, signed, codes


@SETTINGS
@given(cases())
def test_round_trip(case):
    bits, signed, codes = case
    blob = pack_codes(codes, bits, signed)
    assert blob.dtype == np.uint8 and blob.ndim == 1
    assert blob.size == packed_nbytes(codes.size, bits) == -(-codes.size * bits // 8)
    back = unpack_codes(blob, bits, signed, codes.shape)
    assert back.shape == codes.shape
    assert back.dtype == (np.uint8 if (bits == 8 and not signed) else np.int8)
    np.testing.assert_array_equal(back.astype(np.int64), codes.astype(np.int64))
    # bytes in, same codes out; unused high bits of the last byte are zero
    np.testing.assert_array_equal(unpack_codes(blob.tobytes(), bits, signed, codes.shape), back)
    if codes.size * bits % 8:
        assert blob[-1] >> (codes.size * bits % 8) == 0


@SETTINGS
@given(cases())
def test_layout_is_lsb_first_bitstream(case):
    """Code i's bit j is stream bit i*bits + j: bit (i*bits+j) % 8 of byte (i*bits+j) // 8."""
    bits, signed, codes = case
    blob = pack_codes(codes, bits, signed)
    stream = [(int(byte) >> k) & 1 for byte in blob for k in range(8)]
    # Python's >> on a negative int is two's complement: its low `bits` bits are what is packed
    expected = [(int(c) >> j) & 1 for c in codes.reshape(-1) for j in range(bits)]
    assert stream[: len(expected)] == expected
    assert not any(stream[len(expected) :])


def test_hand_computed_two_bit_unsigned():
    # 1 -> 01, 2 -> 10, 3 -> 11, first code lowest: 0b00_11_10_01
    blob = pack_codes(np.array([1, 2, 3]), 2, signed=False)
    assert blob.tolist() == [0b00111001] == [0x39]
    np.testing.assert_array_equal(unpack_codes(blob, 2, False, (3,)), [1, 2, 3])


def test_hand_computed_three_bit_signed_straddles_a_byte():
    # -4 -> 100, 3 -> 011, -1 -> 111 (two's complement, 3 bits).
    # Stream bits 0..8: code0 = 0,0,1 | code1 = 1,1,0 | code2 = 1,1,1
    # byte 0 = bits 0..7 = 0b11011100 (the third code's low two bits are its top two), byte 1 = 0b00000001.
    codes = np.array([-4, 3, -1], dtype=np.int8)
    blob = pack_codes(codes, 3, signed=True)
    assert blob.tolist() == [0b11011100, 0b00000001] == [0xDC, 0x01]
    back = unpack_codes(blob, 3, True, (3,))
    assert back.dtype == np.int8
    np.testing.assert_array_equal(back, codes)


def test_c_order_of_a_2d_array():
    codes = np.array([[1, 0], [3, 2]])  # C order 1, 0, 3, 2 -> 0b10_11_00_01
    assert pack_codes(codes, 2, False).tolist() == [0b10110001]
    assert pack_codes(np.asfortranarray(codes), 2, False).tolist() == [0b10110001]
    np.testing.assert_array_equal(unpack_codes(np.array([0b10110001], np.uint8), 2, False, (2, 2)), codes)


def test_chunks_align_across_boundaries(monkeypatch):
    monkeypatch.setattr(packing, "CHUNK", 16)
    rng = np.random.default_rng(0)
    for bits in (3, 5, 7):
        for signed in (False, True):
            low, high = _range(bits, signed)
            codes = rng.integers(low, high + 1, size=(5, 11))  # 55 codes: 3 full chunks and a partial one
            blob = pack_codes(codes, bits, signed)
            monkeypatch.setattr(packing, "CHUNK", 1 << 20)
            assert blob.tolist() == pack_codes(codes, bits, signed).tolist()
            monkeypatch.setattr(packing, "CHUNK", 16)
            np.testing.assert_array_equal(unpack_codes(blob, bits, signed, codes.shape), codes)


def test_empty():
    assert packed_nbytes(0, 3) == 0
    blob = pack_codes(np.zeros((0, 4), dtype=np.int8), 3, True)
    assert blob.dtype == np.uint8 and blob.shape == (0,)
    assert unpack_codes(blob, 3, True, (0, 4)).shape == (0, 4)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 32, -2, 2.5, True, "4"])
def test_bad_bit_width(bits):
    with pytest.raises(ValueError, match="bits"):
        pack_codes(np.zeros(4, dtype=np.int8), bits, True)
    with pytest.raises(ValueError, match="bits"):
        unpack_codes(np.zeros(4, dtype=np.uint8), bits, True, (4,))
    with pytest.raises(ValueError, match="bits"):
        packed_nbytes(4, bits)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [False, True])
def test_out_of_range_codes(bits, signed):
    low, high = _range(bits, signed)
    pack_codes(np.array([low, high]), bits, signed)  # the ends are fine
    with pytest.raises(ValueError, match=rf"max {high + 1}.*allowed {low}\.\.{high}"):
        pack_codes(np.array([low, high + 1]), bits, signed)
    with pytest.raises(ValueError, match=rf"min {low - 1}.*allowed {low}\.\.{high}"):
        pack_codes(np.array([low - 1, high]), bits, signed)


def test_non_integer_codes():
    with pytest.raises(ValueError, match="integer"):
        pack_codes(np.array([0.0, 1.0]), 4, True)


@SETTINGS
@given(cases(), st.integers(1, 3), st.booleans())
def test_wrong_blob_length(case, delta, shorter):
    bits, signed, codes = case
    blob = pack_codes(codes, bits, signed)
    if shorter and blob.size < delta:
        return
    bad = blob[: blob.size - delta] if shorter else np.concatenate([blob, np.zeros(delta, np.uint8)])
    with pytest.raises(ValueError, match=rf"must hold {blob.size} bytes, found {bad.size}"):
        unpack_codes(bad, bits, signed, codes.shape)


def test_truncated_blob():
    blob = pack_codes(np.arange(-4, 4).repeat(3), 3, True)  # 24 codes, 9 bytes
    assert blob.size == 9
    with pytest.raises(ValueError, match="9 bytes, found 8"):
        unpack_codes(blob[:-1], 3, True, (24,))


def test_blob_must_be_uint8():
    with pytest.raises(ValueError, match="uint8"):
        unpack_codes(np.zeros(3, dtype=np.int32), 8, True, (3,))
