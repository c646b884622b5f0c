"""Mixed precision contexts: bf16 autocast where asked for and native, fp32 with a warning where emulated."""

import warnings

import pytest
import torch
from helpers import fixed_batch_losses

from trainer import precision
from trainer.models import build_model

CPU = torch.device("cpu")
native = pytest.mark.skipif(not precision.cpu_bf16_native(), reason="this CPU has no native bf16")


def autocast_on(ctx) -> bool:
    with ctx:
        return torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("amp", ["auto", "off"])
def test_cpu_stays_fp32_unless_bf16_is_asked_for(amp):
    assert not autocast_on(precision.autocast(CPU, amp))


@native
def test_bf16_on_a_native_cpu_autocasts_convolutions():
    ctx = precision.autocast(CPU, "bf16")
    assert autocast_on(ctx)
    conv = torch.nn.Conv2d(1, 4, 3)
    with ctx:
        assert conv(torch.randn(1, 1, 8, 8)).dtype == torch.bfloat16
    assert conv.weight.dtype == torch.float32  # weights and optimizer state stay fp32


def test_bf16_on_a_cpu_without_native_bf16_warns_and_runs_fp32(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: False)
    with pytest.warns(UserWarning, match="no native bf16; running in fp32"):
        ctx = precision.autocast(CPU, "bf16")
    assert not autocast_on(ctx)


@pytest.mark.parametrize("native_cpu", [True, False])
def test_a_run_records_the_precision_its_steps_really_run_in(monkeypatch, native_cpu):
    """``train.amp: bf16`` on a CPU without native bf16 runs fp32, and its checkpoints say so (evaluate then
    predicts it in fp32 on any CPU); on a native CPU they say bf16."""
    from trainer.config import Config
    from trainer.setup import build_run

    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: native_cpu)
    cfg = Config()
    cfg.train.amp, cfg.model.kwargs = "bf16", {"channels": [4, 8]}
    manifest = {"classes": ["background", "defect"], "mode": "binary", "channels": 1, "image_size": 64,
                "tile": 32, "stride": 32, "splits": {"train": {"scans": []}}}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fp32 fallback's warning
        run = build_run(cfg, CPU, manifest, 4)
    assert run.meta["precision"] == ("bf16" if native_cpu else "fp32")


@native
@pytest.mark.usefixtures("one_torch_thread")
def test_a_channels_last_bf16_unet_learns_a_fixed_batch():
    """The demo's CPU setting (train.amp=bf16, channels_last) still trains: the loss halves on one batch."""
    from trainer.losses import LossConfig, build_loss

    torch.manual_seed(0)
    x = torch.randn(4, 1, 48, 48).contiguous(memory_format=torch.channels_last)
    y = (x[:, 0] > 1.0).long()  # bright pixels are "defects": learnable from the pixel itself
    model = build_model("unet", 1, 1, channels=[8, 16, 32]).to(memory_format=torch.channels_last)
    loss_fn = build_loss(LossConfig(object_window=15), 1)
    losses = fixed_batch_losses(model, loss_fn, x, y, lr=2e-2, steps=30, ctx=precision.autocast(CPU, "bf16"))
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("trained, recorded, native_cpu, expected", [
    ("bf16", None, True, True), ("bf16", None, False, False), ("off", None, True, False), ("auto", None, True, False),
    ("bf16", "bf16", True, True), ("bf16", "fp32", True, False),
    ("auto", "bf16", True, True)])  # trained on CUDA (auto: bf16 there), predicted on a native CPU  # fmt: skip
def test_evaluate_predicts_in_the_precision_the_model_was_trained_in(monkeypatch, trained, recorded, native_cpu,
                                                                     expected):  # fmt: skip
    """A model trained in bf16 is evaluated (and its decision tuned) in bf16 where the CPU has it natively;
    an fp32 model, or a CPU without native bf16, stays fp32 (and no warning). What the checkpoint records it
    was trained in counts over its ``train.amp``: a bf16 run on a CPU without native bf16 trained in fp32."""
    import warnings

    from evaluate import inference
    from shardgen.tiling import TileGrid

    monkeypatch.setattr(inference, "cpu_bf16_native", lambda: native_cpu)
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: native_cpu)
    net = build_model("unet", 1, 3, channels=[4, 8]).eval()
    meta = {"classes": ["background", "a", "b"], "in_channels": 1, "config": {"train": {"amp": trained}}}
    if recorded:
        meta["precision"] = recorded
    model = inference.Model(net, None, meta, "m.pt", CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predictor = inference.Predictor(model, TileGrid(64, 32, 32))
    assert autocast_on(predictor.amp) == expected
    assert model.precision == ("bf16" if expected else "fp32")
