"""GPU-side training augmentation and input normalization: one warp per tensor, batched photometric ops.

``GpuAugment`` takes a batch already on the device -- image ``(B, C, H, W)`` uint8 and mask ``(B, H, W)`` or
``(B, 1, H, W)`` with class ids and 255 (ignore) -- and returns a normalized float image and a long
``(B, H, W)`` mask. In train mode it runs the geometric ops (image and mask together, masks with nearest
resampling), then the photometric ops (image only), then normalization. In eval mode (``.eval()``) or with
``enabled: false`` it only normalizes, so the val/test/predict inputs match the training inputs exactly.

The ops and their distributions are those of kornia's ``RandomHorizontalFlip``, ``RandomVerticalFlip``,
``RandomRotation90``, ``RandomAffine``, ``RandomBrightness``, ``RandomContrast``, ``RandomGamma``,
``RandomGaussianBlur`` and ``RandomGaussianNoise`` chained in that order, but driven the way a GPU wants
them: every random number of a batch drawn in one call on the device, the four geometric ops folded into one
matrix per sample (``trainer.warp``), and the photometric ops applied to the whole batch with per-sample
factors (``kornia.enhance``). Chaining kornia's modules costs one resampling per
geometric op, and its per-op sample selection waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import kornia.enhance as KE
import torch
import torch.nn.functional as F
from torch import nn

from shardgen.classes import IGNORE_INDEX  # the one ignore value, also in the class map and the shards

from . import warp


def _check_range(name: str, value: list[float], low: float, high: float | None = None) -> None:
    if len(value) != 2 or value[0] > value[1]:
        raise ValueError(f"augment config: {name} must be [min, max] with min <= max, got {value}")
    if value[0] < low or (high is not None and value[1] > high):
        raise ValueError(f"augment config: {name} must lie in [{low}, {high}], got {value}")


def _check_p(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"augment config: {name} must be a probability in [0, 1], got {p}")


@dataclass
class AugmentConfig:
    """Training augmentation. Every ``*_p`` is the per-sample probability of that op; 0 leaves it out."""

    enabled: bool = True  # false: train batches are only normalized, like val batches
    # Geometric ops (image and mask move together).
    hflip_p: float = 0.5  # scans have no preferred left/right
    vflip_p: float = 0.5  # nor up/down
    rot90_p: float = 0.5  # when applied, k*90 deg with k uniform in {0,1,2,3}: the full square symmetry group
    affine_p: float = 0.3  # small affine jitter; padded corners become 255 in the mask
    affine_degrees: float = 15.0  # rotation drawn from [-deg, +deg]
    affine_translate: float = 0.05  # shift up to this fraction of width/height, each axis
    affine_scale: list[float] = field(default_factory=lambda: [0.9, 1.1])  # isotropic zoom range
    affine_shear: float = 5.0  # x and y shear drawn from [-deg, +deg]
    # Photometric ops (image only), on the [0, 1] image, in this order.
    brightness_p: float = 0.3  # additive shift of (factor - 1), kornia's RandomBrightness
    brightness: list[float] = field(default_factory=lambda: [0.9, 1.1])  # factor range: +-0.1 shift
    contrast_p: float = 0.3  # multiplies the image by the factor
    contrast: list[float] = field(default_factory=lambda: [0.8, 1.2])  # factor range
    gamma_p: float = 0.3  # image ** gamma
    gamma: list[float] = field(default_factory=lambda: [0.8, 1.25])  # roughly symmetric in log space
    blur_p: float = 0.1  # slight defocus
    blur_kernel: int = 5  # odd kernel size in pixels
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 1.0])  # sigma range in pixels
    noise_p: float = 0.2  # additive sensor noise, applied last and not clamped
    noise_std: float = 0.02  # std on the [0, 1] intensity scale (~5 grey levels)

    def __post_init__(self) -> None:
        for name in ("hflip_p", "vflip_p", "rot90_p", "affine_p", "brightness_p", "contrast_p", "gamma_p",
                     "blur_p", "noise_p"):
            _check_p(name, getattr(self, name))
        if not 0.0 <= self.affine_degrees <= 180.0:
            raise ValueError(f"augment config: affine_degrees must be in [0, 180], got {self.affine_degrees}")
        if not 0.0 <= self.affine_translate < 1.0:
            raise ValueError(f"augment config: affine_translate must be in [0, 1), got "
                             f"{self.affine_translate}")
        if not 0.0 <= self.affine_shear < 90.0:
            raise ValueError(f"augment config: affine_shear must be in [0, 90), got {self.affine_shear}")
        _check_range("affine_scale", self.affine_scale, 1e-3)
        _check_range("brightness", self.brightness, 0.0, 2.0)
        _check_range("contrast", self.contrast, 0.0)
        _check_range("gamma", self.gamma, 1e-3)
        _check_range("blur_sigma", self.blur_sigma, 1e-3)
        if self.blur_kernel < 3 or self.blur_kernel % 2 == 0:
            raise ValueError(f"augment config: blur_kernel must be odd and >= 3, got {self.blur_kernel}")
        if self.noise_std < 0:
            raise ValueError(f"augment config: noise_std must be >= 0, got {self.noise_std}")


@dataclass
class NormalizeConfig:
    """Input normalization ``(x / 255 - mean) / std``; used by training, validation and prediction alike.

    One value applies to every channel; otherwise give one value per image channel.
    """

    mean: list[float] = field(default_factory=lambda: [0.5])  # centre [0, 1] intensities on 0
    std: list[float] = field(default_factory=lambda: [0.5])  # ... and scale them to [-1, 1]

    def __post_init__(self) -> None:
        if not self.mean or len(self.mean) != len(self.std):
            raise ValueError(f"normalize config: mean and std need the same non-zero length, got "
                             f"{self.mean} and {self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"normalize config: std values must be > 0, got {self.std}")


@dataclass
class AugmentParams:
    """One batch's random draws, per sample, all on the batch's device. A gate that is off leaves its
    sample's parameter at the identity (k = 0, shift 0, factor 1), so no op needs to select samples."""

    hflip: torch.Tensor  # (B,) bool
    vflip: torch.Tensor  # (B,) bool
    rot90: torch.Tensor  # (B,) long: quarter turns, as torch.rot90's k; 0 where the gate is off
    affine: torch.Tensor  # (B,) bool
    angle: torch.Tensor  # (B,) degrees, positive clockwise (kornia's RandomAffine)
    translate: torch.Tensor  # (B, 2) pixels, x and y
    scale: torch.Tensor  # (B,) isotropic zoom
    shear: torch.Tensor  # (B, 2) degrees, x and y
    brightness: torch.Tensor  # (B,) additive shift (factor - 1); 0 where off
    contrast: torch.Tensor  # (B,) factor; 1 where off
    gamma: torch.Tensor  # (B,) exponent; 1 where off
    blur: torch.Tensor  # (B,) bool
    sigma: torch.Tensor  # (B,) blur sigma in pixels
    noise: torch.Tensor  # (B,) bool


def draw_params(cfg: AugmentConfig, batch: int, height: int, width: int, device: torch.device) -> AugmentParams:
    """Every per-sample draw of one batch from one ``torch.rand`` call on ``device`` (no host round trip).

    The distributions are those of the kornia modules this replaced (``bench/augment_bench.py``'s
    ``kornia_chain``): each op is applied to a sample with its own probability; parameters are uniform in
    their ranges; a quarter turn, when applied, is k * 90 deg with k uniform in {0, 1, 2, 3}.
    """
    u = torch.rand(batch, 20, device=device).unbind(1)  # 0-8: the op gates, 9-19: the parameters

    def between(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * x

    def gate(x: torch.Tensor, p: float) -> torch.Tensor:
        return x < p

    t, s = cfg.affine_translate, cfg.affine_shear
    k = torch.clamp((u[9] * 4).long(), max=3)
    on = [gate(u[i], p) for i, p in enumerate((cfg.hflip_p, cfg.vflip_p, cfg.rot90_p, cfg.affine_p,
                                                cfg.brightness_p, cfg.contrast_p, cfg.gamma_p, cfg.blur_p,
                                                cfg.noise_p))]  # fmt: skip
    brightness = between(u[16], *cfg.brightness) - 1
    return AugmentParams(
        hflip=on[0], vflip=on[1], rot90=torch.where(on[2], k, 0), affine=on[3],
        angle=between(u[10], -cfg.affine_degrees, cfg.affine_degrees),
        translate=torch.stack([between(u[11], -t, t) * width, between(u[12], -t, t) * height], dim=1),
        scale=between(u[13], *cfg.affine_scale),
        shear=torch.stack([between(u[14], -s, s), between(u[15], -s, s)], dim=1),
        brightness=torch.where(on[4], brightness, 0.0),
        contrast=torch.where(on[5], between(u[17], *cfg.contrast), 1.0),
        gamma=torch.where(on[6], between(u[18], *cfg.gamma), 1.0),
        blur=on[7], sigma=between(u[19], *cfg.blur_sigma), noise=on[8] & (cfg.noise_std > 0),
    )  # fmt: skip


def sampling_matrix(p: AugmentParams, height: int, width: int) -> torch.Tensor:
    """(B, 3, 3) dst -> src of the whole geometric chain (hflip, vflip, rot90, affine, in that order),
    folded so that image and mask are each resampled once."""
    device = p.hflip.device
    eye = warp.identity(len(p.hflip), device)

    def gated(on: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.where(on.view(-1, 1, 1), m, eye)

    affine = warp.invert_affine(warp.affine_forward(p.angle, p.translate, p.scale, p.shear, height, width))
    m = gated(p.hflip, warp.hflip(height, width, device))
    m = m @ gated(p.vflip, warp.vflip(height, width, device))
    m = m @ warp.rot90_table(height, width, device)[p.rot90]
    return m @ gated(p.affine, affine)


def gaussian_blur(x: torch.Tensor, kernel: int, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample Gaussian blur of ``(B, C, H, W)`` with ``sigma`` (B,), as ``kornia.filters.gaussian_blur2d``
    (reflect border, separable), as one grouped convolution per axis and without kornia's sigma check,
    which reads a device tensor on the host."""
    b, c, h, w = x.shape
    r = kernel // 2
    taps = torch.arange(kernel, device=x.device, dtype=x.dtype) - r
    k1 = torch.exp(-(taps**2) / (2 * sigma.to(x.dtype).view(-1, 1) ** 2))
    k1 = (k1 / k1.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, kernel)
    y = F.pad(x.reshape(1, b * c, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k1.view(b * c, 1, 1, kernel), groups=b * c)
    y = F.conv2d(y, k1.view(b * c, 1, kernel, 1), groups=b * c)
    return y.view(b, c, h, w)


class GpuAugment(nn.Module):
    """Batch augmentation + normalization on the batch's device.

    Train mode: augment (if enabled) then normalize. Eval mode (``.eval()``): normalize only. Random draws
    use torch's generator of the batch's device, so ``torch.manual_seed`` makes a run repeatable.

    The geometric ops are one warp per tensor (``sampling_matrix``: bilinear for the image, nearest for the
    mask, whose outside is ignore (255)); the photometric ops are batched tensor ops with per-sample
    factors. Nothing waits on the device: no sample selection, no host reads.
    """

    def __init__(self, aug: AugmentConfig, norm: NormalizeConfig) -> None:
        super().__init__()
        self.cfg = aug
        self.geometric = aug.enabled and max(aug.hflip_p, aug.vflip_p, aug.rot90_p, aug.affine_p) > 0
        self.photometric = aug.enabled and max(aug.brightness_p, aug.contrast_p, aug.gamma_p, aug.blur_p,
                                               aug.noise_p * (aug.noise_std > 0)) > 0  # fmt: skip
        self.register_buffer("mean", torch.tensor(norm.mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(norm.std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        # normalize() of uint8 as one multiply-add: x * scale + shift = (x / 255 - mean) / std.
        self.register_buffer("scale", 1.0 / (255.0 * self.std), persistent=False)
        self.register_buffer("shift", -self.mean / self.std, persistent=False)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, C, H, W)`` (or float already in [0, 1]) -> normalized float32."""
        image = self._check_image(image)
        if image.dtype == torch.uint8:  # (x / 255 - mean) / std as one multiply-add: 2 passes instead of 4
            return torch.addcmul(self.shift, image.to(torch.float32), self.scale)
        return self._normalize_unit(to_unit_float(image))

    def _check_image(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim != 4:
            raise ValueError(f"augment: image must be (B, C, H, W), got shape {tuple(image.shape)}")
        n = self.mean.shape[1]
        if n != 1 and n != image.shape[1]:
            raise ValueError(f"augment: normalize has {n} mean/std values but the image has "
                             f"{image.shape[1]} channels")
        return image

    def _normalize_unit(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normalized float32 image ``(B, C, H, W)``, long mask ``(B, H, W)``)."""
        mask = _mask_to_b1hw(mask, self._check_image(image))[:, 0]
        if not self.training or not (self.geometric or self.photometric):
            return self.normalize(image), mask.long()
        b, _, h, w = image.shape
        p = draw_params(self.cfg, b, h, w, image.device)
        x = to_unit_float(image)
        if self.geometric:
            m = sampling_matrix(p, h, w)
            # Without the affine every sample's map is a pixel permutation: copying pixels is exact and cheaper.
            x = warp.warp_bilinear(x, m) if self.cfg.affine_p > 0 else warp.warp_nearest(x, m, 0.0)
            mask = warp.warp_nearest(mask, m, IGNORE_INDEX)
        if self.photometric:
            x = self._photometric(x, p)
        return self._normalize_unit(x), mask.long()

    def _photometric(self, x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        """kornia's brightness, contrast and gamma (``kornia.enhance``, clamped to [0, 1] as kornia's random
        ops do), then the blur and the unclamped noise, with per-sample factors."""
        cfg = self.cfg
        if cfg.brightness_p > 0:
            x = KE.adjust_brightness(x, p.brightness, clip_output=True)
        if cfg.contrast_p > 0:
            x = KE.adjust_contrast(x, p.contrast, clip_output=True)
        if cfg.gamma_p > 0:
            x = KE.adjust_gamma(x, p.gamma)
        if cfg.blur_p > 0:
            x = torch.where(p.blur.view(-1, 1, 1, 1), gaussian_blur(x, cfg.blur_kernel, p.sigma), x)
        if cfg.noise_p > 0 and cfg.noise_std > 0:
            # Last, because gamma and the clamping ops before it would distort or clip the noise.
            x = x + torch.randn_like(x) * (p.noise * cfg.noise_std).view(-1, 1, 1, 1)
        return x


def to_unit_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; a floating image is taken to be in [0, 1] already."""
    if image.dtype == torch.uint8:
        return image.to(torch.float32) / 255.0
    if image.is_floating_point():
        return image.to(torch.float32)
    raise ValueError(f"augment: image must be uint8 or float, got {image.dtype}")


def _mask_to_b1hw(mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    if mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"augment: mask must be (B, H, W) or (B, 1, H, W), got shape {tuple(mask.shape)}")
    if mask.shape[0] != image.shape[0] or mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"augment: mask shape {tuple(mask.shape)} does not match image {tuple(image.shape)}")
    if mask.is_floating_point() or mask.dtype == torch.bool:
        raise ValueError(f"augment: mask must hold integer class ids, got {mask.dtype}")
    if mask.dtype != torch.uint8 and bool(((mask < 0) | (mask > IGNORE_INDEX)).any()):
        raise ValueError(f"augment: mask values must be class ids 0..254 or {IGNORE_INDEX} (ignore)")
    return mask
