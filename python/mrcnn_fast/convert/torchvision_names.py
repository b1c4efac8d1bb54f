"""Parameter and buffer names of an mrcnn_fast FPN model <-> torchvision's MaskRCNN / KeypointRCNN of the same
architecture (tests/_tv_reference.py builds one). Only the names differ, the tensors are the same, so the map
is pure string work and this module does not import torchvision.

The backbone trunk, the FPN (also with norms: both use the (conv, norm) layout of torchvision's
Conv2dNormActivation), the RPN predictors and the fc6 / fc7 box head already share torchvision's names; the rules
below cover the rest. A name no rule matches is the same in both. The fully connected layers of a box head with
convolutions (torchvision's FastRCNNConvFCHead: convs, a Flatten, then Linear / ReLU pairs) are numbered after
the convolutions, so they are renamed by the state-dict functions, which see how many convolutions there are.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor, nn

# (our name, torchvision's name). Placeholders: {i} a layer index, {2i} twice it (torchvision's keypoint head
# interleaves ReLUs with its convolutions), {i+1} one more than it, {p} the parameter or buffer name.
_RULES = (
    ("rpn.head.conv.{p}", "rpn.head.conv.0.0.{p}"),
    ("rpn.head.extra_convs.{i}.{p}", "rpn.head.conv.{i+1}.0.{p}"),
    ("roi_heads.box_head.convs.{i}.{p}", "roi_heads.box_head.{i}.0.{p}"),
    ("roi_heads.box_head.norms.{i}.{p}", "roi_heads.box_head.{i}.1.{p}"),
    ("roi_heads.mask_head.convs.{i}.{p}", "roi_heads.mask_head.{i}.0.{p}"),
    ("roi_heads.mask_head.norms.{i}.{p}", "roi_heads.mask_head.{i}.1.{p}"),
    ("roi_heads.mask_head.deconv.{p}", "roi_heads.mask_predictor.conv5_mask.{p}"),
    ("roi_heads.mask_head.predictor.{p}", "roi_heads.mask_predictor.mask_fcn_logits.{p}"),
    ("roi_heads.keypoint_head.convs.{i}.{p}", "roi_heads.keypoint_head.{2i}.{p}"),
    ("roi_heads.keypoint_head.kps_score_lowres.{p}", "roi_heads.keypoint_predictor.kps_score_lowres.{p}"),
)
_FIELDS = {"{i}": r"(?P<i>\d+)", "{2i}": r"(?P<i2>\d+)", "{i+1}": r"(?P<i1>\d+)", "{p}": r"(?P<p>[^.]+)"}


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"(\{i\}|\{2i\}|\{i\+1\}|\{p\})", template)
    return re.compile("".join(_FIELDS.get(s) or re.escape(s) for s in parts))


# (pattern of the source name, template of the target name) per direction
_TO_TV = tuple((_pattern(ours), tv) for ours, tv in _RULES)
_FROM_TV = tuple((_pattern(tv), ours) for ours, tv in _RULES)


def _translate(name: str, pattern: re.Pattern, template: str) -> str | None:
    m = pattern.fullmatch(name)
    if m is None:
        return None
    i = int(m.group("i")) if "i" in pattern.groupindex else None
    if "i2" in pattern.groupindex:
        i2 = int(m.group("i2"))
        if i2 % 2:   # an odd index of torchvision's keypoint head is a ReLU, which has no weights
            return None
        i = i2 // 2
    if "i1" in pattern.groupindex:
        i = int(m.group("i1")) - 1
        if i < 0:    # torchvision's first RPN conv is our `conv`, which the rule before this one maps
            return None
    out = template.replace("{p}", m.group("p"))
    if i is None:
        return out
    return out.replace("{2i}", str(2 * i)).replace("{i+1}", str(i + 1)).replace("{i}", str(i))


def _rename_one(name: str, rules) -> str:
    for pattern, template in rules:
        out = _translate(name, pattern, template)
        if out is not None:
            return out
    return name


def to_torchvision_name(name: str) -> str:
    """Our parameter/buffer name -> torchvision's, e.g. "rpn.head.conv.weight" -> "rpn.head.conv.0.0.weight"."""
    return _rename_one(name, _TO_TV)


def from_torchvision_name(name: str) -> str:
    """torchvision's parameter/buffer name -> ours (the inverse of :func:`to_torchvision_name`)."""
    return _rename_one(name, _FROM_TV)


def _rename(state_dict: Mapping[str, Tensor], rename) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for k, v in state_dict.items():
        n = rename(k)
        if n in out:
            raise ValueError(f"two entries map to the name {n!r} (the second one is {k!r})")
        out[n] = v
    return out


_OUR_BOX_CONV = re.compile(r"roi_heads\.box_head\.convs\.(\d+)\.weight")
_OUR_BOX_FC = re.compile(r"roi_heads\.box_head\.fcs\.(\d+)\.([^.]+)")
_TV_BOX_CONV = re.compile(r"roi_heads\.box_head\.(\d+)\.0\.weight")
_TV_BOX_FC = re.compile(r"roi_heads\.box_head\.(\d+)\.([^.]+)")


def _box_convs(names, pattern: re.Pattern) -> int:
    return len({m.group(1) for m in map(pattern.fullmatch, names) if m is not None})


def to_torchvision_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our model's state dict under torchvision's names (same tensors, no copies)."""
    n = _box_convs(state_dict, _OUR_BOX_CONV)

    def rename(name: str) -> str:
        m = _OUR_BOX_FC.fullmatch(name)    # fc j follows the n (conv, norm, ReLU) blocks and a Flatten
        return f"roi_heads.box_head.{n + 1 + 2 * int(m.group(1))}.{m.group(2)}" if m else to_torchvision_name(name)
    return _rename(state_dict, rename)


def from_torchvision_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A torchvision MaskRCNN / FasterRCNN / KeypointRCNN state dict under our names (same tensors, no copies)."""
    n = _box_convs(state_dict, _TV_BOX_CONV)

    def rename(name: str) -> str:
        m = _TV_BOX_FC.fullmatch(name)
        if m and int(m.group(1)) > n and (int(m.group(1)) - n - 1) % 2 == 0:
            return f"roi_heads.box_head.fcs.{(int(m.group(1)) - n - 1) // 2}.{m.group(2)}"
        return from_torchvision_name(name)
    return _rename(state_dict, rename)


def _load_exact(module: nn.Module, state_dict: dict[str, Tensor]) -> None:
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")


def copy_weights_to_torchvision(ours: nn.Module, tv: nn.Module) -> None:
    """Loads our model's parameters and buffers into the torchvision model (every name must match)."""
    _load_exact(tv, to_torchvision_state_dict(ours.state_dict()))


def copy_weights_from_torchvision(tv: nn.Module, ours: nn.Module) -> None:
    """Loads a torchvision model's parameters and buffers into ours (every name must match)."""
    _load_exact(ours, from_torchvision_state_dict(tv.state_dict()))
