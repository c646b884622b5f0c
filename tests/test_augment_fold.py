"""The folded augmentation: one warp per tensor, exact permutations, kornia's distributions and conventions."""

import math

import kornia
import pytest
import torch

from trainer import warp
from trainer.augment import AugmentConfig, GpuAugment, NormalizeConfig, draw_params, gaussian_blur

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PHOTOMETRIC_OFF = dict(brightness_p=0.0, contrast_p=0.0, gamma_p=0.0, blur_p=0.0, noise_p=0.0)
GEOMETRIC_OFF = dict(hflip_p=0.0, vflip_p=0.0, rot90_p=0.0, affine_p=0.0)
IDENTITY_NORM = NormalizeConfig(mean=[0.0], std=[1.0])


def expected_permutation(t: torch.Tensor, hflip: bool, vflip: bool, k: int) -> torch.Tensor:
    """hflip, then vflip, then k quarter turns, on the last two dims, with torch's exact ops."""
    t = t.flip(-1) if hflip else t
    t = t.flip(-2) if vflip else t
    return torch.rot90(t, k, dims=(-2, -1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [50, 64])  # 50: coordinates that are not powers of two
@pytest.mark.parametrize("p", [0.5, 1.0])
def test_flips_and_rot90_equal_torch_exactly(device, size, p):
    cfg = AugmentConfig(**GEOMETRIC_OFF | dict(hflip_p=p, vflip_p=p, rot90_p=p), **PHOTOMETRIC_OFF)
    aug = GpuAugment(cfg, IDENTITY_NORM).to(device)
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (32, 3, size, size), dtype=torch.uint8, generator=gen).to(device)
    mask = torch.randint(0, 11, (32, size, size), dtype=torch.uint8, generator=gen).to(device)
    torch.manual_seed(5)
    drawn = draw_params(cfg, 32, size, size, torch.device(device))
    torch.manual_seed(5)  # the forward pass draws the same parameters
    x, y = aug(image, mask)
    turns = set()
    for b in range(32):
        h, v, k = bool(drawn.hflip[b]), bool(drawn.vflip[b]), int(drawn.rot90[b])
        turns.add(k)
        assert torch.equal(x[b], expected_permutation(image[b].float() / 255, h, v, k)), f"image of sample {b}"
        assert torch.equal(y[b], expected_permutation(mask[b].long(), h, v, k)), f"mask of sample {b}"
    assert turns == {0, 1, 2, 3}


def test_nearest_warp_copies_the_source_label_exactly():
    torch.manual_seed(0)
    mask = torch.randint(0, 255, (4, 40, 40), dtype=torch.uint8)
    angle, scale = torch.tensor([10.0, -33.0, 90.0, 7.0]), torch.tensor([0.8, 1.0, 1.3, 1.1])
    translate, shear = torch.randn(4, 2) * 5, torch.randn(4, 2) * 4
    m = warp.invert_affine(warp.affine_forward(angle, translate, scale, shear, 40, 40))
    out = warp.warp_nearest(mask, m, 255)
    for b in range(4):
        for yy in range(0, 40, 3):
            for xx in range(0, 40, 3):
                u, v, _ = (m[b].double() @ torch.tensor([xx, yy, 1.0], dtype=torch.float64)).tolist()
                if min(abs(u % 1 - 0.5), abs(v % 1 - 0.5)) < 1e-3:
                    continue  # a tie that float32 may round either way
                i, j = round(v), round(u)
                want = int(mask[b, i, j]) if 0 <= i < 40 and 0 <= j < 40 else 255
                assert int(out[b, yy, xx]) == want


@pytest.mark.parametrize("device", DEVICES)
def test_image_and_mask_sample_the_same_point(device):
    """A float image holding its own pixel coordinates: after the warp it says which source point each
    output pixel sampled (bilinear interpolation of a linear ramp is exact), and the mask must hold the
    label found at that point, rounded."""
    cfg = AugmentConfig(hflip_p=0.5, vflip_p=0.5, rot90_p=0.5, affine_p=1.0, affine_degrees=40.0,
                        affine_translate=0.1, affine_scale=[0.7, 1.3], affine_shear=10.0, **PHOTOMETRIC_OFF)
    size = 48
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    image = torch.stack([xs / (size - 1), ys / (size - 1), torch.ones(size, size)]).expand(16, 3, -1, -1)
    labels = ((ys // 5) * 7 + xs // 5) % 250
    torch.manual_seed(3)
    x, y = GpuAugment(cfg, IDENTITY_NORM).to(device)(image.to(device), labels.expand(16, -1, -1).to(device))
    x, y = x.cpu(), y.cpu()
    inside = (x[:, 2] > 1 - 1e-5) & (y != 255)  # all four neighbours inside the source
    u, v = x[:, 0] * (size - 1), x[:, 1] * (size - 1)
    clear = ((u % 1 - 0.5).abs() > 1e-2) & ((v % 1 - 0.5).abs() > 1e-2)
    keep = inside & clear
    assert keep.sum() > 0.5 * keep.numel()
    want = labels[v.round().long().clamp(0, size - 1), u.round().long().clamp(0, size - 1)]
    assert torch.equal(y[keep], want[keep])
    assert (y == 255).any() and (y != labels).any()  # the warp moved things and padded some corners


def test_parameters_follow_the_config():
    cfg = AugmentConfig(hflip_p=0.5, vflip_p=0.2, rot90_p=0.7, affine_p=0.3, affine_degrees=20.0,
                        affine_translate=0.1, affine_scale=[0.8, 1.2], affine_shear=6.0, brightness_p=0.4,
                        brightness=[0.9, 1.1], contrast_p=0.6, contrast=[0.7, 1.3], gamma_p=0.25,
                        gamma=[0.8, 1.25], blur_p=0.1, blur_sigma=[0.2, 1.5], noise_p=0.35)  # fmt: skip
    n, h, w = 40000, 64, 80
    torch.manual_seed(0)
    p = draw_params(cfg, n, h, w, torch.device("cpu"))

    def rate_ok(on: torch.Tensor, prob: float) -> None:
        sd = math.sqrt(prob * (1 - prob) / len(on))
        assert abs(on.float().mean().item() - prob) < 5 * sd, (on.float().mean().item(), prob)

    def uniform_ok(x: torch.Tensor, low: float, high: float) -> None:  # Kolmogorov-Smirnov, far beyond 1e-6
        assert low <= x.min().item() and x.max().item() <= high
        s = torch.sort(x.double()).values
        cdf = (s - low) / (high - low)
        k = torch.arange(1, len(s) + 1, dtype=torch.float64) / len(s)
        assert torch.max((cdf - k).abs()).item() < 2.7 / math.sqrt(len(s))

    for on, prob in ((p.hflip, 0.5), (p.vflip, 0.2), (p.affine, 0.3), (p.blur, 0.1), (p.noise, 0.35),
                     (p.rot90 != 0, 0.7 * 0.75), (p.brightness != 0, 0.4), (p.contrast != 1, 0.6),
                     (p.gamma != 1, 0.25)):  # fmt: skip
        rate_ok(on, prob)
    turned = p.rot90[p.rot90 != 0]
    for k in (1, 2, 3):
        rate_ok(turned == k, 1 / 3)
    uniform_ok(p.angle, -20.0, 20.0)
    uniform_ok(p.translate[:, 0], -0.1 * w, 0.1 * w)
    uniform_ok(p.translate[:, 1], -0.1 * h, 0.1 * h)
    uniform_ok(p.scale, 0.8, 1.2)
    uniform_ok(p.shear[:, 0], -6.0, 6.0)
    uniform_ok(p.shear[:, 1], -6.0, 6.0)
    uniform_ok(p.brightness[p.brightness != 0], -0.1, 0.1)
    uniform_ok(p.contrast[p.contrast != 1], 0.7, 1.3)
    uniform_ok(p.gamma[p.gamma != 1], 0.8, 1.25)
    uniform_ok(p.sigma, 0.2, 1.5)
    # Independent draws: no gate or parameter is correlated with another (each has its own random number).
    drawn = torch.stack([p.hflip.float(), p.vflip.float(), p.rot90.float(), p.affine.float(), p.blur.float(),
                         p.noise.float(), p.angle, p.translate[:, 0], p.translate[:, 1], p.scale, p.shear[:, 0],
                         p.shear[:, 1], p.brightness, p.contrast, p.gamma, p.sigma])  # fmt: skip
    off_diagonal = torch.corrcoef(drawn) - torch.eye(len(drawn))
    assert off_diagonal.abs().max().item() < 0.03  # 6 standard errors at n = 40000


def test_affine_matrix_is_kornias():
    torch.manual_seed(1)
    b, h, w = 64, 50, 70
    angle, scale = (torch.rand(b) - 0.5) * 60, 0.7 + 0.6 * torch.rand(b)
    translate, shear = torch.randn(b, 2) * 6, (torch.rand(b, 2) - 0.5) * 20
    ours = warp.affine_forward(angle, translate, scale, shear, h, w)
    center = torch.tensor([[w / 2 - 0.5, h / 2 - 0.5]]).expand(b, 2)  # RandomAffine's centre
    theirs = kornia.geometry.transform.get_affine_matrix2d(
        translate, center, scale[:, None].expand(b, 2), angle, torch.deg2rad(shear[:, 0]), torch.deg2rad(shear[:, 1])
    )
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert torch.allclose(warp.invert_affine(ours) @ ours, torch.eye(3).expand(b, 3, 3), atol=1e-5)


def test_blur_is_kornias():
    torch.manual_seed(2)
    x, sigma = torch.rand(4, 3, 20, 24), torch.tensor([0.3, 0.7, 1.0, 2.0])
    theirs = kornia.filters.gaussian_blur2d(x, (5, 5), sigma[:, None].expand(4, 2), border_type="reflect")
    assert torch.allclose(gaussian_blur(x, 5, sigma), theirs, atol=1e-6)


def test_photometric_ops_are_kornias():
    """With every photometric gate on and the noise off, the output equals kornia's ops applied in order
    with the drawn factors."""
    cfg = AugmentConfig(**GEOMETRIC_OFF, brightness_p=1.0, contrast_p=1.0, gamma_p=1.0, blur_p=1.0, noise_p=0.0)
    image = torch.randint(0, 256, (6, 1, 32, 32), dtype=torch.uint8)
    torch.manual_seed(4)
    p = draw_params(cfg, 6, 32, 32, torch.device("cpu"))
    torch.manual_seed(4)
    x, _ = GpuAugment(cfg, IDENTITY_NORM)(image, torch.zeros(6, 32, 32, dtype=torch.uint8))
    want = image.float() / 255
    want = (want + p.brightness.view(-1, 1, 1, 1)).clamp(0, 1)
    want = (want * p.contrast.view(-1, 1, 1, 1)).clamp(0, 1)
    want = want.pow(p.gamma.view(-1, 1, 1, 1)).clamp(0, 1)
    want = kornia.filters.gaussian_blur2d(want, (5, 5), p.sigma[:, None].expand(6, 2), border_type="reflect")
    assert torch.allclose(x, want, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist on CUDA only")
def test_training_forward_never_waits_for_the_gpu():
    aug = GpuAugment(AugmentConfig(), NormalizeConfig()).to("cuda")
    image = torch.randint(0, 256, (4, 1, 64, 64), dtype=torch.uint8, device="cuda")
    mask = torch.randint(0, 11, (4, 64, 64), dtype=torch.uint8, device="cuda")
    aug(image, mask)  # the first call makes the cached constants (one host copy each)
    torch.cuda.set_sync_debug_mode("error")
    try:
        aug(image, mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
