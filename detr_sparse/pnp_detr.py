"""PnP-DETR (Wang et al. 2021): DETR whose transformer reads a poll-and-pool sample of the
projected backbone map: the best-scored share `poll_ratio` of each image's tokens as fine
tokens, the rest pooled into M coarse tokens. Trained at a fixed ratio or at a ratio drawn
per iteration, it runs at any ratio (`model.poll_ratio = 0.5`). Same detector contract as
DETR; eval outputs can carry the computation density map (`forward_raw(...)["sampled"]`).
DETR's panoptic branch reads the encoder memory through the reverse projection."""
from __future__ import annotations

import logging
import random

import torch
from torch import Tensor

from .detr import DETR, build_detr
from .image_batch import ImageBatch
from .sparsity.pnp import PollAndPool, SampledTokens, reverse_project, score_regulariser
from .sparsity.tokens import box_shares, keep_statistics, kept_in_boxes

log = logging.getLogger(__name__)


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

    def token_maps(self, out: dict) -> dict:
        """For pictures, from forward_raw's outputs: {"maps": {"poll score", "density"} (B, N),
        "kept" (the polled tokens), "valid", "shapes" (one level), "starts"}."""
        s: SampledTokens = out["sampled"]
        h, w = s.map_shape
        return {"maps": {"poll score": s.scores, "density": s.density()},
                "kept": s.polled.dense(s.scores.shape[1]), "valid": ~s.map_mask,
                "shapes": torch.tensor([[h, w]]), "starts": torch.tensor([0])}

    def run_transformer(self, src: Tensor, mask: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, dict]:
        """DETR's, on the poll-and-pool sample of the map; extra output "sampled"."""
        sampled = self.sampler(src.flatten(2).transpose(1, 2), mask.flatten(1), pos.flatten(2).transpose(1, 2),
                               self.ratio(), tuple(src.shape[-2:]))
        hs, memory = self.transformer(sampled.src, sampled.mask, self.query_embed.weight, sampled.pos)
        return hs, memory, {"sampled": sampled}

    def memory_map(self, memory: Tensor, out: dict, shape) -> Tensor:
        """The memory of fine + coarse tokens, reverse-projected onto the map."""
        return reverse_project(memory, out["sampled"]).transpose(1, 2).reshape(shape)

    def forward(self, images: ImageBatch, targets: list[dict] | None = None):
        if not self.training:
            return super().forward(images)
        out = self.forward_raw(images)
        losses = self.losses(out, images, targets)
        sampled: SampledTokens = out["sampled"]
        losses["loss_poll_score"] = self.score_loss_weight * score_regulariser(sampled)
        # the polled tokens straight from the sample: token_maps would also build the density map
        where = kept_in_boxes(sampled.polled.dense(sampled.scores.shape[1]), ~sampled.map_mask,
                              torch.tensor([sampled.map_shape]), targets,
                              tuple(images.tensors.shape[-2:]), getattr(self, "is_thing", None))
        return {**losses, **keep_statistics(sampled.polled, sampled.map_mask, prefix="poll_ratio"),
                **box_shares(where, "poll")}


def build_pnp_detr(cfg, num_classes: int, is_thing: list[bool] | None = None) -> PnPDETR:
    """model.name "pnp_detr": DETR with model.pnp settings."""
    p = cfg.pnp
    if cfg.transformer.pre_norm:
        # measured on the synthetic set: the poll scores then ignore or even avoid the objects
        log.warning("model.transformer.pre_norm with pnp_detr: the encoder's first LayerNorm "
                    "cancels the poll score that multiplies each fine token, so the score network "
                    "barely learns; PnP-DETR is built on DETR's post-norm transformer")
    return build_detr(cfg, num_classes, is_thing, model_cls=PnPDETR, poll_ratio=p.poll_ratio,
                      random_ratio=tuple(p.random_ratio), num_coarse=p.num_coarse,
                      score_loss_weight=p.score_loss_weight)
