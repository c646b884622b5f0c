"""Per-sample geometric transforms of a batch as one 3x3 matrix each, applied with one warp per tensor.

Flips, quarter turns and the affine jitter of ``GpuAugment`` are composed into a single pixel-space matrix
per sample, so the image is resampled once (bilinear) and the mask once (nearest), instead of once per op.
Coordinates are pixel centres: x to the right, y down, (0, 0) the top-left pixel. Matrices map an output
pixel to the source point it samples (dst -> src), so composing the inverse steps in reverse order gives
the whole pipeline's sampling map.

The samplers gather source pixels directly from pixel coordinates. For flips and quarter turns of a square
tile every coordinate is an exact integer in float32, every bilinear weight is exactly 0 or 1, and the
warp is a lossless pixel permutation, bit for bit what ``torch.flip``/``torch.rot90`` give. (``grid_sample``
works on coordinates normalized to [-1, 1], whose rounding blends neighbours by ~1e-5 there.) Points
outside the source read zeros in the image and ``fill`` in the mask.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def identity(batch: int, device: torch.device) -> torch.Tensor:
    return _constant(((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)), device).expand(batch, 3, 3)


@functools.lru_cache(maxsize=64)
def _constant(values: tuple, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A constant tensor made once per device and reused read-only: building it from a Python list on every
    batch would copy it from the host, and on CUDA such a copy waits for all the device's queued work."""
    return torch.tensor(values, dtype=dtype, device=device)


def hflip(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(3, 3) dst -> src of a left/right flip (its own inverse): x -> W-1-x."""
    return _constant(((-1.0, 0.0, width - 1.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)), device)


def vflip(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(3, 3) dst -> src of an up/down flip: y -> H-1-y."""
    return _constant(((1.0, 0.0, 0.0), (0.0, -1.0, height - 1.0), (0.0, 0.0, 1.0)), device)


def rot90_table(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(4, 3, 3): entry k is dst -> src of ``torch.rot90(img, k, dims=(-2, -1))``, a turn about the centre.

    For a square tile the entries are small integers, so the warp is an exact permutation of its pixels.
    """
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    table = []
    for k in range(4):
        # torch.rot90 by k turns the picture counter-clockwise as displayed; sampling undoes that turn.
        c, s = round(math.cos(k * math.pi / 2)), round(math.sin(k * math.pi / 2))
        # src - centre = R(+k) (dst - centre) with y pointing down: [[c, -s], [s, c]] in (x, y).
        a, b, d, e = c, -s, s, c
        table.append(((a, b, cx - a * cx - b * cy), (d, e, cy - d * cx - e * cy), (0.0, 0.0, 1.0)))
    return _constant(tuple(table), device)


def affine_forward(angle: torch.Tensor, translate: torch.Tensor, scale: torch.Tensor, shear: torch.Tensor,
                   height: int, width: int) -> torch.Tensor:  # fmt: skip
    """(B, 3, 3) src -> dst in kornia's ``RandomAffine`` convention (``kornia.geometry.get_affine_matrix2d``).

    angle (B,) degrees, positive turns clockwise as displayed; translate (B, 2) pixels; scale (B,) isotropic;
    shear (B, 2) degrees, x then y, about the centre ((W-1)/2, (H-1)/2). Forward: shear, then rotation and
    scale about the centre, then translation.
    """
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    theta = torch.deg2rad(-angle)  # kornia negates: its rotation helper turns counter-clockwise
    alpha, beta = scale * torch.cos(theta), scale * torch.sin(theta)
    b, a = -torch.tan(torch.deg2rad(shear[:, 0])), -torch.tan(torch.deg2rad(shear[:, 1]))
    # Shear about the centre: x' = x + b (y - cy), y' = y + a (x' - cx).
    s00, s01, s10, s11 = torch.ones_like(a), b, a, a * b + 1
    s02, s12 = -b * cy, -a * cx - (a * b) * cy  # keeps the centre fixed
    # Rotation + scale about the centre (OpenCV's getRotationMatrix2D), then the translation.
    r00, r01, r10, r11 = alpha, beta, -beta, alpha
    r02 = (1 - alpha) * cx - beta * cy + translate[:, 0]
    r12 = beta * cx + (1 - alpha) * cy + translate[:, 1]
    m = torch.stack([
        r00 * s00 + r01 * s10, r00 * s01 + r01 * s11, r00 * s02 + r01 * s12 + r02,
        r10 * s00 + r11 * s10, r10 * s01 + r11 * s11, r10 * s02 + r11 * s12 + r12,
    ], dim=-1).view(-1, 2, 3)  # fmt: skip
    bottom = _constant((0.0, 0.0, 1.0), m.device, m.dtype).expand(m.shape[0], 1, 3)
    return torch.cat([m, bottom], dim=1)


def invert_affine(m: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) affine matrices inverted in closed form: no linalg call, so no device -> host sync."""
    a, b, tx = m[:, 0, 0], m[:, 0, 1], m[:, 0, 2]
    c, d, ty = m[:, 1, 0], m[:, 1, 1], m[:, 1, 2]
    det = a * d - b * c
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
    rows = torch.stack([ia, ib, -(ia * tx + ib * ty), ic, id_, -(ic * tx + id_ * ty)], dim=-1).view(-1, 2, 3)
    bottom = _constant((0.0, 0.0, 1.0), m.device, m.dtype).expand(m.shape[0], 1, 3)
    return torch.cat([rows, bottom], dim=1)


def source_points(m: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 2, H*W): the source point (x, y) that every output pixel samples under dst -> src ``m``; one
    batched matmul against the pixel grid."""
    return torch.matmul(m[:, :2].to(torch.float32), _pixel_grid(height, width, m.device))


@functools.lru_cache(maxsize=16)
def _pixel_grid(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(3, H*W): x, y and 1 of every pixel, row by row."""
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                            torch.arange(width, device=device, dtype=torch.float32), indexing="ij")  # fmt: skip
    return torch.stack([xs.flatten(), ys.flatten(), torch.ones(height * width, device=device)])


def warp_bilinear(image: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Float ``(B, C, H, W)`` resampled bilinearly under dst -> src ``m`` (B, 3, 3); zeros outside.

    The image is padded with a zero border and the points clamped into it, so every neighbour is a valid
    index and one gather reads all four; a point outside the tile reads only the border.
    """
    b, ch, h, w = image.shape
    points = source_points(m, h, w)
    x, y = points[:, 0].clamp(-1, w), points[:, 1].clamp(-1, h)  # (B, H*W) each
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    wx, wy = torch.stack([1 - fx, fx], 1), torch.stack([1 - fy, fy], 1)  # (B, 2, H*W): lower, upper
    weights = (wy[:, :, None] * wx[:, None, :]).view(b, 1, 4, h * w)  # (dy, dx) = 00, 01, 10, 11
    pw = w + 3  # padded width: one column before, two after (the upper neighbour of x = w)
    corner = _constant((pw + 1, pw + 2, 2 * pw + 1, 2 * pw + 2), image.device, torch.long).view(1, 4, 1)
    index = (y0 * pw + x0).long()[:, None] + corner  # (B, 4, H*W) into the padded image
    padded = F.pad(image, (1, 2, 1, 2)).reshape(b, ch, -1)
    values = padded.gather(2, index.view(b, 1, -1).expand(b, ch, -1)).view(b, ch, 4, h * w)
    return (values * weights).sum(2).view(b, ch, h, w)


def warp_nearest(data: torch.Tensor, m: torch.Tensor, fill: int | float) -> torch.Tensor:
    """``(B, H, W)`` or ``(B, C, H, W)`` resampled by nearest neighbour under ``m``; ``fill`` outside.
    Values are copied, never interpolated, so a mask keeps exactly its labels."""
    b, h, w = data.shape[0], data.shape[-2], data.shape[-1]
    points = torch.round(source_points(m, h, w))  # half to even, as grid_sample's nearest
    x, y = points[:, 0].clamp(-1, w), points[:, 1].clamp(-1, h)  # -1 and w/h land on the fill border
    index = ((y + 1) * (w + 2) + (x + 1)).long()
    padded = F.pad(data.reshape(b, -1, h, w), (1, 1, 1, 1), value=fill).reshape(b, -1, (h + 2) * (w + 2))
    picked = padded.gather(2, index[:, None].expand(b, padded.shape[1], -1))
    return picked.view(data.shape)
