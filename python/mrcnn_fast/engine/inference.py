"""Running a detection model over a data set and COCO-evaluating it, sharded over ranks when distributed."""
from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Callable

import torch
from torch.utils.data import DataLoader, Subset

from ..data.loader import collate
from . import distributed as du


def _to_cpu(v):
    if torch.is_tensor(v):
        return v.detach().cpu()
    if isinstance(v, list):
        return [_to_cpu(x) for x in v]
    return v


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def takes_mask_format(model: torch.nn.Module) -> bool:
    """Whether model's call takes the mask_format keyword (MaskRCNN, FlipTTA); other detectors are called with
    the images alone."""
    try:
        return "mask_format" in inspect.signature(du.unwrap(model).forward).parameters
    except (TypeError, ValueError):
        return False


def prepare_evaluation(cfg, dataset, *, source: str, model: str, log: Callable[[str], None]):
    """Checks an evaluation set against a model config before any inference (or training) runs, so that a bad
    set fails in seconds: keypoint count, categories (by name, config data.class_names) and ground truth
    COCOeval can read (evaluation.prepare_ground_truth). `source` names the set and `model` the model in
    messages; notes go to `log`. -> (iou_types, evaluator_factory) for `evaluate`."""
    from ..evaluation import COCOEvaluator, label_category_ids, prepare_ground_truth

    kp = cfg.model.keypoint
    k = int(getattr(dataset, "num_keypoints", 0) or 0)
    if kp.enabled and k and k != kp.num_keypoints:
        raise ValueError(f"{model} has {kp.num_keypoints} keypoints but {source} has {k}")
    if kp.enabled and not k:
        log(f"keypoint evaluation skipped: no category of {source} declares keypoints")
    iou_types = ("bbox", "segm") + (("keypoints",) if kp.enabled and k else ())
    cat_ids = label_category_ids(dataset.coco, cfg.data.class_names, cfg.model.roi_heads.num_classes,
                                 source=source, model=model, log=log)
    gt = prepare_ground_truth(dataset.coco, keypoints="keypoints" in iou_types, source=source, log=log)
    return iou_types, (lambda types: COCOEvaluator(gt, cat_ids, iou_types=types))


@torch.no_grad()
def inference(model: torch.nn.Module, dataset, *, indices: Sequence[int] | None = None, batch_size: int = 1,
              num_workers: int = 0, mask_format: str | None = None) -> Iterator[tuple[list[dict], list[dict]]]:
    """Yields (targets, outputs) per batch over dataset (or the given indices), outputs moved to the CPU.

    The model is put in eval mode for the duration and restored afterwards. mask_format: passed to the model's
    call (model(images, mask_format=...), see MaskRCNN) when given; None calls model(images).
    """
    model = du.unwrap(model)
    device = _model_device(model)
    subset = dataset if indices is None else Subset(dataset, list(indices))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate,
                        persistent_workers=False)
    kwargs = {} if mask_format is None else {"mask_format": mask_format}
    was_training = model.training
    model.eval()
    try:
        for images, targets in loader:
            outputs = model([im.to(device, non_blocking=True) for im in images], **kwargs)
            yield targets, [{k: _to_cpu(v) for k, v in o.items()} for o in outputs]
    finally:
        model.train(was_training)


def _iou_types(has_keypoints: bool) -> tuple[str, ...]:
    return ("bbox", "segm", "keypoints") if has_keypoints else ("bbox", "segm")


def evaluate(model: torch.nn.Module, dataset, *, distributed: bool | None = None,
             iou_types: Sequence[str] | None = None,
             evaluator_factory: Callable[[tuple[str, ...]], object] | None = None, batch_size: int = 1,
             num_workers: int = 0, log: Callable[[str], None] | None = None) -> dict:
    """COCO metrics of model on dataset: {"bbox": {"AP": ..., ...}, "segm": {...}[, "keypoints": {...}]}.

    Distributed (default: whenever a process group with more than one rank exists), rank r runs images
    r, r + world_size, ...; every rank's converted results are gathered to rank 0, which evaluates them,
    and the metrics are broadcast so every rank returns the same dict. Call it on every rank.

    iou_types: default bbox + segm, plus keypoints when the model's outputs carry keypoints.
    evaluator_factory(iou_types): builds the evaluator (default: evaluation.COCOEvaluator over
        dataset.coco / dataset.cat_ids); it needs .process(image_ids, outputs), .results and
        .evaluate(results=...).
    Masks are requested as RLE (mask_format="rle") when the model's call takes mask_format (MaskRCNN,
    FlipTTA): pasting straight to RLE avoids materialising full-image probability masks. Evaluate a config's
    model as modeling.inference_model(model, cfg), which applies its test-time augmentation.
    """
    if distributed is None:
        distributed = du.is_dist()
    rank, world = (du.get_rank(), du.get_world_size()) if distributed else (0, 1)
    if evaluator_factory is None:
        from ..evaluation import COCOEvaluator

        def evaluator_factory(types):
            return COCOEvaluator(dataset.coco, dataset.cat_ids, iou_types=types)

    inner = du.unwrap(model)
    mask_format = "rle" if takes_mask_format(inner) else None
    t0 = time.perf_counter()
    evaluator, has_kp, n_images = None, False, 0
    for targets, outputs in inference(inner, dataset, indices=range(rank, len(dataset), world),
                                      batch_size=batch_size, num_workers=num_workers, mask_format=mask_format):
        if evaluator is None:
            has_kp = any("keypoints" in o for o in outputs)
            evaluator = evaluator_factory(tuple(iou_types) if iou_types else _iou_types(has_kp))
        evaluator.process([int(t["image_id"]) for t in targets], outputs)
        n_images += len(targets)
    local = {"results": list(evaluator.results) if evaluator is not None else [], "keypoints": has_kp, "n": n_images}
    gathered = du.all_gather_object(local) if distributed else [local]
    metrics = None
    if rank == 0:
        results = [r for g in gathered for r in g["results"]]
        types = tuple(iou_types) if iou_types else _iou_types(any(g["keypoints"] for g in gathered))
        metrics = evaluator_factory(types).evaluate(results=results)
        if log is not None:
            n = sum(g["n"] for g in gathered)
            dt = time.perf_counter() - t0
            log(f"evaluated {n} images in {dt:.1f} s ({n / max(dt, 1e-9):.2f} img/s)")
    if distributed:
        metrics = du.broadcast_object(metrics)
    return metrics


def summary_line(metrics: dict) -> str:
    """`segm AP <x> bbox AP <y>[ keypoints AP <z>]` (AP in [0, 1]), the CLI's machine-readable last line."""
    def ap(kind: str) -> float:
        return metrics.get(kind, {}).get("AP", float("nan"))

    line = f"segm AP {ap('segm'):.4f} bbox AP {ap('bbox'):.4f}"
    if "keypoints" in metrics:
        line += f" keypoints AP {metrics['keypoints'].get('AP', float('nan')):.4f}"
    return line


def default_log(msg: str) -> None:
    if du.is_main_process():
        print(msg, file=sys.stderr, flush=True)
