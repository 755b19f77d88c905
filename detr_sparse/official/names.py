"""The authors' state-dict names -> this project's, one function per part. Each takes the
official key (for the backbone, the part after `backbone.0.body.`) and returns our key, or
None for a key it does not know. Layouts that differ beyond the names:

- DETR and PnP-DETR layers keep their FFN in `linear1` / `linear2`, ours in `ffn.`; the
  decoder's cross-attention is `multihead_attn`, the final norms `encoder.norm` /
  `decoder.norm` (ours `encoder_norm` / `decoder_norm`).
- The Deformable DETR decoder layer names its norms by position in __init__: `norm1`
  follows the cross-attention and `norm2` the self-attention; ours follow the order of
  use (norm1 after the self-attention, norm2 after the cross-attention).
- PnP-DETR's score network is two 1x1 convolutions (ours: linear layers of the same
  weights), its pooling `k_proj` / `v_proj` (ours `pool_logits` / `pool_values`).
- The official detection Swin (Sparse DETR) keeps a stage's patch merging in the stage
  (`layers.i.downsample`), torchvision in the next `features` entry, and names its output
  norms by stage index (`norm1` = stage 2 = res3)."""
from __future__ import annotations

import re
from typing import Callable

from ..backbones.levels import LEVEL_NAMES

_HEADS = r"(class_embed|bbox_embed|query_embed|input_proj)"
Rule = tuple[str, "str | Callable[[re.Match], str]"]


def _sub(rules: list[Rule], key: str) -> str | None:
    """The first rule (pattern, replacement: a template or a function of the match) whose
    pattern matches all of `key`, applied; None when none does."""
    for pattern, replacement in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def resnet_name(key: str) -> str | None:
    """torchvision ResNet (`conv1`, `bn1`, `layer1`..`layer4`) -> backbone.stem / stages."""
    return _sub([(r"layer([1-4])\.(.+)", lambda m: f"backbone.stages.{LEVEL_NAMES[int(m[1]) - 1]}.{m[2]}"),
                 (r"conv1\.(.+)", r"backbone.stem.0.\1"), (r"bn1\.(.+)", r"backbone.stem.1.\1")], key)


def _swin_block(match: re.Match) -> str:
    """Our key of `layers.<stage>.blocks.<j>.<rest>` (torchvision's MLP is a Sequential)."""
    rest = _sub([(r"mlp\.fc1\.(.+)", r"mlp.0.\1"), (r"mlp\.fc2\.(.+)", r"mlp.3.\1")], match[3]) or match[3]
    return f"backbone.features.{2 * int(match[1]) + 1}.{match[2]}.{rest}"


def swin_name(key: str) -> str | None:
    """The official detection Swin -> torchvision's `features` layout (see the module)."""
    return _sub([(r"layers\.(\d)\.blocks\.(\d+)\.(.+)", _swin_block),
                 (r"layers\.(\d)\.downsample\.(.+)", lambda m: f"backbone.features.{2 * int(m[1]) + 2}.{m[2]}"),
                 (r"norm([0-3])\.(.+)", lambda m: f"backbone.norms.{LEVEL_NAMES[int(m[1])]}.{m[2]}"),
                 (r"patch_embed\.proj\.(.+)", r"backbone.features.0.0.\1"),
                 (r"patch_embed\.norm\.(.+)", r"backbone.features.0.2.\1")], key)


def detr_name(key: str) -> str | None:
    """facebookresearch/detr's DETR and twangnh/pnp-detr's additions (its sampler)."""
    return _sub([
        (r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(linear[12]\..+)", r"transformer.\1.\2.ffn.\3"),
        (r"transformer\.decoder\.layers\.(\d+)\.multihead_attn\.(.+)", r"transformer.decoder.\1.cross_attn.\2"),
        (r"transformer\.(encoder|decoder)\.layers\.(\d+)\.((self_attn|norm[123])\..+)", r"transformer.\1.\2.\3"),
        (r"transformer\.(encoder|decoder)\.norm\.(.+)", r"transformer.\1_norm.\2"),
        (r"transformer\.sampler\.score_pred_net\.([02]\..+)", r"sampler.score.\1"),
        (r"transformer\.sampler\.k_proj\.(.+)", r"sampler.pool_logits.\1"),
        (r"transformer\.sampler\.v_proj\.(.+)", r"sampler.pool_values.\1"),
        (rf"{_HEADS}\.(.+)", r"\1.\2"),
    ], key)


def _mask_layer(match: re.Match) -> str:
    """Our key of `mask_head.lay<i>` / `gn<i>`: lay1, lay2 (+ their norms) are the first
    stack, lay3..lay5 one block per FPN level."""
    layer, index = int(match[2]) - 1, int(match[1] == "gn")
    return f"panoptic_head.mask_head.{f'first.{layer}' if layer < 2 else f'blocks.{layer - 2}'}.{index}.{match[3]}"


def segmentation_name(key: str) -> str | None:
    """DETR's segmentation branch (`bbox_attention`, `mask_head`) -> panoptic_head."""
    return _sub([(r"mask_head\.(lay|gn)([1-5])\.(.+)", _mask_layer),
                 (r"mask_head\.adapter([1-3])\.(.+)",
                  lambda m: f"panoptic_head.mask_head.adapters.{int(m[1]) - 1}.{m[2]}"),
                 (r"mask_head\.out_lay\.(.+)", r"panoptic_head.mask_head.out.\1"),
                 (r"bbox_attention\.([qk])_linear\.(.+)", r"panoptic_head.attention.\1.\2")], key)


def _head(heads: int) -> Callable[[re.Match], str]:
    """The renaming of `class_embed.<i>` / `bbox_embed.<i>`: the first `heads` keep their
    names, the rest are the encoder's auxiliary heads."""
    def name(match: re.Match) -> str:
        index = int(match[2])
        if index < heads:
            return f"{match[1]}_embed.{index}.{match[3]}"
        return f"enc_aux_{'class' if match[1] == 'class' else 'box'}.{index - heads}.{match[3]}"
    return name


def deformable_name(key: str, heads: int) -> str | None:
    """fundamentalvision/Deformable-DETR and kakaobrain/sparse-detr. heads: the class / box
    heads of the decoder layers and the two-stage proposals; Sparse DETR's encoder
    auxiliary heads follow them in the same lists (ours: enc_aux_class / enc_aux_box)."""
    return _sub([
        (r"(class|bbox)_embed\.(\d+)\.(.+)", _head(heads)),
        (r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(linear[12]\..+)", r"transformer.\1.\2.ffn.\3"),
        (r"transformer\.decoder\.layers\.(\d+)\.norm1\.(.+)", r"transformer.decoder.\1.norm2.\2"),
        (r"transformer\.decoder\.layers\.(\d+)\.norm2\.(.+)", r"transformer.decoder.\1.norm1.\2"),
        (r"transformer\.(encoder|decoder)\.layers\.(\d+)\.((self_attn|cross_attn|norm[123])\..+)",
         r"transformer.\1.\2.\3"),
        (r"transformer\.(level_embed|(enc_output|enc_output_norm|pos_trans|pos_trans_norm|reference_points)\..+)",
         r"transformer.\1"),
        (r"transformer\.enc_mask_predictor\.layer1\.0\.(.+)", r"scoring.norm.\1"),
        (r"transformer\.enc_mask_predictor\.layer1\.1\.(.+)", r"scoring.embed.\1"),
        (r"transformer\.enc_mask_predictor\.layer2\.([024]\..+)", r"scoring.head.\1"),
        (rf"{_HEADS}\.(.+)", r"\1.\2"),
    ], key)


def deformable_alias(key: str, heads: int) -> str | None:
    """The official key a Deformable-family key repeats, or None: the transformer holds the
    model's head lists a second time (box refinement, two-stage: `transformer.decoder.`;
    Sparse DETR's encoder auxiliary heads, the lists' tail: `transformer.encoder.`)."""
    match = re.fullmatch(r"transformer\.(decoder|encoder)\.(class_embed|bbox_embed)\.(\d+)\.(.+)", key)
    if match is None:
        return None
    index = int(match[3]) + (heads if match[1] == "encoder" else 0)
    return f"{match[2]}.{index}.{match[4]}"
