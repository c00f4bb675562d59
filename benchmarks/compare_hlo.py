"""Compare the optimized XLA programs (HLO) of two checkouts: the train step and PGD-10, ResNet-10/16 and BasicCNN.

    python -m benchmarks.compare_hlo --old=/path/to/old/checkout --new=.

Equal programs (after removing source locations, which name files and lines) run at equal speed on the same host,
so a refactor that leaves a program unchanged needs no timing to show it is no slower — a check that machine load
cannot spoil. Prints JSON: per program, its SHA-256 in each checkout and whether they are equal. Each checkout is
compiled in its own process (``--dump`` mode) with the library's default XLA flags.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys

from absl import app, flags

flags.DEFINE_string("old", None, "checkout to compare from")
flags.DEFINE_string("new", ".", "checkout to compare to")
flags.DEFINE_string("dump", None, "internal: compile the programs of this checkout and print them as JSON")
FLAGS = flags.FLAGS

MODELS = {"resnet10_16": ({"name": "ResNet10", "width": 16}, (32, 32, 3)),
          "basic_cnn": ({"name": "BasicCNN"}, (28, 28, 1))}


def normalise(hlo: str) -> str:
    """Drop what names source files and lines (the module name, the file/frame tables, stack-frame ids, metadata)."""
    keep = []
    for line in hlo.splitlines():
        if re.match(r'^\d+ ["{]', line) or re.match(r"^(FileNames|FunctionNames|FileLocations|StackFrames)", line):
            continue
        line = re.sub(r", metadata=\{[^}]*\}", "", line)
        keep.append(re.sub(r", stack_frame_id=\d+", "", line))
    return re.sub(r"^HloModule \S+", "HloModule M", "\n".join(keep), flags=re.M)


def dump(root: str) -> dict:
    sys.path.insert(0, root)
    import robust_jax

    if hasattr(robust_jax, "xla_defaults"):
        robust_jax.xla_defaults()
    import jax
    import jax.numpy as jnp

    from robust_jax import attacks, models, training

    try:
        from robust_jax.transforms import flip_crop
    except ImportError:  # older checkouts kept it in training
        flip_crop = training.flip_crop
    out = {}
    for name, (arch, shape) in MODELS.items():
        m = models.create(arch)
        tx = training.make_optimizer("sgd", 0.05, total_steps=1000, weight_decay=5e-4)
        state = training.create_train_state(m, tx, jax.random.PRNGKey(0), shape)
        step = training.make_train_step(m, tx, augment_fn=flip_crop if shape[-1] == 3 else None, donate=False)
        x, y = jnp.zeros((128, *shape), jnp.uint8), jnp.zeros((128,), jnp.int32)
        out[f"train_step/{name}"] = normalise(step.lower(state, x, y).compile().as_text())
        variables = {"params": state.params}
        if getattr(state, "batch_stats", None) is not None:
            variables["batch_stats"] = state.batch_stats

        def pgd10(v, x, y, key, m=m):
            return attacks.pgd(lambda z: m.apply(v, z), x, y, key=key, eps=8 / 255, step_size=2 / 255, steps=10)

        lowered = jax.jit(pgd10).lower(variables, jnp.zeros((128, *shape)), y, jax.random.PRNGKey(0))
        out[f"pgd10/{name}"] = normalise(lowered.compile().as_text())
    return {k: hashlib.sha256(v.encode()).hexdigest() for k, v in out.items()}


def main(argv):
    del argv
    if FLAGS.dump:
        print(json.dumps(dump(FLAGS.dump)))
        return
    if not FLAGS.old:
        raise app.UsageError("--old is required")
    got = {}
    for side in ("old", "new"):
        cmd = [sys.executable, "-m", "benchmarks.compare_hlo", f"--dump={getattr(FLAGS, side)}"]
        got[side] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    print(json.dumps({"benchmark": "compare_hlo", "old": FLAGS.old, "new": FLAGS.new,
                      "programs": {k: {"old": got["old"].get(k), "new": v, "equal": got["old"].get(k) == v}
                                   for k, v in got["new"].items()}}, indent=1))


if __name__ == "__main__":
    app.run(main)
