import pytest
import torch
import torch.nn.functional as F

from detr_sparse.transformers.attention import WRITTEN_OUT_MAX_KEYS, attention, written_out


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_the_written_out_form_is_scaled_dot_product_attention(mask_kind):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, n, 8, generator=g) for n in (5, 7, 7))
    mask = {"none": None, "bool": torch.rand(3, 1, 5, 7, generator=g) > 0.3,
            "float": torch.randn(1, 2, 5, 7, generator=g)}[mask_kind]
    if mask_kind == "bool":
        mask[..., 0] = True  # every query keeps a key
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(written_out(q, k, v, mask), expected, atol=1e-5, rtol=1e-5)
    # bf16 on the CPU takes the written-out form and stays within bf16's error of fp32
    half_mask = mask if mask is None or mask.dtype == torch.bool else mask.bfloat16()
    half = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), half_mask)
    torch.testing.assert_close(half.float(), expected, atol=3e-2, rtol=3e-2)


def test_the_form_follows_dtype_and_key_count(monkeypatch):
    calls = []
    monkeypatch.setattr("detr_sparse.transformers.attention.written_out", lambda *a: calls.append("written") or a[0])
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **k: calls.append("fused") or q)
    q = torch.zeros(1, 1, 4, 8)
    attention(q, q, q)  # fp32
    attention(q.bfloat16(), q.bfloat16(), q.bfloat16())
    many = torch.zeros(1, 1, WRITTEN_OUT_MAX_KEYS + 1, 8, dtype=torch.bfloat16)
    attention(q.bfloat16(), many, many)
    assert calls == ["fused", "written", "fused"]


def test_dropout_reaches_the_attention_weights():
    torch.manual_seed(0)
    q = torch.randn(1, 1, 6, 4)
    out = written_out(q, q, torch.ones(1, 1, 6, 4), dropout_p=0.5)
    # each row's weights summed 1 before dropout; dropped and rescaled ones no longer do
    assert not torch.allclose(out, torch.ones_like(out))


def test_a_query_without_keys_and_a_mask_of_another_dtype_behave_as_the_fused_kernel():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 3, 4, generator=g) for _ in range(3))
    mask = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    torch.testing.assert_close(written_out(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert torch.equal(written_out(q, k, v, mask)[0, 0, 1], torch.zeros(4))
    bias = torch.randn(3, 3, generator=g)  # fp32 bias, bf16 tensors, no autocast
    half = written_out(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias)
    torch.testing.assert_close(half.float(), F.scaled_dot_product_attention(q, k, v, attn_mask=bias), atol=3e-2,
                               rtol=3e-2)
