"""Node segmentation networks (S-Net, 3D residual U-Net) and their losses: shapes, axial attention axes, parameter
counts, configuration round trips, loss properties and a few training steps on a synthetic blob."""

from __future__ import annotations

import pytest
import torch

from LymphNodeStagingLib.errors import UsageError
from LymphNodeStagingLib.nodes.losses import (
    adaptive_bce,
    adaptive_pos_weight,
    snet_loss,
    structure_loss,
    structure_weights,
    tversky_loss,
)
from LymphNodeStagingLib.nodes.networks import (
    AxialAttention,
    SNet,
    SNetConfig,
    SNetOutput,
    UNet3D,
    UNet3DConfig,
    count_parameters,
    state_dict_megabytes,
)


@pytest.fixture(autouse=True)
def _seeded_one_thread():
    """Seed, and one intra-op thread: the networks are tiny, and on a busy shared machine two threads spinning at
    each op's barrier make a training step up to 100 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def blob(shape: tuple[int, ...], radius: float) -> torch.Tensor:
    """A bright ball (value 1) in the centre of a dark background, plus the mask: (1, 1, *shape) each."""
    grids = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) - (s - 1) / 2 for s in shape), indexing="ij")
    mask = (sum(g ** 2 for g in grids) <= radius ** 2).float()[None, None]
    image = 0.2 + 0.6 * mask + 0.05 * torch.randn_like(mask)
    return image, mask


# ---------------------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
@pytest.mark.parametrize("side_to_decoder", [True, False])
def test_snet_output_shapes(size, side_to_decoder):
    net = SNet(SNetConfig.tiny(side_to_decoder=side_to_decoder))
    out = net(torch.rand(2, 1, *size))
    assert isinstance(out, SNetOutput)
    assert out.logits.shape == (2, 1, *size)
    assert len(out.side) == 2 and all(s.shape == (2, 1, *size) for s in out.side)


@pytest.mark.parametrize("size", [(16, 32, 32), (8, 16, 24)])
@pytest.mark.parametrize("upsample", ["transpose", "trilinear"])
def test_unet_output_shapes(size, upsample):
    net = UNet3D(UNet3DConfig.tiny(upsample=upsample))
    assert net(torch.rand(1, 1, *size)).shape == (1, 1, *size)


def test_networks_refuse_bad_input_shapes():
    with pytest.raises(UsageError, match="multiples of 4"):
        SNet(SNetConfig.tiny())(torch.rand(1, 1, 30, 32))
    with pytest.raises(UsageError, match="multiples of 4"):
        UNet3D(UNet3DConfig.tiny())(torch.rand(1, 1, 16, 30, 32))
    with pytest.raises(UsageError):
        UNet3D(UNet3DConfig.tiny())(torch.rand(1, 1, 32, 32))


def test_snet_aspp_and_decoder_channels():
    cfg = SNetConfig()
    assert cfg.encoder_channels == (32, 48, 64)
    assert cfg.aspp_channels == 192  # 64 + 4 * 32, as in the published dense ASPP
    net = SNet(cfg)
    assert net.dec2.conv1.in_channels == 192 + 48 + 1  # upsampled ASPP + gated skip + refined side logit
    assert net.dec1.conv1.in_channels == 48 + 32 + 1
    published = SNet(SNetConfig(side_to_decoder=False))
    assert published.dec2.conv1.in_channels == 192 + 48


def test_side_maps_feed_the_decoder():
    """With side_to_decoder, the main output depends on the side branch (its refinement layers get gradients from
    the main logits alone); in the published wiring they do not."""
    x = torch.rand(1, 1, 32, 32)
    for wired, expect in ((True, True), (False, False)):
        net = SNet(SNetConfig.tiny(side_to_decoder=wired))
        net(x).logits.sum().backward()
        grad = net.ra2.refine[0][0].weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == expect


# ----------------------------------------------------------------------------------------------- axial attention


@pytest.mark.parametrize("size", [(12, 12), (8, 12)])
def test_axial_attention_attends_along_its_axis(size):
    """One pass with gamma = 1: a change at one pixel (h0, w0) changes the height pass only in column w0 and the
    width pass only in row h0, also when H == W."""
    h0, w0 = 3, 5
    x = torch.randn(1, 8, *size)
    y = x.clone()
    y[0, :, h0, w0] += 3.0
    for axis in ("height", "width"):
        att = AxialAttention(8, axis, reduction=4)
        with torch.no_grad():
            att.gamma.fill_(1.0)
            changed = ((att(y) - att(x)).abs().amax(dim=(0, 1)) > 1e-6)
        expected = torch.zeros(size, dtype=torch.bool)
        if axis == "height":
            expected[:, w0] = True
        else:
            expected[h0, :] = True
        assert torch.equal(changed, expected), axis


def test_axial_attention_starts_as_identity():
    att = AxialAttention(8, "height")
    x = torch.randn(2, 8, 8, 12)
    assert torch.equal(att(x), x)
    with pytest.raises(UsageError):
        AxialAttention(8, "depth")


# ------------------------------------------------------------------------------------------- parameters, configs


def test_parameter_counts_of_the_default_networks(record_property):
    snet, unet = SNet(), UNet3D()
    counts = {"snet": count_parameters(snet), "unet3d": count_parameters(unet)}
    sizes = {"snet": state_dict_megabytes(snet), "unet3d": state_dict_megabytes(unet)}
    for k in counts:
        record_property(f"{k}_parameters", counts[k])
        record_property(f"{k}_state_dict_mb", round(sizes[k], 2))
    print(f"parameters: {counts}; float32 state dicts (MB): {sizes}")
    assert counts == {"snet": 758_737, "unet3d": 1_377_153}
    assert 2.5 < sizes["snet"] < 3.5 and 5.0 < sizes["unet3d"] < 6.0
    assert count_parameters(SNet(SNetConfig.tiny())) < 60_000
    assert count_parameters(UNet3D(UNet3DConfig.tiny())) < 30_000


@pytest.mark.parametrize("cls", [SNetConfig, UNet3DConfig])
def test_config_round_trip_and_unknown_keys(cls):
    cfg = cls.tiny()
    assert cls.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UsageError, match="unknown keys"):
        cls.from_dict({**cfg.to_dict(), "depth": 5})


def test_config_validation():
    with pytest.raises(UsageError):
        SNetConfig(channels=(32, 48))
    with pytest.raises(UsageError):
        SNetConfig(width=0)
    with pytest.raises(UsageError):
        UNet3DConfig(levels=4)  # channels (32, 64, 128) do not match 4 levels
    with pytest.raises(UsageError):
        UNet3DConfig(upsample="nearest")
    assert UNet3DConfig.tiny(levels=4).channels == (4, 8, 16, 32)


# -------------------------------------------------------------------------------------------------------- losses


def test_tversky_perfect_prediction_is_zero():
    _, mask = blob((32, 32), 6)
    logits = (mask * 2 - 1) * 30
    assert tversky_loss(logits, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert tversky_loss(-logits, mask).item() > 0.99


def test_tversky_false_positives_cost_more_than_false_negatives():
    target = torch.zeros(1, 1, 20, 20)
    target[..., 5:15, 5:15] = 1  # 100 foreground pixels
    fp_heavy = target.clone()
    fp_heavy[..., 15:17, 5:15] = 1  # +20 false positives
    fn_heavy = target.clone()
    fn_heavy[..., 13:15, 5:15] = 0  # 20 false negatives
    as_logits = lambda m: (m * 2 - 1) * 30  # noqa: E731
    fp_loss = tversky_loss(as_logits(fp_heavy), target).item()
    fn_loss = tversky_loss(as_logits(fn_heavy), target).item()
    assert fp_loss > fn_loss > 0
    # swapping alpha and beta swaps the preference
    assert tversky_loss(as_logits(fp_heavy), target, 0.3, 0.7).item() < tversky_loss(as_logits(fn_heavy), target,
                                                                                       0.3, 0.7).item()
    # hard counts: TP = 100, FP = 20 -> 1 - 101 / (100 + 14 + 1)
    assert fp_loss == pytest.approx(1 - 101 / 115, abs=1e-5)


def test_structure_weights_are_one_far_from_edges():
    target = torch.zeros(1, 1, 96, 96)
    target[..., 20:76, 20:76] = 1
    w = structure_weights(target)
    assert w[0, 0, 48, 48] == 1  # window inside the mask
    assert w[0, 0, 2, 2] == 1  # window in the background
    assert w[0, 0, 20, 48] > 2  # on the boundary
    assert w.min() >= 1 and w.max() <= 6
    with pytest.raises(UsageError):
        structure_weights(target, kernel=30)


def test_structure_loss_orders_predictions():
    _, mask = blob((32, 32), 6)
    good = structure_loss((mask * 2 - 1) * 8, mask)
    bad = structure_loss(-(mask * 2 - 1) * 8, mask)
    assert good.item() < 0.01 < bad.item()
    assert structure_loss(torch.zeros(2, 1, 16, 16, 16), torch.zeros(2, 1, 16, 16, 16)).shape == ()  # 3D works


def test_adaptive_bce_positive_weight():
    target = torch.zeros(2, 1, 4, 10, 10)
    target[0, 0, 0, :2, :5] = 1  # 10 of 800 voxels
    assert adaptive_pos_weight(target).item() == pytest.approx(79.0)
    assert adaptive_pos_weight(torch.ones(1, 1, 4, 4)).item() == 1.0  # clamped below
    tiny = torch.zeros(1, 1, 128, 128, 128)
    tiny[0, 0, 0, 0, 0] = 1
    assert adaptive_pos_weight(tiny).item() == 1000.0  # clamped above
    logits = torch.zeros_like(target, requires_grad=True)
    loss = adaptive_bce(logits, target)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(79.0))
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()  # the weight is a constant: gradient only through the logits
    # 2D too; the foreground term balances the background: equal total gradient magnitude at logits 0
    t2 = torch.zeros(1, 1, 10, 10)
    t2[..., :2, :5] = 1
    l2 = torch.zeros_like(t2, requires_grad=True)
    adaptive_bce(l2, t2).backward()
    g = l2.grad
    assert g[t2 == 1].sum().abs().item() == pytest.approx(g[t2 == 0].sum().abs().item())


def test_losses_refuse_mismatched_shapes():
    with pytest.raises(UsageError):
        tversky_loss(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))
    with pytest.raises(UsageError):
        adaptive_bce(torch.zeros(1, 1, 8, 8), torch.zeros(1, 8, 8))


# ------------------------------------------------------------------------------------------------------ training


def _train(net: torch.nn.Module, loss_fn, image: torch.Tensor, mask: torch.Tensor, steps: int,
           lr: float) -> tuple[float, float]:
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    with torch.no_grad():
        before = loss_fn(net(image), mask).item()
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(net(image), mask)
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = loss_fn(net(image), mask).item()
    return before, after


def _main(fn):
    return lambda out, mask: fn(out.logits, mask)


@pytest.mark.parametrize("loss_name", ["snet", "tversky", "structure_side", "adaptive_bce"])
def test_snet_training_lowers_the_loss(loss_name):
    image, mask = blob((32, 32), 5)
    image, mask = image.repeat(2, 1, 1, 1), mask.repeat(2, 1, 1, 1)
    loss_fn = {
        "snet": snet_loss,
        "tversky": _main(tversky_loss),
        "structure_side": lambda out, m: sum(structure_loss(s, m) for s in out.side),
        "adaptive_bce": _main(adaptive_bce),
    }[loss_name]
    before, after = _train(SNet(SNetConfig.tiny()), loss_fn, image, mask, steps=25, lr=1e-2)
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("loss_fn", [adaptive_bce, tversky_loss], ids=["adaptive_bce", "tversky"])
def test_unet_training_lowers_the_loss(loss_fn):
    image, mask = blob((16, 32, 32), 7)
    before, after = _train(UNet3D(UNet3DConfig.tiny()), loss_fn, image, mask, steps=25, lr=1e-2)
    assert after < 0.9 * before, (before, after)
