"""Builders of PyTorch ConvMixers and checkpoint files for the converter tests."""

import os

import numpy as np

import weights_converter  # noqa: F401  (keeps triton out before TensorFlow loads)

torch = __import__("pytest").importorskip("torch")

from weights_converter.demo import randomize_batchnorm  # noqa: E402
from weights_converter.parity import paper_convmixer  # noqa: E402

TINY = dict(dim=16, depth=2, kernel_size=5, patch_size=2, num_classes=10)


# A script prelude that makes torch absent, as on a machine without it: importing it
# raises ModuleNotFoundError and sys.modules never holds it (libraries that probe
# sys.modules for torch, such as scipy's array API helpers, see no torch at all).
WITHOUT_TORCH = (
    "import sys\n"
    "class _NoTorch:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] == 'torch':\n"
    "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
    "sys.meta_path.insert(0, _NoTorch())\n"
)


def timm_convmixer(activation="gelu", seed=0, **overrides):
    from timm.models.convmixer import ConvMixer

    cfg = dict(TINY, **overrides)
    torch.manual_seed(seed)
    act = {"gelu": torch.nn.GELU, "relu": torch.nn.ReLU}[activation]
    model = ConvMixer(
        cfg["dim"],
        cfg["depth"],
        kernel_size=cfg["kernel_size"],
        patch_size=cfg["patch_size"],
        num_classes=cfg["num_classes"],
        act_layer=act,
    )
    return randomize_batchnorm(model, seed).eval()


def sequential_convmixer(activation="gelu", depthwise=True, seed=0, **overrides):
    cfg = dict(TINY, **overrides)
    torch.manual_seed(seed)
    model = paper_convmixer(
        cfg["dim"],
        cfg["depth"],
        cfg["kernel_size"],
        cfg["patch_size"],
        cfg["num_classes"],
        activation=activation,
        depthwise=depthwise,
    )
    return randomize_batchnorm(model, seed).eval()


def save_checkpoint(state_dict, path, wrapper=None, prefix="", legacy=False):
    """Writes `state_dict` the way the wild does: wrapped, prefixed, torch or safetensors."""
    sd = {prefix + k: v for k, v in state_dict.items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        assert wrapper is None, "safetensors holds a flat dict"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        return path
    if wrapper == "state_dict_ema":
        # timm's training checkpoint: EMA beside perturbed live weights, plus bookkeeping.
        live = {k: (v + 1.0 if v.is_floating_point() else v) for k, v in sd.items()}
        obj = {
            "epoch": 3,
            "arch": "convmixer",
            "state_dict": live,
            "state_dict_ema": sd,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
            "version": 2,
        }
    elif wrapper:
        obj = {wrapper: sd, "epoch": 3}
    else:
        obj = sd
    torch.save(obj, str(path), _use_new_zipfile_serialization=not legacy)
    return path


def keras_input_to_torch(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def directory_entries(path):
    return sorted(os.listdir(path))


def one_liner_convmixer(activation="gelu", depthwise=False, seed=0, **overrides):
    """The paper's 280-character ConvMixer written out: every convolution wrapped with its
    activation and BatchNorm in an nn.Sequential, the residual a Sequential subclass that
    adds its first child's output to its input, padding k // 2. The version printed in the
    tweet has no groups=dim (a full k x k convolution); the released code has it."""
    cfg = dict(TINY, **overrides)
    h, k, p = cfg["dim"], cfg["kernel_size"], cfg["patch_size"]
    nn = torch.nn
    act = {"gelu": nn.GELU, "relu": nn.ReLU}[activation]

    def wrapped(conv):
        return nn.Sequential(conv, act(), nn.BatchNorm2d(h))

    class Residual(nn.Sequential):
        def forward(self, x):
            return self[0](x) + x

    torch.manual_seed(seed)
    spatial = dict(groups=h if depthwise else 1, padding=k // 2)
    blocks = [
        nn.Sequential(Residual(wrapped(nn.Conv2d(h, h, k, **spatial))), wrapped(nn.Conv2d(h, h, 1)))
        for _ in range(cfg["depth"])
    ]
    model = nn.Sequential(
        wrapped(nn.Conv2d(3, h, p, stride=p)),
        *blocks,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(h, cfg["num_classes"]),
    )
    return randomize_batchnorm(model, seed).eval()


def labml_convmixer(seed=0, **overrides):
    """labml.ai's annotated ConvMixer (labml_nn/conv_mixer) rebuilt in plain PyTorch: the same
    modules under the same names (patch_emb, classification, conv_mixer_layers, in that order),
    GELU throughout, depthwise padding (k - 1) // 2, the residual added in place. labml clones
    one layer; here each starts from its own random weights, so that swapped blocks show."""
    cfg = dict(TINY, **overrides)
    d, k, p = cfg["dim"], cfg["kernel_size"], cfg["patch_size"]
    nn = torch.nn

    class PatchEmbeddings(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, d, kernel_size=p, stride=p)
            self.act = nn.GELU()
            self.norm = nn.BatchNorm2d(d)

        def forward(self, x):
            return self.norm(self.act(self.conv(x)))

    class ConvMixerLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.depth_wise_conv = nn.Conv2d(d, d, k, groups=d, padding=(k - 1) // 2)
            self.act1 = nn.GELU()
            self.norm1 = nn.BatchNorm2d(d)
            self.point_wise_conv = nn.Conv2d(d, d, kernel_size=1)
            self.act2 = nn.GELU()
            self.norm2 = nn.BatchNorm2d(d)

        def forward(self, x):
            residual = x
            x = self.norm1(self.act1(self.depth_wise_conv(x)))
            x += residual
            return self.norm2(self.act2(self.point_wise_conv(x)))

    class ClassificationHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d((1, 1))
            self.linear = nn.Linear(d, cfg["num_classes"])

        def forward(self, x):
            return self.linear(self.pool(x)[:, :, 0, 0])

    class ConvMixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_emb = PatchEmbeddings()
            self.classification = ClassificationHead()
            self.conv_mixer_layers = nn.ModuleList(ConvMixerLayer() for _ in range(cfg["depth"]))

        def features(self, x):
            x = self.patch_emb(x)
            for layer in self.conv_mixer_layers:
                x = layer(x)
            return x

        def forward(self, x):
            return self.classification(self.features(x))

    torch.manual_seed(seed)
    return randomize_batchnorm(ConvMixer(), seed).eval()
