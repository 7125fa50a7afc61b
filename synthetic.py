"""The embedded default dataset: synthetic shape scenes with exact boxes, masks and labels as COCO JSON (issues 3, 6).

Not a paper section: the paper pre-trains on ImageNet and fine-tunes on COCO (sections 4.2, 4.3). This module makes a
CPU-sized stand-in that needs no download, so that every script has a default and the label-efficiency question of
section 1 (Q1-Q3) can be asked on 2 CPU cores. Everything is drawn with numpy (seeded) and OpenCV.

A scene: a cluttered background (two-colour gradient, low-frequency colour noise, lines, curves and irregular blobs
that belong to no class), then 1-6 objects of CLASSES (distinct shapes, random rotation, colour and texture: solid,
stripes, noise or gradient), side from MIN_SIDE px to MAX_FRAC of the short image side (log-uniform: many small,
few large), drawn in order so that later objects occlude earlier ones. A placement that would leave an earlier object
with less than MIN_VISIBLE of its pixels (or the new one with fewer than MIN_AREA visible pixels) is rejected and
redrawn, so no object in the image is almost fully occluded and every visible object pixel is annotated.
Boxes and areas come from the visible masks, so they are exact.

Layout under the root (default ./.cache/synth, ignored by git), identical for the same seed and counts:
    unlabelled/dNN/NNNNNN.png      the pre-training pool (nested folders like ImageNet's train layout; no labels kept)
    train/NNNNNN.png, val/NNNNNN.png + annotations/{train,val}.json (COCO: bbox [x, y, w, h], area, iscrowd 0,
                                   segmentation as RLE, category_id 1..C; file_name relative to the split folder)
    meta.json                      generator version and parameters: a changed generator or parameter regenerates
The three splits use disjoint random streams, so val images are never seen by pre-training or fine-tuning.

Symbols
    H, W       image height, width (px), each drawn in SIZE_RANGE
    s          object side (px) before rotation
    C          number of classes, len(CLASSES)

Public
    CLASSES
    synthetic_scene(rng, size=(H, W)) -> (image uint8 (H, W, 3) RGB, [(visible mask bool (H, W), class id 1..C)])
    ensure_synthetic_dataset(root=None, seed=0, n_unlabelled=2000, n_train=400, n_val=200, ...) -> Path
"""
from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

GENERATOR_VERSION = 1  # bump when the drawing changes: cached datasets with another version are regenerated
CLASSES = ("circle", "rectangle", "triangle", "star", "cross", "ring")
DEFAULT_ROOT = Path(__file__).resolve().parent / ".cache" / "synth"
SIZE_RANGE = (128, 160)  # image sides in px: CPU-sized, varied aspect ratios like real photos
MIN_SIDE = 8  # smallest object side (px): a few pixels on the stride-4 P2 map
MAX_FRAC = 0.6  # largest object side as a fraction of the short image side
MAX_OBJECTS = 6
MIN_VISIBLE = 0.3  # an object keeps at least 30% of its pixels visible under later ones
MIN_AREA = 16  # visible pixels an object needs to be annotated at all (a 4x4 patch)
SUB = 4  # cv2 fixed-point bits for sub-pixel vertices (coordinates x 16)
SPLITS = {"unlabelled": 0, "train": 1, "val": 2}  # split -> random-stream id


def _pts(xy: np.ndarray) -> np.ndarray:
    """float (N, 2) px -> int32 (1, N, 2) fixed-point polygon for cv2 drawing with shift=SUB."""
    return np.round(xy * (1 << SUB)).astype(np.int32)[None]


def _rot(xy: np.ndarray, angle: float, cx: float, cy: float) -> np.ndarray:
    """Rotate (N, 2) points about the origin by `angle` (rad), then move the origin to (cx, cy)."""
    c, s = math.cos(angle), math.sin(angle)
    return xy @ np.array([[c, s], [-s, c]]) + (cx, cy)


def _shape_mask(rng: np.random.Generator, cls: int, h: int, w: int, s: float, cx: float, cy: float) -> np.ndarray:
    """bool (h, w) mask of one object of class `cls` (1..C), side s px, centred at (cx, cy), random rotation."""
    m = np.zeros((h, w), np.uint8)
    a, r = rng.uniform(0, 2 * math.pi), s / 2
    name = CLASSES[cls - 1]
    if name in ("circle", "ring"):
        axes = (r, r * rng.uniform(0.6 if name == "circle" else 0.75, 1.0))
        ax = tuple(int(round(v * (1 << SUB))) for v in axes)
        centre = (int(round(cx * (1 << SUB))), int(round(cy * (1 << SUB))))
        cv2.ellipse(m, centre, ax, math.degrees(a), 0, 360, 1, -1, cv2.LINE_8, SUB)
        if name == "ring":  # the hole: the same ellipse scaled by 0.45-0.65
            k = rng.uniform(0.45, 0.65)
            cv2.ellipse(m, centre, tuple(int(v * k) for v in ax), math.degrees(a), 0, 360, 0, -1, cv2.LINE_8, SUB)
    elif name == "rectangle":
        hw, hh = r, r * rng.uniform(0.45, 1.0)
        corners = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])
        cv2.fillPoly(m, _pts(_rot(corners, a, cx, cy)), 1, cv2.LINE_8, SUB)
    elif name == "triangle":
        ang = a + np.arange(3) * 2 * math.pi / 3 + rng.uniform(-0.25, 0.25, 3)  # jittered, not always equilateral
        rad = r * rng.uniform(0.85, 1.0, 3)
        cv2.fillPoly(m, _pts(np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)), 1, cv2.LINE_8, SUB)
    elif name == "star":  # 5 points: outer radius r, inner radius 0.38-0.5 r
        ang = a + np.arange(10) * math.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, r * rng.uniform(0.38, 0.5))
        cv2.fillPoly(m, _pts(np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)), 1, cv2.LINE_8, SUB)
    else:  # cross: two bars of width 0.25-0.35 s at right angles
        t = r * rng.uniform(0.25, 0.35)
        bar = np.array([[-r, -t], [r, -t], [r, t], [-r, t]])
        for b in (a, a + math.pi / 2):
            cv2.fillPoly(m, _pts(_rot(bar, b, cx, cy)), 1, cv2.LINE_8, SUB)
    return m.astype(bool)


def _ramp(h: int, w: int, angle: float) -> np.ndarray:
    """float32 (h, w): each pixel's coordinate along the direction `angle` (rad)."""
    xs = np.arange(w, dtype=np.float32) * np.float32(math.cos(angle))
    ys = np.arange(h, dtype=np.float32) * np.float32(math.sin(angle))
    return ys[:, None] + xs[None, :]


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """float32 (h, w, 3) in [0, 255]: solid, stripes, noise or a gradient in random colours."""
    c1, c2 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    kind = rng.integers(4)
    a = rng.uniform(0, math.pi)
    proj = _ramp(h, w, a)
    if kind == 0:  # solid
        t = np.zeros((h, w, 1), np.float32)
    elif kind == 1:  # stripes, period 3-10 px
        t = ((proj / rng.uniform(3, 10)) % 1.0 < 0.5)[..., None].astype(np.float32)
    elif kind == 2:  # per-pixel noise around c1
        return np.clip(c1 + rng.standard_normal((h, w, 3), np.float32) * rng.uniform(15, 40), 0, 255)
    else:  # linear gradient c1 -> c2
        t = ((proj - proj.min()) / max(float(np.ptp(proj)), 1.0))[..., None]
    return c1 + t * (c2 - c1)  # float32 (h, w, 3)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, channels: int) -> np.ndarray:
    """float32 (h, w, channels) ~N(0, 1) values on a cells x cells grid, bicubically upsampled (low frequency)."""
    g = rng.standard_normal((cells, cells, channels), np.float32)
    out = cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)
    return out.reshape(h, w, channels)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """float32 (h, w, 3): gradient + low-frequency colour noise + distractor lines, curves and blobs."""
    img = _texture(rng, h, w) if rng.random() < 0.3 else None
    if img is None:  # two-colour gradient
        t = _ramp(h, w, rng.uniform(0, 2 * math.pi))[..., None]
        t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
        c1, c2 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
        img = c1 + t * (c2 - c1)
    img = img + _smooth_noise(rng, h, w, int(rng.integers(3, 8)), 3) * rng.uniform(5, 30)
    img = np.ascontiguousarray(np.clip(img, 0, 255), dtype=np.float32)
    for _ in range(int(rng.integers(2, 9))):  # straight lines, 1-2 px
        p = rng.uniform(0, 1, 4) * (w, h, w, h)
        cv2.line(img, (int(p[0]), int(p[1])), (int(p[2]), int(p[3])), rng.uniform(0, 255, 3).tolist(),
                 int(rng.integers(1, 3)), cv2.LINE_AA)
    for _ in range(int(rng.integers(1, 5))):  # random-walk curves
        steps = np.cumsum(rng.normal(0, 6, (int(rng.integers(4, 12)), 2)), 0) + rng.uniform(0, 1, 2) * (w, h)
        cv2.polylines(img, [steps.astype(np.int32)], False, rng.uniform(0, 255, 3).tolist(),
                      int(rng.integers(1, 3)), cv2.LINE_AA)
    for _ in range(int(rng.integers(1, 6))):  # irregular blobs: thresholded smooth noise, 8-40 px
        bs = int(rng.integers(8, 41))
        y0, x0 = int(rng.integers(-bs // 2, h - bs // 2)), int(rng.integers(-bs // 2, w - bs // 2))
        blob = _smooth_noise(rng, bs, bs, 4, 1)[..., 0] > 0.5
        ys, xs = slice(max(y0, 0), min(y0 + bs, h)), slice(max(x0, 0), min(x0 + bs, w))
        sub = blob[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
        img[ys, xs][sub] = _texture(rng, bs, bs)[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0][sub]
    return img


def synthetic_scene(rng: np.random.Generator, size=(144, 144), max_objects: int = MAX_OBJECTS,
                    min_side: float = MIN_SIDE, max_frac: float = MAX_FRAC) -> tuple[np.ndarray, list]:
    """One scene: (image uint8 (H, W, 3) RGB, [(visible mask bool (H, W), class id 1..C)] in drawing order).

    size: (H, W) or an int for a square. Later objects occlude earlier ones; masks are the visible parts.
    """
    h, w = (size, size) if isinstance(size, int) else size
    img = _background(rng, h, w)
    full, classes = [], []  # full masks of accepted objects, in drawing order
    occluded = []  # occluded[i]: pixels of object i covered by later objects
    n_target = int(rng.integers(1, max_objects + 1))
    for _ in range(4 * n_target):  # rejected placements are redrawn; 4 tries per object on average
        if len(full) == n_target:
            break
        cls = int(rng.integers(1, len(CLASSES) + 1))
        s = math.exp(rng.uniform(math.log(min_side), math.log(max(max_frac * min(h, w), min_side))))
        s = max(s, 12.0) if CLASSES[cls - 1] == "ring" else s  # a ring's hole needs ~12 px to exist
        cx, cy = rng.uniform(0.3 * s, w - 0.3 * s), rng.uniform(0.3 * s, h - 0.3 * s)  # <= ~20% outside
        m = _shape_mask(rng, cls, h, w, s, cx, cy)
        if m.sum() < MIN_AREA:
            continue
        if any(((f & ~o & ~m).sum() < MIN_VISIBLE * f.sum()) for f, o in zip(full, occluded)):
            continue
        occluded = [o | m for o in occluded] + [np.zeros_like(m)]
        full.append(m)
        classes.append(cls)
    for m in full:  # paint in order: later objects over earlier ones
        ys, xs = np.nonzero(m)
        y0, x0 = ys.min(), xs.min()
        tex = _texture(rng, int(ys.max() - y0 + 1), int(xs.max() - x0 + 1))
        img[ys, xs] = tex[ys - y0, xs - x0]
    img += rng.standard_normal(img.shape, np.float32) * 3  # mild sensor noise (sigma 3) over everything
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return image, [(f & ~o, c) for f, o, c in zip(full, occluded, classes)]


def _make_image(job: tuple) -> tuple:
    """Draw and write one image; job = (root, split, index, seed, size_range). Returns its COCO records."""
    root, split, index, seed, (lo, hi) = job
    rng = np.random.default_rng([seed, SPLITS[split], index])  # one independent stream per (seed, split, index)
    h, w = (int(v) for v in rng.integers(lo, hi + 1, 2))
    image, objects = synthetic_scene(rng, (h, w))
    rel = f"{index:06d}.png"
    if split == "unlabelled":  # nested folders: 100 images per folder, like ImageNet's class folders
        rel = f"d{index // 100:02d}/{rel}"
    path = Path(root) / split / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    buf.tofile(str(path))
    anns = []
    for mask, cls in objects:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        anns.append({"category_id": cls, "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                     "area": float(mask_utils.area(rle)), "iscrowd": 0,
                     "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")}})
    return rel, w, h, anns


def _write_split(root: Path, split: str, n: int, seed: int, size_range, workers: int) -> None:
    """Generate one split's images (and, for train/val, annotations/<split>.json)."""
    jobs = [(str(root), split, i, seed, size_range) for i in range(n)]
    if workers > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(workers) as pool:  # spawn: no forked OpenCV thread pools
            results = pool.map(_make_image, jobs, chunksize=16)
    else:
        results = [_make_image(j) for j in jobs]
    if split == "unlabelled":
        return
    images, annotations = [], []
    for image_id, (rel, w, h, anns) in enumerate(results, start=1):
        images.append({"id": image_id, "file_name": rel, "width": w, "height": h})
        for a in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **a})
    coco = {"info": {"description": f"ADePT synthetic shapes, split {split}", "version": GENERATOR_VERSION,
                     "seed": seed},
            "images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(CLASSES)]}
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"{split}.json").write_text(json.dumps(coco))


def ensure_synthetic_dataset(root=None, seed: int = 0, n_unlabelled: int = 2000, n_train: int = 400,
                             n_val: int = 200, size_range=SIZE_RANGE, workers: int = 1) -> Path:
    """The embedded dataset at `root` (default ./.cache/synth), generated once; returns its Path.

    Generation is atomic (a temp folder renamed into place, meta.json written last) and guarded by a file lock, so
    concurrent callers (e.g. torchrun ranks) generate it once. A folder with another meta.json (older generator
    version or other parameters) is replaced; a non-empty folder without meta.json is never touched (error).
    ~10 ms per image on one core (the defaults: ~25 s); workers > 1 uses that many processes (same output).
    """
    root = Path(root) if root is not None else DEFAULT_ROOT
    meta = {"version": GENERATOR_VERSION, "seed": seed, "n_unlabelled": n_unlabelled, "n_train": n_train,
            "n_val": n_val, "size_range": list(size_range), "classes": list(CLASSES)}

    def current() -> bool:
        try:
            return json.loads((root / "meta.json").read_text()) == meta
        except (OSError, ValueError):
            return False

    if current():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        try:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        except ImportError:  # not POSIX: no lock, the rename below still keeps the folder whole
            pass
        if current():  # another process generated it while we waited
            return root
        if root.exists() and any(root.iterdir()) and not (root / "meta.json").exists():
            raise ValueError(f"{root}: exists, is not empty and is not a synthetic dataset (no meta.json); "
                             "pass another root")
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            for split, n in (("unlabelled", n_unlabelled), ("train", n_train), ("val", n_val)):
                _write_split(tmp, split, n, seed, size_range, workers)
            (tmp / "meta.json").write_text(json.dumps(meta))
            old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
            if root.exists():
                os.replace(root, old)  # stale version: move aside, then swap in the new one
            os.replace(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root
