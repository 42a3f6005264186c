"""Loader throughput on JPEGs: the FFCV loader against torchvision's ImageFolder with a DataLoader.

Measures, in one run, the images per second each loader delivers on an ImageNet-shaped JPEG tree
(``scripts/make_imagenet_like.py`` builds one from the real images installed here), both as the
framework builds them for ``data=imagefolder`` training (``framework.data.build_loader``):

- ``torch``: ``torchvision.datasets.ImageFolder`` + ``torch.utils.data.DataLoader`` with
  ``--workers`` worker processes; PIL decodes each JPEG, then ``RandomResizedCrop(224)``,
  ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` (``framework.data.transforms``);
- ``ffcv``: ``data.loader=ffcv`` on a beton written by ``mpq prepare`` in JPEG mode at the tree's own
  resolution and quality (``data.ffcv.write.mode=jpg``, ``max_resolution=null``, quality 90, the
  tree's), so both sides decode full-size JPEGs; libjpeg-turbo decodes, then FFCV's random-resized
  crop (``framework.data.ffcv_ops.AreaRandomResizedCrop``: FFCV's decoder, byte for byte, with a
  faster area resize), the flip and the same normalisation in one pass
  (``framework.data.ffcv_loader``), with ``--workers`` decoding threads.

Same samples (the framework's sampler, same seed), same batch size, same crop size, same worker
count, both yielding normalised float batches. Each side takes ``--warmup`` batches (worker start-up,
FFCV's JIT compilation), then ``--batches`` batches are timed with ``time.perf_counter()``. The sides
alternate over ``--rounds`` rounds (the first side rotating) and the median per side is reported.
After each side the script waits until the process and its children are idle
(``benchmarks.common.settle``): torch's persistent workers go on decoding the batches they had
prefetched (about 1 s of both cores here) and FFCV's thread finishes its batch, which would
otherwise be timed as part of the other side. The waits are printed and stored (``settle_s``).
The beton is written on the first run (``prepare`` skips it afterwards) and is not timed.

    .venv/bin/python scripts/make_imagenet_like.py                  # once: data/imagenet_like
    .venv/bin/python benchmarks/loaders.py [--root data/imagenet_like] [--workers 2] [--batch-size 128]

Targets: ffcv >= 2.0x the images per second of torch in every round (each round's two sides
measured back to back), and >= 2.2x between the medians. ``--json`` writes the figures with the
machine, the targets and whether each is met (``benchmarks/common.py``). The last line printed is
``ratio: ffcv/torch=<x>`` (the medians' ratio). Timings on a shared machine are noisy; only the ratio
of the two sides, measured together, is quoted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import figure, make_result, settle, write_json  # noqa: E402

TARGET = 2.0  # min images/s of FFCV over torchvision, in every round
TARGET_MEDIAN = 2.2  # min images/s of FFCV over torchvision, between the medians of the rounds
SIDES = ("torch", "ffcv")


def parse_args() -> argparse.Namespace:
    from framework.paths import default_data_root

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=default_data_root() / "imagenet_like",
                        help="ImageFolder tree with train/ (scripts/make_imagenet_like.py)")
    parser.add_argument("--beton-dir", type=Path, default=None, help="data.ffcv.dir (default: data/ffcv)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="DataLoader worker processes and FFCV decoding threads")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--size", type=int, default=224, help="RandomResizedCrop output side")
    parser.add_argument("--batches", type=int, default=30, help="timed batches per side and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches before the clock starts")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of alternating torch and ffcv runs")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--bound", action="store_true",
                        help="also time FFCV's JPEG decoder with the random-resized crop alone (uint8, no flip or "
                             "normalisation): the most the FFCV side can deliver on these cores")
    args = parser.parse_args()
    if args.batches < 1 or args.rounds < 1 or args.warmup < 0 or args.workers < 1:
        parser.error("--batches, --rounds and --workers must be >= 1, --warmup >= 0")
    if not (args.root / "train").is_dir():
        parser.error(f"{args.root}/train not found: build the tree with .venv/bin/python scripts/make_imagenet_like.py "
                     f"--out {args.root}")
    return args


def _config(args: argparse.Namespace, loader: str):
    from hydra import compose, initialize_config_dir

    from framework.paths import CONF_DIR

    overrides = [
        "stage=pretrain", "data=imagefolder", f"data.root={args.root.resolve()}", f"data.loader={loader}",
        f"data.num_workers={args.workers}", f"data.input_size={args.size}", "data.channels=3",
        "data.ffcv.write.mode=jpg", "data.ffcv.write.max_resolution=null", "data.ffcv.write.jpeg_quality=90",
    ]
    if args.beton_dir is not None:
        overrides.append(f"data.ffcv.dir={args.beton_dir.resolve()}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def _tree_quality(root: Path) -> int:
    try:
        return int(json.loads((root / "manifest.json").read_text())["options"]["quality"])
    except (OSError, ValueError, KeyError):
        return 90


def measure(loader, epoch: int, warmup: int, batches: int) -> float:
    """Images per second over `batches` batches after `warmup` untimed ones (one fresh pass)."""
    loader.sampler.set_epoch(epoch)
    it = iter(loader)
    try:
        for _ in range(warmup):
            next(it)
        seen = 0
        started = time.perf_counter()
        for _ in range(batches):
            images, labels = next(it)
            seen += len(labels)
        elapsed = time.perf_counter() - started
    finally:
        if hasattr(it, "close"):  # the FFCV loader's generator; torch's persistent workers stay for the next pass
            it.close()
    return seen / elapsed


def decode_bound(beton: str, args: argparse.Namespace) -> float:
    """Images per second of the loader's random-resized-crop decoder alone on `beton` (uint8 batches):
    `framework.data.ffcv_ops.AreaRandomResizedCrop`, FFCV's decoder with the faster area resize."""
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    from framework.data.ffcv_ops import AreaRandomResizedCrop

    loader = Loader(beton, batch_size=args.batch_size, num_workers=args.workers, order=OrderOption.RANDOM, seed=0,
                    drop_last=True, pipelines={"image": [AreaRandomResizedCrop((args.size, args.size)), ToTensor()],
                                               "label": [IntDecoder(), ToTensor()]})
    it = iter(loader)
    try:
        for _ in range(args.warmup):
            next(it)
        seen, started = 0, time.perf_counter()
        for _ in range(args.batches):
            seen += len(next(it)[1])
        return seen / (time.perf_counter() - started)
    finally:
        it.close()


def main() -> int:
    args = parse_args()
    from omegaconf import open_dict

    from framework.data import build_dataset, build_loader
    from framework.data.beton import prepare_betons

    cfgs = {side: _config(args, side) for side in SIDES}
    quality = _tree_quality(args.root)
    for cfg in cfgs.values():
        with open_dict(cfg):
            cfg.data.ffcv.write.jpeg_quality = quality
    prepare_betons(cfgs["ffcv"].data, ["train"])  # untimed; skipped when the beton exists

    dataset = build_dataset(cfgs["torch"].data, "train")
    need = (args.warmup + args.batches) * args.batch_size
    if len(dataset) < need:
        raise SystemExit(f"{args.root}/train has {len(dataset)} images; --warmup + --batches need {need}")
    loaders = {side: build_loader(dataset, args.batch_size, True, cfgs[side].data, seed=0) for side in SIDES}
    print(f"{len(dataset)} JPEGs in {args.root}/train, batch {args.batch_size}, RandomResizedCrop {args.size}, "
          f"{args.workers} workers; {args.warmup} warm-up + {args.batches} timed batches x {args.rounds} rounds")
    rates: dict[str, list[float]] = {side: [] for side in SIDES}
    settled: dict[str, list[float]] = {side: [] for side in SIDES}
    settle()  # building the loaders and the beton check leave nothing running, but make sure
    for r in range(args.rounds):
        order = SIDES if r % 2 == 0 else SIDES[::-1]
        for side in order:
            rate = measure(loaders[side], epoch=r + 1, warmup=args.warmup, batches=args.batches)
            rates[side].append(rate)
            # the side just timed may still be working (torch's workers finish the batches they had
            # prefetched, FFCV's thread its current batch): wait, so the next side is timed alone
            waited = settle()
            settled[side].append(waited)
            print(f"  round {r + 1}  {side:<6} {rate:8.1f} images/s  (busy {waited:.1f} s after its last batch)",
                  flush=True)
    median = {side: statistics.median(rates[side]) for side in SIDES}
    ratio = median["ffcv"] / median["torch"]
    per_round = [f / t for f, t in zip(rates["ffcv"], rates["torch"], strict=True)]
    print(f"torch (ImageFolder + DataLoader): {median['torch']:.1f} images/s")
    print(f"ffcv  (data.loader=ffcv, JPEG):   {median['ffcv']:.1f} images/s")
    bound = decode_bound(loaders["ffcv"].beton, args) if args.bound else None
    if bound is not None:
        print(f"ffcv decoder + crop alone:        {bound:.1f} images/s ({bound / median['torch']:.2f}x torch)")
    print(f"ffcv/torch per round: {' '.join(f'{r:.2f}' for r in per_round)}")
    print(f"target: ffcv >= {TARGET:.1f}x torch in every round -> {'met' if min(per_round) >= TARGET else 'not met'}; "
          f">= {TARGET_MEDIAN:.1f}x between the medians -> {'met' if ratio >= TARGET_MEDIAN else 'not met'}")
    if args.json is not None:
        setting = f"batch {args.batch_size}, crop {args.size}, {args.workers} workers"
        figures = [
            figure(f"torchvision ImageFolder loader, median images/s ({setting})", median["torch"], "images/s"),
            figure(f"FFCV JPEG loader, median images/s ({setting})", median["ffcv"], "images/s"),
            figure(f"FFCV JPEG loader / torchvision ImageFolder loader images/s, lowest of {args.rounds} rounds",
                   min(per_round), "x", (">=", TARGET)),
            figure("FFCV JPEG loader / torchvision ImageFolder loader images/s, between the medians", ratio, "x",
                   (">=", TARGET_MEDIAN)),
        ]
        if bound is not None:
            figures.append(figure("FFCV decoder with the crop alone / torchvision loader images/s", bound / median["torch"], "x"))
        write_json(args.json, make_result(
            "loaders", figures, images=len(dataset), batch_size=args.batch_size, size=args.size,
            workers=args.workers, batches=args.batches, warmup=args.warmup, rounds=args.rounds,
            images_per_s=rates, settle_s=settled, median=median, ratio=ratio, ratio_per_round=per_round,
            target={"every_round": TARGET, "median": TARGET_MEDIAN}, decode_bound=bound,
            cores=len(os.sched_getaffinity(0)),
            versions={p: metadata.version(p) for p in ("torch", "torchvision", "ffcv", "pillow")},
        ))
    print(f"ratio: ffcv/torch={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
