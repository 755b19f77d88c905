"""ImageBatch under a DataLoader with pin_memory=True (engine/trainer.py make_loader on CUDA)."""
import torch
from torch.utils.data._utils.pin_memory import pin_memory

from datasets import collate_fn
from detr_sparse.image_batch import ImageBatch


def test_a_pinning_loader_pins_the_image_batch(monkeypatch):
    """DataLoader pins what it knows (tensors, dicts, lists) and whatever has a pin_memory
    method; anything else stays pageable, and its non_blocking copy to the GPU is a
    synchronous one. Pinning is recorded here (it needs a GPU)."""
    pinned = []

    def record(self, *args, **kwargs):
        pinned.append(self)
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", record)
    batch = collate_fn([(torch.randn(3, 8, 10), {"boxes": torch.zeros(0, 4)}),
                        (torch.randn(3, 6, 12), {"boxes": torch.ones(1, 4)})])
    images, targets = pin_memory(batch)
    assert isinstance(images, ImageBatch)
    for tensor in (images.tensors, images.mask, images.sizes, *(t["boxes"] for t in targets)):
        assert any(tensor is p for p in pinned)
