"""checkpoints.load on untrusted or damaged folders: names stay inside the root, card.json is validated JSON data,
missing / truncated / altered variable files give an error naming the file and the checkpoint."""

import json
import os
import shutil

import numpy as np
import pytest

from robust_jax import checkpoints

NAME = "mnist_basic_cnn"


@pytest.fixture
def ckpt_root(tmp_path, monkeypatch):
    """A private checkpoints root holding a copy of mnist_basic_cnn (ROBUST_JAX_CHECKPOINTS points at it)."""
    src = checkpoints.root() / NAME
    if not (src / "card.json").is_file():
        pytest.skip(f"checkpoint {NAME} not present in {checkpoints.root()}")
    root = tmp_path / "ckpts"
    shutil.copytree(src, root / NAME)
    monkeypatch.setenv("ROBUST_JAX_CHECKPOINTS", str(root))
    return root


def test_copy_loads_and_has_checksums(ckpt_root):
    assert checkpoints.available() == [NAME]
    assert (ckpt_root / NAME / checkpoints.CHECKSUMS).is_file()
    m = checkpoints.load(NAME)
    x = np.random.default_rng(0).uniform(size=(2, 28, 28, 1)).astype(np.float32)
    assert np.asarray(m(x)).shape == (2, 10)


@pytest.mark.parametrize("name", ["../x", f"../{NAME}", "/etc/passwd", "..", ".", "", f"sub/{NAME}", f"{NAME}/",
                                  f"{NAME}/../{NAME}", "a\\b", "~", None, 3])
def test_names_cannot_leave_the_root(ckpt_root, tmp_path, name):
    (tmp_path / "x").mkdir()  # a would-be target outside the root, with a card
    (tmp_path / "x" / "card.json").write_text("{}")
    with pytest.raises(ValueError, match=f"invalid checkpoint name.*available: \\['{NAME}'\\]"):
        checkpoints.load(name)


def test_absolute_path_to_a_real_checkpoint_is_refused(ckpt_root):
    with pytest.raises(ValueError, match="invalid checkpoint name"):
        checkpoints.load(str(ckpt_root / NAME))


def test_unknown_name_lists_available(ckpt_root):
    with pytest.raises(FileNotFoundError, match=f"no checkpoint 'nope'.*available: \\['{NAME}'\\]"):
        checkpoints.load("nope")
    (ckpt_root / "half").mkdir()  # a folder without a card is not a checkpoint
    with pytest.raises(FileNotFoundError, match="has no card.json"):
        checkpoints.load("half")


@pytest.mark.parametrize("text, match", [
    ('{"architecture": {"name": "BasicCNN"', "not valid JSON"),  # truncated
    ('__import__("os").system("echo pwned")', "not valid JSON"),  # code is never evaluated
    ("[1, 2]", "top level is a list"),
    ('{"dataset": "mnist"}', "missing keys \\['architecture'\\]"),
    ('{"architecture": "BasicCNN", "dataset": "mnist"}', "'architecture' is 'BasicCNN', expected dict"),
    ('{"architecture": {"name": "BasicCNN"}, "dataset": "imagenet21k"}', "unknown dataset 'imagenet21k'"),
    ('{"architecture": {"name": "BasicCNN"}, "dataset": "mnist", "seed": "0"}', "'seed' is '0', expected int"),
    ('{"architecture": {}, "dataset": "mnist"}', "no model 'name'"),
    ('{"architecture": {"name": "NoSuchNet"}, "dataset": "mnist"}', "not a valid model config"),
    ('{"architecture": {"name": "BasicCNN", "bogus": 1}, "dataset": "mnist"}', "not a valid model config"),
])
def test_bad_card(ckpt_root, text, match):
    card = ckpt_root / NAME / "card.json"
    card.write_text(text)
    with pytest.raises(checkpoints.CorruptCheckpointError, match=match) as e:
        checkpoints.load(NAME)
    assert f"checkpoint '{NAME}'" in str(e.value) and str(card) in str(e.value)


def _big_data_file(root):
    files = [f for f in (root / NAME / "variables").rglob("*") if f.is_file()]
    return max(files, key=lambda f: f.stat().st_size)


def _flip_byte(f):
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))


@pytest.mark.parametrize("damage, match", [
    (lambda f: f.unlink(), "file missing"),
    (lambda f: os.truncate(f, 1000), "truncated or altered; now 1000 bytes"),
    (_flip_byte, "truncated or altered"),  # orbax would load this one silently, with wrong weights
])
def test_damaged_variable_file_is_named(ckpt_root, damage, match):
    f = _big_data_file(ckpt_root)
    damage(f)
    with pytest.raises(checkpoints.CorruptCheckpointError, match=match) as e:
        checkpoints.load(NAME)
    assert f"checkpoint '{NAME}'" in str(e.value) and str(f) in str(e.value)


def test_missing_metadata_and_folder(ckpt_root):
    (ckpt_root / NAME / "variables" / "_METADATA").unlink()
    with pytest.raises(checkpoints.CorruptCheckpointError, match="_METADATA: file missing"):
        checkpoints.load(NAME)
    shutil.rmtree(ckpt_root / NAME / "variables")
    with pytest.raises(checkpoints.CorruptCheckpointError, match="variables: folder missing"):
        checkpoints.load(NAME)


# orbax's failed restore leaves a callback for its closed asyncio loop; collected here so the noise stays in this test
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_without_checksums_orbax_errors_are_wrapped(ckpt_root):
    import gc

    (ckpt_root / NAME / checkpoints.CHECKSUMS).unlink()  # e.g. a checkpoint exported before checksums existed
    os.truncate(_big_data_file(ckpt_root), 1000)
    with pytest.raises(checkpoints.CorruptCheckpointError, match="orbax cannot restore the variables") as e:
        checkpoints.load(NAME)
    assert str(ckpt_root / NAME / "variables") in str(e.value)
    del e
    gc.collect()


def test_checksum_list_cannot_point_outside(ckpt_root, tmp_path):
    sums = ckpt_root / NAME / checkpoints.CHECKSUMS
    sums.write_text("0" * 64 + "  variables/../../../outside\n")
    with pytest.raises(checkpoints.CorruptCheckpointError, match="line 1 is not"):
        checkpoints.load(NAME)


def test_shipped_checkpoints_match_their_checksums():
    for name in checkpoints.available():
        assert (checkpoints.root() / name / checkpoints.CHECKSUMS).is_file(), name
        checkpoints.verify_files(name)
        json.dumps(checkpoints.read_card(name))
