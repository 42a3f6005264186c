"""The FFCV crop decoders of framework.data.ffcv_ops give the bytes FFCV's own decoders give: the area
resize equals OpenCV's INTER_AREA (through FFCV's call of it) on any crop it takes, and the decoders,
which also decode into other memory, equal FFCV's stock ones batch for batch on a JPEG beton."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from framework.data.area_resize import area_weights, generic_area_case, resize_area_crop


def _opencv(image: np.ndarray, top: int, bottom: int, left: int, right: int, shape: tuple[int, int]) -> np.ndarray:
    from ffcv.libffcv import resize_crop

    out = np.zeros((*shape, 3), np.uint8)
    resize_crop(image, top, bottom, left, right, out)
    return out


def _image(rng: np.random.Generator, height: int, width: int, smooth: bool) -> np.ndarray:
    """Noise (every value, every rounding) or a smooth gradient with noise (values near .5 boundaries)."""
    if not smooth:
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    y, x = np.mgrid[0:height, 0:width]
    base = (x * 255.0 / max(width - 1, 1))[..., None] * np.array([1.0, 0.5, 0.25]) + (y % 7)[..., None]
    return np.clip(base + rng.integers(-2, 3, (height, width, 3)), 0, 255).astype(np.uint8)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(height=st.integers(2, 160), width=st.integers(2, 160), crop=st.tuples(*(st.floats(0, 1),) * 6),
       smooth=st.booleans(), seed=st.integers(0, 2**16))
def test_the_area_resize_gives_opencvs_bytes(height, width, crop, smooth, seed):
    ch, cw = max(1, round(crop[0] * height)), max(1, round(crop[1] * width))
    top, left = round(crop[2] * (height - ch)), round(crop[3] * (width - cw))
    out_h, out_w = max(1, round(crop[4] * ch)), max(1, round(crop[5] * cw))  # the area path: out <= crop
    assume(generic_area_case(ch, cw, out_h, out_w))
    image = _image(np.random.default_rng(seed), height, width, smooth)
    ours = np.zeros((out_h, out_w, 3), np.uint8)
    assert resize_area_crop(image, top, top + ch, left, left + cw, ours)
    np.testing.assert_array_equal(ours, _opencv(image, top, top + ch, left, left + cw, (out_h, out_w)))


@pytest.mark.parametrize("crop,out", [((300, 420), (224, 224)), ((419, 301), (224, 224)), ((2000, 1500), (224, 224)),
                                      ((225, 224), (224, 224)), ((500, 375), (256, 192))])
def test_imagenet_sized_crops_give_opencvs_bytes(crop, out):
    """The sizes the training pipeline sees (photos of a few hundred pixels, ImageNet's large ones, a
    crop one pixel over the output) on noise."""
    image = _image(np.random.default_rng(1), crop[0] + 7, crop[1] + 5, smooth=False)
    assert generic_area_case(crop[0], crop[1], *out)
    ours = np.zeros((*out, 3), np.uint8)
    assert resize_area_crop(image, 3, 3 + crop[0], 2, 2 + crop[1], ours)
    np.testing.assert_array_equal(ours, _opencv(image, 3, 3 + crop[0], 2, 2 + crop[1], out))


def test_other_geometries_are_left_to_opencv():
    """Upscaling along an axis, exact integer ratios and no resize are other OpenCV paths."""
    assert not generic_area_case(100, 300, 224, 224)  # taller side upscaled
    assert not generic_area_case(448, 448, 224, 224)  # 2x: OpenCV's integer fast path
    assert not generic_area_case(224, 224, 224, 224)  # a copy
    assert generic_area_case(448, 449, 224, 224)      # not integer along one axis: generic
    image, out = np.full((448, 448, 3), 7, np.uint8), np.zeros((224, 224, 3), np.uint8)
    assert not resize_area_crop(image, 0, 448, 0, 448, out) and not out.any()  # declined, output untouched


_FAST_MATH_CALLER = """
import numpy as np
from ffcv.libffcv import resize_crop
from numba import njit

from framework.data.area_resize import resize_area_crop


@njit(fastmath=True, nogil=True, error_model="numpy")
def fast_math_decoder_step(image, out):
    return resize_area_crop(image, 0, image.shape[0], 0, image.shape[1], out)


rng = np.random.default_rng(0)
for height, width in rng.integers(230, 500, (200, 2)):
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    out, reference = np.zeros((224, 224, 3), np.uint8), np.zeros((224, 224, 3), np.uint8)
    assert fast_math_decoder_step(image, out)
    resize_crop(image, 0, height, 0, width, reference)
    np.testing.assert_array_equal(out, reference, err_msg=f"{height} x {width} to 224 x 224")
"""


@pytest.mark.slow  # a new process compiling with an empty numba cache: `make test-all`
@pytest.mark.compile
def test_a_fast_math_caller_gets_the_same_bytes(tmp_path):
    """FFCV compiles its decoders with `fastmath=True`. In a fresh process with an empty numba cache,
    where such a caller is the first to call the resize, the resize still gives OpenCV's bytes.
    Before the resize was compiled on its own, ~0.02 % of the bytes came out 1 off this way."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}
    run = subprocess.run([sys.executable, "-c", _FAST_MATH_CALLER], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_area_weights_sum_to_one_per_output_cell():
    first, weights = area_weights(301, 224)
    assert np.allclose(weights.sum(axis=1), 1.0, atol=1e-5)
    assert np.all(np.diff(first) >= 0) and first[0] == 0 and first[-1] + np.count_nonzero(weights[-1]) == 301


def _jpeg_beton(tmp_path, sizes):
    """A JPEG beton of random photos of the given (width, height) sizes, written by `mpq prepare`."""
    from PIL import Image

    from framework.data.beton import write_beton
    from tests.conftest import compose_config

    rng = np.random.default_rng(0)
    for c in range(2):
        folder = tmp_path / "tree" / "train" / f"class_{c}"
        folder.mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(_image(rng, h, w, smooth=bool(i % 2))).save(folder / f"{i}.jpg", quality=90)
    (tmp_path / "tree" / "val").mkdir()
    cfg = compose_config("pretrain", ["data=imagefolder", f"data.root={tmp_path / 'tree'}",
                                      f"data.ffcv.dir={tmp_path / 'betons'}", "data.ffcv.write.mode=jpg",
                                      "data.ffcv.write.max_resolution=null", "data.ffcv.write.jpeg_quality=90",
                                      "data.ffcv.write.workers=1"]).data
    return write_beton(cfg, "train")["path"]


def _crop_table(height, width, _scale, _ratio):
    """Deterministic crops over every path: downscale, upscale along one axis, exact halves, whole."""
    kind = (height * 7 + width) % 4
    if kind == 0:
        return 1, 2, height - 3, width - 2
    if kind == 1:
        return 0, 0, min(height, 90), width
    if kind == 2:
        return 0, 0, 2 * (height // 4), 2 * (width // 4)
    return 0, 0, height, width


def test_the_decoders_give_ffcvs_stock_batches(tmp_path):
    """A non-square output (40 x 72), so the crops of `_crop_table` take both OpenCV's paths and ours."""
    size = (40, 72)
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    from framework.data.ffcv_ops import AreaCenterCrop, AreaRandomResizedCrop

    class StockFixed(RandomResizedCropRGBImageDecoder):
        get_crop_generator = property(lambda self: _crop_table)  # FFCV compiles it

    class OursFixed(AreaRandomResizedCrop):
        get_crop_generator = property(lambda self: _crop_table)  # FFCV compiles it

    path = _jpeg_beton(tmp_path, [(131, 97), (97, 131), (200, 150), (64, 64), (129, 256), (90, 45), (150, 201)])

    def batches(decoder):
        loader = Loader(path, batch_size=5, num_workers=2, order=OrderOption.SEQUENTIAL, drop_last=False,
                        pipelines={"image": [decoder], "label": [IntDecoder()]})
        return np.concatenate([images.copy() for images, _ in loader])

    for stock, ours in ((StockFixed(size), OursFixed(size)),
                        (CenterCropRGBImageDecoder(size, ratio=0.875), AreaCenterCrop(size, ratio=0.875))):
        expected, got = batches(stock), batches(ours)
        assert got.shape == expected.shape == (14, size[0], size[1], 3)
        np.testing.assert_array_equal(got, expected)
