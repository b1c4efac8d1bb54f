"""One door for weights from any project: ours (safetensors + config.json), torchvision's state dicts and
detectron2's checkpoints (.pkl model-zoo files and Checkpointer .pth files).

    model_weights = load_checkpoint("maskrcnn.pth")          # weights_format="auto" decides from the file
    model_weights.cfg, model_weights.state_dict, model_weights.weights_format, model_weights.report

Nothing a checkpoint holds is executed: torch files load with weights_only=True, detectron2's pickles through a
restricted unpickler, our own weights are safetensors.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

WEIGHTS_FORMATS = ("auto", "ours", "torchvision", "detectron2")
FOREIGN_FORMATS = ("torchvision", "detectron2")

# name prefixes only a detectron2 GeneralizedRCNN state dict has
_D2_PREFIXES = ("backbone.bottom_up.", "proposal_generator.", "backbone.fpn_lateral", "backbone.res2.",
                "backbone.stem.")


@dataclass
class ImportedWeights:
    """What load_checkpoint found: the model's Config, its state dict under our names (None for our own format:
    load `path` with engine.checkpoint.load_weights), the file, the format it decided and a report of what it
    built and assumed (one line per fact)."""
    cfg: object
    state_dict: dict[str, Tensor] | None
    path: Path
    weights_format: str
    report: str


def _torch_state_dict(path: Path):
    """The mapping of names to tensors of a torch file (bare, or under "model" / "state_dict"), or None when the
    file is not a weights-only torch file holding one."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj):
        return obj
    return None


def detect_weights_format(path: str | os.PathLike) -> tuple[str, str]:
    """(format, why) of a weights path: "ours" for a run folder, a .safetensors file or a torch file with our
    config.json beside it; "detectron2" for a .pkl or a torch file with detectron2's names; "torchvision" for a
    torch state dict with torchvision's names. Raises FileNotFoundError / ValueError naming the path."""
    from ..engine.checkpoint import CONFIG_FILE

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"weights not found: {p}")
    if p.is_dir():
        return "ours", "a folder (a `mrcnn-fast train` run folder)"
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        return "ours", "a .safetensors file"
    if suffix in (".pkl", ".pickle"):
        return "detectron2", "a .pkl file (detectron2's model-zoo format)"
    if (p.parent / CONFIG_FILE).is_file() and suffix in (".pt", ".pth"):
        # our own torch-format weights have their config beside them; foreign files do not
        return "ours", f"a torch file with {CONFIG_FILE} beside it"
    sd = _torch_state_dict(p)
    if sd is None:
        raise ValueError(f"{p}: cannot tell its format: not a folder, a .safetensors or .pkl file, nor a weights-only "
                         f"torch file holding a state dict (pass weights_format explicitly)")
    names = list(sd)
    if any(n.startswith(_D2_PREFIXES) for n in names):
        return "detectron2", "a torch file with detectron2's parameter names (backbone.bottom_up..., " \
                             "proposal_generator...)"
    if any(n.startswith(("backbone.body.", "rpn.head.", "roi_heads.box_predictor.")) for n in names):
        return "torchvision", "a torch state dict with torchvision's parameter names (backbone.body..., rpn.head...)"
    raise ValueError(f"{p}: a torch state dict with names neither torchvision's nor detectron2's (first: "
                     f"{names[0]!r}); pass weights_format explicitly")


def _overrides(config) -> dict | None:
    """Config overrides for an imported model: None, a dict, or a .yaml/.json file of a mapping."""
    from ..config import load_file

    if config is None or isinstance(config, dict):
        return config
    if isinstance(config, (str, os.PathLike)):
        p = Path(config)
        if p.suffix.lower() not in (".yaml", ".yml", ".json"):
            raise ValueError(f"config for torchvision / detectron2 weights overrides what the tensors cannot tell: a "
                             f".yaml/.json file or a dict, got {str(config)!r}")
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        data = load_file(p)
        if "base" in data:
            raise ValueError(f"config file {p}: 'base' makes no sense for imported weights (their architecture comes "
                             f"from the tensors); give only the fields to override")
        return data
    raise TypeError(f"config for torchvision / detectron2 weights must be a dict or a .yaml/.json file, got "
                    f"{type(config).__name__}")


def load_checkpoint(weights: str | os.PathLike, *, weights_format: str = "auto", config=None) -> ImportedWeights:
    """The Config and weights of a checkpoint of any supported format.

    Args:
        weights: a run folder / .safetensors (ours), a torchvision .pth / .pt state dict, a detectron2 .pkl or .pth.
        weights_format: "auto" (decided from the file, see detect_weights_format) | "ours" | "torchvision" |
            "detectron2".
        config: ours: the model's config (preset name, .yaml/.json file or Config) instead of config.json;
            torchvision / detectron2: overrides (dict or .yaml/.json file) applied on top of what the tensors tell,
            e.g. {"data": {"class_names": [...]}} or detectron2 C4's {"model": {"rpn": {"pre_nms_topk_test": 6000}}}.
    """
    if weights_format not in WEIGHTS_FORMATS:
        raise ValueError(f"weights_format must be one of {', '.join(WEIGHTS_FORMATS)}, got {weights_format!r}")
    p = Path(weights)
    if not p.exists():
        raise FileNotFoundError(f"weights not found: {p}")
    why = "requested"
    fmt = weights_format
    if fmt == "auto":
        fmt, why = detect_weights_format(p)
        why = f"auto: {why}"
    if fmt == "ours":
        from ..predictor import resolve_weights

        path, cfg = resolve_weights(p, config)
        return ImportedWeights(cfg, None, Path(path), "ours", f"format ours ({why})")
    if p.is_dir():
        raise ValueError(f"{p} is a folder; {fmt} weights are a single file")
    overrides = _overrides(config)
    if fmt == "torchvision":
        from .torchvision_import import load_torchvision as load
    else:
        from .detectron2_import import load_detectron2 as load
    cfg, state_dict, report = load(p, overrides)
    if getattr(report, "kind", "detector") != "detector":
        raise ValueError(f"{p}: holds {report.kind} weights only (e.g. ImageNet ResNet weights), not a detector: train "
                         f"from them (MaskRCNN.load_backbone_state_dict) instead of predicting with them")
    return ImportedWeights(cfg, state_dict, p, fmt, f"format {fmt} ({why})\n{report}")
