"""PnP-DETR (Wang et al. 2021): DETR whose transformer reads a poll-and-pool sample of the
projected backbone map: the best-scored share `poll_ratio` of each image's tokens as fine
tokens, the rest pooled into M coarse tokens. Trained at a fixed ratio or at a ratio drawn
per iteration, it runs at any ratio (`model.poll_ratio = 0.5`). Same detector contract as
DETR; eval outputs can carry the computation density map (`forward_raw(...)["sampled"]`)."""
from __future__ import annotations

import random

import torch

from .detr import DETR, build_detr, normalized_targets
from .image_batch import ImageBatch
from .sparsity.pnp import PollAndPool, SampledTokens, score_regulariser
from .sparsity.tokens import keep_statistics


class PnPDETR(DETR):
    parts = {**DETR.parts, "sampler": "sampler"}

    def __init__(self, *args, poll_ratio: float = 0.33, random_ratio=(), num_coarse: int = 30,
                 score_loss_weight: float = 1e-4, **kwargs):
        super().__init__(*args, **kwargs)
        if random_ratio and not (len(random_ratio) == 2 and 0 < random_ratio[0] <= random_ratio[1] <= 1):
            raise ValueError(f"model.pnp.random_ratio must be [min, max] in (0, 1], got {list(random_ratio)}")
        self.sampler = PollAndPool(self.transformer.d_model, num_coarse)
        self.poll_ratio, self.random_ratio = poll_ratio, tuple(random_ratio)
        self.score_loss_weight = score_loss_weight

    def ratio(self) -> float:
        """The poll ratio of this forward pass: drawn per training iteration when a range is
        configured (from Python's RNG, which checkpoints restore), else poll_ratio."""
        if self.training and self.random_ratio:
            return random.uniform(*self.random_ratio)
        return self.poll_ratio

    def sample(self, images: ImageBatch) -> SampledTokens:
        src, mask, pos = self.feature_map(images)
        return self.sampler(src.flatten(2).transpose(1, 2), mask.flatten(1), pos.flatten(2).transpose(1, 2),
                            self.ratio(), tuple(src.shape[-2:]))

    def token_maps(self, out: dict) -> dict:
        """For pictures, from forward_raw's outputs: {"maps": {"poll score", "density"} (B, N),
        "valid", "shapes" (one level), "starts"}."""
        s: SampledTokens = out["sampled"]
        h, w = s.map_shape
        return {"maps": {"poll score": s.scores, "density": s.density()}, "valid": ~s.map_mask,
                "shapes": torch.tensor([[h, w]]), "starts": torch.tensor([0])}

    def forward_raw(self, images: ImageBatch) -> dict:
        sampled = self.sample(images)
        hs, memory = self.transformer(sampled.src, sampled.mask, self.query_embed.weight, sampled.pos)
        return {**self.predictions(hs), "sampled": sampled, "memory": memory}

    def forward(self, images: ImageBatch, targets: list[dict] | None = None):
        if not self.training:
            return super().forward(images)
        if targets is None:
            raise ValueError("PnP-DETR in training mode needs targets")
        out = self.forward_raw(images)
        losses = self.criterion(out, normalized_targets(targets, images.sizes))
        sampled: SampledTokens = out["sampled"]
        losses["loss_poll_score"] = self.score_loss_weight * score_regulariser(sampled)
        return {**losses, **keep_statistics(sampled.polled, sampled.map_mask, prefix="poll_ratio")}


def build_pnp_detr(cfg, num_classes: int) -> PnPDETR:
    """model.name "pnp_detr": DETR with model.pnp settings."""
    p = cfg.pnp
    return build_detr(cfg, num_classes, model_cls=PnPDETR, poll_ratio=p.poll_ratio,
                      random_ratio=tuple(p.random_ratio), num_coarse=p.num_coarse,
                      score_loss_weight=p.score_loss_weight)
