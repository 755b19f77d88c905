"""The sampling core of multi-scale deformable attention as Triton kernels
(`msda_triton_kernels.py`), for CUDA tensors: the torch operator `detr_sparse::msda_triton`,
with the inputs, output, FLOP count and gradients of the other two (`msda_ops`), and a
fake implementation, so torch.compile and torch.export trace models that use it.

value may be fp32, bf16, fp16 (or fp64); sampling_locations and attention_weights any
floating dtype; the kernels sum in fp32 (fp64 for fp64 value) and return value's dtype;
each gradient comes in its input's dtype (the value gradient is summed in an fp32 buffer).
No host sync: the level shapes are read on the device, and not checked against value's
length there (a read off value's end is masked instead).

On CPU tensors the kernels run in Triton's interpreter when TRITON_INTERPRET=1 (slow:
for tests). Triton decides between compiling and interpreting when it decorates a kernel,
so the kernel file is loaded once per mode, when first needed: a process may set the
variable after importing triton, e.g. a test with monkeypatch.setenv."""
from __future__ import annotations

import functools
import importlib.util
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import msda_ops

try:
    import triton
except Exception:  # not installed, or an install that fails to import: the reference runs
    triton = None

_KERNELS = Path(__file__).with_name("msda_triton_kernels.py")


def available() -> bool:
    """Whether triton imports (the kernels compile on first use, per dtype)."""
    return triton is not None


def interpreting() -> bool:
    """Whether Triton's interpreter is on (TRITON_INTERPRET=1, read now)."""
    return triton is not None and bool(triton.knobs.runtime.interpret)


@functools.cache
def _kernels(interpret: bool):
    """The kernel module, decorated for Triton's interpreter or for compiling."""
    name = f"{__package__}.msda_triton_kernels_{'interpreted' if interpret else 'compiled'}"
    spec = importlib.util.spec_from_file_location(name, _KERNELS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    with triton.knobs.runtime.scope():  # restores TRITON_INTERPRET afterwards
        triton.knobs.runtime.interpret = interpret
        spec.loader.exec_module(module)
    return module


def _launch(value: Tensor, sampling_locations: Tensor):
    """(kernel module, grid, constants) for these inputs; raises where the kernels cannot run."""
    if triton is None:
        raise RuntimeError("deformable attention: the Triton kernel needs triton, which does not import here")
    if value.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"deformable attention: the Triton kernel runs on CUDA tensors, or on CPU tensors in "
                           f"Triton's interpreter (TRITON_INTERPRET=1); got {value.device.type} tensors")
    b, _, m, d = value.shape
    block_d = triton.next_power_of_2(d)
    block_q = max(16, min(64, 2048 // block_d))
    acc = triton.language.float64 if value.dtype == torch.float64 else triton.language.float32
    grid = (triton.cdiv(sampling_locations.shape[1], block_q), b * m)
    return _kernels(interpreting()), grid, dict(ACC=acc, BLOCK_Q=block_q, BLOCK_D=block_d)


def _check(value: Tensor, shapes: Tensor, starts: Tensor, loc: Tensor, attn: Tensor) -> None:
    """The C++ kernel's checks that need no tensor's values (they would cost a sync)."""
    ok = (value.dim() == 4 and loc.dim() == 6 and loc.shape[5] == 2 and attn.shape == loc.shape[:5]
          and shapes.shape == (loc.shape[3], 2) and starts.numel() == loc.shape[3]
          and loc.shape[0] == value.shape[0] and loc.shape[2] == value.shape[2])
    if not ok:
        raise RuntimeError(f"deformable attention: expected value (B, S, M, D), spatial_shapes (L, 2), "
                           f"level_start_index (L,), sampling_locations (B, Q, M, L, P, 2), attention_weights "
                           f"(B, Q, M, L, P); got {list(value.shape)}, {list(shapes.shape)}, "
                           f"{list(starts.shape)}, {list(loc.shape)}, {list(attn.shape)}")


def _device(t: Tensor):
    # Triton launches on the current CUDA device: make it the inputs'
    return torch.cuda.device(t.device) if t.is_cuda else nullcontext()


def _prepared(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return (value.contiguous(), spatial_shapes.to(torch.int64).contiguous(),
            level_start_index.to(torch.int64).contiguous(), sampling_locations.contiguous(),
            attention_weights.contiguous())


def _sizes(value: Tensor, loc: Tensor) -> tuple[int, ...]:
    """S, Q, M, D, L, P."""
    return value.shape[1], loc.shape[1], value.shape[2], value.shape[3], loc.shape[3], loc.shape[4]


@torch.library.custom_op("detr_sparse::msda_triton", mutates_args=())
def msda_triton(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    value, shapes, starts, loc, attn = _prepared(value, spatial_shapes, level_start_index,
                                                 sampling_locations, attention_weights)
    kernels, grid, constants = _launch(value, loc)
    out = value.new_empty(loc.shape[0], loc.shape[1], value.shape[2] * value.shape[3])
    with _device(value):
        kernels.msda_forward_kernel[grid](value, shapes, starts, loc, attn, out, *_sizes(value, loc), **constants)
    return out


msda_triton.register_fake(msda_ops.output_like)


@torch.library.custom_op("detr_sparse::msda_triton_backward", mutates_args=())
def msda_triton_backward(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor,
                         level_start_index: Tensor, sampling_locations: Tensor,
                         attention_weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    value, shapes, starts, loc, attn = _prepared(value, spatial_shapes, level_start_index,
                                                 sampling_locations, attention_weights)
    kernels, grid, constants = _launch(value, loc)
    # atomics add into the value gradient: sum it in fp32 (fp64), not in bf16 / fp16
    wide = torch.float64 if value.dtype == torch.float64 else torch.float32
    grad_value = torch.zeros(value.shape, dtype=wide, device=value.device)
    grad_loc, grad_attn = torch.empty_like(loc), torch.empty_like(attn)  # every entry is written
    with _device(value):
        kernels.msda_backward_kernel[grid](grad_output.contiguous(), value, shapes, starts, loc, attn, grad_value,
                                           grad_loc, grad_attn, *_sizes(value, loc), **constants)
    return grad_value.to(value.dtype), grad_loc, grad_attn


@msda_triton_backward.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


msda_triton.register_autograd(msda_ops.backward_by(torch.ops.detr_sparse.msda_triton_backward),
                              setup_context=msda_ops.save_inputs)
register_flop_formula(torch.ops.detr_sparse.msda_triton)(msda_ops.flops)
