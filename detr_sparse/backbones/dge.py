"""DGE backbones: PVT v1 whose every block is a dynamic grained encoder block
(detr_sparse.sparsity.dge), with the budget loss that holds its cost near a target share of
the dense backbone's.

`pvt_s_dge` / `pvt_t_dge` are the dense `pvt_s` / `pvt_t` plus one router per block: dense
ImageNet weights load as for the dense backbone and the routers start fresh (finest
granularity at p = 0.95). Training (`forward_with_losses`) computes the dense form and
returns the budget loss with the realised cost share and granularity shares; evaluation
computes each image's chosen queries only.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from ..sparsity.dge import (GRAIN_NAMES, REGION, SPLITS, GrainRouter, block_macs, dge_update, grain_gates,
                            query_counts, region_validity)
from .pvt import _DIMS, _MLP_RATIOS, _PATCH, _SR_RATIOS, PVTBackbone, PVTStage
from .vit import load_converted_state

BUDGET_SCOPES = ("backbone", "dge_layers")


class DGEPVTBackbone(PVTBackbone):
    """PVT v1 with DGE blocks. forward(x, sizes) as PVTBackbone's; the input is padded to a
    multiple of 128 (32 x S) so that every stage's map divides into 4 x 4-token regions.

    budget: the target cost share gamma; budget_weight: lambda of (beta - gamma)^2;
    budget_scope: beta over the backbone (patch embeddings + blocks, the official code's
    choice) or over the DGE blocks only (the paper's Eq. 7); both are logged. Regions wholly
    in padding cost nothing and count nowhere. `forced`: granularity shares (finest first)
    that replace the routers' choices, for benchmarks on random weights. `sparse_train`:
    train on the chosen queries only instead of the exact dense form."""

    pad_multiple = 32 * REGION
    takes_sizes = True

    def __init__(self, name: str = "pvt_s_dge", *args, budget: float = 0.5, budget_weight: float = 1.0,
                 budget_scope: str = "backbone", sparse_train: bool = False, **kwargs):
        super().__init__(name.removesuffix("_dge"), *args, **kwargs)
        if budget_scope not in BUDGET_SCOPES:
            raise ValueError(f"model.backbone.dge.budget_scope: '{budget_scope}' not in {BUDGET_SCOPES}")
        for i, stage in enumerate(self.stages):
            for block in stage.blocks:
                block.router = GrainRouter(_DIMS[i])
        self.budget, self.budget_weight, self.budget_scope = budget, budget_weight, budget_scope
        self.sparse_train = sparse_train
        self.forced: tuple[float, ...] | None = None
        self.costs: list[dict] = []  # the last forward pass's, per stage
        self.choices: list[Tensor] = []  # the last forward pass's options (B, Hr, Wr) per block, -1 in padding

    def load_pretrained(self, path: str) -> None:
        """A dense PVT v1 state dict; the routers keep their initialisation."""
        wanted = {k for k in self.state_dict() if not k.startswith("norms.") and ".router." not in k}
        load_converted_state(self, path, wanted, self._from_checkpoint, "PVT v1 state dict of the same size")

    def run_stage(self, stage: PVTStage, x: Tensor, valid: list[tuple[int, int]]):
        index = len(self.costs)
        tokens, grid, keep, key_mask = stage.embed(x, valid)
        b, dim = tokens.shape[0], tokens.shape[-1]
        regions = region_validity(keep, grid, b, x.device)
        region_tokens = regions.flatten(1).sum(1).to(tokens.dtype) * REGION ** 2  # (B,)
        in_channels = stage.patch_embed.proj.in_channels
        cost = {"static": region_tokens * in_channels * _PATCH[index] ** 2 * dim, "dynamic": 0.0, "dense": 0.0,
                "grains": torch.zeros(len(SPLITS), device=x.device), "slots": regions.sum() * len(stage.blocks)}
        hidden, sr = dim * _MLP_RATIOS[index], _SR_RATIOS[index]
        sparse = not self.training or self.sparse_train
        for block in stage.blocks:
            source = tokens if keep is None else tokens * keep.unsqueeze(-1)
            gates = grain_gates(block.router(source.view(b, *grid, dim)), regions, self.training, self.forced)
            queries = query_counts(gates, regions)
            cost["dynamic"] = cost["dynamic"] + block_macs(queries, region_tokens, dim, hidden, sr) \
                + region_tokens / REGION ** 2 * dim * len(SPLITS)  # the router's linear layer
            cost["dense"] = cost["dense"] + block_macs(region_tokens, region_tokens, dim, hidden, sr)
            cost["grains"] = cost["grains"] + (gates.detach() * regions[..., None]).flatten(0, 2).sum(0)
            if not self.training:
                self.choices.append(torch.where(regions, gates.argmax(-1), -1))
            current = tokens
            tokens = dge_update(lambda q, t=current: block.forward_queries(q, t, grid, keep, key_mask),
                                tokens, grid, gates, regions, keep, sparse)
        self.costs.append(cost)
        return tokens, grid, keep

    def forward(self, x: Tensor, sizes: list[tuple[int, int]] | None = None) -> "OrderedDict[str, Tensor]":
        self.costs, self.choices = [], []
        return super().forward(x, sizes)

    def cost_shares(self) -> dict[str, Tensor]:
        """The last forward pass's cost relative to the dense backbone on the same regions:
        beta over the backbone and over the DGE blocks (ratios of batch means, as the official
        code), differentiable in training, and each granularity's share of the regions."""
        static = sum(c["static"] for c in self.costs)
        dynamic = sum(c["dynamic"] for c in self.costs)
        dense = sum(c["dense"] for c in self.costs)
        grains = sum(c["grains"] for c in self.costs) / sum(c["slots"] for c in self.costs).clamp(min=1)
        out = {"dge_beta": (static + dynamic).mean() / (static + dense).mean(),
               "dge_beta_layers": dynamic.mean() / dense.mean()}
        out.update({f"dge_{name}": share for name, share in zip(GRAIN_NAMES, grains)})
        return out

    def forward_with_losses(self, x: Tensor, targets: list[dict], sizes: list[tuple[int, int]] | None = None
                            ) -> tuple["OrderedDict[str, Tensor]", dict[str, Tensor]]:
        """Training: the maps and {"loss_budget": lambda (beta - gamma)^2 in float64, the
        betas and granularity shares (logged)}."""
        maps = self.forward(x, sizes)
        shares = self.cost_shares()
        beta = shares["dge_beta" if self.budget_scope == "backbone" else "dge_beta_layers"]
        stats = {k: v.detach() for k, v in shares.items()}
        stats["loss_budget"] = (self.budget_weight * (beta.double() - self.budget) ** 2).to(beta.dtype)
        return maps, stats
