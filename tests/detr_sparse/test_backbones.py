import pytest
import torch
import torchvision

from detr_sparse.backbones import build_backbone
from detr_sparse.backbones.resnet import ResNetBackbone
from detr_sparse.backbones.swin import SwinBackbone
from engine.config import BackboneConfig, load_config
from helpers import REPO


@pytest.mark.parametrize("name,dilation", [("resnet18", False), ("resnet50", True)])
def test_resnet_outputs_match_stated_channels_and_strides(name, dilation):
    backbone = ResNetBackbone(name, norm="frozen_bn", dilation=dilation,
                              out_features=("res3", "res4", "res5"))
    out = backbone(torch.randn(2, 3, 97, 131))
    for name, shape in backbone.output_shape().items():
        assert out[name].shape[1] == shape["channels"]
        assert out[name].shape[-2] == -(-97 // shape["stride"])  # ceil: convolutions pad
    assert backbone.output_shape()["res5"]["stride"] == (16 if dilation else 32)


def test_torchvision_weights_round_trip(tmp_path):
    net = torchvision.models.resnet18(norm_layer=lambda c: torch.nn.GroupNorm(32, c))
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    backbone = ResNetBackbone("resnet18", norm="gn", out_features=("res4",),
                              pretrained=str(tmp_path / "r18.pth"))
    x = torch.randn(1, 3, 64, 64)
    reference = torch.nn.Sequential(*list(net.children())[:7])(x)  # conv1 .. layer3
    assert torch.allclose(backbone(x)["res4"], reference, atol=1e-5)
    again = ResNetBackbone("resnet18", norm="gn", out_features=("res4",))
    again.load_state_dict(backbone.state_dict())
    assert backbone.torchvision_state_dict().keys() == {
        k for k in net.state_dict() if k.split(".")[0] in {"conv1", "bn1", "layer1", "layer2", "layer3"}}


def test_missing_pretrained_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        ResNetBackbone("resnet18", pretrained=str(tmp_path / "nothere.pth"))


def test_frozen_bn_freezes_stem_and_res2():
    backbone = ResNetBackbone("resnet18", norm="frozen_bn")
    assert not any(p.requires_grad for p in backbone.stem.parameters())
    assert not any(p.requires_grad for p in backbone.stages["res2"].parameters())
    assert all(p.requires_grad for p in backbone.stages["res5"].parameters())


@pytest.mark.parametrize("freeze_at, trainable", [(0, ["stem", "res2", "res3", "res4"]),
                                                  (3, ["res4"]), (-1, ["stem", "res2", "res3", "res4"])])
def test_freeze_at_stops_gradients_of_the_first_stages(freeze_at, trainable):
    backbone = ResNetBackbone("resnet18", norm="gn", out_features=("res4",), freeze_at=freeze_at)
    parts = {"stem": backbone.stem, **backbone.stages}
    assert {n for n, m in parts.items() if all(p.requires_grad for p in m.parameters())} == set(trainable)
    assert not any(p.requires_grad for n, m in parts.items() if n not in trainable for p in m.parameters())


def test_freeze_at_beyond_the_built_stages_is_an_error():
    with pytest.raises(ValueError, match="freeze_at"):
        ResNetBackbone("resnet18", norm="gn", out_features=("res3",), freeze_at=4)


# --- Swin ---------------------------------------------------------------------------------


@pytest.mark.parametrize("height,width", [(64, 96), (62, 97)])
def test_swin_outputs_match_stated_channels_and_strides(height, width):
    backbone = SwinBackbone("swin_t", out_features=("res2", "res3", "res5"))
    out = backbone(torch.randn(2, 3, height, width))
    assert list(out) == ["res2", "res3", "res5"] == list(backbone.output_shape())
    assert {n: s["channels"] for n, s in backbone.output_shape().items()} == {
        "res2": 96, "res3": 192, "res5": 768}
    for name, shape in backbone.output_shape().items():
        stride = shape["stride"]
        assert out[name].shape == (2, shape["channels"], -(-height // stride), -(-width // stride))
        assert out[name].is_contiguous()


def test_swin_builds_only_the_requested_stages():
    backbone = SwinBackbone("swin_t", out_features=("res3",))
    assert len(backbone.features) == 4  # patch embed, stage 1, merge, stage 2
    assert list(backbone.norms) == ["res3"]


# features: [patch embed, stage 1, merge, stage 2, merge, stage 3]; the official Swin's
# frozen_stages=2 (Sparse DETR) freezes the embedding, stage 1 and the merge after it
@pytest.mark.parametrize("freeze_at, frozen", [(0, 0), (-1, 0), (1, 1), (2, 3), (3, 5), (4, 6)])
def test_swin_freeze_at_stops_gradients_as_the_official_frozen_stages(freeze_at, frozen):
    backbone = SwinBackbone("swin_t", out_features=("res2", "res4"), freeze_at=freeze_at)
    grads = [all(p.requires_grad for p in m.parameters()) for m in backbone.features]
    assert grads == [False] * frozen + [True] * (len(backbone.features) - frozen)
    # the output norms are new detection layers: they train whatever is frozen
    assert all(p.requires_grad for p in backbone.norms.parameters())


def test_swin_configs_freeze_as_the_official_sparse_detr():
    for name in ("sparse_detr_swin", "deformable_detr_plus_swin"):
        assert load_config(REPO / f"configs/{name}.yaml").model.backbone.freeze_at == 2


def test_swin_freeze_at_beyond_the_built_stages_is_an_error():
    with pytest.raises(ValueError, match="freeze_at"):
        SwinBackbone("swin_t", out_features=("res3",), freeze_at=4)


def test_swin_loads_torchvision_weights(tmp_path):
    net = torchvision.models.swin_t()
    torch.save(net.state_dict(), tmp_path / "swin_t.pth")
    backbone = SwinBackbone("swin_t", out_features=("res4",), pretrained=str(tmp_path / "swin_t.pth"))
    theirs = net.state_dict()
    for key, value in backbone.features.state_dict().items():
        assert torch.equal(value, theirs[f"features.{key}"]), key
    net.eval(), backbone.eval()
    x = torch.randn(1, 3, 64, 64)
    reference = backbone.norms["res4"](net.features[:6](x)).permute(0, 3, 1, 2)
    assert torch.allclose(backbone(x)["res4"], reference, atol=1e-5)


def test_swin_missing_weights_name_the_file(tmp_path):
    state = torchvision.models.swin_t().state_dict()
    del state["features.3.1.mlp.0.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial\.pth.*features\.3\.1\.mlp\.0\.weight"):
        SwinBackbone("swin_t", out_features=("res3",), pretrained=str(tmp_path / "partial.pth"))
    with pytest.raises(FileNotFoundError, match="model.backbone.pretrained.*nothere.pth"):
        SwinBackbone("swin_t", pretrained=str(tmp_path / "nothere.pth"))


def test_swin_drop_path_rate_reaches_stochastic_depth():
    backbone = SwinBackbone("swin_t", out_features=("res5",), drop_path_rate=0.35)
    assert backbone.features[1][0].stochastic_depth.p == 0.0
    assert backbone.features[-1][-1].stochastic_depth.p == pytest.approx(0.35)


def test_swin_batch_equals_single_images_in_eval():
    backbone = SwinBackbone("swin_t", out_features=("res3", "res5")).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        batched = backbone(x)
        singles = [backbone(x[i:i + 1]) for i in range(2)]
    for name in batched:
        assert torch.allclose(batched[name], torch.cat([s[name] for s in singles]), atol=1e-5)


def test_build_backbone_swin_and_its_config_errors():
    cfg = BackboneConfig(name="swin_t", drop_path_rate=0.1, out_features=["res3"])
    backbone = build_backbone(cfg, ("res3",))
    assert isinstance(backbone, SwinBackbone) and backbone.output_shape() == {
        "res3": {"channels": 192, "stride": 8}}
    with pytest.raises(ValueError, match="model.backbone.name"):
        build_backbone(BackboneConfig(name="swin_x"), ("res3",))
    with pytest.raises(ValueError, match="model.backbone.dilation: not supported by swin"):
        build_backbone(BackboneConfig(name="swin_t", dilation=True), ("res3",))



@pytest.mark.parametrize("size", [(61, 93), (7, 9), (14, 14)])
def test_window_attention_equals_torchvision_chunked_or_not(size):
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    from detr_sparse.backbones.swin import WindowAttention

    torch.manual_seed(0)
    for shift in ([0, 0], [3, 3]):
        reference = ShiftedWindowAttention(32, [7, 7], shift, num_heads=2).eval()
        torch.nn.init.normal_(reference.relative_position_bias_table)
        fast = WindowAttention.from_torchvision(reference).eval()
        x = torch.randn(2, *size, 32)
        with torch.no_grad():
            expected = reference(x)
            for chunk in (49, 2048):  # one window per chunk, and all at once
                fast.chunk_tokens = chunk
                torch.testing.assert_close(fast(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast(x), expected, atol=1e-5, rtol=1e-5)  # with gradients


def test_chunked_mlp_equals_torchvision():
    from detr_sparse.backbones.swin import ChunkedMLP

    net = torchvision.models.swin_t().features[1][0].mlp.eval()
    fast = ChunkedMLP.from_torchvision(net).eval()
    x = torch.randn(1, 60, 70, 96)  # 4200 tokens: three chunks
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), atol=1e-5, rtol=1e-5)
