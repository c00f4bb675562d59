"""PGD-10 success with bf16 oneDNN gradients (``conv_impl="onednn_bf16"``, what ``"auto"`` picks for attacks on a
CPU with fast bf16) against f32 ``custom_vjp`` gradients, same images and keys; prints one JSON line per setting.

    python -m benchmarks.pgd_bf16_numerics [N]   # N test images (default 500; batches of 250)

Success is judged by the f32 model over the images it classifies correctly (``n_correct``); ``se_diff`` is the
standard error of a difference of two proportions at that n, ``only_f32`` / ``only_bf16`` count the images whose
outcome the two disagree on. ``seconds`` include compilation and are not interleaved (not a speed figure).
``tests/test_onednn.py::test_pgd_with_bf16_gradients_within_sampling_error`` asserts the bound on 400 images.
"""

import json
import sys
import time

SETTINGS = [("cifar10_resnet10", 1), ("cifar10_resnet10", 2), ("cifar10_resnet10_pgd", 8), ("cifar10_resnet10_w64", 1)]


def main(n: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import common
    from robust_jax import attacks, checkpoints, data

    x_all, y_all = data.load("cifar10", f"test[:{n}]")
    x_all = data.to_float(x_all)
    for name, eps_255 in SETTINGS:
        eps = eps_255 / 255
        m = checkpoints.load(name)
        predict = jax.jit(m.apply)
        success, seconds = {}, {}
        for impl in ("custom_vjp", "onednn_bf16"):
            model = m.model.clone(conv_impl=impl)
            pgd = jax.jit(lambda v, x, y, k, model=model: attacks.pgd(
                lambda z: model.apply(v, z), x, y, key=k, eps=eps, step_size=eps / 4, steps=10))
            t0 = time.time()
            adv = np.concatenate([np.asarray(pgd(m.variables, jnp.asarray(x_all[i:i + 250]),
                                                 jnp.asarray(y_all[i:i + 250]), jax.random.PRNGKey(i)))
                                  for i in range(0, n, 250)])
            seconds[impl] = round(time.time() - t0, 1)
            success[impl] = np.asarray(predict(m.variables, adv).argmax(-1)) != y_all
        correct = np.asarray(predict(m.variables, jnp.asarray(x_all)).argmax(-1)) == y_all
        k = int(correct.sum())
        s32, s16 = success["custom_vjp"][correct], success["onednn_bf16"][correct]
        p = (s32.mean() + s16.mean()) / 2
        print(json.dumps({"checkpoint": name, "eps_255": eps_255, "n_correct": k,
                          "success_f32": round(float(s32.mean()), 4), "success_bf16": round(float(s16.mean()), 4),
                          "diff": round(float(s16.mean() - s32.mean()), 4),
                          "se_diff": round(float(np.sqrt(2 * p * (1 - p) / k)), 4),
                          "only_f32": int((s32 & ~s16).sum()), "only_bf16": int((~s32 & s16).sum()),
                          "seconds": [seconds["custom_vjp"], seconds["onednn_bf16"]],
                          "environment": common.environment()}), flush=True)


if __name__ == "__main__":
    from robust_jax import xla_defaults

    xla_defaults()
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 500)
