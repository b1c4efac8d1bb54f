"""The training loop: iteration-based SGD with checkpoints, exact resume, periodic evaluation and DDP.

    metrics = train(get_config("small_cpu"), train_json=..., train_images=..., output_dir="runs/x",
                    val_json=..., val_images=...)

`Trainer` is the loop itself and takes any detection model (train mode: images, targets -> dict of
scalar losses) and any loader factory, so it is usable without the data set and model packages.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import Config, merge, to_dict
from ..data.keypoints import COCO_PERSON_FLIP_PAIRS, flip_pairs_from_names
from . import checkpoint as ckpt
from . import distributed as du
from . import host_memory
from .inference import default_log, evaluate, prepare_evaluation, summary_line
from .solver import LRSchedule, build_optimizer


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_has_native_bf16() -> bool:
    """True where the CPU advertises bfloat16 dot-product instructions (x86 avx512_bf16 / amx_bf16, Arm bf16);
    only Linux's /proc/cpuinfo is read, elsewhere the answer is False."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read(1 << 20)
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_bf16_autocast(mode: str) -> bool:
    """Whether training on CPU runs under bfloat16 autocast for solver.cpu_autocast = mode."""
    if mode not in ("none", "bfloat16", "auto"):
        raise ValueError(f"solver.cpu_autocast must be 'none', 'bfloat16' or 'auto', got {mode!r}")
    return mode == "bfloat16" or (mode == "auto" and cpu_has_native_bf16())


def _to_device(obj, device: torch.device):
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Progress:
    """A tqdm bar on a terminal; plain log lines (every log_period iterations) otherwise. Silent off rank 0."""

    def __init__(self, start: int, total: int, *, log_period: int, enabled: bool = True, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.total, self.log_period = total, max(1, log_period)
        self.bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, file=self.stream, dynamic_ncols=True, desc="train",
                            unit="it", smoothing=0.05)
        self.last_t, self.last_it = time.perf_counter(), start
        self.t0, self.start = self.last_t, start

    def write(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    def update(self, done: int, losses: dict[str, float] | None, lr: float, grad_norm: float | None = None) -> None:
        """done: completed iterations; losses: window means to show (None: not a log iteration)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            if losses is not None:
                gn = f" gnorm {grad_norm:.3g}" if grad_norm is not None else ""
                self.bar.set_postfix_str(_fmt_losses(losses) + f" lr {lr:.3g}" + gn, refresh=False)
            return
        if losses is None:
            return
        now = time.perf_counter()
        rate = (done - self.last_it) / max(now - self.last_t, 1e-9)
        self.last_t, self.last_it = now, done
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        gn = f"  gnorm {grad_norm:.3g}" if grad_norm is not None else ""
        self.write(f"iter {done}/{self.total}  {_fmt_losses(losses)}  lr {lr:.4g}{gn}  {rate:.2f} it/s  "
                   f"eta {_fmt_eta(eta)}")

    def set_total(self, total: int) -> None:
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt_losses(losses: dict[str, float]) -> str:
    total = sum(losses.values())
    parts = [f"loss {total:.3f}"] + [f"{k.removeprefix('loss_')} {v:.3f}" for k, v in losses.items()]
    return " ".join(parts)


Hook = Callable[["Trainer", int], None]


class Trainer:
    """Runs iterations start_iter .. cfg.solver.max_iter - 1 of SGD on model.

    Args:
        cfg: the full config (solver and train sections are used here).
        model: a module on any device; train mode maps (list[Tensor[3,H,W]], list[dict]) -> dict of scalar losses.
        loader_fn: loader_fn(start_iter) -> an iterable of (images, targets) batches for this rank whose
            k-th element is the batch of iteration start_iter + k (what makes resume exact).
        output_dir: checkpoints, config.json and metrics.json go here (rank 0 writes).
        evaluate_fn: evaluate_fn(model) -> metrics dict (called on every rank; None: no evaluation).
        resume: continue from output_dir/last_checkpoint.pt when it exists.
        hooks: hook(trainer, completed_iterations) after each iteration (after any checkpoint of it).
        device: where to train (default: the device torchrun/cfg.train.device select).
        find_unused_parameters: passed to DistributedDataParallel.
    """

    def __init__(self, cfg: Config, model: torch.nn.Module, loader_fn: Callable[[int], Iterable], *,
                 output_dir: str | os.PathLike, evaluate_fn: Callable[[torch.nn.Module], dict] | None = None,
                 resume: bool = False, hooks: Sequence[Hook] = (), device: torch.device | str | None = None,
                 find_unused_parameters: bool = False, log: Callable[[str], None] = default_log):
        self.cfg = cfg
        self.ctx = du.init_distributed(cfg.train.device)
        self.device = torch.device(device) if device is not None else self.ctx.device
        self.output_dir = Path(output_dir)
        self.loader_fn, self.evaluate_fn, self.hooks, self.log = loader_fn, evaluate_fn, list(hooks), log
        s = cfg.solver
        if s.max_iter <= 0:
            raise ValueError(f"solver.max_iter must be positive, got {s.max_iter}")
        if cfg.train.checkpoint_period < 0 or cfg.train.eval_period < 0:
            raise ValueError("train.checkpoint_period and train.eval_period must be >= 0")

        if self.device.type == "cpu" and cfg.train.keep_freed_memory:
            host_memory.keep_freed_memory()
        self.model = model.to(self.device)
        self.optimizer = build_optimizer(self.model, s)
        self.scheduler = LRSchedule.from_config(self.optimizer, s)
        self.amp = bool(s.amp) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        bf16 = cpu_bf16_autocast(s.cpu_autocast)   # validates the setting on every device
        self.amp_cpu = self.device.type == "cpu" and bf16
        self.iteration = 0
        self._resume_rng = None
        self._progress: Progress | None = None   # the progress bar of a running train()
        self.metrics: dict = {}
        self.last_losses: dict[str, float] = {}   # the latest iteration's losses (mean over ranks)
        self.last_grad_norm: float | None = None  # before clipping (only computed when clipping is on)
        if self.ctx.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temps(self.output_dir)
        if resume:
            self._load_state()
        if self.ctx.distributed:
            # channels_last 1x1-conv weights: autograd gives their grads NHWC strides, DDP's bucket views are
            # NCHW; same memory order for a 1x1 kernel, so the copy this warns about is harmless.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=ids, find_unused_parameters=find_unused_parameters)

    # ------------------------------------------------------------------------------------------ state
    def _load_state(self) -> None:
        path = self.output_dir / ckpt.STATE_FILE
        if not path.exists():
            self.log(f"resume: no {ckpt.STATE_FILE} in {self.output_dir}; starting from iteration 0")
            return
        state = ckpt.load_training_state(path)
        du.unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.amp and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        rngs = state.get("rng") or []
        if len(rngs) == self.ctx.world_size:
            self._resume_rng = rngs[self.ctx.rank]
        else:
            self.log(f"resume: the checkpoint was written by {len(rngs)} process(es), this run has "
                     f"{self.ctx.world_size}; random streams restart (results will differ from an uninterrupted run)")
        self.log(f"resumed from {path} at iteration {self.iteration}")

    def state_dict(self) -> dict:
        """The training state (rank 0's view; RNG states of all ranks are gathered by save_checkpoint)."""
        return {
            "version": 1,
            "model": ckpt.model_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.amp else {},
            "iteration": self.iteration,
            "max_iter": self.cfg.solver.max_iter,
            "world_size": self.ctx.world_size,
            "config": ckpt.plain(to_dict(self.cfg)),
        }

    def save_checkpoint(self, *, final: bool = False) -> None:
        """Weights (periodic or final safetensors) and last_checkpoint.pt. Call on every rank (gathers RNGs)."""
        rngs = du.all_gather_object(ckpt.rng_state())
        if self.ctx.is_main:
            state = self.state_dict()
            state["rng"] = rngs
            name = ckpt.FINAL_WEIGHTS if final else ckpt.periodic_weights_name(self.iteration)
            ckpt.save_weights(state["model"], self.output_dir / name, metadata={"iteration": self.iteration})
            # Written after the weights: a run killed between the two resumes from the previous state.
            ckpt.save_training_state(self.output_dir / ckpt.STATE_FILE, state)
        du.barrier()

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> dict:
        """Runs the remaining iterations, saves the final checkpoint, evaluates; returns the last metrics."""
        cfg, s = self.cfg, self.cfg.solver
        start = self.iteration
        data_iter = iter(self.loader_fn(start)) if start < self.max_iter else iter(())
        # RNG streams are (re)set after the loader exists: creating a DataLoader iterator draws from torch's
        # generator, so restoring before it would shift every later random draw of a resumed run.
        if self._resume_rng is not None:
            ckpt.set_rng_state(self._resume_rng)
        else:
            seed_everything(cfg.train.seed + 1000 * self.ctx.rank + start)
        progress = Progress(start, self.max_iter, log_period=cfg.train.log_period, enabled=self.ctx.is_main)
        self._progress = progress
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        window: list[torch.Tensor] = []
        names: list[str] | None = None
        self.model.train()
        try:
            while self.iteration < self.max_iter:   # a hook may change max_iter (set_max_iter)
                it = self.iteration
                lr = self.scheduler.set_iteration(it)
                try:
                    images, targets = next(data_iter)
                except StopIteration:
                    raise RuntimeError(f"the training loader ended at iteration {it}; it must be infinite") from None
                images, targets = _to_device(images, self.device), _to_device(targets, self.device)
                try:
                    with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp), \
                            torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.amp_cpu):
                        loss_dict = self.model(images, targets)
                    loss_dict = {k: v.float() for k, v in loss_dict.items()}
                except (ValueError, RuntimeError) as e:
                    self._raise_if_diverged(it, e)
                    raise
                if names is None:
                    names = list(loss_dict)
                loss = sum(loss_dict.values())
                # Reduced every iteration (one small all-reduce): all ranks then agree on stopping for a
                # non-finite loss instead of one rank raising while the others wait in backward().
                vals = du.all_reduce_mean(torch.stack([loss_dict[k].detach().float() for k in names]))
                current = dict(zip(names, vals.tolist()))
                if not all(math.isfinite(v) for v in current.values()):
                    raise FloatingPointError(f"loss is not finite at iteration {it}: {current} "
                                             f"(try a lower solver.base_lr)")
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if s.clip_grad_norm > 0:
                    self.scaler.unscale_(self.optimizer)
                    self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, s.clip_grad_norm))
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.iteration = done = it + 1
                self.last_losses = current
                window.append(vals)
                if done % progress.log_period == 0 or done == self.max_iter or done == start + 1:
                    means = torch.stack(window).mean(0).tolist()
                    window.clear()
                    progress.update(done, dict(zip(names, means)), lr, grad_norm=self.last_grad_norm)
                else:
                    progress.update(done, None, lr)
                if cfg.train.checkpoint_period and done % cfg.train.checkpoint_period == 0 and done < self.max_iter:
                    self.save_checkpoint()
                if cfg.train.eval_period and done % cfg.train.eval_period == 0 and done < self.max_iter:
                    self._evaluate(final=False)
                for hook in self.hooks:
                    hook(self, done)
            du.broadcast_buffers(self.model)
            if start < self.max_iter or not (self.output_dir / ckpt.FINAL_WEIGHTS).exists():
                self.save_checkpoint(final=True)
        finally:
            progress.close()
        self._evaluate(final=True)
        return self.metrics

    @property
    def max_iter(self) -> int:
        return self.cfg.solver.max_iter

    def set_max_iter(self, max_iter: int, *, steps: Sequence[int] | None = None) -> None:
        """Changes the run's length (and optionally the step schedule's steps) mid-training, e.g. from a
        hook that fits a time budget.

        The schedule follows (lr_factor is a function of (it, max_iter, steps)): changed during warm-up, the
        run is the same as one started with these values up to the warm-up's tiny cosine term. Call it on
        every rank with the same values.
        """
        max_iter = int(max_iter)
        if max_iter < self.iteration or max_iter <= 0:
            raise ValueError(f"max_iter must be >= the current iteration ({self.iteration}) and positive, "
                             f"got {max_iter}")
        over = {"max_iter": max_iter}
        if steps is not None:
            over["steps"] = [int(x) for x in steps]
            self.scheduler.kw["steps"] = tuple(over["steps"])
        self.cfg = merge(self.cfg, {"solver": over})
        self.scheduler.kw["max_iter"] = max_iter
        if self.ctx.is_main and (self.output_dir / ckpt.CONFIG_FILE).exists():
            ckpt.save_config(self.output_dir, to_dict(self.cfg))
        if self._progress is not None:
            self._progress.set_total(max_iter)

    def _raise_if_diverged(self, it: int, error: BaseException) -> None:
        """Turns a forward failure caused by non-finite weights (an op rejecting NaN input) into a clear error."""
        bad = [n for n, p in du.unwrap(self.model).named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise FloatingPointError(
                f"training diverged: {len(bad)} parameter tensor(s) are not finite at iteration {it} (e.g. {bad[0]}); "
                f"try a lower solver.base_lr or solver.clip_grad_norm > 0") from error

    def _evaluate(self, *, final: bool) -> None:
        """Runs evaluate_fn without disturbing the training's random streams (a resumed run skips it)."""
        if self.evaluate_fn is None:
            return
        rng = ckpt.rng_state()
        du.broadcast_buffers(self.model)   # every rank evaluates the same model
        try:
            metrics = self.evaluate_fn(du.unwrap(self.model))
        finally:
            ckpt.set_rng_state(rng)
            self.model.train()
        self.metrics = metrics
        if self.ctx.is_main:
            ckpt.atomic_write_text(self.output_dir / "metrics.json",
                                   json.dumps({"iteration": self.iteration, **metrics}, indent=2, default=float) + "\n")
            if not final:   # the final table is the caller's to print
                from ..evaluation import format_table

                self._progress.write(format_table(metrics))
                self._progress.write(f"iteration {self.iteration}: {summary_line(metrics)}")


def adapt_config_to_dataset(cfg: Config, dataset, log: Callable[[str], None] = default_log) -> Config:
    """cfg with roi_heads.num_classes and the keypoint head fitted to a training set's categories/keypoints, and
    the set's categories recorded in data.class_names / data.category_ids (label order): evaluation maps the
    model's labels to another JSON's categories by these names."""
    over: dict = {}
    names = [str(n) for n in getattr(dataset, "class_names", None) or ()]
    ids = [int(c) for c in getattr(dataset, "cat_ids", None) or ()]
    if names and len(names) == dataset.num_classes:
        over["data"] = {"class_names": names, "category_ids": ids if len(ids) == len(names) else []}
    if cfg.model.roi_heads.num_classes != dataset.num_classes:
        log(f"roi_heads.num_classes: {cfg.model.roi_heads.num_classes} -> {dataset.num_classes} "
            f"(from the training set)")
        over.setdefault("model", {})["roi_heads"] = {"num_classes": dataset.num_classes}
    kp = cfg.model.keypoint
    k = int(getattr(dataset, "num_keypoints", 0) or 0)
    if kp.enabled and k == 0:
        log("keypoint head disabled: the training set has no keypoints")
        over.setdefault("model", {})["keypoint"] = {"enabled": False}
    elif kp.enabled:
        kp_over = {}
        pairs = tuple(tuple(int(i) for i in p) for p in kp.flip_pairs)
        kp_names = [str(n) for n in getattr(dataset, "keypoint_names", None) or ()]
        named = flip_pairs_from_names(kp_names) if len(kp_names) == k else None
        if named:
            # the set's names say which keypoints are mirror images (detectron2 takes its flip map by name too):
            # they win over index pairs meant for other keypoints (COCO persons, the shapes preset's vertices)
            if named != pairs:
                log(f"keypoint.flip_pairs: {list(pairs)} -> {list(named)} (left/right pairs of the training "
                    f"set's keypoint names)")
                kp_over["flip_pairs"] = pairs = named
        elif pairs == COCO_PERSON_FLIP_PAIRS and named == () and k == 17:
            log("note: the training set's 17 keypoint names have no left/right pairs; keeping the COCO person "
                "flip pairs (set model.keypoint.flip_pairs if these are not COCO's keypoints)")
        elif pairs == COCO_PERSON_FLIP_PAIRS and named == ():
            # COCO's index pairs would fit any set of 17+ keypoints and silently swap unrelated ones
            log(f"keypoint.flip_pairs: {list(pairs)} -> [] (the training set's {k} keypoint names have no "
                f"left/right pairs; set model.keypoint.flip_pairs to swap some)")
            kp_over["flip_pairs"] = pairs = ()
        if k != kp.num_keypoints:
            bad = [p for p in pairs if max(p) >= k]
            if bad:
                raise ValueError(f"model.keypoint.flip_pairs {bad} do not fit the training set's {k} keypoints; "
                                 f"set model.keypoint.flip_pairs (0-based index pairs)")
            log(f"keypoint.num_keypoints: {kp.num_keypoints} -> {k} (from the training set)")
            kp_over["num_keypoints"] = k
        if kp_over:
            over.setdefault("model", {})["keypoint"] = kp_over
    return merge(cfg, over) if over else cfg


def _dataset(json_path, image_dir, cfg: Config, *, train: bool):
    from ..data import CocoDetection

    for p, what in ((json_path, "annotation file"), (image_dir, "image directory")):
        if p is None or not Path(p).exists():
            raise FileNotFoundError(f"{what} not found: {p}")
    # Keypoint head on: use the set's keypoints if it has any (adapt_config_to_dataset turns the head off
    # otherwise); head off: ignore them.
    kw = dict(use_keypoints=None if cfg.model.keypoint.enabled else False)
    if train:   # the flip pairs are set once the config is fitted to the set's keypoints (train() below)
        kw.update(flip_prob=cfg.input.hflip_prob, flip_pairs=())
    return CocoDetection(str(json_path), str(image_dir), train=train, **kw)


def train(cfg: Config, *, train_json, train_images, output_dir, val_json=None, val_images=None, resume: bool = False,
          max_iter: int | None = None, hooks: Sequence[Hook] = (), log: Callable[[str], None] = default_log) -> dict:
    """Trains a Mask R-CNN on a COCO-format set; evaluates on the val set (if given) periodically and at the end.

    Run it under torchrun for multi-process training. Returns the final val metrics ({} without a val set).
    """
    from ..data import build_loader
    from ..modeling import build_model, inference_model

    if max_iter is not None:
        cfg = merge(cfg, {"solver": {"max_iter": int(max_iter)}})
    ctx = du.init_distributed(cfg.train.device)
    if cfg.solver.ims_per_batch % ctx.world_size:
        raise ValueError(f"solver.ims_per_batch ({cfg.solver.ims_per_batch}) must be divisible by the number of "
                         f"processes ({ctx.world_size})")
    train_set = _dataset(train_json, train_images, cfg, train=True)
    cfg = adapt_config_to_dataset(cfg, train_set, log)
    if train_set.use_keypoints:
        train_set.set_flip_pairs(cfg.model.keypoint.flip_pairs)
    if (val_json is None) != (val_images is None):
        raise ValueError("give both val_json and val_images, or neither")
    val_set = _dataset(val_json, val_images, cfg, train=False) if val_json is not None else None
    if val_set is not None:   # a bad val set fails here, not at the first evaluation
        val_iou_types, val_factory = prepare_evaluation(cfg, val_set, source=f"the val set {val_json}",
                                                        model="the training set", log=log)

    output_dir = Path(output_dir)
    if resume and (output_dir / ckpt.CONFIG_FILE).exists():
        _warn_config_change(output_dir / ckpt.CONFIG_FILE, cfg, log)
    if ctx.is_main:
        ckpt.save_config(output_dir, to_dict(cfg))

    seed_everything(cfg.train.seed)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)
    model = build_model(cfg)
    per_rank = cfg.solver.ims_per_batch // ctx.world_size

    def loader_fn(start_iter: int):
        return build_loader(train_set, per_rank, train=True, num_workers=cfg.train.num_workers, seed=cfg.train.seed,
                            distributed=ctx.distributed, rank=ctx.rank, world_size=ctx.world_size,
                            start_iter=start_iter, pin_memory=ctx.device.type == "cuda")

    evaluate_fn = None
    if val_set is not None:
        def evaluate_fn(m):
            return evaluate(inference_model(m, cfg), val_set, distributed=ctx.distributed, iou_types=val_iou_types,
                            evaluator_factory=val_factory, num_workers=min(cfg.train.num_workers, 2), log=log)

    log(f"training on {len(train_set)} images, {ctx.world_size} process(es) on {ctx.device}, "
        f"{cfg.solver.ims_per_batch} images/iteration, {cfg.solver.max_iter} iterations -> {output_dir}")
    trainer = Trainer(cfg, model, loader_fn, output_dir=output_dir, evaluate_fn=evaluate_fn, resume=resume,
                      hooks=hooks, log=log)
    return trainer.train()


def _warn_config_change(path: Path, cfg: Config, log) -> None:
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    new = ckpt.plain(to_dict(cfg))
    diff = sorted(_diff_keys(old, new))
    diff = [d for d in diff if d != "solver.max_iter"]
    if diff:
        log(f"resume: config differs from the stored {path.name} in {', '.join(diff[:10])}")


def _diff_keys(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            yield from _diff_keys(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
    elif a != b:
        yield prefix
