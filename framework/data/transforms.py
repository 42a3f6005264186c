"""Standard transforms per kind of dataset.

- digits (MNIST, Fashion-MNIST): pad-and-crop (+ horizontal flip for Fashion-MNIST) when training,
  resize when `input_size` differs from 28, gray replicated to RGB when `channels=3`.
- natural images (ImageFolder, ImageNet): RandomResizedCrop + flip for training, resize to
  `input_size / 0.875` and centre crop for evaluation (the usual ImageNet protocol).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torchvision import transforms as T

if TYPE_CHECKING:
    from framework.data.spec import DatasetSpec


def normalisation(spec: DatasetSpec, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) per channel that images of `spec` are normalised with at `channels` channels."""
    mean, std = spec.mean, spec.std
    if len(mean) != channels:  # gray statistics replicated, or RGB statistics averaged to gray
        mean = (sum(mean) / len(mean),) * channels
        std = (sum(std) / len(std),) * channels
    return tuple(mean), tuple(std)


def _normalise(spec: DatasetSpec, channels: int) -> T.Normalize:
    return T.Normalize(*normalisation(spec, channels))


def build_transform(spec: DatasetSpec, input_size: int | None, channels: int, train: bool, augment: bool):
    """The transform for one split of `spec` at `input_size` pixels and `channels` channels."""
    steps: list = []
    if spec.kind == "digits":
        size = int(input_size or spec.native_size)
        if train and augment:
            steps.append(T.RandomCrop(spec.native_size, padding=2))
            if spec.hflip:
                steps.append(T.RandomHorizontalFlip())
        if size != spec.native_size:
            steps.append(T.Resize(size, antialias=True))
        if channels != spec.native_channels:
            steps.append(T.Grayscale(num_output_channels=channels))
    else:
        size = int(input_size or 224)
        if channels == 1:
            steps.append(T.Grayscale(num_output_channels=1))
        if train and augment:
            steps += [T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip()]
        else:
            steps += [T.Resize(int(round(size / 0.875)), antialias=True), T.CenterCrop(size)]
    steps += [T.ToTensor(), _normalise(spec, channels)]
    return T.Compose(steps)
