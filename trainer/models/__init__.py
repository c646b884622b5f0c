"""Segmentation models; every one maps (B, in_channels, H, W) floats to (B, n_classes, H, W) logits.

- ``unet.py``: ``UNet``, the research code's 5-level U-Net (64/96/128/164/196 channels, InstanceNorm).
- ``u2net.py``: ``U2Net`` and ``U2NetP`` (arXiv:2005.09007), key-compatible with the official checkpoints.
  In train mode they return ``(fused, side1, ..., side6)`` for deep supervision, in eval mode the fused
  logits; their class attribute ``deep_supervision`` is True (False on the others) so the loss can tell.
- ``resnet_unet.py``: ``ResNetUNet``, usuyama/pytorch-unet's ResNet-18 U-Net ("origin_UNet"), optional
  local backbone weights via ``weights_path``.

n_classes=1 means a single binary logit (sigmoid); n_classes>1 means softmax over classes. Any input
size works, including 400x400 tiles, which are not a multiple of 32.
"""

from __future__ import annotations

from torch import nn

from .resnet_unet import ResNetUNet
from .u2net import U2Net, U2NetP
from .unet import UNet

MODELS: dict[str, type[nn.Module]] = {
    "unet": UNet,
    "u2net": U2Net,
    "u2netp": U2NetP,
    "resnet_unet": ResNetUNet,
}


def build_model(name: str, in_channels: int, n_classes: int, **kwargs) -> nn.Module:
    """Build the model ``name`` (a key of MODELS); ``kwargs`` go to its constructor (e.g. ``channels``)."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    if in_channels < 1 or n_classes < 1:
        raise ValueError(
            f"model {name!r}: in_channels and n_classes must be >= 1, got {in_channels} and {n_classes}"
        )
    return MODELS[name](in_channels=in_channels, n_classes=n_classes, **kwargs)


__all__ = ["MODELS", "ResNetUNet", "U2Net", "U2NetP", "UNet", "build_model"]
