"""Overfit checks on real COCO photos: train on a handful of images, evaluate on the same images.

    python bench/overfit_coco.py [--case masks,keypoints] [--data DIR] [--max-iter N] [--size S] [--out DIR]

Two cases, both trained with mrcnn_fast.engine.train from the small_cpu preset (R18-FPN, from scratch: no
pretrained backbone is available) with config overrides, flips off, and COCO-evaluated on the training images:

    masks:      ../shared/data/coco_samples (6 photos, 35 instances + 1 crowd, 80 COCO categories mapped to
                contiguous labels 1..80), masks on, keypoints off.            target: segm AP >= 0.9
    keypoints:  ../shared/data/coco_persons (4 photos, 14 persons with 17 COCO keypoints, COCO flip pairs),
                keypoint head on.                                            target: keypoint AP >= 0.8

The shared data folder: --data, else $MRCNN_SHARED_DATA, else ../shared/data beside the repository or the
nearest ancestor's shared/data (as tests/data_helpers.py). tests/test_overfit_real.py runs the same cases.

Settings (measured on 2 shared CPU cores, one thread): half-width R18 (width 32), 2 images per batch, 64 RoIs
per image with up to half positives (more mask samples per iteration), lr 0.04 with gradient-norm clipping at 5
(0.06 diverges), warm-up + cosine. Per case, the command line's defaults are the run that reaches the target:

    masks:      shortest side 480 px (about the photos' own size; downscaled to 320 px, thin parts lose the
                detail that mask IoUs above 0.9-0.95 need), 2500 iterations, 256-channel mask head. Measured:
                segm AP 0.930 (bbox 0.972) in 40 min; the same at 320 px: 0.870; 320 px with the 64-channel
                head, 2000 iterations: 0.864.
    keypoints:  320 px, 500 iterations (~2.5 min). Measured: keypoint AP 0.970.

run_case's own defaults (used by tests/test_overfit_real.py) are the short runs: 800 iterations at 320 px for
masks (~4 min), 500 for keypoints; --size / --max-iter / --override replace the case's defaults.

The script also reports the segm AP of an oracle that puts the ground-truth mask, resampled to 28 x 28 in
its exact ground-truth box (RoIAlign, aligned=True, as the mask targets), back into the image (mask_ceiling),
for both paste conventions: 0.892 on coco_samples with torchvision's paste (misaligned with the targets by up
to ~1 px; this capped the masks target while the model pasted that way) and 1.000 with the aligned paste
(model.mask.paste = "aligned", the default).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
try:
    import mrcnn_fast  # noqa: F401  (installed, or on PYTHONPATH)
except ImportError:  # run from a source checkout with the in-place build
    sys.path.insert(0, str(REPO / "python"))

import torch  # noqa: E402

from mrcnn_fast.config import get_config, merge  # noqa: E402
from mrcnn_fast.data import COCO_PERSON_FLIP_PAIRS  # noqa: E402

# name -> folder, annotation file, metric (iou type, name), target, config overrides
CASES = {
    "masks": {
        "folder": "coco_samples", "json": "annotations.json", "metric": ("segm", "AP"), "target": 0.9,
        "overrides": {"model": {"keypoint": {"enabled": False}}},
    },
    "keypoints": {
        "folder": "coco_persons", "json": "annotations.json", "metric": ("keypoints", "AP"), "target": 0.8,
        "overrides": {"model": {"keypoint": {"enabled": True, "num_keypoints": 17,
                                             "flip_pairs": [list(p) for p in COCO_PERSON_FLIP_PAIRS]}}},
    },
}
DEFAULT_ITERS = {"masks": 800, "keypoints": 500}
DEFAULT_SIZE = 320
# the command line's defaults per case: the runs that reach the targets (see the module docstring)
TARGET_RUNS = {
    "masks": {"max_iter": 2500, "size": 480, "override": {"model": {"mask": {"conv_dim": 256}}}},
    "keypoints": {"max_iter": 500, "size": 320, "override": None},
}


def shared_data_dir(start: Path = REPO) -> Path | None:
    """$MRCNN_SHARED_DATA, else <repo>/../shared/data, else the nearest ancestor's shared/data."""
    env = os.environ.get("MRCNN_SHARED_DATA")
    if env:
        return Path(env) if Path(env).is_dir() else None
    primary = start / ".." / "shared" / "data"
    if primary.is_dir():
        return primary.resolve()
    for anc in start.parents:
        if (anc / "shared" / "data").is_dir():
            return anc / "shared" / "data"
    return None


def case_paths(name: str, data_dir: Path) -> tuple[Path, Path]:
    c = CASES[name]
    return data_dir / c["folder"] / c["json"], data_dir / c["folder"] / "images"


def case_config(name: str, *, max_iter: int | None = None, size: int = DEFAULT_SIZE, seed: int = 0,
                eval_period: int = 0, override: dict | None = None):
    """small_cpu tuned to memorise a few photos: every image in every batch, no flips, shortest side `size`."""
    iters = int(max_iter or DEFAULT_ITERS[name])
    cfg = get_config("small_cpu", {
        "model": {"backbone": {"width": 32}, "roi_heads": {"batch_size_per_image": 64, "positive_fraction": 0.5}},
        "input": {"min_size_train": [size], "max_size_train": int(size * 5 / 3), "min_size_test": size,
                  "max_size_test": int(size * 5 / 3), "hflip_prob": 0.0},
        "solver": {"max_iter": iters, "warmup_iters": min(50, iters // 5), "base_lr": 0.04,
                   "schedule": "cosine", "ims_per_batch": 2,
                   "clip_grad_norm": 5.0},
        "train": {"seed": seed, "num_workers": 0, "checkpoint_period": 0, "eval_period": eval_period,
                  "log_period": 25},
    })
    cfg = merge(cfg, CASES[name]["overrides"])
    return merge(cfg, override) if override else cfg


@torch.no_grad()
def mask_ceiling(json_path, image_dir, resolution: int = 28, paste: str = "aligned") -> dict:
    """COCO metrics of an oracle: every non-crowd instance detected with its exact ground-truth box, score 1 and
    its ground-truth mask resampled to resolution x resolution in that box (RoIAlign, as the mask targets) and
    pasted back with ops.paste_masks_in_image in the convention `paste` ("aligned" | "torchvision", as
    model.mask.paste), as the model's outputs are. Its segm AP is the most a Mask R-CNN with that mask resolution
    and paste can score on the set."""
    if paste not in ("aligned", "torchvision"):
        raise ValueError(f"paste must be 'aligned' or 'torchvision', got {paste!r}")
    from mrcnn_fast import ops
    from mrcnn_fast.data import CocoDetection
    from mrcnn_fast.evaluation import COCOEvaluator

    ds = CocoDetection(str(json_path), str(image_dir), use_keypoints=False)
    ev = COCOEvaluator(ds.coco, ds.cat_ids, iou_types=("bbox", "segm"))
    for i in range(len(ds)):
        image, t = ds[i]
        keep = t["iscrowd"] == 0
        boxes, masks = t["boxes"][keep], t["masks"][keep].float()
        hw = tuple(image.shape[-2:])
        if len(boxes):
            rois = torch.cat([torch.arange(len(boxes), dtype=boxes.dtype)[:, None], boxes], 1)
            small = ops.roi_align(masks[:, None], rois, (resolution, resolution), 1.0, 0, True)
            pasted = ops.paste_masks_in_image(small, boxes, hw, aligned=paste == "aligned")
        else:
            pasted = torch.zeros((0, 1) + hw)
        ev.process([int(t["image_id"])], [{"boxes": boxes, "labels": t["labels"][keep],
                                           "scores": torch.ones(len(boxes)), "masks": pasted}])
    return ev.evaluate()


def run_case(name: str, *, data_dir: Path, output_dir: Path, max_iter: int | None = None, size: int = DEFAULT_SIZE,
             seed: int = 0, eval_period: int = 0, override: dict | None = None, log=None) -> dict:
    """Trains and evaluates one case; returns {case, metrics, value, target, passed, seconds, iterations, ...}."""
    from mrcnn_fast.engine import train

    if log is None:
        def log(msg):
            print(msg, file=sys.stderr, flush=True)
    json_path, images = case_paths(name, data_dir)
    cfg = case_config(name, max_iter=max_iter, size=size, seed=seed, eval_period=eval_period, override=override)
    t0 = time.perf_counter()
    metrics = train(cfg, train_json=json_path, train_images=images, val_json=json_path, val_images=images,
                    output_dir=output_dir, log=log)
    seconds = time.perf_counter() - t0
    iou, metric = CASES[name]["metric"]
    value = float(metrics.get(iou, {}).get(metric, float("nan")))
    r = {"case": name, "data": str(json_path), "metrics": metrics, "metric": f"{iou} {metric}", "value": value,
         "target": CASES[name]["target"], "passed": value >= CASES[name]["target"], "seconds": seconds,
         "iterations": cfg.solver.max_iter, "size": size}
    if iou == "segm":
        res = 2 * cfg.model.mask.pooler_resolution   # the FCN head's deconv doubles the pooled size
        by_paste = {p: mask_ceiling(json_path, images, res, p)["segm"]["AP"] for p in ("aligned", "torchvision")}
        paste = cfg.model.mask.paste
        r["ceiling"] = {"resolution": res, "paste": paste, "segm_AP": by_paste[paste], "segm_AP_by_paste": by_paste}
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="masks,keypoints", help="comma-separated: " + ", ".join(CASES))
    p.add_argument("--data", default=None, help="the shared data folder (holding coco_samples/, coco_persons/)")
    p.add_argument("--max-iter", type=int, default=None, help="iterations per case (default: per case)")
    p.add_argument("--size", type=int, default=None, help="shortest image side in training and test "
                                                          "(default: per case)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-period", type=int, default=0, help="also evaluate every N iterations (0: at the end)")
    p.add_argument("--override", default=None, help="JSON of config overrides applied to every case (replaces "
                                                    "the case's default overrides)")
    p.add_argument("--workdir", default=None, help="keep checkpoints here (default: a temporary folder, removed)")
    p.add_argument("--out", default=None, help="write overfit_coco.json here (default: print only)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: on a shared 2-core machine more threads stall each other)")
    args = p.parse_args(argv)
    if args.override is not None:
        try:
            args.override = json.loads(args.override)
        except json.JSONDecodeError as e:
            p.error(f"--override is not valid JSON: {e}")
    names = [c.strip() for c in args.case.split(",") if c.strip()]
    bad = [c for c in names if c not in CASES]
    if bad:
        p.error(f"unknown case(s) {bad}; known: {', '.join(CASES)}")
    data_dir = Path(args.data) if args.data else shared_data_dir()
    if data_dir is None or not data_dir.is_dir():
        print("shared data folder not found (pass --data or set MRCNN_SHARED_DATA)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    from mrcnn_fast.evaluation import format_table

    results = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mrcnn_overfit_") as tmp:
        for name in names:
            t = TARGET_RUNS[name]
            r = run_case(name, data_dir=data_dir, output_dir=Path(args.workdir or tmp) / name,
                         max_iter=args.max_iter or t["max_iter"], size=args.size or t["size"], seed=args.seed,
                         eval_period=args.eval_period,
                         override=args.override if args.override is not None else t["override"])
            results.append(r)
            print(f"\n== {name}: {r['iterations']} iterations at {r['size']} px in {r['seconds']:.0f} s "
                  f"(train + eval); {r['metric']} {r['value']:.3f} (target {r['target']}: "
                  f"{'reached' if r['passed'] else 'NOT reached'})" + _ceiling_text(r))
            print(format_table(r["metrics"]), flush=True)
    text = report(results, time.perf_counter() - t0, args)
    print("\n" + text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "overfit_coco.md").write_text(text)
        (out / "overfit_coco.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    return 0 if all(r["passed"] for r in results) else 1


def _ceiling_text(r: dict) -> str:
    c = r.get("ceiling")
    if not c:
        return ""
    by = c.get("segm_AP_by_paste", {c.get("paste", "model"): c["segm_AP"]})
    pastes = ", ".join(f"{v:.3f} with the {k} paste" + (" (the model's)" if k == c.get("paste") else "")
                       for k, v in by.items())
    return (f"; ceiling of {c['resolution']} x {c['resolution']} masks (oracle: ground-truth masks at that "
            f"resolution in ground-truth boxes): segm AP {pastes}")


def report(results: list[dict], total_s: float, args) -> str:
    import platform
    import shlex

    from mrcnn_fast.evaluation import format_table

    lines = ["# Overfit checks on real COCO photos", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()} CPU, {os.cpu_count()} "
             f"cores (shared with other jobs), torch {torch.__version__}, {args.threads} thread(s); "
             f"total {total_s / 60:.1f} min.",
             "", f"Command: `python bench/overfit_coco.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}`", "",
             "| case | data | iterations | size | metric | value | target | train + eval time |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r['case']} | {Path(r['data']).parent.name} | {r['iterations']} | {r['size']} | "
                     f"{r['metric']} | "
                     f"{r['value']:.3f} | {r['target']} ({'reached' if r['passed'] else 'NOT reached'}) | "
                     f"{r['seconds']:.0f} s |")
    for r in results:
        lines += ["", f"{r['case']} (AP in percent, evaluated on the training images){_ceiling_text(r)}:", "",
                  "```", format_table(r["metrics"]), "```"]
    lines += ["", "Settings and measured limits: see the docstring of bench/overfit_coco.py."]
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    sys.exit(main())
