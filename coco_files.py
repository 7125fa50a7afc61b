"""COCO files for evaluation: results files (atomic save, load) and the ground truth pycocotools scores against.

Serves paper 4.3-4.5 (Tables 1-3, Figure 1): the COCO results that eval.py scores (COCO AP, VOC mAP50, TIDE) and
the ground truth they are scored on, loaded and completed for COCOeval. Not the training data: coco_data.py loads
COCO splits for fine-tuning (its ``load_coco`` returns a CocoSet; this one a pycocotools COCO).

Results files hold a JSON list of COCO results: image_id, category_id, score and a bbox [x, y, w, h] and / or a
segmentation (RLE with str counts).

Public
------
- ``atomic_write(path, text) -> Path``: text to path through a temp file in the same folder and os.replace.
- ``save_results(results, path) -> Path`` (atomic), ``load_results(path) -> list`` (ValueError: not a JSON list);
  ``read_json(path)`` (ValueError naming the file when it is not valid JSON).
- ``load_coco(gt) -> COCO``: a path or a COCO, completed in place (iscrowd 0 and area w * h filled where missing,
  VOC's difficult objects made iscrowd 1, malformed polygons and boxes of width or height <= 0 dropped with a
  warning); FileNotFoundError / ValueError naming the file (and the entry: no bbox, an unknown category_id).
- ``gt_subset(coco, image_ids) -> COCO``: the ground truth cut to those images (categories kept).
- ``check_results(results, coco, source="<results>")``: ValueError naming source and the entry for an unknown image
  or category id, a non-finite score, a malformed bbox, or neither bbox nor segmentation.

Project-local dependencies: none (pycocotools only): the file can be copied alone. Used by eval.py, finetune.py,
study.py, study_cells.py and study_report.py.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

from pycocotools.coco import COCO


def atomic_write(path, text: str) -> Path:
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
    return atomic_write(path, json.dumps(results))


def read_json(path):
    """A JSON file -> its object; ValueError naming the file when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def load_results(path) -> list:
    """COCO results JSON (a list of dicts) -> list; ValueError naming the file if it is not a JSON list."""
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of COCO results, got {type(data).__name__}")
    return data


def load_coco(gt) -> COCO:
    """A COCO annotation path or a pycocotools COCO -> COCO (its loading messages silenced), completed for COCOeval
    in place (``_complete_gt``): iscrowd 0 and area w * h where missing, malformed polygons dropped."""
    if isinstance(gt, COCO):
        if _complete_gt(gt.dataset, "<ground truth>"):  # annotations dropped: index them again
            with contextlib.redirect_stdout(io.StringIO()):
                gt.createIndex()
        return gt
    if not Path(gt).is_file():
        raise FileNotFoundError(f"ground-truth annotations not found: {gt}")
    d = read_json(gt)
    if not isinstance(d, dict) or not all(isinstance(d.get(k, []), list) for k in ("images", "annotations")):
        raise ValueError(f"{gt}: not a COCO annotation file (an object with images, annotations, categories lists)")
    _complete_gt(d, gt)
    coco = COCO()
    coco.dataset = d
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _polygon_ok(p) -> bool:
    """A polygon pycocotools can rasterise: >= 3 (x, y) pairs of finite numbers (as coco_data checks them)."""
    return (isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in p))


def _complete_gt(d: dict, source) -> bool:
    """In place, what pycocotools needs of a ground truth: iscrowd 0 and area = box w * h where missing (COCOeval
    reads both; a VOC "difficult": 1 object becomes iscrowd 1, which COCOeval ignores), malformed polygons dropped
    (a warning counts them; an annotation left without one has no mask), boxes with a width or height <= 0 dropped
    (counted; fine-tuning skips them too). ValueError naming the entry for a missing bbox or a category_id that is
    not among the categories. Returns whether annotations were dropped."""
    cats = {c.get("id") for c in d.get("categories") or [] if isinstance(c, dict)}
    kept, dropped, degenerate = [], 0, 0
    for i, a in enumerate(d.get("annotations", [])):
        b = a.get("bbox") if isinstance(a, dict) else None
        if not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)):
            raise ValueError(f"{source}: annotations[{i}] has no bbox [x, y, w, h]: {str(a)[:120]}")
        if cats and a.get("category_id") not in cats:
            raise ValueError(f"{source}: annotations[{i}] has category_id {a.get('category_id')!r}, not among the "
                             f"categories {sorted(cats)[:20]}")
        if not (b[2] > 0 and b[3] > 0):
            degenerate += 1
            continue
        a.setdefault("iscrowd", 0)
        if a.get("difficult"):  # VOC's difficult objects (voc_data.voc_to_coco): ignored by the evaluation
            a["iscrowd"] = 1
        a.setdefault("area", float(b[2] * b[3]))
        seg = a.get("segmentation")
        if isinstance(seg, list) and not all(_polygon_ok(p) for p in seg):
            a["segmentation"] = [p for p in seg if _polygon_ok(p)]
            dropped += len(seg) - len(a["segmentation"])
        kept.append(a)
    if dropped:
        warnings.warn(f"{source}: {dropped} malformed ground-truth polygons dropped (fewer than 6 numbers, an odd "
                      "count or non-numbers)", stacklevel=3)
    if degenerate:
        d["annotations"] = kept
        warnings.warn(f"{source}: {degenerate} ground-truth boxes with a width or height <= 0 dropped (not "
                      "evaluated; fine-tuning skips them too)", stacklevel=3)
    return bool(degenerate)


def gt_subset(coco: COCO, image_ids) -> COCO:
    """The ground truth cut to image_ids (their images and annotations; categories kept)."""
    keep = set(image_ids)
    sub = COCO()
    sub.dataset = {**coco.dataset, "images": [im for im in coco.dataset["images"] if im["id"] in keep],
                   "annotations": [a for a in coco.dataset.get("annotations", []) if a["image_id"] in keep]}
    with contextlib.redirect_stdout(io.StringIO()):
        sub.createIndex()
    return sub


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
