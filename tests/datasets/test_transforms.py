import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD, RandomSizeCrop, build_transforms, per_box_fields

# Three non-overlapping rectangles (x0, y0, x1, y1), each painted in its own primary colour,
# so after any geometry the colour under a mask tells which instance the mask belongs to.
RECTS = [(2, 4, 30, 20), (36, 8, 62, 40), (10, 30, 28, 58)]
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def make_sample(height=60, width=64, rects=RECTS):
    image = torch.full((3, height, width), 128, dtype=torch.uint8)
    masks = torch.zeros((len(rects), height, width), dtype=torch.uint8)
    for i, (x0, y0, x1, y1) in enumerate(rects):
        image[:, y0:y1, x0:x1] = torch.tensor(COLOURS[i % 3], dtype=torch.uint8)[:, None, None]
        masks[i, y0:y1, x0:x1] = 1
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor(rects, dtype=torch.float32), format="XYXY",
                                          canvas_size=(height, width)),
        "masks": tv_tensors.Mask(masks),
        "labels": torch.arange(len(rects)) % 3,
        "iscrowd": torch.zeros(len(rects), dtype=torch.int64),
        "image_id": 7,
        "orig_size": torch.tensor([height, width]),
    }
    return tv_tensors.Image(image), target


def mask_box(mask):
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()


def unnormalise(image):
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return image * std + mean


def test_boxes_masks_labels_stay_aligned_through_train_recipe(make_data_cfg):
    # COCO-like proportions: the final resize enlarges a crop by at most 64 / 40 = 1.6.
    cfg = make_data_cfg(train_scales=[48, 56, 64], crop_resize_scales=[56, 64], crop_size=[40, 60], max_size=100)
    transform = build_transforms(True, cfg)
    counts, sizes = set(), set()
    for seed in range(60):
        torch.manual_seed(seed)
        image, target = transform(*make_sample())
        boxes, masks, labels = target["boxes"], target["masks"], target["labels"]
        assert image.dtype == torch.float32
        assert masks.shape[-2:] == image.shape[-2:] == boxes.canvas_size
        assert len(boxes) == len(masks) == len(labels) == len(target["iscrowd"])
        counts.add(len(boxes))
        sizes.add(tuple(image.shape[-2:]))
        colours = unnormalise(image)
        for box, mask, label in zip(boxes, masks, labels):
            w, h = (box[2] - box[0]).item(), (box[3] - box[1]).item()
            assert w >= 1 and h >= 1  # sanitised
            if mask.sum() == 0:
                assert min(w, h) < 2.5  # a sliver lost to nearest-neighbour resizing
                continue
            # Nearest-neighbour mask resizing rounds by < 1 px per resize, and the second
            # resize magnifies the first one's rounding by <= 1.6, so at most 2.6 px apart.
            assert torch.allclose(mask_box(mask), box, atol=2.6), (seed, mask_box(mask), box)
            if mask.sum() >= 16:
                mean_colour = colours[:, mask.bool()].mean(1)
                assert mean_colour.argmax().item() == label.item(), (seed, mean_colour, label)
    # The recipe really did vary the size; instances cut by a crop are clamped, not dropped
    # (an edge-touching box a float epsilon past the canvas once lost its whole instance).
    assert len(sizes) > 3 and counts == {3}


def test_flip_mirrors_boxes_and_masks(make_data_cfg):
    cfg = make_data_cfg(flip_prob=1.0, random_crop=False, train_scales=[60], max_size=1000)
    image, target = build_transforms(True, cfg)(*make_sample())
    assert image.shape == (3, 60, 64)  # the resize is the identity at this scale
    expected = torch.tensor([[64 - x1, y0, 64 - x0, y1] for x0, y0, x1, y1 in RECTS], dtype=torch.float32)
    assert torch.equal(target["boxes"].as_subclass(torch.Tensor), expected)
    assert torch.equal(target["masks"], make_sample()[1]["masks"].flip(-1))


def test_train_respects_max_size(make_data_cfg):
    cfg = make_data_cfg(train_scales=[64, 80], crop_resize_scales=[64], crop_size=[40, 200], max_size=100)
    transform = build_transforms(True, cfg)
    rects = [(5, 5, 100, 35)]
    for seed in range(20):
        torch.manual_seed(seed)
        image, target = transform(*make_sample(height=40, width=120, rects=rects))
        assert max(image.shape[-2:]) <= 100


def test_val_resizes_shorter_side_and_caps_longer(make_data_cfg):
    transform = build_transforms(False, make_data_cfg(val_size=32, max_size=100))
    image, target = transform(*make_sample(height=48, width=64))
    assert image.shape == (3, 32, 42)
    assert target["masks"].shape == (3, 32, 42)
    assert torch.allclose(target["boxes"][0], torch.tensor([2, 4, 30, 20]) * torch.tensor([42 / 64, 32 / 48] * 2))
    image, _ = build_transforms(False, make_data_cfg(val_size=64, max_size=100))(
        *make_sample(height=40, width=120, rects=[(5, 5, 100, 35)]))
    assert image.shape[-1] == 100 and image.shape[-2] < 64
    # A shorter-side target at or above max_size: the longer-side cap alone decides.
    image, _ = build_transforms(False, make_data_cfg(val_size=64, max_size=60))(*make_sample(height=48, width=64))
    assert image.shape[-2:] == (45, 60)


def test_val_normalises_with_imagenet_statistics(make_data_cfg):
    image, _ = build_transforms(False, make_data_cfg(val_size=60))(*make_sample())
    # A grey (128) background pixel far from the rectangles.
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(image[:, 0, 63], expected, atol=1e-4)


def test_random_size_crop_sizes_within_bounds_and_image():
    crop = RandomSizeCrop(24, 48)
    seen = set()
    for seed in range(100):
        torch.manual_seed(seed)
        out = crop(tv_tensors.Image(torch.zeros(3, 50, 70)))
        h, w = out.shape[-2:]
        assert 24 <= h <= 48 and 24 <= w <= 48
        seen.add((h, w))
    assert len(seen) > 20
    # An image below the minimum is kept whole rather than padded.
    assert crop(tv_tensors.Image(torch.zeros(3, 16, 20))).shape[-2:] == (16, 20)


def test_random_size_crop_moves_boxes_with_window():
    image, target = make_sample()
    torch.manual_seed(0)
    out_image, out_target = RandomSizeCrop(30, 30)(image, target)
    params = None
    # Recover the window from the image itself: the crop must equal a slice of the input.
    for top in range(0, 31):
        for left in range(0, 35):
            if torch.equal(image[:, top:top + 30, left:left + 30], out_image) and \
                    torch.equal(target["masks"][:, top:top + 30, left:left + 30], out_target["masks"]):
                params = (top, left)
                break
        if params:
            break
    assert params is not None
    top, left = params
    shifted = target["boxes"] - torch.tensor([left, top, left, top])
    assert torch.equal(out_target["boxes"].as_subclass(torch.Tensor), shifted.clamp(0, 30).as_subclass(torch.Tensor))


def test_sanitize_keeps_per_box_fields_aligned():
    image, target = make_sample()
    target["area"] = torch.tensor([10.0, 20.0, 30.0])
    target["iscrowd"] = torch.tensor([0, 1, 0])
    # Make the middle box degenerate.
    target["boxes"] = tv_tensors.wrap(target["boxes"].clone(), like=target["boxes"])
    target["boxes"][1, 2] = target["boxes"][1, 0]
    _, out = v2.SanitizeBoundingBoxes(labels_getter=per_box_fields)(image, target)
    assert out["labels"].tolist() == [0, 2]
    assert out["area"].tolist() == [10.0, 30.0]
    assert out["iscrowd"].tolist() == [0, 0]
    assert out["masks"].shape[0] == 2 and torch.equal(out["masks"][1], target["masks"][2])
