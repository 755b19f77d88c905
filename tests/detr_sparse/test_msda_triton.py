"""The Triton kernels of deformable attention (detr_sparse/transformers/msda_triton.py)
against the grid_sample reference, the operator around them, and a tiny Deformable DETR
that trains and exports with them.

Without a GPU the kernels run on CPU tensors in Triton's interpreter: the `device` fixture
sets TRITON_INTERPRET=1 for the test, which works in one pytest process whatever imported
triton before (msda_triton decorates its kernel file for the interpreter when first asked).
With CUDA the same tests run the compiled kernels on the GPU."""
import copy
import functools

import pytest
import torch

from detr_sparse.transformers import msda_ops, msda_triton
from detr_sparse.transformers.ms_deform_attn import MSDeformAttn, resolve
from helpers import TINY_DEFORMABLE, record_host_reads, sampling_inputs

needs_triton = pytest.mark.skipif(not msda_triton.available(), reason="triton does not import here")


@pytest.fixture
def device(monkeypatch):
    """cuda (compiled kernels) where there is a GPU, else cpu in Triton's interpreter."""
    if not msda_triton.available():
        pytest.skip("triton does not import here: no Triton kernels, no interpreter")
    if torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        return "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"


def _borders(level_shapes, queries, points) -> torch.Tensor:
    """(1, queries, 1, L, points, 2) locations on and around each level's borders: pixel x
    (= loc * W - 0.5) at -1 and W (the last positions a corner reaches), -0.5 and W - 0.5
    (loc 0 and 1), a pixel centre, and far off the map, in every (x, y) combination."""
    levels = []
    for h, w in level_shapes:
        xs = torch.tensor([-0.5 / w, 0.0, 0.5 / w, 0.6, 1.0, (w + 0.5) / w, -0.4, 1.7])
        ys = torch.tensor([-0.5 / h, 0.0, 0.5 / h, 0.3, 1.0, (h + 0.5) / h, -1.0, 2.0])
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="ij"), -1).view(-1, 2)
        levels.append(grid.repeat(-(-queries * points // len(grid)), 1)[:queries * points])
    return torch.stack(levels, 1).view(queries, points, len(level_shapes), 2).transpose(1, 2)[None, :, None]


# batch, level shapes (H, W), queries, heads, channels, points
CASES = {"one_1x1_level": (1, [(1, 1)], 3, 1, 3, 2),
         "batch2_levels_down_to_1x1_odd_channels": (2, [(5, 7), (2, 3), (1, 1)], 5, 2, 5, 2),
         "one_head_queries_over_two_blocks": (1, [(3, 4)], 70, 1, 7, 1),
         "on_and_outside_the_borders": (1, [(4, 4), (2, 8)], 16, 1, 3, 4)}


def _case(name, dtype=torch.float32, loc_dtype=None):
    batch, levels, queries, heads, dim, points = CASES[name]
    value, shapes, starts, loc, weights = sampling_inputs(batch, levels, queries, heads, dim, points,
                                                          dtype=torch.float32)
    if name == "on_and_outside_the_borders":
        loc = _borders(levels, queries, points)
    return value.to(dtype), shapes, starts, loc.to(loc_dtype or dtype), weights.to(dtype)


def _with_gradients(core, inputs, device, compute=None):
    """(output, value / locations / weights gradients) of core on inputs moved to device
    (and to `compute` dtype), for one fixed upstream gradient."""
    value, shapes, starts, loc, weights = (t.to(device) for t in inputs)
    leaves = [t.to(compute or t.dtype).requires_grad_(True) for t in (value, loc, weights)]
    out = core(leaves[0], shapes, starts, leaves[1], leaves[2])
    # bf16 values: the same in every dtype the kernels and the yardstick run in
    upstream = torch.linspace(-1, 1, out.numel(), device=device).view_as(out).bfloat16().to(out.dtype)
    return [out, *torch.autograd.grad(out, leaves, upstream)]


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_gradients_equal_the_reference_in_fp32(device, name):
    inputs = _case(name)
    triton = _with_gradients(msda_triton.msda_triton, inputs, device)
    reference = _with_gradients(msda_ops.grid_sample_core, inputs, "cpu")
    for got, expected in zip(triton, reference):
        torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)


# bf16 as under autocast (locations from fp32 reference points), fp16 throughout, fp64
@pytest.mark.parametrize("dtype,loc_dtype,tolerance", [(torch.bfloat16, torch.float32, 1.6e-2),
                                                       (torch.float16, torch.float16, 2e-3),
                                                       (torch.float64, torch.float64, 1e-10)])
def test_other_dtypes_sum_in_fp32_and_keep_their_dtype(device, dtype, loc_dtype, tolerance):
    inputs = _case("batch2_levels_down_to_1x1_odd_channels", dtype, loc_dtype)
    triton = _with_gradients(msda_triton.msda_triton, inputs, device)
    # the yardstick: the reference in fp64 on the same (rounded) inputs
    reference = _with_gradients(msda_ops.grid_sample_core, inputs, "cpu", torch.float64)
    assert [t.dtype for t in triton] == [dtype, dtype, loc_dtype, dtype]
    for got, expected in zip(triton, reference):
        torch.testing.assert_close(got.cpu().double(), expected, atol=tolerance, rtol=tolerance)


def test_the_bf16_value_gradient_is_summed_in_fp32(device):
    # 64 queries read the one pixel at full weight: summed in bf16 the gradient would drift
    value = torch.ones(1, 1, 1, 2, dtype=torch.bfloat16, device=device, requires_grad=True)
    loc = torch.full((1, 64, 1, 1, 1, 2), 0.5, dtype=torch.bfloat16, device=device)
    weights = torch.ones(1, 64, 1, 1, 1, dtype=torch.bfloat16, device=device)
    shapes, starts = torch.tensor([[1, 1]], device=device), torch.tensor([0], device=device)
    upstream = torch.full((1, 64, 2), 1 / 3, dtype=torch.bfloat16, device=device)
    msda_triton.msda_triton(value, shapes, starts, loc, weights).backward(upstream)
    # 64 x 0.333984375 = 21.375, a bf16 number; bf16 sums drift from 16 on (steps of 0.125)
    assert value.grad.float().tolist() == [[[[21.375, 21.375]]]]


def test_the_operator_passes_torch_library_opcheck(device):
    """Schema, fake implementation (torch.compile / torch.export), autograd registration."""
    value, shapes, starts, loc, weights = (t.to(device) for t in _case("one_1x1_level"))
    args = (value.requires_grad_(True), shapes, starts, loc.requires_grad_(True), weights.requires_grad_(True))
    torch.library.opcheck(torch.ops.detr_sparse.msda_triton.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


def _attention(impl, heads=2):
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=heads, n_points=2)
    attn.impl = impl
    return attn


def _attention_inputs(device="cpu"):
    g = torch.Generator().manual_seed(1)
    query, refs = torch.randn(1, 6, 8, generator=g), torch.rand(1, 6, 2, 2, generator=g)
    value = torch.randn(1, 15, 8, generator=g)
    return [t.to(device) for t in (query, refs, value, torch.tensor([[3, 4], [1, 3]]), torch.tensor([0, 12]))]


def test_the_triton_path_reads_nothing_back_to_the_host(device, monkeypatch):
    """On CUDA each read of a tensor's values by the host waits for the device: the Triton
    path reads none (the level shapes stay on the device); the reference reads the shapes once."""
    reads = record_host_reads(monkeypatch)
    inputs = _attention_inputs(device)
    for impl, expected in (("triton", []), ("reference", ["tolist"])):
        attn = _attention(impl).to(device)
        reads.clear()
        attn(*inputs)
        assert reads == expected, impl


def test_sampling_flops_are_counted_as_for_the_other_kernels(device):
    counter = torch.utils.flop_counter.FlopCounterMode(display=False)
    with counter, torch.no_grad():
        _attention("triton").to(device)(*_attention_inputs(device))
    sampling = sum(n for op, n in counter.get_flop_counts()["Global"].items() if str(op).startswith("detr_sparse.msda"))
    # 6 queries, 2 heads, 2 levels, 2 points, 4 channels: 5 multiply-adds each, counted as 2
    assert sampling == 2 * 5 * (6 * 2 * 2 * 2 * 4)


def test_auto_takes_the_cpp_kernel_on_cpu_triton_on_cuda_and_the_reference_without_triton(monkeypatch):
    monkeypatch.setattr(msda_ops, "available", lambda: True)
    monkeypatch.setattr(msda_triton, "triton", object())  # triton imports
    assert resolve("auto", torch.device("cpu")) == "fast"
    assert resolve("auto", torch.device("cuda", 1)) == "triton"
    assert resolve("reference", torch.device("cuda")) == "reference"
    monkeypatch.setattr(msda_triton, "triton", None)  # it does not
    assert resolve("auto", torch.device("cuda")) == "reference"
    with pytest.raises(RuntimeError, match="needs triton"):
        _attention("triton")(*_attention_inputs())


@needs_triton
def test_forcing_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _attention("triton")(*_attention_inputs())


def _kernel_signature(kernel, dtype: str, constants: dict) -> dict:
    """Argument types of a kernel for triton.compile: value-like pointers in `dtype`, the
    locations in fp32 (as under autocast), the value gradient buffer in fp32."""
    pointers = {"shapes": "*i64", "starts": "*i64", "loc": "*fp32", "grad_value": "*fp32", "grad_loc": "*fp32"}
    sizes = ("S", "Q", "M", "D", "L", "P")
    return {name: "constexpr" if name in constants else "i32" if name in sizes else pointers.get(name, f"*{dtype}")
            for name in kernel.arg_names}


@needs_triton
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_kernels_compile_for_an_sm80_gpu(dtype):
    """What the interpreter does not check (types, loop-carried values), without a GPU."""
    import triton
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget

    if "nvidia" not in backends:
        pytest.skip("this triton has no CUDA backend")
    if not isinstance(triton.language.standard._sum_combine, triton.runtime.jit.JITFunction):
        pytest.skip("triton was imported with TRITON_INTERPRET=1: its own functions are interpreted, "
                    "nothing calling them compiles in this process")
    kernels = msda_triton._kernels(False)
    constants = {"ACC": triton.language.float32, "BLOCK_Q": 64, "BLOCK_D": 32}
    for kernel in (kernels.msda_forward_kernel, kernels.msda_backward_kernel):
        signature = _kernel_signature(kernel, dtype, constants)
        source = triton.compiler.ASTSource(kernel, signature, {(kernel.arg_names.index(k),): v
                                                               for k, v in constants.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 80, 32))
        assert "cubin" in compiled.asm
    assert "atom.global" in compiled.asm["ptx"]  # the value gradient's atomic adds


@functools.cache
def _built_tiny_model():
    from detr_sparse import build_model
    from engine.config import load_config

    torch.manual_seed(0)
    cfg = load_config(None, [*TINY_DEFORMABLE, "model.transformer.nheads=2", "model.transformer.dropout=0.0"])
    return build_model(cfg.model, 3), cfg


def _tiny_model():
    """A tiny Deformable DETR (2 heads; built once, copied) and its config."""
    model, cfg = _built_tiny_model()
    return copy.deepcopy(model), cfg


def test_a_tiny_deformable_detr_trains_a_step_with_the_triton_kernel(device, monkeypatch):
    """The engine's training step (grad scaler, clipping) with Triton selected: the loss and
    every gradient as with the reference."""
    from detr_sparse.image_batch import ImageBatch
    from engine.train import TrainState, _train_step

    model, cfg = _tiny_model()
    # the initial offsets put the encoder's samples on the pixel grid, where the bilinear
    # derivative by location jumps (the C++ kernel and the reference then differ by 25% in
    # sampling_offsets' gradient, rounding putting a sample on either side): a third of a pixel off
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MSDeformAttn):
                m.sampling_offsets.bias.add_(1 / 3)
    images = ImageBatch.from_images([torch.randn(3, 32, 48, generator=torch.Generator().manual_seed(0))])
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 20.0]]), "labels": torch.tensor([1])}]
    runs = {}
    for impl in ("triton", "reference"):
        monkeypatch.setattr(MSDeformAttn, "impl", impl)
        net = copy.deepcopy(model).to(device)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(torch.device(device).type, enabled=False)
        stats = _train_step(net, [(images, targets)], optimizer, scaler, cfg.train, TrainState(), torch.device(device))
        runs[impl] = stats, {n: p.grad.cpu() for n, p in net.named_parameters() if p.grad is not None}
    (stats, grads), (ref_stats, ref_grads) = runs["triton"], runs["reference"]
    assert abs(stats["loss"] - ref_stats["loss"]) < 1e-4
    assert grads.keys() == ref_grads.keys() and any("sampling_offsets" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-3, msg=name)


def test_torch_export_traces_a_tiny_deformable_detr_with_the_triton_kernel(device, monkeypatch):
    """From the feature maps on (transformer and heads): the exported graph calls the Triton
    operator in every deformable attention and predicts what the reference predicts."""
    model, _ = _tiny_model()
    model = model.eval().to(device)

    class Predict(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *maps_and_masks):
            out = self.model.predict(list(maps_and_masks[:3]), list(maps_and_masks[3:]))
            return out["pred_logits"], out["pred_boxes"]

    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(1, 64, h, w, generator=g).to(device) for h, w in ((4, 6), (2, 3), (1, 2))]
    masks = [torch.zeros(1, *m.shape[-2:], dtype=torch.bool, device=device) for m in maps]
    monkeypatch.setattr(MSDeformAttn, "impl", "triton")
    exported = torch.export.export(Predict(), (*maps, *masks))
    calls = [n for n in exported.graph.nodes if n.target is torch.ops.detr_sparse.msda_triton.default]
    assert len(calls) == 3  # 1 encoder + 2 decoder layers
    got = exported.module()(*maps, *masks)
    monkeypatch.setattr(MSDeformAttn, "impl", "reference")
    with torch.no_grad():
        expected = Predict()(*maps, *masks)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
