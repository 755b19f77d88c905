"""A batch of images of different sizes, zero-padded to one tensor, with its padding mask."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ImageBatch:
    """tensors: (B, C, H, W) zero-padded at the bottom/right.
    mask: (B, H, W) bool, True at padded pixels.
    sizes: (B, 2) int64, the unpadded (height, width) of every image."""

    tensors: Tensor
    mask: Tensor
    sizes: Tensor

    @classmethod
    def from_images(cls, images: list[Tensor], size_divisibility: int = 1) -> "ImageBatch":
        if not images:
            raise ValueError("ImageBatch.from_images needs at least one image")
        sizes = torch.tensor([img.shape[-2:] for img in images], dtype=torch.int64)
        h, w = sizes.max(0).values.tolist()
        if size_divisibility > 1:
            h = -(-h // size_divisibility) * size_divisibility
            w = -(-w // size_divisibility) * size_divisibility
        c = images[0].shape[0]
        tensors = images[0].new_zeros((len(images), c, h, w))
        mask = torch.ones((len(images), h, w), dtype=torch.bool)
        for i, img in enumerate(images):
            ih, iw = img.shape[-2:]
            tensors[i, :, :ih, :iw].copy_(img)
            mask[i, :ih, :iw] = False
        return cls(tensors, mask, sizes)

    def to(self, device, non_blocking: bool = False) -> "ImageBatch":
        return ImageBatch(
            self.tensors.to(device, non_blocking=non_blocking),
            self.mask.to(device, non_blocking=non_blocking),
            self.sizes.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> "ImageBatch":
        """In page-locked memory: what DataLoader(pin_memory=True) calls on a batch element
        that has this method (without it, it would leave the images pageable, and `.to(cuda,
        non_blocking=True)` would copy them synchronously)."""
        return ImageBatch(self.tensors.pin_memory(), self.mask.pin_memory(), self.sizes.pin_memory())

    def __len__(self) -> int:
        return self.tensors.shape[0]

    def unpadded(self) -> list[Tensor]:
        """The images without their padding, e.g. for torchvision's two-stage detectors."""
        return [img[:, :h, :w] for img, (h, w) in zip(self.tensors, self.sizes.tolist())]
