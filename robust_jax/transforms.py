"""Image transformations: pure, jit-able, batched, with per-example parameters (arrays of shape (N,) or scalars).

Conventions (NHWC float images in [0, 1]):
- Geometry uses pixel centres; the centre of rotation/perspective is the image centre ((H−1)/2, (W−1)/2).
- ``rotate(x, degrees)``: positive angles turn the content counter-clockwise as displayed (row 0 at the top),
  so ``rotate(x, 90)`` equals ``np.rot90(x, 1, axes=(1, 2))`` on square images.
- ``translate(x, dx, dy)``: content moves right by ``dx`` and down by ``dy`` pixels.
- ``perspective(x, corners)``: the four corners (top-left, top-right, bottom-right, bottom-left) move by
  ``corners[..., 4, 2]`` pixels (dx, dy); the homography mapping the old corners to the new ones is applied.
- Sampling is bilinear; pixels sampled from outside the image are **zero** (black fill).
- All geometric transforms are differentiable w.r.t. the image and (almost everywhere) their parameters.

Training augmentations ``augment(key, x) -> x'`` (random per example): :func:`flip_crop`, :func:`random_rotation`,
composed by name with :func:`make_augment` (``"flip_crop+rotate"``), as ``robust_jax.training`` uses them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def _per_example(v, n):
    v = jnp.asarray(v, jnp.float32)
    return jnp.broadcast_to(v, (n,) + v.shape[1:] if v.ndim and v.shape[0] == n else (n,) + v.shape)


def _sample_bilinear(img, rows, cols):
    """img (H, W, C); rows/cols (H, W) float source coordinates; zero outside."""
    h, w, _ = img.shape
    r0, c0 = jnp.floor(rows), jnp.floor(cols)
    out = 0.0
    for dr in (0, 1):
        for dc in (0, 1):
            r, c = r0 + dr, c0 + dc
            weight = (1 - jnp.abs(rows - r)) * (1 - jnp.abs(cols - c))
            inside = (r >= 0) & (r <= h - 1) & (c >= 0) & (c <= w - 1)
            ri = jnp.clip(r, 0, h - 1).astype(jnp.int32)
            ci = jnp.clip(c, 0, w - 1).astype(jnp.int32)
            out = out + jnp.where(inside, weight, 0.0)[..., None] * img[ri, ci]
    return out


def warp(x, matrices):
    """Apply per-example 3x3 homographies mapping *output* pixel (col, row, 1) to *source* coordinates.

    Each output pixel is a convex combination of input pixels (bilinear, zero fill); the result is clipped to
    [0, 1] so that float rounding (an ulp above 1) never takes pixel-space images out of the attacks' domain."""
    n, h, w, _ = x.shape
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    pts = jnp.stack([cols, rows, jnp.ones_like(rows)], -1)  # (H, W, 3)

    def one(img, m):
        src = pts @ m.T
        src = src[..., :2] / src[..., 2:3]
        return _sample_bilinear(img, src[..., 1], src[..., 0])

    return jnp.clip(jax.vmap(one)(x, jnp.broadcast_to(matrices, (n, 3, 3))), 0.0, 1.0)


def _centre(h, w):
    return (w - 1) / 2.0, (h - 1) / 2.0


def rotate(x, degrees):
    """Rotate about the image centre; positive = counter-clockwise as displayed. Zero fill."""
    n, h, w, _ = x.shape
    th = jnp.deg2rad(_per_example(degrees, n))
    cx, cy = _centre(h, w)
    cos, sin = jnp.cos(th), jnp.sin(th)
    # output (c, r) -> source: rotate back by -theta in display coordinates (y down)
    m = jnp.stack([
        jnp.stack([cos, -sin, cx - cos * cx + sin * cy], -1),
        jnp.stack([sin, cos, cy - sin * cx - cos * cy], -1),
        jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0]), (n, 3)),
    ], 1)
    return warp(x, m)


def translate(x, dx, dy):
    """Shift content right by dx and down by dy pixels (fractional shifts interpolate). Zero fill."""
    n = x.shape[0]
    dx, dy = _per_example(dx, n), _per_example(dy, n)
    one, zero = jnp.ones(n), jnp.zeros(n)
    m = jnp.stack([jnp.stack([one, zero, -dx], -1), jnp.stack([zero, one, -dy], -1),
                   jnp.stack([zero, zero, one], -1)], 1)
    return warp(x, m)


def _homography(src, dst):
    """3x3 H with H @ [src, 1] ∝ [dst, 1] for four point pairs (each (4, 2)), by the DLT linear system."""
    rows = []
    rhs = []
    for i in range(4):
        (x, y), (u, v) = src[i], dst[i]
        rows.append(jnp.stack([x, y, 1.0, 0.0, 0.0, 0.0, -u * x, -u * y]))
        rows.append(jnp.stack([0.0, 0.0, 0.0, x, y, 1.0, -v * x, -v * y]))
        rhs += [u, v]
    h = jnp.linalg.solve(jnp.stack(rows), jnp.stack(rhs))
    return jnp.append(h, 1.0).reshape(3, 3)


def perspective(x, corners):
    """Move the four corners (TL, TR, BR, BL) by `corners` (N, 4, 2) pixels (dx, dy); zero displacement = identity."""
    n, h, w, _ = x.shape
    d = jnp.broadcast_to(jnp.asarray(corners, jnp.float32), (n, 4, 2))
    base = jnp.array([[0.0, 0.0], [w - 1.0, 0.0], [w - 1.0, h - 1.0], [0.0, h - 1.0]])
    # output -> source: map displaced corners back to the original ones
    m = jax.vmap(lambda dd: _homography(base + dd, base))(d)
    return warp(x, m)


def gaussian_noise(x, sigma, key, *, clip: bool = True):
    """x + sigma·N(0, 1) per pixel (sigma per example or scalar), clipped to [0, 1]; sigma = 0 is the identity."""
    n = x.shape[0]
    s = _per_example(sigma, n).reshape(n, 1, 1, 1)
    out = x + s * jax.random.normal(key, x.shape, x.dtype)
    return jnp.clip(out, 0.0, 1.0) if clip else out


def motion_blur_kernel(length, angle_degrees, size: int = 9):
    """A (size, size) line kernel of the given length (pixels) and angle, anti-aliased, summing to 1.

    Weights fall off linearly within 1 px of the segment, so the kernel is differentiable in length and angle.
    ``length <= 1`` gives (close to) the identity kernel.
    """
    r = (size - 1) / 2.0
    u, v = jnp.meshgrid(jnp.arange(size) - r, jnp.arange(size) - r, indexing="xy")  # u: col offset, v: row offset
    th = jnp.deg2rad(angle_degrees)
    along = u * jnp.cos(th) - v * jnp.sin(th)
    across = u * jnp.sin(th) + v * jnp.cos(th)
    half = jnp.maximum(jnp.asarray(length, jnp.float32), 1.0) / 2.0
    w = jnp.clip(1.0 - jnp.abs(across), 0.0, 1.0) * jnp.clip(half + 0.5 - jnp.abs(along), 0.0, 1.0)
    return w / jnp.sum(w)


def motion_blur(x, length, angle_degrees, *, size: int = 9):
    """Convolve each image with its motion-blur kernel (zero padding at the border); clipped to [0, 1] like
    :func:`warp` (the kernel is normalised, so only rounding is removed)."""
    n, _, _, c = x.shape
    kernels = jax.vmap(lambda L, a: motion_blur_kernel(L, a, size))(_per_example(length, n),
                                                                      _per_example(angle_degrees, n))

    def one(img, k):
        kern = jnp.tile(k[:, :, None, None], (1, 1, 1, c))  # HWIO depthwise
        return jax.lax.conv_general_dilated(img[None], kern, (1, 1), "SAME", feature_group_count=c,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))[0]

    return jnp.clip(jax.vmap(one)(x, kernels), 0.0, 1.0)


# ---------------------------------------------------------------------------------------- training augmentations
def flip_crop(key, x, pad: int = 4):
    """Random horizontal flip and random crop after zero-padding by `pad` (per example). x: float NHWC."""
    n, h, w, _ = x.shape
    k_flip, k_y, k_x = jax.random.split(key, 3)
    flip = jax.random.bernoulli(k_flip, 0.5, (n,))
    x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    oy = jax.random.randint(k_y, (n,), 0, 2 * pad + 1)
    ox = jax.random.randint(k_x, (n,), 0, 2 * pad + 1)
    crop = lambda img, a, b: jax.lax.dynamic_slice(img, (a, b, 0), (h, w, img.shape[-1]))
    return jax.vmap(crop)(xp, oy, ox)


def random_rotation(key, x, max_degrees: float = 30.0):
    """Rotate each image by an angle drawn uniformly from [-max_degrees, max_degrees] (zero fill)."""
    degrees = jax.random.uniform(key, (x.shape[0],), minval=-max_degrees, maxval=max_degrees)
    return rotate(x, degrees)


AUGMENTATIONS: dict[str, Callable | None] = {"none": None, "flip_crop": flip_crop, "rotate": random_rotation}


def make_augment(names: str, *, rotation_degrees: float = 30.0) -> Callable | None:
    """Compose augmentations named in a ``+``-separated string, e.g. ``"flip_crop+rotate"`` (applied in order)."""
    fns = []
    for name in [n for n in names.split("+") if n and n != "none"]:
        if name not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {name!r}; use {', '.join(AUGMENTATIONS)} joined by '+'")
        fn = AUGMENTATIONS[name]
        if name == "rotate":
            fn = lambda k, x, fn=fn: fn(k, x, rotation_degrees)
        fns.append(fn)
    if not fns:
        return None

    def augment(key, x):
        for i, fn in enumerate(fns):
            x = fn(jax.random.fold_in(key, i), x)
        return x

    return augment
