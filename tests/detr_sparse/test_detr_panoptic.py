import torch

from detr_sparse.heads.detr_panoptic import AttentionMaps, MaskHead


def test_attention_maps_ignore_padding_and_sum_to_one():
    torch.manual_seed(0)
    attn = AttentionMaps(16, 16, heads=2)
    memory = torch.randn(2, 16, 4, 6)
    mask = torch.zeros(2, 4, 6, dtype=torch.bool)
    mask[1, :, 4:] = True
    query = torch.randn(2, 3, 16)
    maps = attn(query, memory, mask)
    assert maps.shape == (2, 3, 2, 4, 6)
    assert (maps[1, ..., 4:] == 0).all()
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(2, 3, 2))
    # a padded image gives what it gives alone
    alone = attn(query[1:], memory[1:, :, :, :4], mask[1:, :, :4])
    torch.testing.assert_close(alone[0], maps[1, ..., :4])


def test_mask_head_upsamples_through_the_fpn_levels_per_query():
    torch.manual_seed(0)
    head = MaskHead(dim=32, heads=2, fpn_channels=[24, 12, 8])
    features = torch.randn(2, 32, 4, 6)
    maps = torch.rand(2, 5, 2, 4, 6)
    fpn = [torch.randn(2, 24, 8, 12), torch.randn(2, 12, 16, 24), torch.randn(2, 8, 32, 48)]
    masks = head(features, maps, fpn)
    assert masks.shape == (2, 5, 32, 48)
    # each query's mask depends on its own attention maps only
    other = maps.clone()
    other[:, 1] = torch.rand(2, 2, 4, 6)
    changed = head(features, other, fpn)
    torch.testing.assert_close(changed[:, 0], masks[:, 0])
    assert not torch.allclose(changed[:, 1], masks[:, 1])
