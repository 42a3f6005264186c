"""Compiled FFCV stages for photos: the crop decoders with a faster area resize, and, on the CPU, the
flip, normalisation and layout in a single pass.

Decoders. :class:`AreaRandomResizedCrop` and :class:`AreaCenterCrop` are FFCV's
`RandomResizedCropRGBImageDecoder` and `CenterCropRGBImageDecoder` (same JPEG decode, same crop
draws) with two changes that leave every output byte equal to theirs:

- a crop at least the output size along both axes is resized by
  :func:`framework.data.area_resize.resize_area_crop`, the same arithmetic as OpenCV's INTER_AREA in
  fewer passes (about half its time, benchmarks/README.md), compiled on its own so that the fast-math
  flags FFCV compiles this stage with cannot reach it; other crops go through FFCV's OpenCV call;
- a JPEG is decoded into memory allocated for that image (reused by the allocator from one image to
  the next), not into a slot of a per-batch buffer of `batch_size x` the largest image of the
  dataset that FFCV allocates anew, with `batches_ahead + 2` batches of them, every epoch (fresh
  memory, whose first touch costs time on every image; benchmarks/README.md).

After the decoder, FFCV's stock pipeline for a training photo makes three passes over every batch:
`RandomHorizontalFlip` (a copy, flipped or not), `NormalizeImage` (a lookup table from uint8 to
float32, still height x width x channel) and `ToTorchImage` (a channels-last view that the first
convolution then copies). :class:`FlipNormaliseToCHW` does all three in one numba loop::

    out[i, c, y, x] = table[image[i, y, x' , c], c],   x' = W - 1 - x if flip_i else x
    table[v, c]     = (v - 255 * mean_c) / (255 * std_c)                 (float32)

with `flip_i` drawn with probability `flip_prob` per image (FFCV's own generator, as its flip), and
writes a contiguous N x C x H x W float32 array: `ToTensor` after it is a view, and the model gets the
layout it computes in. The table is NormalizeImage's, so the values equal the stock pipeline's bit
for bit (tests/unit/test_ffcv.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State

from framework.data.area_resize import resize_area_crop


def normalisation_table(mean_255: np.ndarray, std_255: np.ndarray) -> np.ndarray:
    """(256, C) float32: `(v - mean) / std` for every uint8 value `v` (NormalizeImage's table)."""
    table = (np.arange(256)[:, None] - np.asarray(mean_255)[None, :]) / np.asarray(std_255)[None, :]
    return np.ascontiguousarray(table.astype(np.float32))


class FlipNormaliseToCHW(Operation):
    """uint8 N x H x W x C -> float32 N x C x H x W, normalised, each image flipped with `flip_prob`."""

    def __init__(self, mean_255: np.ndarray, std_255: np.ndarray, flip_prob: float = 0.0):
        super().__init__()
        self.table = normalisation_table(mean_255, std_255)
        self.flip_prob = float(flip_prob)

    def generate_code(self) -> Callable:
        table, flip_prob = self.table, self.flip_prob
        channels = table.shape[1]
        my_range = Compiler.get_iterator()

        def flip_normalise(images, dst):
            n, height, width = images.shape[0], images.shape[1], images.shape[2]
            flips = np.random.rand(n) < flip_prob
            for i in my_range(n):
                flip = flips[i]
                for y in range(height):
                    for x in range(width):
                        source = width - 1 - x if flip else x
                        for c in range(channels):
                            dst[i, c, y, x] = table[images[i, y, source, c], c]
            return dst

        flip_normalise.is_parallel = True
        return flip_normalise

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        height, width, channels = previous_state.shape
        if channels != self.table.shape[1]:
            raise ValueError(f"FlipNormaliseToCHW: {channels}-channel images for a {self.table.shape[1]}-channel table")
        shape = (channels, height, width)
        return (replace(previous_state, shape=shape, dtype=np.dtype(np.float32), jit_mode=True),
                AllocationQuery(shape, np.dtype(np.float32)))


class _AreaResizeDecoding:
    """The decode of FFCV's crop decoders with the changes of the module docstring; mixed into a
    subclass of FFCV's `ResizedCropRGBImageDecoder` (which provides `output_size`, `scale`, `ratio`,
    `get_crop_generator` and `memory_read`)."""

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        state, (output, _per_sample_scratch) = super().declare_state_and_memory(previous_state)  # type: ignore[misc]
        return state, output

    def generate_code(self) -> Callable:
        jpeg = IMAGE_MODES["jpg"]
        read = self.memory_read  # type: ignore[attr-defined]
        samples = Compiler.get_iterator()
        decode_jpeg = Compiler.compile(imdecode)
        opencv_resize = Compiler.compile(resize_crop)
        draw_crop = Compiler.compile(self.get_crop_generator)  # type: ignore[attr-defined]
        scale = np.zeros(2) if self.scale is None else np.asarray(self.scale, dtype=np.float64)  # type: ignore[attr-defined]
        ratio = np.asarray(self.ratio, dtype=np.float64) if isinstance(self.ratio, tuple) else float(self.ratio)  # type: ignore[attr-defined]

        def decode_crop_resize(indices, destination, metadata, storage_state):
            for i in samples(len(indices)):
                field = metadata[indices[i]]
                data = read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpeg:
                    pixels = np.empty(height * width * 3, dtype=np.uint8)
                    decode_jpeg(data, pixels, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = pixels.reshape(height, width, 3)
                else:
                    image = data.reshape(height, width, 3)
                top, left, crop_height, crop_width = draw_crop(height, width, scale, ratio)
                if not resize_area_crop(image, top, top + crop_height, left, left + crop_width, destination[i]):
                    opencv_resize(image, top, top + crop_height, left, left + crop_width, destination[i])
            return destination[:len(indices)]

        decode_crop_resize.is_parallel = True
        return decode_crop_resize


class AreaRandomResizedCrop(_AreaResizeDecoding, RandomResizedCropRGBImageDecoder):
    """FFCV's `RandomResizedCropRGBImageDecoder` (same arguments, same output bytes), faster."""


class AreaCenterCrop(_AreaResizeDecoding, CenterCropRGBImageDecoder):
    """FFCV's `CenterCropRGBImageDecoder` (same arguments, same output bytes), faster."""
