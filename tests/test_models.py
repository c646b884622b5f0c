"""Segmentation models: 400x400 shapes, gradients, parameter counts, the registry, backbone weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from trainer.models import MODELS, ResNetUNet, U2Net, U2NetP, UNet, build_model

ARCHS = sorted(MODELS)
TILE = 400  # the shard tile size; not a multiple of 32
N_CLASSES = 11  # background + the 10 defect classes


@pytest.fixture(autouse=True, scope="module")
def _few_threads():
    # The CI box has 2 shared cores; oversubscribing them makes the 400x400 backward passes crawl.
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", ARCHS)
def test_forward_backward_at_tile_size(name, in_channels):
    torch.manual_seed(0)
    model = build_model(name, in_channels, N_CLASSES)
    x = torch.randn(1, in_channels, TILE, TILE)
    target = torch.randint(0, N_CLASSES, (1, TILE, TILE))

    model.train()
    out = model(x)
    if model.deep_supervision:
        assert isinstance(out, tuple) and len(out) == 7  # fused + 6 side outputs
        outputs = list(out)
    else:
        assert isinstance(out, torch.Tensor)
        outputs = [out]
    for o in outputs:
        assert o.shape == (1, N_CLASSES, TILE, TILE)
    sum(F.cross_entropy(o, target) for o in outputs).backward()
    # Every parameter must get a gradient: DDP fails on unused parameters.
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    grads = [p.grad for p in model.parameters()]
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    model.eval()
    with torch.no_grad():
        y = model(x)
    assert isinstance(y, torch.Tensor) and y.shape == (1, N_CLASSES, TILE, TILE)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", ARCHS)
def test_binary_output_and_odd_sizes(name):
    torch.manual_seed(0)
    model = build_model(name, 1, 1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 1, 64, 64)
        assert model(torch.randn(1, 1, 50, 37)).shape == (1, 1, 50, 37)


def test_u2net_train_mode_returns_fused_then_sides_as_logits():
    model = build_model("u2netp", 3, 1).train()
    out = model(torch.randn(1, 3, 64, 64))
    assert len(out) == 7 and all(o.shape == (1, 1, 64, 64) for o in out)
    # Logits, not the official code's sigmoids: values leave [0, 1].
    assert any(((o < 0) | (o > 1)).any() for o in out)


@pytest.mark.parametrize("norm", ["instance", "batch", "group", "none"])
def test_unet_norms_and_deep_supervision(norm):
    """UNet(deep_supervision=True) trains every side head (DDP needs each parameter used) and returns the main
    logits alone in eval mode, whatever the norm."""
    torch.manual_seed(0)
    model = UNet(1, 2, channels=(4, 8, 8, 16, 16), norm=norm, deep_supervision=True)
    assert model.deep_supervision
    x, target = torch.randn(2, 1, 40, 40), torch.randint(0, 2, (2, 40, 40))
    out = model.train()(x)
    assert isinstance(out, tuple) and len(out) == 4  # main + one side head per decoder level but the last
    assert all(o.shape == (2, 2, 40, 40) for o in out)
    sum(F.cross_entropy(o, target) for o in out).backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        y = model.eval()(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 2, 40, 40)


def test_unet_unknown_norm_names_the_choices():
    with pytest.raises(ValueError, match="instance, batch, group, none.*'layer'"):
        UNet(1, 2, channels=(4, 8), norm="layer")


def test_deep_supervision_flag():
    assert U2Net.deep_supervision and U2NetP.deep_supervision
    assert not UNet.deep_supervision and not ResNetUNet.deep_supervision


def test_parameter_counts_match_official_u2net():
    u2net, u2netp = build_model("u2net", 3, 1), build_model("u2netp", 3, 1)
    assert n_params(u2net) == 44_009_869
    assert n_params(u2netp) == 1_131_181
    # Official module names, so the official u2net.pth / u2netp.pth load as they are.
    keys = set(u2net.state_dict())
    for key in ("stage1.rebnconv7.conv_s1.weight", "stage5d.rebnconv3d.bn_s1.running_mean", "side6.bias"):
        assert key in keys
    assert u2net.outconv.weight.shape == (1, 6, 1, 1)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_unet_parameter_count(in_channels):
    count = n_params(build_model("unet", in_channels, 1))
    print(f"unet in={in_channels} out=1: {count:,} parameters")
    assert 2_900_000 <= count <= 3_300_000


def test_unet_channels_kwarg_builds_narrow_model():
    model = build_model("unet", 1, 2, channels=(8, 12, 16))
    assert n_params(model) < 20_000
    assert model(torch.randn(1, 1, 36, 36)).shape == (1, 2, 36, 36)


def _reach(model: torch.nn.Module, size: int = 129) -> int:
    """Width of the input window that moves the centre output pixel (its receptive field, cut by the input)."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, size, size, requires_grad=True)
    model.eval()(x)[0, :, size // 2, size // 2].sum().backward()
    cols = (x.grad[0, 0].abs().sum(0) > 0).nonzero()
    return int(cols.max() - cols.min() + 1)


def test_unet_stem_2_runs_at_half_resolution_sees_twice_as_far_and_returns_full_size():
    """stem=2 (the demo's model): a stride-2 stem, every level at half resolution, logits back at the
    input's size (odd sizes too); the same channels reach about twice as far into the scan."""
    half = UNet(1, 3, channels=(4, 8, 8), stem=2)
    assert half.stem[0].stride == (2, 2)
    for size in (64, 65, 41):
        assert half(torch.randn(2, 1, size, size)).shape == (2, 3, size, size)
    # Without a norm (InstanceNorm's statistics would let every input pixel move every output).
    reach_half = _reach(UNet(1, 3, channels=(4, 8, 8), stem=2, norm="none"))
    reach_full = _reach(UNet(1, 3, channels=(4, 8, 8), norm="none"))
    assert reach_half >= 1.8 * reach_full
    deep = UNet(1, 3, channels=(4, 8, 8), stem=2, deep_supervision=True).train()
    assert all(o.shape == (1, 3, 50, 50) for o in deep(torch.randn(1, 1, 50, 50)))
    assert build_model("unet", 1, 3, channels=(4, 8), stem=2)(torch.randn(1, 1, 33, 33)).shape == (1, 3, 33, 33)
    with pytest.raises(ValueError, match="stem must be 1 or 2, got 4"):
        UNet(1, 2, channels=(4, 8), stem=4)


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(KeyError) as err:
        build_model("segformer", 3, 2)
    for name in ARCHS:
        assert name in str(err.value)


def test_bad_class_count_is_rejected():
    with pytest.raises(ValueError, match="n_classes"):
        build_model("unet", 3, 0)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_resnet_unet_loads_local_backbone_weights(tmp_path, in_channels):
    torch.manual_seed(1)
    backbone = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(backbone.state_dict(), path)

    model = build_model("resnet_unet", in_channels, 2, weights_path=str(path))
    assert torch.equal(model.layer4[1].conv2.weight, backbone.layer4[1].conv2.weight)
    assert torch.equal(model.layer0[1].running_var, backbone.bn1.running_var)
    conv1 = model.layer0[0].weight
    assert conv1.shape == (64, in_channels, 7, 7)
    if in_channels == 3:
        assert torch.equal(conv1, backbone.conv1.weight)
    else:  # grayscale: the RGB kernels summed, so a gray image gives the same response as its RGB copy
        assert torch.allclose(conv1, backbone.conv1.weight.sum(dim=1, keepdim=True), atol=1e-6)


def test_resnet_unet_weights_errors(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model("resnet_unet", 3, 2, weights_path=missing)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="wrong.pth: not a torchvision resnet18 state dict"):
        build_model("resnet_unet", 3, 2, weights_path=wrong)
