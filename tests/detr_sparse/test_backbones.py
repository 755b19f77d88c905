import pytest
import torch
import torchvision

from detr_sparse.backbones.resnet import ResNetBackbone


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
