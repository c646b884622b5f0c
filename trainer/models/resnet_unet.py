"""The research code's "origin_UNet": usuyama/pytorch-unet's ResNetUNet on a torchvision ResNet-18.

The ResNet-18 stem and stages are the encoder (layer0 = conv1/bn1/relu at H/2, layer1 = maxpool + stage 1
at H/4, layer2..layer4 down to H/32); 1x1 conv+ReLU laterals feed a decoder of x2 bilinear upsampling
(align_corners=True, as in the original), concatenation and 3x3 conv+ReLU; a full-resolution branch
(conv_original_size0/1/2) restores detail before the 1x1 ``conv_last`` gives the logits.

Differences from the original, all deliberate:

- Weights are never downloaded. ``weights_path`` loads a local torchvision ``resnet18`` state dict (e.g. the
  ImageNet file ``resnet18-f37072fd.pth``) into the encoder; for in_channels != 3 the first conv's
  pretrained kernel is averaged over RGB and spread over the new channels (a 1-channel model gets the sum).
- The unused ResNet avgpool/fc are dropped, so every parameter receives a gradient (DDP needs that).
- The decoder's fixed x2 steps need sizes divisible by 32; 400 is not, so the input is padded
  (replicate) on the bottom/right to the next multiple of 32 and the logits are cropped back to H x W.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

STRIDE = 32  # total downsampling of ResNet-18


def convrelu(in_ch: int, out_ch: int, kernel: int, padding: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, padding=padding), nn.ReLU(inplace=True))


def _load_resnet18(weights_path: str | Path | None) -> nn.Module:
    """A torchvision resnet18 with random weights, or with the local state dict at ``weights_path``."""
    net = torchvision.models.resnet18(weights=None)
    if weights_path is None:
        return net
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: resnet18 weights file not found")
    state = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a resnet18 state dict, got {type(state).__name__}")
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[:2]
        raise ValueError(f"{path}: not a torchvision resnet18 state dict ({' '.join(first)})") from err
    return net


def _adapt_first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """The conv for ``in_channels`` inputs: RGB kernels averaged, scaled to keep the activation size."""
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        mean = conv.weight.mean(dim=1, keepdim=True)
        new.weight.copy_(mean.repeat(1, in_channels, 1, 1) * (conv.in_channels / in_channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


class ResNetUNet(nn.Module):
    """ResNet-18 U-Net returning logits (B, n_classes, H, W) for input (B, in_channels, H, W)."""

    deep_supervision = False

    def __init__(self, in_channels: int, n_classes: int, weights_path: str | Path | None = None) -> None:
        super().__init__()
        base = _load_resnet18(weights_path)
        if in_channels != base.conv1.in_channels:
            base.conv1 = _adapt_first_conv(base.conv1, in_channels)

        self.layer0 = nn.Sequential(base.conv1, base.bn1, base.relu)  # 64, H/2
        self.layer0_1x1 = convrelu(64, 64, 1, 0)
        self.layer1 = nn.Sequential(base.maxpool, base.layer1)  # 64, H/4
        self.layer1_1x1 = convrelu(64, 64, 1, 0)
        self.layer2 = base.layer2  # 128, H/8
        self.layer2_1x1 = convrelu(128, 128, 1, 0)
        self.layer3 = base.layer3  # 256, H/16
        self.layer3_1x1 = convrelu(256, 256, 1, 0)
        self.layer4 = base.layer4  # 512, H/32
        self.layer4_1x1 = convrelu(512, 512, 1, 0)

        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv_up3 = convrelu(256 + 512, 512, 3, 1)
        self.conv_up2 = convrelu(128 + 512, 256, 3, 1)
        self.conv_up1 = convrelu(64 + 256, 256, 3, 1)
        self.conv_up0 = convrelu(64 + 256, 128, 3, 1)

        self.conv_original_size0 = convrelu(in_channels, 64, 3, 1)
        self.conv_original_size1 = convrelu(64, 64, 3, 1)
        self.conv_original_size2 = convrelu(64 + 128, 64, 3, 1)
        self.conv_last = nn.Conv2d(64, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % STRIDE, 0, -h % STRIDE), mode="replicate")

        x_original = self.conv_original_size1(self.conv_original_size0(x))
        layer0 = self.layer0(x)
        layer1 = self.layer1(layer0)
        layer2 = self.layer2(layer1)
        layer3 = self.layer3(layer2)
        layer4 = self.layer4(layer3)

        y = self.upsample(self.layer4_1x1(layer4))
        y = self.conv_up3(torch.cat([y, self.layer3_1x1(layer3)], dim=1))
        y = self.upsample(y)
        y = self.conv_up2(torch.cat([y, self.layer2_1x1(layer2)], dim=1))
        y = self.upsample(y)
        y = self.conv_up1(torch.cat([y, self.layer1_1x1(layer1)], dim=1))
        y = self.upsample(y)
        y = self.conv_up0(torch.cat([y, self.layer0_1x1(layer0)], dim=1))
        y = self.upsample(y)
        y = self.conv_original_size2(torch.cat([y, x_original], dim=1))
        return self.conv_last(y)[..., :h, :w]
