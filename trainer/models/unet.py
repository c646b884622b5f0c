"""The research code's plain U-Net: five levels of 64/96/128/164/196 channels.

Each level is a double 3x3 conv with a norm and ReLU; 2x2 max-pooling goes down, bilinear
interpolation (align_corners=True, like the classic milesial UNet) goes up, and skips are concatenated.
A 1x1 conv gives the logits.

``norm``: ``instance`` (the research code's), ``batch``, ``group`` (groups of 8 channels) or ``none``.
InstanceNorm normalises every crop's features on its own, independent of the batch size; on an earlier demo
recipe (full resolution, 1,500 steps of 4 x 192 px crops) it scored a held-out defect IoU of 0.39, against 0.19
for GroupNorm and 0.07 for BatchNorm. With the stride-2 stem and 256 px crops, BatchNorm with channels
16/32/64/128/256 (the demo's) scored better than InstanceNorm with 12/24/48/96/192 (bench/README.md; the two
changes were measured together, not apart). A likely reason: a crop normalised on its own loses how dark it
is, which is what tells a burn mark from a dark facet.

``deep_supervision``: a 1x1 head on each coarser decoder level, upsampled to full resolution; in training
``forward`` returns ``(main, side, ...)`` (the trainer's loss sums their losses, as for U^2-Net's side
outputs), in eval mode the main logits only.

``stem``: 1 (the classic U-Net, every level's first conv at the input's resolution) or 2: a stride-2 3x3 conv
(``channels[0]`` wide, norm, ReLU) first, so every level runs at half resolution and the logits are
upsampled bilinearly to the input's size. On a CPU the narrow full-resolution layers cost most of a step;
at half resolution the same levels see twice as far (the receptive field and the crop's reach double), for
1.7x the samples per second at equal channels. The masks' thinnest strokes (3 px polylines, 5 px points) stay
recoverable from the upsampled logits.

Upsampling targets the skip's exact size, so any input size works:
a 400x400 tile pools to 200/100/50/25, and an odd size like 25 pools to 12 and comes back to 25.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_CHANNELS = (64, 96, 128, 164, 196)
NORMS = {
    "instance": lambda ch: nn.InstanceNorm2d(ch, affine=True),
    "batch": nn.BatchNorm2d,
    "group": lambda ch: nn.GroupNorm(max(1, ch // 8), ch),  # groups of 8 channels
    "none": lambda ch: nn.Identity(),
}


class DoubleConv(nn.Sequential):
    """(3x3 conv -> norm -> ReLU) twice."""

    def __init__(self, in_ch: int, out_ch: int, norm: str = "instance") -> None:
        # No conv bias: the affine norm right after it has its own shift.
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            NORMS[norm](out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            NORMS[norm](out_ch),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net returning logits (B, n_classes, H, W) for input (B, in_channels, H, W)."""

    deep_supervision = False

    def __init__(
        self, in_channels: int, n_classes: int, channels: tuple[int, ...] = DEFAULT_CHANNELS,
        norm: str = "instance", deep_supervision: bool = False, stem: int = 1,
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        if len(channels) < 2:
            raise ValueError(f"UNet needs at least 2 levels of channels, got {channels}")
        if not all(isinstance(c, int) and c >= 1 for c in channels):
            raise ValueError(f"UNet channels must be positive integers, got {channels}")
        if norm not in NORMS:
            raise ValueError(f"UNet norm must be one of {', '.join(NORMS)}, got {norm!r}")
        if stem not in (1, 2):
            raise ValueError(f"UNet stem must be 1 or 2, got {stem!r}")
        prev = in_channels
        self.stem = nn.Identity()
        if stem == 2:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, channels[0], 3, stride=2, padding=1, bias=False),
                                      NORMS[norm](channels[0]), nn.ReLU(inplace=True))
            prev = channels[0]
        self.down = nn.ModuleList()
        for ch in channels:
            self.down.append(DoubleConv(prev, ch, norm))
            prev = ch
        # Decoder level i takes the upsampled deeper features plus the skip of encoder level i.
        self.up = nn.ModuleList(
            DoubleConv(channels[i + 1] + channels[i], channels[i], norm) for i in reversed(range(len(channels) - 1))
        )
        self.head = nn.Conv2d(channels[0], n_classes, 1)
        self.deep_supervision = deep_supervision
        # One 1x1 head per coarser decoder level (coarsest first), trained only: see forward.
        self.side_heads = nn.ModuleList(
            nn.Conv2d(channels[i], n_classes, 1) for i in reversed(range(1, len(channels) - 1))
        ) if deep_supervision else nn.ModuleList()

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        size = x.shape[-2:]
        x = self.stem(x)
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        skips.pop()  # the bottleneck output is x itself
        sides = []
        for level, block in enumerate(self.up):
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
            x = block(torch.cat([x, skip], dim=1))
            if self.training and level < len(self.side_heads):
                sides.append(self.side_heads[level](x))
        out = self.head(x)
        if out.shape[-2:] != size:
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        if not sides:
            return out
        return (out, *(F.interpolate(s, size=size, mode="bilinear", align_corners=False) for s in sides))
