"""The CIFAR classifiers of the dataset-distillation literature, for any channels, size, classes.

"Instance norm" is ``GroupNorm(C, C)`` as in DC/DSA/MTT: it has no running buffers, so a
network is fully described by its parameters and ``torch.func.functional_call`` on a flat
parameter vector reproduces it exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.errors import UserError


def make_norm(kind: str, channels: int, size: int) -> nn.Module:
    if kind == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "layernorm":
        return nn.LayerNorm([channels, size, size])
    if kind == "groupnorm":
        return nn.GroupNorm(min(4, channels), channels)
    if kind in ("none", None):
        return nn.Identity()
    raise UserError(
        f"unknown norm {kind!r}; use instancenorm, batchnorm, layernorm, groupnorm or none"
    )


def make_act(kind: str) -> nn.Module:
    """In place where autograd allows it (ReLU, LeakyReLU: their backward needs only their output,
    and every layer before one here, conv or norm, needs only its input): the pre-activation
    tensor is not kept beside the activation during the forward, which lowers peak memory in the
    distillation unroll. Sigmoid and GELU have no in-place module form."""
    acts = {
        "relu": lambda: nn.ReLU(inplace=True),
        "leakyrelu": lambda: nn.LeakyReLU(0.01, inplace=True),
        "sigmoid": nn.Sigmoid,
        "gelu": nn.GELU,
    }
    if kind not in acts:
        raise UserError(f"unknown activation {kind!r}; use one of {sorted(acts)}")
    return acts[kind]()


def make_pool(kind: str) -> nn.Module:
    pools = {
        "avgpool": lambda: nn.AvgPool2d(2),
        "maxpool": lambda: nn.MaxPool2d(2),
        "none": nn.Identity,
    }
    if kind not in pools:
        raise UserError(f"unknown pooling {kind!r}; use avgpool, maxpool or none")
    return pools[kind]()


class ConvNet(nn.Module):
    """depth x [conv3x3(width) -> norm -> act -> pool], then one linear layer."""

    def __init__(
        self,
        channels: int = 3,
        num_classes: int = 10,
        im_size: int = 32,
        depth: int = 3,
        width: int = 128,
        norm: str = "instancenorm",
        act: str = "relu",
        pool: str = "avgpool",
    ):
        super().__init__()
        layers, c, size = [], channels, im_size
        for _ in range(depth):
            layers += [
                nn.Conv2d(c, width, 3, padding=1),
                make_norm(norm, width, size),
                make_act(act),
                make_pool(pool),
            ]
            c = width
            size = size // 2 if pool != "none" else size
        if size < 1:
            raise UserError(f"ConvNet depth {depth} pools a {im_size}px image below 1px")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class AlexNet(nn.Module):
    """The CIFAR AlexNet of DC/MTT (no normalisation)."""

    def __init__(self, channels: int = 3, num_classes: int = 10, im_size: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 128, 5, padding=2), nn.ReLU(True), nn.MaxPool2d(2),
            nn.Conv2d(128, 192, 5, padding=2), nn.ReLU(True), nn.MaxPool2d(2),
            nn.Conv2d(192, 256, 3, padding=1), nn.ReLU(True),
            nn.Conv2d(256, 192, 3, padding=1), nn.ReLU(True),
            nn.Conv2d(192, 192, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Linear(192 * (im_size // 8) ** 2, num_classes)

    def embed(self, x):
        return self.features(x).flatten(1)

    def forward(self, x):
        return self.classifier(self.embed(x))


class VGG11(nn.Module):
    """VGG11 with instance norm; five 2x poolings, so 32px images end at 1x1x512."""

    plan = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(
        self,
        channels: int = 3,
        num_classes: int = 10,
        im_size: int = 32,
        norm: str = "instancenorm",
    ):
        super().__init__()
        # small images (e.g. 28px) are padded up to 32px by the first conv, as DC/MTT do for MNIST
        pad0 = 1 + max(0, (32 - im_size) // 2)
        layers, c, size = [], channels, im_size + 2 * (pad0 - 1)
        for v in self.plan:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                layers += [
                    nn.Conv2d(c, v, 3, padding=pad0 if not layers else 1),
                    make_norm(norm, v, size),
                    nn.ReLU(True),
                ]
                c = v
        if size < 1:
            raise UserError(f"VGG11 needs images of at least 32px, got {im_size}")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512 * size * size, num_classes)

    def embed(self, x):
        return self.features(x).flatten(1)

    def forward(self, x):
        return self.classifier(self.embed(x))


class BasicBlock(nn.Module):
    """ResNet basic block; ``pool_downsample`` replaces strided convs by avgpool 2 (ResNet_AP)."""

    def __init__(
        self, c_in: int, c_out: int, stride: int, norm: str, size: int, pool_downsample: bool
    ):
        super().__init__()
        self.pool = pool_downsample and stride != 1
        out_size = size // stride
        conv_stride = 1 if pool_downsample else stride
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=conv_stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, c_out, out_size)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = make_norm(norm, c_out, out_size)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            sc = [nn.Conv2d(c_in, c_out, 1, stride=conv_stride, bias=False)]
            if self.pool:
                sc.append(nn.AvgPool2d(2))
            self.shortcut = nn.Sequential(*sc, make_norm(norm, c_out, out_size))

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)), inplace=True)
        if self.pool:
            out = F.avg_pool2d(out, 2)
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class ResNet18(nn.Module):
    """CIFAR ResNet18 (3x3 stem, stride 1); ``pool_downsample=True`` gives ResNet18_AP."""

    def __init__(
        self,
        channels: int = 3,
        num_classes: int = 10,
        im_size: int = 32,
        norm: str = "instancenorm",
        pool_downsample: bool = False,
    ):
        super().__init__()
        self.pool_downsample = pool_downsample
        self.stem = nn.Sequential(
            nn.Conv2d(channels, 64, 3, padding=1, bias=False),
            make_norm(norm, 64, im_size),
            nn.ReLU(True),
        )
        blocks, c, size = [], 64, im_size
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            for s in (stride, 1):
                blocks.append(BasicBlock(c, width, s, norm, size, pool_downsample))
                c, size = width, size // s
        self.layers = nn.Sequential(*blocks)
        # ResNet18 pools 4x4 -> 1x1 (global); ResNet18_AP keeps the 4x4 map (linear 512*4*4)
        self.out_size = size
        self.classifier = nn.Linear(512 * (size * size if pool_downsample else 1), num_classes)

    def embed(self, x):
        out = self.layers(self.stem(x))
        out = out.flatten(1) if self.pool_downsample else F.adaptive_avg_pool2d(out, 1).flatten(1)
        return out

    def forward(self, x):
        return self.classifier(self.embed(x))


CLASSIFIERS = {
    "convnet": ConvNet,
    "alexnet": AlexNet,
    "vgg11": VGG11,
    "resnet18": ResNet18,
    "resnet18_ap": lambda **kw: ResNet18(pool_downsample=True, **kw),
}


def build_classifier(
    name: str, channels: int = 3, num_classes: int = 10, im_size: int = 32, **options
) -> nn.Module:
    """Build a classifier by name: ``convnet``, ``alexnet``, ``vgg11``, ``resnet18``,
    ``resnet18_ap``."""
    key = name.lower().replace("-", "_")
    if key not in CLASSIFIERS:
        raise UserError(f"unknown net {name!r}; choose one of {', '.join(CLASSIFIERS)}")
    options = {k: v for k, v in options.items() if v is not None}
    try:
        return CLASSIFIERS[key](
            channels=channels, num_classes=num_classes, im_size=im_size, **options
        )
    except TypeError as e:
        raise UserError(
            f"net {name!r} does not take these options {sorted(options)} ({e})"
        ) from None
