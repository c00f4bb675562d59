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
