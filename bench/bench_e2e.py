"""End-to-end inference, one real photo, batch 1: torchvision's maskrcnn_resnet50_fpn against our model loaded
with the same (seeded random) weights and torchvision's conventions (tests/_tv_reference.torchvision_config),
run as optimize_for_inference + model.preprocess + model.inference(stages=...).

    cd bench && MRCNN_BENCH_NO_SAVE=1 PYTHONPATH=../python python -m pytest -q -s bench_e2e.py  # MRCNN_E2E_STAGES=torch
    cd bench && PYTHONPATH=../python python bench_e2e.py [--repeat 5] [--stages graph|torch] [--split] [--fps]

Script mode measures ours and torchvision interleaved in one process (ratios of medians), checks that fp32 gives
the same detections, prints the time split of each, and with --fps the frames per second and peak RSS of each
(model, precision, compile) configuration, each in its own subprocess. A random-init classifier scores every box
alike, so both models' cls_score / bbox_pred are redrawn with a larger spread (same values in both): detections
are then many and well separated, as with trained weights.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from _tv_reference import build_torchvision_model, torchvision_config  # noqa: E402
from bench_train_step import Timers  # noqa: E402
from mrcnn_fast.convert import copy_weights_from_torchvision  # noqa: E402
from mrcnn_fast.modeling import build_model  # noqa: E402
from mrcnn_fast.modeling.fuse import optimize_for_inference  # noqa: E402

PHOTO = Path(os.environ.get("MRCNN_E2E_PHOTO", REPO.parent / "shared/data/coco_samples/images/000000128372.jpg"))
THREADS = int(os.environ.get("MRCNN_E2E_THREADS", "2"))
PAPER_FPS = 5.0                   # He et al.: R101-FPN Mask R-CNN at 195 ms per image on an M40 GPU


def cpu_description() -> str:
    """CPU model name and its bfloat16 / AMX / VNNI flags (lscpu's, /proc/cpuinfo as a fallback)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    has = [f for f in ("avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni") if f in flags]
    return f"{name} ({', '.join(has) or 'no bf16/AMX/VNNI flags'}; {'AMX' if 'amx_bf16' in flags else 'no AMX'})"


def load_photo(path: Path = PHOTO) -> torch.Tensor:
    """Tensor[3, H, W] float RGB in [0, 1]; the models resize it (shortest side 800, longest at most 1333)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


# ---- models ---------------------------------------------------------------------------------------


def build_torchvision(arch: str = "resnet50", seed: int = 0, photo: torch.Tensor | None = None):
    """torchvision's Mask R-CNN, seeded random init (no downloads): maskrcnn_resnet50_fpn for R50, the same
    construction on a ResNet-101 trunk (tests/_tv_reference) for R101; classifier redrawn on `photo` (see
    redraw_classifier)."""
    torch.manual_seed(seed)
    if arch == "resnet50":
        from torchvision.models.detection import maskrcnn_resnet50_fpn

        tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    elif arch == "resnet101":
        tv = build_torchvision_model(torchvision_config("r101_fpn"))
        # at random init the 23 blocks of R101's layer3 grow the activations to ~1e5 and the RPN finds nothing:
        # the last norm of every residual branch damped (features of std ~0.2 at every level)
        with torch.no_grad():
            for name, m in tv.backbone.body.named_modules():
                if name.endswith("bn3"):
                    m.weight.mul_(0.25)
    else:
        raise ValueError(f"arch must be resnet50 or resnet101, got {arch!r}")
    redraw_classifier(tv.eval(), load_photo() if photo is None else photo, seed)
    return tv


@torch.no_grad()
def with_frozen_batchnorm(tv):
    """A copy of tv whose trunk norms are torchvision's FrozenBatchNorm2d with the same statistics: the model
    `maskrcnn_resnet50_fpn(weights=...)` builds when it loads COCO weights (random init builds BatchNorm2d, one
    native op in eval mode; FrozenBatchNorm2d is a mul and an add). Same arithmetic, so the same detections."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    tv = copy.deepcopy(tv)
    for parent in list(tv.backbone.body.modules()):
        for name, m in list(parent.named_children()):
            if type(m) is nn.BatchNorm2d:
                f = FrozenBatchNorm2d(m.num_features, eps=m.eps)
                for k in ("weight", "bias", "running_mean", "running_var"):
                    getattr(f, k).copy_(getattr(m, k))
                setattr(parent, name, f)
    return tv.eval()


@torch.no_grad()
def redraw_classifier(tv, photo: torch.Tensor, seed: int = 0, logit_std: float = 3.0, delta_std: float = 1.0):
    """cls_score / bbox_pred redrawn so that the photo's detections are many, of many classes, with distinct
    scores. At random init every RoI's box-head features are nearly the same vector plus a small part of their
    own, so a plain random classifier gives one class to every box with scores that tie to float rounding.
    Here the weights are scaled to the spread of the RoI features (logits of std logit_std, box deltas of std
    delta_std before the box coder's weights) and the biases remove the common part."""
    feats = []
    hook = tv.roi_heads.box_head.register_forward_hook(lambda m, a, out: feats.append(out))
    try:
        with torch.inference_mode():
            tv([photo])
    finally:
        hook.remove()
    f = feats[0].clone()
    mean, spread = f.mean(0), (f - f.mean(0)).square().sum(1).mean().sqrt()
    g = torch.Generator().manual_seed(seed + 1)
    pred = tv.roi_heads.box_predictor
    for fc, std in ((pred.cls_score, logit_std), (pred.bbox_pred, delta_std)):
        fc.weight.copy_(torch.randn(fc.weight.shape, generator=g) * (std / spread))
        fc.bias.copy_(-fc.weight @ mean)


def build_ours(tv, arch: str = "resnet50"):
    """Our model of the same architecture with tv's weights and torchvision's conventions, eval mode."""
    cfg = torchvision_config("r50_fpn" if arch == "resnet50" else "r101_fpn")
    ours = build_model(cfg)
    copy_weights_from_torchvision(tv, ours)
    return ours.eval()


def available_stages(wanted: str = "graph") -> str:
    """wanted ("graph" or "torch"), or "torch" where this build has no mrcnn_fast.graph."""
    if wanted == "graph":
        try:
            import mrcnn_fast.graph  # noqa: F401
        except ImportError:
            return "torch"
    return wanted


def graph_stages(model):
    """The C++ inference graph of the model (mrcnn_fast.graph), or None where this build has none."""
    try:
        from mrcnn_fast.graph import InferenceGraph
    except ImportError:
        return None
    return InferenceGraph.from_model(model)


class OursRunner:
    """optimize_for_inference(model, ...) then preprocess + inference(stages=...) per call."""

    def __init__(self, model, *, precision="fp32", channels_last=True, compile=False, stages="torch",
                 autocast=False, mask_format="prob"):
        self.model = optimize_for_inference(model, precision="fp32" if autocast else precision,
                                            channels_last=channels_last, compile=compile)
        self.autocast = autocast and precision == "bf16"
        self.stages = graph_stages(self.model) if stages == "graph" else None
        if stages == "graph" and self.stages is None:
            raise RuntimeError("--stages graph: mrcnn_fast.graph is not in this build")
        self.mask_format = mask_format

    def __call__(self, images):
        m = self.model
        ctx = torch.autocast("cpu", torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            batch, image_sizes, _, input_sizes = m.preprocess(images)
            return m.inference(m.to_model_layout(batch), image_sizes, input_sizes, mask_format=self.mask_format,
                               stages=self.stages)


class TorchvisionRunner:
    def __init__(self, tv):
        self.model = tv

    def __call__(self, images):
        with torch.inference_mode():
            return self.model(images)


# ---- same detections --------------------------------------------------------------------------------


def compare_detections(ours: dict, tv: dict) -> dict:
    """Largest differences between two results of one image (labels must match in order)."""
    n_o, n_t = ours["labels"].shape[0], tv["labels"].shape[0]
    out = {"count_ours": n_o, "count_tv": n_t, "same_labels": n_o == n_t and torch.equal(ours["labels"], tv["labels"])}
    if not out["same_labels"]:
        return out
    out["box_max_diff"] = float((ours["boxes"] - tv["boxes"]).abs().max()) if n_o else 0.0
    out["score_max_diff"] = float((ours["scores"] - tv["scores"]).abs().max()) if n_o else 0.0
    ious = []
    for a, b in zip(ours["masks"], tv["masks"]):
        a, b = a[0] > 0.5, b[0] > 0.5
        union = float((a | b).sum())
        ious.append(float((a & b).sum()) / union if union else 1.0)
    out["mask_iou_min"] = min(ious) if ious else 1.0
    return out


def agreement(ours: dict, ref: dict, iou_min: float = 0.9) -> float:
    """Fraction of ref's detections that ours has too: same label, box IoU >= iou_min (for reduced precision,
    where scores and the order move a little)."""
    from torchvision.ops import box_iou

    if ref["labels"].shape[0] == 0:
        return 1.0
    if ours["labels"].shape[0] == 0:
        return 0.0
    iou = box_iou(ref["boxes"], ours["boxes"]) * (ref["labels"][:, None] == ours["labels"][None])
    return float((iou.amax(1) >= iou_min).float().mean())


def same_detections(cmp: dict, box_tol=0.05, score_tol=1e-3, iou_min=0.99) -> bool:
    return (cmp["same_labels"] and cmp["box_max_diff"] <= box_tol and cmp["score_max_diff"] <= score_tol
            and cmp["mask_iou_min"] >= iou_min)


# ---- timing -----------------------------------------------------------------------------------------


def time_interleaved(runners: dict, images, repeat: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each runner, the runners taking turns so that they share the machine's noise."""
    for r in runners.values():
        for _ in range(warmup):
            r(images)
    times = defaultdict(list)
    for _ in range(repeat):
        for name, r in runners.items():
            t0 = time.perf_counter()
            r(images)
            times[name].append(time.perf_counter() - t0)
    return times


SPLIT_ROWS = ("preprocess", "backbone", "rpn head", "box head", "mask head", "post-processing", "total")


def split_ours(runner: OursRunner, images) -> dict[str, float]:
    """Time per part of one call, measured around methods the networks' compiled code does not contain (a wrapped
    forward of a compiled module would recompile it): preprocess, rpn.predict (RPN head + anchors), the box head
    and mask head calls, the three stages (post-processing); the backbone is the rest of the total."""
    m, clock = runner.model, Timers("cpu")
    rh, st = m.roi_heads, runner.stages or m
    undo = [clock.wrap(m, "preprocess", "preprocess"), clock.wrap(m.rpn, "predict", "rpn head"),
            clock.wrap(rh, "box_head_outputs", "box head"), clock.wrap(rh, "mask_logits", "mask head")]
    undo += [clock.wrap(st, name, "post-processing") for name in ("proposal_stage", "detection_stage", "result_stage")]
    try:
        with clock("total"):
            runner(images)
    finally:
        for u in reversed(undo):
            u()
    t = dict(clock.t)
    t["backbone"] = t["total"] - sum(t.get(k, 0.0) for k in SPLIT_ROWS if k not in ("backbone", "total"))
    return t


def split_torchvision(tv, images) -> dict[str, float]:
    clock = Timers("cpu")
    r = tv.roi_heads
    undo = [clock.wrap(tv.transform, "resize", "preprocess"), clock.wrap(tv.transform, "normalize", "preprocess"),
            clock.wrap(tv.transform, "batch_images", "preprocess"), clock.wrap(tv.backbone, "forward", "backbone"),
            clock.wrap(tv.rpn.head, "forward", "rpn head"), clock.wrap(r.box_head, "forward", "box head"),
            clock.wrap(r.box_predictor, "forward", "box head"), clock.wrap(r.mask_head, "forward", "mask head"),
            clock.wrap(r.mask_predictor, "forward", "mask head")]
    try:
        with clock("total"), torch.inference_mode():
            tv(images)
    finally:
        for u in reversed(undo):
            u()
    t = dict(clock.t)
    t["post-processing"] = t["total"] - sum(t.get(k, 0.0) for k in SPLIT_ROWS if k not in ("post-processing", "total"))
    return t


def median_split(fn, images, repeat: int) -> dict[str, float]:
    runs = [fn(images) for _ in range(repeat)]
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in SPLIT_ROWS}


# ---- one configuration in its own process (its own peak RSS) ---------------------------------------------


def run_one(spec: dict) -> dict:
    """spec: impl (ours | torchvision), arch, precision, compile, channels_last, stages, repeat. Times `repeat`
    calls after a warm-up (which includes the compile) and reports the process's peak RSS."""
    torch.set_num_threads(THREADS)
    images = [load_photo()]
    tv = build_torchvision(spec["arch"], photo=images[0])
    if spec["impl"] == "torchvision":
        runner = TorchvisionRunner(tv)
    else:
        ours = build_ours(tv, spec["arch"])
        del tv
        runner = OursRunner(ours, precision=spec["precision"], channels_last=spec.get("channels_last", True),
                            compile=spec.get("compile", False), stages=spec.get("stages", "torch"),
                            autocast=spec.get("autocast", False))
    setup_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gc.collect()
    reset = _reset_peak_rss()
    t0 = time.perf_counter()
    runner(images)
    first = time.perf_counter() - t0
    times = time_interleaved({"x": runner}, images, spec.get("repeat", 3), warmup=0)["x"]
    return {**spec, "first_call_s": first, "median_s": statistics.median(times), "times": times,
            "setup_peak_rss_mb": setup_peak,
            "peak_rss_mb": _peak_rss_mb() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark of this process (Linux: 5 > /proc/self/clear_refs), so that the peak
    of inference is not the peak of building two models and copying weights between them."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_in_subprocess(spec: dict, timeout: float = 3600) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "python"), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                         env=env, timeout=timeout)
    if out.returncode != 0:
        return {**spec, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- pytest-benchmark -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(THREADS)
    images = [load_photo()]
    tv = build_torchvision("resnet50", photo=images[0])
    ours = build_ours(tv)
    stages = available_stages(os.environ.get("MRCNN_E2E_STAGES", "graph"))
    fp32 = OursRunner(copy.deepcopy(ours), stages=stages)
    bf16 = None
    from mrcnn_fast.engine.trainer import cpu_has_native_bf16
    if cpu_has_native_bf16():
        bf16 = OursRunner(copy.deepcopy(ours), precision="bf16", stages=stages)
    return {"tv": TorchvisionRunner(tv), "fp32": fp32, "bf16": bf16, "images": images}


def _bench(benchmark, fn, images):
    benchmark.pedantic(fn, args=(images,), rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["mrcnn_fast", "torchvision"])
def test_e2e_r50_fpn_fp32(benchmark, setup, impl):
    benchmark.group = "e2e R50-FPN 800x1199 batch 1: fp32"
    _bench(benchmark, setup["fp32"] if impl == "mrcnn_fast" else setup["tv"], setup["images"])


@pytest.mark.parametrize("impl", ["mrcnn_fast", "torchvision"])
def test_e2e_r50_fpn_bf16_vs_torchvision_fp32(benchmark, setup, impl):
    if setup["bf16"] is None:
        pytest.skip("the CPU has no native bfloat16")
    benchmark.group = "e2e R50-FPN 800x1199 batch 1: ours bf16 vs torchvision fp32"
    _bench(benchmark, setup["bf16"] if impl == "mrcnn_fast" else setup["tv"], setup["images"])


def test_e2e_fp32_same_detections(setup):
    a = setup["fp32"](setup["images"])[0]
    b = setup["tv"](setup["images"])[0]
    cmp = compare_detections(a, b)
    assert cmp["count_tv"] >= 10, cmp
    assert same_detections(cmp), cmp


# ---- script mode ------------------------------------------------------------------------------------------


def _ms(x: float) -> str:
    return f"{x * 1e3:.0f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--stages", choices=("graph", "torch"), default="graph",
                   help="what runs the stages between the networks (graph: the C++ inference graph where built)")
    p.add_argument("--precisions", default="fp32,bf16",
                   help="comma-separated: fp32, bf16, bf16-autocast, each optionally :default or "
                        ":max-autotune-no-cudagraphs (compiled), e.g. fp32,bf16,fp32:default,bf16:default")
    p.add_argument("--compile", choices=("off", "default", "max-autotune-no-cudagraphs"), default="off",
                   help="compile mode of the --precisions entries without their own")
    p.add_argument("--split", action="store_true", help="time split per part, ours vs torchvision")
    p.add_argument("--tv-frozen-bn", action="store_true", help="also time torchvision with the FrozenBatchNorm2d "
                   "trunk it builds when loading its COCO weights")
    p.add_argument("--fps", action="store_true", help="fps and peak RSS per configuration, one subprocess each")
    p.add_argument("--fps-only", action="store_true", help="only the --fps table")
    p.add_argument("--fps-configs", default="", help="JSON list of specs for --fps (default: the standard set)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return 0
    torch.set_num_threads(THREADS)
    stages = available_stages(args.stages)
    if stages != args.stages:
        print("mrcnn_fast.graph is not in this build: the torch stages run between the networks")
    compile_ = False if args.compile == "off" else args.compile
    images = [load_photo()]
    h, w = images[0].shape[-2:]
    print(f"# e2e: {PHOTO.name} {w}x{h} -> 800-scale, batch 1, {torch.get_num_threads()} threads, "
          f"{cpu_description()}, torch {torch.__version__}, stages {stages}, compile {args.compile}, "
          f"load average {os.getloadavg()[0]:.2f}")
    if not args.fps_only:
        interleaved(args, images, stages, compile_)
    if args.fps:
        fps_table(args, stages)
    return 0


def interleaved(args, images, stages: str, compile_) -> None:
    """ours (each precision) and torchvision in turns in this process: ratios, same detections, the split."""
    tv = build_torchvision("resnet50", photo=images[0])
    runners = {"torchvision fp32": TorchvisionRunner(tv)}
    if args.tv_frozen_bn:
        runners["torchvision fp32, FrozenBN trunk"] = TorchvisionRunner(with_frozen_batchnorm(tv))
    base = build_ours(tv)
    for item in args.precisions.split(","):
        prec, _, mode = item.partition(":")
        t0 = time.perf_counter()
        autocast = prec == "bf16-autocast"    # float32 weights under torch.autocast instead of bf16 weights
        name = f"ours {item}" + (f" compile {args.compile}" if compile_ and not mode else "")
        runners[name] = OursRunner(copy.deepcopy(base), precision="bf16" if autocast else prec,
                                   compile=mode or compile_, stages=stages, autocast=autocast)
        with torch.inference_mode():
            runners[name](images)
        print(f"{name}: setup + first call {time.perf_counter() - t0:.1f} s")
    ref = runners["torchvision fp32"](images)[0]
    for name, r in runners.items():
        if name != "torchvision fp32":
            cmp = compare_detections(r(images)[0], ref)
            verdict = "same detections" if cmp["same_labels"] and same_detections(cmp) else "differs"
            print(f"{name} vs torchvision fp32: {verdict}: {cmp}; {agreement(r(images)[0], ref):.0%} of "
                  f"torchvision's detections found (same label, IoU >= 0.9)")
    times = time_interleaved(runners, images, args.repeat)
    tv_med = statistics.median(times["torchvision fp32"])
    print("\n| model | median s/image | images/s | torchvision fp32 / this | runs |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {1 / med:.2f} | {tv_med / med:.2f}x | {len(ts)} |")
    if args.split:
        splits = {"torchvision fp32": median_split(lambda ims: split_torchvision(tv, ims), images, args.repeat)}
        for name, r in runners.items():
            if name.startswith("ours"):
                splits[name] = median_split(lambda ims, r=r: split_ours(r, ims), images, args.repeat)
        names = list(splits)
        print(f"\n| part (ms, median of {args.repeat}) | " + " | ".join(names) + " |")
        print("| --- |" + " ---: |" * len(names))
        for row in SPLIT_ROWS:
            print(f"| {row} | " + " | ".join(_ms(splits[n][row]) for n in names) + " |")


def fps_table(args, stages: str) -> None:
    """fps and peak RSS of each configuration, each in its own subprocess."""
    specs = json.loads(args.fps_configs) if args.fps_configs else [
        {"impl": impl, "arch": arch, "precision": prec, "compile": c}
        for arch in ("resnet50", "resnet101")
        for impl, prec, c in (("torchvision", "fp32", False), ("ours", "fp32", False), ("ours", "bf16", False),
                              ("ours", "fp32", "default"), ("ours", "bf16", "default"))]
    print("\n| model | impl | precision | compile | s/image | fps | paper fps | first call s | peak RSS MB "
          "(inference) | peak RSS MB (setup: both models built) |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for spec in specs:
        spec = {"repeat": max(2, args.repeat // 2), "stages": stages, **spec}
        r = run_in_subprocess(spec)
        if "error" in r:
            print(f"| {spec['arch']} | {spec['impl']} | {spec['precision']} | {spec.get('compile')} | "
                  f"error: {r['error']} |")
            continue
        print(f"| {r['arch']} | {r['impl']} | {r['precision']} | {r.get('compile') or 'off'} | {r['median_s']:.3f} "
              f"| {1 / r['median_s']:.2f} | {PAPER_FPS:.0f} | {r['first_call_s']:.1f} | {r['peak_rss_mb']:.0f} "
              f"| {r['setup_peak_rss_mb']:.0f} |",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
