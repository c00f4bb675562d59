import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from robust_jax import models, training, transforms, uncertainty

KEY = jax.random.PRNGKey(0)


def _model(rate):
    m = models.BasicCNN(dropout_rate=rate)
    v = m.init({"params": KEY, "dropout": KEY}, jnp.zeros((1, 28, 28, 1)))
    x = jax.random.uniform(jax.random.PRNGKey(1), (5, 28, 28, 1))
    return m, v, x


def test_mc_dropout_rate_zero_equals_deterministic_and_samples_differ():
    m, v, x = _model(0.0)
    mean, samples = uncertainty.mc_dropout_predict(m.apply, v, x, KEY, 4)
    np.testing.assert_allclose(mean, jax.nn.softmax(m.apply(v, x)), rtol=1e-5, atol=1e-6)
    m2 = models.BasicCNN(dropout_rate=0.25)
    _, s1 = uncertainty.mc_dropout_predict(m2.apply, v, x, KEY, 4)
    _, s1b = uncertainty.mc_dropout_predict(m2.apply, v, x, KEY, 4)
    np.testing.assert_array_equal(s1, s1b)
    assert not np.allclose(s1[0], s1[1])


def test_scores_decomposition_and_mi_properties():
    p = jax.nn.softmax(jax.random.normal(KEY, (7, 6, 10)) * 2, -1)
    s = uncertainty.scores(p)
    np.testing.assert_allclose(s["predictive_entropy"], s["expected_entropy"] + s["mutual_information"], atol=1e-5)
    assert float(s["mutual_information"].min()) >= 0
    same = jnp.broadcast_to(p[:1], p.shape)
    np.testing.assert_allclose(uncertainty.scores(same)["mutual_information"], 0.0, atol=1e-6)


def test_ensemble_vmapped_prediction_equals_loop():
    m = models.BasicCNN()
    vs = [m.init({"params": k, "dropout": k}, jnp.zeros((1, 28, 28, 1))) for k in jax.random.split(KEY, 3)]
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 28, 28, 1))
    mean, probs = uncertainty.ensemble_predict(m.apply, uncertainty.stack(vs), x)
    loop = np.stack([jax.nn.softmax(m.apply(v, x)) for v in vs])
    np.testing.assert_allclose(probs, loop, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mean, loop.mean(0), rtol=1e-5, atol=1e-6)


def test_ensemble_vmapped_training_equals_members_one_by_one():
    m = models.AllConvNet(width=4, dropout_rate=0.1)
    tx = optax.sgd(0.05, momentum=0.9)
    keys = jax.random.split(KEY, 2)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 8)) for _ in range(3)]
    stacked = training.create_ensemble_states(m, tx, keys, (32, 32, 3))
    step = training.make_ensemble_train_step(m, tx, augment_fn=transforms.flip_crop)
    for xb, yb in batches:
        stacked, _ = step(stacked, xb, yb)
    single = training.make_train_step(m, tx, augment_fn=transforms.flip_crop, donate=False)
    for i, k in enumerate(keys):
        s = training.create_train_state(m, tx, k, (32, 32, 3))
        for xb, yb in batches:
            s, _ = single(s, xb, yb)
        member = jax.tree.map(lambda a: a[i], stacked.params)
        for a, b in zip(jax.tree.leaves(member), jax.tree.leaves(s.params)):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_hetero_loss_tends_to_cross_entropy():
    mean = jax.random.normal(KEY, (6, 10)) * 3
    y = jnp.arange(6) % 10
    ce = optax.softmax_cross_entropy_with_integer_labels(mean, y)
    tiny = uncertainty.hetero_loss((mean, jnp.full_like(mean, -30.0)), y, KEY)
    np.testing.assert_allclose(tiny, ce, rtol=1e-4, atol=1e-5)
    big = uncertainty.hetero_loss((mean, jnp.full_like(mean, 2.0)), y, KEY)
    assert not np.allclose(big, ce, atol=1e-2)


@pytest.mark.slow
def test_hetero_learns_larger_sigma_where_labels_are_noisier():
    """Synthetic 2-class data: for inputs with feature x0 > 0 labels are flipped 40% of the time, else never."""
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=False, mc_dropout=False):
            h = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
            return nn.Dense(2)(h), nn.Dense(2)(h)

    rng = np.random.default_rng(0)
    n = 4000
    x = rng.normal(size=(n, 1, 1, 2)).astype(np.float32)
    y = (x[:, 0, 0, 1] > 0).astype(np.int32)
    noisy = x[:, 0, 0, 0] > 0
    flip = noisy & (rng.uniform(size=n) < 0.4)
    y = np.where(flip, 1 - y, y)
    m, tx = Net(), optax.adam(1e-2)
    state = training.create_train_state(m, tx, KEY, (1, 1, 2))
    step = training.make_train_step(m, tx, loss_fn=uncertainty.hetero_loss)
    for _ in range(30):
        for i in range(0, n, 200):
            state, _ = step(state, x[i:i + 200], y[i:i + 200])
    _, log_var = m.apply(state.variables, x)
    sigma2 = np.exp(np.asarray(log_var)).mean(-1)
    assert sigma2[noisy].mean() > 2 * sigma2[~noisy].mean()
