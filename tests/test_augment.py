"""GPU augmentation: image and mask move together, masks keep exact labels, padding is ignore (255)."""

import pytest
import torch
import torch.nn.functional as F

from trainer.augment import AugmentConfig, GpuAugment, NormalizeConfig

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PHOTOMETRIC_OFF = dict(brightness_p=0.0, contrast_p=0.0, gamma_p=0.0, blur_p=0.0, noise_p=0.0)
GEOMETRIC_OFF = dict(hflip_p=0.0, vflip_p=0.0, rot90_p=0.0, affine_p=0.0)
IDENTITY_NORM = NormalizeConfig(mean=[0.0], std=[1.0])  # output image stays in [0, 1]


def label_blocks(batch: int, size: int = 64, block: int = 12) -> torch.Tensor:
    """(B, H, W) uint8 mask of 12x12 blocks holding labels 0..10, a different layout per sample."""
    yy, xx = torch.meshgrid(torch.arange(size) // block, torch.arange(size) // block, indexing="ij")
    return torch.stack([((yy * 3 + xx * 5 + b) % 11) for b in range(batch)]).to(torch.uint8)


def encode(mask: torch.Tensor, channels: int) -> torch.Tensor:
    """Image whose intensity encodes the label: channel c = 20 * label + 10 + 3 * c."""
    return torch.stack([mask * 20 + 10 + 3 * c for c in range(channels)], dim=1).to(torch.uint8)


def interior(mask: torch.Tensor, r: int) -> torch.Tensor:
    """Pixels whose (2r+1)^2 neighbourhood holds one label other than 255, at least r px from the border."""
    m = mask[:, None].float()
    hi = F.max_pool2d(m, 2 * r + 1, stride=1, padding=r)
    lo = -F.max_pool2d(-m, 2 * r + 1, stride=1, padding=r)
    keep = (hi == lo)[:, 0] & (mask != 255)
    if r:
        keep[:, :r] = keep[:, -r:] = False
        keep[:, :, :r] = keep[:, :, -r:] = False
    return keep


def flips_and_rot90(p: float) -> AugmentConfig:
    return AugmentConfig(**GEOMETRIC_OFF | dict(hflip_p=p, vflip_p=p, rot90_p=p), **PHOTOMETRIC_OFF)


def all_geometric(p: float) -> AugmentConfig:
    return AugmentConfig(hflip_p=p, vflip_p=p, rot90_p=p, affine_p=p, affine_degrees=30.0,
                         affine_translate=0.1, affine_scale=[0.85, 1.15], affine_shear=8.0, **PHOTOMETRIC_OFF)


# (config, erosion radius): flips and 90-degree turns are pixel permutations, so every pixel must match (r=0)
# and even a one-pixel slip fails; the affine warp blends the image bilinearly at label edges, so pixels next
# to an edge (r=1) are not compared there. p=0.5 checks that each sample's gate is shared by image and mask.
ALIGNMENT_CASES = {
    "flips_rot90_p0.5": (lambda: flips_and_rot90(0.5), 0),
    "all_geometric_p1": (lambda: all_geometric(1.0), 1),
    "all_geometric_p0.5": (lambda: all_geometric(0.5), 1),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("case", ALIGNMENT_CASES)
def test_image_and_mask_move_together(case, channels, device):
    make_cfg, r = ALIGNMENT_CASES[case]
    torch.manual_seed(0)
    aug = GpuAugment(make_cfg(), IDENTITY_NORM).to(device)
    mask = label_blocks(16).to(device)
    image, out = aug(encode(mask, channels), mask)
    keep = interior(out, r)
    assert keep.sum() > 0.4 * out.numel()  # plenty of pixels are compared
    moved = (out != mask.long()).flatten(1).any(1)
    assert moved.any()  # the augmentation did move things
    for c in range(channels):
        recovered = torch.round((image[:, c] * 255 - 10 - 3 * c) / 20).long()
        assert torch.equal(recovered[keep], out[keep]), f"channel {c} out of step with the mask"


def test_rot90_is_lossless_and_uses_all_four_turns():
    torch.manual_seed(0)
    cfg = AugmentConfig(**GEOMETRIC_OFF | dict(rot90_p=1.0), **PHOTOMETRIC_OFF)
    aug = GpuAugment(cfg, IDENTITY_NORM)
    mask = torch.randint(0, 11, (1, 64, 64), dtype=torch.uint8).expand(64, -1, -1).contiguous()
    image = torch.randint(0, 256, (64, 1, 64, 64), dtype=torch.uint8)
    image[:] = image[0]
    x, y = aug(image, mask)
    seen = set()
    for b in range(64):
        k = next(k for k in range(4) if torch.equal(y[b], torch.rot90(mask[0].long(), k, dims=(0, 1))))
        assert torch.equal(torch.round(x[b] * 255).to(torch.uint8), torch.rot90(image[0], k, dims=(1, 2)))
        seen.add(k)
    assert seen == {0, 1, 2, 3}


@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.long])
@pytest.mark.parametrize("with_channel", [False, True])
def test_masks_stay_exact_integers(mask_dtype, with_channel):
    torch.manual_seed(1)
    mask = label_blocks(4)
    mask[:, 20:30, 20:30] = 255  # an ignore region in the input
    labels_in = set(mask.unique().tolist())
    mask = mask.to(mask_dtype)
    cfg = all_geometric(1.0)
    cfg.brightness_p = cfg.noise_p = cfg.blur_p = 1.0
    mask = mask[:, None] if with_channel else mask
    x, y = GpuAugment(cfg, NormalizeConfig())(encode(label_blocks(4), 3), mask)
    assert y.dtype == torch.long and y.shape == (4, 64, 64)
    assert x.dtype == torch.float32 and x.shape == (4, 3, 64, 64)
    assert set(y.unique().tolist()) <= labels_in | {255}


def test_padded_area_is_ignore_not_background():
    torch.manual_seed(2)
    cfg = AugmentConfig(**GEOMETRIC_OFF | dict(affine_p=1.0), **PHOTOMETRIC_OFF, affine_degrees=45.0,
                        affine_translate=0.2)
    mask = torch.zeros(8, 64, 64, dtype=torch.uint8)  # all background: any 255 out must be padding
    image = torch.full((8, 1, 64, 64), 200, dtype=torch.uint8)
    x, y = GpuAugment(cfg, IDENTITY_NORM)(image, mask)
    assert set(y.unique().tolist()) == {0, 255}
    assert ((y == 255).flatten(1).any(1)).all()  # every sample lost some corner to padding
    # Where the mask says "outside the source tile", the image is (mostly) the zero padding too: nearest
    # picks padding only when the point is > 0.5 px outside, where bilinear gives <= half the intensity.
    assert (x[:, 0][y == 255] * 255 <= 100 + 1e-3).all()


def test_photometric_ops_change_image_not_mask():
    torch.manual_seed(3)
    photometric_on = dict(brightness_p=1.0, contrast_p=1.0, gamma_p=1.0, blur_p=1.0, noise_p=1.0)
    cfg = AugmentConfig(**GEOMETRIC_OFF, **photometric_on)
    aug = GpuAugment(cfg, NormalizeConfig())
    mask = label_blocks(4)
    mask[:, :5] = 255
    image = encode(label_blocks(4), 3)
    x, y = aug(image, mask)
    assert torch.equal(y, mask.long())
    assert (x - aug.normalize(image)).abs().mean() > 0.01


def test_same_seed_same_result():
    aug = GpuAugment(AugmentConfig(hflip_p=0.5, vflip_p=0.5, rot90_p=0.5, affine_p=0.5, brightness_p=0.5,
                                   contrast_p=0.5, gamma_p=0.5, blur_p=0.5, noise_p=0.5), NormalizeConfig())
    mask = label_blocks(8)
    image = encode(mask, 3)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(aug(image, mask))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])


def test_eval_mode_and_disabled_only_normalize():
    mask = label_blocks(2)
    image = encode(mask, 3)
    norm = NormalizeConfig(mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    expected = (image.float() / 255 - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / torch.tensor(
        [0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    for aug in (GpuAugment(all_geometric(1.0), norm).eval(), GpuAugment(AugmentConfig(enabled=False), norm)):
        x, y = aug(image, mask)
        assert torch.allclose(x, expected, atol=1e-6)
        assert torch.equal(y, mask.long())
    assert torch.allclose(GpuAugment(all_geometric(1.0), norm).normalize(image), expected, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    aug = GpuAugment(AugmentConfig(), NormalizeConfig(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]))
    image = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="integer class ids"):
        aug(image, torch.zeros(2, 16, 16))
    with pytest.raises(ValueError, match="0..254 or 255"):
        aug(image, torch.full((2, 16, 16), 300))
    with pytest.raises(ValueError, match="does not match"):
        aug(image, torch.zeros(2, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="3 mean/std values but the image has 1"):
        aug(torch.zeros(2, 1, 16, 16, dtype=torch.uint8), torch.zeros(2, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="hflip_p"):
        AugmentConfig(hflip_p=1.5)
    with pytest.raises(ValueError, match="blur_kernel"):
        AugmentConfig(blur_kernel=4)
    with pytest.raises(ValueError, match="affine_scale"):
        AugmentConfig(affine_scale=[1.2, 0.8])
    with pytest.raises(ValueError, match="same non-zero length"):
        NormalizeConfig(mean=[0.5, 0.5], std=[0.5])
