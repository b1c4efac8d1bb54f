"""Command line: `mrcnn-fast` (or `python -m mrcnn_fast`) train | eval | make-shapes | demo.

    mrcnn-fast demo                                   # synthetic set -> train -> evaluate -> PNGs (CPU, minutes)
    mrcnn-fast train --train-json J --train-images D --val-json J --val-images D --output runs/x --config small_cpu
    mrcnn-fast eval --weights runs/x/model_final.safetensors --json J --images D
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

    p = _Parser(prog=PROG, description="Fast Mask R-CNN: train, evaluate, synthetic data, demo.")
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
            raise UsageError(f"a command is required: train, eval, make-shapes or demo (see {PROG} --help)")
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
