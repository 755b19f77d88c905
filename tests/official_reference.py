"""Small models with the authors' state-dict names, written for the tests from what the
authors' code computes (facebookresearch/detr, twangnh/pnp-detr, fundamentalvision/
Deformable-DETR, kakaobrain/sparse-detr), independently of the project's modules: their
outputs are what a converted project model must reproduce. Sequence-first attention,
post-norm layers, the authors' layer and norm order; any hidden size (the authors' code
fixes some sizes that only fit d = 256, e.g. the proposal embedding's 128 features, which
here are d / 2)."""
from __future__ import annotations

import math

import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

# config overrides that build the project's model of the same sizes as ReferenceDETR with its
# defaults
DETR_OPTS = ["model.backbone.name=resnet18", "model.transformer.hidden_dim=32", "model.transformer.nheads=4",
             "model.transformer.enc_layers=2", "model.transformer.dec_layers=2",
             "model.transformer.dim_feedforward=64", "model.num_queries=5"]


# --------------------------------------------------------------------------- shared parts
def sine_embedding(mask: Tensor, feats: int, offset: float) -> Tensor:
    """The sine position embedding of a padded map, channel by channel: y then x, each
    coordinate the count of valid pixels up to and including this one (+ offset), divided
    by the image's valid extent (+1e-6) and scaled to 2 pi; channel k is sin (k even) or cos
    (k odd) of it over 10000 ** (2 * (k // 2) / feats). mask (B, H, W) -> (B, 2 feats, H, W)."""
    valid = (~mask).float()
    ys, xs = valid.cumsum(1), valid.cumsum(2)
    ys = (ys + offset) / (ys[:, -1:, :] + 1e-6) * 2 * math.pi
    xs = (xs + offset) / (xs[:, :, -1:] + 1e-6) * 2 * math.pi
    k = torch.arange(feats)
    period = 10000.0 ** (2 * torch.div(k, 2, rounding_mode="floor").float() / feats)
    channels = []
    for coord in (ys, xs):
        angle = coord[:, None] / period[None, :, None, None]
        channels.append(torch.where((k % 2 == 0)[None, :, None, None], angle.sin(), angle.cos()))
    return torch.cat(channels, 1)


def box_sine(boxes_unact: Tensor, feats: int) -> Tensor:
    """Two-stage proposal embedding: each of cx, cy, w, h (sigmoid, * 2 pi) as `feats`
    channels alternating sin / cos with DETR's periods. (B, Q, 4) -> (B, Q, 4 feats)."""
    k = torch.arange(feats)
    period = 10000.0 ** (2 * torch.div(k, 2, rounding_mode="floor").float() / feats)
    angle = boxes_unact.sigmoid()[..., None] * 2 * math.pi / period
    return torch.where(k % 2 == 0, angle.sin(), angle.cos()).flatten(2)


def resized_mask(mask: Tensor, size) -> Tensor:
    return F.interpolate(mask[None].float(), size=tuple(size))[0].bool()


def logit(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class MLP(nn.Module):
    def __init__(self, d: int, out: int, layers: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d if i < layers - 1 else out) for i in range(layers))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class Body(nn.Module):
    """backbone.0.body: torchvision's ResNet-18 with frozen batch norms (random statistics)."""

    def __init__(self, returns: dict[str, str]):
        super().__init__()
        self.body = IntermediateLayerGetter(torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d), returns)
        for m in self.body.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)

    def forward(self, images: Tensor, mask: Tensor) -> list[tuple[Tensor, Tensor]]:
        return [(x, resized_mask(mask, x.shape[-2:])) for x in self.body(images).values()]


def randomise(module: nn.Module, std: float = 0.2) -> None:
    """Every parameter random, so a misplaced tensor shows in the outputs."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std) if p.dim() < 2 else nn.init.xavier_uniform_(p)


# --------------------------------------------------------------------------- DETR, PnP-DETR
class EncoderLayer(nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x, pos, pad):  # (S, B, C)
        x = self.norm1(x + self.self_attn(x + pos, x + pos, x, key_padding_mask=pad)[0])
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class DecoderLayer(nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.self_attn, self.multihead_attn = nn.MultiheadAttention(d, heads), nn.MultiheadAttention(d, heads)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, t, memory, pos, query_pos, pad):
        t = self.norm1(t + self.self_attn(t + query_pos, t + query_pos, t)[0])
        t = self.norm2(t + self.multihead_attn(t + query_pos, memory + pos, memory, key_padding_mask=pad)[0])
        return self.norm3(t + self.linear2(F.relu(self.linear1(t))))


class Stack(nn.Module):
    """transformer.encoder / transformer.decoder: `layers` (+ the decoder's final `norm`)."""

    def __init__(self, layers, norm=None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        if norm is not None:
            self.norm = norm


class Sampler(nn.Module):
    """PnP-DETR's poll-and-pool: 1x1-convolution scores on the projected map; each image's
    int(valid * ratio) best tokens (layer-normed, times their score) are the fine tokens;
    the other valid tokens pool into `coarse` tokens, one softmax over them per coarse token."""

    def __init__(self, d, coarse, ratio):
        super().__init__()
        self.score_pred_net = nn.Sequential(nn.Conv2d(d, d, 1), nn.ReLU(), nn.Conv2d(d, 1, 1))
        self.k_proj, self.v_proj = nn.Linear(d, coarse), nn.Linear(d, d)
        self.ratio = ratio

    def forward(self, src, pad, pos):  # src (B, C, h, w); pad (B, N); pos (B, N, C)
        b = src.shape[0]
        score = self.score_pred_net(src).sigmoid().flatten(1)
        x = F.layer_norm(src.flatten(2).transpose(1, 2), src.shape[1:2])
        counts = ((~pad).sum(1) * self.ratio).int().tolist()
        order = score.masked_fill(pad, -1.0).argsort(1, descending=True)
        fine, fine_pos, fine_pad, coarse, coarse_pos = [], [], [], [], []
        for i in range(b):
            top = order[i, :counts[i]]
            rest = torch.ones_like(pad[i]).index_fill(0, top, False) & ~pad[i]
            width = max(counts) - counts[i]
            fine.append(F.pad(x[i, top] * score[i, top, None], (0, 0, 0, width)))
            fine_pos.append(F.pad(pos[i, top], (0, 0, 0, width)))
            fine_pad.append(torch.arange(max(counts)) >= counts[i])
            weights = self.k_proj(x[i, rest]).softmax(0)  # (remaining, coarse)
            coarse.append(weights.T @ self.v_proj(x[i, rest]))
            coarse_pos.append(weights.T @ pos[i, rest])
        src = torch.cat([torch.stack(fine), torch.stack(coarse)], 1)
        pos = torch.cat([torch.stack(fine_pos), torch.stack(coarse_pos)], 1)
        pad = torch.cat([torch.stack(fine_pad), pad.new_zeros(b, coarse[0].shape[0])], 1)
        return src, pad, pos


class ReferenceDETR(nn.Module):
    """DETR (rows: 91 category-id rows + no-object for COCO); with `coarse`, PnP-DETR."""

    def __init__(self, d=32, heads=4, layers=2, ffn=64, queries=5, rows=92, coarse=0, ratio=1 / 3,
                 returns=None):
        super().__init__()
        self.backbone = nn.ModuleList([Body(returns or {"layer4": "0"})])
        self.input_proj = nn.Conv2d(512, d, 1)
        self.transformer = nn.Module()
        self.transformer.encoder = Stack([EncoderLayer(d, heads, ffn) for _ in range(layers)])
        self.transformer.decoder = Stack([DecoderLayer(d, heads, ffn) for _ in range(layers)], nn.LayerNorm(d))
        if coarse:
            self.transformer.sampler = Sampler(d, coarse, ratio)
        self.query_embed = nn.Embedding(queries, d)
        self.class_embed, self.bbox_embed = nn.Linear(d, rows), MLP(d, 4)
        randomise(self)

    def forward(self, images: Tensor, mask: Tensor) -> dict:
        features = self.backbone[0](images, mask)
        src, pad = features[-1]
        src = self.input_proj(src)
        pos = sine_embedding(pad, src.shape[1] // 2, 0.0).flatten(2).transpose(1, 2)
        tokens, pad_tokens = src.flatten(2).transpose(1, 2), pad.flatten(1)
        if hasattr(self.transformer, "sampler"):
            tokens, pad_tokens, pos = self.transformer.sampler(src, pad_tokens, pos)
        memory, pos = tokens.transpose(0, 1), pos.transpose(0, 1)
        for layer in self.transformer.encoder.layers:
            memory = layer(memory, pos, pad_tokens)
        query_pos = self.query_embed.weight[:, None].expand(-1, images.shape[0], -1)
        t = torch.zeros_like(query_pos)
        for layer in self.transformer.decoder.layers:
            t = layer(t, memory, pos, query_pos, pad_tokens)
        hs = self.transformer.decoder.norm(t).transpose(0, 1)
        out = {"pred_logits": self.class_embed(hs), "pred_boxes": self.bbox_embed(hs).sigmoid(),
               "hs": hs, "features": features, "src": src, "pad": pad}
        out["memory"] = memory.permute(1, 2, 0).reshape(src.shape) if not hasattr(self.transformer, "sampler") \
            else None
        return out


class ReferencePanopticDETR(nn.Module):
    """DETR's segmentation model: `detr.` + bbox_attention + mask_head (hidden size >= 128:
    the mask head's group norms need its widths divisible by 8)."""

    def __init__(self, d=128, heads=8, rows=251, **kwargs):
        super().__init__()
        self.detr = ReferenceDETR(d, heads, rows=rows, returns={f"layer{i}": str(i - 1) for i in range(1, 5)},
                                  **kwargs)
        self.heads = heads
        self.bbox_attention = nn.Module()
        self.bbox_attention.q_linear, self.bbox_attention.k_linear = nn.Linear(d, d), nn.Linear(d, d)
        widths = [d + heads, d // 2, d // 4, d // 8, d // 16]
        head = self.mask_head = nn.Module()
        head.lay1, head.gn1 = nn.Conv2d(widths[0], widths[0], 3, padding=1), nn.GroupNorm(8, widths[0])
        for i in range(2, 6):
            setattr(head, f"lay{i}", nn.Conv2d(widths[i - 2], widths[i - 1], 3, padding=1))
            setattr(head, f"gn{i}", nn.GroupNorm(8, widths[i - 1]))
        head.out_lay = nn.Conv2d(widths[4], 1, 3, padding=1)
        for i, channels in enumerate((256, 128, 64), start=1):  # ResNet-18's layer3, layer2, layer1
            setattr(head, f"adapter{i}", nn.Conv2d(channels, widths[i], 1))
        randomise(self, 0.1)

    def forward(self, images: Tensor, mask: Tensor) -> dict:
        out = self.detr(images, mask)
        q = self.bbox_attention.q_linear(out["hs"])  # (B, Q, C)
        k = self.bbox_attention.k_linear(out["memory"].flatten(2).transpose(1, 2))  # (B, N, C)
        b, n_q, c = q.shape
        per_head = c // self.heads
        scores = torch.einsum("bqhc,bnhc->bqhn", q.view(b, n_q, self.heads, per_head) / math.sqrt(per_head),
                              k.view(b, -1, self.heads, per_head))
        scores = scores.masked_fill(out["pad"].flatten(1)[:, None, None], float("-inf"))
        maps = scores.flatten(2).softmax(-1).view(b, n_q, self.heads, *out["src"].shape[-2:])
        head = self.mask_head
        x = torch.cat([out["src"].repeat_interleave(n_q, 0), maps.flatten(0, 1)], 1)
        x = F.relu(head.gn2(head.lay2(F.relu(head.gn1(head.lay1(x))))))
        fpn = [f for f, _ in out["features"][:3]][::-1]  # layer3, layer2, layer1
        for i, level in enumerate(fpn, start=1):
            skip = getattr(head, f"adapter{i}")(level).repeat_interleave(n_q, 0)
            x = skip + F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = F.relu(getattr(head, f"gn{i + 2}")(getattr(head, f"lay{i + 2}")(x)))
        out["pred_masks"] = head.out_lay(x).view(b, n_q, *x.shape[-2:])
        return out


