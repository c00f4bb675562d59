"""PyTorch CPU bar for ResNet-10/64 (CIFAR stem): train step and fwd+input-grad img/s, variants interleaved.

Runs in its own venv with torch (CPU build) only, e.g.
    python3 -m venv /work/venv_torch && /work/venv_torch/bin/pip install torch==2.13.0
    /work/venv_torch/bin/python torch_bar.py [--variants f32_nchw,f32_cl,bf16_cl] [--reps 9] [--json out.json]

The network mirrors ``robust_jax.models.ResNet10(width=64, stem="cifar")``: normalisation inside the model, 3x3 stem
conv (no bias) + BN + ReLU, one BasicBlock per stage with widths w/2w/4w/8w and strides 1/2/2/2 (3x3 conv - BN - ReLU
- 3x3 conv - BN with zero-initialised scale; 1x1 conv + BN shortcut when the shape changes; ReLU after the sum),
global average pooling, a linear layer to 10 classes. BN momentum 0.1 (Flax 0.9), eps 1e-5.
Train step (batch 128): uint8 NHWC in, /255, random flip + 4-pixel pad-and-crop, BN in train mode, mean
cross-entropy, SGD-Nesterov momentum 0.9, weight decay 5e-4 on conv/linear kernels only (as robust_jax's "sgd").
Fwd+input-grad (batch 256): eval mode, gradient of the mean cross-entropy w.r.t. the [0, 1] input images.
Variants: f32_nchw, f32_cl (channels_last), bf16_cl (channels_last + torch.autocast("cpu", bfloat16)).
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def bn(c, zero_scale=False):
    m = nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)
    if zero_scale:
        nn.init.zeros_(m.weight)
    return m


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = bn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = bn(cout, zero_scale=True)
        self.shortcut = None
        if cin != cout or stride != 1:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False), bn(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class ResNet10(nn.Module):
    def __init__(self, width=64, num_classes=10):
        super().__init__()
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(1, 3, 1, 1))
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.stem_bn = bn(width)
        blocks, cin = [], width
        for i in range(4):
            cout = width * 2**i
            blocks.append(BasicBlock(cin, cout, 1 if i == 0 else 2))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):  # x: float NCHW in [0, 1] (any memory format)
        h = (x - self.mean) / self.std
        h = F.relu(self.stem_bn(self.stem(h)))
        h = self.blocks(h)
        return self.fc(h.mean(dim=(2, 3)))


def flip_crop(x, pad=4):
    """Per-example random horizontal flip and random crop after zero padding; x float NCHW."""
    n, _, h, w = x.shape
    flip = torch.rand(n) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,))
    ox = torch.randint(0, 2 * pad + 1, (n,))
    rows = (oy[:, None] + torch.arange(h))[:, :, None]  # n,h,1
    cols = (ox[:, None] + torch.arange(w))[:, None, :]  # n,1,w
    out = xp.permute(0, 2, 3, 1)[torch.arange(n)[:, None, None], rows, cols]  # n,h,w,c
    return out.permute(0, 3, 1, 2)


def parse_variant(v):
    cl = v.endswith("_cl")
    return {"channels_last": cl, "bf16": v.startswith("bf16")}


def make_model(v, seed=0):
    torch.manual_seed(seed)
    m = ResNet10(64)
    if parse_variant(v)["channels_last"]:
        m = m.to(memory_format=torch.channels_last)
    return m


def memory_format(v):
    return torch.channels_last if parse_variant(v)["channels_last"] else torch.contiguous_format


def to_input(x_u8_nhwc, v):
    """uint8 NHWC -> float [0, 1] NCHW in the variant's memory format."""
    x = x_u8_nhwc.permute(0, 3, 1, 2).float() / 255.0
    return x.contiguous(memory_format=memory_format(v))


def autocast(v):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=parse_variant(v)["bf16"])


def make_train_step(v):
    model = make_model(v).train()
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=0.05, momentum=0.9, nesterov=True)

    def step(x_u8, y):
        # flip_crop returns a permuted view: restore the variant's memory format (else NCHW would run channels_last)
        x = flip_crop(to_input(x_u8, v)).contiguous(memory_format=memory_format(v))
        opt.zero_grad(set_to_none=True)
        with autocast(v):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def make_fwd_input_grad(v):
    model = make_model(v).eval()
    for p in model.parameters():
        p.requires_grad_(False)

    def step(x_u8, y):
        x = to_input(x_u8, v).requires_grad_(True)
        with autocast(v):
            loss = F.cross_entropy(model(x), y)
        (g,) = torch.autograd.grad(loss, x)
        return g.float()

    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--what", default="fwdgrad,train")
    ap.add_argument("--variants", default="f32_nchw,f32_cl,bf16_cl")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train_batch", type=int, default=128)
    ap.add_argument("--fwdgrad_batch", type=int, default=256)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    variants = a.variants.split(",")
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "mkldnn": torch.backends.mkldnn.is_available(), "onednn_version": _onednn_version(),
           "load_start": os.getloadavg()}
    print(json.dumps(env), flush=True)
    gen = torch.Generator().manual_seed(0)
    out = {"env": env, "results": {}}
    for what in a.what.split(","):
        bs = a.train_batch if what == "train" else a.fwdgrad_batch
        x = torch.randint(0, 256, (bs, 32, 32, 3), dtype=torch.uint8, generator=gen)
        y = torch.randint(0, 10, (bs,), generator=gen)
        fns = {v: (make_train_step(v) if what == "train" else make_fwd_input_grad(v)) for v in variants}
        first = {}
        for v in variants:
            t0 = time.perf_counter()
            for _ in range(a.warmup):
                fns[v](x, y)
            first[v] = (time.perf_counter() - t0) / a.warmup
        if what == "fwdgrad":  # input-gradient agreement with the first variant (fresh eval-mode models, same init)
            torch.manual_seed(1)
            ref = fns[variants[0]](x, y)
            for v in variants[1:]:
                g = fns[v](x, y)
                err = {"max_rel": float((g - ref).abs().max() / ref.abs().max()),
                       "l2_rel": float((g - ref).norm() / ref.norm()),
                       "sign_agree": float((g.sign() == ref.sign()).float().mean())}
                out.setdefault("input_grad_error", {})[v] = err
                print(f"  input gradient {v} vs {variants[0]}: " + ", ".join(f"{k} {e:.3g}" for k, e in err.items()),
                      flush=True)
        times = {v: [] for v in variants}
        cpu = {v: [] for v in variants}
        for _ in range(a.reps):
            for v in variants:
                c0, t0 = time.process_time(), time.perf_counter()
                fns[v](x, y)
                t1, c1 = time.perf_counter(), time.process_time()
                times[v].append(t1 - t0)
                cpu[v].append((c1 - c0) / (t1 - t0))
        res = {v: {"img_per_s": bs / statistics.median(times[v]), "cpu_per_wall": statistics.median(cpu[v]),
                   "warmup_s_per_step": first[v], "times": times[v]} for v in variants}
        base = res[variants[0]]["img_per_s"]
        for v in variants:
            res[v]["ratio_vs_" + variants[0]] = res[v]["img_per_s"] / base
            print(f"{what:8s} batch {bs} {v:9s} {res[v]['img_per_s']:7.1f} img/s  x{res[v]['img_per_s'] / base:.2f}"
                  f"  cpu/wall {res[v]['cpu_per_wall']:.2f}", flush=True)
        out["results"][what] = res
    out["env"]["load_end"] = os.getloadavg()
    print("load", os.getloadavg())
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


def _onednn_version():
    for line in torch.__config__.show().splitlines():
        if "oneDNN" in line or "MKL-DNN" in line or "mkldnn" in line.lower():
            return line.strip()
    return None


if __name__ == "__main__":
    main()
