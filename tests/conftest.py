import os

import jax.numpy as jnp
import pytest

from robust_jax import data


def _have(name: str) -> bool:
    root = data.resolve_data_dir()
    return data._prepared_version_dir(root, data.info(name).tfds_name) is not None


@pytest.fixture
def real_data():
    """Skip unless the real dataset is prepared under $TFDS_DATA_DIR (or the TFDS default dir)."""

    def need(name: str):
        if not _have(name):
            pytest.skip(f"real {name} data not found under {data.resolve_data_dir()} "
                        f"(TFDS_DATA_DIR={os.environ.get('TFDS_DATA_DIR')!r})")

    return need


@pytest.fixture
def need_checkpoint():
    from robust_jax import checkpoints

    def need(name: str):
        if name not in checkpoints.available():
            pytest.skip(f"checkpoint {name} not present in {checkpoints.root()}")
        return checkpoints.load(name)

    return need


@pytest.fixture
def real_test_images(need_checkpoint, real_data):
    """``load(checkpoint, n) -> (model, x, y)``: a checkpoint and the first `n` test images of its dataset (pixels in
    [0, 1]) and their labels, as jax arrays; skips unless both the checkpoint and the real dataset are present."""

    def load(name: str, n: int):
        m = need_checkpoint(name)
        ds = m.card["dataset"]
        real_data(ds)
        x, y = data.load(ds, data.head(ds, data.splits(ds)["test"], n))
        return m, jnp.asarray(data.to_float(x)), jnp.asarray(y)

    return load
