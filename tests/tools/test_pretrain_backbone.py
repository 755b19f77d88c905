import torch

from detr_sparse.backbones.resnet import ResNetBackbone
from helpers import REPO, tiny_overrides
from tools import pretrain_backbone


def test_dense_labels_smallest_box_wins_and_padding_is_ignored():
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 64.0, 64.0], [16.0, 16.0, 32.0, 32.0]]),
                "labels": torch.tensor([1, 2])}]
    mask = torch.zeros(1, 64, 80, dtype=torch.bool)
    mask[:, :, 64:] = True  # the last 16 columns are padding
    labels = pretrain_backbone.dense_labels(targets, mask, (4, 5), 16, num_classes=3)
    expected = torch.tensor([[1, 1, 1, 1, -100],
                             [1, 2, 1, 1, -100],
                             [1, 1, 1, 1, -100],
                             [1, 1, 1, 1, -100]])
    assert torch.equal(labels[0], expected)


def test_a_frozen_bn_config_pretrains_batch_norm_and_loads_its_statistics(tiny_coco, tmp_path):
    out = tmp_path / "backbone.pth"
    opts = tiny_overrides(tiny_coco, tmp_path) + ["model.backbone.norm=frozen_bn", "model.backbone.freeze_at=4"]
    pretrain_backbone.main(["--config", str(REPO / "configs/detr_r50.yaml"), "--out", str(out),
                            "--epochs", "1", "--batch", "2", "--opts", *opts])
    before = ResNetBackbone("resnet18", norm="frozen_bn", out_features=("res5",))
    after = ResNetBackbone("resnet18", norm="frozen_bn", out_features=("res5",), pretrained=str(out))
    # batch norm trained (statistics moved off their initial 0 / 1), whatever freeze_at says
    assert not torch.equal(after.stem[1].running_mean, before.stem[1].running_mean)
    assert not torch.equal(after.stages["res5"][0].conv1.weight, before.stages["res5"][0].conv1.weight)


def test_a_pvt_pretrains_and_its_weights_load_into_the_dense_and_the_dge_backbone(tiny_coco, tmp_path):
    from detr_sparse.backbones.dge import DGEPVTBackbone
    from detr_sparse.backbones.pvt import PVTBackbone

    out = tmp_path / "pvt.pth"
    opts = tiny_overrides(tiny_coco, tmp_path) + ["model.backbone.name=pvt_t", "model.backbone.out_features=[res2,res3]"]
    pretrain_backbone.main(["--config", str(REPO / "configs/detr_r50.yaml"), "--out", str(out),
                            "--epochs", "1", "--batch", "2", "--opts", *opts])
    saved = torch.load(out, weights_only=True)
    dense = PVTBackbone("pvt_t", out_features=("res2", "res3"), pretrained=str(out))
    dge = DGEPVTBackbone("pvt_t_dge", out_features=("res2", "res3"), pretrained=str(out))
    for key, value in saved.items():
        assert torch.equal(dense.state_dict()[key], value) and torch.equal(dge.state_dict()[key], value)
    assert abs(dge.stages[0].blocks[0].router.gate.bias.softmax(0)[0].item() - 0.95) < 1e-6


def test_a_dge_pvt_pretrains_with_its_budget_loss_and_its_routers_load(tiny_coco, tmp_path, caplog):
    import logging

    from detr_sparse.backbones.dge import DGEPVTBackbone

    out = tmp_path / "pvt_dge.pth"
    opts = tiny_overrides(tiny_coco, tmp_path) + ["model.backbone.name=pvt_t_dge",
                                                  "model.backbone.out_features=[res2,res3]"]
    with caplog.at_level(logging.INFO, logger="detr_sparse.pretrain"):
        pretrain_backbone.main(["--config", str(REPO / "configs/detr_r50.yaml"), "--out", str(out),
                                "--epochs", "1", "--batch", "2", "--lr", "0.05", "--opts", *opts])
    assert "DGE beta" in caplog.text
    saved = torch.load(out, weights_only=True)
    routers = [k for k in saved if ".router." in k]
    assert len(routers) == 2 * 4  # 2 stages of 2 blocks, weight and bias
    fresh = DGEPVTBackbone("pvt_t_dge", out_features=("res2", "res3"))
    # the budget loss (and the classification loss) moved the routers off their initialisation
    assert any(not torch.equal(saved[k], fresh.state_dict()[k]) for k in routers)
    loaded = DGEPVTBackbone("pvt_t_dge", out_features=("res2", "res3"), pretrained=str(out))
    for key, value in saved.items():
        assert torch.equal(loaded.state_dict()[key], value)
