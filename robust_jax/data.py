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

Embedded sample: the package ships a few MB of real MNIST and CIFAR-10 examples (``robust_jax/data_sample/``: the
first test images and the first validation images, exact slices and SHA-256 checksums in its ``manifest.json``), so
the experiments' default runs work after a plain install. It is used only when nothing points at data (no
``data_dir``, no ``TFDS_DATA_DIR``), the TFDS default dir holds no prepared copy, ``download`` is off and the requested
split lies inside the sample; its use is announced once per dataset and process. Any other request on such a machine
raises :class:`DatasetNotFoundError`. Request what you use (:func:`head`: the first N examples of a split) rather than
loading a whole split and slicing it.

``download=True`` works without TensorFlow: TFDS's builtin MNIST / Fashion-MNIST / CIFAR-10 / Imagenette builders read
their downloaded files through ``tf.io.gfile`` and encode images with ``tf.image``, so their example generators are
replaced here by TensorFlow-free ones (same keys, ids and pixels; PNGs encoded with Pillow).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

_log = logging.getLogger(__name__)


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


# Number of examples in each TFDS split of the versions used here (for :func:`head` and the embedded sample).
SPLIT_SIZES: dict[str, dict[str, int]] = {
    "mnist": {"train": 60000, "test": 10000},
    "fashion_mnist": {"train": 60000, "test": 10000},
    "cifar10": {"train": 50000, "test": 10000},
    "imagenette": {"train": 9469, "validation": 3925},
}


class DatasetNotFoundError(FileNotFoundError):
    """The requested dataset is not prepared in any searched data dir."""


class SampleCorruptedError(RuntimeError):
    """The embedded data sample does not match the checksums in its manifest."""


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


_SLICE = re.compile(r"(\w+)(?:\[(-?\d+)?:(-?\d+)?\])?")


def _absolute_range(split: str, sizes: dict[str, int]) -> tuple[str, int, int] | None:
    """``"train[45000:]"`` -> ``("train", 45000, 50000)``: a split name or an integer slice of one, as an absolute
    [start, stop) range (Python slice semantics); None for anything else (percent slices, unions, unknown names)."""
    m = _SLICE.fullmatch(split)
    if m is None or m.group(1) not in sizes:
        return None
    base, a, b = m.groups()
    start, stop, _ = slice(int(a) if a else None, int(b) if b else None).indices(sizes[base])
    return base, start, max(start, stop)


def head(name: str, split: str, n: int) -> str:
    """The split string for the first `n` examples of `split` (all of them if it has fewer), e.g.
    ``head("cifar10", "train[45000:]", 1000) == "train[45000:46000]"``: load what you use, not a whole split."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    info(name)
    r = _absolute_range(split, SPLIT_SIZES[name])
    if r is None:
        raise ValueError(f"head() takes a split name or an integer slice of one (such as 'train[45000:]') of "
                         f"{name!r} (splits: {sorted(SPLIT_SIZES[name])}), got {split!r}")
    base, start, stop = r
    return f"{base}[{start}:{min(stop, start + n)}]"


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


_OPENCV_NOTICE = "OpenCV is not installed. We recommend using OpenCV"


class _DropOpenCVNotice(logging.Filter):
    """Drops TFDS's "OpenCV is not installed ... Defaulting to PIL" notice (logged through absl on the first image it
    decodes): Pillow is this project's decoder by design. Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_OPENCV_NOTICE)


def _silence_opencv_notice() -> None:
    from absl import logging as absl_logging

    logger = absl_logging.get_absl_logger()
    if not any(isinstance(f, _DropOpenCVNotice) for f in logger.filters):
        logger.addFilter(_DropOpenCVNotice())


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def _mnist_examples(self, num_examples, data_path, label_path):
    """TFDS's MNIST / Fashion-MNIST generator (idx files; key = index in the file) without TensorFlow."""

    def read(path, header, count):
        raw = Path(os.fspath(path)).read_bytes()
        if len(raw) < header + count:
            raise ValueError(f"{path}: {len(raw)} bytes, expected {header + count} (truncated download?)")
        return np.frombuffer(raw, np.uint8, count=count, offset=header)

    images = read(data_path, 16, num_examples * 28 * 28).reshape(num_examples, 28, 28, 1)
    labels = read(label_path, 8, num_examples)
    for index, (image, label) in enumerate(zip(images, labels)):
        yield index, {"image": _png(image), "label": int(label)}


def _cifar10_examples(self, split_prefix, filepaths):
    """TFDS's CIFAR-10 generator (binary batches of label byte + CHW image; key = running index) without TensorFlow."""
    index = 0
    for path in filepaths:
        raw = Path(os.fspath(path)).read_bytes()
        if len(raw) % 3073:
            raise ValueError(f"{path}: {len(raw)} bytes, not a whole number of CIFAR-10 records (truncated download?)")
        for row in np.frombuffer(raw, np.uint8).reshape(-1, 3073):
            image = np.ascontiguousarray(row[1:].reshape(3, 32, 32).transpose(1, 2, 0))
            yield index, {"label": int(row[0]), "id": f"{split_prefix}{index:05d}", "image": _png(image)}
            index += 1


def _imagenette_examples(self, datapath):
    """TFDS's Imagenette generator (one folder of JPEGs per class; key = file name) without TensorFlow."""
    for label in sorted(os.listdir(datapath)):
        for fpath in sorted(glob.glob(os.path.join(datapath, label, "*.JPEG"))):
            yield os.path.basename(fpath), {"image": fpath, "label": label}


_TF_FREE_GENERATORS = {"mnist": _mnist_examples, "fashion_mnist": _mnist_examples, "cifar10": _cifar10_examples,
                       "imagenette": _imagenette_examples}


def _download_and_prepare(tfds_name: str, root: Path) -> None:
    """``tfds.builder(tfds_name).download_and_prepare()`` in array_record format, with the builtin builder's example
    generator replaced by a TensorFlow-free one (downloads, checksums, keys, shuffling and writing stay TFDS's)."""
    import tensorflow_datasets as tfds

    base, _, config = tfds_name.partition("/")
    builtin = tfds.builder_cls(base)
    generate = _TF_FREE_GENERATORS.get(base)
    cls = builtin
    if generate is not None:
        class TensorFlowFree(builtin, skip_registration=True):
            name = builtin.name
            url_infos = builtin.url_infos  # the builtin's recorded download checksums
            _generate_examples = generate

        cls = TensorFlowFree
    cls(data_dir=str(root), config=config or None, file_format="array_record").download_and_prepare()


def _data_source(name: str, split: str, root: Path, download: bool):
    _silence_opencv_notice()
    import tensorflow_datasets as tfds

    tfds_name = info(name).tfds_name
    if _prepared_version_dir(root, tfds_name) is None:
        if not download:
            raise DatasetNotFoundError(_missing_message(name, root))
        try:
            _download_and_prepare(tfds_name, root)
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


SAMPLE_DIR = Path(__file__).resolve().parent / "data_sample"
_announced: set[str] = set()


@functools.cache
def _sample_manifest() -> dict:
    """The embedded sample's manifest ({} if the package was installed without it)."""
    f = SAMPLE_DIR / "manifest.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@functools.cache
def _sample_arrays(name: str) -> dict[str, np.ndarray]:
    """The sample arrays of `name` (read-only), checked against the manifest's dtypes, shapes and SHA-256 sums."""
    entry = _sample_manifest()["datasets"][name]
    path = SAMPLE_DIR / entry["file"]
    fix = "reinstall robust_jax, or regenerate the sample with tools/make_data_sample.py"
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same diagnosis
        raise SampleCorruptedError(f"embedded data sample {path} is unreadable ({type(e).__name__}: {e}); {fix}") from e
    for part in entry["parts"]:
        for spec in (part["images"], part["labels"]):
            a = arrays.get(spec["key"])
            got = None if a is None else (str(a.dtype), list(a.shape), _sha256(a))
            if got != (spec["dtype"], spec["shape"], spec["sha256"]):
                raise SampleCorruptedError(
                    f"embedded data sample {path}: array {spec['key']!r} does not match its manifest entry "
                    f"(dtype, shape, sha256: expected {(spec['dtype'], spec['shape'], spec['sha256'])}, got {got}); "
                    f"{fix}")
            a.flags.writeable = False
    return arrays


def sample_contents(name: str) -> list[str]:
    """The split slices of `name` in the embedded sample, e.g. ``["test[0:1000]", "train[45000:46000]"]``."""
    entry = _sample_manifest().get("datasets", {}).get(name)
    return [f"{p['split']}[{p['start']}:{p['stop']}]" for p in entry["parts"]] if entry else []


def _sample_use_allowed(data_dir, download: bool, root: Path, tfds_name: str) -> bool:
    """Nothing points at data (no data_dir, no $TFDS_DATA_DIR), no download asked, and the default dir has none."""
    return (not data_dir and not os.environ.get("TFDS_DATA_DIR") and not download
            and _prepared_version_dir(root, tfds_name) is None)


def _from_sample(name: str, split: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """`split` from the embedded sample; DatasetNotFoundError if the sample does not hold all of it."""
    entry = _sample_manifest().get("datasets", {}).get(name)
    if not entry:
        raise DatasetNotFoundError(_missing_message(name, root))
    m = _SLICE.fullmatch(split)
    if m is not None and m.group(1) not in entry["split_sizes"]:
        raise ValueError(f"Bad split {split!r} for dataset {name!r}: its splits are {sorted(entry['split_sizes'])}")
    r = _absolute_range(split, entry["split_sizes"])
    part = None
    if r is not None:
        base, start, stop = r
        part = next((p for p in entry["parts"] if p["split"] == base and p["start"] <= start < stop <= p["stop"]), None)
    if part is None:
        raise DatasetNotFoundError(
            _missing_message(name, root) + f" The embedded sample holds only {', '.join(sample_contents(name))} of "
            f"{name!r}, not {split!r}.")
    arrays = _sample_arrays(name)
    if name not in _announced:
        _announced.add(name)
        _log.warning(
            "robust_jax: no TFDS data for %r in %s and TFDS_DATA_DIR is unset; using the embedded sample (%s %s: %s; "
            "%s). Results are on this sample only: set TFDS_DATA_DIR (or --data_dir) to a TFDS data dir for the full "
            "data.", name, root, entry["tfds_name"], entry["version"], ", ".join(sample_contents(name)),
            entry["description"])
    sl = slice(start - part["start"], stop - part["start"])
    return arrays[part["images"]["key"]][sl].copy(), arrays[part["labels"]["key"]][sl].copy()


def load(
    name: str, split: str, *, data_dir: str | os.PathLike | None = None, download: bool = False, cache: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Load a dataset split into memory: (images uint8 NHWC, labels int32), in TFDS order.

    Without any data (see the module docstring) a split inside the embedded sample comes from the sample.
    Raises ValueError for an unknown dataset or split string and DatasetNotFoundError (with the dirs searched and
    the fix) when the data is not prepared.
    """
    i = info(name)
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a TFDS split string such as 'train' or 'train[45000:]', got {split!r}")
    root = resolve_data_dir(data_dir)
    if _sample_use_allowed(data_dir, download, root, i.tfds_name):
        return _from_sample(name, split, root)
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
