"""GPU-side training augmentation and input normalization, built once on kornia's AugmentationSequential.

``GpuAugment`` takes a batch already on the device -- image ``(B, C, H, W)`` uint8 and mask ``(B, H, W)`` or
``(B, 1, H, W)`` with class ids and 255 (ignore) -- and returns a normalized float image and a long
``(B, H, W)`` mask. In train mode it runs the geometric ops (image and mask together, masks with nearest
resampling), then the photometric ops (image only), then normalization. In eval mode (``.eval()``) or with
``enabled: false`` it only normalizes, so the val/test/predict inputs match the training inputs exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import kornia.augmentation as K
import torch
from torch import nn

from shardgen.classes import IGNORE_INDEX  # the one ignore value, also in the class map and the shards


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


def build_augmentation(cfg: AugmentConfig) -> K.AugmentationSequential | None:
    """The one AugmentationSequential for training: geometric ops first, then photometric ones.

    Returns None when augmentation is disabled or every op has p = 0.
    """
    if not cfg.enabled:
        return None
    ops: list[nn.Module] = []
    if cfg.hflip_p > 0:
        ops.append(K.RandomHorizontalFlip(p=cfg.hflip_p))
    if cfg.vflip_p > 0:
        ops.append(K.RandomVerticalFlip(p=cfg.vflip_p))
    if cfg.rot90_p > 0:
        # times is drawn uniformly and rounded: [-1.5, 2.5) gives k in {-1, 0, 1, 2} with equal odds, and
        # -1 is the same as 3 (kornia bounds times to (-3, 3)). Nearest keeps the square-tile rotation a
        # lossless pixel permutation for the image as well as for the mask.
        ops.append(K.RandomRotation90(times=(-1.5, 2.5), resample="nearest", p=cfg.rot90_p))
    if cfg.affine_p > 0:
        t, s = cfg.affine_translate, cfg.affine_shear
        ops.append(K.RandomAffine(degrees=cfg.affine_degrees, translate=(t, t), scale=tuple(cfg.affine_scale),
                                  shear=(-s, s, -s, s), p=cfg.affine_p))
    if cfg.brightness_p > 0:
        ops.append(K.RandomBrightness(brightness=tuple(cfg.brightness), p=cfg.brightness_p))
    if cfg.contrast_p > 0:
        ops.append(K.RandomContrast(contrast=tuple(cfg.contrast), p=cfg.contrast_p))
    if cfg.gamma_p > 0:
        ops.append(K.RandomGamma(gamma=tuple(cfg.gamma), p=cfg.gamma_p))
    if cfg.blur_p > 0:
        k = cfg.blur_kernel
        ops.append(K.RandomGaussianBlur(kernel_size=(k, k), sigma=tuple(cfg.blur_sigma), p=cfg.blur_p))
    if cfg.noise_p > 0 and cfg.noise_std > 0:
        # Last, because gamma and the clamping ops before it would distort or clip the noise.
        ops.append(K.RandomGaussianNoise(mean=0.0, std=cfg.noise_std, p=cfg.noise_p))
    if not ops:
        return None
    # The default extra_args resample masks with nearest neighbour; passing our own would replace that.
    return K.AugmentationSequential(*ops, data_keys=["input", "mask"])


class GpuAugment(nn.Module):
    """Batch augmentation + normalization on the batch's device.

    Train mode: augment (if enabled) then normalize. Eval mode (``.eval()``): normalize only.
    Call ``.to(device)`` once so kornia draws its random parameters (and the noise) on that device.
    """

    def __init__(self, aug: AugmentConfig, norm: NormalizeConfig) -> None:
        super().__init__()
        self.aug = build_augmentation(aug)
        self.register_buffer("mean", torch.tensor(norm.mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(norm.std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, C, H, W)`` (or float already in [0, 1]) -> normalized float32."""
        return self._normalize_unit(to_unit_float(self._check_image(image)))

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
        mask = _mask_to_b1hw(mask, self._check_image(image))
        if not self.training or self.aug is None:
            return self.normalize(image), mask[:, 0].long()
        x = to_unit_float(image)
        # Geometric ops pad the mask with 0, which is a real label (background). Shifting labels by +1
        # makes 0 mean "outside the source tile", so padding can be mapped to 255 (ignore) afterwards.
        # This is exact: nearest resampling copies values, and 1..256 are exact in float32. (A fill_value
        # in extra_args would not reach RandomRotation90, which always pads with zeros.)
        shifted = mask.to(torch.float32) + 1.0
        x, shifted = self.aug(x, shifted)
        labels = shifted.round().long()[:, 0]
        labels = torch.where(labels == 0, IGNORE_INDEX, labels - 1)
        return self._normalize_unit(x), labels


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
