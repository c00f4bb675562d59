"""Datasets through tensorflow-datasets, read without TensorFlow.

``load(name, split)`` returns ``(images, labels)`` as numpy arrays: images uint8 NHWC, labels int32, in TFDS
order. Splits are TFDS split strings, slices included (``"train[45000:]"``, ``"test[:10%]"``).

Validation convention (used everywhere in this project): for MNIST, Fashion-MNIST and CIFAR-10 the last 5000
training examples (``train[-5000:]``, see :func:`splits`) are held out for validation and model selection; models
train on the rest. Test data is never used for tuning.

Where the data comes from, highest precedence first: the ``data_dir`` argument (the experiments' ``--data_dir``
flag), the ``TFDS_DATA_DIR`` environment variable, the TFDS default (``~/tensorflow_datasets``). The data must be
prepared in TFDS's ``array_record`` format; with ``download=True`` a connected machine prepares it there.

Decoded splits are cached as ``.npy`` in ``$ROBUST_JAX_CACHE`` (default ``~/.cache/robust_jax``), keyed by data dir,
dataset, version and split, since decoding CIFAR-10's 50k PNGs takes ~10 s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    tfds_name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    train_size: int  # size of the full TFDS train split
    val_size: int  # last `val_size` examples of train form the validation split
    mean: tuple[float, ...]  # per-channel pixel mean of the train split (pixels in [0, 1])
    std: tuple[float, ...]


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", 10, (28, 28, 1), 60000, 5000, (0.1307,), (0.3081,)),
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, (28, 28, 1), 60000, 5000, (0.2860,), (0.3530,)),
    "cifar10": DatasetInfo(
        "cifar10", 10, (32, 32, 3), 50000, 5000, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    ),
    # Imagenette (320px variant) resized on load to 160x160; ImageNet statistics; its own val split is the test set.
    "imagenette": DatasetInfo(
        "imagenette/320px-v2", 10, (160, 160, 3), 9469, 500, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ),
}


class DatasetNotFoundError(FileNotFoundError):
    """The requested dataset is not prepared in any searched data dir."""


def info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}.")
    return DATASETS[name]


def splits(name: str) -> dict[str, str]:
    """The project's split convention for `name`: {'train': ..., 'val': ..., 'test': ...}."""
    i = info(name)
    n_fit = i.train_size - i.val_size
    test = "validation" if name == "imagenette" else "test"
    return {"train": f"train[:{n_fit}]", "val": f"train[{n_fit}:]", "test": test, "train_full": "train"}


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """data_dir argument > $TFDS_DATA_DIR > TFDS default."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("TFDS_DATA_DIR"):
        return Path(os.environ["TFDS_DATA_DIR"]).expanduser()
    return Path("~/tensorflow_datasets").expanduser()


def _prepared_version_dir(root: Path, tfds_name: str) -> Path | None:
    """The newest prepared version folder of `tfds_name` under `root` holding array_record files, if any."""
    base = root / tfds_name
    if not base.is_dir():
        return None
    candidates = []
    for d in base.iterdir():
        if (d / "dataset_info.json").is_file() and any(d.glob("*.array_record*")):
            try:
                candidates.append((tuple(int(p) for p in d.name.split(".")), d))
            except ValueError:
                continue
    return max(candidates)[1] if candidates else None


def _missing_message(name: str, root: Path, reason: str = "") -> str:
    tfds_name = info(name).tfds_name
    msg = (
        f"Dataset {name!r} (TFDS {tfds_name!r}) is not prepared in array_record format under {root}"
        f" (searched {root / tfds_name}). "
        "Fix: point --data_dir or the TFDS_DATA_DIR environment variable at a TFDS data dir that holds it, "
        "or on a connected machine call robust_jax.data.load(..., download=True) to download and prepare it."
    )
    return msg + (f" Cause: {reason}" if reason else "")


def _data_source(name: str, split: str, root: Path, download: bool):
    import tensorflow_datasets as tfds

    tfds_name = info(name).tfds_name
    if _prepared_version_dir(root, tfds_name) is None:
        if not download:
            raise DatasetNotFoundError(_missing_message(name, root))
        try:
            tfds.builder(tfds_name, data_dir=str(root), file_format="array_record").download_and_prepare()
        except Exception as e:  # noqa: BLE001 - re-raised with the fix spelled out
            raise DatasetNotFoundError(_missing_message(name, root, f"{type(e).__name__}: {e}")) from e
    try:
        return tfds.data_source(tfds_name, split=split, data_dir=str(root), download=False)
    except (ValueError, AssertionError, KeyError) as e:
        raise ValueError(f"Bad split {split!r} for dataset {name!r}: {e}") from e


def _cache_path(name: str, split: str, root: Path) -> Path:
    version_dir = _prepared_version_dir(root, info(name).tfds_name)
    key = hashlib.sha1(f"{root.resolve()}|{version_dir}|{name}|{split}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("ROBUST_JAX_CACHE", "~/.cache/robust_jax")).expanduser()
    return cache / f"{name}_{version_dir.name if version_dir else 'x'}_{key}"


def _decode(source, image_shape) -> tuple[np.ndarray, np.ndarray]:
    n = len(source)
    images = np.empty((n, *image_shape), np.uint8)
    labels = np.empty((n,), np.int32)
    chunk = 2048
    for start in range(0, n, chunk):
        idx = list(range(start, min(n, start + chunk)))
        for j, ex in zip(idx, source.__getitems__(idx)):
            img = np.asarray(ex["image"])
            if img.shape != tuple(image_shape):
                img = _resize(img, image_shape)
            images[j] = img
            labels[j] = int(ex["label"])
    return images, labels


def _resize(img: np.ndarray, shape) -> np.ndarray:
    """Centre-crop to square and resize with Pillow (only used for variable-size datasets like Imagenette)."""
    from PIL import Image

    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    img = img[top : top + s, left : left + s]
    out = Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).resize(shape[:2][::-1], Image.BILINEAR)
    return np.asarray(out).reshape(shape)


def load(
    name: str, split: str, *, data_dir: str | os.PathLike | None = None, download: bool = False, cache: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Load a dataset split into memory: (images uint8 NHWC, labels int32), in TFDS order.

    Raises ValueError for an unknown dataset or split string and DatasetNotFoundError (with the dirs searched and
    the fix) when the data is not prepared.
    """
    i = info(name)
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a TFDS split string such as 'train' or 'train[45000:]', got {split!r}")
    root = resolve_data_dir(data_dir)
    source = None
    path = _cache_path(name, split, root) if cache else None
    files = {s: Path(f"{path}.{s}.npy") for s in ("images", "labels")} if path is not None else {}
    if files and all(f.is_file() for f in files.values()):
        return np.load(files["images"]), np.load(files["labels"])
    source = _data_source(name, split, root, download)
    images, labels = _decode(source, i.image_shape)
    if files:
        path.parent.mkdir(parents=True, exist_ok=True)
        for which, arr in (("images", images), ("labels", labels)):
            tmp = Path(f"{path}.tmp{os.getpid()}.npy")
            np.save(tmp, arr)
            os.replace(tmp, files[which])
    return images, labels


def to_float(images) -> np.ndarray:
    """uint8 [0, 255] -> float32 [0, 1] (the pixel space every model and attack in this project uses)."""
    return np.asarray(images, np.float32) / 255.0


def batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: int | None = None,
    epoch: int = 0,
    drop_remainder: bool = False,
    start_batch: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (images, labels) batches. With a seed, the order is a permutation fixed by (seed, epoch).

    `start_batch` skips the first batches of the epoch (used to resume mid-epoch with identical order).
    """
    if len(images) != len(labels):
        raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(images)
    order = None if seed is None else np.random.default_rng([seed, epoch]).permutation(n)
    stop = n - n % batch_size if drop_remainder else n
    for start in range(start_batch * batch_size, stop, batch_size):
        idx = slice(start, min(start + batch_size, stop)) if order is None else order[start : start + batch_size]
        yield images[idx], labels[idx]


def num_batches(n: int, batch_size: int, drop_remainder: bool = False) -> int:
    return n // batch_size if drop_remainder else -(-n // batch_size)
