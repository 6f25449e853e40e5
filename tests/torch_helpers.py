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
