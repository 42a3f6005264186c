"""`data` (the target dataset) and `proxy` (the search's dataset): one schema for both.

Checks the dataset name against framework.data's registry, the subset (fractions in (0, 1],
per-class counts), the image geometry (1 or 3 channels), the loader (framework.data.loaders'
LOADERS) and the FFCV options (orders and write modes of framework.data.beton, JPEG quality
1-100, compress probability in [0, 1]).
"""

from framework.config.types import Flag, Schema, Text, between, one_of, whole


def _datasets() -> list[str]:
    from framework.data.registry import available_datasets

    return available_datasets()


def _loaders() -> tuple[str, ...]:
    from framework.data.loaders import LOADERS

    return LOADERS


def _orders() -> tuple[str, ...]:
    from framework.data.beton import ORDERS  # (no FFCV import)

    return ORDERS


def _write_modes() -> tuple[str, ...]:
    from framework.data.beton import WRITE_MODES

    return WRITE_MODES


def _photo_decoders() -> tuple[str, ...]:
    from framework.data.ffcv_loader import PHOTO_DECODERS

    return PHOTO_DECODERS


class FFCVWrite(Schema):
    """`<node>.ffcv.write`: how `mpq prepare` stores the images (the options name the file)."""

    mode: one_of(_write_modes)
    max_resolution: whole(1) | None
    jpeg_quality: whole(1, 100)
    compress_probability: between(0, 1)
    workers: whole(1) | None


class FFCV(Schema):
    """`<node>.ffcv`: where the betons are and how the FFCV loader reads them."""

    dir: Text | None
    order: one_of(_orders)
    os_cache: Flag
    batches_ahead: whole(1)
    decoder: one_of(_photo_decoders)
    write: FFCVWrite


class DataConfig(Schema):
    """A dataset node (`data` or `proxy`): which registered dataset, which subset, which loader."""

    name: one_of(_datasets)
    root: Text | None
    input_size: whole(1) | None
    channels: one_of((1, 3))
    fraction: between(0, 1, low_open=True) | None
    per_class: whole(1) | None
    test_fraction: between(0, 1, low_open=True) | None
    val_fraction: between(0, 1, high_open=True)
    seed: whole(0)
    augment: Flag
    loader: one_of(_loaders)
    num_workers: whole(0)
    ffcv: FFCV
