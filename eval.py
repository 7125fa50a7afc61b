"""Evaluation: COCO AP, VOC mAP50, TIDE errors, proposal recall and comparison figures (paper 4.3-4.5).

Sections
--------
- 4.3, Table 1: COCO box and mask AP (AP, AP50, AP75, APs, APm, APl) through pycocotools' COCOeval -- ``coco_eval``.
- 4.4, Table 2: PASCAL VOC mAP50 for novel, base and all classes of the few-shot protocol -- ``voc_map50``.
- 4.5.1, Table 3, Figure 1: TIDE error breakdown -- ``tide`` (algorithm in tide.py), ``plot_tide`` (figures.py).
- 3.2 / 4.1.3: class-agnostic recall of selective-search or RPN proposals (AR@10/100/1000) -- ``proposal_recall``.
- 4.5.3, Figures 2, 4-7: several models' predictions side by side -- ``plot_side_by_side``, ``pick_disagreement``
  (figures.py, re-exported here).

Symbols
-------
=========  ====================================================================================================
AP         COCO AP averaged over IoU 0.50:0.05:0.95, 101-point interpolation, max 100 detections per image
AP50/AP75  AP at IoU 0.5 / 0.75; APs/APm/APl: AP of small (< 32^2 px), medium, large (> 96^2 px) objects
mAP50      VOC AP at IoU > 0.5: area under the interpolated PR curve (VOC2010+), or the 11-point VOC07 mean
AR@k       recall averaged over IoU 0.50:0.05:0.95 with the top k proposals per image, class-agnostic
=========  ====================================================================================================
Every metric is in percent, like the paper's tables. Boxes: results use COCO's [x, y, w, h]; model outputs and
proposals use xyxy pixels (contract). Masks in results are RLEs with str counts (JSON-ready).

Public
------
- ``predict(model, dataset, device="cpu", score_thresh=0.05, cat_ids=None, mask_thresh=0.5, progress=True)``
  -> list of COCO result dicts; ``detections_to_coco(output, image_id, cat_ids, score_thresh, mask_thresh)``.
- ``save_results(results, path)`` (atomic), ``load_results(path)``, ``check_results(results, coco, source)``.
- ``coco_eval(gt, results, iou_type="bbox") -> dict``; ``voc_ap(recall, precision, use_07_metric=False) -> float``;
  ``voc_map50(gt, results, class_ids=None, novel_ids=None, use_07_metric=False, plus_one=False) -> dict``.
- ``tide(gt, results, iou_type="bbox", fg_iou=0.5, bg_iou=0.1) -> dict``; ``plot_tide(results_by_model, path)``.
- ``proposal_recall(gt_boxes, proposals, max_dets=(10, 100, 1000)) -> dict``.
- from figures.py: ``plot_side_by_side(images, predictions_by_model, class_names, path, score_thresh=0.5)``,
  ``pick_disagreement(predictions_by_model, n, gts=None, score_thresh=0.5)``, ``results_by_image(results)``.
- ``predict_checkpoint(path, gt_path, image_root, out, name=None)``, ``checkpoint_names(paths)``: a model_final.pth's
  predictions, one distinct results file per checkpoint.
- ``markdown_table(rows, columns) -> str``; ``write_metrics(metrics, path)`` (atomic JSON, NaN -> null); ``main``.
VOC AP and proposal recall are computed in box_metrics.py (numpy only) and re-exported here.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

import box_metrics
from box_metrics import COCO_IOUS, proposal_recall, voc_ap, xywh_to_xyxy  # noqa: F401 (re-exported)
from figures import comparison_figures, pick_disagreement, plot_side_by_side, plot_tide, results_by_image  # noqa: F401
from tide import MAIN_ERRORS, SPECIAL_ERRORS, tide_errors

COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


# ---------------- Files and inputs --------------------------------------------------------------------------------
def _atomic_write(path, text: str) -> Path:
    """Write text to path through a temp file in the same folder and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the results from other users
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def save_results(results: list, path) -> Path:
    """COCO results list -> JSON file, atomically."""
    return _atomic_write(path, json.dumps(results))


def load_results(path) -> list:
    """COCO results JSON (a list of dicts) -> list; ValueError naming the file if it is not a list."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of COCO results, got {type(data).__name__}")
    return data


def load_coco(gt) -> COCO:
    """A COCO annotation path or a pycocotools COCO -> COCO (its loading messages silenced)."""
    if isinstance(gt, COCO):
        return gt
    if not Path(gt).is_file():
        raise FileNotFoundError(f"ground-truth annotations not found: {gt}")
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(gt))


def check_results(results: list, coco: COCO, source: str = "<results>") -> None:
    """ValueError naming source and the entry when an entry has an unknown image or category id, a non-finite
    score, a malformed bbox, or neither bbox nor segmentation."""
    images, cats = set(coco.getImgIds()), set(coco.getCatIds())
    for i, r in enumerate(results):
        if not isinstance(r, dict) or not {"image_id", "category_id", "score"} <= set(r):
            raise ValueError(f"{source}: entry {i} lacks image_id, category_id or score: {str(r)[:120]}")
        what = f"{source}: entry {i} (image_id={r['image_id']!r}, category_id={r['category_id']!r})"
        if r["image_id"] not in images:
            raise ValueError(f"{what}: unknown image_id, not among the ground truth's {len(images)} images")
        if r["category_id"] not in cats:
            raise ValueError(f"{what}: unknown category_id, the ground truth has {sorted(cats)}")
        if not isinstance(r["score"], (int, float)) or not math.isfinite(r["score"]):
            raise ValueError(f"{what}: score {r['score']!r} is not a finite number")
        if "bbox" not in r and "segmentation" not in r:
            raise ValueError(f"{what}: has neither bbox nor segmentation")
        box = r.get("bbox", [0, 0, 0, 0])
        ok = isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
        if not ok or not all(math.isfinite(v) for v in box) or box[2] < 0 or box[3] < 0:
            raise ValueError(f"{what}: bbox {box!r} is not a finite [x, y, w, h] with w, h >= 0")


def _results(gt, results):
    """(gt, results path or list) -> (COCO, validated list). Empty results warn (metrics then read 0)."""
    coco, source = load_coco(gt), str(results) if isinstance(results, (str, Path)) else "<results>"
    results = load_results(results) if isinstance(results, (str, Path)) else results
    check_results(results, coco, source)
    if not results:
        warnings.warn(f"{source}: no predictions; every metric is 0", stacklevel=3)
    return coco, results


# ---------------- Predictions of a torchvision-convention detector ------------------------------------------------
def detections_to_coco(output: dict, image_id, cat_ids=None, score_thresh=0.05, mask_thresh=0.5) -> list:
    """One image's detector output -> COCO result dicts.

    output: boxes (n, 4) xyxy, labels (n,) contiguous 1..C, scores (n,), masks (n, 1, H, W) float (optional).
    cat_ids: category id of label l is cat_ids[l - 1]; None keeps the label. Masks are cut at mask_thresh -> RLE.
    """
    keep = output["scores"] >= score_thresh  # (n,)
    boxes = output["boxes"][keep].detach().float().cpu().numpy()  # (k, 4) xyxy
    labels = output["labels"][keep].cpu().tolist()
    scores = output["scores"][keep].detach().float().cpu().tolist()
    if cat_ids is not None and any(not 1 <= lab <= len(cat_ids) for lab in labels):
        raise ValueError(f"image {image_id}: labels {sorted(set(labels))} outside 1..{len(cat_ids)} (cat_ids)")
    out = [{"image_id": image_id, "category_id": int(cat_ids[lab - 1] if cat_ids is not None else lab),
            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])], "score": float(s)}
           for b, lab, s in zip(boxes, labels, scores)]
    if "masks" in output and out:
        m = (output["masks"][keep][:, 0] >= mask_thresh).cpu().numpy().astype(np.uint8)  # (k, H, W)
        for r, rle in zip(out, mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0)))):
            r["segmentation"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return out


@torch.no_grad()
def predict(model, dataset, device="cpu", score_thresh=0.05, cat_ids=None, mask_thresh=0.5, progress=True) -> list:
    """Run a detector on (image, target) items -> COCO results (with a tqdm bar).

    Items: image float (3, H, W) in [0, 1] (uint8 is divided by 255) and target a dict with "image_id" or the id.
    The model follows torchvision's convention (model.eval(); model([img]) -> [dict]); its mode is restored.
    """
    was_training = model.training
    model.eval().to(device)
    results = []
    total = len(dataset) if hasattr(dataset, "__len__") else None
    for image, target in tqdm(dataset, total=total, desc="predict", disable=not progress):
        image_id = target["image_id"] if isinstance(target, dict) else target
        image_id = int(image_id.item()) if torch.is_tensor(image_id) else image_id
        img = image.float() / 255 if image.dtype == torch.uint8 else image.float()  # (3, H, W) in [0, 1]
        (output,) = model([img.to(device)])
        results += detections_to_coco(output, image_id, cat_ids, score_thresh, mask_thresh)
    model.train(was_training)
    return results


# ---------------- COCO AP (Table 1) and TIDE (Table 3) ------------------------------------------------------------
def coco_eval(gt, results, iou_type="bbox") -> dict:
    """COCOeval AP, AP50, AP75, APs, APm, APl in percent (NaN where COCOeval has no gt, e.g. no small objects).

    gt: annotation path or COCO; results: list or path. iou_type "segm" drops the boxes of the results, so that
    areas come from the masks (as detectron2 does). Empty results -> all 0 with a warning.
    """
    coco, res = _results(gt, results)
    if not res:
        return {k: 0.0 for k in COCO_KEYS}
    if iou_type == "segm":
        if any("segmentation" not in r for r in res):
            raise ValueError("coco_eval(iou_type='segm'): some results have no segmentation")
        res = [{k: v for k, v in r.items() if k != "bbox"} for r in res]
    res = [dict(r) for r in res]  # loadRes adds keys: keep the caller's dicts intact
    with contextlib.redirect_stdout(io.StringIO()):
        E = COCOeval(coco, coco.loadRes(res), iou_type)
        E.evaluate()
        E.accumulate()
        E.summarize()
    return {k: float(v) * 100 if v >= 0 else float("nan") for k, v in zip(COCO_KEYS, E.stats[:6])}


def tide(gt, results, iou_type="bbox", fg_iou=0.5, bg_iou=0.1) -> dict:
    """TIDE dAPs (tide.py) on validated inputs: AP50, Cls, Loc, Both, Dupe, Bkg, Miss, FalsePos, FalseNeg, counts."""
    coco, res = _results(gt, results)
    return tide_errors(coco, res, iou_type, fg_iou, bg_iou)


# ---------------- VOC mAP50 (Table 2), in box_metrics.py on validated inputs ------------------------------------
def voc_map50(gt, results, class_ids=None, novel_ids=None, use_07_metric=False, iou_thresh=0.5,
              plus_one=False) -> dict:
    """PASCAL VOC mAP50 in percent ({"per_class", "mAP", "nAP", "bAP"}) of checked results; box_metrics.voc_map50."""
    coco, res = _results(gt, results)
    return box_metrics.voc_map50(coco, res, class_ids, novel_ids, use_07_metric, iou_thresh, plus_one)


# ---------------- Output ------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if not math.isfinite(v) else f"{v:.2f}"
    return str(v)


def markdown_table(rows: list, columns) -> str:
    """Rows (dicts) -> a GitHub markdown table of the given columns; floats with 2 decimals, NaN/missing as '-'."""
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(_fmt(r.get(c, float("nan"))) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x.item() if isinstance(x, np.generic) else x


def write_metrics(metrics: dict, path) -> Path:
    """metrics -> indented JSON, atomically; NaN/inf become null."""
    return _atomic_write(path, json.dumps(_json_safe(metrics), indent=2) + "\n")


# ---------------- Command line ------------------------------------------------------------------------------------
def _default_gt():
    """The embedded synthetic val split: (annotations path, image root). data.py is imported only here."""
    import data
    root = Path(data.ensure_synthetic_dataset())
    return root / "annotations" / "val.json", root


def checkpoint_names(paths) -> list[str]:
    """A distinct name per checkpoint: its run folder for a model_final.pth, else the file stem; _i on a clash."""
    base = [Path(p).resolve().parent.name if Path(p).name == "model_final.pth" else Path(p).stem for p in paths]
    return [b if base.count(b) == 1 else f"{b}_{i}" for i, b in enumerate(base)]


def predict_checkpoint(path, gt_path, image_root, out: Path, name: str | None = None) -> Path:
    """finetune.py's model_final.pth -> predictions on the split (COCO results JSON out/<name>.json; name defaults
    to checkpoint_names). Loaded with weights_only=True: a checkpoint never runs code."""
    import coco_data
    from detector import Detector, DetectorConfig
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or "state_dict" not in ck or "config" not in ck:
        raise ValueError(f"{path}: not a finetune.py model_final.pth (needs 'state_dict' and 'config')")
    det = Detector(DetectorConfig(**ck["config"]))
    det.load_state_dict(ck["state_dict"])
    if image_root is None:
        raise ValueError(f"{path}: give --images, the image folder of {gt_path}")
    first = json.loads(Path(gt_path).read_text())["images"][0]["file_name"]
    root = image_root if (image_root / first).exists() else image_root / "val"  # the synthetic layout: <root>/val
    val = coco_data.load_coco(gt_path, root)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = predict(det.to(device), coco_data.DetectionDataset(val, train=False), device=device,
                      cat_ids=ck.get("cat_ids", val.cat_ids))
    return save_results(results, out / f"{name or checkpoint_names([path])[0]}.json")


def _proposal_lists(coco: COCO, path):
    """(gt boxes, proposals) per gt image from a .json {file_name or image id: [[x1, y1, x2, y2], ...]} or a
    selective_search.py proposals file (keys: paths relative to the image root)."""
    if str(path).endswith(".json"):
        with open(path) as f:
            table = json.load(f)
    else:
        import selective_search
        table = selective_search.load_proposals(path)
    gts, props, missing = [], [], 0
    for img in coco.loadImgs(coco.getImgIds()):
        keys = (img["file_name"], Path(img["file_name"]).name, str(img["id"]))
        hit = next((table[k] for k in keys if k in table), None)
        missing += hit is None
        props.append(np.asarray(hit if hit is not None else np.zeros((0, 4)), dtype=np.float64).reshape(-1, 4))
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]])) if not a.get("iscrowd", 0)]
        gts.append(np.array([xywh_to_xyxy(a["bbox"]) for a in anns], dtype=np.float64).reshape(-1, 4))
    if missing:
        warnings.warn(f"{path}: no proposals for {missing} of {len(props)} images (their objects count as missed)",
                      stacklevel=2)
    return gts, props


def _tables(metrics: dict) -> str:
    """The printed / markdown report: COCO AP, VOC mAP50, TIDE and AR tables."""
    models, out = metrics.get("models", {}), []
    for key, title in (("bbox", "COCO box AP (Table 1)"), ("segm", "COCO mask AP (Table 1)")):
        rows = [dict(model=n, **m[key]) for n, m in models.items() if key in m]
        if rows:
            out.append(f"### {title}\n\n" + markdown_table(rows, ("model",) + COCO_KEYS))
    rows = [{"model": n, "mAP50": m["voc"]["mAP"], "novel": m["voc"]["nAP"], "base": m["voc"]["bAP"]}
            for n, m in models.items()]
    if rows:
        out.append("### VOC mAP50 (Table 2)\n\n" + markdown_table(rows, ("model", "mAP50", "novel", "base")))
    for key in ("tide_bbox", "tide_segm"):
        rows = [dict(model=n, **{k: v for k, v in m[key].items() if k != "counts"}) for n, m in models.items()
                if key in m]
        if rows:
            out.append(f"### TIDE dAP50, {key[5:]} (Table 3)\n\n"
                       + markdown_table(rows, ("model", "AP50") + MAIN_ERRORS + SPECIAL_ERRORS))
    if "proposals" in metrics:
        ar = metrics["proposals"]
        out.append("### Proposal recall (class-agnostic)\n\n" + markdown_table([ar], tuple(ar)))
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate detections as in the ADePT paper: COCO box/mask AP (Table 1), "
                                "VOC mAP50 for novel/base/all classes (Table 2), TIDE error breakdown (Table 3, "
                                "Figure 1), class-agnostic proposal recall, side-by-side figures (Figures 2, 4-7).")
    p.add_argument("--gt", help="COCO annotation JSON (default: the embedded synthetic val split)")
    p.add_argument("--results", action="extend", nargs="+", default=[],
                   help="COCO results JSON, one per model (repeat or list several)")
    p.add_argument("--checkpoint", action="extend", nargs="+", default=[],
                   help="finetune.py model_final.pth file(s): predict on the split, then evaluate (Tables 1-3)")
    p.add_argument("--names", nargs="+", help="model names, one per --results (default: file stems)")
    p.add_argument("--images", help="image folder for the figures (default: the synthetic split's)")
    p.add_argument("--out", default="out/eval", help="folder for metrics.json, metrics.md and PNGs")
    p.add_argument("--novel", help="comma-separated novel category ids: VOC mAP50 novel / base (Table 2)")
    p.add_argument("--voc07", action="store_true", help="VOC07 11-point AP instead of the VOC2010+ area")
    p.add_argument("--proposals", help="proposals for AR@10/100/1000: .json {file_name: [[x1,y1,x2,y2],..]} best "
                   "first, or a selective_search.py file (unranked: read AR@k for k >= its box count)")
    p.add_argument("--figure-images", type=int, default=4, help="rows of the side-by-side figure")
    p.add_argument("--score-thresh", type=float, default=0.5, help="score threshold of the drawn detections")
    return p


def main(argv=None) -> dict:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not a.results and not a.proposals and not a.checkpoint:
        parser.error("give --checkpoint model_final.pth, --results R.json (one per model) or --proposals")
    gt_path, image_root = (Path(a.gt), None) if a.gt else _default_gt()
    image_root = Path(a.images) if a.images else image_root
    for ck, name in zip(a.checkpoint, checkpoint_names(a.checkpoint)):  # predict on the split, evaluate the file
        a.results.append(str(predict_checkpoint(ck, gt_path, image_root, Path(a.out), name)))
    names = a.names or [Path(r).stem for r in a.results]
    if len(names) != len(a.results) or len(set(names)) != len(names):
        parser.error(f"--names needs {len(a.results)} distinct names, got {names}")
    novel = [int(c) for c in a.novel.split(",")] if a.novel else None
    coco, models, loaded = load_coco(gt_path), {}, {}
    for name, path in zip(names, a.results):
        res = load_results(path)
        check_results(res, coco, path)
        loaded[name] = res
        m = {"bbox": coco_eval(coco, res), "voc": voc_map50(coco, res, novel_ids=novel, use_07_metric=a.voc07),
             "tide_bbox": tide(coco, res)}
        if res and all("segmentation" in r for r in res):
            m["segm"], m["tide_segm"] = coco_eval(coco, res, "segm"), tide(coco, res, "segm")
        models[name] = m
    metrics = {"gt": str(gt_path), "results": dict(zip(names, a.results)), "models": models}
    if a.proposals:
        metrics["proposals"] = proposal_recall(*_proposal_lists(coco, a.proposals))
    report = _tables(metrics)
    print(report)
    out = Path(a.out)
    write_metrics(metrics, out / "metrics.json")
    _atomic_write(out / "metrics.md", report)
    if models:
        comparison_figures(coco, loaded, {n: m["tide_bbox"] for n, m in models.items()}, image_root, out,
                           a.figure_images, a.score_thresh)
    print(f"wrote {out / 'metrics.json'}, {out / 'metrics.md'} and the PNGs under {out}")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
