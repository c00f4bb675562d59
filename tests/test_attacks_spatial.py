import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy import toy_linear

from robust_jax.attacks import spatial


def _brute_force(f, x, y, fam, candidates, key):
    """Per-candidate correctness and loss by a plain Python loop (the reference for the scan)."""
    correct, losses = [], []
    for i, p in enumerate(candidates):
        xt = fam.apply(x, jnp.broadcast_to(p, (x.shape[0], fam.num_params)), jax.random.fold_in(key, i))
        logits = f(xt)
        correct.append(np.asarray(jnp.argmax(logits, -1) == y))
        losses.append(np.asarray(-jax.nn.log_softmax(logits)[jnp.arange(len(y)), y]))
    return np.stack(correct), np.stack(losses)


@pytest.mark.parametrize("name,shape", [("rotation", (7,)), ("rotation_translation", (3, 3, 3)), ("noise", (4,))])
def test_grid_matches_brute_force(name, shape):
    f, _, _, x, y = toy_linear(n=16, shape=(9, 9, 1), labels="predicted", seed=1)
    fam = spatial.family(name, degrees=40, pixels=2, sigma=0.5)
    key = jax.random.PRNGKey(3)
    out = spatial.grid_report(f, x, y, family=fam, shape=shape, key=key)
    np.testing.assert_array_equal(spatial.grid(f, x, y, family=fam, shape=shape, key=key), out["x"])
    correct, losses = _brute_force(f, x, y, fam, fam.grid(shape), key)
    np.testing.assert_array_equal(out["robust"], correct.all(0))
    np.testing.assert_allclose(out["mean_correct"], correct.mean(0), atol=1e-6)
    # the chosen candidate is misclassified whenever any candidate is, and has the highest loss among its kind
    chosen_correct = np.asarray(jnp.argmax(f(out["x"]), -1) == y)
    np.testing.assert_array_equal(chosen_correct, correct.all(0))
    masked = np.where(correct, -np.inf, losses)
    best = np.where(correct.all(0), losses.max(0), masked.max(0))
    chosen_loss = np.asarray(-jax.nn.log_softmax(f(out["x"]))[jnp.arange(len(y)), y])
    np.testing.assert_allclose(chosen_loss, best, rtol=1e-5, atol=1e-5)
    assert 0 < correct.mean() < 1  # the toy model is neither invariant nor always wrong: the test can fail


def test_returned_params_reproduce_the_returned_images():
    f, _, _, x, y = toy_linear(n=8, shape=(9, 9, 1), labels="predicted")
    fam = spatial.family("rotation_translation", degrees=30, pixels=3)
    out = spatial.worst_of_k_report(f, x, y, key=jax.random.PRNGKey(0), family=fam, k=6)
    lo, hi = np.array(fam.low), np.array(fam.high)
    assert np.all((np.asarray(out["params"]) >= lo) & (np.asarray(out["params"]) <= hi))
    np.testing.assert_allclose(fam.apply(x, out["params"], None), out["x"], atol=1e-5)


def test_worst_of_k_more_draws_never_help_the_defender_and_key_reproduces():
    f, _, _, x, y = toy_linear(n=64, shape=(9, 9, 1), labels="predicted", seed=2)
    fam = spatial.family("rotation", degrees=30)
    key = jax.random.PRNGKey(1)
    a = spatial.worst_of_k(f, x, y, key=key, family=fam, k=4)
    b = spatial.worst_of_k(f, x, y, key=key, family=fam, k=4)
    np.testing.assert_array_equal(a, b)
    # k=4 candidates are a subset of k=16 only with shared draws: use an explicit candidate stack
    cands = jax.vmap(lambda kk: fam.sample(kk, 64))(jax.random.split(key, 16))
    few = spatial.search(f, x, y, key=key, family=fam, candidates=cands[:4])
    many = spatial.search(f, x, y, key=key, family=fam, candidates=cands)
    assert np.all(np.asarray(many["robust"]) <= np.asarray(few["robust"]))
    assert np.asarray(many["robust"]).mean() < 1.0


def test_identity_grid_is_clean_accuracy():
    f, _, _, x, y = toy_linear(n=32, shape=(9, 9, 1), seed=4)
    for name in spatial.FAMILIES:
        fam = spatial.family(name)
        cands = jnp.asarray([fam.identity])
        out = spatial.search(f, x, y, key=jax.random.PRNGKey(0), family=fam, candidates=cands)
        np.testing.assert_allclose(out["x"], x, atol=1e-5, err_msg=name)  # blur: length 1 is a delta kernel
        np.testing.assert_array_equal(out["robust"], np.asarray(jnp.argmax(f(x), -1) == y))


def test_bad_input_errors():
    f, _, _, x, y = toy_linear()
    with pytest.raises(ValueError, match="unknown transformation"):
        spatial.family("shear")
    with pytest.raises(ValueError, match=">= 0"):
        spatial.family("rotation", degrees=-1)
    with pytest.raises(ValueError, match="grid shape"):
        spatial.family("rotation_translation").grid((3, 3))
    with pytest.raises(ValueError, match="k must be"):
        spatial.worst_of_k(f, x, y, key=jax.random.PRNGKey(0), family=spatial.family("rotation"), k=0)
    with pytest.raises(ValueError, match="candidates"):
        spatial.search(f, x, y, key=jax.random.PRNGKey(0), family=spatial.family("rotation"),
                       candidates=jnp.zeros((2, 3)))


def test_jit_noise_worst_of_k_is_the_worst_of_its_k_draws():
    """Under jit, worst-of-3 Gaussian noise returns, per example, the brute-force worst of its 3 noisy copies."""
    f, _, _, x, y = toy_linear(n=16, shape=(9, 9, 1), labels="predicted", seed=5)
    fam = spatial.family("noise", sigma=0.3)
    key = jax.random.PRNGKey(0)
    out = jax.jit(lambda x, y, k: spatial.worst_of_k(f, x, y, key=k, family=fam, k=3))(x, y, key)
    # the draws worst_of_k makes: parameters from the first half of the key, noise from the second
    k_params, k_apply = jax.random.split(key)
    cands = jax.vmap(lambda kk: fam.sample(kk, 16))(jax.random.split(k_params, 3))
    copies = [fam.apply(x, cands[i], jax.random.fold_in(k_apply, i)) for i in range(3)]
    correct, losses = _brute_force_per_example(f, copies, y)
    best = np.where(correct.all(0), losses.argmax(0), np.where(correct, -np.inf, losses).argmax(0))
    expected = np.stack([np.asarray(copies[best[i]][i]) for i in range(16)])
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert len(set(best.tolist())) > 1 and float(jnp.abs(out - x).max()) > 0


def _brute_force_per_example(f, copies, y):
    correct = np.stack([np.asarray(jnp.argmax(f(c), -1) == y) for c in copies])
    losses = np.stack([np.asarray(-jax.nn.log_softmax(f(c))[jnp.arange(len(y)), y]) for c in copies])
    return correct, losses
