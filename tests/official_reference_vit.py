"""The ViT formats' authors' layouts and computations, written for the tests from the authors' code
(StevenGrove/vtpack: `vtpack/models/dge/deit_dge.py`, `vtpack/layers/dge.py`; uzh-rpg/svit:
`mmdet_custom/models/backbones/selective_vit_adapter.py`, `adapter_modules.py`, `base/
selective_vit.py`, the ViT-Adapter's timm ViT, and mmdet 2.x's FPN, RPNHead, Shared2FCBBoxHead,
FCNMaskHead, AnchorGenerator and DeltaXYWHBBoxCoder), independently of the project's modules.

No key list of these checkpoints is on disk: `vtpack_shapes` and `mmdet_adapter_shapes` list the
state dict (key -> shape) the authors' models hold, `ReferenceDGEDeiT` is their DGE DeiT with
their names (the dense form of a DGE block, gates by argmax as in their evaluation), and the
`mmdet_*` functions run mmdet's heads from a state dict of their names.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

MMDET_STD = (0.1, 0.1, 0.2, 0.2)  # the RoI box coder's target stds (means 0)


# --------------------------------------------------------------------------- key -> shape
def _linear(prefix: str, out: int, inp: int, bias: bool = True) -> dict[str, list[int]]:
    return {f"{prefix}.weight": [out, inp], **({f"{prefix}.bias": [out]} if bias else {})}


def _conv(prefix: str, out: int, inp: int, k: int, bias: bool = True) -> dict[str, list[int]]:
    return {f"{prefix}.weight": [out, inp, k, k], **({f"{prefix}.bias": [out]} if bias else {})}


def _norm(prefix: str, dim: int, batch: bool = False) -> dict[str, list[int]]:
    stats = {f"{prefix}.running_mean": [dim], f"{prefix}.running_var": [dim], f"{prefix}.num_batches_tracked": []}
    return {f"{prefix}.weight": [dim], f"{prefix}.bias": [dim], **(stats if batch else {})}


def vtpack_shapes(dim: int = 384, depth: int = 12, grid: int = 16, classes: int = 1000) -> dict[str, list[int]]:
    """`deit_dge_s124_*_patch16_256`'s state dict: a class token, 1 + 16 x 16 position rows, each
    block's q / kv / proj attention, MLP of 4 x the width and DGE (frozen split sizes, router
    Linear(C, 3)), the final norm and the 1000-way head."""
    out = {"cls_token": [1, 1, dim], "pos_embed": [1, 1 + grid * grid, dim], **_conv("patch_embed.proj", dim, 3, 16)}
    for i in range(depth):
        b = f"blocks.{i}"
        out.update({**_norm(f"{b}.norm1", dim), **_linear(f"{b}.attn.q", dim, dim),
                    **_linear(f"{b}.attn.kv", 2 * dim, dim), **_linear(f"{b}.attn.proj", dim, dim),
                    **_norm(f"{b}.norm2", dim), **_linear(f"{b}.mlp.fc1", 4 * dim, dim),
                    **_linear(f"{b}.mlp.fc2", dim, 4 * dim), f"{b}.dge.splits": [3],
                    **_linear(f"{b}.dge.router.gate", 3, dim)})
    return {**out, **_norm("norm", dim), **_linear("head", classes, dim)}


def _deform(prefix: str, dim: int, levels: int, heads: int = 6, points: int = 4) -> dict[str, list[int]]:
    return {**_linear(f"{prefix}.sampling_offsets", heads * levels * points * 2, dim),
            **_linear(f"{prefix}.attention_weights", heads * levels * points, dim),
            **_linear(f"{prefix}.value_proj", dim, dim), **_linear(f"{prefix}.output_proj", dim, dim)}


def _extractor(prefix: str, dim: int) -> dict[str, list[int]]:
    hidden = int(dim * 0.25)
    return {**_norm(f"{prefix}.query_norm", dim), **_norm(f"{prefix}.feat_norm", dim),
            **_deform(f"{prefix}.attn", dim, 1), **_linear(f"{prefix}.ffn.fc1", hidden, dim),
            f"{prefix}.ffn.dwconv.dwconv.weight": [hidden, 1, 3, 3], f"{prefix}.ffn.dwconv.dwconv.bias": [hidden],
            **_linear(f"{prefix}.ffn.fc2", dim, hidden), **_norm(f"{prefix}.ffn_norm", dim)}


def mmdet_adapter_shapes(dim: int = 192, depth: int = 12, gates: bool = False, classes: int = 80, fpn: int = 256,
                         fc: int = 1024, mask: int = 256, planes: int = 64) -> dict[str, list[int]]:
    """The mmdet Mask R-CNN of `vit-adapter-{t,s}-3x` (gates=False: timm blocks) or
    `svit-adapter-{t,s}-*-ftune` (gates: nn.TransformerEncoderLayer blocks and a selective
    module before each block of the last three quarters); FPN of `fpn` channels on the four
    maps, RPN with 3 anchors, box head of two `fc` layers, mask head of four `mask` convs."""
    b = "backbone"
    out = {f"{b}.pos_embed": [1, 197, dim], **_conv(f"{b}.patch_embed.proj", dim, 3, 16), f"{b}.level_embed": [3, dim]}
    for i in range(depth):
        if gates:
            p = f"{b}.blocks.{i}.TransformerEncoderLayer"
            out.update({f"{p}.self_attn.in_proj_weight": [3 * dim, dim], f"{p}.self_attn.in_proj_bias": [3 * dim],
                        **_linear(f"{p}.self_attn.out_proj", dim, dim), **_linear(f"{p}.linear1", 4 * dim, dim),
                        **_linear(f"{p}.linear2", dim, 4 * dim), **_norm(f"{p}.norm1", dim),
                        **_norm(f"{p}.norm2", dim)})
        else:
            p = f"{b}.blocks.{i}"
            out.update({**_norm(f"{p}.norm1", dim), **_linear(f"{p}.attn.qkv", 3 * dim, dim),
                        **_linear(f"{p}.attn.proj", dim, dim), **_norm(f"{p}.norm2", dim),
                        **_linear(f"{p}.mlp.fc1", 4 * dim, dim), **_linear(f"{p}.mlp.fc2", dim, 4 * dim)})
    for k in range(depth - depth // 4 if gates else 0):
        p = f"{b}.selective_modules.{k}"
        out.update({**_norm(f"{p}.norm", dim), **_linear(f"{p}.mlp.fc1", dim // 4, dim),
                    **_linear(f"{p}.mlp.fc2", 2, dim // 4)})
    for index, cin, cout in ((0, 3, planes), (3, planes, planes), (6, planes, planes)):  # conv, BN, ReLU; max-pool
        out.update({**_conv(f"{b}.spm.stem.{index}", cout, cin, 3, bias=False),
                    **_norm(f"{b}.spm.stem.{index + 1}", cout, True)})
    for n, cin, cout in ((2, planes, 2 * planes), (3, 2 * planes, 4 * planes), (4, 4 * planes, 4 * planes)):
        out.update({**_conv(f"{b}.spm.conv{n}.0", cout, cin, 3, bias=False), **_norm(f"{b}.spm.conv{n}.1", cout, True)})
    for n, cin in enumerate((planes, 2 * planes, 4 * planes, 4 * planes), 1):
        out.update(_conv(f"{b}.spm.fc{n}", dim, cin, 1))
    for i in range(4):
        p = f"{b}.interactions.{i}"
        out.update({f"{p}.injector.gamma": [dim], **_norm(f"{p}.injector.query_norm", dim),
                    **_norm(f"{p}.injector.feat_norm", dim), **_deform(f"{p}.injector.attn", dim, 3),
                    **_extractor(f"{p}.extractor", dim)})
    for j in range(2):
        out.update(_extractor(f"{b}.interactions.3.extra_extractors.{j}", dim))
    out.update(_conv(f"{b}.up", dim, dim, 2))
    out[f"{b}.up.weight"] = [dim, dim, 2, 2]  # a transposed convolution: (in, out, k, k)
    for n in range(1, 5):
        out.update(_norm(f"{b}.norm{n}", dim, True))
    for i in range(4):
        out.update({**_conv(f"neck.lateral_convs.{i}.conv", fpn, dim, 1),
                    **_conv(f"neck.fpn_convs.{i}.conv", fpn, fpn, 3)})
    out.update({**_conv("rpn_head.rpn_conv", fpn, fpn, 3), **_conv("rpn_head.rpn_cls", 3, fpn, 1),
                **_conv("rpn_head.rpn_reg", 12, fpn, 1)})
    h = "roi_head.bbox_head"
    out.update({**_linear(f"{h}.shared_fcs.0", fc, fpn * 49), **_linear(f"{h}.shared_fcs.1", fc, fc),
                **_linear(f"{h}.fc_cls", classes + 1, fc), **_linear(f"{h}.fc_reg", 4 * classes, fc)})
    m = "roi_head.mask_head"
    for i in range(4):
        out.update(_conv(f"{m}.convs.{i}.conv", mask, fpn if i == 0 else mask, 3))
    return {**out, **_conv(f"{m}.upsample", mask, mask, 2), **_conv(f"{m}.conv_logits", classes, mask, 1)}


def random_state(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, Tensor]:
    """Random tensors of these shapes at a trained model's scale: weights of std 1 / sqrt(fan-in),
    norm scales near 1, small biases; DGE split sizes (4, 2, 1), batch norm counters and
    positive variances as the authors' are."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("dge.splits"):
            out[key] = torch.tensor([4, 2, 1])
        elif key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(1000)
        elif len(shape) >= 2:
            out[key] = torch.randn(shape, generator=g).mul_(1 / math.sqrt(math.prod(shape[1:])))
        else:
            value = torch.randn(shape, generator=g).mul_(0.1)
            out[key] = value.abs_().add_(0.5) if key.endswith("running_var") else value.add_(key.endswith(".weight"))
    return out


def numbered_state(shapes: dict[str, list[int]]) -> dict[str, Tensor]:
    """Tensors of these shapes, each holding its own number (its place in `shapes`) everywhere:
    where a converted tensor came from shows in its values. Views of one number each (no memory),
    so that the full-size models cost nothing to make and rename."""
    special = random_state({k: v for k, v in shapes.items() if k.endswith(("dge.splits", "num_batches_tracked"))})
    return {k: special[k] if k in special else torch.tensor(float(i)).expand(v)
            for i, (k, v) in enumerate(shapes.items())}


# --------------------------------------------------------------------------- vtpack's DGE DeiT
class _Attention(nn.Module):
    """Queries projected by `q`, keys and values by `kv` (keys first), softmax(q k^T / sqrt(d)) v."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor, q: Tensor) -> Tensor:
        b, n, c = x.shape
        d = c // self.heads
        q = self.q(q).view(b, -1, self.heads, d).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.heads, d).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-1, -2) * d ** -0.5).softmax(-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, -1, c))


class _Router(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Linear(dim, 3)


class _DGE(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.splits = nn.Parameter(torch.tensor([4, 2, 1]), requires_grad=False)
        self.router = _Router(dim)


class _Mlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ReferenceDGEBlock(nn.Module):
    """A DGE block in the dense form of the authors' training path: every option's queries
    (the means of the raw tokens over 1 x 1, 2 x 2 and 4 x 4 patches of each 4 x 4 region) go
    through attention (keys / values: the whole normalised map) and the MLP; each region's
    one-hot gate picks its option's changes, spread back over their patches and added."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp, self.dge = _Attention(dim, heads), _Mlp(dim), _DGE(dim)

    def forward(self, x: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
        b, n, c = x.shape
        grid = x.transpose(1, 2).reshape(b, c, h, w)
        logits = self.dge.router.gate(F.avg_pool2d(grid, 4).permute(0, 2, 3, 1))  # (B, h/4, w/4, 3)
        gates = F.one_hot(logits.argmax(-1), 3).to(x.dtype)
        sides = [4 // int(s) for s in self.dge.splits]
        pooled = [F.avg_pool2d(grid, side) for side in sides]
        q_in = torch.cat([p.flatten(2).transpose(1, 2) for p in pooled], 1)
        q = q_in + self.attn(self.norm1(x), self.norm1(q_in))
        q = q + self.mlp(self.norm2(q))
        out = grid
        for k, (part, p, side) in enumerate(zip((q - q_in).split([p.shape[2] * p.shape[3] for p in pooled], 1),
                                                pooled, sides)):
            change = part.transpose(1, 2).reshape(b, c, *p.shape[2:])
            gate = gates[..., k].repeat_interleave(4 // side, 1).repeat_interleave(4 // side, 2)[:, None]
            out = out + (change * gate).repeat_interleave(side, 2).repeat_interleave(side, 3)
        return out.flatten(2).transpose(1, 2), logits


class ReferenceDGEDeiT(nn.Module):
    """The authors' DGE DeiT with their names, on a `grid` x `grid` patch map; `tokens(x)` runs
    the patch tokens without the class token (as a detection backbone reads the map) through
    the blocks: -> tokens before the final norm, each block's router logits."""

    def __init__(self, dim: int = 192, depth: int = 4, heads: int = 3, grid: int = 16, classes: int = 10):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, dim) * 0.02)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 16, 16)
        self.blocks = nn.ModuleList(ReferenceDGEBlock(dim, heads) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, classes)
        for block in self.blocks:  # routers that choose all three options
            nn.init.normal_(block.dge.router.gate.weight, std=0.5)

    def tokens(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = self.patch_embed.proj(x)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
        logits = []
        for block in self.blocks:
            x, block_logits = block(x, h, w)
            logits.append(block_logits)
        return x, logits


# --------------------------------------------------------------------------- uzh-rpg/svit's blocks and gate
def _layer_norm(x: Tensor, sd: dict, prefix: str, eps: float) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps)


def _attend(x: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor, heads: int) -> Tensor:
    b, n, c = x.shape
    q, k, v = F.linear(x, w_in, b_in).view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-1, -2) / math.sqrt(c // heads)).softmax(-1)
    return F.linear((weights @ v).transpose(1, 2).reshape(b, n, c), w_out, b_out)


def timm_block(sd: dict, p: str, x: Tensor, heads: int) -> Tensor:
    """The ViT-Adapter's dense block (timm names, LayerNorm eps 1e-6)."""
    x = x + _attend(_layer_norm(x, sd, f"{p}.norm1", 1e-6), sd[f"{p}.attn.qkv.weight"], sd[f"{p}.attn.qkv.bias"],
                    sd[f"{p}.attn.proj.weight"], sd[f"{p}.attn.proj.bias"], heads)
    hidden = F.gelu(F.linear(_layer_norm(x, sd, f"{p}.norm2", 1e-6), sd[f"{p}.mlp.fc1.weight"],
                             sd[f"{p}.mlp.fc1.bias"]))
    return x + F.linear(hidden, sd[f"{p}.mlp.fc2.weight"], sd[f"{p}.mlp.fc2.bias"])


def encoder_layer_block(sd: dict, p: str, x: Tensor, heads: int, eps: float = 1e-5) -> Tensor:
    """SViT's block: PyTorch's pre-norm nn.TransformerEncoderLayer with GELU (its LayerNorms
    keep PyTorch's eps 1e-5; the project's blocks have DeiT's 1e-6)."""
    a = f"{p}.TransformerEncoderLayer"
    x = x + _attend(_layer_norm(x, sd, f"{a}.norm1", eps), sd[f"{a}.self_attn.in_proj_weight"],
                    sd[f"{a}.self_attn.in_proj_bias"], sd[f"{a}.self_attn.out_proj.weight"],
                    sd[f"{a}.self_attn.out_proj.bias"], heads)
    hidden = F.gelu(F.linear(_layer_norm(x, sd, f"{a}.norm2", eps), sd[f"{a}.linear1.weight"], sd[f"{a}.linear1.bias"]))
    return x + F.linear(hidden, sd[f"{a}.linear2.weight"], sd[f"{a}.linear2.bias"])


def selective_module(sd: dict, p: str, x: Tensor) -> tuple[Tensor, Tensor]:
    """SViT's gate in evaluation: (log-probabilities (B, N, 2), keep (B, N)): keep is the
    argmin of the log-probabilities being 1, i.e. the first (keep) beating the second."""
    hidden = F.gelu(F.linear(_layer_norm(x, sd, f"{p}.norm", 1e-5), sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"]))
    log_probs = F.linear(hidden, sd[f"{p}.mlp.fc2.weight"], sd[f"{p}.mlp.fc2.bias"]).log_softmax(-1)
    return log_probs, torch.argmin(log_probs, dim=-1).bool()


# --------------------------------------------------------------------------- mmdet 2.x heads
def _conv2d(x: Tensor, sd: dict, p: str, padding: int = 0) -> Tensor:
    return F.conv2d(x, sd[f"{p}.weight"], sd[f"{p}.bias"], padding=padding)


def mmdet_fpn(sd: dict, maps: list[Tensor]) -> list[Tensor]:
    """mmdet's FPN: 1x1 laterals, top-down nearest upsampling to each finer map's size added,
    3x3 outputs, and a fifth level by max-pooling the last (kernel 1, stride 2)."""
    laterals = [_conv2d(m, sd, f"neck.lateral_convs.{i}.conv") for i, m in enumerate(maps)]
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
    outs = [_conv2d(x, sd, f"neck.fpn_convs.{i}.conv", 1) for i, x in enumerate(laterals)]
    return outs + [F.max_pool2d(outs[-1], 1, stride=2)]


def mmdet_rpn(sd: dict, x: Tensor) -> tuple[Tensor, Tensor]:
    """RPNHead on one level: (objectness logits (B, A, h, w), deltas (B, 4A, h, w))."""
    x = F.relu(_conv2d(x, sd, "rpn_head.rpn_conv", 1))
    return _conv2d(x, sd, "rpn_head.rpn_cls"), _conv2d(x, sd, "rpn_head.rpn_reg")


def mmdet_anchors(stride: int, size: tuple[int, int], ratios=(0.5, 1.0, 2.0), scale: float = 8.0) -> Tensor:
    """mmdet's anchors of one level (h * w * A, 4) xyxy: at each location (rows then columns),
    one per ratio (height / width) of side scale * stride, centred on the location's corner
    (center offset 0), not rounded."""
    ratios = torch.tensor(ratios)
    h_ratio = ratios.sqrt()
    ws, hs = stride * scale / h_ratio, stride * scale * h_ratio
    base = torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], 1)
    ys, xs = torch.meshgrid(torch.arange(size[0]) * stride, torch.arange(size[1]) * stride, indexing="ij")
    shifts = torch.stack([xs.flatten(), ys.flatten(), xs.flatten(), ys.flatten()], 1).float()
    return (shifts[:, None, :] + base[None]).reshape(-1, 4)


def mmdet_bbox_head(sd: dict, feats: Tensor) -> tuple[Tensor, Tensor]:
    """Shared2FCBBoxHead on RoI features (N, C, 7, 7): (class logits (N, K + 1), background
    last; class-specific deltas (N, 4K))."""
    x, h = feats.flatten(1), "roi_head.bbox_head"
    for i in range(2):
        x = F.relu(F.linear(x, sd[f"{h}.shared_fcs.{i}.weight"], sd[f"{h}.shared_fcs.{i}.bias"]))
    return (F.linear(x, sd[f"{h}.fc_cls.weight"], sd[f"{h}.fc_cls.bias"]),
            F.linear(x, sd[f"{h}.fc_reg.weight"], sd[f"{h}.fc_reg.bias"]))


def delta2bbox(rois: Tensor, deltas: Tensor, stds=MMDET_STD, clip: float = abs(math.log(16 / 1000))) -> Tensor:
    """DeltaXYWHBBoxCoder.decode (means 0): boxes (N, 4) and deltas (N, 4k) -> (N, 4k)."""
    d = deltas.view(deltas.shape[0], -1, 4) * torch.tensor(stds)
    dw, dh = d[..., 2].clamp(-clip, clip), d[..., 3].clamp(-clip, clip)
    px, py = ((rois[:, 0] + rois[:, 2]) * 0.5)[:, None], ((rois[:, 1] + rois[:, 3]) * 0.5)[:, None]
    pw, ph = (rois[:, 2] - rois[:, 0])[:, None], (rois[:, 3] - rois[:, 1])[:, None]
    gx, gy, gw, gh = px + pw * d[..., 0], py + ph * d[..., 1], pw * dw.exp(), ph * dh.exp()
    return torch.stack([gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5], -1).flatten(1)


def mmdet_mask_head(sd: dict, feats: Tensor) -> Tensor:
    """FCNMaskHead on RoI features (N, C, 14, 14): four 3x3 conv + ReLU, a 2x2 stride-2
    transposed conv + ReLU, 1x1 logits -> (N, K, 28, 28)."""
    x = feats
    for i in range(4):
        x = F.relu(_conv2d(x, sd, f"roi_head.mask_head.convs.{i}.conv", 1))
    m = "roi_head.mask_head"
    x = F.relu(F.conv_transpose2d(x, sd[f"{m}.upsample.weight"], sd[f"{m}.upsample.bias"], stride=2))
    return _conv2d(x, sd, f"{m}.conv_logits")
