import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robust_jax import transforms

X = jax.random.uniform(jax.random.PRNGKey(0), (3, 9, 9, 2))


def test_rotation_zero_identity_and_90_is_rot90():
    np.testing.assert_allclose(transforms.rotate(X, 0.0), X, atol=1e-6)
    np.testing.assert_allclose(transforms.rotate(X, 90.0), np.rot90(np.asarray(X), 1, axes=(1, 2)), atol=1e-5)
    np.testing.assert_allclose(transforms.rotate(X, -90.0), np.rot90(np.asarray(X), -1, axes=(1, 2)), atol=1e-5)
    # per-example angles
    out = transforms.rotate(X, jnp.array([0.0, 90.0, 180.0]))
    np.testing.assert_allclose(out[2], np.asarray(X)[2, ::-1, ::-1], atol=1e-5)


def test_integer_translation_is_shift_with_zero_fill():
    out = np.asarray(transforms.translate(X, 2.0, -1.0))
    expected = np.zeros_like(np.asarray(X))
    expected[:, :-1, 2:] = np.asarray(X)[:, 1:, :-2]
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_perspective_zero_is_identity_and_corner_shift_matches_translation():
    np.testing.assert_allclose(transforms.perspective(X, jnp.zeros((4, 2))), X, atol=1e-5)
    shift = jnp.tile(jnp.array([[1.0, 2.0]]), (4, 1))  # all corners move equally = a translation
    np.testing.assert_allclose(transforms.perspective(X, shift), transforms.translate(X, 1.0, 2.0), atol=1e-4)


def test_noise_and_blur_basics():
    np.testing.assert_array_equal(transforms.gaussian_noise(X, 0.0, jax.random.PRNGKey(1)), X)
    noisy = transforms.gaussian_noise(X, 0.1, jax.random.PRNGKey(1))
    assert float(noisy.min()) >= 0 and float(noisy.max()) <= 1 and not np.allclose(noisy, X)
    for length, angle in ((1.0, 0.0), (5.0, 30.0), (7.5, 110.0)):
        assert float(transforms.motion_blur_kernel(length, angle).sum()) == pytest.approx(1.0, abs=1e-6)
    k = np.asarray(transforms.motion_blur_kernel(5.0, 0.0))
    assert k[4].sum() == pytest.approx(1.0, abs=1e-6)  # horizontal blur lives on the centre row
    const = jnp.full((1, 9, 9, 1), 0.5)
    np.testing.assert_allclose(transforms.motion_blur(const, 5.0, 45.0)[0, 4, 4], 0.5, atol=1e-6)


@pytest.mark.parametrize("fn,param", [
    (lambda x, p: transforms.rotate(x, p), 17.0),
    (lambda x, p: transforms.translate(x, p, 0.3), 0.4),
    (lambda x, p: transforms.perspective(x, jnp.array([[p, 0.0], [0.0, 0.0], [0.0, -p], [0.0, 0.0]])), 0.7),
    (lambda x, p: transforms.gaussian_noise(x, p, jax.random.PRNGKey(3), clip=False), 0.05),
    (lambda x, p: transforms.motion_blur(x, p, 30.0), 4.3),
    (lambda x, p: transforms.motion_blur(x, 4.0, p), 25.0),
])
def test_parameter_gradients_match_finite_differences(fn, param):
    x = jax.random.uniform(jax.random.PRNGKey(2), (2, 9, 9, 1))
    w = jax.random.normal(jax.random.PRNGKey(4), x.shape)
    f = lambda p: jnp.sum(fn(x, p) * w)
    g = float(jax.grad(f)(jnp.float32(param)))
    h = 1e-2
    fd = (float(f(jnp.float32(param + h))) - float(f(jnp.float32(param - h)))) / (2 * h)
    assert g == pytest.approx(fd, rel=0.05, abs=1e-3)
