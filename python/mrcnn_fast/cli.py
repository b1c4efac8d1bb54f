"""Command line: `mrcnn-fast` (or `python -m mrcnn_fast`) train | eval | predict | convert | make-shapes | demo.

    mrcnn-fast demo                                   # synthetic set -> train -> evaluate -> PNGs (CPU, minutes)
    mrcnn-fast train --train-json J --train-images D --val-json J --val-images D --output runs/x --config small_cpu
    mrcnn-fast eval --weights runs/x/model_final.safetensors --json J --images D
    mrcnn-fast predict photos/ more/*.jpg --weights runs/x --output preds   # overlays + preds/results.json
    torchrun --nproc_per_node=8 -m mrcnn_fast train ...   # multi-process (DDP)

Bad input (missing files, malformed JSON or config, unknown preset, bad options) ends with a one-line error
and exit status 2 (1 for failures while running); MRCNN_DEBUG=1 shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

PROG = "mrcnn-fast"


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # argparse prints usage + message over two lines; keep it to one
        raise UsageError(f"{message} (see {self.prog} --help)")


# --------------------------------------------------------------------------------------------- config
def parse_opts(items) -> dict:
    """["solver.base_lr=0.01", "input.min_size_train=[640,672]"] -> nested dict (values parsed as YAML)."""
    import yaml

    out: dict = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UsageError(f"--opts expects key=value with a dotted key (e.g. solver.base_lr=0.01), got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UsageError(f"--opts: {key!r} conflicts with an earlier option")
        node[parts[-1]] = value
    return out


def load_config(name_or_file: str, opts=(), *, device: str | None = None):
    from .config import get_config, merge

    if name_or_file.lower().endswith((".yaml", ".yml", ".json")) and not Path(name_or_file).is_file():
        raise FileNotFoundError(f"config file not found: {name_or_file}")
    cfg = get_config(name_or_file)
    over = parse_opts(opts)
    if device:
        over.setdefault("train", {})["device"] = device
    return merge(cfg, over) if over else cfg


def _require_file(path, what: str) -> str:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not p.is_file():
        raise FileNotFoundError(f"{what} is not a file: {path}")
    return str(p)


def _require_dir(path, what: str) -> str:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} not found (or not a directory): {path}")
    return str(p)


def _require_writable_file(path, what: str) -> str:
    """Checks that a file can be written at path (its folder may not exist yet): a bad --output fails before
    the work whose result it would hold, not after it."""
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"{what} is a directory, not a file path: {path}")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{what} cannot be written: {parent} is not a directory ({path})")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} cannot be written: no write permission in {parent} ({path})")
    return str(p)


def _out(msg: str = "") -> None:
    from .engine import distributed as du

    if du.is_main_process():
        print(msg, flush=True)


def _err(msg: str) -> None:
    from .engine import distributed as du

    if du.is_main_process():
        print(msg, file=sys.stderr, flush=True)


def _print_metrics(metrics: dict) -> None:
    from .engine.inference import summary_line
    from .evaluation import format_table

    _out(format_table(metrics))
    _out(summary_line(metrics))


# --------------------------------------------------------------------------------------------- commands
def cmd_train(args) -> int:
    from .config import scale_schedule
    from .engine import train
    from .engine.hooks import TimeBudget

    train_json = _require_file(args.train_json, "--train-json")
    train_images = _require_dir(args.train_images, "--train-images")
    if (args.val_json is None) != (args.val_images is None):
        raise UsageError("give both --val-json and --val-images, or neither")
    val_json = _require_file(args.val_json, "--val-json") if args.val_json else None
    val_images = _require_dir(args.val_images, "--val-images") if args.val_images else None
    if args.max_iter is not None and args.max_iter <= 0:
        raise UsageError(f"--max-iter must be positive, got {args.max_iter}")
    if args.time_budget is not None and args.time_budget <= 0:
        raise UsageError(f"--time-budget must be positive, got {args.time_budget}")
    cfg = load_config(args.config, args.opts, device=args.device)
    if args.max_iter is not None:
        cfg = scale_schedule(cfg, args.max_iter)
    t0 = time.perf_counter()
    hooks = []
    if args.time_budget is not None:
        hooks.append(TimeBudget(t0 + args.time_budget, min_iter=min(100, cfg.solver.max_iter), log=_err))
        _err(f"time budget: training stops after at most {args.time_budget:.0f} s (at most "
             f"{cfg.solver.max_iter} iterations; the schedule is scaled to the length that fits)")
    metrics = train(cfg, train_json=train_json, train_images=train_images, output_dir=args.output,
                    val_json=val_json, val_images=val_images, resume=args.resume, hooks=hooks, log=_err)
    _err(f"done in {time.perf_counter() - t0:.0f} s; weights: {Path(args.output) / 'model_final.safetensors'}")
    if metrics:
        _print_metrics(metrics)
    return 0


def _eval_config(args):
    """--config if given, else the config.json saved beside the checkpoint, else r50_fpn."""
    from .engine.checkpoint import CONFIG_FILE

    if args.config:
        return load_config(args.config, args.opts, device=args.device), args.config
    beside = Path(args.weights).parent / CONFIG_FILE
    if beside.is_file():
        return load_config(str(beside), args.opts, device=args.device), str(beside)
    return load_config("r50_fpn", args.opts, device=args.device), None


def cmd_eval(args) -> int:
    from .config import merge
    from .data import CocoDetection
    from .engine import distributed as du
    from .engine import evaluate, load_weights
    from .engine.inference import prepare_evaluation
    from .modeling import build_model, inference_model

    weights = _require_file(args.weights, "--weights")
    json_path = _require_file(args.json, "--json")
    images = _require_dir(args.images, "--images")
    output = _require_writable_file(args.output, "--output") if args.output else None
    cfg, source = _eval_config(args)
    ctx = du.init_distributed(cfg.train.device)
    kp_on = cfg.model.keypoint.enabled
    dataset = CocoDetection(json_path, images, train=False, use_keypoints=None if kp_on else False)
    if source is None:
        # No config with the checkpoint: the data set decides the class count (load_weights checks the rest).
        if cfg.model.roi_heads.num_classes != dataset.num_classes:
            cfg = merge(cfg, {"model": {"roi_heads": {"num_classes": dataset.num_classes}}})
    # Everything about the JSON is checked here, before inference: a mismatch found by the evaluator would
    # only surface after the whole pass over the images.
    notes: list[str] = []   # shown once the weights load too: a failing run stays a one-line error
    iou_types, evaluator_factory = prepare_evaluation(
        cfg, dataset, source=json_path, model=f"the model ({source})" if source else "the model", log=notes.append)
    model = build_model(cfg)
    load_weights(model, weights)
    model.to(ctx.device)
    for note in notes:
        _err(f"warning: {note}")
    _err(f"evaluating {weights} on {len(dataset)} images ({ctx.world_size} process(es) on {ctx.device})"
         + (f", config {source}" if source else ""))
    metrics = evaluate(inference_model(model, cfg), dataset, distributed=ctx.distributed, iou_types=iou_types,
                       evaluator_factory=evaluator_factory,
                       num_workers=args.num_workers, log=_err)
    if output and ctx.is_main:
        from .engine.checkpoint import atomic_write_text

        atomic_write_text(Path(output), json.dumps(metrics, indent=2) + "\n")
    _print_metrics(metrics)
    return 0

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


def collect_images(items) -> tuple[list[Path], list[str]]:
    """The image paths that files, folders (their images, sorted by name) and glob patterns name, each once, in
    the order given -> (paths, problems): an item that names nothing is a problem, reported by the caller."""
    import glob

    paths: list[Path] = []
    problems: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append(f"{item}: no images in this folder ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        elif p.exists():
            paths.append(p)
        elif glob.has_magic(item):
            found = sorted(Path(q) for q in glob.glob(item, recursive=True) if Path(q).is_file())
            if not found:
                problems.append(f"{item}: the pattern matches no file")
            paths.extend(found)
        else:
            problems.append(f"cannot read image {item}: file not found")
    seen: set = set()
    unique = []
    for q in paths:
        key = q.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(q)
    return unique, problems


def image_ids_for(paths: list[Path]) -> list[int]:
    """COCO image ids of the inputs: the file names' numbers where every name is a distinct number (COCO's own
    000000000139.jpg -> 139, so that COCOeval can score the results against its annotations), else 1..N."""
    stems = [q.stem for q in paths]
    if stems and all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(s) for s in stems]
    return list(range(1, len(paths) + 1))


def overlay_names(paths: list[Path]) -> list[str]:
    """<stem>.png for each input; a stem that repeats (same name in two folders) gets _<n> appended."""
    names, used = [], set()
    for q in paths:
        name, n = f"{q.stem}.png", 1
        while name in used:
            n += 1
            name = f"{q.stem}_{n}.png"
        used.add(name)
        names.append(name)
    return names


def coco_results(result: dict, image_id: int, file_name: str, category_id) -> list[dict]:
    """COCO results entries of one Predictor result (mask_format "rle"): bbox xywh, score, segmentation RLE
    with str counts, keypoints [x, y, score] * K when present, and the image's file name."""
    boxes = result["boxes"].double().reshape(-1, 4).tolist()
    scores = result["scores"].tolist()
    labels = result["labels"].tolist()
    masks = result.get("masks")
    kps = result.get("keypoints")
    kps_scores = result.get("keypoints_scores")
    out = []
    for d, ((x1, y1, x2, y2), score, label) in enumerate(zip(boxes, scores, labels)):
        entry = {"image_id": int(image_id), "file_name": file_name, "category_id": category_id(int(label)),
                 "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                 "score": round(float(score), 5)}
        if masks is not None:
            rle = masks[d]
            counts = rle["counts"]
            entry["segmentation"] = {"size": [int(v) for v in rle["size"]],
                                     "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
        if kps is not None:
            xy = kps[d][:, :2].double().tolist()
            v = (kps_scores[d] if kps_scores is not None else kps[d][:, 2]).double().tolist()
            entry["keypoints"] = [round(c, 3) for (x, y), s in zip(xy, v) for c in (x, y, s)]
        out.append(entry)
    return out


class _Counter:
    """A progress line on stderr where tqdm is not installed: "predict: 12/40 images"."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.n, self.enabled = total, 0, enabled

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.enabled:
            end = "\n" if self.n >= self.total else ""
            print(f"\rpredict: {self.n}/{self.total} images", end=end, file=sys.stderr, flush=True)

    def write(self, msg: str) -> None:
        if self.enabled and 0 < self.n < self.total:
            print(file=sys.stderr)
        print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        return _Counter(total, enabled)

    class _Bar(tqdm):
        def write(self, msg):   # tqdm.write is a classmethod; route failures through it so the bar stays intact
            tqdm.write(msg, file=sys.stderr)

    return _Bar(total=total, disable=not enabled, unit="img", desc="predict", file=sys.stderr, dynamic_ncols=True)


def cmd_predict(args) -> int:
    from .engine import distributed as du
    from .predictor import Predictor, _resolve_device, read_image, to_image_tensor
    from .visualize import draw_instances, skeleton_of_config

    if args.batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    if args.score_threshold is not None and not 0.0 <= args.score_threshold <= 1.0:
        raise UsageError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    if not 0.0 <= args.draw_threshold <= 1.0:
        raise UsageError(f"--draw-threshold must be in [0, 1], got {args.draw_threshold}")
    if not Path(args.weights).exists():
        raise FileNotFoundError(f"--weights not found: {args.weights}")
    out_dir = Path(args.output) if args.output else None
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise NotADirectoryError(f"--output is not a directory: {out_dir}")
        _require_writable_file(out_dir / "results.json", "--output")
    _resolve_device(args.device)   # its own message, before init_distributed's (which speaks of train.device)
    paths, problems = collect_images(args.images)
    if not paths:
        raise UsageError("no images to predict on: " + "; ".join(problems))

    ctx = du.init_distributed(args.device)
    predictor = Predictor(args.weights, config=args.config, weights_format=args.weights_format,
                          class_names=args.class_names, device=str(ctx.device), precision=args.precision,
                          score_threshold=args.score_threshold, mask_format=args.mask_format,
                          compile=args.compile)
    ids = image_ids_for(paths)
    names = overlay_names(paths)
    mine = list(range(ctx.rank, len(paths), ctx.world_size))
    skeleton = skeleton_of_config(predictor.cfg)
    if out_dir is not None and ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    du.barrier()
    where = f"{ctx.world_size} processes" if ctx.distributed else str(ctx.device)
    if ctx.is_main:
        for line in predictor.import_report.splitlines():
            _err(f"weights: {line}")
    _err(f"predicting {len(paths)} images with {predictor.weights} ({where}, precision {predictor.precision})")
    for msg in problems:
        _err(f"error: {msg}")

    bar = _progress(len(mine), enabled=ctx.is_main)
    prefix = f"[rank {ctx.rank}] " if ctx.distributed else ""
    results: list[dict] = []
    failed: list[str] = []
    t0 = time.perf_counter()
    done = 0

    def run(batch):
        nonlocal done
        outputs = predictor.predict_tensors([t for _, _, t in batch])
        for (i, pixels, _), res in zip(batch, outputs):
            if out_dir is not None:
                drawn = draw_instances(pixels, res, class_names=predictor.class_names,
                                       score_thresh=max(args.draw_threshold, predictor.score_threshold),
                                       skeleton=skeleton)
                drawn.save(out_dir / names[i])
            if res.get("masks") is not None and not isinstance(res["masks"], list):
                res = dict(res, masks=_to_rles(res["masks"]))
            results.extend(coco_results(res, ids[i], str(paths[i]), predictor.category_id))
        done += len(batch)
        bar.update(len(batch))

    batch = []
    for i in mine:
        try:
            pixels = read_image(paths[i])
        except ValueError as e:   # ImageReadError: report it by name, go on with the others
            failed.append(str(paths[i]))
            bar.write(f"{prefix}error: {e}")
            bar.update(1)
            continue
        batch.append((i, pixels, to_image_tensor(pixels)))
        if len(batch) == args.batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    bar.close()
    seconds = time.perf_counter() - t0

    gathered = du.all_gather_object({"results": results, "failed": failed, "done": done, "seconds": seconds})
    n_done = sum(g["done"] for g in gathered)
    n_failed = sum(len(g["failed"]) for g in gathered) + len(problems)
    if ctx.is_main:
        merged = sorted((r for g in gathered for r in g["results"]),
                        key=lambda r: (r["image_id"], -r["score"]))
        text = json.dumps(merged) + "\n"
        if out_dir is not None:
            from .engine.checkpoint import atomic_write_text

            atomic_write_text(out_dir / "results.json", text)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
        wall = max(g["seconds"] for g in gathered)
        rate = n_done / wall if wall > 0 else float("nan")
        _err(f"predicted {n_done} images in {wall:.1f} s: {rate:.2f} images/s "
             f"({sum(len(g['results']) for g in gathered)} detections"
             + (f", {n_failed} failed" if n_failed else "") + ")")
        if out_dir is not None:
            _err(f"results: {out_dir / 'results.json'}; overlays: {out_dir}/*.png")
    return 1 if n_failed else 0


def cmd_convert(args) -> int:
    from .engine.checkpoint import CONFIG_FILE, FINAL_WEIGHTS, save_config, save_weights
    from .predictor import convert_weights

    out = Path(args.output)
    if out.suffix.lower() == ".safetensors":
        weights_path, folder = out, out.parent
    else:
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"OUT is neither a folder nor a .safetensors path: {out}")
        weights_path, folder = out / FINAL_WEIGHTS, out
    if not Path(args.input).is_file():
        raise FileNotFoundError(f"IN not found (or not a file): {args.input}")
    imported, cfg, state = convert_weights(args.input, weights_format=args.weights_format, config=args.config,
                                           class_names=args.class_names)
    for line in imported.report.splitlines():
        _err(f"weights: {line}")
    folder.mkdir(parents=True, exist_ok=True)
    _require_writable_file(weights_path, "OUT")
    from .config import to_dict

    save_weights(state, weights_path, metadata={"source": str(Path(args.input).name),
                                                "source_format": imported.weights_format})
    save_config(folder, to_dict(cfg))
    _err(f"wrote {weights_path} and {folder / CONFIG_FILE}")
    return 0


def _to_rles(masks) -> list[dict]:
    """COCO RLEs of bool / probability masks (Tensor[D, H, W] or [D, 1, H, W], foreground > 0.5)."""
    import numpy as np
    from pycocotools import mask as mask_util

    m = masks[:, 0] if masks.dim() == 4 else masks
    m = (m > 0.5).to("cpu").numpy().astype(np.uint8)
    if m.shape[0] == 0:
        return []
    return list(mask_util.encode(np.asfortranarray(m.transpose(1, 2, 0))))



def cmd_make_shapes(args) -> int:
    from .data import make_shapes

    for name in ("train", "val"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.size < 32:
        raise UsageError(f"--size must be >= 32, got {args.size}")
    paths = make_shapes(args.out_dir, n_train=args.train, n_val=args.val, seed=args.seed,
                        image_size=(args.size, args.size), occluded_keypoints=args.occluded_keypoints)
    for k, v in paths.items():
        _out(f"{k}: {v}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    if args.max_iter is not None and args.max_iter <= 0:
        raise UsageError(f"--max-iter must be positive, got {args.max_iter}")
    for name in ("train", "val"):   # the demo trains, then evaluates: both sets must have images
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.num_images < 0:
        raise UsageError(f"--num-images must be >= 0, got {args.num_images}")
    result = run_demo(args.output, max_iter=args.max_iter, time_budget=args.time_budget, train_images=args.train,
                      val_images=args.val, seed=args.seed, num_images=args.num_images,
                      overrides=parse_opts(args.opts), log=_err)
    _print_metrics(result.metrics)
    for line in result.notes:
        _err(line)
    return 0


# --------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .demo import DEMO_MAX_ITER, DEMO_TIME_BUDGET, DEMO_TRAIN_IMAGES, DEMO_VAL_IMAGES

    p = _Parser(prog=PROG, description="Fast Mask R-CNN: train, evaluate, predict, synthetic data, demo.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train", help="train on a COCO-format set", description="Train a Mask R-CNN "
                       "(run under torchrun for multi-process training).")
    t.add_argument("--train-json", required=True, help="COCO annotation JSON of the training set")
    t.add_argument("--train-images", required=True, help="folder with the training images")
    t.add_argument("--val-json", help="COCO annotation JSON of the validation set")
    t.add_argument("--val-images", help="folder with the validation images")
    t.add_argument("--output", required=True, help="run folder: checkpoints, config.json, metrics.json")
    t.add_argument("--config", default="r50_fpn", help="preset name (r50_fpn, r101_fpn, x101_fpn, r50_c4, small_cpu) "
                   "or a .yaml/.json file (default: r50_fpn)")
    t.add_argument("--max-iter", type=int, help="override solver.max_iter (a step schedule's steps keep their "
                   "fractions of the run)")
    t.add_argument("--time-budget", type=float, metavar="SECONDS", help="train for as many iterations as fit in "
                   "SECONDS of wall time (measured speed; lr steps keep their fractions of the run; final "
                   "evaluation not included)")
    t.add_argument("--resume", action="store_true", help="continue from OUTPUT/last_checkpoint.pt if present")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override train.device")
    t.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. solver.base_lr=0.01")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="COCO-evaluate a checkpoint", description="Evaluate weights on a COCO-format "
                       "set; the last line printed is `segm AP <x> bbox AP <y>[ keypoints AP <z>]` (AP in [0, 1]).")
    e.add_argument("--weights", required=True, help=".safetensors, .pt/.pth state dict, or last_checkpoint.pt")
    e.add_argument("--json", required=True, help="COCO annotation JSON")
    e.add_argument("--images", required=True, help="folder with the images")
    e.add_argument("--config", help="preset or file (default: config.json beside the weights, else r50_fpn)")
    e.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override train.device")
    e.add_argument("--num-workers", type=int, default=2, help="data loading processes (default 2)")
    e.add_argument("--output", help="also write the metrics to this JSON file")
    e.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="detect objects in images: overlay PNGs and a COCO results JSON",
                        description="Run trained weights on image files, folders (their images, sorted) and glob "
                        "patterns. Writes OUTPUT/<name>.png (masks, boxes, class names, scores, keypoints drawn) and "
                        "OUTPUT/results.json (COCO results: image_id, file_name, category_id, bbox, score, "
                        "segmentation, keypoints; image_id is the file name's number where every name is one, as "
                        "COCO's 000000000139.jpg, else 1..N in input order), or the JSON to stdout without --output. "
                        "Under torchrun the "
                        "images are split over the processes and rank 0 writes the merged file. An image that "
                        "cannot be read is reported and skipped; the exit status is then 1.")
    pr.add_argument("images", nargs="+", metavar="IMAGES", help="image files, folders or glob patterns")
    pr.add_argument("--weights", required=True, help="a `train` run folder (model_final.safetensors + config.json), "
                    "a weights file with config.json beside it, a torchvision .pth state dict or a detectron2 .pkl / "
                    ".pth checkpoint")
    pr.add_argument("--weights-format", default="auto", choices=["auto", "ours", "torchvision", "detectron2"],
                    help="checkpoint kind (default auto: decided from the file, and said)")
    pr.add_argument("--config", help="ours: preset or file (default: config.json beside the weights); torchvision / "
                    "detectron2: a .yaml/.json file of overrides for what the tensors cannot tell")
    pr.add_argument("--class-names", help="'coco' or a .txt (one per line) / .json (list) file of class names in "
                    "label order (default: the config's)")
    pr.add_argument("--output", help="folder for the overlay PNGs and results.json (default: the JSON to stdout, "
                    "no PNGs)")
    pr.add_argument("--score-threshold", type=float, help="drop detections scoring below it (default: the "
                    "config's model.roi_heads.score_thresh_test)")
    pr.add_argument("--draw-threshold", type=float, default=0.5, help="draw the detections scoring at least "
                    "this in the PNGs (default 0.5; results.json keeps all)")
    pr.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default cpu")
    pr.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                    help="auto (default): bf16 where native and its measured AP cost is small, else fp32")
    pr.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default 1)")
    pr.add_argument("--mask-format", choices=["rle", "bool", "prob"], default="rle",
                    help="how masks leave the model (the output files are the same; rle, the default, never "
                    "builds image-sized masks)")
    pr.add_argument("--compile", action="store_true", help="torch.compile the networks (faster on many images of "
                    "one size; each new input size compiles again, tens of seconds)")
    pr.set_defaults(func=cmd_predict)

    cv = sub.add_parser("convert", help="write torchvision / detectron2 weights in our format (safetensors + "
                        "config.json)", description="Import a checkpoint (architecture and conventions from its "
                        "tensors, --config overrides for the rest) and write OUT/model_final.safetensors and "
                        "OUT/config.json: a folder that `predict --weights OUT` and Predictor(OUT) load fast, "
                        "without pickle. An OUT ending in .safetensors writes that file and config.json beside it.")
    cv.add_argument("input", metavar="IN", help="a torchvision .pth state dict or a detectron2 .pkl / .pth")
    cv.add_argument("output", metavar="OUT", help="output folder (or .safetensors file)")
    cv.add_argument("--from", dest="weights_format", default="auto", choices=["auto", "torchvision", "detectron2"],
                    help="source format (default auto: decided from the file)")
    cv.add_argument("--config", help="a .yaml/.json file of config overrides for what the tensors cannot tell")
    cv.add_argument("--class-names", help="'coco' or a .txt / .json file of class names in label order")
    cv.set_defaults(func=cmd_convert)

    s = sub.add_parser("make-shapes", help="write the synthetic shapes set", description="Write a synthetic "
                       "COCO-format set of triangles, rectangles and ellipses with masks and 4 keypoints.")
    s.add_argument("out_dir", metavar="OUT_DIR")
    s.add_argument("--train", type=int, default=256, help="training images (default 256)")
    s.add_argument("--val", type=int, default=64, help="validation images (default 64)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    s.add_argument("--occluded-keypoints", choices=["omit", "label"], default="omit",
                   help="keypoints hidden by a later shape: omit = not labelled (default), label = visibility 1 at "
                   "the hidden full shape's extreme point")
    s.set_defaults(func=cmd_make_shapes)

    d = sub.add_parser("demo", help="synthetic data -> train -> evaluate -> PNGs (CPU, a few minutes)",
                       description="Generate the shapes set, train the shapes recipe (R18-FPN at half width), "
                       "evaluate it and draw its predictions.")
    d.add_argument("--output", default="demo_out", help="folder for data, run and PNGs (default demo_out)")
    d.add_argument("--max-iter", type=int, help="training iterations (default: as many as fit in --time-budget, "
                   f"at most {DEMO_MAX_ITER})")
    d.add_argument("--time-budget", type=float, default=DEMO_TIME_BUDGET,
                   help=f"seconds the whole demo should take (default {DEMO_TIME_BUDGET:.0f})")
    d.add_argument("--train", type=int, default=DEMO_TRAIN_IMAGES,
                   help=f"training images (default {DEMO_TRAIN_IMAGES})")
    d.add_argument("--val", type=int, default=DEMO_VAL_IMAGES, help=f"validation images (default {DEMO_VAL_IMAGES})")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--num-images", type=int, default=8, help="PNGs to write (default 8)")
    d.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    from .engine import distributed as du

    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "func", None) is None:
            raise UsageError(f"a command is required: train, eval, predict, convert, make-shapes or demo "
                             f"(see {PROG} --help)")
        code = args.func(args)
    except SystemExit as e:   # --help / --version
        code = e.code if isinstance(e.code, int) else 0
    except BaseException as e:
        code = _report(e)
    if du.is_dist():
        du.exit_after_cleanup(code)
    return code


def _message(e: BaseException) -> str:
    """One line for the user. An exception raised in a DataLoader worker comes back re-raised with the worker's
    whole traceback as its message ("Caught ValueError in DataLoader worker process 0. Original Traceback ...");
    its last line is the worker's own "<Type>: <message>", which is what the user needs."""
    s = str(e)
    if isinstance(e, OSError) and e.filename and str(e.filename) not in s:
        s = f"{e.strerror}: {e.filename}"
    if s.startswith("Caught ") and "Original Traceback" in s:
        last = [line for line in s.splitlines() if line.strip()][-1].strip()
        own = re.fullmatch(r"[\w.]+: (.*)", last)   # "<Type>: <message>"
        s = (own.group(1) if own else last) + " (in a data loader worker)"
    return " ".join(s.split()) or type(e).__name__


def _report(e: BaseException) -> int:
    from .engine.checkpoint import CheckpointError

    if os.environ.get("MRCNN_DEBUG"):
        raise e
    if isinstance(e, KeyboardInterrupt):
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    if isinstance(e, UsageError):
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        print(f"{PROG}: error: {_message(e)}", file=sys.stderr)
        return 2
    if isinstance(e, (ValueError, TypeError, CheckpointError, OSError, FloatingPointError, json.JSONDecodeError)):
        print(f"{PROG}: error: {_message(e)}", file=sys.stderr)
        return 2 if isinstance(e, (ValueError, TypeError, CheckpointError)) else 1
    raise e


if __name__ == "__main__":
    sys.exit(main())
