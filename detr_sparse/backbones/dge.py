"""DGE backbones: PVT v1 and DeiT whose every block is a dynamic grained encoder block
(detr_sparse.sparsity.dge), with the budget loss that holds their cost near a target share
of the dense backbone's.

`pvt_s_dge`, `deit_s_dge` (and the other sizes) are the dense backbones plus one router per
block: dense ImageNet weights load as for the dense backbone and the routers start fresh
(finest granularity at p = 0.95). Training (`forward_with_losses`) returns the budget loss
with the realised cost share and granularity shares; training and evaluation compute each
image's chosen queries only (`sparse_train: false` trains the exact dense form instead).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor, nn

from ..sparsity.dge import (GRAIN_NAMES, REGION, SPLITS, GrainRouter, block_macs, dge_update, grain_gates,
                            grain_pools, query_counts, region_layout)
from .levels import LEVEL_NAMES
from .pvt import _DIMS, _MLP_RATIOS, _PATCH, _SR_RATIOS, PVTBackbone, PVTStage
from .vit import ViTBackbone, load_converted_state, read_state

BUDGET_SCOPES = ("backbone", "dge_layers")


class DGECost:
    """What the DGE backbones share: routers on every block, the DGE loop over a stage's
    blocks with its cost accounting, the budget loss.

    budget: the target cost share gamma; budget_weight: lambda of (beta - gamma)^2;
    budget_scope: beta over the backbone (patch embeddings + blocks, the official code's
    choice) or over the DGE blocks only (the paper's Eq. 7); both are logged. Regions wholly
    in padding cost nothing and count nowhere. `forced`: granularity shares (finest first)
    that replace the routers' choices, for benchmarks on random weights. `sparse_train`:
    train on the chosen queries only (the default: 2.1-2.4x faster than the exact dense form on
    this project's CPU, `tools/benchmark.py --component dge_train`; the gradient of the chosen
    gate only, as the paper's Eq. 6) instead of the exact dense form (every option computed,
    every gate's straight-through gradient, as the authors' code)."""

    def setup_dge(self, blocks: list[tuple[nn.Module, int]], budget: float, budget_weight: float,
                  budget_scope: str, sparse_train: bool) -> None:
        if budget_scope not in BUDGET_SCOPES:
            raise ValueError(f"model.backbone.dge.budget_scope: '{budget_scope}' not in {BUDGET_SCOPES}")
        for block, dim in blocks:
            block.router = GrainRouter(dim)
        self.budget, self.budget_weight, self.budget_scope = budget, budget_weight, budget_scope
        self.sparse_train = sparse_train
        self.forced: tuple[float, ...] | None = None
        self.costs: list[dict] = []  # the last forward pass's, per stage
        # the last evaluation pass's options per block: (label, (B, Hr, Wr) with -1 in padding, region px)
        self.choices: list[tuple[str, Tensor, int]] = []

    def dge_blocks(self, blocks, tokens: Tensor, grid: tuple[int, int], keep: Tensor | None,
                   update: Callable[[nn.Module, Tensor, Tensor], Tensor],
                   macs: Callable[[Tensor, Tensor], Tensor], embed_macs_per_token: float, stride: int,
                   label: str) -> Tensor:
        """Run DGE blocks over tokens (B, N, C) on the grid (tokens of `stride` px);
        update(block, queries, map) is the dense block's change of queries, macs(queries,
        tokens) a block's cost; `label` names the blocks in pictures ("{label} {i}")."""
        b, dim = tokens.shape[0], tokens.shape[-1]
        layout = region_layout(keep, grid, b, tokens.device)
        regions = layout.regions
        # each image's tokens (the keys, the dense reference) and regions (the router's input)
        image_tokens = torch.full((b,), grid[0] * grid[1], dtype=tokens.dtype, device=tokens.device) \
            if keep is None else keep.sum(1).to(tokens.dtype)
        image_regions = regions.flatten(1).sum(1).to(tokens.dtype)
        cost = {"static": image_tokens * embed_macs_per_token,
                "grains": torch.zeros(len(SPLITS), device=tokens.device), "slots": regions.sum() * len(blocks)}
        sparse = not self.training or self.sparse_train
        # a block's cost is affine in its query count: static + per_query * queries; the
        # router's linear layer is part of the cost, not of the dense reference
        static = macs(torch.zeros_like(image_tokens), image_tokens)
        per_query = macs(torch.ones_like(image_tokens), image_tokens) - static
        cost["dense"] = len(blocks) * (static + per_query * image_tokens)
        cost["dynamic"] = len(blocks) * (static + image_regions * dim * len(SPLITS))
        for i, block in enumerate(blocks):
            pooled = grain_pools(tokens, grid, keep)
            logits = block.router(pooled[-1])
            if self.forced is None or i == 0:  # forced gates are the same for every block of a stage
                gates = grain_gates(logits, regions, self.training, self.forced)
            cost["dynamic"] = cost["dynamic"] + per_query * query_counts(gates, layout)
            cost["grains"] = cost["grains"] + (gates.detach() * regions[..., None]).flatten(0, 2).sum(0)
            if not self.training:
                self.choices.append((f"{label} {i + 1}", torch.where(regions, gates.argmax(-1), -1),
                                     stride * REGION))
            current = tokens
            tokens = dge_update(lambda q, t=current, blk=block: update(blk, q, t), tokens, grid, gates, layout,
                                pooled, sparse)
        self.costs.append(cost)
        return tokens

    def granularity_maps(self) -> list[tuple[str, Tensor, int]]:
        """The last evaluation pass's chosen granularity (0 finest, 1, 2 coarsest, -1 padding)
        of the blocks worth a picture: (label, (B, Hr, Wr), region side in input pixels)."""
        return [self.choices[i] for i in self.shown_blocks if i < len(self.choices)]

    def image_shares(self) -> tuple[Tensor, Tensor]:
        """The last evaluation pass per image: beta over the backbone (B,) and the share of
        each granularity among the image's regions over all blocks (B, 3)."""
        static = sum(c["static"] for c in self.costs)
        beta = (static + sum(c["dynamic"] for c in self.costs)) / (static + sum(c["dense"] for c in self.costs))
        counts = torch.stack([torch.stack([(choice == k).flatten(1).sum(1) for k in range(len(SPLITS))], 1)
                              for _, choice, _ in self.choices]).sum(0).float()
        return beta, counts / counts.sum(1, keepdim=True).clamp(min=1)

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

    def forward(self, x: Tensor, sizes: list[tuple[int, int]] | None = None) -> "OrderedDict[str, Tensor]":
        self.costs, self.choices = [], []
        return super().forward(x, sizes)

    @torch.no_grad()
    def force_budget(self, beta: float, x: Tensor, steps: int = 12) -> tuple[float, ...]:
        """Force the routers to the mix of finest and coarsest regions whose backbone beta on
        x (B, 3, H, W) is `beta` (bisection on the finest share; the cost depends on the
        query count only, so this is an operating point of a trained model's cost).
        Returns the shares, which stay set in `forced`."""
        low, high = 0.0, 1.0
        for _ in range(steps):
            middle = (low + high) / 2
            self.forced = (middle, 0.0, 1.0 - middle)
            self.forward(x)
            low, high = (middle, high) if self.cost_shares()["dge_beta"] < beta else (low, middle)
        self.forced = ((low + high) / 2, 0.0, 1.0 - (low + high) / 2)
        return self.forced

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

    def fresh(self, key: str) -> bool:
        """The routers are new, beside what the dense backbone does not load."""
        return ".router." in key or super().fresh(key)

    def learnt_in_pretraining(self, key: str) -> bool:
        """What tools/pretrain_backbone.py saves of a DGE backbone: the dense backbone's
        weights and the routers (pretrained with the budget loss, as the paper's ImageNet
        models are trained with DGE)."""
        return ".router." in key or not self.fresh(key)

    def load_state(self, path: str, state: dict[str, Tensor], what: str) -> None:
        """Load a dense state dict (the routers stay fresh) or one with routers, which load."""
        routers = any(".router." in k for k in state)
        wanted = {k for k in self.state_dict() if not self.fresh(k) or (routers and ".router." in k)}
        load_converted_state(self, path, wanted, self._from_checkpoint, what, state)


class DGEPVTBackbone(DGECost, PVTBackbone):
    """PVT v1 with DGE blocks (settings: DGECost). forward(x, sizes) as PVTBackbone's;
    regions are S x S tokens of each stage from the top-left corner (16, 32, 64, 128 px)."""

    def __init__(self, name: str = "pvt_s_dge", out_features: tuple[str, ...] = tuple(LEVEL_NAMES),
                 pretrained: str = "", *args, budget: float = 0.5, budget_weight: float = 1.0,
                 budget_scope: str = "backbone", sparse_train: bool = True, **kwargs):
        super().__init__(name.removesuffix("_dge"), out_features, "", *args, **kwargs)
        self.setup_dge([(block, _DIMS[i]) for i, stage in enumerate(self.stages) for block in stage.blocks],
                       budget, budget_weight, budget_scope, sparse_train)
        if pretrained:  # once the routers exist: a file with routers loads them
            self.load_pretrained(pretrained)
        firsts = [0]
        for stage in self.stages[:-1]:
            firsts.append(firsts[-1] + len(stage.blocks))
        self.shown_blocks = firsts  # the first block of every stage

    def load_pretrained(self, path: str) -> None:
        """An official PVT v1 state dict (routers start fresh), or one this project's
        pretraining wrote of a PVT+DGE (its routers load too)."""
        what = "PVT v1 state dict of the same size (dense, or a DGE one with routers)"
        self.load_state(path, read_state(path, what), what)

    def run_stage(self, stage: PVTStage, x: Tensor, valid: list[tuple[int, int]]):
        index = len(self.costs)
        tokens, grid, keep, key_mask = stage.embed(x, valid)
        dim = tokens.shape[-1]
        hidden, sr = dim * _MLP_RATIOS[index], _SR_RATIOS[index]
        tokens = self.dge_blocks(
            stage.blocks, tokens, grid, keep,
            lambda block, q, t: block.forward_queries(q, t, grid, keep, key_mask, change=True),
            lambda q, n: block_macs(q, n, dim, hidden, sr),
            stage.patch_embed.proj.in_channels * _PATCH[index] ** 2 * dim, 4 * 2 ** index, f"stage {index + 1} block")
        return tokens, grid, keep


class DGEViTBackbone(DGECost, ViTBackbone):
    """DeiT / ViT with DGE blocks (settings: DGECost) and ViTDet's simple pyramid; regions
    are S x S tokens (64 px) from the top-left corner."""

    def __init__(self, name: str = "deit_s_dge", out_features: tuple[str, ...] = tuple(LEVEL_NAMES),
                 pretrained: str = "", *args, budget: float = 0.5, budget_weight: float = 1.0,
                 budget_scope: str = "backbone", sparse_train: bool = True, **kwargs):
        super().__init__(name.removesuffix("_dge"), out_features, "", *args, **kwargs)
        dim = self.conv_proj.out_channels
        self.setup_dge([(block, dim) for block in self.layers], budget, budget_weight, budget_scope, sparse_train)
        if pretrained:  # once the routers exist: the authors' DGE DeiT loads its routers
            self.load_pretrained(pretrained)
        depth = len(self.layers)  # the paper's pictures: layers 1, 4, 8 (of 12) and the last
        self.shown_blocks = sorted({0, depth // 4, 2 * depth // 3, depth - 1})

    def load_pretrained(self, path: str) -> None:
        """A dense DeiT / ViT state dict (timm or torchvision names; routers start fresh), or
        the authors' released DGE DeiT (`deit_dge_s124_*`: separate q / kv projections, its
        routers `blocks.i.dge.router.gate`, which load too)."""
        what = "DeiT / ViT state dict of the same size (dense or the authors' DGE)"
        state = dict(read_state(path, what))
        for key in [k for k in state if k.endswith((".attn.q.weight", ".attn.q.bias"))]:
            kv = key.replace(".attn.q.", ".attn.kv.")
            if kv in state:  # the DGE blocks' q and kv projections are the fused qkv's rows
                state[key.replace(".attn.q.", ".attn.qkv.")] = torch.cat([state.pop(key), state.pop(kv)])
        splits = [v for k, v in state.items() if k.endswith(".dge.splits")]
        if any(v.tolist() != list(SPLITS) for v in splits):
            raise ValueError(f"{path}: DGE splits {splits[0].tolist()}, this backbone's are {list(SPLITS)}")
        self.load_state(path, state, what)

    def _from_checkpoint(self, key: str, value: Tensor) -> tuple[str, Tensor] | None:
        if ".dge." in key:  # blocks.i.dge.router.gate.* (the splits were checked)
            index, rest = key.removeprefix("blocks.").split(".dge.")
            return (f"layers.encoder_layer_{index}.{rest}", value) if rest.startswith("router.") else None
        return super()._from_checkpoint(key, value)

    def run_blocks(self, tokens: Tensor, grid: tuple[int, int], keep: Tensor | None,
                   key_mask: Tensor | None, start: int = 0, stop: int | None = None) -> Tensor:
        dim = tokens.shape[-1]
        return self.dge_blocks(
            list(self.layers)[start:stop], tokens, grid, keep,
            lambda block, q, t: block.forward_queries(q, t, key_mask, change=True),
            lambda q, n: block_macs(q, n, dim, 4 * dim),
            3 * self.patch_size ** 2 * dim, self.patch_size, "layer")
