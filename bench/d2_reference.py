"""Reference checkpoints and outputs of the real detectron2, for the output parity of mrcnn_fast's detectron2 importer.

detectron2 is not a dependency of mrcnn_fast and is not installable from the package index with its C++ extension;
its Python model code runs without that extension (only the deformable / rotated ops need it), on CPU. This script
is run by hand, never in CI; bench/d2_parity.py then compares mrcnn_fast against the files it writes.

Set-up (any detectron2 checkout works; its compiled ``detectron2._C`` is not needed, an empty module stands in):

    git -C <detectron2 bare repo> worktree add /work/d2src HEAD        # or: git clone .../detectron2 /work/d2src
    python -m pip install --no-deps --target /work/d2deps fvcore iopath omegaconf \\
        antlr4-python3-runtime==4.9.3 cloudpickle tabulate termcolor yacs portalocker
    # numpy, pillow, pyyaml, tqdm, pycocotools and torch / torchvision come from the project's environment

Run (one config at a time keeps the run short on a small CPU; ~1 min per R-50 config on 2 cores):

    python bench/d2_reference.py --d2-src /work/d2src --d2-deps /work/d2deps --out /work/d2ref
    python bench/d2_reference.py --configs mask_rcnn_R_50_C4_3x ...

For each config this writes under ``OUT/<config>/``:

    model.pth      what detectron2's DetectionCheckpointer writes: torch.save({"model": state_dict, ...})
    model.pkl      a model-zoo pickle: {"model": {name: numpy array}, "__author__": ...}, protocol 2
    config.yaml    the full detectron2 config the outputs were made with (cfg.dump())
    outputs.pt     detectron2's detections (see ``run_config``): DefaultPredictor per photo, one batched call;
                   with each photo's network input as detectron2 resized it (uint8 CHW, BGR)

The model is detectron2's own, built from its config with MODEL.WEIGHTS "" and seeded random weights, then made
informative: the frozen BatchNorm statistics are calibrated on a photo (plain random init leaves them the identity
and the activations blow up), the norms' affine terms and the heads' last layers are re-drawn with a scale set from
their measured inputs, so that detections are many (tens), of several classes, well separated in score, with
class-specific boxes, masks far from the 0.5 threshold and peaked keypoint heatmaps. Everything detectron2 computes
afterwards (preprocessing, inference, post-processing) is its own code, unchanged.
"""
import argparse
import os
import pickle
import platform
import subprocess
import sys
import time
import types

import numpy as np
import torch

# config name -> its yaml under detectron2's configs/
CONFIGS = {
    "mask_rcnn_R_50_FPN_3x": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
    "mask_rcnn_R_50_C4_3x": "COCO-InstanceSegmentation/mask_rcnn_R_50_C4_3x.yaml",
    "keypoint_rcnn_R_50_FPN_3x": "COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x.yaml",
    "faster_rcnn_R_50_FPN_3x": "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml",
    "mask_rcnn_R_50_FPN_3x_gn": "Misc/mask_rcnn_R_50_FPN_3x_gn.yaml",
    "mask_rcnn_X_101_32x8d_FPN_3x": "COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml",
}
DEFAULT_CONFIGS = [k for k in CONFIGS if not k.startswith("mask_rcnn_X_101")]

# Target standard deviations of the re-drawn layers' outputs (the weights' std is set from the measured input norm)
TARGET_STD = {
    "rpn_objectness": 2.0,      # logits: proposals ranked far apart, not by float noise
    "rpn_deltas": 0.1,
    "cls_score": 2.0,           # class logits: a few classes ahead in each RoI, scores spread over (0.05, 1)
    "bbox_pred": 1.0,           # deltas before the (10, 10, 5, 5) weights: class-specific boxes differ by ~10 %
    "mask_pred": 6.0,           # mask logits: few pixels near the 0.5 threshold
    "keypoint_pred": 6.0,       # heatmap logits: a clear peak per keypoint
}
# Background logit offset per config: how many RoIs stay background, hence the number of detections (tens)
BG_BIAS = {}
BG_BIAS_DEFAULT = 6.0
NUM_CALIBRATION_PHOTOS = 3


def import_detectron2(d2_src, d2_deps):
    """Puts detectron2's checkout and its pure-Python dependencies on the path; the compiled extension is optional."""
    for p in (d2_deps, d2_src):
        if p and p not in sys.path:
            sys.path.insert(0, p)
    try:
        import detectron2._C  # noqa: F401
    except ImportError:
        # only the deformable / rotated ops use it; the modules import it at load time
        sys.modules["detectron2._C"] = types.ModuleType("detectron2._C")
    import detectron2
    return detectron2


def build_cfg(d2, name, d2_src):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(d2_src, "configs", CONFIGS[name]))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


def _normal_(t, std, gen):
    with torch.no_grad():
        t.copy_(torch.randn(t.shape, generator=gen) * std)


def _uniform_(t, lo, hi, gen):
    with torch.no_grad():
        t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=gen))


def _rms_norm(x, dim):
    """Root mean square over samples of the input vector's norm along `dim` (channels / features)."""
    return float(x.float().pow(2).sum(dim).mean().sqrt())


def redraw(model, cfg, name, images_bgr, gen):
    """Makes the randomly initialised model informative (see the module docstring). Runs detectron2's inference
    once on the batch `images_bgr` (HWC uint8 arrays) to calibrate the norms and measure the heads' inputs."""
    from detectron2.layers import FrozenBatchNorm2d

    inputs = [_predictor_input(cfg, im) for im in images_bgr]

    # 1. FrozenBN statistics from the activations they see over all photos (one pass, in network order, so each
    #    norm sees its inputs already calibrated), random affine terms
    done = set()

    def calibrate(module, args):
        if module in done:
            return
        done.add(module)
        x = args[0].detach()
        mean = x.mean((0, 2, 3))
        var = x.var((0, 2, 3))
        with torch.no_grad():
            module.running_mean.copy_(mean + 0.1 * var.sqrt() * torch.randn(mean.shape, generator=gen))
            module.running_var.copy_(var * (0.7 + 0.6 * torch.rand(var.shape, generator=gen)))
            _uniform_(module.weight, 0.5, 1.5, gen)
            _normal_(module.bias, 0.2, gen)

    hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    for m in model.modules():
        if isinstance(m, torch.nn.GroupNorm):
            _uniform_(m.weight, 0.5, 1.5, gen)
            _normal_(m.bias, 0.2, gen)

    # 2. measure the inputs of the layers re-drawn below (in the same pass; the mask / keypoint heads only run on
    #    detections, so they are measured in a second pass, after the box predictor is re-drawn)
    rpn_head = model.proposal_generator.rpn_head
    roi = model.roi_heads
    groups = [{
        "rpn_objectness": rpn_head.objectness_logits,
        "rpn_deltas": rpn_head.anchor_deltas,
        "cls_score": roi.box_predictor.cls_score,
        "bbox_pred": roi.box_predictor.bbox_pred,
    }, {}]
    if cfg.MODEL.MASK_ON:
        groups[1]["mask_pred"] = roi.mask_head.predictor
    if cfg.MODEL.KEYPOINT_ON:
        groups[1]["keypoint_pred"] = roi.keypoint_head.score_lowres
    for layers in groups:
        if layers:
            _measure_and_redraw(model, inputs, layers, hooks, name, gen)
            hooks = []
        if "cls_score" in layers:
            with torch.no_grad():
                # background is the last class logit in detectron2
                roi.box_predictor.cls_score.bias[-1] += BG_BIAS.get(name, BG_BIAS_DEFAULT)


def _measure_and_redraw(model, inputs, layers, hooks, name, gen):
    """One inference pass recording the input of each layer of `layers` ({key: module}), then each layer re-drawn
    so that its output has the std TARGET_STD[key]. The weights of each output are centred over its inputs: they
    follow a ReLU (all >= 0), and a common-mode term would make one class, one mask sign or one anchor win
    everywhere."""
    seen = {}

    def record(key):
        def hook(module, args):
            seen.setdefault(key, args[0].detach())
        return hook

    hooks = hooks + [layer.register_forward_pre_hook(record(k)) for k, layer in layers.items()]
    with torch.no_grad():
        model(inputs)
    for h in hooks:
        h.remove()
    for key, layer in layers.items():
        if key not in seen:
            raise RuntimeError(f"{name}: no input reached {key} during calibration")
        x = seen[key]
        x = x.flatten(1) if x.dim() == 2 or key in ("cls_score", "bbox_pred") else x.transpose(0, 1).flatten(1).t()
        x = x - x.mean(0)
        std = TARGET_STD[key] / max(_rms_norm(x, 1), 1e-6)
        w = layer.weight
        if isinstance(layer, torch.nn.ConvTranspose2d):
            # each output pixel sums over in_channels x (kernel / stride)^2 taps
            std /= layer.kernel_size[0] / layer.stride[0]
            out_dim = 1
        else:
            out_dim = 0
        _normal_(w, std, gen)
        with torch.no_grad():
            w.sub_(w.mean(dim=[d for d in range(w.dim()) if d != out_dim], keepdim=True))
        if layer.bias is not None:
            _normal_(layer.bias, TARGET_STD[key] * 0.3, gen)


def _predictor_input(cfg, image_bgr):
    """DefaultPredictor's own preprocessing (its resize, the uint8 BGR image as float), for calls outside it."""
    from detectron2.data import transforms as T

    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
    h, w = image_bgr.shape[:2]
    image = aug.get_transform(image_bgr).apply_image(image_bgr)
    return {"image": torch.as_tensor(image.astype("float32").transpose(2, 0, 1)), "height": h, "width": w}


def instances_to_dict(inst):
    """detectron2's Instances -> plain tensors (boxes XYXY in original-image pixels, labels contiguous 0..K-1)."""
    out = {
        "image_size": tuple(int(s) for s in inst.image_size),
        "pred_boxes": inst.pred_boxes.tensor.detach().clone(),
        "scores": inst.scores.detach().clone(),
        "pred_classes": inst.pred_classes.detach().clone(),
    }
    if inst.has("pred_masks"):
        out["pred_masks"] = inst.pred_masks.detach().to(torch.bool).clone()
    if inst.has("pred_keypoints"):
        out["pred_keypoints"] = inst.pred_keypoints.detach().clone()   # [N, K, 3]: x, y, score (probability)
    return out


def save_pkl(state_dict, path):
    data = {"model": {k: v.detach().cpu().numpy() for k, v in state_dict.items()}, "__author__": "mrcnn_fast test"}
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=2)


def list_images(folder):
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith((".jpg", ".jpeg", ".png")))


def run_config(d2, name, args):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import MetadataCatalog
    from detectron2.data.detection_utils import read_image
    from detectron2.engine import DefaultPredictor
    from detectron2.modeling import build_model

    out_dir = os.path.join(args.out, name)
    os.makedirs(out_dir, exist_ok=True)
    cfg = build_cfg(d2, name, args.d2_src)

    photos = list_images(args.images)
    if cfg.MODEL.KEYPOINT_ON:
        photos += list_images(args.persons)[: args.num_persons]
    batch_photos = photos[-2:] if cfg.MODEL.KEYPOINT_ON else photos[:2]
    calib = [read_image(p, format="BGR") for p in photos[:NUM_CALIBRATION_PHOTOS]]

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    model = build_model(cfg)
    model.eval()
    redraw(model, cfg, name, calib, gen)
    t_build = time.perf_counter() - t0

    ckpt = DetectionCheckpointer(model, save_dir=out_dir)
    ckpt.save("model")              # -> model.pth: {"model": state_dict}
    last = os.path.join(out_dir, "last_checkpoint")
    if os.path.exists(last):
        os.remove(last)
    save_pkl(model.state_dict(), os.path.join(out_dir, "model.pkl"))

    cfg.MODEL.WEIGHTS = os.path.join(out_dir, "model.pth")
    with open(os.path.join(out_dir, "config.yaml"), "w") as f:
        f.write(cfg.dump())

    predictor = DefaultPredictor(cfg)
    # the model-zoo pickle must load into detectron2 to the same tensors
    check = build_model(cfg)
    DetectionCheckpointer(check).load(os.path.join(out_dir, "model.pkl"))
    ref = predictor.model.state_dict()
    for k, v in check.state_dict().items():
        if not torch.equal(v, ref[k]):
            raise RuntimeError(f"{name}: model.pkl loads {k} differently from model.pth")
    del check

    torch.set_num_threads(args.threads)
    images, times = [], []
    for path in photos:
        img = read_image(path, format="BGR")
        t = time.perf_counter()
        pred = predictor(img)
        times.append(time.perf_counter() - t)
        inst = instances_to_dict(pred["instances"])
        # the network's input pixels as detectron2 resized them (uint8 values, its channel order), so that a
        # comparison can feed them to another model and tell the preprocessing from the rest
        resized = _predictor_input(cfg, img)["image"]
        images.append({"file": os.path.abspath(path), "height": img.shape[0], "width": img.shape[1],
                       "input_size": tuple(resized.shape[1:]), "input_image": resized.to(torch.uint8),
                       "input_format": cfg.INPUT.FORMAT, **inst})
        print(f"  {os.path.basename(path)} {img.shape[1]}x{img.shape[0]} -> {len(inst['scores'])} detections, "
              f"classes {sorted(set(inst['pred_classes'].tolist()))[:12]}, "
              f"scores {inst['scores'].max().item() if len(inst['scores']) else 0:.3f}.."
              f"{inst['scores'].min().item() if len(inst['scores']) else 0:.3f}, {times[-1]:.2f} s", flush=True)

    # one batched call: detectron2 pads the batch to a common size (size_divisibility of the backbone)
    batch_in = [_predictor_input(cfg, read_image(p, format="BGR")) for p in batch_photos]
    with torch.no_grad():
        t = time.perf_counter()
        batch_out = predictor.model(batch_in)
        t_batch = time.perf_counter() - t
    batch = {"files": [os.path.abspath(p) for p in batch_photos],
             "input_sizes": [tuple(b["image"].shape[1:]) for b in batch_in],
             "instances": [instances_to_dict(o["instances"]) for o in batch_out]}
    for p, o in zip(batch_photos, batch["instances"]):
        print(f"  batch: {os.path.basename(p)} -> {len(o['scores'])} detections", flush=True)

    meta = MetadataCatalog.get(cfg.DATASETS.TEST[0])
    record = {
        "config": name,
        "config_file": CONFIGS[name],
        "detectron2_commit": _git_head(args.d2_src),
        "torch": torch.__version__,
        "seed": args.seed,
        "class_names": list(meta.get("thing_classes", []))[: cfg.MODEL.ROI_HEADS.NUM_CLASSES],
        "keypoint_names": list(meta.get("keypoint_names", [])) if cfg.MODEL.KEYPOINT_ON else [],
        "thing_dataset_id_to_contiguous_id": dict(meta.get("thing_dataset_id_to_contiguous_id", {})),
        "d2_config": {
            "pixel_mean": list(cfg.MODEL.PIXEL_MEAN), "pixel_std": list(cfg.MODEL.PIXEL_STD),
            "input_format": cfg.INPUT.FORMAT, "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
            "max_size_test": cfg.INPUT.MAX_SIZE_TEST, "stride_in_1x1": cfg.MODEL.RESNETS.STRIDE_IN_1X1,
            "norm": cfg.MODEL.RESNETS.NORM, "num_groups": cfg.MODEL.RESNETS.NUM_GROUPS,
            "width_per_group": cfg.MODEL.RESNETS.WIDTH_PER_GROUP, "depth": cfg.MODEL.RESNETS.DEPTH,
            "rpn_pre_nms_topk_test": cfg.MODEL.RPN.PRE_NMS_TOPK_TEST,
            "rpn_post_nms_topk_test": cfg.MODEL.RPN.POST_NMS_TOPK_TEST,
            "size_divisibility": predictor.model.backbone.size_divisibility,
            "score_thresh_test": cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
            "nms_thresh_test": cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST,
            "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
        },
        "images": images,
        "batch": batch,
        "timing_s": {"build_and_redraw": t_build, "per_image": times, "batch_of_2": t_batch,
                     "threads": torch.get_num_threads()},
    }
    torch.save(record, os.path.join(out_dir, "outputs.pt"))
    print(f"{name}: {len(photos)} photos, {sum(len(i['scores']) for i in images)} detections, "
          f"{np.mean(times):.2f} s/image, batch of 2 {t_batch:.2f} s -> {out_dir}", flush=True)


def _git_head(path):
    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    data = os.path.join(here, "..", "..", "shared", "data")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d2-src", default=os.environ.get("D2_SRC", "/work/d2src"), help="detectron2 checkout")
    p.add_argument("--d2-deps", default=os.environ.get("D2_DEPS", "/work/d2deps"),
                   help="pip --target folder with detectron2's pure-Python dependencies ('' if installed)")
    p.add_argument("--out", default=os.environ.get("D2_REF", "/work/d2ref"))
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    p.add_argument("--images", default=os.path.join(data, "coco_samples", "images"))
    p.add_argument("--persons", default=os.path.join(data, "coco_persons", "images"))
    p.add_argument("--num-persons", type=int, default=2, help="coco_persons photos added for keypoint models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if not os.path.isdir(os.path.join(args.d2_src, "detectron2")):
        p.error(f"--d2-src {args.d2_src!r} is not a detectron2 checkout (no detectron2/ folder in it)")
    torch.set_num_threads(args.threads)
    d2 = import_detectron2(args.d2_src, args.d2_deps)
    print(f"detectron2 from {os.path.dirname(d2.__file__)}, torch {torch.__version__}, {platform.processor()}")
    for name in args.configs:
        print(f"== {name}", flush=True)
        run_config(d2, name, args)


if __name__ == "__main__":
    main()
