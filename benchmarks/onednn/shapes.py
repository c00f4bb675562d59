"""Conv shapes of ResNet-10 width 64 with the CIFAR stem (32x32 inputs): (name, x NHWC, w HWIO, strides, padding)."""


def resnet10_cifar_shapes(batch=128, width=64):
    w = width
    return [
        ("stem 3x3 3->64", (batch, 32, 32, 3), (3, 3, 3, w), (1, 1), ((1, 1), (1, 1))),
        ("s1 3x3 64->64 32x32", (batch, 32, 32, w), (3, 3, w, w), (1, 1), ((1, 1), (1, 1))),
        ("s2 3x3 64->128 s2", (batch, 32, 32, w), (3, 3, w, 2 * w), (2, 2), ((1, 1), (1, 1))),
        ("s2 3x3 128->128 16x16", (batch, 16, 16, 2 * w), (3, 3, 2 * w, 2 * w), (1, 1), ((1, 1), (1, 1))),
        ("s2 1x1 64->128 s2", (batch, 32, 32, w), (1, 1, w, 2 * w), (2, 2), ((0, 0), (0, 0))),
        ("s3 3x3 128->256 s2", (batch, 16, 16, 2 * w), (3, 3, 2 * w, 4 * w), (2, 2), ((1, 1), (1, 1))),
        ("s3 3x3 256->256 8x8", (batch, 8, 8, 4 * w), (3, 3, 4 * w, 4 * w), (1, 1), ((1, 1), (1, 1))),
        ("s3 1x1 128->256 s2", (batch, 16, 16, 2 * w), (1, 1, 2 * w, 4 * w), (2, 2), ((0, 0), (0, 0))),
        ("s4 3x3 256->512 s2", (batch, 8, 8, 4 * w), (3, 3, 4 * w, 8 * w), (2, 2), ((1, 1), (1, 1))),
        ("s4 3x3 512->512 4x4", (batch, 4, 4, 8 * w), (3, 3, 8 * w, 8 * w), (1, 1), ((1, 1), (1, 1))),
        ("s4 1x1 256->512 s2", (batch, 8, 8, 4 * w), (1, 1, 4 * w, 8 * w), (2, 2), ((0, 0), (0, 0))),
    ]


def flops(x, w, strides, padding):
    """2*MACs of the forward conv (bwd data and bwd weights have the same count)."""
    n, h, wd, c = x
    kh, kw, _, o = w
    oh = (h + padding[0][0] + padding[0][1] - kh) // strides[0] + 1
    ow = (wd + padding[1][0] + padding[1][1] - kw) // strides[1] + 1
    return 2 * n * oh * ow * o * kh * kw * c
