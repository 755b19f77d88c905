"""SPT, the select-and-pack transformer: a Swin whose stages 3 and 4 are SPA blocks
(detr_sparse.sparsity.spa), with extra stage-3 blocks.

`spt_t` is Swin-T with 4 blocks appended to stage 3 ([2, 2, 10, 2], the paper's SPT-T/16);
`spt_t12` keeps Swin-T's [2, 2, 6, 2]; `spt_s` is Swin-S + 4; `spt_mini` is the synthetic
sets' `swin_mini`. torchvision Swin weights load (the dense backbone's); the gates and the
extra blocks start fresh, the extra blocks as identities (their attention projection and
last FFN layer zero), continuing the stage's shift alternation, and the drop-path schedule
is laid over the new depth.

A gate on the stage-2 output gives the first score; every SPA block's score is the max of
its own gate's (on its normalised tokens) and the previous scale's, max-pooled. With
`gate_per="stage"` (the paper is read either way) only each SPA stage's first block has a
gate, and the stage's other blocks keep its selection. Training
returns the selection loss against the union of the ground-truth boxes; each image's padding
is never selected, never a key (in the plain stages too: a window's keys are the image's
tokens only), and outputs inside an image do not depend on the rest of the batch.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.swin_transformer import SwinTransformerBlock

from ..sparsity.spa import (SPAGate, packing_of, pooled_score, select, selection_labels, selection_loss, spa_block,
                            stage_layout)
from .levels import LEVEL_NAMES
from .swin import _PATCH, ChunkedMLP, SwinBackbone, WindowAttention
from .vit import token_sizes, valid_tokens, zero_outside

# name -> (the Swin it extends, blocks appended to stage 3)
SPT_MODELS = {"spt_t": ("swin_t", 4), "spt_t12": ("swin_t", 0), "spt_s": ("swin_s", 4), "spt_mini": ("swin_mini", 0)}
SPA_STAGES = (2, 3)  # stages 3 and 4 (0-based)


class SPTBackbone(SwinBackbone):
    """forward(x, sizes) -> the Swin backbone's maps; `forward_with_losses(x, targets)` adds
    {"loss_select": alpha * the summed BCE terms, "spt_select_res4"/"_res5" (selected share
    of each stage's valid tokens), "spt_object_selected" / "spt_background_selected" (share
    of the tokens inside / outside the label union selected)}. `forced`: every SPA block
    selects that share of each image's tokens (the best by score), for benchmarks."""

    takes_sizes = True

    def __init__(self, name: str = "spt_t", out_features=("res2", "res3", "res4", "res5"), pretrained: str = "",
                 freeze_at: int = -1, drop_path_rate: float = 0.2, *, select_weight: float = 0.01,
                 threshold: float = 0.01, tau: float = 1.0, region_mask: bool = True, label_from: str = "boxes",
                 attention: str = "sdpa", align_images_eval: bool = True, gate_per: str = "block"):
        if name not in SPT_MODELS:
            raise ValueError(f"model.backbone.name: unknown SPT '{name}' (one of {sorted(SPT_MODELS)})")
        if label_from not in ("boxes", "masks"):
            raise ValueError(f"model.backbone.spt.label_from: '{label_from}' is not boxes or masks")
        if attention not in ("sdpa", "flex"):
            raise ValueError(f"model.backbone.spt.attention: '{attention}' is not sdpa or flex")
        if gate_per not in ("block", "stage"):
            raise ValueError(f"model.backbone.spt.gate_per: '{gate_per}' is not block or stage")
        swin, extra = SPT_MODELS[name]
        super().__init__(swin, out_features, "", -1, drop_path_rate)
        if len(self.features) < 2 * SPA_STAGES[0] + 2:
            raise ValueError(f"model.backbone.out_features: {name} needs res4 (its SPA stages are res4, res5)")
        stage3 = self.features[2 * SPA_STAGES[0] + 1]
        self.pretrained_depth = len(stage3)
        dim = stage3[0].norm1.normalized_shape[0]
        for i in range(len(stage3), len(stage3) + extra):
            stage3.append(_identity_block(dim, stage3[0], shift=i % 2 == 1))
        blocks = [block for stage in self.features[1::2] for block in stage]
        for i, block in enumerate(blocks):  # the schedule over the new depth
            block.stochastic_depth.p = drop_path_rate * i / max(len(blocks) - 1, 1)
        self.gate0 = SPAGate(self.features[3][0].norm1.normalized_shape[0])
        for stage in SPA_STAGES:  # a gate in every SPA block, or in each SPA stage's first only
            if 2 * stage + 1 < len(self.features):
                for block in self.features[2 * stage + 1][: 1 if gate_per == "stage" else None]:
                    block.gate = SPAGate(block.norm1.normalized_shape[0])
        self.select_weight, self.threshold, self.tau = select_weight, threshold, tau
        self.region_mask, self.from_masks, self.align_images_eval = region_mask, label_from == "masks", align_images_eval
        self.attention = attention
        self.forced: float | None = None
        self.record: list[tuple[int, Tensor, Tensor]] = []  # the last pass: (stage, score, selected)
        self.valid: dict[int, Tensor | None] = {}  # the last pass's valid tokens per stage (B, H, W)
        if pretrained:
            self.load_torchvision_state(pretrained)
        self.freeze(freeze_at)

    def fresh(self, key: str) -> bool:
        """The gates and the extra blocks, beside what a dense Swin does not hold."""
        if ".gate." in key or key.startswith("gate0."):
            return True
        prefix = f"features.{2 * SPA_STAGES[0] + 1}."
        if key.startswith(prefix) and int(key[len(prefix):].split(".")[0]) >= self.pretrained_depth:
            return True
        return super().fresh(key)

    def forward(self, x: Tensor, sizes: list[tuple[int, int]] | None = None) -> "OrderedDict[str, Tensor]":
        """x (B, 3, H, W); sizes: each image's (h, w) in the padded batch (None: all fill x)."""
        h, w = x.shape[-2:]
        x, sizes = zero_outside(x, sizes)
        x = self.features[0](F.pad(x, (0, -w % _PATCH, 0, -h % _PATCH)))  # (B, H/4, W/4, C)
        out = OrderedDict()
        self.record, self.valid = [], {}
        score = None
        for i, name in enumerate(LEVEL_NAMES[: len(self.features) // 2]):
            if i > 0:
                if self.valid[i - 1] is not None:  # patch merging then sees zeros beyond each image
                    x = x * self.valid[i - 1][..., None]
                x = self.features[2 * i](x)
            grid = tuple(x.shape[1:3])
            tokens = token_sizes(sizes, _PATCH * 2 ** i)
            inside = valid_tokens(grid, tokens, x.device)
            valid = self.valid[i] = None if inside is None else inside.view(-1, *grid)
            if i in SPA_STAGES:
                x, score = self.spa_stage(self.features[2 * i + 1], x, score, valid, tokens, i)
            else:
                x = self.plain_stage(self.features[2 * i + 1], x, valid)
                if i == SPA_STAGES[0] - 1:
                    score = self.gate0(x)
                    self.record.append((i, score, None))
            if name in self.out_features:
                out[name] = self.norms[name](x).permute(0, 3, 1, 2).contiguous()
        return out

    @staticmethod
    def plain_stage(stage: nn.Sequential, x: Tensor, valid: Tensor | None) -> Tensor:
        """Swin blocks whose keys are each image's tokens only (when some are not)."""
        window = stage[0].attn.window_size[0]
        if valid is None and x.shape[1] % window == 0 and x.shape[2] % window == 0:
            return stage(x)
        keys = valid if valid is not None else x.new_ones(x.shape[:3], dtype=torch.bool)
        for block in stage:
            x = x + block.stochastic_depth(block.attn(block.norm1(x), keys))
            x = x + block.stochastic_depth(block.mlp(block.norm2(x)))
        return x

    def spa_stage(self, stage: nn.Sequential, x: Tensor, score: Tensor, valid: Tensor | None,
                  tokens: list[tuple[int, int]], index: int) -> tuple[Tensor, Tensor]:
        """SPA blocks on x (B, H, W, C) after a scale whose score was `score`; each image has
        tokens[i] (h, w) -> (x, the last block's score)."""
        s_up = pooled_score(score, self.valid[index - 1])
        align = self.align_images_eval and not self.training
        layouts = {}
        for block in stage:
            shift = block.attn.shift_size[0]
            if shift not in layouts:
                layouts[shift] = stage_layout(tokens, x.shape[2], block.attn.window_size[0], shift, x.device)
            normed = block.norm1(x)
            if hasattr(block, "gate"):  # else (gate_per stage) the stage's first block's selection holds
                score = torch.maximum(block.gate(normed), s_up)
                picked = select(score, valid, self.training, self.threshold, self.tau, self.forced)
                packings = {}
            if shift not in packings:
                packings[shift] = packing_of(picked, layouts[shift], self.region_mask, align)
            packing = packings[shift]
            x = spa_block(block, x, normed, score, picked, packing, layouts[shift], self.attention)
            self.record.append((index, score, picked))
        return x, score

    def forward_with_losses(self, x: Tensor, targets: list[dict], sizes: list[tuple[int, int]] | None = None
                            ) -> tuple["OrderedDict[str, Tensor]", dict[str, Tensor]]:
        maps = self.forward(x, sizes)
        loss, stats = self.selection_terms(targets)
        return maps, {"loss_select": self.select_weight * loss, **stats}

    def selection_terms(self, targets: list[dict]) -> tuple[Tensor, dict[str, Tensor]]:
        """The last pass's summed BCE terms (the stage-2 gate's and every SPA block's) against
        the targets' labels, and the selection statistics."""
        labels, loss, scored = {}, 0.0, set()
        inside = 0.0  # selected inside the union, inside, selected outside, outside
        shares: dict[int, list[Tensor]] = {}
        for stage, score, picked in self.record:
            valid = self.valid[stage]
            region = torch.ones_like(score) if valid is None else valid.to(score.dtype)
            if targets and stage not in labels:
                labels[stage] = selection_labels(targets, tuple(score.shape[1:]), _PATCH * 2 ** stage,
                                                 self.from_masks).to(score.device) * region
            if targets and id(score) not in scored:  # a gate's score once (gate_per stage: its blocks share it)
                loss = loss + selection_loss(score, labels[stage], valid)
                scored.add(id(score))
            if picked is None:  # the stage-2 gate only scores
                continue
            picked = picked.detach()
            shares.setdefault(stage, []).append(picked.sum() / region.sum().clamp(min=1))
            if targets:
                positive = labels[stage]
                inside = inside + torch.stack([(picked * positive).sum(), positive.sum(),
                                               (picked * (region - positive)).sum(), (region - positive).sum()])
        stats = {f"spt_select_{LEVEL_NAMES[stage]}": torch.stack(v).mean() for stage, v in shares.items()}
        if targets:
            stats["spt_object_selected"] = inside[0] / inside[1].clamp(min=1)
            stats["spt_background_selected"] = inside[2] / inside[3].clamp(min=1)
        return torch.as_tensor(loss), stats

    def image_shares(self, targets: list[dict] | None = None) -> dict[str, Tensor]:
        """The last pass per image (B,): the selected share of each SPA stage's valid tokens
        (mean over its blocks, `select_res4`, `select_res5`) and, with targets, of the tokens
        inside the label union (`object_selected`) over all SPA blocks."""
        out, inside, total = {}, 0.0, 0.0
        for stage in SPA_STAGES:
            picked = [p for s, _, p in self.record if s == stage]
            if not picked:
                continue
            valid = self.valid[stage]
            region = torch.ones_like(picked[0]) if valid is None else valid.to(picked[0].dtype)
            out[f"select_{LEVEL_NAMES[stage]}"] = torch.stack([(p * region).flatten(1).sum(1) for p in picked]).mean(0) \
                / region.flatten(1).sum(1).clamp(min=1)
            if targets is not None:
                labels = selection_labels(targets, tuple(picked[0].shape[1:]), _PATCH * 2 ** stage,
                                          self.from_masks).to(region.device) * region
                inside = inside + sum((p * labels).flatten(1).sum(1) for p in picked)
                total = total + len(picked) * labels.flatten(1).sum(1)
        if targets is not None:
            out["object_selected"] = inside / torch.as_tensor(total).clamp(min=1)
        return out

    def selection_usage(self) -> Tensor:
        """The last pass's count of SPA blocks that selected each stride-16 token (stage 4's
        selections spread over their 2 x 2 stride-16 cells), (B, H/16, W/16); -1 outside the
        images."""
        first = [p for s, _, p in self.record if s == SPA_STAGES[0]]
        usage = torch.stack(first).sum(0)
        shape = usage.shape[1:]
        for stage, _, picked in self.record:
            if stage == SPA_STAGES[1]:
                usage = usage + picked.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, :shape[0], :shape[1]]
        valid = self.valid[SPA_STAGES[0]]
        return usage if valid is None else usage.masked_fill(~valid, -1)

    @property
    def spa_blocks(self) -> int:
        return sum(len(self.features[2 * s + 1]) for s in SPA_STAGES if 2 * s + 1 < len(self.features))


def _identity_block(dim: int, like: nn.Module, shift: bool) -> nn.Module:
    """A new Swin block like `like` with Swin's initialisation (linear weights truncated
    normal, std 0.02, biases 0) that starts as the identity (zero residual outputs)."""
    window = like.attn.window_size
    block = SwinTransformerBlock(dim, like.attn.num_heads, window_size=list(window),
                                 shift_size=[w // 2 if shift else 0 for w in window],
                                 norm_layer=partial(nn.LayerNorm, eps=1e-5))
    block.mlp = ChunkedMLP.from_torchvision(block.mlp)
    block.attn = WindowAttention.from_torchvision(block.attn)
    for layer in block.modules():
        if isinstance(layer, nn.Linear):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
    for layer in (block.attn.proj, block.mlp[3]):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return block
