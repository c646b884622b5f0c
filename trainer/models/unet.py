"""The research code's plain U-Net: five levels of 64/96/128/164/196 channels.

Each level is a double 3x3 conv with InstanceNorm and ReLU; 2x2 max-pooling goes down, bilinear
interpolation (align_corners=True, like the classic milesial UNet) goes up, and skips are concatenated.
A 1x1 conv gives the logits. Upsampling targets the skip's exact size, so any input size works:
a 400x400 tile pools to 200/100/50/25, and an odd size like 25 pools to 12 and comes back to 25.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_CHANNELS = (64, 96, 128, 164, 196)


class DoubleConv(nn.Sequential):
    """(3x3 conv -> InstanceNorm -> ReLU) twice."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        # No conv bias: the affine InstanceNorm right after it has its own shift.
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.InstanceNorm2d(out_ch, affine=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.InstanceNorm2d(out_ch, affine=True),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net returning logits (B, n_classes, H, W) for input (B, in_channels, H, W)."""

    deep_supervision = False

    def __init__(
        self, in_channels: int, n_classes: int, channels: tuple[int, ...] = DEFAULT_CHANNELS
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        if len(channels) < 2:
            raise ValueError(f"UNet needs at least 2 levels of channels, got {channels}")
        self.down = nn.ModuleList()
        prev = in_channels
        for ch in channels:
            self.down.append(DoubleConv(prev, ch))
            prev = ch
        # Decoder level i takes the upsampled deeper features plus the skip of encoder level i.
        self.up = nn.ModuleList(
            DoubleConv(channels[i + 1] + channels[i], channels[i]) for i in reversed(range(len(channels) - 1))
        )
        self.head = nn.Conv2d(channels[0], n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        skips.pop()  # the bottleneck output is x itself
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)
