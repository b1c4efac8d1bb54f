"""Where a trained model loses box and keypoint AP: per-instance localisation errors on a COCO-format val set.

    python bench/error_analysis.py --weights RUN/model_final.safetensors --json VAL.json --images VAL_DIR

Each non-crowd ground-truth instance is matched greedily (by score) to the same-class detection with the
highest mask IoU above 0.5. Printed for the matched pairs: the box IoU of the predicted box and of the tight box
of the predicted mask (fractions above 0.75 / 0.85 / 0.9 / 0.95: what AP at high IoU needs), and, for keypoint
models, the OKS of each instance (COCO's formula with the evaluator's sigmas and the instance's area) per category
and by the number of hidden keypoints (visibility 1, or 0 = not labelled, as the shapes set leaves occluded
ones by default), plus the keypoint error in units of sqrt(area) for visible
and occluded keypoints. The config is read from config.json beside the weights.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

try:
    import mrcnn_fast  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from mrcnn_fast.config import get_config  # noqa: E402
from mrcnn_fast.data import CocoDetection  # noqa: E402
from mrcnn_fast.engine import load_weights  # noqa: E402
from mrcnn_fast.engine.inference import inference  # noqa: E402
from mrcnn_fast.evaluation import COCO_PERSON_SIGMAS, DEFAULT_SIGMA  # noqa: E402
from mrcnn_fast.modeling import build_model, inference_model  # noqa: E402
from mrcnn_fast.ops import box_iou  # noqa: E402


def match(target: dict, out: dict) -> list[tuple[int, int]]:
    """(gt index, detection index) pairs: each gt takes the unused same-class detection of highest mask IoU > 0.5,
    detections visited by descending score."""
    masks = out["masks"][:, 0] > 0.5 if out["masks"].dtype != torch.bool else out["masks"][:, 0]
    order = out["scores"].argsort(descending=True).tolist()
    used, pairs = set(), []
    for j in range(len(target["boxes"])):
        if target["iscrowd"][j]:
            continue
        gm = target["masks"][j].bool()
        best, bi = 0.5, -1
        for i in order:
            if i in used or out["labels"][i] != target["labels"][j]:
                continue
            iou = (masks[i] & gm).sum().item() / max((masks[i] | gm).sum().item(), 1)
            if iou > best:
                best, bi = iou, i
        if bi >= 0:
            used.add(bi)
            pairs.append((j, bi))
    return pairs


def _fractions(x: np.ndarray) -> str:
    return (f"mean {x.mean():.3f}  " + "  ".join(f">{t} {np.mean(x > t):.3f}" for t in (0.75, 0.85, 0.9, 0.95))
            if len(x) else "none")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = get_config(str(Path(args.weights).parent / "config.json"))
    ds = CocoDetection(args.json, args.images, train=False,
                       use_keypoints=None if cfg.model.keypoint.enabled else False)
    model = build_model(cfg)
    load_weights(model, args.weights)
    names = {i + 1: ds.coco.cats[c]["name"] for i, c in enumerate(ds.cat_ids)}
    k = ds.num_keypoints if cfg.model.keypoint.enabled else 0
    sig = COCO_PERSON_SIGMAS if k == 17 else np.full(k, DEFAULT_SIGMA)
    n_gt = n_matched = 0
    box_iou_pred, box_iou_mask, side_err = [], [], []
    oks_by_cat, oks_by_occ, err = defaultdict(list), defaultdict(list), {"visible": [], "occluded": []}
    with torch.no_grad():
        for targets, outputs in inference(inference_model(model, cfg), ds):
            t, o = targets[0], outputs[0]
            n_gt += int((t["iscrowd"] == 0).sum())
            pairs = match(t, o)
            n_matched += len(pairs)
            masks = o["masks"][:, 0] > 0.5 if o["masks"].dtype != torch.bool else o["masks"][:, 0]
            for j, i in pairs:
                g = t["boxes"][j:j + 1].float()
                box_iou_pred.append(box_iou(o["boxes"][i:i + 1].float(), g).item())
                side_err.append((o["boxes"][i].float() - g[0]).tolist())
                ys, xs = torch.nonzero(masks[i], as_tuple=True)
                if len(xs):
                    tight = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
                    box_iou_mask.append(box_iou(tight, g).item())
                if not k or "keypoints" not in t:
                    continue
                gk, pk = t["keypoints"][j].double().numpy(), o["keypoints"][i].double().numpy()
                vis = gk[:, 2] > 0
                if not vis.any():
                    continue
                area = max(float(t["area"][j]), 1e-9)
                d2 = ((gk[:, :2] - pk[:, :2]) ** 2).sum(1)
                oks = np.exp(-d2 / (2 * area * (2 * sig) ** 2 + np.spacing(1)))[vis].mean()
                label = int(t["labels"][j])
                oks_by_cat[names.get(label, str(label))].append(oks)
                oks_by_occ[int((gk[:, 2] < 2).sum())].append(oks)
                for kk in np.flatnonzero(vis):
                    err["occluded" if gk[kk, 2] == 1 else "visible"].append(np.sqrt(d2[kk] / area))
    print(f"{n_matched} of {n_gt} non-crowd instances matched (mask IoU > 0.5, same class)")
    print(f"box IoU, predicted box:      {_fractions(np.array(box_iou_pred))}")
    print(f"box IoU, tight box of mask:  {_fractions(np.array(box_iou_mask))}")
    if side_err:    # a bias here (not just spread) would point at a coordinate-convention error
        e = np.array(side_err)
        print("predicted - gt box side (px), x1 y1 x2 y2:  mean " + " ".join(f"{v:+.2f}" for v in e.mean(0)) +
              "  median " + " ".join(f"{v:+.2f}" for v in np.median(e, 0)) +
              "  median |.| " + " ".join(f"{v:.2f}" for v in np.median(np.abs(e), 0)))
    if oks_by_cat:
        print("keypoint OKS per instance (fraction above 0.5 / 0.75 / 0.9):")
        groups = [(f"category {c}", v) for c, v in sorted(oks_by_cat.items())]
        groups += [(f"{n} hidden keypoint(s)", v) for n, v in sorted(oks_by_occ.items())]
        for name, v in groups:
            v = np.array(v)
            print(f"  {name:28s} n={len(v):5d}  mean {v.mean():.3f}  "
                  f"{np.mean(v > .5):.3f} / {np.mean(v > .75):.3f} / {np.mean(v > .9):.3f}")
        for name, v in err.items():
            if v:
                print(f"  {name} keypoints: n={len(v)}, median error {np.median(v):.3f} sqrt(area)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
