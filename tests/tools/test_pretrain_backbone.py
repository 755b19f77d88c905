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


def test_crop_pretraining_writes_loadable_torchvision_weights(tiny_coco, tmp_path):
    out = tmp_path / "backbone.pth"
    opts = tiny_overrides(tiny_coco, tmp_path)
    pretrain_backbone.main(["--config", str(REPO / "configs/detr_r50.yaml"), "--out", str(out), "--task", "crops",
                            "--epochs", "1", "--batch", "4", "--crop-size", "32", "--opts", *opts])
    backbone = ResNetBackbone("resnet18", norm="gn", out_features=("res5",), pretrained=str(out))
    assert backbone(torch.randn(1, 3, 64, 64))["res5"].shape == (1, 512, 2, 2)

