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
