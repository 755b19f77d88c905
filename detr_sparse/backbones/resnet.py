"""torchvision ResNet as a detection backbone: named multi-scale maps with their channels
and strides, detectron2-style (`res2` .. `res5`)."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops.misc import FrozenBatchNorm2d

from .levels import LEVEL_NAMES, check_out_features

_STAGES = ["layer1", "layer2", "layer3", "layer4"]


class FusedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d (same buffers, same result) computed by batch norm's
    inference kernel: one pass over the map instead of a multiply and an add, which on a CPU
    saves about 10% of a ResNet-50's forward time at 800x1066."""

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)


def _norm_layer(norm: str):
    if norm == "frozen_bn":
        return FusedFrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        return lambda channels: nn.GroupNorm(32, channels)
    raise ValueError(f"model.backbone.norm: unknown norm '{norm}' (frozen_bn | bn | gn)")


class ResNetBackbone(nn.Module):
    """forward(x: (B, 3, H, W)) -> OrderedDict of the requested maps, e.g. {"res5": (B, 2048, H/32, W/32)}.

    `dilation` (DC5) replaces the stride of the last stage by dilation: res5 has stride 16.
    `freeze_at` stops the gradient of the first stages: 0 none, 1 the stem, 2 stem and res2
    (DETR with ImageNet weights), 3 up to res3, ...; -1 picks 2 for frozen_bn and 0 for a
    trainable norm (training from scratch).
    """

    def __init__(self, name: str = "resnet50", norm: str = "frozen_bn", dilation: bool = False,
                 out_features: tuple[str, ...] = ("res5",), pretrained: str = "",
                 channels_last: bool = True, freeze_at: int = -1):
        super().__init__()
        if not hasattr(torchvision.models, name) or not name.startswith("resnet"):
            raise ValueError(f"model.backbone.name: '{name}' is not a torchvision ResNet")
        net = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation],
            norm_layer=_norm_layer(norm))
        check_out_features(out_features)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        last = max(LEVEL_NAMES.index(n) for n in out_features)
        self.stages = nn.ModuleDict({LEVEL_NAMES[i]: getattr(net, _STAGES[i]) for i in range(last + 1)})
        self.out_features = tuple(out_features)
        # the last convolution of each stage's last block (conv3 in Bottleneck, conv2 in BasicBlock)
        last_convs = [getattr(getattr(net, s)[-1], "conv3", None) or getattr(net, s)[-1].conv2
                      for s in _STAGES]
        channels = [conv.out_channels for conv in last_convs]
        strides = [4, 8, 16, 16 if dilation else 32]
        self.channels = {n: channels[LEVEL_NAMES.index(n)] for n in out_features}
        self.strides = {n: strides[LEVEL_NAMES.index(n)] for n in out_features}
        self.channels_last = channels_last
        if pretrained:
            self.load_torchvision_state(pretrained)
        if freeze_at < 0:
            freeze_at = 2 if norm == "frozen_bn" else 0
        if freeze_at > len(self.stages) + 1:
            raise ValueError(f"model.backbone.freeze_at: {freeze_at} is more than the stem and "
                             f"the {len(self.stages)} stages this backbone builds")
        frozen = [self.stem, *list(self.stages.values())][:freeze_at]
        for p in (p for m in frozen for p in m.parameters()):
            p.requires_grad_(False)

    def torchvision_state_dict(self) -> dict[str, Tensor]:
        """The weights under torchvision's ResNet names (conv1, bn1, layer1, ...)."""
        return {_to_torchvision(k): v for k, v in self.state_dict().items()}

    def load_torchvision_state(self, path: str) -> None:
        """Load a torchvision-format ResNet state dict (ImageNet weights saved from torchvision,
        or tools/pretrain_backbone.py); stages this backbone does not build are ignored."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"model.backbone.pretrained: {path} not found (torchvision "
                                    "ResNet weights, or the output of tools/pretrain_backbone.py)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        wanted = {_to_torchvision(k): k for k in self.state_dict()}
        missing = sorted(set(wanted) - set(state))
        if missing:
            raise ValueError(f"{path}: missing backbone weights {missing[:8]}")
        self.load_state_dict({ours: state[theirs] for theirs, ours in wanted.items()})

    def output_shape(self) -> dict[str, dict[str, int]]:
        return {n: {"channels": self.channels[n], "stride": self.strides[n]} for n in self.out_features}

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        out = OrderedDict()
        for name, stage in self.stages.items():
            x = stage(x)
            if name in self.out_features:
                # left channels-last: the detectors' 1x1 projections run faster on it, and
                # flattening it to (B, H*W, C) tokens needs no copy
                out[name] = x
        return out


def _to_torchvision(name: str) -> str:
    """stem.0.weight -> conv1.weight, stages.res3.0.conv1.weight -> layer2.0.conv1.weight"""
    if name.startswith("stem."):
        index, rest = name[len("stem."):].split(".", 1)
        return f"{['conv1', 'bn1'][int(index)]}.{rest}"
    stage, rest = name[len("stages."):].split(".", 1)
    return f"{_STAGES[LEVEL_NAMES.index(stage)]}.{rest}"
