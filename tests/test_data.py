import numpy as np
import pytest

from robust_jax import data


def test_mnist_train_real(real_data):
    real_data("mnist")
    x, y = data.load("mnist", "train")
    assert x.shape == (60000, 28, 28, 1) and x.dtype == np.uint8
    assert y.shape == (60000,) and np.issubdtype(y.dtype, np.integer)
    assert np.bincount(y, minlength=10).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    # TFDS's deterministic order starts with these labels
    assert y[:8].tolist() == [4, 1, 0, 7, 8, 1, 2, 7]


def test_cifar10_test_real(real_data):
    real_data("cifar10")
    x, y = data.load("cifar10", "test")
    assert x.shape == (10000, 32, 32, 3) and x.dtype == np.uint8
    assert np.bincount(y, minlength=10).tolist() == [1000] * 10
    assert 0.45 < x.mean() / 255 < 0.5


def test_slicing_and_validation_convention(real_data):
    real_data("mnist")
    sp = data.splits("mnist")
    assert sp["val"] == "train[55000:]" and sp["train"] == "train[:55000]"
    full_x, full_y = data.load("mnist", "train")
    val_x, val_y = data.load("mnist", sp["val"])
    assert len(val_x) == 5000
    np.testing.assert_array_equal(val_x, full_x[55000:])
    np.testing.assert_array_equal(val_y, full_y[55000:])
    head_x, _ = data.load("mnist", "test[:100]")
    assert head_x.shape == (100, 28, 28, 1)


def test_missing_dataset_message(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.load("mnist", "test", data_dir=tmp_path, cache=False)
    msg = str(e.value)
    assert "'mnist'" in msg and str(tmp_path) in msg and "TFDS_DATA_DIR" in msg


def test_unknown_name_and_bad_split(real_data):
    with pytest.raises(ValueError, match="Unknown dataset 'imagenet21k'"):
        data.load("imagenet21k", "train")
    real_data("mnist")
    with pytest.raises(ValueError, match="Bad split"):
        data.load("mnist", "trian", cache=False)


def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("TFDS_DATA_DIR", "/from/env")
    assert str(data.resolve_data_dir(tmp_path)) == str(tmp_path)
    assert str(data.resolve_data_dir()) == "/from/env"
    monkeypatch.delenv("TFDS_DATA_DIR")
    assert data.resolve_data_dir().name == "tensorflow_datasets"


class _FakeSource:
    """Stands in for tfds.data_source on generated examples (variable image sizes, like Imagenette)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitems__(self, idx):
        return [{"image": self.images[i], "label": self.labels[i]} for i in idx]


@pytest.mark.parametrize("name", ["fashion_mnist", "imagenette"])
def test_generated_data_through_loader(monkeypatch, tmp_path, name):
    rng = np.random.default_rng(0)
    shape = data.info(name).image_shape
    sizes = [shape[:2]] * 3 if name == "fashion_mnist" else [(200, 300), (320, 240), (160, 160)]
    images = [rng.integers(0, 256, (*hw, shape[2]), dtype=np.uint8) for hw in sizes]
    labels = [3, 1, 4]
    monkeypatch.setattr(data, "_data_source", lambda *a, **k: _FakeSource(images, labels))
    monkeypatch.setenv("ROBUST_JAX_CACHE", str(tmp_path))
    x, y = data.load(name, "train", data_dir=tmp_path)
    assert x.shape == (3, *shape) and x.dtype == np.uint8
    assert y.tolist() == labels
    if name == "fashion_mnist":
        np.testing.assert_array_equal(x[0], images[0])


def test_batches_seeded_and_resumable():
    x = np.arange(103)[:, None]
    y = np.arange(103)
    a = [b[1] for b in data.batches(x, y, 10, seed=1, epoch=2, drop_remainder=True)]
    b = [b[1] for b in data.batches(x, y, 10, seed=1, epoch=2, drop_remainder=True)]
    c = [b[1] for b in data.batches(x, y, 10, seed=1, epoch=3, drop_remainder=True)]
    assert len(a) == 10 and all(len(v) == 10 for v in a)
    assert all((u == v).all() for u, v in zip(a, b))
    assert not all((u == v).all() for u, v in zip(a, c))
    assert sorted(np.concatenate(a).tolist()) != list(range(100))  # shuffled subset (3 dropped)
    resumed = [b[1] for b in data.batches(x, y, 10, seed=1, epoch=2, drop_remainder=True, start_batch=4)]
    assert all((u == v).all() for u, v in zip(a[4:], resumed))
    last = list(data.batches(x, y, 10))[-1][1]
    assert last.tolist() == [100, 101, 102]


# --- split helpers ----------------------------------------------------------------------------------------------------


def test_head_takes_the_first_n_of_a_split():
    assert data.head("cifar10", "train[45000:]", 1000) == "train[45000:46000]"
    assert data.head("cifar10", "train[45000:]", 10**6) == "train[45000:50000]"  # clipped to what the split holds
    assert data.head("mnist", "test", 500) == "test[0:500]"
    assert data.head("mnist", "train[-5000:]", 10) == "train[55000:55010]"
    assert data.head("imagenette", "validation", 5) == "validation[0:5]"
    assert data.head("mnist", data.splits("mnist")["val"], 1000) == "train[55000:56000]"
    for bad in ("test[:10%]", "train+test", "trian"):
        with pytest.raises(ValueError, match="head"):
            data.head("mnist", bad, 5)
    with pytest.raises(ValueError, match="positive"):
        data.head("mnist", "test", 0)
    for name, sizes in data.SPLIT_SIZES.items():
        assert sizes["train"] == data.info(name).train_size


# --- the embedded sample ----------------------------------------------------------------------------------------------


@pytest.fixture
def no_tfds_data(monkeypatch, tmp_path):
    """A machine without TFDS data: no TFDS_DATA_DIR, an empty home (so ~/tensorflow_datasets is absent)."""
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ROBUST_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_announced", set())
    return tmp_path


def test_sample_shipped_with_checksums():
    manifest = data._sample_manifest()
    assert set(manifest["datasets"]) == {"mnist", "cifar10"}
    total = sum((data.SAMPLE_DIR / e["file"]).stat().st_size for e in manifest["datasets"].values())
    assert total < 8e6  # a few MB
    assert (data.SAMPLE_DIR / "PROVENANCE.md").is_file()
    for name in manifest["datasets"]:
        arrays = data._sample_arrays(name)  # verifies dtype, shape and sha256 of every array
        assert all(not a.flags.writeable for a in arrays.values())
    assert data.sample_contents("cifar10") == ["test[0:1000]", "train[45000:46000]"]


# The split strings the experiments' default runs request (experiments/*.py; blackbox holdout = 150; validation:
# data.head(name, data.splits(name)["val"], num_val)).
DEFAULT_REQUESTS = [
    ("cifar10", "test[:500]"), ("cifar10", "train[45000:46000]"),  # energy_detection
    ("cifar10", "test[:1000]"),  # tradeoff
    ("cifar10", "test[:150]"), ("cifar10", "test[150:650]"),  # uncertainty_robustness --dataset=cifar10
    ("mnist", "test[:150]"), ("mnist", "test[150:1150]"), ("mnist", "test[150:650]"),  # robustness, uncertainty
    ("mnist", "test[:500]"), ("mnist", "train[55000:56000]"),  # energy_detection --dataset=mnist
]


def test_sample_serves_default_runs_and_announces_once(no_tfds_data, caplog):
    caplog.set_level("WARNING")
    for name, split in DEFAULT_REQUESTS:
        x, y = data.load(name, split)
        start, stop = (int(v or 0) for v in split[split.index("[") + 1:-1].split(":"))
        assert x.shape == (stop - start, *data.info(name).image_shape) and x.dtype == np.uint8
        assert y.shape == (stop - start,) and y.dtype == np.int32 and 0 <= y.min() and y.max() <= 9
        x[:] = 0  # callers get their own copy
    a, _ = data.load("cifar10", "test[10:20]")
    b, _ = data.load("cifar10", "test[:30]")
    np.testing.assert_array_equal(a, b[10:20])
    assert a.any()
    notices = [r.getMessage() for r in caplog.records if "embedded sample" in r.getMessage()]
    assert len(notices) == 2  # one per dataset
    assert all("\n" not in m and "TFDS_DATA_DIR" in m for m in notices)
    assert "test[0:1000], train[45000:46000]" in next(m for m in notices if "'cifar10'" in m)


def test_sample_refuses_what_it_does_not_hold(no_tfds_data, monkeypatch, tmp_path):
    for split in ("train", "test", "test[500:1500]", "train[45000:]", "test[:10%]", "train[:100]+test[:100]"):
        with pytest.raises(data.DatasetNotFoundError, match="embedded sample holds only test") as e:
            data.load("cifar10", split)
        assert "TFDS_DATA_DIR" in str(e.value)
    with pytest.raises(ValueError, match="Bad split"):
        data.load("mnist", "trian")
    with pytest.raises(data.DatasetNotFoundError, match="not prepared"):
        data.load("fashion_mnist", "test[:10]")  # not in the sample
    # anything pointing at a data dir means "use that data", never the sample
    with pytest.raises(data.DatasetNotFoundError):
        data.load("cifar10", "test[:10]", data_dir=tmp_path)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(data.DatasetNotFoundError):
        data.load("cifar10", "test[:10]")


def test_sample_checksums_checked(no_tfds_data, monkeypatch, tmp_path):
    import shutil

    sample = tmp_path / "sample"
    shutil.copytree(data.SAMPLE_DIR, sample)
    with np.load(sample / "mnist.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["test_labels"] = arrays["test_labels"].copy()
    arrays["test_labels"][7] = (arrays["test_labels"][7] + 1) % 10  # one wrong label
    np.savez_compressed(sample / "mnist.npz", **arrays)
    monkeypatch.setattr(data, "SAMPLE_DIR", sample)
    data._sample_arrays.cache_clear()
    try:
        with pytest.raises(data.SampleCorruptedError, match="test_labels.*does not match"):
            data.load("mnist", "test[:10]")
        (sample / "mnist.npz").write_bytes(b"PK\x03\x04 truncated")
        data._sample_arrays.cache_clear()
        with pytest.raises(data.SampleCorruptedError, match="unreadable"):
            data.load("mnist", "test[:10]")
    finally:
        data._sample_arrays.cache_clear()


def test_sample_equals_real_data(real_data):
    for name, entry in data._sample_manifest()["datasets"].items():
        real_data(name)
        arrays = data._sample_arrays(name)
        for p in entry["parts"]:
            x, y = data.load(name, f"{p['split']}[{p['start']}:{p['stop']}]", cache=False)
            np.testing.assert_array_equal(arrays[p["images"]["key"]], x)
            np.testing.assert_array_equal(arrays[p["labels"]["key"]], y)
            assert entry["version"] == data._prepared_version_dir(data.resolve_data_dir(), name).name


# --- download=True without TensorFlow, up to the network --------------------------------------------------------------


def test_download_dependency_declared():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    deps = pyproject["project"]["dependencies"]
    assert any(d.replace("-", "_").startswith("importlib_resources") for d in deps)


def _fake_downloads(monkeypatch, tmp_path, rng):
    """What TFDS's downloads of MNIST / CIFAR-10 / Imagenette would extract to, generated (official file formats),
    served by a DownloadManager whose network step is replaced. Returns {dataset: {split: (images, labels)}}."""
    import struct

    import tensorflow_datasets as tfds
    from PIL import Image
    from tensorflow_datasets.image_classification import mnist as tfds_mnist

    src, truth = tmp_path / "downloads", {}
    src.mkdir()
    monkeypatch.setattr(tfds_mnist, "_TRAIN_EXAMPLES", 12)
    monkeypatch.setattr(tfds_mnist, "_TEST_EXAMPLES", 8)
    truth["mnist"] = {}
    for split, n in (("train", 12), ("test", 8)):
        x = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        (src / f"{split}_data").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + x.tobytes())
        (src / f"{split}_labels").write_bytes(struct.pack(">II", 2049, n) + y.tobytes())
        truth["mnist"][split] = (x, y)
    cifar = src / "cifar" / "cifar-10-batches-bin"
    cifar.mkdir(parents=True)
    (cifar / "batches.meta.txt").write_text("airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n")
    truth["cifar10"] = {"train": ([], []), "test": ([], [])}
    for f, split in [(f"data_batch_{i}.bin", "train") for i in range(1, 6)] + [("test_batch.bin", "test")]:
        x = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, 3).astype(np.uint8)
        (cifar / f).write_bytes(np.concatenate([y[:, None], x.transpose(0, 3, 1, 2).reshape(3, -1)], 1).tobytes())
        truth["cifar10"][split][0].append(x)
        truth["cifar10"][split][1].append(y)
    truth["cifar10"] = {k: (np.concatenate(v[0]), np.concatenate(v[1])) for k, v in truth["cifar10"].items()}
    labels = ["n01440764", "n02102040"]
    for split in ("train", "val"):
        for label in labels:
            (src / "imagenette" / "imagenette2-320" / split / label).mkdir(parents=True)
            img = rng.integers(0, 256, (200, 240, 3), dtype=np.uint8)
            Image.fromarray(img).save(src / "imagenette" / "imagenette2-320" / split / label / f"{label}_{split}.JPEG")

    def download_and_extract(self, url_or_urls):
        if isinstance(url_or_urls, dict):  # MNIST: {name: url} -> extracted idx files
            assert all("/cvdf-datasets/mnist/" in u for u in url_or_urls.values())
            return {k: str(src / k) for k in url_or_urls}
        if "cifar-10-binary" in url_or_urls:
            return str(src / "cifar")
        assert "imagenette2-320" in url_or_urls
        return str(src / "imagenette")

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", download_and_extract)
    return truth


def _pairs(x, y):
    return sorted((int(label), img.tobytes()) for img, label in zip(x, y))


def test_download_prepares_without_tensorflow(monkeypatch, tmp_path):
    """data.load(..., download=True) runs TFDS's download path (importlib_resources, the download manager, the
    array_record writer) and prepares the builtin datasets with no TensorFlow installed; only the network is faked."""
    truth = _fake_downloads(monkeypatch, tmp_path, np.random.default_rng(0))
    root = tmp_path / "tfds"
    for name in ("mnist", "cifar10"):
        for split in ("train", "test"):
            x, y = data.load(name, split, data_dir=root, download=True, cache=False)
            assert x.shape == (len(truth[name][split][1]), *data.info(name).image_shape)
            assert _pairs(x, y) == _pairs(*truth[name][split])  # same examples (TFDS order is a keyed shuffle)
        assert data._prepared_version_dir(root, name) is not None
    x, y = data.load("imagenette", "validation", data_dir=root, download=True, cache=False)
    assert x.shape == (2, 160, 160, 3) and sorted(y.tolist()) == [0, 1]


def test_download_failure_names_the_cause(monkeypatch, tmp_path):
    import tensorflow_datasets as tfds

    def offline(self, urls):
        raise ConnectionError("network unreachable (test)")

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", offline)
    with pytest.raises(data.DatasetNotFoundError, match="Cause: ConnectionError: network unreachable"):
        data.load("cifar10", "test", data_dir=tmp_path, download=True, cache=False)


# --- no spurious OpenCV notice ----------------------------------------------------------------------------------------


def test_loading_prints_no_opencv_notice(monkeypatch, tmp_path, caplog, capfd):
    from absl import logging as absl_logging

    _fake_downloads(monkeypatch, tmp_path, np.random.default_rng(1))
    data.load("mnist", "test", data_dir=tmp_path / "tfds", download=True, cache=False)
    capfd.readouterr()
    monkeypatch.setattr(absl_logging, "_log_counter_per_token", {})  # TFDS logs the notice on its first decode
    caplog.set_level("INFO")
    x, _ = data.load("mnist", "test", data_dir=tmp_path / "tfds", cache=False)
    assert len(x) == 8
    out, err = capfd.readouterr()
    assert "OpenCV" not in caplog.text + out + err
    absl_logging.warning("unrelated absl warning")  # the filter drops that notice only
    assert "unrelated absl warning" in caplog.text
