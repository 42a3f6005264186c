"""OpenCV's area resize of a uint8 crop, recomputed with the same arithmetic in fewer passes.

FFCV's random-resized-crop decoder resizes each crop with OpenCV's `INTER_AREA`. When the crop is
at least the output size in both directions (and the ratio is not an exact integer), OpenCV takes
its generic area path: every output pixel is the average of the source pixels its cell covers, each
weighted by the fraction of it inside the cell. Along one axis, with `scale = 1 / (dsize / ssize)`,
output cell `d` covers `[d * scale, d * scale + scale)` and

    w(d, s) = 1 / cell(d)                          for a source pixel inside the cell,
    w(d, s) = (ceil(d * scale) - d * scale) / cell  for the partial pixel on the left,
    w(d, s) = min(d * scale + scale - s, 1, cell) / cell for the partial pixel on the right,

with `cell(d) = min(scale, ssize - d * scale)`, the weights computed in double and stored as
float32 and partial pixels under 1e-3 left out (OpenCV's `computeResizeAreaTab`). The result is

    h[y, d] = sum_s w(d, s) * src[y, s]           (float32, left to right from 0)
    out[e, d] = round(sum_y w(e, y) * h[y, d])    (float32, top to bottom; round half to even; 0..255)

OpenCV (4.6) walks these weights as one list per row and recomputes `h` of a source row for each
output row that row touches, at about the cost of the JPEG decode itself (benchmarks/README.md).
:func:`resize_area_crop` computes the same sums in the same order, so the same float32 roundings,
hence the same bytes, with less work: `h` of each source row once, one output pixel's three
channels together, the vertical sums as contiguous passes. Other cases (a crop smaller than the
output along an axis, an exact integer ratio, no resize at all) take other OpenCV paths and are left
to it (:func:`generic_area_case`).

Same bytes needs the same float32 roundings, so no compiler may contract `a * b + c` into a fused
multiply-add or reorder the sums. FFCV compiles its pipeline stages with `fastmath=True`, and numba
compiles a jitted function called from such a stage with the caller's flags (then, with
`cache=True`, keeps that machine code on disk for every later caller), and a contracted or
reordered sum moves a few bytes by 1. The arithmetic therefore lives in
:data:`area_resize_kernel`, a C callback that numba compiles once, at import, with its own flags;
jitted code, fast-math or not, calls it through its address, as FFCV calls OpenCV.
``tests/unit/test_area_resize.py`` checks the bytes against FFCV's OpenCV resize on generated
images, directly and through a fast-math caller, and the decoders against FFCV's on a JPEG dataset.
"""

from __future__ import annotations

import math

import numpy as np
from numba import carray, cfunc, njit, types

DBL_EPSILON = 2.220446049250313e-16


@njit(nogil=True)
def generic_area_case(crop_height: int, crop_width: int, out_height: int, out_width: int) -> bool:
    """Whether OpenCV's `resize(..., INTER_AREA)` takes its generic area path for this geometry
    (the only one :func:`resize_area_crop` reproduces): both scales >= 1, not both exact integers,
    and not a plain copy."""
    if crop_height == out_height and crop_width == out_width:
        return False
    scale_x = 1.0 / (out_width / crop_width)
    scale_y = 1.0 / (out_height / crop_height)
    if scale_x < 1.0 or scale_y < 1.0:
        return False
    integer_x = abs(scale_x - np.rint(scale_x)) < DBL_EPSILON
    integer_y = abs(scale_y - np.rint(scale_y)) < DBL_EPSILON
    return not (integer_x and integer_y)


@njit(nogil=True)
def area_weights(source: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output index: the first source index it reads, and its float32 weights over consecutive
    source indices, zero-padded to the widest cell (see the module docstring)."""
    scale = 1.0 / (out / source)
    width = int(math.ceil(scale)) + 2
    first = np.zeros(out, np.int64)
    weights = np.zeros((out, width), np.float32)
    for d in range(out):
        start = d * scale
        stop = start + scale
        cell = min(scale, source - start)
        lo = int(math.ceil(start))
        hi = min(int(math.floor(stop)), source - 1)
        lo = min(lo, hi)
        n = 0
        if lo - start > 1e-3:
            first[d] = lo - 1
            weights[d, 0] = np.float32((lo - start) / cell)
            n = 1
        else:
            first[d] = lo
        for _ in range(lo, hi):
            weights[d, n] = np.float32(1.0 / cell)
            n += 1
        if stop - hi > 1e-3:
            weights[d, n] = np.float32(min(min(stop - hi, 1.0), cell) / cell)
            n += 1
    return first, weights


@njit(nogil=True)
def _area_resize(image: np.ndarray, top: int, bottom: int, left: int, right: int, out: np.ndarray) -> None:
    """`out` (H x W x 3 uint8) <- the area resize of `image[top:bottom, left:right]` (H' x W' x 3
    uint8), byte for byte OpenCV's INTER_AREA when :func:`generic_area_case` holds. Only called from
    :data:`area_resize_kernel`, so only ever compiled with its flags (see the module docstring).

    Each source row's horizontal sums are computed once, one output pixel at a time with its three
    channels side by side, into a float32 H' x 3W buffer; the vertical sums then run along its rows."""
    out_height, out_width = out.shape[0], out.shape[1]
    crop_height, crop_width = bottom - top, right - left
    x_first, x_weights = area_weights(crop_width, out_width)
    y_first, y_weights = area_weights(crop_height, out_height)
    values = out_width * 3
    taps = np.ones(out_width, np.int64)  # source pixels per output column (the weights are > 0)
    for d in range(out_width):
        while taps[d] < x_weights.shape[1] and x_weights[d, taps[d]] != 0:
            taps[d] += 1
    sums = np.empty((crop_height, values), np.float32)
    for y in range(crop_height):
        line = image[top + y].reshape(-1)
        row = sums[y]
        for d in range(out_width):
            s = (left + x_first[d]) * 3
            w = x_weights[d, 0]
            r, g, b = np.float32(line[s]) * w, np.float32(line[s + 1]) * w, np.float32(line[s + 2]) * w
            for j in range(1, taps[d]):
                w = x_weights[d, j]
                s += 3
                r = r + np.float32(line[s]) * w
                g = g + np.float32(line[s + 1]) * w
                b = b + np.float32(line[s + 2]) * w
            row[3 * d], row[3 * d + 1], row[3 * d + 2] = r, g, b
    acc = np.empty(values, np.float32)
    for e in range(out_height):
        beta, first = y_weights[e, 0], sums[y_first[e]]
        for i in range(values):
            acc[i] = beta * first[i]
        for k in range(1, y_weights.shape[1]):
            beta = y_weights[e, k]
            if beta == 0:
                break  # past this output row's last source row
            row = sums[y_first[e] + k]
            for i in range(values):
                acc[i] = acc[i] + beta * row[i]
        line = out[e].reshape(-1)
        for i in range(values):
            line[i] = np.uint8(min(max(np.rint(acc[i]), np.float32(0)), np.float32(255)))


_BYTES = types.CPointer(types.uint8)


@cfunc(types.int32(_BYTES, types.int64, types.int64, types.int64, types.int64, types.int64, types.int64,
                   _BYTES, types.int64, types.int64), cache=True, nogil=True)
def area_resize_kernel(image_data, height, width, top, bottom, left, right, out_data, out_height, out_width):
    """C callback: resize the crop `[top:bottom, left:right]` of a C-contiguous height x width x 3
    uint8 image into a C-contiguous out_height x out_width x 3 uint8 output when
    :func:`generic_area_case` holds, and return 1; otherwise touch nothing and return 0."""
    if not generic_area_case(bottom - top, right - left, out_height, out_width):
        return 0
    image = carray(image_data, (height, width, 3))
    out = carray(out_data, (out_height, out_width, 3))
    _area_resize(image, top, bottom, left, right, out)
    return 1


_call_area_resize_kernel = area_resize_kernel.ctypes


@njit(nogil=True)
def resize_area_crop(image: np.ndarray, top: int, bottom: int, left: int, right: int, out: np.ndarray) -> bool:
    """Resize `image[top:bottom, left:right]` (H' x W' x 3 uint8) into `out` (H x W x 3 uint8,
    C-contiguous) with OpenCV's INTER_AREA bytes when :func:`generic_area_case` holds, returning
    True; otherwise leave `out` as it is and return False (the caller then uses OpenCV). Callable from
    Python and from jitted code with any flags: the arithmetic is :data:`area_resize_kernel`'s."""
    if not out.flags.c_contiguous:
        raise ValueError("resize_area_crop: the output must be C-contiguous")
    source = np.ascontiguousarray(image)
    return _call_area_resize_kernel(source.ctypes, source.shape[0], source.shape[1], top, bottom, left, right,
                                    out.ctypes, out.shape[0], out.shape[1]) == 1
