import torch
from torchvision.ops import box_convert

from detr_sparse.matcher import HungarianMatcher


def _random_case(bs=3, nq=10, k=5, seed=0, sizes=(2, 0, 4)):
    g = torch.Generator().manual_seed(seed)
    outputs = {"pred_logits": torch.randn(bs, nq, k + 1, generator=g),
               "pred_boxes": torch.rand(bs, nq, 4, generator=g) * 0.5 + 0.25}
    targets = [{"labels": torch.randint(0, k, (n,), generator=g),
                "boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.25} for n in sizes]
    return outputs, targets


def test_batched_equals_per_image():
    matcher = HungarianMatcher()
    outputs, targets = _random_case()
    batched = matcher(outputs, targets)
    for i, t in enumerate(targets):
        single = matcher({k: v[i:i + 1] for k, v in outputs.items()}, [t])[0]
        assert torch.equal(batched[i][0], single[0]) and torch.equal(batched[i][1], single[1])


def test_empty_targets_give_empty_matches():
    matcher = HungarianMatcher()
    outputs, targets = _random_case(sizes=(0, 0, 0))
    for q, t in matcher(outputs, targets):
        assert q.numel() == 0 and t.numel() == 0 and q.dtype == torch.int64


def test_each_target_matched_once_to_its_obvious_query():
    matcher = HungarianMatcher()
    boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.3]])
    pred_boxes = torch.tensor([[[0.5, 0.5, 0.1, 0.1], [0.7, 0.7, 0.2, 0.3], [0.2, 0.2, 0.1, 0.1]]])
    logits = torch.zeros(1, 3, 3)
    q, t = matcher({"pred_logits": logits, "pred_boxes": pred_boxes},
                   [{"labels": torch.tensor([0, 1]), "boxes": boxes}])[0]
    assert dict(zip(t.tolist(), q.tolist())) == {0: 2, 1: 1}


def test_degenerate_and_nan_predictions_do_not_crash():
    matcher = HungarianMatcher()
    outputs, targets = _random_case(sizes=(3, 1, 2))
    outputs["pred_boxes"][0, :, 2:] = 0  # zero-area boxes
    outputs["pred_boxes"][1, 0] = float("nan")
    indices = matcher(outputs, targets)
    assert [len(q) for q, _ in indices] == [3, 1, 2]
    assert 0 not in indices[1][0].tolist()  # the NaN query loses the assignment


def test_focal_cost_prefers_confident_query():
    matcher = HungarianMatcher(cost_bbox=0, cost_giou=0, focal=True)
    logits = torch.tensor([[[-5.0, -5.0], [5.0, -5.0]]])
    q, _ = matcher({"pred_logits": logits, "pred_boxes": torch.rand(1, 2, 4)},
                   [{"labels": torch.tensor([0]), "boxes": box_convert(torch.tensor([[0.1, 0.1, 0.3, 0.3]]), "xyxy", "cxcywh")}])[0]
    assert q.tolist() == [1]
