"""torchvision Swin Transformer as a detection backbone, with the same named maps as the
ResNet backbone (`res2` .. `res5` at strides 4 .. 32)."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.swin_transformer import ShiftedWindowAttention
from torchvision.ops.misc import MLP

from ..sparsity.spa import shift_regions
from ..transformers.attention import attention
from ..transformers.detr_transformer import apply_in_chunks
from .levels import LEVEL_NAMES, check_backbone_args, checked_freeze_at

_MODELS = ("swin_t", "swin_s", "swin_b", "swin_mini")
_PATCH = 4  # stride of the patch embedding
# the score of a pair that must not attend: torchvision's -100 leaves exp(-100) ~ 4e-44, a
# subnormal float that makes the matrix products after the softmax 3-4x slower on a CPU;
# -1e4 gives exact zeros, and a row with no allowed key stays finite (unlike -inf)
MASKED = -1e4


def build_swin(name: str) -> torchvision.models.SwinTransformer:
    """torchvision's Swin by name, untrained; `swin_mini` is Swin-T's layout at a quarter of
    its width with 4 stage-3 blocks (32 / 64 / 128 / 256 channels), for the synthetic sets."""
    if name == "swin_mini":
        return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2, 4, 2],
                                                  num_heads=[1, 2, 4, 8], window_size=[7, 7])
    return getattr(torchvision.models, name)(weights=None)


class SwinBackbone(nn.Module):
    """forward(x: (B, 3, H, W)) -> OrderedDict of the requested maps, NCHW and contiguous,
    e.g. {"res3": (B, 192, ceil(H/8), ceil(W/8)), "res5": (B, 768, ceil(H/32), ceil(W/32))}
    for swin_t (swin_b: 128/256/512/1024 channels).

    `self.features` keeps torchvision's layout, [patch embed, stage 1, merge, stage 2, merge,
    stage 3, merge, stage 4] cut after the last requested stage, so its weights keep their
    torchvision names. Each output gets its own LayerNorm (as in the official detection Swin);
    torchvision's final `norm` belongs to the classifier and is not built.
    `freeze_at` as the official Swin's `frozen_stages` (Sparse DETR builds Swin-T with 2):
    0 none (-1 means 0), 1 the patch embedding, 2 it and stage 1 (res2) with the patch
    merging after it, 3 up to stage 2 (res3) and its merging, ... A stage's merging is frozen
    with it because the official Swin's stage (BasicLayer) ends with it. The output
    LayerNorms are new detection layers and always train (the official freezes none of them).
    """

    def __init__(self, name: str = "swin_t", out_features: tuple[str, ...] = ("res3", "res4", "res5"),
                 pretrained: str = "", freeze_at: int = -1, drop_path_rate: float = 0.2):
        super().__init__()
        check_backbone_args(name, _MODELS, out_features)
        net = build_swin(name)
        # the builders hard-code stochastic_depth_prob (0.2 / 0.3 / 0.5), so the linear
        # per-block schedule is redone here; it spans all 4 stages even when fewer are built,
        # so a block drops as often as in the full (pretrained) network
        blocks = [block for stage in net.features[1::2] for block in stage]
        for i, block in enumerate(blocks):
            block.stochastic_depth.p = drop_path_rate * i / (len(blocks) - 1)
        for block in blocks:
            block.mlp = ChunkedMLP.from_torchvision(block.mlp)
            block.attn = WindowAttention.from_torchvision(block.attn)
        last = max(LEVEL_NAMES.index(n) for n in out_features)
        self.features = net.features[: 2 * last + 2]
        embed_dim = net.features[0][0].out_channels
        self.out_features = tuple(out_features)
        self.channels = {n: embed_dim * 2 ** LEVEL_NAMES.index(n) for n in out_features}
        self.strides = {n: _PATCH * 2 ** LEVEL_NAMES.index(n) for n in out_features}
        self.norms = nn.ModuleDict({n: nn.LayerNorm(self.channels[n]) for n in out_features})
        if pretrained:
            self.load_torchvision_state(pretrained)
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int) -> None:
        """Stop the gradient of the stages `freeze_at` covers (see the class)."""
        freeze_at = checked_freeze_at(freeze_at, len(self.features) // 2 - 1)
        # features[] = [embed, stage 1, merge, stage 2, merge, ...]: freeze_at k covers 2k - 1
        for p in self.features[: max(2 * freeze_at - 1, 0)].parameters():
            p.requires_grad_(False)

    def fresh(self, key: str) -> bool:
        """Parameters a classification checkpoint does not hold (the output norms)."""
        return key.startswith("norms.")

    def load_torchvision_state(self, path: str) -> None:
        """Load a torchvision-format Swin state dict (keys `features.0.0.weight`, ...); stages
        not built, the final `norm` and the classification `head` are ignored. The output
        LayerNorms are detection-specific and keep their initialisation."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"model.backbone.pretrained: {path} not found (torchvision "
                                    "Swin weights saved with torch.save(model.state_dict()))")
        state = torch.load(path, map_location="cpu", weights_only=True)
        wanted = [f"features.{k}" for k in self.features.state_dict() if not self.fresh(f"features.{k}")]
        missing = [k for k in wanted if k not in state]
        if missing:
            raise ValueError(f"{path}: missing backbone weights {missing[:8]}")
        self.features.load_state_dict({k[len("features."):]: state[k] for k in wanted},
                                      strict=len(wanted) == len(self.features.state_dict()))

    def output_shape(self) -> dict[str, dict[str, int]]:
        return {n: {"channels": self.channels[n], "stride": self.strides[n]} for n in self.out_features}

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        # the patch embedding is an unpadded stride-4 convolution that would drop the last
        # H % 4 rows; zero-padding them (as the official Swin does) makes every map
        # ceil(H / stride), the same sizes as ResNet's
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % _PATCH, 0, -h % _PATCH))
        x = self.features[0](x)  # (B, H/4, W/4, C): torchvision's Swin works in NHWC
        out = OrderedDict()
        for i, name in enumerate(LEVEL_NAMES[: (len(self.features) // 2)]):
            if i > 0:
                x = self.features[2 * i](x)  # patch merging: halves H, W (padding odd sizes)
            x = self.features[2 * i + 1](x)
            if name in self.out_features:
                out[name] = self.norms[name](x).permute(0, 3, 1, 2).contiguous()
        return out


class ChunkedMLP(MLP):
    """torchvision's Swin MLP (same parameters and names), run over chunks of tokens when no
    gradient is recorded: stage 1 of Swin-T at 800x1066 has 53k tokens whose 384-wide hidden
    activations do not fit in cache whole (2.1x faster chunked)."""

    @classmethod
    def from_torchvision(cls, mlp: MLP) -> "ChunkedMLP":
        fc1, fc2 = mlp[0], mlp[3]
        new = cls(fc1.in_features, [fc1.out_features, fc2.out_features], activation_layer=nn.GELU,
                  inplace=None, dropout=mlp[2].p)
        new.load_state_dict(mlp.state_dict())
        return new

    def forward(self, x: Tensor) -> Tensor:
        return apply_in_chunks(super().forward, x)


class WindowAttention(ShiftedWindowAttention):
    """torchvision's (shifted) window attention, same parameters, names and result, faster
    on a CPU for large maps: padding, cyclic shift and window partition are one precomputed
    gather (and their reverse one more), and without gradients the windows go through the
    attention in chunks, so a chunk's query/key/value stay in cache (Swin-T stage 1 at
    800x1066 has 1,100 windows whose qkv take 60 MB)."""

    chunk_tokens = 2048

    @classmethod
    def from_torchvision(cls, attn: ShiftedWindowAttention) -> "WindowAttention":
        new = cls(attn.qkv.in_features, attn.window_size, attn.shift_size, attn.num_heads,
                  attn.qkv.bias is not None, attn.proj.bias is not None, attn.attention_dropout,
                  attn.dropout)
        new.load_state_dict(attn.state_dict())
        return new

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._layouts: dict = {}

    def layout(self, h: int, w: int, device) -> tuple[Tensor, Tensor, Tensor | None]:
        """For an h x w map: the padded-map index of every token in window order, each map
        token's position in window order, and the shift mask (windows, N, N) or None."""
        key = (h, w, str(device))
        if key not in self._layouts:
            (wh, ww), (sh, sw) = self.window_size, list(self.shift_size)
            ph, pw = -(-h // wh) * wh, -(-w // ww) * ww
            sh, sw = (0 if wh >= ph else sh), (0 if ww >= pw else sw)  # as torchvision
            grid = torch.arange(ph * pw, device=device).view(ph, pw)

            def windowed(t: Tensor) -> Tensor:
                return t.view(ph // wh, wh, pw // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)

            gather = windowed(torch.roll(grid, shifts=(-sh, -sw), dims=(0, 1))).flatten()
            position = torch.empty_like(gather)
            position[gather] = torch.arange(gather.numel(), device=device)
            position = position.view(ph, pw)[:h, :w].flatten()
            mask = None
            if sh or sw:  # tokens from different regions of the rolled map must not attend
                region = windowed(shift_regions(ph, pw, wh, sh, sw, device))
                mask = (region[:, None, :] != region[:, :, None]).float() * MASKED
            self._layouts[key] = (gather, position, mask)
        return self._layouts[key]

    def attend(self, windows: Tensor, bias: Tensor) -> Tensor:
        """windows (W, N, C) of tokens, bias (W or 1, heads, N, N) -> (W, N, C). Through
        `attention` (fp32: scaled_dot_product_attention, 1.3-2.3x faster on a CPU than
        torchvision's written-out softmax, a shifted Swin-T stage-3 block at 800x1280: 118 ->
        51 ms; bf16 on a CPU: the written-out form, 2x faster there)."""
        n, c, heads = windows.shape[1], windows.shape[2], self.num_heads
        qkv = F.linear(windows, self.qkv.weight, self.qkv.bias)
        q, k, v = qkv.view(-1, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v, bias.to(q.dtype).expand(len(q), -1, -1, -1),
                        self.attention_dropout if self.training else 0.0)
        out = F.linear(out.transpose(1, 2).reshape(-1, n, c), self.proj.weight, self.proj.bias)
        return F.dropout(out, p=self.dropout, training=self.training)

    def forward(self, x: Tensor, key_valid: Tensor | None = None) -> Tensor:
        """x (B, H, W, C) -> (B, H, W, C). key_valid (B, H, W) bool: only these tokens are
        keys (a window's padding is then left out too, where torchvision attends to zeros)."""
        b, h, w, c = x.shape
        gather, position, mask = self.layout(h, w, x.device)
        (wh, ww) = self.window_size
        n = wh * ww
        padded = F.pad(x, (0, 0, 0, -w % ww, 0, -h % wh)).flatten(1, 2)
        windows = padded[:, gather].view(-1, n, c)  # (B * windows, N, C)
        bias = self.get_relative_position_bias()  # (1, heads, N, N)
        if mask is not None:
            bias = (bias + mask[:, None]).repeat(b, 1, 1, 1)  # (B * windows, heads, N, N)
        if key_valid is not None:  # as the shift mask (a window wholly outside the image stays finite)
            keys = F.pad(key_valid, (0, -w % ww, 0, -h % wh)).flatten(1)[:, gather].view(-1, 1, 1, n)
            bias = bias + (~keys).to(bias.dtype) * MASKED
        step = max(self.chunk_tokens // n, 1)
        if torch.is_grad_enabled() or windows.shape[0] <= step:
            out = self.attend(windows, bias)
        else:
            out = torch.cat([self.attend(windows[i:i + step], bias if bias.shape[0] == 1 else bias[i:i + step])
                             for i in range(0, windows.shape[0], step)])
        return out.view(b, -1, c)[:, position].view(b, h, w, c)
