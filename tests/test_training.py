import jax
import numpy as np
import optax

from robust_jax import models, training


def _toy_data(n=256, seed=0):
    """MNIST-shaped images whose label is the brightest quadrant-row pattern: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = rng.integers(0, 60, (n, 28, 28, 1))
    for i, c in enumerate(y):
        x[i, 2 * c : 2 * c + 3, :, 0] = 255
    return x.astype(np.uint8), y.astype(np.int32)


def _config(**kw):
    base = dict(dataset="mnist", architecture={"name": "BasicCNN", "dropout_rate": 0.1}, epochs=2, batch_size=32,
                optimizer="adam", lr=3e-3, schedule="constant", seed=3, checkpoint_every_steps=3)
    base.update(kw)
    return training.TrainConfig(**base)


def _run(workdir, **kw):
    x, y = _toy_data()
    return training.train(_config(), workdir, progress=False, train_data=(x, y), val_data=(x[:64], y[:64]),
                          log=lambda s: None, **kw)


def test_loss_falls_on_tiny_batch():
    m = models.create({"name": "BasicCNN"})
    tx = optax.adam(1e-3)
    state = training.create_train_state(m, tx, jax.random.PRNGKey(0), (28, 28, 1))
    step = training.make_train_step(m, tx, donate=False)
    x, y = _toy_data(32)
    losses = []
    for _ in range(15):
        state, metrics = step(state, x, y)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0]


def _params(result):
    return jax.tree.leaves(jax.device_get(result["state"].params))


def test_kill_and_resume_is_bit_identical(tmp_path):
    full = _run(tmp_path / "full")
    # 16 steps in all (8 per epoch); kill at step 5 (mid-epoch, after a checkpoint at step 5), then resume
    killed = _run(tmp_path / "resumed", stop_after_steps=5)
    assert killed["stopped_early"] and killed["step"] == 5
    resumed = _run(tmp_path / "resumed")
    assert resumed["step"] == full["step"] == 16
    for a, b in zip(_params(full), _params(resumed)):
        np.testing.assert_array_equal(a, b)


def test_same_seed_same_params_other_seed_differs(tmp_path):
    a, b = _run(tmp_path / "a"), _run(tmp_path / "b")
    for u, v in zip(_params(a), _params(b)):
        np.testing.assert_array_equal(u, v)
    x, y = _toy_data()
    c = training.train(_config(seed=4), tmp_path / "c", progress=False, train_data=(x, y),
                       val_data=(x[:64], y[:64]), log=lambda s: None)
    assert any(not np.array_equal(u, v) for u, v in zip(_params(a), _params(c)))


def test_flip_crop_keeps_shape_and_content():
    x = jax.random.uniform(jax.random.PRNGKey(0), (8, 32, 32, 3))
    out = training.flip_crop(jax.random.PRNGKey(1), x)
    assert out.shape == x.shape
    # every output is a shifted (and possibly flipped) copy: its pixel multiset is a subset of input + zeros
    assert float(out.max()) <= float(x.max())
    assert not np.allclose(out, x)
