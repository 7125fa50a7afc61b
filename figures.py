"""Qualitative and error-breakdown figures (paper 4.5.1 Figure 1; 4.5.3 Figures 2, 4-7), matplotlib Agg, PNG.

Figure 1 plots each model's TIDE dAPs as bars; Figures 2 and 4-7 show the same images with each model's detections
(boxes, masks, class names and scores) side by side, on images where the models disagree.

Symbols
-------
==========  ================================================================================================
dAP         TIDE's AP50 gained by fixing one error type (tide.py), percent
F1          agreement of two detection sets: 2 * (same-class matches at IoU >= 0.5) / (|a| + |b|)
cell_px     pixel side of one image panel; a figure of R images and M models is (R * cell_px) x (M * cell_px)
==========  ================================================================================================

Public (eval.py re-exports plot_tide, plot_side_by_side, pick_disagreement, results_by_image, comparison_figures)
-------------------------------------------------------------------------------------------------------------
- ``plot_tide(results_by_model, path, size_px=(960, 420), dpi=100, types=None) -> Path`` (types: the error types,
  default tide.py's MAIN_ERRORS + SPECIAL_ERRORS).
- ``plot_side_by_side(images, predictions_by_model, class_names, path, score_thresh=0.5, cell_px=320, dpi=100)``.
- ``pick_disagreement(predictions_by_model, n, gts=None, score_thresh=0.5, iou_thresh=0.5) -> list of indices``.
- ``results_by_image(results) -> {image_id: [results]}``; ``find_image(root, file_name) -> RGB uint8 or None``
  (None, with a warning naming the file, when it is unreadable).
- ``comparison_figures(coco, results_by_model, tide_by_model, image_root, out, n=4, score_thresh=0.5)``: the CLI's.
- ``plot_views(samples, path, cell_px=224, dpi=100) -> Path``: pre-training samples (V1, V2, V3 and their K boxes,
  section 4.1.2), one row each; ``python data.py --show N`` draws them.
- ``plot_training_log(log_path, path=None, dpi=100) -> Path``: a run's log.jsonl (train.py, finetune.py) as curves
  against the step: the losses in one panel, then lr, tau and images/s; train.py and finetune.py write it as
  curves.png beside the log at the end of a run, ``python figures.py LOG.jsonl [OUT.png]`` for a run in progress.
  ``read_log(log_path) -> list of records`` reads the log.

Project-local dependencies: tide.py, only for plot_tide's default error types (imported when plot_tide is called
without types); otherwise numpy, matplotlib, pycocotools and OpenCV (find_image): the file can be copied alone.
"""
from __future__ import annotations

import json
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np
from pycocotools import mask as mask_utils

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.patches import Rectangle  # noqa: E402


def _save(fig, path, dpi) -> Path:
    """Write fig as a PNG at dpi (pixel size = figure inches * dpi) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)
    return path


def plot_tide(results_by_model: dict, path, size_px=(960, 420), dpi=100, types=None) -> Path:
    """Figure 1: grouped bars of dAP per error type (x; default tide.py's MAIN_ERRORS + SPECIAL_ERRORS) for each
    model (one colour each). PNG of size_px (W, H)."""
    if types is None:
        from tide import MAIN_ERRORS, SPECIAL_ERRORS
        types = MAIN_ERRORS + SPECIAL_ERRORS
    names = list(results_by_model)
    width = 0.8 / max(len(names), 1)  # the group of bars fills 80% of each slot
    fig, ax = plt.subplots(figsize=(size_px[0] / dpi, size_px[1] / dpi), dpi=dpi)
    x = np.arange(len(types))
    for k, name in enumerate(names):
        vals = [float(results_by_model[name].get(t, 0.0)) for t in types]
        ax.bar(x + (k - (len(names) - 1) / 2) * width, vals, width, label=name)
    ax.set_xticks(x, types)
    ax.set_ylabel("dAP50 (TIDE)")
    ax.set_title("Error breakdown: AP50 gained by fixing each error type")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_views(samples: list, path, cell_px: int = 224, dpi: int = 100) -> Path:
    """Pre-training samples (4.1.2) as a grid, one row per sample: V1, V2, V3 (uint8 (3, S, S) RGB tensors under
    "v1".."v3") with their K boxes ("b1".."b3", (K, 4) xyxy view pixels); box k has the same colour in every view, so
    the boxes can be followed through crops and flips. Each panel is cell_px wide whatever the view's size."""
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(len(samples), 3, figsize=(3 * cell_px / dpi, len(samples) * cell_px / dpi), dpi=dpi,
                             squeeze=False)
    for row, sample in zip(axes, samples):
        for j, ax in enumerate(row, 1):
            view, boxes = sample[f"v{j}"], sample[f"b{j}"]
            ax.imshow(view.permute(1, 2, 0).numpy(), extent=(0, view.shape[2], view.shape[1], 0))
            for k, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=cmap(k % cmap.N),
                                       linewidth=1.5))
            ax.set_title(f"V{j} ({view.shape[2]} px)" + (f", image {sample['index']}" if j == 1 else ""),
                         fontsize="small")
            ax.axis("off")
    fig.tight_layout()
    return _save(fig, path, dpi)


def read_log(log_path) -> list[dict]:
    """The records of a log.jsonl; a line that is not a JSON object (a run killed mid-write) is skipped with a
    warning naming the file and the line. ValueError (naming the file) when no record is left."""
    records, bad = [], []
    for n, line in enumerate(Path(log_path).read_text().splitlines(), 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
            records.append(rec)
        elif line.strip():
            bad.append(n)
    if bad:
        warnings.warn(f"{log_path}: skipped {len(bad)} unreadable line(s), first line {bad[0]}", stacklevel=2)
    if not records:
        raise ValueError(f"{log_path}: no log record with a 'step' (is it a train.py / finetune.py log.jsonl?)")
    return records


def plot_training_log(log_path, path=None, dpi: int = 100) -> Path:
    """Training curves of a log.jsonl against its "step": one panel for every key starting with "loss" (train.py:
    loss = L_RPN + L_det, loss_rpn, loss_det; finetune.py: the detector's losses), then one each for lr, tau
    (pre-training's EMA momentum) and images_per_s where the log has them. path: default curves.png beside the log.
    Returns the PNG's path."""
    records = read_log(log_path)
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    keys = [k for k in dict.fromkeys(k for r in records for k in r) if any(number(r.get(k)) for r in records)]
    panels = [[k for k in keys if k.startswith("loss")]] + [[k] for k in ("lr", "tau", "images_per_s") if k in keys]
    panels = [p for p in panels if p]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.4 * len(panels)), dpi=dpi, sharex=True, squeeze=False)
    for ax, names in zip(axes[:, 0], panels):
        for k in names:
            pts = [(r["step"], r[k]) for r in records if number(r.get(k))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, linewidth=1.2)
        ax.set_ylabel(names[0] if len(names) == 1 else "loss")
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize="small")
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title(str(log_path), fontsize="small")
    fig.tight_layout()
    return _save(fig, Path(log_path).with_name("curves.png") if path is None else path, dpi)


def results_by_image(results: list) -> dict:
    """COCO results -> {image_id: [results of that image]}."""
    out = defaultdict(list)
    for r in results:
        out[r["image_id"]].append(r)
    return dict(out)


def _f1(a: list, b: list, iou_thresh=0.5) -> float:
    """Agreement of two detection sets (COCO dicts): 2 * same-class matches at IoU >= t / (|a| + |b|); 1 if empty."""
    if not a and not b:
        return 1.0
    if not a or not b:
        return 0.0
    same = np.array([x["category_id"] for x in a])[:, None] == np.array([y["category_id"] for y in b])[None, :]
    iou = np.asarray(mask_utils.iou([x["bbox"] for x in a], [y["bbox"] for y in b], [0] * len(b))) * same
    matches = 0
    for i in range(len(a)):
        j = int(np.argmax(iou[i]))
        if iou[i, j] >= iou_thresh:
            matches, iou[:, j] = matches + 1, 0
    return 2 * matches / (len(a) + len(b))


def pick_disagreement(predictions_by_model: dict, n: int, gts=None, score_thresh=0.5, iou_thresh=0.5) -> list:
    """Indices of the n images on which the models differ most.

    predictions_by_model: name -> per image a list of COCO result dicts. With gts (per image a list of COCO
    annotations) the disagreement is the spread (max - min) of the models' F1 against the gts; without, it is the
    mean over model pairs of 1 - F1 between their detections (score >= score_thresh). Ties keep image order.
    """
    preds = [[[r for r in im if r["score"] >= score_thresh] for im in p] for p in predictions_by_model.values()]
    n_img = len(preds[0]) if preds else 0
    score = np.zeros(n_img)
    for i in range(n_img):
        if gts is not None:
            f = [_f1(p[i], [g for g in gts[i] if not g.get("iscrowd", 0)], iou_thresh) for p in preds]
            score[i] = max(f) - min(f)
        else:
            pairs = [(a, b) for a in range(len(preds)) for b in range(a + 1, len(preds))]
            score[i] = np.mean([1 - _f1(preds[a][i], preds[b][i], iou_thresh) for a, b in pairs]) if pairs else 0
    return np.argsort(-score, kind="stable")[:n].tolist()


def _draw(ax, image, preds, class_names, score_thresh, cmap):
    """Draw an image with its detections (boxes, masks, 'name score') on a matplotlib axis."""
    ax.imshow(image)
    overlay = np.zeros(image.shape[:2] + (4,))  # (H, W, RGBA) mask layer
    for r in sorted((r for r in preds if r["score"] >= score_thresh), key=lambda r: r["score"]):
        color = cmap(r["category_id"] % cmap.N)
        if "segmentation" in r and isinstance(r["segmentation"], dict):
            m = mask_utils.decode(r["segmentation"]).astype(bool)  # (H, W)
            overlay[m] = (*color[:3], 0.45)  # alpha of the mask tint
        x, y, w, h = r["bbox"]
        ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=color, linewidth=1.5))
        ax.text(x, y, f"{class_names.get(r['category_id'], r['category_id'])} {r['score']:.2f}", fontsize=7,
                color="white", va="bottom", bbox={"facecolor": color, "alpha": 0.8, "pad": 1, "edgecolor": "none"})
    ax.imshow(overlay)
    ax.set_axis_off()


def plot_side_by_side(images, predictions_by_model: dict, class_names: dict, path, score_thresh=0.5, cell_px=320,
                      dpi=100) -> Path:
    """Figures 2, 4-7: one row per image, one column per model. PNG of (rows * cell_px) x (cols * cell_px) pixels.

    images: list of uint8 (H, W, 3) RGB arrays; predictions_by_model: name -> per image a list of COCO result dicts
    (boxes [x, y, w, h], optional RLE masks); class_names: {category_id: name}.
    """
    names, rows = list(predictions_by_model), len(images)
    fig, axes = plt.subplots(rows, len(names), figsize=(len(names) * cell_px / dpi, rows * cell_px / dpi), dpi=dpi,
                             squeeze=False)
    cmap = plt.get_cmap("tab10")
    for i, image in enumerate(images):
        for k, name in enumerate(names):
            _draw(axes[i, k], np.asarray(image), predictions_by_model[name][i], class_names, score_thresh, cmap)
            if i == 0:
                axes[i, k].set_title(name, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.08 / rows, wspace=0.02, hspace=0.02)
    return _save(fig, path, dpi)


def find_image(root, file_name: str):
    """RGB uint8 (H, W, 3) of root/file_name (else root/val/file_name, else root/base name); None if absent, or
    unreadable (corrupt, truncated: a warning names the file)."""
    import cv2
    for p in (Path(root) / file_name, Path(root) / "val" / file_name, Path(root) / Path(file_name).name):
        if p.is_file():
            try:
                img = cv2.imdecode(np.fromfile(str(p), dtype=np.uint8), cv2.IMREAD_COLOR)
            except (OSError, cv2.error):
                img = None
            if img is None:
                warnings.warn(f"{p}: not a decodable image (empty, corrupt or truncated): left out of the figure",
                              stacklevel=2)
                return None
            return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return None


def comparison_figures(coco, results_by_model: dict, tide_by_model: dict, image_root, out, n=4, score_thresh=0.5):
    """The CLI's figures: out/tide.png (Figure 1) and out/side_by_side.png of the n images the models dispute most
    (the first n with one model). coco: pycocotools COCO; results_by_model: name -> validated COCO results."""
    out = Path(out)
    plot_tide(tide_by_model, out / "tide.png")
    if image_root is None:
        return
    imgs = coco.loadImgs(coco.getImgIds())
    by_image = {name: results_by_image(r) for name, r in results_by_model.items()}
    preds = {name: [d.get(i["id"], []) for i in imgs] for name, d in by_image.items()}
    gts = [coco.loadAnns(coco.getAnnIds(imgIds=[i["id"]])) for i in imgs]
    order = pick_disagreement(preds, len(imgs), gts, score_thresh) if len(preds) > 1 else range(len(imgs))
    pics = []
    for k in order:  # read only the images that will be drawn
        image = find_image(image_root, imgs[k]["file_name"])
        if image is not None:
            pics.append((k, image))
        if len(pics) == n:
            break
    if not pics:
        warnings.warn(f"no image of the ground truth found under {image_root}: no side-by-side figure", stacklevel=2)
        return
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    plot_side_by_side([im for _, im in pics], {m: [p[k] for k, _ in pics] for m, p in preds.items()}, names,
                      out / "side_by_side.png", score_thresh)


if __name__ == "__main__":  # python figures.py LOG.jsonl [OUT.png]: the curves of a run, also while it runs
    if len(sys.argv) not in (2, 3) or sys.argv[1] in ("-h", "--help"):
        sys.exit("usage: python figures.py LOG.jsonl [OUT.png]   the training curves of a train.py / finetune.py run "
                 "(default OUT: curves.png beside the log)")
    print(plot_training_log(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else None))
