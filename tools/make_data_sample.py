"""Regenerate robust_jax/data_sample/ (the embedded data sample) from a prepared TFDS data dir.

    TFDS_DATA_DIR=/path/to/tensorflow_datasets python tools/make_data_sample.py

Writes one ``<dataset>.npz`` per dataset (arrays ``<split>_images`` uint8 NHWC and ``<split>_labels`` int32, exactly
what ``robust_jax.data.load`` returns for that slice), ``manifest.json`` (source dataset, version, slices, dtype,
shape and SHA-256 of each array's raw C-order bytes; checked on every load) and ``PROVENANCE.md``.

What is in the sample is what the experiments' default runs read (see ``experiments/*.py``):

- CIFAR-10 ``test[0:1000]``: energy_detection (first 500), tradeoff (first 1000), uncertainty_robustness
  --dataset=cifar10 (black-box holdout 150 + 500).
- CIFAR-10 ``train[45000:46000]``: the first 1000 validation images (``data.splits``: validation = last 5000 of
  train), energy_detection's detector fit.
- MNIST ``test[0:2000]``: robustness (holdout 150 + 1000), uncertainty_robustness (150 + 500), energy_detection
  --dataset=mnist (500).
- MNIST ``train[55000:56000]``: the first 1000 MNIST validation images (energy_detection --dataset=mnist).

calibration's default (2000 test + 2000 validation images) and anything touching the training splits are not covered.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from robust_jax import data  # noqa: E402

# dataset -> [(split, start, stop)], plus a short description used in the one-line notice on use
SAMPLE = {
    "cifar10": ([("test", 0, 1000), ("train", 45000, 46000)],
                "the first 1000 test and the first 1000 validation images"),
    "mnist": ([("test", 0, 2000), ("train", 55000, 56000)],
              "the first 2000 test and the first 1000 validation images"),
}
SOURCES = {
    "cifar10": "CIFAR-10 (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html); no licence is declared, cite "
               "the technical report.",
    "mnist": "MNIST (LeCun, Cortes and Burges, http://yann.lecun.com/exdb/mnist/).",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data_dir", default=os.environ.get("TFDS_DATA_DIR"),
                    help="TFDS data dir (default $TFDS_DATA_DIR)")
    ap.add_argument("--out", default=str(REPO / "robust_jax" / "data_sample"))
    args = ap.parse_args()
    if not args.data_dir:
        ap.error("give --data_dir or set TFDS_DATA_DIR")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = data.resolve_data_dir(args.data_dir)
    manifest = {"format": 1, "about": "robust_jax embedded data sample; see PROVENANCE.md", "datasets": {}}
    for name, (parts, description) in SAMPLE.items():
        tfds_name = data.info(name).tfds_name
        version_dir = data._prepared_version_dir(root, tfds_name)
        if version_dir is None:
            raise SystemExit(f"{tfds_name} is not prepared under {root}")
        ds_info = json.loads((version_dir / "dataset_info.json").read_text())
        split_sizes = {s["name"]: sum(int(n) for n in s["shardLengths"]) for s in ds_info["splits"]}
        assert split_sizes == data.SPLIT_SIZES[name], (split_sizes, data.SPLIT_SIZES[name])
        arrays, entry_parts = {}, []
        for split, start, stop in parts:
            x, y = data.load(name, f"{split}[{start}:{stop}]", data_dir=root, cache=False)
            assert x.dtype == np.uint8 and y.dtype == np.int32 and len(x) == len(y) == stop - start
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y
            entry_parts.append({
                "split": split, "start": start, "stop": stop,
                **{which: {"key": f"{split}_{which}", "dtype": str(a.dtype), "shape": list(a.shape),
                           "sha256": data._sha256(a)} for which, a in (("images", x), ("labels", y))},
            })
        file = f"{name}.npz"
        np.savez_compressed(out / file, **arrays)
        manifest["datasets"][name] = {
            "tfds_name": tfds_name, "version": version_dir.name, "file": file, "description": description,
            "split_sizes": split_sizes, "order": "TFDS order (the order robust_jax.data.load returns)",
            "parts": entry_parts,
        }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "PROVENANCE.md").write_text(provenance(manifest, out, root))
    for f in sorted(out.iterdir()):
        print(f"{f.stat().st_size:>10,d}  {f}")


def provenance(manifest: dict, out: Path, source: Path) -> str:
    lines = [
        "# Embedded data sample: provenance",
        "",
        "A few thousand real MNIST and CIFAR-10 examples shipped inside the package so that the experiments' default",
        "runs work after `pip install` alone (`robust_jax.data.load` uses them only when no TFDS data is found; see",
        "its module docstring). Written by `tools/make_data_sample.py` from a TFDS data dir prepared in `array_record`",
        "format; rerun it to regenerate. Each array is exactly what `robust_jax.data.load(name, slice)` returns for",
        "the full data: images uint8 NHWC, labels int32, in TFDS order (TFDS's deterministic order of the split,",
        "so `train[45000:46000]` is the first 1000 examples of this project's validation split `train[45000:]`).",
        "",
        "`manifest.json` holds, for every array, its dtype, shape and the SHA-256 of its raw C-order bytes;",
        "`robust_jax.data` checks them on the first use of the sample in a process (npz files carry timestamps, so",
        "a rebuild has different file hashes but identical array hashes).",
        "",
        "What the slices serve (the experiments' default runs; validation = the last 5000 training examples, of",
        "which the studies use the first N through `robust_jax.data.head`): CIFAR-10 `test[0:1000]` for",
        "energy_detection (first 500), tradeoff (1000) and uncertainty_robustness --dataset=cifar10 (150 + 500),",
        "`train[45000:46000]` for energy_detection's detector fit (1000 validation images); MNIST `test[0:2000]` for",
        "robustness (150 + 1000), uncertainty_robustness (150 + 500) and energy_detection --dataset=mnist (500),",
        "`train[55000:56000]` for the latter's 1000 validation images. Not covered: calibration's default (2000 test",
        "+ 2000 validation images; run it with --num_examples=1000 --num_val=1000), robustness --dataset=cifar10",
        "(test[150:1150]) and anything reading the training splits.",
        "",
        f"Built from the TFDS data dir `{source}`.",
        "",
    ]
    for name, e in manifest["datasets"].items():
        size = (out / e["file"]).stat().st_size
        lines += [f"## {name}: `{e['file']}` ({size / 1e6:.2f} MB)", "",
                  f"- Source: TFDS `{e['tfds_name']}` version {e['version']} "
                  f"(split sizes {', '.join(f'{k} {v}' for k, v in e['split_sizes'].items())}). {SOURCES[name]}",
                  f"- Contents: {e['description']}.", "",
                  "| slice | array | dtype | shape | sha256 |", "|---|---|---|---|---|"]
        for p in e["parts"]:
            for which in ("images", "labels"):
                a = p[which]
                lines.append(f"| `{p['split']}[{p['start']}:{p['stop']}]` | `{a['key']}` | {a['dtype']} | "
                             f"{tuple(a['shape'])} | `{a['sha256']}` |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
