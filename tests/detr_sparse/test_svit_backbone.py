"""The SViT backbones (simple pyramid and ViT-Adapter) and the dense ViT-Adapter: dense
parity with every gate keeping, padded batch = each image alone, deterministic evaluation,
the adapter's outputs on odd sizes, the ratio loss and statistics in training, the builder."""
import pytest
import torch
from omegaconf import OmegaConf

from detr_sparse.backbones import build_backbone
from detr_sparse.backbones.svit import SViTAdapterBackbone, SViTBackbone
from detr_sparse.backbones.vit import ViTBackbone
from detr_sparse.backbones.vit_adapter import ViTAdapterBackbone
from engine.config import BackboneConfig

PAIRS = {"pyramid": (lambda: ViTBackbone("deit_t", drop_path_rate=0.0),
                     lambda: SViTBackbone("deit_t_svit", drop_path_rate=0.0)),
         "adapter": (lambda: ViTAdapterBackbone("deit_t_adapter", drop_path_rate=0.0, init_values=0.5),
                     lambda: SViTAdapterBackbone("deit_t_adapter_svit", drop_path_rate=0.0))}


def _pair(kind: str):
    torch.manual_seed(0)
    dense, sparse = (make().eval() for make in PAIRS[kind])
    missing, unexpected = sparse.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and all(".gate." in k for k in missing)
    return dense, sparse


def _force(backbone, keep: bool) -> None:
    for i in backbone.gated:
        last = backbone.layers[i].gate.net[-1]
        torch.nn.init.zeros_(last.weight)
        last.bias.data = torch.tensor([10.0, -10.0] if keep else [-10.0, 10.0])


@pytest.mark.parametrize("kind", ["pyramid", "adapter"])
def test_every_gate_keeping_is_the_dense_backbone(kind):
    dense, sparse = _pair(kind)
    _force(sparse, keep=True)
    x = torch.randn(1, 3, 75, 101)
    with torch.no_grad():
        a, b = dense(x), sparse(x)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-5)
    usage = sparse.token_usage()
    assert (usage[usage >= 0] == len(sparse.gated)).all()


def test_pruning_every_token_leaves_the_map_of_the_first_dense_blocks():
    dense, sparse = _pair("pyramid")
    _force(sparse, keep=False)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        tokens, grid, keep, key_mask = dense.embed(x, [(64, 96)])
        expected = dense.run_blocks(tokens, grid, keep, key_mask, 0, sparse.gated[0])
        assert torch.equal(sparse.run_blocks(tokens, grid, keep, key_mask), expected)
    assert (sparse.token_usage() == 0).all()


@pytest.mark.parametrize("kind", ["pyramid", "adapter"])
def test_a_padded_batch_equals_each_image_alone_and_evaluation_is_deterministic(kind):
    _, sparse = _pair(kind)
    torch.manual_seed(1)
    alone = torch.randn(1, 3, 75, 101)
    batch = torch.zeros(2, 3, 100, 150)
    batch[0, :, :75, :101] = alone[0]
    batch[1] = torch.randn(3, 100, 150)
    with torch.no_grad():
        one, again = sparse(alone), sparse(alone)
        usage = sparse.token_usage()
        both = sparse(batch, sizes=[(75, 101), (100, 150)])
    assert 0 < usage.float().mean() < len(sparse.gated)  # random gates prune some tokens
    for name in one:
        assert torch.equal(one[name], again[name])
        h, w = one[name].shape[-2:]
        torch.testing.assert_close(both[name][0, :, :h, :w], one[name][0], atol=1e-4, rtol=1e-4)
    # padding tokens are never kept
    padded = sparse.token_usage()[0]
    assert (padded[usage.shape[1]:] == -1).all() and (padded[:, usage.shape[2]:] == -1).all()


@pytest.mark.parametrize("height,width", [(75, 101), (64, 96)])
def test_adapter_outputs_match_stated_channels_and_strides(height, width):
    torch.manual_seed(0)
    backbone = ViTAdapterBackbone("deit_t_adapter", out_features=("res2", "res3", "res4", "res5")).eval()
    assert not backbone.is_pyramid
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, height, width))
    for name, shape in backbone.output_shape().items():
        assert shape["channels"] == 192
        assert out[name].shape == (2, 192, -(-height // shape["stride"]), -(-width // shape["stride"]))
        assert out[name].isfinite().all()


def test_training_returns_the_weighted_ratio_loss_and_per_block_shares():
    _, sparse = _pair("adapter")
    sparse.train()
    torch.manual_seed(2)
    maps, stats = sparse.forward_with_losses(torch.randn(2, 3, 64, 96), [{}, {}])
    assert set(stats) == {"loss_keep_ratio", "svit_keep"} | {f"svit_keep{i}" for i in range(3, 12)}
    loss, shares = sparse.keep_shares()
    torch.testing.assert_close(stats["loss_keep_ratio"], 4.0 * loss)
    (stats["loss_keep_ratio"] + sum(m.mean() for m in maps.values())).backward()
    gate = sparse.layers[3].gate.net[1].weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0


def test_builder_makes_each_variant_with_its_settings():
    names = {"deit_t_svit": SViTBackbone, "deit_t_adapter_svit": SViTAdapterBackbone,
             "deit_t_adapter": ViTAdapterBackbone}
    for name, cls in names.items():
        cfg = OmegaConf.merge(OmegaConf.structured(BackboneConfig),
                              {"name": name, "svit": {"ratio_weight": 2.0, "stochastic_eval": True,
                                                      "eval_at_targets": True}})
        backbone = build_backbone(cfg, ("res3", "res4"))
        assert type(backbone) is cls and list(backbone.output_shape()) == ["res3", "res4"]
        if cls is not ViTAdapterBackbone:
            assert backbone.ratio_weight == 2.0 and backbone.stochastic_eval and backbone.gated == list(range(3, 12))
            assert backbone.eval_at_targets


def test_evaluation_at_the_targets_keeps_each_blocks_share_of_gates_that_sit_near_it():
    _, sparse = _pair("pyramid")
    for i, target in zip(sparse.gated, sparse.targets):  # every token's keep probability ~ its target, as trained
        last = sparse.layers[i].gate.net[-1]
        torch.nn.init.normal_(last.weight, std=1e-3)
        last.bias.data = torch.tensor([0.5 * torch.logit(torch.tensor(target)), -0.5 * torch.logit(torch.tensor(target))])
    x = torch.randn(1, 3, 160, 224)
    with torch.no_grad():
        sparse(x)
        threshold = sparse.keep_shares()[1]
        sparse.eval_at_targets = True
        sparse(x)
        at_targets = sparse.keep_shares()[1]
    assert threshold.tolist() == [1.0] * 3 + [0.0] * 6  # 0.7 passes 0.5 everywhere, 0.49 and 0.343 nowhere
    tokens = 10 * 14
    assert at_targets.tolist() == pytest.approx([(int(tokens * t) + 1) / tokens for t in sparse.targets])
    sparse.train()
    sparse(x)  # training samples its gates whatever the setting
    assert 0 < sparse.keep_shares()[1].mean() < 1


def test_a_pretrained_adapter_loads_with_its_vit_and_a_plain_deit_leaves_the_adapter_fresh(tmp_path):
    torch.manual_seed(0)
    pretrained = ViTAdapterBackbone("deit_mini_adapter")
    saved = {k: v for k, v in pretrained.state_dict().items() if pretrained.learnt_in_pretraining(k)}
    assert any(k.startswith("spm.") for k in saved) and any(k.startswith("layers.") for k in saved)
    torch.save(saved, tmp_path / "adapter.pth")
    sparse = SViTAdapterBackbone("deit_mini_adapter_svit", pretrained=str(tmp_path / "adapter.pth"))
    mine = sparse.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in saved.items())
    assert sparse.gated == [1, 2, 3]
    # a classification checkpoint (ViT only): the adapter keeps its initialisation
    torch.save({k: v for k, v in saved.items() if not pretrained.fresh(k)}, tmp_path / "vit.pth")
    torch.manual_seed(1)
    plain = ViTAdapterBackbone("deit_mini_adapter", pretrained=str(tmp_path / "vit.pth"))
    assert torch.equal(plain.state_dict()["layers.encoder_layer_0.ln_1.weight"],
                       saved["layers.encoder_layer_0.ln_1.weight"])
    assert not torch.equal(plain.state_dict()["spm.project.0.weight"], saved["spm.project.0.weight"])


def test_without_res5_every_adapter_parameter_gets_a_gradient_and_a_four_map_pretraining_loads(tmp_path):
    # an unused parameter would stop DDP; a pretraining that built all four maps still loads
    four = ViTAdapterBackbone("deit_mini_adapter")
    with torch.no_grad():
        four.norms[0].weight.uniform_(0.5, 1.5)  # a trained norm, not the default ones
    torch.save({k: v for k, v in four.state_dict().items() if four.learnt_in_pretraining(k)}, tmp_path / "a.pth")
    three = ViTAdapterBackbone("deit_mini_adapter", out_features=("res2", "res3", "res4"),
                               pretrained=str(tmp_path / "a.pth"))
    torch.testing.assert_close(three.norms[0].weight, four.norms[0].weight)
    out = three(torch.randn(1, 3, 64, 96))
    assert list(out) == ["res2", "res3", "res4"]
    sum(o.sum() for o in out.values()).backward()
    assert [n for n, p in three.named_parameters() if p.grad is None] == []
