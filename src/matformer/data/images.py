"""Images for MatViT: scikit-learn's bundled handwritten digits, or a folder of class folders.

- `digits` (the default): scikit-learn's `load_digits`, 1,797 real 8x8 grayscale scans of the
  digits 0-9 (the UCI optical-recognition test set) that ship inside the scikit-learn wheel —
  nothing is downloaded. Pixel values 0..16 are scaled to [0, 1].
- A folder: one sub-folder per class (sorted names are the classes), PNG/JPEG/BMP/GIF/WebP
  images read with Pillow, converted to grayscale or RGB for `num_channels` and resized to
  `image_size` x `image_size` (bilinear). All images are held in memory as float32.

Either way the images are split once, by a fixed seed and stratified by class, into train and
held-out parts, and normalised per channel with the training part's mean and standard deviation
(recorded in `Normalisation`, which a checkpoint keeps so evaluation normalises the same way).
`BatchSampler` draws training batches in a seeded per-epoch order whose position can be saved and
restored, so a resumed run sees the same batches.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from matformer.data.text import DEFAULT_VAL_FRACTION, saved_position
from matformer.errors import ConfigError, DataError
from matformer.io.metadata import Fields, read_json

DIGITS = "digits"
PREPROCESSOR_FILE = "preprocessor_config.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
HELDOUT_FRACTION = 0.2
MIN_STD = 1e-6
"""Smallest per-channel std a normalisation may hold (`Normalisation.fit` clamps to it)."""
MAX_STD = 1e6
"""Largest |mean| or std: pixels are in [0, 1] (or 0..255 unscaled); beyond this is damage."""
SPLIT_SEED = 0


@dataclass
class Images:
    """Images (N, C, S, S) float32, labels (N,) int64 in 0..len(class_names)-1."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Images:
        return Images(self.images[index], self.labels[index], self.class_names, self.source)


@dataclass
class Normalisation:
    """Per-channel (x - mean) / std, with the statistics of the training split."""

    mean: list[float]
    std: list[float]

    @classmethod
    def fit(cls, images: np.ndarray) -> Normalisation:
        mean = images.mean(axis=(0, 2, 3), dtype=np.float64)
        std = images.std(axis=(0, 2, 3), dtype=np.float64)
        return cls([float(m) for m in mean], [float(max(s, MIN_STD)) for s in std])

    def apply(self, images: np.ndarray) -> np.ndarray:
        mean = np.asarray(self.mean, dtype=np.float32)[None, :, None, None]
        std = np.asarray(self.std, dtype=np.float32)[None, :, None, None]
        return ((images - mean) / std).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """transformers' image-processor keys, so the statistics travel with a checkpoint."""
        return {"image_mean": self.mean, "image_std": self.std}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> Normalisation:
        """The statistics a preprocessor_config.json records, checked: finite means, stds in
        [MIN_STD, MAX_STD] (a NaN, infinite or 1e-40 std would normalise every image to
        garbage and score chance level instead of failing), as many of each."""
        f = Fields(d, source, DataError)
        mean = f.numbers("image_mean", lo=-MAX_STD, hi=MAX_STD, max_length=64)
        std = f.numbers("image_std", lo=MIN_STD, hi=MAX_STD, length=len(mean))
        return cls(mean, std)


@dataclass
class ImageSplit:
    """The normalised train and held-out parts of one image source."""

    train: Images
    heldout: Images
    normalisation: Normalisation


def _resize(array: np.ndarray, size: int) -> np.ndarray:
    """(H, W) or (H, W, C) float32 -> (size, size[, C]) by Pillow's bilinear filter."""
    if array.shape[0] == size and array.shape[1] == size:
        return array
    Image = _pillow()
    planes = array[..., None] if array.ndim == 2 else array
    out = [np.asarray(Image.fromarray(np.ascontiguousarray(planes[..., c]), mode="F")
                      .resize((size, size), Image.BILINEAR)) for c in range(planes.shape[-1])]
    stacked = np.stack(out, axis=-1)
    return stacked[..., 0] if array.ndim == 2 else stacked


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading or resizing images needs Pillow: pip install 'matformer[vision]'") from None
    return Image


def load_digits(image_size: int = 8, num_channels: int = 1) -> Images:
    """scikit-learn's bundled 8x8 digits as (1797, C, S, S) float32 in [0, 1]."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise DataError("the digits data needs scikit-learn: pip install 'matformer[vision]'") from None
    bunch = sk_load_digits()
    images = bunch.images.astype(np.float32) / 16.0  # (N, 8, 8), values 0..16
    if image_size != 8:
        images = np.stack([_resize(im, image_size) for im in images])
    images = np.repeat(images[:, None], num_channels, axis=1)
    names = [str(n) for n in bunch.target_names]
    return Images(np.ascontiguousarray(images), bunch.target.astype(np.int64), names, DIGITS)


def _read_image(path: Path, image_size: int, num_channels: int) -> np.ndarray:
    Image = _pillow()
    try:
        with warnings.catch_warnings():  # a decompression bomb is refused, not decoded
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im = im.convert("L" if num_channels == 1 else "RGB")
                im = im.resize((image_size, image_size), Image.BILINEAR)
                array = np.asarray(im, dtype=np.float32) / 255.0
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{path}: refused as a decompression bomb ({str(e)[:160]}); resize "
                        f"the image or remove it from the folder") from None
    except (OSError, ValueError, SyntaxError) as e:  # SyntaxError: some damaged headers
        raise DataError(f"{path}: cannot read as an image ({str(e)[:200]})") from None
    return array[None] if num_channels == 1 else array.transpose(2, 0, 1)  # (C, S, S)


def load_image_folder(folder: str | os.PathLike, image_size: int, num_channels: int) -> Images:
    """One sub-folder per class; every image file inside (not recursing further) is one sample."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (give --data digits or a folder with one "
                        f"sub-folder of images per class)")
    if num_channels not in (1, 3):
        raise ConfigError(f"num_channels={num_channels}: image folders load as 1 (grayscale) or 3 (RGB)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"{root}: found {len(classes)} class sub-folder(s); an image folder needs "
                        f"one sub-folder per class, at least two")
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{root / name}: no images ({', '.join(IMAGE_SUFFIXES)}) in this class folder")
        for f in files:
            images.append(_read_image(f, image_size, num_channels))
            labels.append(label)
    return Images(np.stack(images).astype(np.float32), np.asarray(labels, dtype=np.int64), classes,
                  str(root.resolve()))


def load_images(data: str | os.PathLike | None, image_size: int, num_channels: int) -> Images:
    """`None` or "digits": the bundled digits; anything else: an image folder."""
    if data is None or str(data) == DIGITS:
        return load_digits(image_size, num_channels)
    return load_image_folder(data, image_size, num_channels)


def heldout_fraction(val_fraction: float) -> float:
    """A run's `--val-fraction` for images: the text default (5% of documents) means 20%."""
    return HELDOUT_FRACTION if val_fraction == DEFAULT_VAL_FRACTION else val_fraction


def stratified_split(labels: np.ndarray, heldout_fraction: float = HELDOUT_FRACTION,
                     seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held-out), each class split in the same proportion (scikit-learn's
    `train_test_split` with `stratify`), fixed by `seed`; both sorted."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ConfigError(f"held-out fraction must be in (0, 1), got {heldout_fraction}")
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min() < 2:
        c = int(classes[counts.argmin()])
        raise DataError(f"class {c} has {counts.min()} image; a train/held-out split needs at "
                        f"least 2 per class")
    n_heldout = max(len(classes), round(len(labels) * heldout_fraction))
    if len(labels) - n_heldout < len(classes):
        raise DataError(f"{len(labels)} images in {len(classes)} classes are too few to hold out "
                        f"{heldout_fraction:.0%} and still train on every class")
    try:
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DataError("splitting images needs scikit-learn: pip install 'matformer[vision]'") from None
    train, heldout = train_test_split(np.arange(len(labels)), test_size=n_heldout,
                                      stratify=labels, random_state=seed)
    return np.sort(train), np.sort(heldout)


def load_split(data: str | os.PathLike | None, image_size: int, num_channels: int, *,
               heldout_fraction: float = HELDOUT_FRACTION, seed: int = SPLIT_SEED,
               normalisation: Normalisation | None = None) -> ImageSplit:
    """Load, split (stratified, fixed seed) and normalise with the training part's statistics
    (or with `normalisation`, e.g. the one a checkpoint was trained with)."""
    images = load_images(data, image_size, num_channels)
    train_idx, heldout_idx = stratified_split(images.labels, heldout_fraction, seed)
    train, heldout = images.subset(train_idx), images.subset(heldout_idx)
    norm = normalisation or Normalisation.fit(train.images)
    if len(norm.mean) != num_channels:
        raise DataError(f"the normalisation has {len(norm.mean)} channel(s), the images {num_channels}")
    train.images, heldout.images = norm.apply(train.images), norm.apply(heldout.images)
    return ImageSplit(train, heldout, norm)


def preprocessor_json(image_size: int, norm: Normalisation) -> str:
    """transformers' ViTImageProcessor settings for 8-bit images: resize, rescale by 1/255, then
    the per-channel normalisation (the bundled digits, 0..16, are rescaled by 1/16 instead)."""
    d = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "resample": 2,
         "size": {"height": image_size, "width": image_size}, "do_rescale": True,
         "rescale_factor": 1 / 255, "do_normalize": True, **norm.to_dict()}
    return json.dumps(d, indent=2) + "\n"


def read_normalisation(folder: str | os.PathLike) -> Normalisation | None:
    """The normalisation a checkpoint folder records (None when it has no preprocessor file)."""
    path = Path(folder) / PREPROCESSOR_FILE
    if not path.is_file():
        return None
    return Normalisation.from_dict(read_json(path, DataError, "image normalisation"), str(path))


class BatchSampler:
    """Batches of training indices in a seeded permutation per epoch; the position (epoch,
    index) is saved by `state()` and restored by `load_state()`, so a resumed run sees the same
    batches. A batch never spans two epochs' orders out of sequence: it wraps to the next epoch."""

    def __init__(self, num_items: int, seed: int) -> None:
        if num_items < 1:
            raise DataError("the training split is empty")
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self) -> np.ndarray:
        if self._perm is None or self._perm[0] != self.epoch:
            self._perm = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items))
        return self._perm[1]

    def next(self, n: int) -> np.ndarray:
        """The next `n` indices (int64)."""
        out = np.empty(n, dtype=np.int64)
        for i in range(n):
            if self.index >= self.num_items:
                self.epoch, self.index = self.epoch + 1, 0
            out[i] = self._order()[self.index]
            self.index += 1
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_items": self.num_items}

    def load_state(self, state: dict[str, Any]) -> None:
        for k in ("seed", "num_items"):
            if k in state and int(state[k]) != self.state()[k]:
                raise DataError(f"saved data position has {k}={state[k]}, but this run has "
                                f"{self.state()[k]}: the data or settings changed since the checkpoint")
        epoch, index = saved_position(state)
        if index > self.num_items:
            raise DataError(f"saved data position has index={index}, past the {self.num_items} "
                            f"training images: a damaged checkpoint")
        self.epoch, self.index = epoch, index
