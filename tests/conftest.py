import os

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
