import re

import pytest
import torch
from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer

from detr_sparse.backbones import build_backbone
from detr_sparse.backbones.pvt import PVTBackbone
from detr_sparse.backbones.vit import ViTBackbone
from engine.config import BackboneConfig


def tiny_vit(**kwargs):
    return ViTBackbone("deit_t", out_channels=32, drop_path_rate=0.0, **kwargs)


def tiny_pvt(**kwargs):
    return PVTBackbone("pvt_t", drop_path_rate=0.0, **kwargs)


def first_layer(backbone):
    return backbone.conv_proj if isinstance(backbone, ViTBackbone) else backbone.stages[0].patch_embed.proj


@pytest.mark.parametrize("make", [tiny_vit, tiny_pvt])
@pytest.mark.parametrize("height,width", [(75, 101), (64, 96)])
def test_outputs_match_stated_channels_and_strides(make, height, width):
    backbone = make()
    out = backbone(torch.randn(2, 3, height, width))
    assert list(out) == ["res2", "res3", "res4", "res5"] == list(backbone.out_features)
    assert backbone.output_shape() == {n: {"channels": backbone.channels[n], "stride": backbone.strides[n]}
                                       for n in out}
    assert backbone.strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    for name, shape in backbone.output_shape().items():
        stride = shape["stride"]
        assert out[name].shape == (2, shape["channels"], -(-height // stride), -(-width // stride))
        # dense, in either layout (ViT's last LayerNorm2d leaves it channels-last, as ResNet's)
        assert out[name].is_contiguous() or out[name].is_contiguous(memory_format=torch.channels_last)
        assert out[name].isfinite().all()


@pytest.mark.parametrize("make", [tiny_vit, tiny_pvt])
def test_gradients_reach_the_first_layer(make):
    backbone = make().train()
    out = backbone(torch.randn(1, 3, 75, 101))
    sum(o.square().mean() for o in out.values()).backward()
    grad = first_layer(backbone).weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("make", [tiny_vit, tiny_pvt])
def test_batch_equals_each_image_alone(make):
    backbone = make().eval()
    images = torch.randn(2, 3, 75, 101)
    with torch.no_grad():
        batched = backbone(images)
        alone = [backbone(images[i:i + 1]) for i in range(2)]
    for name, maps in batched.items():
        for i in range(2):
            torch.testing.assert_close(maps[i:i + 1], alone[i][name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make", [tiny_vit, tiny_pvt])
def test_only_the_requested_outputs_are_built(make):
    backbone = make(out_features=("res3", "res4"))
    assert list(backbone(torch.randn(1, 3, 64, 64))) == ["res3", "res4"]
    if isinstance(backbone, PVTBackbone):
        assert len(backbone.stages) == 3
    else:
        assert set(backbone.project) == {"res3", "res4"}


def test_vit_position_embedding_is_resized_to_a_non_square_grid():
    backbone = tiny_vit()
    side = 14  # 224 / 16
    ramp = torch.linspace(-1, 1, side)
    with torch.no_grad():
        backbone.pos_embedding.zero_()
        grid = backbone.pos_embedding.view(side, side, -1)
        grid[..., 0] = ramp[None, :]  # varies along the width
        grid[..., 1] = ramp[:, None]  # along the height
    assert torch.equal(backbone.position_embedding((side, side)), backbone.pos_embedding)
    pos = backbone.position_embedding((5, 7))
    assert pos.shape == (1, 35, 192) and pos.isfinite().all()
    pos = pos.view(5, 7, -1)
    # width and height not swapped: channel 0 rises along each row, channel 1 down each column
    assert (pos[:, 1:, 0] > pos[:, :-1, 0]).all() and torch.allclose(pos[:, :, 0], pos[:1, :, 0])
    assert (pos[1:, :, 1] > pos[:-1, :, 1]).all() and torch.allclose(pos[:, :, 1], pos[:, :1, 1])


def test_vit_block_matches_torchvision_encoder_block():
    backbone = tiny_vit().eval()
    block = backbone.layers[0]
    x = torch.randn(2, 35, 192)
    with torch.no_grad():
        torch.testing.assert_close(block(x), EncoderBlock.forward(block, x), atol=1e-5, rtol=1e-4)


def test_pvt_maps_inside_the_image_do_not_depend_on_the_padding_amount():
    backbone = tiny_pvt().eval()
    images = torch.randn(1, 3, 75, 101)
    with torch.no_grad():
        reference = backbone(images)
        backbone.pad_multiple = 64
        padded_more = backbone(images)
    for name in reference:
        torch.testing.assert_close(padded_more[name], reference[name], atol=1e-5, rtol=1e-4)


def test_vit_loads_torchvision_and_deit_weights(tmp_path):
    net = VisionTransformer(224, 16, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768)
    torch.save(net.state_dict(), tmp_path / "tv.pth")
    from_tv = tiny_vit(pretrained=str(tmp_path / "tv.pth")).eval()
    tokens = torch.randn(1, 10, 192)
    with torch.no_grad():
        torch.testing.assert_close(from_tv.layers(tokens), net.encoder.layers(tokens))
    assert torch.equal(from_tv.pos_embedding, net.encoder.pos_embedding[:, 1:])

    timm_names = {"ln_1": "norm1", "self_attention.in_proj_": "attn.qkv.",
                  "self_attention.out_proj": "attn.proj", "ln_2": "norm2", "mlp.0": "mlp.fc1",
                  "mlp.3": "mlp.fc2"}
    deit = {"cls_token": net.class_token, "pos_embed": net.encoder.pos_embedding,
            "patch_embed.proj.weight": net.conv_proj.weight, "patch_embed.proj.bias": net.conv_proj.bias,
            "norm.weight": net.encoder.ln.weight, "head.weight": net.heads.head.weight}
    for key, value in net.encoder.layers.state_dict().items():
        i, rest = re.fullmatch(r"encoder_layer_(\d+)\.(.*)", key).groups()
        for theirs, ours in timm_names.items():
            rest = rest.replace(theirs, ours)
        deit[f"blocks.{i}.{rest}"] = value
    torch.save(deit, tmp_path / "deit.pth")
    from_deit = tiny_vit(pretrained=str(tmp_path / "deit.pth"))
    for key, value in from_tv.state_dict().items():
        if not key.startswith(("rescale.", "project.")):
            assert torch.equal(from_deit.state_dict()[key], value), key


def test_pretrained_weights_missing_or_unexpected_are_named(tmp_path):
    state = tiny_vit().state_dict()
    state = {f"encoder.{k}" if k.startswith("layers.") else k: v for k, v in state.items()
             if not k.startswith(("rescale.", "project."))}
    state.pop("encoder.layers.encoder_layer_3.ln_2.bias")
    state["encoder.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing.*encoder_layer_3\.ln_2\.bias.*unexpected.*extra\.weight"):
        tiny_vit(pretrained=str(tmp_path / "bad.pth"))
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        tiny_pvt(pretrained=str(tmp_path / "nothere.pth"))


def test_pvt_padded_batch_with_sizes_equals_each_image_alone():
    torch.manual_seed(0)
    backbone = tiny_pvt().eval()
    images = [torch.randn(3, 75, 101), torch.randn(3, 130, 70)]
    batch = torch.full((2, 3, 130, 101), 5.0)  # whatever the padding holds
    for i, image in enumerate(images):
        batch[i, :, :image.shape[1], :image.shape[2]] = image
    with torch.no_grad():
        together = backbone(batch, sizes=[tuple(i.shape[1:]) for i in images])
        for i, image in enumerate(images):
            alone = backbone(image[None])
            for name, stride in backbone.strides.items():
                h, w = -(-image.shape[1] // stride), -(-image.shape[2] // stride)
                torch.testing.assert_close(together[name][i, :, :h, :w], alone[name][0], atol=1e-5, rtol=1e-4)


def test_pvt_loads_official_weights(tmp_path):
    source = tiny_pvt().eval()
    official = {"cls_token": torch.zeros(1, 1, 512), "head.weight": torch.zeros(1000, 512)}
    for key, value in source.state_dict().items():
        if key.startswith("norms."):
            continue
        stage, part, rest = re.fullmatch(r"stages\.(\d)\.(\w+?)(\..*|$)", key).groups()
        part = {"blocks": "block"}.get(part, part)
        rest = rest.replace(".mlp.0.", ".mlp.fc1.").replace(".mlp.3.", ".mlp.fc2.")
        if key == "stages.3.pos_embed":  # the classifier's stage 4 has a class-token position first
            value = torch.cat([torch.zeros(1, 1, 512), value], dim=1)
        official[f"{part}{int(stage) + 1}{rest}"] = value
    torch.save(official, tmp_path / "pvt.pth")
    loaded = tiny_pvt(pretrained=str(tmp_path / "pvt.pth")).eval()
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected, actual = source(images), loaded(images)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name])


def test_pvt_freeze_at_freezes_the_first_stages():
    backbone = tiny_pvt(freeze_at=3)
    assert not any(p.requires_grad for p in backbone.stages[:2].parameters())
    assert not any(p.requires_grad for p in backbone.norms["res3"].parameters())
    assert all(p.requires_grad for p in backbone.stages[2].parameters())
    with pytest.raises(ValueError, match="freeze_at"):
        tiny_pvt(out_features=("res3",), freeze_at=4)


@pytest.mark.parametrize("name,cls", [("deit_t", ViTBackbone), ("pvt_t", PVTBackbone)])
def test_build_backbone_builds_the_named_transformer(name, cls):
    backbone = build_backbone(BackboneConfig(name=name), out_features=("res4", "res5"))
    assert isinstance(backbone, cls) and backbone.out_features == ("res4", "res5")
    with pytest.raises(ValueError, match="dilation"):
        build_backbone(BackboneConfig(name=name, dilation=True), out_features=("res5",))


@pytest.mark.parametrize("name", ["deit_x", "vit_l", "pvt_xl"])
def test_unknown_name_is_an_error_naming_it(name):
    with pytest.raises(ValueError, match=name):
        build_backbone(BackboneConfig(name=name), out_features=("res5",))
    with pytest.raises(ValueError, match=name):
        (PVTBackbone if name.startswith("pvt") else ViTBackbone)(name)
