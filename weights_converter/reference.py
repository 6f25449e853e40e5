"""The PyTorch reference network, for parity when timm is not installed.

It is the paper's nn.Sequential (the authors' convmixer.py) with two knobs the
released code and the paper's listing differ on: the activation and groups=dim.
Its state dict uses the paper's keys (0.weight, 3.0.fn.0.weight, ...).
"""

from __future__ import annotations


def paper_convmixer(dim, depth, kernel_size=9, patch_size=7, n_classes=1000, activation="gelu", depthwise=True):
    """The paper's ConvMixer as an nn.Sequential (exact GELU, as nn.GELU())."""
    import torch.nn as nn

    class Residual(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, x):
            return self.fn(x) + x

    act = {"gelu": nn.GELU, "relu": nn.ReLU}[activation]
    groups = dim if depthwise else 1
    return nn.Sequential(
        nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size),
        act(),
        nn.BatchNorm2d(dim),
        *[nn.Sequential(
            Residual(nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size, groups=groups, padding="same"),
                act(),
                nn.BatchNorm2d(dim),
            )),
            nn.Conv2d(dim, dim, kernel_size=1),
            act(),
            nn.BatchNorm2d(dim),
        ) for _ in range(depth)],
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(dim, n_classes),
    )
