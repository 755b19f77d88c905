"""SViT backbones: DeiT whose last three quarters of blocks are gated (detr_sparse.sparsity.svit),
with ViTDet's simple pyramid (`deit_s_svit`) or the ViT-Adapter (`deit_s_adapter_svit`, the
paper's), and the keep-ratio loss that holds each gated block near its target share.

Dense weights load as for the dense backbone (a DeiT, or a whole dense detector through
`model.weights`, the paper's second step); the gates start fresh. Training returns the
ratio loss with each gated block's realised keep share; evaluation gathers each image's kept
tokens, and `token_usage` tells how many gated blocks each token went through.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from ..sparsity.svit import SelectGate, forced_keep, keep_decisions, keep_ratio_loss, keep_targets, svit_update
from .vit import ViTBackbone
from .vit_adapter import ViTAdapterBackbone


class SViTGates:
    """What the SViT backbones share: a gate on each gated block, the gated block loop, the
    ratio loss. ratio_weight: lambda (4); per_image: the share per image (the paper's
    fixed-rate baseline) instead of over the batch; stochastic_eval: sample the gates in
    evaluation as the authors' released code does (by mistake), for comparison;
    eval_at_targets: in evaluation every gated block keeps its target share of each image's
    tokens, the best by its gate (a fixed budget, for gates whose keep probabilities sit near
    their targets for every token, which the deterministic threshold turns into all or none).
    `forced`: the same in training and evaluation, for benchmarks on random weights."""

    def setup_svit(self, dim: int, ratio_weight: float = 4.0, per_image: bool = False, stochastic_eval: bool = False,
                   eval_at_targets: bool = False) -> None:
        self.gated, self.targets = keep_targets(len(self.layers))
        for i in self.gated:
            self.layers[i].gate = SelectGate(dim)
        self.ratio_weight, self.per_image, self.stochastic_eval = ratio_weight, per_image, stochastic_eval
        self.eval_at_targets = eval_at_targets
        self.forced = False
        self.keeps: list[Tensor] = []  # the last pass's decisions (B, N) per gated block
        self.token_valid: Tensor | None = None
        self.grid: tuple[int, int] = (0, 0)

    def run_blocks(self, tokens: Tensor, grid: tuple[int, int], keep: Tensor | None,
                   key_mask: Tensor | None, start: int = 0, stop: int | None = None) -> Tensor:
        layers = list(self.layers)
        if start == 0:
            self.keeps, self.token_valid, self.grid = [], keep, grid
        for i, block in enumerate(layers[start:stop], start):
            if hasattr(block, "gate"):
                log_probs = block.gate(tokens)
                at_targets = self.forced or (self.eval_at_targets and not self.training)
                decision = forced_keep(log_probs, keep, self.targets[self.gated.index(i)]) if at_targets else \
                    keep_decisions(log_probs, keep, self.training, self.stochastic_eval)
                self.keeps.append(decision)
                tokens = svit_update(block, tokens, decision, key_mask)
            else:
                tokens = block(tokens, key_mask)
        return tokens

    def keep_shares(self) -> tuple[Tensor, Tensor]:
        """The last pass's ratio loss (unweighted) and each gated block's keep share (L,)."""
        return keep_ratio_loss(self.keeps, self.token_valid, self.targets, self.per_image)

    def image_keep_shares(self) -> Tensor:
        """The last pass's keep share of each image's tokens per gated block, (L, B)."""
        keeps = torch.stack(self.keeps)
        count = keeps.shape[2] if self.token_valid is None else self.token_valid.sum(1)
        return keeps.sum(2) / count

    def token_usage(self) -> Tensor:
        """The last pass's count of gated blocks each token went through, (B, h, w) on the
        stride-16 grid, -1 outside the images."""
        usage = torch.stack(self.keeps).sum(0).view(-1, *self.grid)
        return usage if self.token_valid is None else usage.masked_fill(~self.token_valid.view_as(usage), -1)

    def forward_with_losses(self, x: Tensor, targets: list[dict], sizes: list[tuple[int, int]] | None = None
                            ) -> tuple["OrderedDict[str, Tensor]", dict[str, Tensor]]:
        """Training: the maps and {"loss_keep_ratio": lambda * ratio loss, "svit_keep" the mean
        keep share, "svit_keep{i}" block i's}."""
        maps = self.forward(x, sizes)
        loss, shares = self.keep_shares()
        stats = {f"svit_keep{i}": share for i, share in zip(self.gated, shares)}
        stats["svit_keep"] = shares.mean()
        stats["loss_keep_ratio"] = self.ratio_weight * loss
        return maps, stats

    def fresh(self, key: str) -> bool:
        """The gates are new, beside what the dense backbone does not load."""
        return ".gate." in key or super().fresh(key)


class SViTBackbone(SViTGates, ViTBackbone):
    """DeiT with SViT gates and the simple pyramid (settings: SViTGates)."""

    def __init__(self, name: str = "deit_s_svit", out_features=("res2", "res3", "res4", "res5"), pretrained: str = "",
                 drop_path_rate: float = 0.1, out_channels: int = 256, freeze_at: int = -1,
                 **gates):
        super().__init__(name.removesuffix("_svit"), out_features, "", drop_path_rate, out_channels, freeze_at)
        self.setup_svit(self.conv_proj.out_channels, **gates)
        if pretrained:
            self.load_pretrained(pretrained)


class SViTAdapterBackbone(SViTGates, ViTAdapterBackbone):
    """DeiT with SViT gates and the ViT-Adapter, whose interactions stay dense (settings:
    SViTGates)."""

    def __init__(self, name: str = "deit_s_adapter_svit", out_features=("res2", "res3", "res4", "res5"),
                 pretrained: str = "", drop_path_rate: float = 0.1, freeze_at: int = -1,
                 **gates):
        super().__init__(name.removesuffix("_svit"), out_features, "", drop_path_rate, freeze_at)
        self.setup_svit(self.conv_proj.out_channels, **gates)
        if pretrained:
            self.load_pretrained(pretrained)

