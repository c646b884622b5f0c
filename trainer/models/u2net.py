"""U²-Net and U²-NetP (Qin et al. 2020, arXiv:2005.09007), returning logits.

Architecture as in the official code (xuebinqin/U-2-Net, model/u2net.py): a U of six stages built from
Residual U-blocks (RSU-7, RSU-6, RSU-5, RSU-4, RSU-4F), a side output per decoder stage upsampled to the
input size, and a 1x1 conv fusing the six sides. Differences from the official code, all deliberate:

- logits, not sigmoids: the loss applies sigmoid/softmax itself (numerically safer, and multiclass works);
- the fusing conv maps 6*n_classes -> n_classes channels (the official one hard-codes 6 inputs, which only
  works for one class); at n_classes=1 the two are identical, so parameter counts match exactly;
- ``F.interpolate(size=..., align_corners=False)`` is the modern spelling of the official
  ``F.upsample(size=..., mode="bilinear")``.

Module names follow the official code (stage1, rebnconvin, conv_s1, side1, outconv, ...) so an official
3-channel, 1-class checkpoint loads with ``load_state_dict``.

Sizes that are not a multiple of 32 (a 400x400 tile) work: pooling uses ceil_mode and every upsampling
goes to the exact size of the tensor it is concatenated with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _upsample_like(src: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.interpolate(src, size=target.shape[-2:], mode="bilinear", align_corners=False)


class REBNCONV(nn.Module):
    """3x3 (dilated) conv -> BatchNorm -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int, dirate: int = 1) -> None:
        super().__init__()
        self.conv_s1 = nn.Conv2d(in_ch, out_ch, 3, padding=dirate, dilation=dirate)
        self.bn_s1 = nn.BatchNorm2d(out_ch)
        self.relu_s1 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu_s1(self.bn_s1(self.conv_s1(x)))


class RSU(nn.Module):
    """Residual U-block RSU-L (L = height, 4..7): a small U-Net of depth L whose output adds its input conv.

    Encoder: ``rebnconv1`` .. ``rebnconv{L-1}`` with 2x2 ceil-mode max-pooling between them, then a
    dilation-2 ``rebnconv{L}`` at the bottom. Decoder: ``rebnconv{L-1}d`` .. ``rebnconv1d``, each on the
    concatenation of the deeper output (upsampled) and the encoder skip.
    """

    def __init__(self, height: int, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__()
        if height < 2:
            raise ValueError(f"RSU height must be >= 2, got {height}")
        self.height = height
        self.rebnconvin = REBNCONV(in_ch, out_ch)
        self.pool = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        # add_module keeps the official attribute names (rebnconv1, rebnconv3d, ...) for checkpoint loading.
        self.add_module("rebnconv1", REBNCONV(out_ch, mid_ch))
        for i in range(2, height):
            self.add_module(f"rebnconv{i}", REBNCONV(mid_ch, mid_ch))
        self.add_module(f"rebnconv{height}", REBNCONV(mid_ch, mid_ch, dirate=2))
        for i in range(height - 1, 1, -1):
            self.add_module(f"rebnconv{i}d", REBNCONV(mid_ch * 2, mid_ch))
        self.add_module("rebnconv1d", REBNCONV(mid_ch * 2, out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hxin = self.rebnconvin(x)
        enc = [self.rebnconv1(hxin)]
        for i in range(2, self.height):
            enc.append(getattr(self, f"rebnconv{i}")(self.pool(enc[-1])))
        hx = getattr(self, f"rebnconv{self.height}")(enc[-1])
        hx = getattr(self, f"rebnconv{self.height - 1}d")(torch.cat((hx, enc[-1]), 1))
        for i in range(self.height - 2, 0, -1):
            skip = enc[i - 1]
            hx = getattr(self, f"rebnconv{i}d")(torch.cat((_upsample_like(hx, skip), skip), 1))
        return hx + hxin


class RSU4F(nn.Module):
    """RSU-4F: the RSU-4 shape with dilations 1/2/4/8 instead of pooling, for the low-resolution stages."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__()
        self.rebnconvin = REBNCONV(in_ch, out_ch)
        self.rebnconv1 = REBNCONV(out_ch, mid_ch, dirate=1)
        self.rebnconv2 = REBNCONV(mid_ch, mid_ch, dirate=2)
        self.rebnconv3 = REBNCONV(mid_ch, mid_ch, dirate=4)
        self.rebnconv4 = REBNCONV(mid_ch, mid_ch, dirate=8)
        self.rebnconv3d = REBNCONV(mid_ch * 2, mid_ch, dirate=4)
        self.rebnconv2d = REBNCONV(mid_ch * 2, mid_ch, dirate=2)
        self.rebnconv1d = REBNCONV(mid_ch * 2, out_ch, dirate=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hxin = self.rebnconvin(x)
        hx1 = self.rebnconv1(hxin)
        hx2 = self.rebnconv2(hx1)
        hx3 = self.rebnconv3(hx2)
        hx4 = self.rebnconv4(hx3)
        hx3d = self.rebnconv3d(torch.cat((hx4, hx3), 1))
        hx2d = self.rebnconv2d(torch.cat((hx3d, hx2), 1))
        hx1d = self.rebnconv1d(torch.cat((hx2d, hx1), 1))
        return hx1d + hxin


def _block(height: int | str, in_ch: int, mid_ch: int, out_ch: int) -> nn.Module:
    return RSU4F(in_ch, mid_ch, out_ch) if height == "4F" else RSU(int(height), in_ch, mid_ch, out_ch)


class _U2NetBase(nn.Module):
    """Shared U²-Net body; subclasses give the per-stage (height, mid, out) table.

    Train mode returns ``(fused, side1, ..., side6)`` logits, each (B, n_classes, H, W), for deep
    supervision; eval mode returns the fused logits only.
    """

    deep_supervision = True
    # (height, mid_ch, out_ch) for stage1..stage6, then stage5d..stage1d.
    ENCODER: tuple[tuple[int | str, int, int], ...]
    DECODER: tuple[tuple[int | str, int, int], ...]

    def __init__(self, in_channels: int, n_classes: int) -> None:
        super().__init__()
        prev = in_channels
        enc_out = []
        for i, (height, mid, out) in enumerate(self.ENCODER, start=1):
            self.add_module(f"stage{i}", _block(height, prev, mid, out))
            enc_out.append(out)
            prev = out
        self.pool = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        # Decoder stage k (5..1) sees the upsampled deeper output concatenated with encoder stage k.
        side_in = [prev]  # side6 reads stage6
        for k, (height, mid, out) in zip(range(5, 0, -1), self.DECODER, strict=True):
            self.add_module(f"stage{k}d", _block(height, prev + enc_out[k - 1], mid, out))
            side_in.insert(0, out)
            prev = out
        for k, ch in enumerate(side_in, start=1):
            self.add_module(f"side{k}", nn.Conv2d(ch, n_classes, 3, padding=1))
        self.outconv = nn.Conv2d(6 * n_classes, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        enc = []
        hx = x
        for i in range(1, 7):
            if i > 1:
                hx = self.pool(hx)
            hx = getattr(self, f"stage{i}")(hx)
            enc.append(hx)
        dec = [hx]  # deepest first: stage6, stage5d, ..., stage1d
        for k in range(5, 0, -1):
            skip = enc[k - 1]
            hx = getattr(self, f"stage{k}d")(torch.cat((_upsample_like(hx, skip), skip), 1))
            dec.append(hx)
        dec.reverse()  # stage1d, ..., stage5d, stage6
        d1 = self.side1(dec[0])
        sides = [d1] + [_upsample_like(getattr(self, f"side{k}")(dec[k - 1]), d1) for k in range(2, 7)]
        d0 = self.outconv(torch.cat(sides, 1))
        if self.training:
            return (d0, *sides)
        return d0


class U2Net(_U2NetBase):
    """Full U²-Net (44.0 M parameters at in=3, out=1)."""

    ENCODER = ((7, 32, 64), (6, 32, 128), (5, 64, 256), (4, 128, 512), ("4F", 256, 512), ("4F", 256, 512))
    DECODER = (("4F", 256, 512), (4, 128, 256), (5, 64, 128), (6, 32, 64), (7, 16, 64))


class U2NetP(_U2NetBase):
    """U²-NetP, the small variant (1.13 M parameters at in=3, out=1)."""

    ENCODER = ((7, 16, 64), (6, 16, 64), (5, 16, 64), (4, 16, 64), ("4F", 16, 64), ("4F", 16, 64))
    DECODER = (("4F", 16, 64), (4, 16, 64), (5, 16, 64), (6, 16, 64), (7, 16, 64))
