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
- ``coco_eval(gt, results, iou_type="bbox") -> dict``; ``voc_ap(recall, precision, use_07_metric=False) -> float``;
  ``voc_map50(gt, results, class_ids=None, novel_ids=None, use_07_metric=False, iou_thresh=0.5, plus_one=False)
  -> dict``.
- ``tide(gt, results, iou_type="bbox", fg_iou=0.5, bg_iou=0.1) -> dict``; ``plot_tide(results_by_model, path)``.
- ``proposal_recall(gt_boxes, proposals, max_dets=(10, 100, 1000)) -> dict``.
- from figures.py: ``plot_side_by_side(images, predictions_by_model, class_names, path, score_thresh=0.5)``,
  ``pick_disagreement(predictions_by_model, n, gts=None, score_thresh=0.5)``, ``results_by_image(results)``.
- ``predict_checkpoint(path, gt_path, image_root, out, name=None)``: a model_final.pth's predictions
  (predict.checkpoint_predictions) saved to out/<name>.json, one distinct results file per checkpoint
  (predict.checkpoint_names).
- ``markdown_table(rows, columns) -> str``; ``write_metrics(metrics, path)`` (atomic JSON, NaN -> null).
- ``build_parser() -> argparse.ArgumentParser``: the command line of ``main(argv=None) -> dict`` (--gt, --results,
  --checkpoint, --proposals, ...; ``--val-limit N`` evaluates on the first N ground-truth images by id only).
VOC AP and proposal recall are computed in box_metrics.py (numpy only) and re-exported here. Results files
(``save_results``, ``load_results``), the ground truth (``load_coco``) and ``check_results`` are in coco_files.py.

Results come from predict.py (``predict``, ``checkpoint_predictions``) or from results files. Results that know
their images (predict.py's ``Predictions``) are evaluated on those images only (the ground truth is cut to them), so
an unreadable val image is left out instead of counting as missed; coco_eval adds ``skipped_images`` and
``skipped_files``. Mask AP needs a mask on every ground truth: where one has none (or pycocotools fails on them)
coco_eval(iou_type="segm") warns and returns NaN with the reason under "skipped": box metrics never depend on it.
Empty results evaluate as COCOeval would: AP 0 where the ground truth has objects, NaN where it has none; a ground
truth without images raises ValueError.

Project-local dependencies: box_metrics.py, coco_files.py, figures.py, predict.py, runtime.py, tide.py, voc_data.py
(at load); through predict.py, coco_data.py, detector.py and model.py (--checkpoint only); data.py (the default
synthetic split only), ss_proposals.py (--proposals .npz only).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import box_metrics
from coco_files import atomic_write, check_results, gt_subset, load_coco, load_results, read_json, save_results
from box_metrics import COCO_IOUS, proposal_recall, voc_ap, xywh_to_xyxy  # noqa: F401 (re-exported)
from figures import comparison_figures, pick_disagreement, plot_side_by_side, plot_tide, results_by_image  # noqa: F401
from predict import checkpoint_model, checkpoint_names, checkpoint_predictions, predict_split  # --checkpoint
from runtime import bad_input_exits, positive_int
from tide import MAIN_ERRORS, SPECIAL_ERRORS, tide_errors
from voc_data import novel_ids  # --novel

COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


# ---------------- Inputs (files and checks in coco_files.py) ------------------------------------------------------
def _results(gt, results):
    """(gt, results path or list) -> (COCO, validated list). The COCO is cut to the predicted images when results
    know them (Predictions.image_ids); ValueError for a ground truth without images or nothing predicted. Empty
    results warn (AP then reads 0, NaN where the ground truth has no objects)."""
    coco, source = load_coco(gt), str(results) if isinstance(results, (str, Path)) else "<results>"
    if not coco.getImgIds():
        raise ValueError(f"{gt if isinstance(gt, (str, Path)) else '<ground truth>'}: the ground truth has no "
                         "images: nothing to evaluate")
    results = load_results(results) if isinstance(results, (str, Path)) else results
    check_results(results, coco, source)
    ids = getattr(results, "image_ids", None)
    if ids is not None and set(ids) != set(coco.getImgIds()):
        if not ids:
            raise ValueError(f"{source}: no image was predicted ({len(results.skipped)} unreadable): nothing to "
                             "evaluate")
        coco = gt_subset(coco, ids)
    if not results:
        warnings.warn(f"{source}: no predictions; AP is 0 (NaN where the ground truth has no such objects)",
                      stacklevel=3)
    return coco, results


# ---------------- COCO AP (Table 1) and TIDE (Table 3) ------------------------------------------------------------
def coco_eval(gt, results, iou_type="bbox") -> dict:
    """COCOeval AP, AP50, AP75, APs, APm, APl in percent (NaN where COCOeval has no gt, e.g. no small objects).

    gt: annotation path or COCO; results: list, Predictions or path. iou_type "segm" drops the boxes of the results,
    so that areas come from the masks (as detectron2 does); without a usable mask on every ground truth (or when
    pycocotools fails on them) it warns and returns NaN with the reason under "skipped". Empty results: 0 where the
    ground truth has objects, NaN elsewhere, with a warning. Predictions with skipped (unreadable) images add
    skipped_images (count) and skipped_files (names); only the predicted images are evaluated.
    """
    coco, res = _results(gt, results)
    skipped = getattr(results, "skipped", None)
    extra = {"skipped_images": len(skipped), "skipped_files": sorted(map(str, skipped.values()))} if skipped else {}
    if iou_type != "segm":
        return {**_cocoeval_stats(coco, res, iou_type), **extra}
    if any("segmentation" not in r for r in res):
        raise ValueError("coco_eval(iou_type='segm'): some results have no segmentation")
    res = [{k: v for k, v in r.items() if k != "bbox"} for r in res]
    problem = _segm_problem(coco)
    if problem is None:
        try:
            return {**_cocoeval_stats(coco, res, iou_type), **extra}
        except Exception as e:  # pycocotools' failure on odd masks must not cost the box metrics
            problem = f"pycocotools failed on the masks: {type(e).__name__}: {e}"
    gt_name = gt if isinstance(gt, (str, Path)) else "<ground truth>"
    warnings.warn(f"{gt_name}: mask AP skipped: {problem}", stacklevel=2)
    return {**{k: float("nan") for k in COCO_KEYS}, "skipped": problem, **extra}


def _cocoeval_stats(coco: COCO, res: list, iou_type: str) -> dict:
    """COCOeval's first six stats in percent (-1 -> NaN); no results: every detection set empty (AP 0 or NaN)."""
    res = [dict(r) for r in res]  # loadRes adds keys: keep the caller's dicts intact
    with contextlib.redirect_stdout(io.StringIO()):
        if res:
            dt = coco.loadRes(res)
        else:  # loadRes rejects an empty list: an empty detection set over the same images and categories
            dt = COCO()
            dt.dataset = {"images": coco.dataset["images"], "categories": coco.dataset.get("categories", []),
                          "annotations": []}
            dt.createIndex()
        E = COCOeval(coco, dt, iou_type)
        E.evaluate()
        E.accumulate()
        E.summarize()
    return {k: float(v) * 100 if v >= 0 else float("nan") for k, v in zip(COCO_KEYS, E.stats[:6])}


def _segm_problem(coco: COCO) -> str | None:
    """Why COCO mask AP cannot be computed on this ground truth (an annotation without a mask, an RLE not of its
    image's size: pycocotools needs every ground truth's mask), None when it can."""
    anns = coco.dataset.get("annotations", [])
    missing = [a.get("id") for a in anns if not a.get("segmentation")]
    if missing:
        return (f"{len(missing)} of {len(anns)} ground-truth annotations have no segmentation (e.g. ids "
                f"{missing[:5]}): the split has no masks to evaluate")
    for a in anns:
        seg, im = a["segmentation"], coco.imgs.get(a["image_id"], {})
        if isinstance(seg, dict) and list(seg.get("size", [])) != [im.get("height"), im.get("width")]:
            return f"annotation {a.get('id')}: RLE size {seg.get('size')} is not its image's [height, width]"
    return None


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
    return atomic_write(path, json.dumps(_json_safe(metrics), indent=2) + "\n")


# ---------------- Command line ------------------------------------------------------------------------------------
def _default_gt():
    """The embedded synthetic val split: (annotations path, image root). data.py is imported only here."""
    import data
    root = Path(data.ensure_synthetic_dataset())
    return root / "annotations" / "val.json", root


def predict_checkpoint(path, gt_path, image_root, out: Path, name: str | None = None) -> Path:
    """finetune.py's model_final.pth -> predictions on the split (COCO results JSON out/<name>.json; name defaults
    to checkpoint_names); see checkpoint_predictions."""
    results = checkpoint_predictions(path, gt_path, image_root)
    return save_results(results, out / f"{name or checkpoint_names([path])[0]}.json")


def _proposal_lists(coco: COCO, path):
    """(gt boxes, proposals) per gt image from a .json {file_name or image id: [[x1, y1, x2, y2], ...]} or a
    selective_search.py proposals file (keys: paths relative to the image root)."""
    if str(path).endswith(".json"):
        table = read_json(path)
    else:
        import ss_proposals
        table = ss_proposals.load_proposals(path)
    gts, props, missing = [], [], 0
    for img in coco.loadImgs(coco.getImgIds()):
        keys = (img["file_name"], Path(img["file_name"]).name, str(img["id"]))
        hit = next((table[k] for k in keys if k in table), None)
        missing += hit is None
        try:
            props.append(np.asarray(hit if hit is not None else np.zeros((0, 4)), dtype=np.float64).reshape(-1, 4))
        except (ValueError, TypeError):
            raise ValueError(f"{path}: the proposals of {img['file_name']} are not [[x1, y1, x2, y2], ...]") from None
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
        out.append(f"### VOC mAP50 (Table 2), {metrics.get('voc_metric', '11-point (VOC07)')} AP\n\n"
                   + markdown_table(rows, ("model", "mAP50", "novel", "base")))
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


def _model_metrics(coco: COCO, res: list, novel, voc07: bool) -> dict:
    """One model's metrics: box AP, VOC mAP50, TIDE; mask AP and mask TIDE when every result has a mask (when the
    ground truth has no masks, segm holds NaN and the reason under "skipped", and mask TIDE is left out)."""
    m = {"bbox": coco_eval(coco, res), "voc": voc_map50(coco, res, novel_ids=novel, use_07_metric=voc07),
         "tide_bbox": tide(coco, res)}
    if res and all("segmentation" in r for r in res):
        m["segm"] = coco_eval(coco, res, "segm")
        if "skipped" not in m["segm"]:
            m["tide_segm"] = tide(coco, res, "segm")
    return m


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate detections as in the ADePT paper: COCO box/mask AP (Table 1), "
                                "VOC mAP50 for novel/base/all classes (Table 2), TIDE error breakdown (Table 3, "
                                "Figure 1), class-agnostic proposal recall, side-by-side figures (Figures 2, 4-7).")
    p.add_argument("--gt", help="COCO annotation JSON (default: the embedded synthetic val split)")
    p.add_argument("--results", action="extend", nargs="+", default=[],
                   help="COCO results JSON, one per model (repeat or list several)")
    p.add_argument("--checkpoint", action="extend", nargs="+", default=[],
                   help="finetune.py model_final.pth file(s): predict on the split, then evaluate (Tables 1-3)")
    p.add_argument("--names", nargs="+", help="model names, one per --results / --checkpoint (default: a results "
                                              "file's stem, a checkpoint's folder name)")
    p.add_argument("--images", help="image folder for the figures (default: the synthetic split's)")
    p.add_argument("--out", default="out/eval", help="folder for metrics.json, metrics.md and PNGs")
    p.add_argument("--novel", help="novel category ids '1,2,3' or voc1 / voc2 / voc3 (TFA's VOC splits): VOC mAP50 "
                                   "novel / base (Table 2)")
    p.add_argument("--voc07", action=argparse.BooleanOptionalAction, default=True,
                   help="VOC mAP50's AP: VOC07's 11-point (default: Table 2's test07, as TFA and finetune.py) or, with "
                        "--no-voc07, the VOC2010+ area")
    p.add_argument("--proposals", help="proposals for AR@10/100/1000: .json {file_name: [[x1,y1,x2,y2],..]} best "
                   "first, or a selective_search.py file (unranked: read AR@k for k >= its box count)")
    p.add_argument("--val-limit", type=positive_int, help="evaluate on the first N images (by id) of the ground "
                   "truth only, for a quick check (as finetune.py --val-limit); other images' predictions are ignored")
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
    with bad_input_exits():  # a missing or malformed ground truth: one line naming it
        coco, models, loaded, novel = load_coco(gt_path), {}, {}, None
    if a.novel:  # checked before any prediction: ids of the ground truth's categories, or voc1..voc3 on VOC
        cats = coco.loadCats(coco.getCatIds())
        try:
            novel = novel_ids(a.novel, [c["id"] for c in cats], [c.get("name") for c in cats])
        except ValueError as e:
            parser.error(f"--novel {e}")
    keep = sorted(coco.getImgIds())[:a.val_limit]  # all without --val-limit
    full, coco = coco, gt_subset(coco, keep) if a.val_limit else coco
    kept = set(keep) if a.val_limit else None  # the image ids evaluated, when cut
    predicted = {}  # results path -> Predictions (they know the images predicted and the unreadable ones)
    for ck, name in zip(a.checkpoint, checkpoint_names(a.checkpoint)):  # predict on the split, evaluate the file
        try:
            det, val = checkpoint_model(ck, gt_path, image_root)
        except (ValueError, FileNotFoundError) as e:  # an unreadable or foreign file, other categories, no images
            raise SystemExit(f"--checkpoint: {e}") from None
        preds = predict_split(det, val, keep if kept else None)
        a.results.append(str(save_results(preds, Path(a.out) / f"{name}.json")))
        predicted[a.results[-1]] = preds
    names = a.names or [Path(r).stem for r in a.results]
    if len(names) != len(a.results) or len(set(names)) != len(names):
        parser.error(f"--names needs {len(a.results)} distinct names, got {names}")
    for name, path in zip(names, a.results):
        with bad_input_exits():  # a malformed results file: one line naming it
            res = predicted[path] if path in predicted else load_results(path)
            check_results(res, full, path)  # on the whole ground truth: a file of another split is refused
        if kept and path not in predicted:
            res = [r for r in res if r["image_id"] in kept]
        loaded[name] = res
        models[name] = _model_metrics(coco, res, novel, a.voc07)
    metrics = {"gt": str(gt_path), "results": dict(zip(names, a.results)), "models": models, "images": len(keep),
               "voc_metric": "11-point (VOC07)" if a.voc07 else "area (VOC2010+)"}
    if a.proposals:
        with bad_input_exits():
            lists = _proposal_lists(coco, a.proposals)
        metrics["proposals"] = proposal_recall(*lists)
    report = _tables(metrics)
    print(report)
    out = Path(a.out)
    write_metrics(metrics, out / "metrics.json")
    atomic_write(out / "metrics.md", report)
    if models:
        comparison_figures(coco, loaded, {n: m["tide_bbox"] for n, m in models.items()}, image_root, out,
                           a.figure_images, a.score_thresh)
    if models and image_root is None:
        print("note: no side_by_side.png: give --images, the image folder of --gt")
    print(f"wrote {out / 'metrics.json'}, {out / 'metrics.md'} and the PNGs under {out}")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
