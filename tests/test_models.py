import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robust_jax import models

CASES = [
    ({"name": "BasicCNN"}, (28, 28, 1)),
    ({"name": "AllConvNet", "width": 8}, (32, 32, 3)),
    ({"name": "ResNet10", "width": 8}, (32, 32, 3)),
    ({"name": "ResNet10", "width": 8, "stem": "imagenet"}, (64, 64, 3)),
]


def _init(model, shape):
    k = jax.random.PRNGKey(0)
    return model.init({"params": k, "dropout": k}, jnp.zeros((1, *shape)))


@pytest.mark.parametrize("arch,shape", CASES)
def test_output_shapes(arch, shape):
    m = models.create(arch)
    v = _init(m, shape)
    x = jax.random.uniform(jax.random.PRNGKey(1), (3, *shape))
    assert m.apply(v, x).shape == (3, 10)
    mh = models.create({**arch, "hetero": True})
    mean, log_var = mh.apply(_init(mh, shape), x)
    assert mean.shape == log_var.shape == (3, 10)


@pytest.mark.parametrize("arch,shape", CASES)
def test_dropout_only_when_asked(arch, shape):
    m = models.create({**arch, "dropout_rate": 0.25})
    v = _init(m, shape)
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, *shape))
    a, b = m.apply(v, x), m.apply(v, x)
    np.testing.assert_array_equal(a, b)  # eval is deterministic
    k1, k2 = jax.random.PRNGKey(2), jax.random.PRNGKey(3)
    s1 = m.apply(v, x, mc_dropout=True, rngs={"dropout": k1})
    s2 = m.apply(v, x, mc_dropout=True, rngs={"dropout": k2})
    s1b = m.apply(v, x, mc_dropout=True, rngs={"dropout": k1})
    assert not np.allclose(s1, s2)
    np.testing.assert_array_equal(s1, s1b)
    # rate 0: MC-dropout equals the deterministic prediction
    m0 = models.create({**arch, "dropout_rate": 0.0})
    np.testing.assert_allclose(m0.apply(v, x, mc_dropout=True, rngs={"dropout": k1}), m0.apply(v, x), rtol=1e-6)


def test_bad_input_shapes():
    m = models.BasicCNN()
    v = _init(m, (28, 28, 1))
    with pytest.raises(ValueError, match="channel"):
        m.apply(v, jnp.zeros((2, 28, 28, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        m.apply(v, jnp.zeros((28, 28, 1)))
    with pytest.raises(ValueError, match="unknown model"):
        models.create({"name": "VGG"})
