"""One compiled FFCV stage for photos on the CPU: flip, normalisation and layout in a single pass.

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
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State


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
