"""Output parity of mrcnn_fast's detectron2 importer against detectron2 itself, on the reference files that
bench/d2_reference.py writes (checkpoints of seeded random detectron2 models and detectron2's own detections).

    PYTHONPATH=python python bench/d2_parity.py [--ref /work/d2ref] [--configs ...] [--formats pth pkl]

For each config and each of its two files (the Checkpointer .pth, the model-zoo .pkl) the checkpoint is loaded
through the one door, ``mrcnn_fast.Predictor(path, weights_format="detectron2", precision="fp32")``, with no
config override (the importer's defaults must be detectron2's), and run on the same photos, one at a time and as
the same batch of two; its detections are compared with detectron2's DefaultPredictor / model([...]) outputs:
count, labels (detectron2's contiguous 0..K-1), boxes (max abs px), scores (max abs), mask IoU (min), keypoints
(max px) and keypoint scores (max abs, detectron2's are probabilities). Detections are compared in score order;
where the counts or labels differ, each of detectron2's detections is matched to the unused one of ours with the
same label and the highest box IoU, and the unmatched are counted. Two allowances for float noise: detections whose
detectron2 scores are less than TIE_SCORE apart may come in either order, and the mask IoU bound applies to masks of
at least MASK_MIN_AREA pixels. --input detectron2 feeds detectron2's own resized input to the Predictor's model and
stages instead of the files: it tells the preprocessing's differences from the rest's.

Writes a table to stdout and bench/results/import_parity.md (method, commands, CPU, date, numbers). Exit status 1
when a tolerance of the issue is missed (same count and labels, boxes 0.05 px, scores 1e-3, mask IoU 0.99,
keypoints 0.5 px).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
try:
    import mrcnn_fast  # noqa: F401  (installed, or on PYTHONPATH)
except ImportError:  # run from a source checkout with the in-place build
    sys.path.insert(0, str(HERE.parent / "python"))

import mrcnn_fast  # noqa: E402

TOL = {"box_px": 0.05, "score": 1e-3, "mask_iou": 0.99, "kp_px": 0.5}
INPUT_MODES = {
    "files": "the Predictor reads the photo files (the full door: its own resize and colour conversion)",
    "detectron2": "detectron2's resized network input (uint8, BGR) fed to the Predictor's model and stages: "
                  "everything but our resize and colour conversion",
}
# detections whose scores differ by less than the score tolerance are "tied": scores may differ that much, so
# their order is not determined
TIE_SCORE = TOL["score"]
# masks of fewer pixels than this: one pixel flipped at the 0.5 threshold by float noise costs over 1 % IoU
MASK_MIN_AREA = 100
CONFIG_ORDER = ["mask_rcnn_R_50_FPN_3x", "mask_rcnn_R_50_C4_3x", "keypoint_rcnn_R_50_FPN_3x",
                "faster_rcnn_R_50_FPN_3x", "mask_rcnn_R_50_FPN_3x_gn", "mask_rcnn_X_101_32x8d_FPN_3x"]


def cpu_description() -> str:
    """lscpu's model name with the CPU's bfloat16 / AMX / VNNI flags."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        out = ""
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}
    if "Model name" in fields:
        name = f"{fields['Model name']}, {fields.get('CPU(s)', '?')} CPUs"
    flags = set(fields.get("Flags", "").split())
    has = [f for f in ("avx512_bf16", "amx_bf16", "amx_int8", "amx_tile", "avx512_vnni") if f in flags]
    return f"{name} (flags: {', '.join(has) or 'no bf16/AMX/VNNI'}; {'AMX' if 'amx_bf16' in flags else 'no AMX'})"


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU Tensor[N, M] of boxes Tensor[N, 4] and Tensor[M, 4] (x1, y1, x2, y2)."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-12)


def match(ref: dict, ours: dict) -> tuple[list, list]:
    """Pairs (i_ref, j_ours) and unmatched counts [ref, ours]: each reference detection (in score order) takes the
    unused detection of ours with its label and the highest box IoU (> 0.5). Not the score order itself: detections
    whose scores differ by float noise only (one class of near-saturated scores, as the keypoint reference has) come
    in either order; after class-aware NMS at 0.5 two detections of one class never overlap by more than 0.5, so
    the best match is unambiguous."""
    n, m = len(ref["scores"]), len(ours["scores"])
    lr, lo = ref["pred_classes"], ours["labels"]
    iou = box_iou(ref["pred_boxes"].double(), ours["boxes"].double()) if n and m else torch.zeros(n, m)
    used, pairs = set(), []
    for i in range(n):
        cand = [(float(iou[i, j]), j) for j in range(m) if j not in used and int(lo[j]) == int(lr[i])]
        cand = [c for c in cand if c[0] > 0.5]
        if cand:
            j = max(cand)[1]
            used.add(j)
            pairs.append((i, j))
    return pairs, [n - len(pairs), m - len(pairs)]


def labels_equal_up_to_ties(ref: dict, ours: dict) -> bool:
    """Same count and the same labels in score order, where detections whose detectron2 scores differ by less than
    TIE_SCORE may come in either order (their order is float noise: both projects sort by score)."""
    lr, lo, sr = ref["pred_classes"], ours["labels"], ref["scores"]
    if len(lr) != len(lo):
        return False
    if torch.equal(lr, lo):
        return True
    start = 0
    for k in range(1, len(sr) + 1):
        if k == len(sr) or float(sr[k - 1] - sr[k]) >= TIE_SCORE:
            if sorted(lr[start:k].tolist()) != sorted(lo[start:k].tolist()):
                return False
            start = k
    return True


def compare(ref: dict, ours: dict) -> dict:
    """Differences of one image's detections (detectron2's `ref`, mrcnn_fast Predictor's `ours`)."""
    pairs, unmatched = match(ref, ours)
    r = {"n_ref": len(ref["scores"]), "n_ours": len(ours["scores"]), "unmatched": unmatched,
         "labels_equal": labels_equal_up_to_ties(ref, ours),
         "n_classes": len(set(ref["pred_classes"].tolist())),
         "score_range": (float(ref["scores"].min()), float(ref["scores"].max())) if len(ref["scores"]) else (0, 0)}
    if not pairs:
        return r
    i = torch.tensor([p[0] for p in pairs])
    j = torch.tensor([p[1] for p in pairs])
    r["box_px"] = float((ref["pred_boxes"][i].double() - ours["boxes"][j].double()).abs().max())
    r["score"] = float((ref["scores"][i].double() - ours["scores"][j].double()).abs().max())
    if "pred_masks" in ref:
        if "masks" not in ours:
            r["mask_iou"] = float("nan")
        else:
            a = ref["pred_masks"][i].flatten(1)
            b = ours["masks"][j].to(torch.bool).flatten(1)
            inter = (a & b).sum(1).double()
            union = (a | b).sum(1).double()
            iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
            r["mask_iou"] = float(iou.min())
            big = a.sum(1) >= MASK_MIN_AREA
            r["mask_iou_big"] = float(iou[big].min()) if bool(big.any()) else 1.0
            r["mask_px_diff"] = int((a ^ b).sum())
            r["mask_px_union"] = int(union.sum())
    if "pred_keypoints" in ref:
        if "keypoints" not in ours:
            r["kp_px"] = float("nan")
        else:
            d = (ref["pred_keypoints"][i, :, :2].double() - ours["keypoints"][j, :, :2].double()).abs().amax(-1)
            r["kp_px"] = float(d.max())
            r["kp_over_tol"] = int((d > TOL["kp_px"]).sum())
            r["kp_total"] = int(d.numel())
            if "keypoints_scores" in ours:
                # relative: detectron2's "probabilities" exceed 1 where the upsampled heatmap's peak is above the
                # pooled one's (its normaliser sums the pooled heatmap)
                kr, ko = ref["pred_keypoints"][i, :, 2].double(), ours["keypoints_scores"][j].double()
                r["kp_score"] = float(((kr - ko).abs() / kr.abs().clamp(min=1)).max())
    return r


def refs_sizes(rec: dict, files: list) -> list[dict]:
    by_file = {im["file"]: im for im in rec["images"]}
    return [by_file[f] for f in files]


def run_on_d2_input(pred, images: list, input_sizes: list) -> list[dict]:
    """The Predictor's networks and stages on detectron2's own network input (`images`: uint8 Tensor[3, h, w] as
    detectron2 resized them, in its channel order), normalised with the model's pixel statistics and padded by our
    batching: everything but our resize and colour conversion. input_sizes: (h0, w0) of the original photos."""
    from mrcnn_fast.data.transforms import batch_images

    if any(im is None for im in images):
        raise SystemExit("--input detectron2: outputs.pt has no input_image (written by an older d2_reference.py)")
    m = pred.model
    with torch.inference_mode():
        norm = [(im.float() - m.pixel_mean) / m.pixel_std for im in images]
        batch, image_sizes = batch_images(norm, m.size_divisibility)
        raw = m.inference(m.to_model_layout(batch), image_sizes, input_sizes, mask_format="bool", stages=pred.graph)
    return [pred._result(o) for o in raw]


def passes(r: dict) -> bool:
    ok = r["n_ref"] == r["n_ours"] and r["labels_equal"] and r["unmatched"] == [0, 0]
    ok &= r.get("box_px", 0.0) <= TOL["box_px"] and r.get("score", 0.0) <= TOL["score"]
    ok &= not (r.get("mask_iou_big", 1.0) < TOL["mask_iou"]) and not (r.get("kp_px", 0.0) > TOL["kp_px"])
    return ok


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def run(args) -> tuple[list, dict]:
    rows, info = [], {}
    torch.set_num_threads(args.threads)
    for name in args.configs:
        out_pt = Path(args.ref) / name / "outputs.pt"
        if not out_pt.is_file():
            print(f"{name}: no {out_pt} (run bench/d2_reference.py --configs {name})", flush=True)
            continue
        rec = torch.load(out_pt, weights_only=False)
        info[name] = rec
        for fmt in args.formats:
            path = Path(args.ref) / name / f"model.{fmt}"
            t0 = time.perf_counter()
            pred = mrcnn_fast.Predictor(str(path), weights_format="detectron2", precision="fp32", device="cpu")
            t_load = time.perf_counter() - t0
            if fmt == args.formats[0]:
                print(f"== {name}: {pred.import_report.splitlines()[0]}", flush=True)
                if args.verbose:
                    print(pred.import_report, flush=True)
            cases = [(os.path.basename(im["file"]), [im["file"]], [im]) for im in rec["images"]]
            b = rec["batch"]
            cases.append(("batch: " + " + ".join(os.path.basename(f) for f in b["files"]), b["files"],
                          b["instances"]))
            inputs = {im["file"]: im.get("input_image") for im in rec["images"]}
            for label, files, refs in cases:
                t = time.perf_counter()
                if args.input == "files":
                    outs = pred(files, batch_size=len(files))
                else:
                    outs = run_on_d2_input(pred, [inputs[f] for f in files], [(r["height"], r["width"])
                                                                              for r in refs_sizes(rec, files)])
                dt = time.perf_counter() - t
                for f, ref, ours in zip(files, refs, outs):
                    r = compare(ref, ours)
                    r.update(config=name, format=fmt, image=label if len(files) == 1 else
                             f"{label} [{os.path.basename(f)}]", ours_s=dt / len(files), load_s=t_load)
                    r["ok"] = passes(r)
                    rows.append(r)
                    print(f"  {fmt} {r['image']}: {r['n_ref']} vs {r['n_ours']} dets, unmatched {r['unmatched']}, "
                          f"box {_fmt(r.get('box_px'), '.2e')} px, score {_fmt(r.get('score'), '.1e')}, "
                          f"mask IoU {_fmt(r.get('mask_iou'), '.4f')}, kp {_fmt(r.get('kp_px'), '.3f')} px "
                          f"{'ok' if r['ok'] else 'FAIL'}", flush=True)
    return rows, info


def summarize(rows: list, info: dict) -> list[dict]:
    out = []
    for name in [c for c in CONFIG_ORDER if c in info]:
        for fmt in sorted({r["format"] for r in rows if r["config"] == name}, reverse=True):
            rs = [r for r in rows if r["config"] == name and r["format"] == fmt]

            def worst(key, fn, rs=rs):
                vals = [r[key] for r in rs if key in r]
                return fn(vals) if vals else None

            rec = info[name]
            out.append({
                "config": name, "format": fmt, "images": len(rs),
                "dets": f"{sum(r['n_ref'] for r in rs)} / {sum(r['n_ours'] for r in rs)}",
                "classes": max(r["n_classes"] for r in rs),
                "count_label": sum(1 for r in rs if r["labels_equal"] and r["n_ref"] == r["n_ours"]),
                "unmatched": sum(sum(r["unmatched"]) for r in rs),
                "box_px": worst("box_px", max), "score": worst("score", max),
                "mask_iou": worst("mask_iou", min), "mask_iou_big": worst("mask_iou_big", min),
                "mask_px": (sum(r.get("mask_px_diff", 0) for r in rs), sum(r.get("mask_px_union", 0) for r in rs)),
                "kp_px": worst("kp_px", max),
                "kp_over": (sum(r.get("kp_over_tol", 0) for r in rs), sum(r.get("kp_total", 0) for r in rs)),
                "kp_score": worst("kp_score", max),
                "d2_s": sum(rec["timing_s"]["per_image"]) / len(rec["timing_s"]["per_image"]),
                "ours_s": sum(r["ours_s"] for r in rs if not r["image"].startswith("batch")) /
                max(1, sum(1 for r in rs if not r["image"].startswith("batch"))),
                "ok": all(r["ok"] for r in rs),
            })
    return out


def table(summary: list[dict]) -> str:
    head = ("| config | file | images | detections d2 / ours | classes | same count + labels | unmatched | "
            "boxes max px | scores max | mask IoU min | mask IoU min >= 100 px | mask px differing / union | "
            "keypoints max px (> 0.5 px) | kp score max | "
            "d2 s/img | ours s/img | pass |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summary:
        kp = "-" if s["kp_px"] is None else f"{s['kp_px']:.3f} ({s['kp_over'][0]}/{s['kp_over'][1]})"
        mpx = "-" if s["mask_iou"] is None else f"{s['mask_px'][0]} / {s['mask_px'][1]}"
        lines.append(
            f"| {s['config']} | .{s['format']} | {s['images']} | {s['dets']} | {s['classes']} | "
            f"{s['count_label']}/{s['images']} | {s['unmatched']} | {_fmt(s['box_px'], '.2e')} | "
            f"{_fmt(s['score'], '.1e')} | {_fmt(s['mask_iou'], '.4f')} | {_fmt(s['mask_iou_big'], '.4f')} | "
            f"{mpx} | {kp} | {_fmt(s['kp_score'], '.1e')} | "
            f"{s['d2_s']:.2f} | {s['ours_s']:.2f} | {'yes' if s['ok'] else 'NO'} |")
    return "\n".join(lines)


def per_image_table(rows: list) -> str:
    head = "| config | file | image | dets d2 / ours | unmatched | boxes px | scores | mask IoU | kp px | pass |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['config']} | .{r['format']} | {r['image']} | {r['n_ref']} / {r['n_ours']} | "
                     f"{r['unmatched'][0]}+{r['unmatched'][1]} | {_fmt(r.get('box_px'), '.2e')} | "
                     f"{_fmt(r.get('score'), '.1e')} | {_fmt(r.get('mask_iou'), '.4f')} | "
                     f"{_fmt(r.get('kp_px'), '.3f')} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines)


def write_markdown(path: Path, summary: list, rows: list, info: dict, args, argv) -> None:
    any_rec = next(iter(info.values()))
    git = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip() or "unknown"
    text = f"""# Checkpoint import: output parity with detectron2

Date: {datetime.date.today().isoformat()}. mrcnn_fast at `{git}` ({Path(mrcnn_fast.__file__).parent}), torch
{torch.__version__}; detectron2 at `{any_rec['detectron2_commit'][:12]}` (its Python code, run on CPU without its
C++ extension). CPU: {cpu_description()}, {args.threads} threads, shared with other jobs (timings are indicative).
{args.note}

## Method

`bench/d2_reference.py` builds each model with detectron2's own `build_model` from its config (MODEL.WEIGHTS "",
CPU), seeded random weights made informative (frozen-BN statistics calibrated on photos, norms' affine terms and the
heads' last layers re-drawn: detections are many, of several classes, spread in score), saves them as detectron2's
`DetectionCheckpointer` does (`model.pth`) and as a model-zoo pickle (`model.pkl`, protocol 2; checked to load into
detectron2 to the same tensors), and runs detectron2's `DefaultPredictor` (its resize, BGR uint8 input read with
`detection_utils.read_image(format="BGR")`) on the photos of `shared/data/coco_samples` (plus 2 of `coco_persons` for
the keypoint model), and `model([a, b])` on two photos as one padded batch.

`bench/d2_parity.py` loads each file through `mrcnn_fast.Predictor(path, weights_format="detectron2",
precision="fp32")` with no config override, runs it on the same image files (one at a time, then the same two as a
batch of 2) and compares detections in score order (greedy same-label IoU matching where counts or labels differ).
Tolerances of the issue: same count and labels, boxes within {TOL['box_px']} px, scores within {TOL['score']}, mask
IoU >= {TOL['mask_iou']}, keypoints within {TOL['kp_px']} px. Two allowances, both for float noise: detections whose
detectron2 scores differ by less than {TIE_SCORE} may come in either order; the mask IoU bound applies to masks of
at least {MASK_MIN_AREA} pixels (in a smaller one a single pixel flipped at the 0.5 threshold costs over 1 %), the
smaller ones are in "mask IoU min" and in the count of differing pixels.

Commands:

    python bench/d2_reference.py --d2-src /work/d2src --d2-deps /work/d2deps --out /work/d2ref   # see its docstring
    PYTHONPATH=python python {' '.join(['bench/d2_parity.py'] + argv)}

## Results (worst over the images and the batch)

Input: {INPUT_MODES[args.input]} (`--input {args.input}`).

{table(summary)}

"classes": the most distinct classes detectron2 detected in one image. "kp score": keypoint scores (detectron2's
softmax probabilities) max difference relative to max(1, |score|). d2 s/img: detectron2's DefaultPredictor; ours:
Predictor fp32 (both CPU, {args.threads} threads, same machine, not interleaved).

## Per image

{per_image_table(rows)}
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", default=os.environ.get("D2_REF", "/work/d2ref"), help="bench/d2_reference.py's --out")
    p.add_argument("--configs", nargs="+", default=CONFIG_ORDER, choices=CONFIG_ORDER)
    p.add_argument("--formats", nargs="+", default=["pth", "pkl"], choices=["pth", "pkl"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "import_parity.md"), help="markdown report ('' : none)")
    p.add_argument("--input", choices=["files", "detectron2"], default="files",
                   help="files: the Predictor reads the photos (the full door); detectron2: detectron2's resized "
                        "network input fed to the Predictor's model and stages (isolates the preprocessing)")
    p.add_argument("--note", default="", help="a line for the report (e.g. which branches the mrcnn_fast tree holds)")
    p.add_argument("-v", "--verbose", action="store_true", help="print the importer's full report")
    args = p.parse_args(argv)
    rows, info = run(args)
    if not rows:
        p.error(f"no reference outputs under {args.ref}: run bench/d2_reference.py first")
    summary = summarize(rows, info)
    print(table(summary))
    if args.out:
        write_markdown(Path(args.out), summary, rows, info, args, argv)
        print(f"wrote {args.out}")
    return 0 if all(s["ok"] for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
