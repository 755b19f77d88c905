"""The DGE backbones (PVT, DeiT): dense parity, training form = inference form, padding,
the budget loss and its MACs against the FLOP counter, dense weights loading."""
import pytest
import torch

from detr_sparse.backbones import build_backbone
from detr_sparse.backbones.dge import DGEPVTBackbone, DGEViTBackbone
from detr_sparse.backbones.pvt import PVTBackbone
from detr_sparse.backbones.vit import ViTBackbone
from engine.benchmark import count_flops
from engine.config import BackboneConfig


def _pair(kind: str = "pvt"):
    torch.manual_seed(0)
    if kind == "pvt":
        dge = DGEPVTBackbone("pvt_t_dge", drop_path_rate=0.0).eval()
        dense = PVTBackbone("pvt_t", drop_path_rate=0.0).eval()
    else:
        dge = DGEViTBackbone("deit_t_dge", out_channels=32, drop_path_rate=0.0).eval()
        dense = ViTBackbone("deit_t", out_channels=32, drop_path_rate=0.0).eval()
    dense.load_state_dict({k: v for k, v in dge.state_dict().items() if ".router." not in k})
    return dge, dense


def _close(a, b, atol=1e-5):
    for name in b:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4)


def test_routers_start_at_the_finest_granularity():
    dge, _ = _pair()
    bias = dge.stages[2].blocks[1].router.gate.bias
    p = bias.softmax(0)[0].item()
    assert abs(p - 0.95) < 1e-6 and dge.stages[0].blocks[0].router.gate.weight.std() < 0.02


@pytest.mark.parametrize("kind", ["pvt", "deit"])
@pytest.mark.parametrize("size", [(75, 101), (128, 256)])
def test_finest_granularity_everywhere_equals_the_dense_backbone(kind, size):
    dge, dense = _pair(kind)
    dge.forced = (1.0, 0.0, 0.0)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        _close(dge(images), dense(images))


@pytest.mark.parametrize("kind", ["pvt", "deit"])
def test_training_form_equals_inference_form_for_the_same_gates(kind):
    dge, _ = _pair(kind)
    dge.forced, dge.sparse_train = (0.4, 0.35, 0.25), False  # the exact dense training form
    images = torch.randn(2, 3, 130, 200)
    with torch.no_grad():
        inference = dge(images)
        dge.train()
        training = dge(images)
    _close(training, inference, atol=1e-4)
    assert dge.cost_shares()["dge_grain1"] == pytest.approx(0.4, abs=0.1)  # whole regions: 12 in DeiT


@pytest.mark.parametrize("kind", ["pvt", "deit"])
def test_a_padded_batch_equals_each_image_alone_and_padding_costs_nothing(kind):
    dge, _ = _pair(kind)
    for name, module in dge.named_modules():  # routers that choose by content: every granularity occurs
        if name.endswith(".router"):
            module.gate.bias.data.zero_()
            module.gate.weight.data.normal_(std=1.0)
    images = [torch.randn(3, 75, 101), torch.randn(3, 140, 60)] if kind == "pvt" else \
        [torch.randn(3, 150, 201), torch.randn(3, 280, 120)]
    batch = torch.full((2, 3, max(i.shape[1] for i in images), max(i.shape[2] for i in images)), 3.0)
    for i, image in enumerate(images):
        batch[i, :, :image.shape[1], :image.shape[2]] = image
    with torch.no_grad():
        together = dge(batch, sizes=[tuple(i.shape[1:]) for i in images])
        shares = dge.cost_shares()
        choices = dge.choices
        assert min(shares[k] for k in ("dge_grain1", "dge_grain2", "dge_grain4")) > 0.05
        alone = [dge(image[None]) for image in images]
    for i, (image, single) in enumerate(zip(images, alone)):
        for name, stride in dge.strides.items():
            h, w = -(-image.shape[1] // stride), -(-image.shape[2] // stride)
            torch.testing.assert_close(together[name][i, :, :h, :w], single[name][0], atol=1e-4, rtol=1e-4)
    if kind == "pvt":
        # stage 1 (16 px regions): image 1 (140 x 60 px) covers 9 x 4 of the batch's 10 x 8
        # regions (padded to 160 x 128 px); the others are wholly padding, chosen by nobody
        label, first, region_px = choices[0][0], choices[0][1][1], choices[0][2]
        assert label == "stage 1 block 1" and region_px == 16
        assert first.shape == (10, 8) and (first[:9, :4] >= 0).all()
        assert (first == -1).sum() == 10 * 8 - 9 * 4


@pytest.mark.parametrize("kind", ["pvt", "deit"])
def test_budget_macs_agree_with_the_flop_counter_on_the_inference_path(kind):
    dge, _ = _pair(kind)
    dge.forced = (0.3, 0.3, 0.4)
    images = torch.randn(1, 3, 256, 384)  # a multiple of 128: no padding
    # the budget covers the patch embedding(s) and the blocks, not ViTDet's pyramid
    pyramid = {f"{part}.{n}{step}": f"{part}.{n}{step}" for n in dge.out_features
               for part, step in (("rescale", ""), ("project", ".0"), ("project", ".1"))}
    flops = count_flops(dge, images, pyramid if kind == "deit" else None)
    counted = (flops.total - sum(v for k, v in flops.by_part.items() if k != "other")) * 1e9
    with torch.no_grad():
        dge(images)
    costs = dge.costs
    budget_macs = sum(c["static"] + c["dynamic"] for c in costs).item()
    assert abs(budget_macs - counted) / counted < 0.02, (budget_macs, counted)
    shares = dge.cost_shares()
    assert 0.2 < shares["dge_beta"].item() < 0.8


def test_evaluation_is_deterministic_and_the_budget_loss_trains_the_routers():
    dge, _ = _pair()
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        a, b = dge(images), dge(images)
    _close(a, b, atol=0)
    dge.train()
    maps, stats = dge.forward_with_losses(images, [{}, {}])
    # at the start nearly everything is finest: beta near 1, far above the 0.5 budget
    assert stats["dge_beta"] > 0.8 and stats["loss_budget"] > 0.05
    assert stats["loss_budget"].item() == pytest.approx((stats["dge_beta"].item() - 0.5) ** 2, rel=1e-4)
    stats["loss_budget"].backward()
    assert dge.stages[0].blocks[0].router.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("sparse_train", [True, False])
def test_a_training_step_lowers_the_loss(sparse_train):
    dge, _ = _pair()
    dge.train()
    dge.sparse_train = sparse_train
    images = torch.randn(2, 3, 128, 128)
    optimizer = torch.optim.SGD(dge.parameters(), lr=0.05)

    def loss():
        torch.manual_seed(7)  # the same Gumbel samples both times
        maps, stats = dge.forward_with_losses(images, [{}, {}])
        return stats["loss_budget"] + sum(m.square().mean() for m in maps.values())

    first = loss()
    first.backward()
    optimizer.step()
    with torch.no_grad():
        assert loss() < first


def test_build_backbone_builds_dge_with_its_settings():
    cfg = BackboneConfig(name="pvt_t_dge")
    cfg.dge.budget, cfg.dge.budget_scope = 0.4, "dge_layers"
    backbone = build_backbone(cfg, ("res3", "res4"))
    assert isinstance(backbone, DGEPVTBackbone) and backbone.budget == 0.4
    assert backbone.pad_multiple == 32  # the dense PVT's: regions need no more
    with pytest.raises(ValueError, match="budget_scope"):
        DGEPVTBackbone("pvt_t_dge", budget_scope="layers")


@pytest.mark.parametrize("kind", ["pvt", "deit"])
def test_dense_imagenet_weights_load_and_the_routers_start_fresh(kind, tmp_path):
    dge, dense = _pair(kind)
    for p in dense.parameters():
        p.data.normal_()
    if kind == "pvt":
        state = {}
        for key, value in dense.state_dict().items():  # back to the official PVT names
            if key.startswith("norms."):
                continue
            stage, part, rest = key.split(".", 2)[1], *key.split(".", 3)[2:3], key.split(".", 3)[3:]
            rest = ("." + rest[0]) if rest else ""
            if part == "pos_embed":
                value = torch.cat([torch.zeros(1, 1, value.shape[-1]), value], 1) if stage == "3" else value
                state[f"pos_embed{int(stage) + 1}"] = value
                continue
            name = {"blocks": "block"}.get(part, part) + str(int(stage) + 1)
            state[name + rest.replace(".mlp.0.", ".mlp.fc1.").replace(".mlp.3.", ".mlp.fc2.")] = value
    else:
        state = {k: v for k, v in dense.state_dict().items() if not k.startswith(("rescale.", "project."))}
    torch.save(state, tmp_path / "dense.pth")
    fresh = (DGEPVTBackbone("pvt_t_dge") if kind == "pvt" else DGEViTBackbone("deit_t_dge", out_channels=32))
    router = {k: v.clone() for k, v in fresh.state_dict().items() if ".router." in k}
    fresh.load_pretrained(str(tmp_path / "dense.pth"))
    loaded = fresh.state_dict()
    for key, value in dense.state_dict().items():
        if not dense.fresh(key):
            torch.testing.assert_close(loaded[key], value)
    assert all(torch.equal(loaded[k], v) for k, v in router.items())


def test_the_authors_released_dge_deit_checkpoint_loads_with_its_routers(tmp_path):
    """Their keys: blocks.i.attn.q / attn.kv (not a fused qkv), blocks.i.dge.router.gate,
    blocks.i.dge.splits, cls_token and a class-token position first, inside {"model": ...}."""
    source, _ = _pair("deit")
    for p in source.parameters():
        p.data.normal_()
    ours = source.state_dict()
    c = source.conv_proj.out_channels
    theirs = {"cls_token": torch.zeros(1, 1, c), "norm.weight": torch.ones(c), "head.weight": torch.zeros(1000, c),
              "pos_embed": torch.cat([torch.zeros(1, 1, c), ours["pos_embedding"]], 1),
              "patch_embed.proj.weight": ours["conv_proj.weight"], "patch_embed.proj.bias": ours["conv_proj.bias"]}
    names = {"ln_1": "norm1", "ln_2": "norm2", "mlp.0": "mlp.fc1", "mlp.3": "mlp.fc2",
             "self_attention.out_proj": "attn.proj", "router.gate": "dge.router.gate"}
    for key, value in ours.items():
        if not key.startswith("layers."):
            continue
        _, layer, rest = key.split(".", 2)
        i = layer.removeprefix("encoder_layer_")
        if rest.startswith("self_attention.in_proj_"):
            kind = rest.removeprefix("self_attention.in_proj_")
            theirs[f"blocks.{i}.attn.q.{kind}"], theirs[f"blocks.{i}.attn.kv.{kind}"] = value[:c], value[c:]
            continue
        prefix = next(p for p in names if rest.startswith(p))
        theirs[f"blocks.{i}.{names[prefix]}{rest[len(prefix):]}"] = value
        theirs[f"blocks.{i}.dge.splits"] = torch.tensor([4, 2, 1])
    torch.save({"model": theirs, "epoch": 299}, tmp_path / "deit_dge.pth")
    # as a config's model.backbone.pretrained does: the routers exist before the file loads
    loaded = DGEViTBackbone("deit_t_dge", pretrained=str(tmp_path / "deit_dge.pth"), out_channels=32).state_dict()
    for key, value in ours.items():
        if not key.startswith(("rescale.", "project.")):
            torch.testing.assert_close(loaded[key], value, msg=key)
