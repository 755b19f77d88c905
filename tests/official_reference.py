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

# config overrides that build the project's model of the same sizes as ReferenceDETR and
# ReferenceDeformableDETR with their defaults
DETR_OPTS = ["model.backbone.name=resnet18", "model.transformer.hidden_dim=32", "model.transformer.nheads=4",
             "model.transformer.enc_layers=2", "model.transformer.dec_layers=2",
             "model.transformer.dim_feedforward=64", "model.num_queries=5"]
DEFORMABLE_OPTS = ["model.backbone.name=resnet18", "model.transformer.hidden_dim=64", "model.transformer.nheads=4",
                   "model.transformer.enc_layers=2", "model.transformer.dec_layers=2",
                   "model.transformer.dim_feedforward=64", "model.transformer.enc_n_points=2",
                   "model.transformer.dec_n_points=2", "model.num_queries=10"]


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


class SwinAttention(nn.Module):
    """Window attention with the relative-position bias (index: (dy + w - 1) * (2w - 1) + dx + w - 1)."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads = heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        coords = torch.stack([ys.flatten(), xs.flatten()])
        delta = (coords[:, :, None] - coords[:, None, :]) + window - 1  # (2, N, N)
        self.register_buffer("relative_position_index", delta[0] * (2 * window - 1) + delta[1])
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, windows: Tensor, mask: Tensor | None) -> Tensor:  # (B * nW, N, C), (nW, N, N)
        b, n, c = windows.shape
        q, k, v = self.qkv(windows).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        scores = scores + self.relative_position_bias_table[self.relative_position_index.flatten()].view(
            n, n, -1).permute(2, 0, 1)
        if mask is not None:
            scores = (scores.view(-1, mask.shape[0], self.heads, n, n) + mask[None, :, None]).view(b, -1, n, n)
        return self.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.window = window
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SwinAttention(dim, heads, window)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor, shift: int, mask: Tensor) -> Tensor:  # x (B, H, W, C)
        b, h, w, c = x.shape
        ws = self.window
        y = F.pad(self.norm1(x), (0, 0, 0, -w % ws, 0, -h % ws))
        hp, wp = y.shape[1:3]
        y = torch.roll(y, (-shift, -shift), (1, 2))
        windows = y.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        y = self.attn(windows, mask if shift else None)
        y = y.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        x = x + torch.roll(y, (shift, shift), (1, 2))[:, :h, :w]
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class SwinMerging(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.reduction, self.norm = nn.Linear(4 * dim, 2 * dim, bias=False), nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        parts = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
        return self.reduction(self.norm(torch.cat(parts, -1)))


def shift_mask(hp: int, wp: int, window: int) -> Tensor:
    """The shifted windows' mask (nW, N, N): -100 between tokens of different regions."""
    shift = window // 2
    region = torch.zeros(hp, wp)
    bounds = [(0, -window), (-window, -shift), (-shift, None)]
    for i, (hs, he) in enumerate(bounds):
        for j, (ws, we) in enumerate(bounds):
            region[slice(hs, he), slice(ws, we)] = 3 * i + j
    labels = region.view(hp // window, window, wp // window, window).permute(0, 2, 1, 3).reshape(-1, window ** 2)
    return (labels[:, None, :] != labels[:, :, None]).float() * -100.0


class SwinBody(nn.Module):
    """backbone.0.body: the detection Swin (patch embedding with its norm; stages of
    alternately shifted window blocks, each but the last ending in a patch merging; a norm
    per output, `norm1`..`norm3` for stages 2-4), by default a quarter-width Swin-T."""

    def __init__(self, embed: int = 32, depths=(2, 2, 4, 2), heads=(1, 2, 4, 8), window: int = 7):
        super().__init__()
        self.window = window
        body = self.body = nn.Module()
        body.patch_embed = nn.Module()
        body.patch_embed.proj, body.patch_embed.norm = nn.Conv2d(3, embed, 4, stride=4), nn.LayerNorm(embed)
        body.layers = nn.ModuleList()
        for i, (depth, n_heads) in enumerate(zip(depths, heads)):
            layer = nn.Module()
            layer.blocks = nn.ModuleList(SwinBlock(embed * 2 ** i, n_heads, window) for _ in range(depth))
            if i < len(depths) - 1:
                layer.downsample = SwinMerging(embed * 2 ** i)
            body.layers.append(layer)
        for i in range(1, len(depths)):
            setattr(body, f"norm{i}", nn.LayerNorm(embed * 2 ** i))

    def forward(self, images: Tensor, mask: Tensor) -> list[tuple[Tensor, Tensor]]:
        body, ws = self.body, self.window
        x = F.pad(images, (0, -images.shape[3] % 4, 0, -images.shape[2] % 4))
        x = body.patch_embed.norm(body.patch_embed.proj(x).permute(0, 2, 3, 1))
        outs = []
        for i, layer in enumerate(body.layers):
            regions = shift_mask(-(-x.shape[1] // ws) * ws, -(-x.shape[2] // ws) * ws, ws)
            for j, block in enumerate(layer.blocks):
                x = block(x, (j % 2) * (ws // 2), regions)
            if i > 0:
                out = getattr(body, f"norm{i}")(x).permute(0, 3, 1, 2)
                outs.append((out, resized_mask(mask, out.shape[-2:])))
            if hasattr(layer, "downsample"):
                x = layer.downsample(x)
        return outs


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


# --------------------------------------------------------------------------- Deformable family
def sample_levels(value: Tensor, shapes, locations: Tensor, weights: Tensor) -> Tensor:
    """Deformable attention's sampling: per level, bilinear samples of the value map (zeros
    outside, pixel centres at (i + 0.5) / size) at the locations, weighted and summed.
    value (B, S, M, D), locations (B, Q, M, L, P, 2) as (x, y) in [0, 1], weights
    (B, Q, M, L, P) -> (B, Q, M * D)."""
    b, _, m, dim = value.shape
    q = locations.shape[1]
    out, start = 0, 0
    for lvl, (h, w) in enumerate(shapes):
        v = value[:, start:start + h * w].permute(0, 2, 3, 1).reshape(b * m, dim, h, w)
        grid = locations[:, :, :, lvl].transpose(1, 2).reshape(b * m, q, -1, 2) * 2 - 1
        sampled = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = out + (sampled * weights[:, :, :, lvl].transpose(1, 2).reshape(b * m, 1, q, -1)).sum(-1)
        start += h * w
    return out.view(b, m * dim, q).transpose(1, 2)


class DeformAttn(nn.Module):
    def __init__(self, d, levels, heads, points):
        super().__init__()
        self.heads, self.levels, self.points = heads, levels, points
        self.sampling_offsets = nn.Linear(d, heads * levels * points * 2)
        self.attention_weights = nn.Linear(d, heads * levels * points)
        self.value_proj, self.output_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, query, reference, inputs, shapes, pad):
        b, q, _ = query.shape
        m, lv, p = self.heads, self.levels, self.points
        value = self.value_proj(inputs).masked_fill(pad[..., None], 0.0).view(b, inputs.shape[1], m, -1)
        offsets = self.sampling_offsets(query).view(b, q, m, lv, p, 2)
        weights = self.attention_weights(query).view(b, q, m, lv * p).softmax(-1).view(b, q, m, lv, p)
        ref = reference[:, :, None, :, None]
        if reference.shape[-1] == 2:
            sizes = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)
            locations = ref + offsets / sizes[None, None, None, :, None]
        else:
            locations = ref[..., :2] + offsets / p * ref[..., 2:] * 0.5
        return self.output_proj(sample_levels(value, shapes, locations, weights))


class DeformEncoderLayer(nn.Module):
    def __init__(self, d, heads, ffn, levels, points):
        super().__init__()
        self.self_attn = DeformAttn(d, levels, heads, points)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, query, pos, reference, inputs, shapes, pad):
        x = self.norm1(query + self.self_attn(query + pos, reference, inputs, shapes, pad))
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class DeformDecoderLayer(nn.Module):
    """The authors' order: self-attention -> norm2, cross-attention -> norm1, FFN -> norm3."""

    def __init__(self, d, heads, ffn, levels, points):
        super().__init__()
        self.cross_attn = DeformAttn(d, levels, heads, points)
        self.self_attn = nn.MultiheadAttention(d, heads)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, t, query_pos, reference, memory, shapes, pad):
        q = (t + query_pos).transpose(0, 1)
        t = self.norm2(t + self.self_attn(q, q, t.transpose(0, 1))[0].transpose(0, 1))
        t = self.norm1(t + self.cross_attn(t + query_pos, reference, memory, shapes, pad))
        return self.norm3(t + self.linear2(F.relu(self.linear1(t))))


class ScoringNet(nn.Module):
    """Sparse DETR's enc_mask_predictor: LN, linear, GELU; the second half of the features
    averaged over all the image's tokens; then linear-GELU-linear-GELU-linear to one logit."""

    def __init__(self, d):
        super().__init__()
        self.layer1 = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU())
        self.layer2 = nn.Sequential(nn.Linear(d, d // 2), nn.GELU(), nn.Linear(d // 2, d // 4), nn.GELU(),
                                    nn.Linear(d // 4, 1))

    def forward(self, x):
        z = self.layer1(x)
        local, glob = z.split(z.shape[-1] // 2, -1)
        return self.layer2(torch.cat([local, glob.mean(1, keepdim=True).expand_as(glob)], -1)).squeeze(-1)


class ReferenceDeformableDETR(nn.Module):
    """Deformable DETR (+ box refinement, + two-stage) with the authors' names; memory_queries
    (kakaobrain/sparse-detr --eff_query_init --eff_specific_head), rho > 0 its sparse encoder
    with the scoring network, enc_aux its encoder auxiliary heads (in the head lists' tail);
    swin: on SwinBody (ResNet-18 otherwise)."""

    def __init__(self, d=64, heads=4, layers=2, ffn=64, levels=4, points=2, queries=10, rows=91,
                 refine=False, two_stage=False, memory_queries=False, rho=0.0, enc_aux=False, swin=False):
        super().__init__()
        self.d, self.levels, self.queries, self.rho = d, levels, queries, rho
        self.two_stage, self.memory_queries = two_stage, memory_queries
        body = SwinBody() if swin else Body({"layer2": "0", "layer3": "1", "layer4": "2"})
        self.backbone = nn.ModuleList([body])
        channels = (64, 128, 256) if swin else (128, 256, 512)
        projs = [nn.Sequential(nn.Conv2d(c, d, 1), nn.GroupNorm(32, d)) for c in channels]
        projs += [nn.Sequential(nn.Conv2d(channels[-1] if i == 0 else d, d, 3, stride=2, padding=1),
                                nn.GroupNorm(32, d)) for i in range(levels - 3)]
        self.input_proj = nn.ModuleList(projs)
        tr = self.transformer = nn.Module()
        tr.level_embed = nn.Parameter(torch.empty(levels, d))
        if rho:
            tr.enc_mask_predictor = ScoringNet(d)
        tr.encoder = Stack([DeformEncoderLayer(d, heads, ffn, levels, points) for _ in range(layers)])
        tr.decoder = Stack([DeformDecoderLayer(d, heads, ffn, levels, points) for _ in range(layers)])
        if two_stage:
            tr.enc_output, tr.enc_output_norm = nn.Linear(d, d), nn.LayerNorm(d)
            width = d if memory_queries else 2 * d
            tr.pos_trans, tr.pos_trans_norm = nn.Linear(2 * d, width), nn.LayerNorm(width)
        else:
            tr.reference_points = nn.Linear(d, 2)
            self.query_embed = nn.Embedding(queries, 2 * d)
        count = layers + int(two_stage) + (layers - 1 if enc_aux else 0)
        if refine or enc_aux:
            self.class_embed = nn.ModuleList(nn.Linear(d, rows) for _ in range(count))
            self.bbox_embed = nn.ModuleList(MLP(d, 4) for _ in range(count))
        else:
            shared_class, shared_box = nn.Linear(d, rows), MLP(d, 4)
            self.class_embed = nn.ModuleList([shared_class] * count)
            self.bbox_embed = nn.ModuleList([shared_box] * count)
        # the transformer holds the lists a second time, and its decoder refines the boxes
        # with them: box refinement, and every two-stage model of kakaobrain/sparse-detr
        self.refining = refine or (two_stage and memory_queries)
        if self.refining:
            tr.decoder.bbox_embed = self.bbox_embed
        if two_stage:
            tr.decoder.class_embed = self.class_embed
        if enc_aux:
            tr.encoder.class_embed = self.class_embed[-(layers - 1):]
            tr.encoder.bbox_embed = self.bbox_embed[-(layers - 1):]
        randomise(self, 0.1)

    # ------------------------------------------------------------------ pieces
    def maps(self, images, mask):
        features = self.backbone[0](images, mask)
        srcs = [proj(x) for proj, (x, _) in zip(self.input_proj, features)]
        masks = [m for _, m in features]
        for lvl in range(len(features), self.levels):
            srcs.append(self.input_proj[lvl](features[-1][0] if lvl == len(features) else srcs[-1]))
            masks.append(resized_mask(mask, srcs[-1].shape[-2:]))
        return srcs, masks

    @staticmethod
    def centres(h: int, w: int) -> tuple[Tensor, Tensor]:
        y, x = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        return x.flatten(), y.flatten()

    def proposals(self, pad, shapes):
        """A box per token (centre over the valid extent, side 0.05 * 2^level) as logits, inf
        where padded or not inside (0.01, 0.99); and that validity."""
        boxes, start = [], 0
        for lvl, (h, w) in enumerate(shapes):
            m = pad[:, start:start + h * w].view(-1, h, w)
            start += h * w
            x, y = self.centres(h, w)
            cx = x[None] / (~m[:, 0, :]).sum(1, keepdim=True)
            cy = y[None] / (~m[:, :, 0]).sum(1, keepdim=True)
            side = torch.full_like(cx, 0.05 * 2 ** lvl)
            boxes.append(torch.stack([cx, cy, side, side], -1))
        boxes = torch.cat(boxes, 1)
        valid = ((boxes > 0.01) & (boxes < 0.99)).all(-1, keepdim=True)
        out = torch.log(boxes / (1 - boxes)).masked_fill(pad[..., None], float("inf"))
        return out.masked_fill(~valid, float("inf")), valid

    def project(self, x, pad, valid):
        x = x.masked_fill(pad[..., None], 0.0).masked_fill(~valid, 0.0)
        return self.transformer.enc_output_norm(self.transformer.enc_output(x))

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor, mask: Tensor) -> dict:
        tr = self.transformer
        srcs, masks = self.maps(images, mask)
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        pos = [sine_embedding(m, self.d // 2, -0.5) for m in masks]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pad = torch.cat([m.flatten(1) for m in masks], 1)
        pos = torch.cat([p.flatten(2).transpose(1, 2) + tr.level_embed[lvl] for lvl, p in enumerate(pos)], 1)
        ratios = torch.stack([torch.stack([(~m[:, 0, :]).sum(1) / m.shape[2], (~m[:, :, 0]).sum(1) / m.shape[1]], -1)
                              for m in masks], 1).float()  # (B, L, 2) as (w, h)
        refs = []
        for lvl, (h, w) in enumerate(shapes):
            x, y = self.centres(h, w)
            refs.append(torch.stack([x[None] / (ratios[:, None, lvl, 0] * w),
                                     y[None] / (ratios[:, None, lvl, 1] * h)], -1))
        refs = torch.cat(refs, 1)[:, :, None] * ratios[:, None]  # (B, S, L, 2)
        # encoder: dense, or Sparse DETR's: the scored tokens only, queries into the whole map
        memory = src
        if self.rho:
            proposals, valid = self.proposals(pad, shapes)
            scores = tr.enc_mask_predictor(self.project(src + pos, pad, valid))
            scores = scores.masked_fill(pad, scores.min())
            counts = ((~pad).sum(1) * self.rho).int() + 1
            top = scores.topk(int(counts.max()), dim=1).indices
            take = lambda t: torch.stack([t[i, top[i]] for i in range(len(t))])  # noqa: E731
            query, qpos, qref = take(src), take(pos), take(refs)
            for layer in tr.encoder.layers:
                query = layer(query, qpos, qref, memory, shapes, pad)
                memory = torch.stack([memory[i].index_copy(0, top[i, :counts[i]], query[i, :counts[i]])
                                      for i in range(len(memory))])
        else:
            for layer in tr.encoder.layers:
                memory = layer(memory, pos, refs, memory, shapes, pad)
        # queries: learnt, or the best encoder proposals
        n = len(tr.decoder.layers)
        if self.two_stage:
            proposals, valid = self.proposals(pad, shapes)
            out_memory = self.project(memory, pad, valid)
            enc_logits = self.class_embed[n](out_memory)
            enc_boxes = self.bbox_embed[n](out_memory) + proposals
            score = enc_logits.max(-1).values if self.memory_queries else enc_logits[..., 0]
            top = score.topk(self.queries, dim=1).indices
            boxes = torch.stack([enc_boxes[i, top[i]] for i in range(len(top))])
            reference = boxes.sigmoid()
            embedded = tr.pos_trans_norm(tr.pos_trans(box_sine(boxes, self.d // 2)))
            if self.memory_queries:
                query_pos, t = embedded, torch.stack([memory[i, top[i]] for i in range(len(top))])
            else:
                query_pos, t = embedded.split(self.d, -1)
        else:
            query_pos, t = self.query_embed.weight.split(self.d, -1)
            query_pos, t = query_pos.expand(len(src), -1, -1), t.expand(len(src), -1, -1)
            reference = tr.reference_points(query_pos).sigmoid()
        logits, boxes = [], []
        for lid, layer in enumerate(tr.decoder.layers):
            scale = ratios if reference.shape[-1] == 2 else torch.cat([ratios, ratios], -1)
            t = layer(t, query_pos, reference[:, :, None] * scale[:, None], memory, shapes, pad)
            delta = self.bbox_embed[lid](t)
            if reference.shape[-1] == 4:
                box = (delta + logit(reference)).sigmoid()
            else:
                box = torch.cat([delta[..., :2] + logit(reference), delta[..., 2:]], -1).sigmoid()
            logits.append(self.class_embed[lid](t))
            boxes.append(box)
            if self.refining:
                reference = box.detach()
        return {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
