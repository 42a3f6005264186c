"""FFCV `.beton` files: where they live, how `mpq prepare` writes them, how a loader checks them.

A beton holds one split of a registered dataset, every sample of it in the dataset's own order
(subsets such as `data.fraction` or a proxy's few % are chosen at load time by index, so one file
serves them all). Each sample is `image` (an FFCV `RGBImageField`; gray datasets are stored with the
gray value replicated into R, G and B, which the loader takes back to one channel, exactly in raw mode) and
`label` (an `IntField`).

Files are named after what decides their content, so betons written with other options sit side by
side: `<data.ffcv.dir>/<dataset>/<split>-<mode>[-q<quality>][-p<probability>][-max<resolution>].beton`, where
`<dataset>` is the registered name (for an ImageFolder tree, `imagefolder-<folder name>-<hash of
its absolute path>`). Next to each file, `<file>.json` records the write options, the sample count,
the byte size and the source. A beton is written to a temporary name in the same folder and renamed
once complete, then its sidecar is written (atomically too): a beton without its sidecar is an
interrupted or foreign write and is rewritten by `mpq prepare`.

:func:`check_beton` is what a loader calls before it opens a file: a missing file is one
:class:`MPQError` naming the path and the `mpq prepare ...` command that writes it; a truncated or
otherwise corrupt file (wrong size, unreadable header, allocations past the end of the file, another
sample count than the dataset's) is one :class:`MPQError` too, never a crash inside FFCV's reader
(which would read past the end of a memory map).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from framework.data.registry import dataset_root, get_dataset_spec
from framework.errors import MPQError
from framework.results import atomic_write_text

log = logging.getLogger(__name__)

SCHEMA = "mpq-beton/1"
WRITE_MODES = ("raw", "jpg", "proportion")
ORDERS = ("random", "quasi_random")
SPLITS = ("train", "test")


def write_options(data_cfg: Any) -> dict[str, Any]:
    """The options that decide a beton's bytes, from `data_cfg.ffcv.write` (checked by
    framework.config.data): the mode and resolution cap, the JPEG quality unless raw, the share of
    JPEG images in `proportion` mode."""
    write = data_cfg.ffcv.write
    mode = str(write.mode)
    options: dict[str, Any] = {"mode": mode, "max_resolution": int(write.max_resolution) if write.max_resolution else None}
    if mode != "raw":
        options["jpeg_quality"] = int(write.jpeg_quality)
    if mode == "proportion":
        options["compress_probability"] = float(write.compress_probability)
    return options


def dataset_key(data_cfg: Any) -> str:
    """The folder name of a dataset's betons: its registered name, plus the tree's path for ImageFolder."""
    name = str(data_cfg.name)
    spec = get_dataset_spec(name)
    if spec.num_classes is not None:  # a fixed dataset (MNIST, ...): the name says it all
        return name
    root = dataset_root(data_cfg).resolve()
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:8]
    return f"{name}-{root.name or 'root'}-{digest}"


def beton_dir(data_cfg: Any) -> Path:
    """`data.ffcv.dir`, or `ffcv/` in the project's data folder."""
    if data_cfg.ffcv.dir:
        return Path(str(data_cfg.ffcv.dir))
    if get_dataset_spec(str(data_cfg.name)).num_classes is None:
        # an image tree: beside the project's data, not inside the user's (possibly read-only) tree
        from framework.paths import default_data_root

        return default_data_root() / "ffcv"
    return dataset_root(data_cfg) / "ffcv"


def beton_path(data_cfg: Any, split: str) -> Path:
    """Where the beton of `split` of the dataset in `data_cfg`, with its write options, lives."""
    options = write_options(data_cfg)
    tag = options["mode"]
    if "jpeg_quality" in options:
        tag += f"-q{options['jpeg_quality']}"
    if options.get("compress_probability") is not None:
        tag += f"-p{options['compress_probability']:g}"
    if options["max_resolution"]:
        tag += f"-max{options['max_resolution']}"
    return beton_dir(data_cfg) / dataset_key(data_cfg) / f"{split}-{tag}.beton"


def sidecar_path(path: Path) -> Path:
    return Path(str(path) + ".json")


def prepare_command(data_cfg: Any) -> str:
    """The `mpq prepare ...` command that writes the betons `data_cfg` asks for."""
    parts = ["mpq prepare", f"data={data_cfg.name}"]
    if data_cfg.root:
        parts.append(f"data.root={data_cfg.root}")
    if data_cfg.ffcv.dir:
        parts.append(f"data.ffcv.dir={data_cfg.ffcv.dir}")
    options = write_options(data_cfg)
    parts.append(f"data.ffcv.write.mode={options['mode']}")
    parts.append(f"data.ffcv.write.max_resolution={options['max_resolution'] or 'null'}")
    if "jpeg_quality" in options:
        parts.append(f"data.ffcv.write.jpeg_quality={options['jpeg_quality']}")
    if "compress_probability" in options:
        parts.append(f"data.ffcv.write.compress_probability={options['compress_probability']:g}")
    return " ".join(parts)


# -- checking --------------------------------------------------------------------------------------

def _structure(path: Path) -> dict[str, Any]:
    """Header, fields and allocation table of a beton, checked against the file's size, or an error."""
    from ffcv.reader import Reader

    size = path.stat().st_size
    try:
        reader = Reader(str(path))
    except Exception as err:  # noqa: BLE001 - any failure to parse the header is a corrupt file
        raise ValueError(f"unreadable header ({type(err).__name__}: {err})") from None
    fields = {name: type(handler).__name__ for name, handler in reader.handlers.items()}
    if fields != {"image": "RGBImageField", "label": "IntField"}:
        raise ValueError(f"fields {fields}, expected image (RGBImageField) and label (IntField)")
    table = reader.alloc_table
    samples = int(reader.num_samples)
    if int(reader.header["alloc_table_ptr"]) > size:
        raise ValueError("allocation table past the end of the file")
    if samples and (len(table) == 0 or len(np.unique(table["sample_id"])) != samples):
        raise ValueError(f"{len(table)} allocations for {samples} samples")
    if len(table) and int((table["ptr"] + table["size"]).max()) > size:
        raise ValueError("sample data past the end of the file (truncated)")
    meta = reader.metadata[reader.metadata.dtype.names[reader.field_names.index("image")]]
    if samples and int(meta["data_ptr"].max()) > size:
        raise ValueError("image pointers past the end of the file (truncated)")
    return {"samples": samples, "bytes": size}


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """The sidecar of `path`, or None when it is missing or unreadable."""
    try:
        info = json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("schema") == SCHEMA else None


def check_beton(data_cfg: Any, split: str, expected_samples: int | None = None,
                expected_classes: list[str] | None = None) -> tuple[Path, dict[str, Any]]:
    """The beton of `split` for `data_cfg` and its sidecar, after checking that it is whole.

    Raises one :class:`MPQError` naming the file and the `mpq prepare` command that (re)writes it
    when the file is missing, incomplete, truncated, corrupt, or holds another number of samples
    than the dataset (`expected_samples`, the size of the full split) or, for an image tree, other
    class folders (`expected_classes`).
    """
    path = beton_path(data_cfg, split)
    command = prepare_command(data_cfg)
    if not path.is_file():
        raise MPQError(f"data.loader=ffcv: no FFCV file for the {split} split of '{data_cfg.name}' at {path}; "
                       f"write it with: {command}")
    info = read_sidecar(path)
    if info is None:
        raise MPQError(f"data.loader=ffcv: {path} has no valid {sidecar_path(path).name} (an interrupted or foreign "
                       f"write); rewrite it with: {command} prepare.force=true")
    try:
        found = _structure(path)
        if found["bytes"] != int(info.get("bytes", -1)):
            raise ValueError(f"{found['bytes']} bytes, but {info.get('bytes')} were written (truncated or altered)")
        if found["samples"] != int(info.get("samples", -1)):
            raise ValueError(f"{found['samples']} samples, but the sidecar says {info.get('samples')}")
    except ValueError as err:
        raise MPQError(f"data.loader=ffcv: {path} is corrupt: {err}; rewrite it with: {command} "
                       f"prepare.force=true") from None
    if expected_classes is not None and info.get("classes") is not None and list(info["classes"]) != list(expected_classes):
        raise MPQError(f"data.loader=ffcv: {path} was written from other classes than the {split} split of "
                       f"'{data_cfg.name}' now has (the tree changed); rewrite it with: {command} prepare.force=true")
    if expected_samples is not None and int(info["samples"]) != int(expected_samples):
        raise MPQError(f"data.loader=ffcv: {path} holds {info['samples']} samples but the {split} split of "
                       f"'{data_cfg.name}' has {expected_samples} (the dataset changed); rewrite it with: {command} "
                       f"prepare.force=true")
    return path, info


# -- writing ---------------------------------------------------------------------------------------

class _RGBSamples:
    """(H x W x 3 uint8 array, label) for each sample of an opened split, as FFCV's writer wants them.

    Gray images are replicated to RGB. A sample that fails to load is recorded in `error_dir` (one
    file per sample; the writer's worker processes cannot raise to the parent, whose progress loop
    would then wait forever) and replaced by a black pixel; the caller turns the records into an error.
    """

    def __init__(self, dataset: Any, error_dir: Path):
        self.dataset, self.error_dir = dataset, error_dir

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            image, label = self.dataset[index]
            return np.asarray(image.convert("RGB"), dtype=np.uint8), int(label)
        except Exception as err:  # noqa: BLE001 - reported by the parent, see the class docstring
            where = getattr(self.dataset, "samples", None)
            name = where[index][0] if where else f"sample {index}"
            (self.error_dir / f"{index}.txt").write_text(f"{name}: {type(err).__name__}: {err}")
            return np.zeros((1, 1, 3), dtype=np.uint8), 0


def _writer_workers(data_cfg: Any) -> int:
    if data_cfg.ffcv.write.workers:
        return int(data_cfg.ffcv.write.workers)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def write_beton(data_cfg: Any, split: str, force: bool = False) -> dict[str, Any]:
    """Write the beton of `split` for `data_cfg` unless a whole one with the same options exists.

    Returns `{"path", "status": "written"|"skipped", "samples", "bytes", "seconds"}`. FFCV's writer
    shows a progress bar and runs `data.ffcv.write.workers` processes (default: one per core).
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    path = beton_path(data_cfg, split)
    spec = get_dataset_spec(str(data_cfg.name))
    source = spec.open_split(dataset_root(data_cfg), split, None)
    samples = len(source)
    options = write_options(data_cfg)
    if not force and path.is_file():
        try:
            _, info = check_beton(data_cfg, split, samples, getattr(source, "classes", None))
        except MPQError as err:
            log.warning("%s; writing it again", err)
        else:
            if info.get("options") == options:
                log.info("%s is up to date (%d samples); prepare.force=true rewrites it", path, samples)
                return {"path": str(path), "status": "skipped", "samples": samples, "bytes": info["bytes"], "seconds": 0.0}
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp, error_dir = Path(tmp_name), Path(tempfile.mkdtemp(prefix=".errors.", dir=path.parent))
    try:
        write = data_cfg.ffcv.write
        image_field = RGBImageField(write_mode=options["mode"], max_resolution=options["max_resolution"],
                                    jpeg_quality=int(write.jpeg_quality), compress_probability=float(write.compress_probability))
        writer = DatasetWriter(str(tmp), {"image": image_field, "label": IntField()}, num_workers=_writer_workers(data_cfg))
        print(f"mpq prepare: writing {samples} samples of {data_cfg.name}/{split} ({options['mode']}) to {path}", flush=True)
        writer.from_indexed_dataset(_RGBSamples(source, error_dir))
        failures = sorted(error_dir.glob("*.txt"), key=lambda p: int(p.stem))
        if failures:
            raise MPQError(f"{len(failures)} image(s) of {data_cfg.name}/{split} could not be read, e.g. "
                           f"{failures[0].read_text().strip()}; fix or remove them and run mpq prepare again")
        found = _structure(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        sidecar_path(path).unlink(missing_ok=True)  # a kill after the rename leaves a file without a sidecar: rewritten
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(error_dir, ignore_errors=True)
    classes = getattr(source, "classes", None)
    info = {"schema": SCHEMA, "dataset": str(data_cfg.name), "split": split, "options": options,
            "samples": found["samples"], "bytes": found["bytes"], "source": str(dataset_root(data_cfg).resolve()),
            "classes": list(classes) if classes is not None else None, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(sidecar_path(path), json.dumps(info, indent=2) + "\n")
    return {"path": str(path), "status": "written", "samples": samples, "bytes": found["bytes"],
            "seconds": round(time.time() - started, 2)}


def prepare_betons(data_cfg: Any, splits: Any = SPLITS, force: bool = False) -> list[dict[str, Any]]:
    """Write (or find up to date) the betons of `splits` of the dataset in `data_cfg`."""
    splits = [splits] if isinstance(splits, str) else list(splits)
    unknown = [split for split in splits if split not in SPLITS]
    if unknown or not splits:
        raise MPQError(f"prepare.splits={splits!r}: unknown or no split {unknown[:1]}; choose from {', '.join(SPLITS)}")
    reports = []
    for split in splits:
        report = write_beton(data_cfg, str(split), force=force)
        print(f"mpq prepare: {report['status']} {report['path']} ({report['samples']} samples, "
              f"{report['bytes'] / 1e6:.1f} MB)", flush=True)
        reports.append({"dataset": str(data_cfg.name), "split": str(split), **report})
    return reports
