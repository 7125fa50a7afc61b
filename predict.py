"""Predictions: run a detector over a COCO split and turn its outputs into COCO results (paper 4.3-4.5).

Sections
--------
- 4.3, 4.4, Tables 1-2: the val predictions that eval.py scores (COCO AP, VOC mAP50) and finetune.py's evaluation
  writes to predictions.json -- ``predict``, ``detections_to_coco``.
- 4.5.1, Table 3, Figure 1 and 4.5.3, Figures 2, 4-7: the predictions behind eval.py's TIDE breakdown and
  side-by-side figures, from fine-tuned checkpoints (``eval.py --checkpoint``) -- ``checkpoint_predictions``.

Boxes: model outputs are xyxy pixels (contract), results COCO's [x, y, w, h]. Masks in results are RLEs with str
counts (JSON-ready).

Public
------
- ``predict(model, dataset, device="cpu", score_thresh=0.05, cat_ids=None, mask_thresh=0.5, progress=True)``
  -> ``Predictions``: a list of COCO result dicts that also holds ``image_ids`` (the images predicted) and ``skipped``
  ({image_id: file name} of unreadable images, never evaluated); ``detections_to_coco(output, image_id, cat_ids,
  score_thresh, mask_thresh)``.
- ``Predictions(results=(), image_ids=(), skipped=None)``: eval.py's coco_eval, voc_map50 and tide evaluate the
  predicted images only (the ground truth is cut to them), so an unreadable val image is left out instead of
  counting as missed.
- ``checkpoint_predictions(path, gt_path, image_root, image_ids=None)`` -> Predictions of a finetune.py
  model_final.pth on a split, on the images image_ids only when given (ValueError naming both files when the
  checkpoint's categories are not the ground truth's); ``checkpoint_model(path, gt_path, image_root)`` -> (Detector,
  CocoSet), the checked model and split it predicts with; ``predict_split(det, val, image_ids=None, device=None)``
  -> Predictions (finetune.py's evaluate too);
  ``checkpoint_names(paths)``: a distinct name per checkpoint (its results file's stem).
Results files are written and read by coco_files.py (``save_results``, ``load_results``) and eval.py
(``predict_checkpoint``).

Project-local dependencies: coco_data.py, detector.py and model.py (the checkpoint functions only, imported there);
none at load. Used by eval.py (--checkpoint; eval.py imports this file, never the reverse), finetune.py (evaluate) and
study_cells.py.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from tqdm import tqdm


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


class Predictions(list):
    """predict's COCO results (a list, JSON-ready as such) with image_ids: the images predicted, and skipped:
    {image_id: file name} of the items without an image (unreadable). coco_eval, voc_map50 and tide evaluate the
    predicted images only; saved to a file (save_results) they are a plain results list again."""

    def __init__(self, results=(), image_ids=(), skipped=None):
        super().__init__(results)
        self.image_ids, self.skipped = list(image_ids), dict(skipped or {})


@torch.no_grad()
def predict(model, dataset, device="cpu", score_thresh=0.05, cat_ids=None, mask_thresh=0.5,
            progress=True) -> Predictions:
    """Run a detector on (image, target) items -> COCO results (with a tqdm bar) as Predictions.

    Items: image float (3, H, W) in [0, 1] (uint8 is divided by 255) and target a dict with "image_id" or the id.
    An item whose image is None (coco_data.DetectionDataset in eval mode: unreadable file) is skipped and recorded
    in .skipped, never predicted. The model follows torchvision's convention (model.eval(); model([img]) -> [dict]);
    its mode is restored.
    """
    was_training = model.training
    model.eval().to(device)
    results = Predictions()
    total = len(dataset) if hasattr(dataset, "__len__") else None
    for image, target in tqdm(dataset, total=total, desc="predict", disable=not progress):
        image_id = target["image_id"] if isinstance(target, dict) else target
        image_id = int(image_id.item()) if torch.is_tensor(image_id) else image_id
        if image is None:
            results.skipped[image_id] = target.get("file_name", str(image_id)) if isinstance(target, dict) else ""
            continue
        results.image_ids.append(image_id)
        img = image.float() / 255 if image.dtype == torch.uint8 else image.float()  # (3, H, W) in [0, 1]
        (output,) = model([img.to(device)])
        results += detections_to_coco(output, image_id, cat_ids, score_thresh, mask_thresh)
    model.train(was_training)
    if results.skipped:
        warnings.warn(f"predict: {len(results.skipped)} unreadable images skipped, left out of the evaluation: "
                      f"{sorted(map(str, results.skipped.values()))[:5]}", stacklevel=3)  # 3: past no_grad
    return results


# ---------------- Checkpoints (eval.py --checkpoint) --------------------------------------------------------------
def checkpoint_names(paths) -> list[str]:
    """A distinct name per checkpoint: its run folder for a model_final.pth, else the file stem; _i on a clash."""
    base = [Path(p).resolve().parent.name if Path(p).name == "model_final.pth" else Path(p).stem for p in paths]
    return [b if base.count(b) == 1 else f"{b}_{i}" for i, b in enumerate(base)]


def checkpoint_predictions(path, gt_path, image_root, image_ids=None) -> Predictions:
    """finetune.py's model_final.pth -> its Predictions on the split gt_path (images under image_root, or
    image_root/val: the synthetic layout), on image_ids only when given (ValueError naming ids not in the split).
    Reading errors: see checkpoint_model."""
    return predict_split(*checkpoint_model(path, gt_path, image_root), image_ids)


def predict_split(det, val, image_ids=None, device=None) -> Predictions:
    """A Detector's Predictions on a coco_data.CocoSet (on image_ids only when given; ValueError naming ids not in
    the split), on `device` (default: the GPU when there is one)."""
    import coco_data
    unknown = sorted(set(image_ids or ()) - set(val.images))
    if unknown:
        raise ValueError(f"{val.path}: image ids {unknown[:5]} are not in the split")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dataset = coco_data.DetectionDataset(val, train=False, keep=image_ids)
    return predict(det.to(device), dataset, device=device, cat_ids=val.cat_ids)


def checkpoint_model(path, gt_path, image_root):
    """finetune.py's model_final.pth and the split it is evaluated on -> (Detector, coco_data.CocoSet), the images
    under image_root or image_root/val (the synthetic layout). ValueError naming both files when the checkpoint's
    categories differ from the ground truth's, or for a split without images; FileNotFoundError for missing images.
    Loaded with weights_only=True: never runs code."""
    import coco_data
    import model as model_lib
    from detector import Detector, DetectorConfig
    if image_root is None:
        raise ValueError(f"{path}: give --images, the image folder of {gt_path}")
    ck = model_lib.load_weights(path, "finetune.py model_final.pth")
    if "state_dict" not in ck or "config" not in ck:
        raise ValueError(f"{path}: not a finetune.py model_final.pth (needs 'state_dict' and 'config')")
    d = json.loads(Path(gt_path).read_text())
    if not isinstance(d, dict) or not d.get("images"):
        raise ValueError(f"{gt_path}: the ground truth has no images: nothing to predict or evaluate")
    first = d["images"][0].get("file_name", "") if isinstance(d["images"][0], dict) else ""
    root = Path(image_root)
    root = root if (root / first).exists() else root / "val"  # the synthetic layout: <root>/val
    val = coco_data.load_coco(gt_path, root)
    _check_categories(ck, val, path)
    det = Detector(DetectorConfig(**ck["config"]))
    det.load_state_dict(ck["state_dict"])
    return det, val


def _check_categories(ck: dict, val, path) -> None:
    """ValueError naming the checkpoint and the ground truth when their categories differ (ids or names; without
    saved cat_ids, the class count): the predictions would be filed under the wrong categories."""
    ids, names, n = ck.get("cat_ids"), ck.get("names"), ck["config"].get("num_classes")
    theirs = list(zip(val.cat_ids, val.names))
    if ids is None:
        if n is not None and n != len(val.cat_ids):
            raise ValueError(f"{path}: the checkpoint has {n} classes, {val.path} has {len(val.cat_ids)} categories "
                             f"{theirs}")
        return
    if list(ids) != val.cat_ids or (names is not None and list(names) != val.names):
        mine = list(zip(ids, names)) if names is not None else list(ids)
        raise ValueError(f"{path}: the checkpoint's categories (id, name) {mine} differ from those of {val.path}: "
                         f"{theirs}; evaluate it on the categories it was fine-tuned on")


if __name__ == "__main__":  # a library: its command line is eval.py's
    sys.exit("predict.py has no command line: `python eval.py --checkpoint model_final.pth [--gt VAL.json --images "
             "DIR]` predicts and evaluates (or import predict and call predict(model, dataset))")
