"""Prediction heads shared by the DETR family."""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F


class MLP(nn.Module):
    """Linear layers with ReLU between them (DETR's box head: 3 layers, last one to 4). The
    output is fp32 under bf16 autocast too: boxes in [0, 1] at bf16's 2^-8 steps would be 3 px
    apart at 800 px, and the box refinement would add up the rounding layer after layer."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x.float()
