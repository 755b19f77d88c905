"""The sampling core of multi-scale deformable attention as torch operators that count
their FLOPs alike (so benchmarks compare like with like whichever one runs):

- `detr_sparse::msda_forward`: a C++ kernel (csrc/ms_deform_attn_cpu.cpp) compiled with
  torch's cpp_extension on first use and cached; CPU only; its backward is a second kernel.
- `detr_sparse::msda_reference`: torch's grid_sample, one call per level; any device.
- `detr_sparse::msda_triton` (`msda_triton.py`): Triton kernels, for CUDA tensors.

Shapes: value (B, S, M, D) with S = sum of H_l * W_l (each level row-major, levels in
order); spatial_shapes (L, 2) int64 as (H_l, W_l); level_start_index (L,) int64;
sampling_locations (B, Q, M, L, P, 2) as (x, y) in [0, 1] of each level, bilinear with
zeros outside (grid_sample, align_corners=False); attention_weights (B, Q, M, L, P).
Output (B, Q, M * D)."""
from __future__ import annotations

import functools
import logging
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.flop_counter import register_flop_formula

_SOURCE = Path(__file__).parent / "csrc" / "ms_deform_attn_cpu.cpp"


def grid_sample_core(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                     sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """The sampling core written with grid_sample (differentiable by torch's autograd)."""
    b, _, m, d = value.shape
    _, q, _, n_levels, n_points, _ = sampling_locations.shape
    # split and reshape need the sizes as numbers: one host read (on CUDA a sync per call;
    # the kernels read them on the device)
    shapes = spatial_shapes.tolist()
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1]
    sampled = []
    for level, (value_l, (h, w)) in enumerate(zip(value.split([h * w for h, w in shapes], dim=1), shapes)):
        value_l = value_l.permute(0, 2, 3, 1).reshape(b * m, d, h, w)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # (B*M, Q, P, 2)
        sampled.append(F.grid_sample(value_l, grid, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # (B*M, D, Q, P)
    weights = attention_weights.transpose(1, 2).reshape(b * m, 1, q, n_levels * n_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # (B*M, D, Q)
    return out.view(b, m * d, q).transpose(1, 2).contiguous()


@torch.library.custom_op("detr_sparse::msda_reference", mutates_args=())
def msda_reference(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                   sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    return grid_sample_core(value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights)


@msda_reference.register_fake
def output_like(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """The fake implementation of every sampling operator: the output's shape and dtype."""
    b, q = sampling_locations.shape[:2]
    return value.new_empty(b, q, value.shape[2] * value.shape[3])


def save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def backward_by(op):
    """The autograd backward of a sampling operator whose gradients `op`(grad, *inputs)
    computes as (value, sampling_locations, attention_weights) gradients."""
    def backward(ctx, grad):
        value, shapes, starts, locations, weights = ctx.saved_tensors
        g_value, g_loc, g_weights = op(grad, value, shapes, starts, locations, weights)
        return g_value, None, None, g_loc, g_weights

    return backward


def _reference_gradients(grad, value, shapes, starts, locations, weights):
    # the reference is the yardstick, not the fast path: recompute and let autograd differentiate
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (value, locations, weights)]
        out = grid_sample_core(leaves[0], shapes, starts, leaves[1], leaves[2])
        return torch.autograd.grad(out, leaves, grad)


msda_reference.register_autograd(backward_by(_reference_gradients), setup_context=save_inputs)


# at::parallel_for is an OpenMP pragma in torch's headers when torch runs on OpenMP (Linux
# wheels): built without -fopenmp, the kernel runs on one thread (measured: 2 threads 49.5 ->
# 26.9 ms with it). The process's OpenMP runtime is torch's own (same soname), so
# torch.set_num_threads governs the kernel too.
_OPENMP = sys.platform.startswith("linux") and torch.backends.openmp.is_available()


def _build(flags: list[str]) -> None:
    from torch.utils.cpp_extension import load

    load(name="detr_sparse_msda_cpu", sources=[str(_SOURCE)], extra_cflags=["-O3", *flags], extra_ldflags=flags,
         is_python_module=False, verbose=False)


@functools.cache
def _kernel():
    """The compiled kernel's forward op, or None (with a warning) when it cannot be built."""
    # importing cpp_extension on a machine without CUDA logs a warning about CUDA_HOME that
    # concerns CUDA builds only
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    error = None
    for flags in [["-fopenmp"]] * _OPENMP + [[]]:
        try:
            _build(flags)
            break
        except Exception as e:  # no compiler, no ninja, no OpenMP, ...: the reference still works
            error = error or e
    else:
        warnings.warn(f"deformable attention: the C++ kernel {_SOURCE.name} did not build "
                      f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                      "using the grid_sample reference")
        return None
    op = torch.ops.detr_sparse.msda_forward
    torch.library.register_autograd("detr_sparse::msda_forward", backward_by(torch.ops.detr_sparse.msda_backward),
                                    setup_context=save_inputs)
    register_flop_formula(op)(flops)
    return op


def available() -> bool:
    """Whether the C++ kernel is built (building it on the first call)."""
    return _kernel() is not None


def msda_fast(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
              sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """The C++ kernel; it computes in fp32 or fp64, so other dtypes (bf16 autocast) go
    through fp32."""
    op = _kernel()
    if op is None:
        raise RuntimeError(f"deformable attention: the C++ kernel {_SOURCE.name} is not available")
    dtype = value.dtype
    compute = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    out = op(value.to(compute), spatial_shapes, level_start_index,
             sampling_locations.to(compute), attention_weights.to(compute))
    return out.to(dtype)


def flops(value_shape, shapes_shape, starts_shape, loc_shape, weights_shape, *args,
          out_shape=None, **kwargs) -> int:
    """Per sample and channel: 4 multiply-adds of the bilinear read and 1 of the attention
    weighting; torch's counter counts a multiply-add as 2."""
    b, q, m, n_levels, n_points, _ = loc_shape
    return 2 * 5 * b * q * m * n_levels * n_points * value_shape[3]


register_flop_formula(torch.ops.detr_sparse.msda_reference)(flops)
