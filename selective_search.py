"""Selective search on one image and the 4.1.1 box filter (paper sections 3.2 and 4.1.1).

Section 3.2: boxes from selective search [20], pre-computed before training and filtered to the large enough, not too
elongated ones, are the RPN's regression targets and the head's K boxes. Section 4.1.1: graph segmentation with
min_size = 10, scale k = 500, sigma = 0.9; keep 1/3 <= w/h <= 3 and 0.3 <= sqrt(wh) / sqrt(WH) <= 0.8.
OpenCV's ximgproc implements it: createGraphSegmentation(sigma=0.9, k=500, min_size=10) on the HSV image with the
strategy Multiple(Color, Texture, Size, Fill) (reference.md). The default grouping ("auto" = "numpy" for the presets
paper and soco) keeps OpenCV's segmentation and does the hierarchical grouping in numpy (ss_grouping.py): the same
boxes as OpenCV's grouping on every image measured, in 34-42 % of its CPU time (bench/RESULTS.md sections 3b, 3c).
The precompute over an image tree and the proposals file live in ss_proposals.py; this file is its command line:

    python selective_search.py IMAGE_ROOT OUT.npz [--workers N] [--shard i/n] [--preset paper] ...   # ss_proposals.main

Symbols (paper -> code)
    W, H        image width / height in pixels         width, height
    w, h        box width / height                     x2 - x1, y2 - y1 (boxes are float32 xyxy, original pixels)
    k, sigma    graph-segmentation scale and smoothing  PRESETS[preset]["k"], ["sigma"]

Public
    selective_search(image_rgb, preset, max_side, grouping) -> (N, 4) float32 xyxy, sorted
    resolve_grouping(preset, grouping) -> "opencv" | "numpy"   (ValueError for a bad combination)
    filter_boxes(boxes, width, height, min_side)           -> (M, 4) the 4.1.1 filter
    filter_with_fallback(boxes, width, height, min_side)   -> (boxes, level), level in LEVELS
    decode_image(data) -> RGB uint8 (H, W, 3) or None

Project-local dependencies: ss_grouping.py (grouping="numpy", imported when a search runs; without it "auto" is
OpenCV's grouping, so this file also works alone); ss_proposals.py (the command line only).
"""
from __future__ import annotations

import importlib.util
import sys

import cv2
import numpy as np

LEVELS = ("filter", "ratio", "size", "image")  # SoCo's fallback order; "filter" = the full 4.1.1 filter
PRESETS = {
    "paper": {"sigma": 0.9, "k": 500, "min_size": 10},  # section 4.1.1
    # DEVIATION: SoCo's selective-search values (reference.md), selectable with preset="soco".
    "soco": {"sigma": 0.9, "k": 300, "min_size": 100},
    "fast": {},  # OpenCV switchToSelectiveSearchFast() defaults
    "quality": {},  # OpenCV switchToSelectiveSearchQuality() defaults
}
MAX_RATIO = 3.0  # 4.1.1: 1/3 <= w/h <= 3
SCALE_RANGE = (0.3, 0.8)  # 4.1.1: 0.3 <= sqrt(wh)/sqrt(WH) <= 0.8
SOCO_MIN_SIDE = 32  # SoCo's extra w >= 32 and h >= 32 (off by default: min_side=0)
GROUPINGS = ("auto", "opencv", "numpy")  # who merges the regions: ximgproc, ss_grouping.py; auto: numpy if it can
MULTI_STRATEGY = ("fast", "quality")  # OpenCV's own presets (several colour spaces and strategies): its grouping only


def _seg():
    """cv2.ximgproc.segmentation, looked up only when a search runs: loading a proposals file needs no contrib build."""
    if not hasattr(cv2, "ximgproc"):
        raise ImportError(f"cv2 {cv2.__version__} has no ximgproc (selective search): install "
                          "opencv-contrib-python-headless, and not opencv-python beside it (reference.md, traps)")
    return cv2.ximgproc.segmentation


def _strategy():
    SEG = _seg()
    return SEG.createSelectiveSearchSegmentationStrategyMultiple(
        SEG.createSelectiveSearchSegmentationStrategyColor(), SEG.createSelectiveSearchSegmentationStrategyTexture(),
        SEG.createSelectiveSearchSegmentationStrategySize(), SEG.createSelectiveSearchSegmentationStrategyFill())


def resolve_grouping(preset: str, grouping: str) -> str:
    """Resolve grouping="auto": "numpy" for the single-strategy presets (paper, soco), "opencv" for fast/quality
    and where ss_grouping.py is absent (this file copied alone: the same boxes, slower). Bad combinations fail here,
    before any image is read."""
    if preset not in PRESETS or grouping not in GROUPINGS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, grouping one of {GROUPINGS}; got {preset!r}, "
                         f"{grouping!r}")
    if grouping == "numpy" and preset in MULTI_STRATEGY:
        raise ValueError(f"grouping='numpy' implements the single-strategy presets, not {preset!r}")
    if grouping == "auto":
        numpy_grouping = importlib.util.find_spec("ss_grouping") is not None
        return "numpy" if numpy_grouping and preset not in MULTI_STRATEGY else "opencv"
    return grouping


def _raw_search(image_rgb: np.ndarray, preset: str, grouping: str = "opencv") -> np.ndarray:
    """OpenCV selective search -> (N, 4) float32 (x, y, w, h), in OpenCV's (varying) order; grouping="numpy": the
    same graph segmentation, grouped by ss_grouping.py (sorted)."""
    SEG = _seg()
    if grouping == "numpy":  # a resolved grouping (resolve_grouping): a single-strategy preset
        import ss_grouping

        p, hsv = PRESETS[preset], cv2.cvtColor(image_rgb, cv2.COLOR_RGB2HSV)
        labels = SEG.createGraphSegmentation(sigma=p["sigma"], k=p["k"], min_size=p["min_size"]).processImage(hsv)
        return ss_grouping.hierarchical_grouping(hsv, labels).astype(np.float32)
    ss = SEG.createSelectiveSearchSegmentation()
    if preset in MULTI_STRATEGY:
        ss.setBaseImage(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))  # OpenCV converts from BGR itself
        if preset == "fast":
            ss.switchToSelectiveSearchFast()
        else:
            ss.switchToSelectiveSearchQuality()
    else:
        p = PRESETS[preset]
        ss.addImage(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2HSV))
        ss.addGraphSegmentation(SEG.createGraphSegmentation(sigma=p["sigma"], k=p["k"], min_size=p["min_size"]))
        ss.addStrategy(_strategy())
    return np.asarray(ss.process(), dtype=np.float32).reshape(-1, 4)


def selective_search(image_rgb: np.ndarray, preset: str = "paper", max_side: int | None = None,
                     grouping: str = "auto") -> np.ndarray:
    """Section 4.1.1. image_rgb uint8 (H, W, 3) -> (N, 4) float32 xyxy in original pixels, lexicographically sorted.

    max_side: if set, the image is first resized (INTER_AREA) so that its long side <= max_side; boxes are scaled
    back to the original pixels and clipped to [0, W] x [0, H]. grouping: "opencv" (ximgproc), "numpy"
    (ss_grouping.py, presets paper and soco only) or "auto" (numpy where it can).
    """
    grouping = resolve_grouping(preset, grouping)
    H, W = image_rgb.shape[:2]
    small = image_rgb
    if max_side is not None and max(H, W) > max_side:
        s = max_side / max(H, W)
        small = cv2.resize(image_rgb, (max(1, round(W * s)), max(1, round(H * s))), interpolation=cv2.INTER_AREA)
    h_s, w_s = small.shape[:2]
    xywh = _raw_search(np.ascontiguousarray(small), preset, grouping)  # (N, 4) x, y, w, h in resized pixels
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)  # (N, 4) xyxy
    if (h_s, w_s) != (H, W):
        boxes *= np.array([W / w_s, H / h_s, W / w_s, H / h_s], dtype=np.float32)
        np.clip(boxes, 0, np.array([W, H, W, H], dtype=np.float32), out=boxes)
    order = np.lexsort((boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0]))  # x1 first, then y1, x2, y2
    return np.ascontiguousarray(boxes[order], dtype=np.float32)


def _ratio_ok(boxes: np.ndarray) -> np.ndarray:
    """4.1.1: 1/3 <= w/h <= 3, as 3w >= h and w <= 3h (exact, no division). boxes (N, 4) -> (N,) bool."""
    w = boxes[:, 2].astype(np.float64) - boxes[:, 0]
    h = boxes[:, 3].astype(np.float64) - boxes[:, 1]
    return (MAX_RATIO * w >= h) & (w <= MAX_RATIO * h) & (w > 0) & (h > 0)


def _scale_ok(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """4.1.1: 0.3 <= sqrt(wh) / sqrt(WH) <= 0.8. boxes (N, 4) -> (N,) bool."""
    w = boxes[:, 2].astype(np.float64) - boxes[:, 0]
    h = boxes[:, 3].astype(np.float64) - boxes[:, 1]
    rel = np.sqrt(np.clip(w * h, 0, None)) / np.sqrt(float(width) * float(height))
    return (rel >= SCALE_RANGE[0]) & (rel <= SCALE_RANGE[1])


def _side_ok(boxes: np.ndarray, min_side: float) -> np.ndarray:
    """SoCo's w >= min_side and h >= min_side (min_side=0: every non-empty box). boxes (N, 4) -> (N,) bool."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return (w >= min_side) & (h >= min_side) & (w > 0) & (h > 0)


def filter_boxes(boxes: np.ndarray, width: float, height: float, min_side: float = 0) -> np.ndarray:
    """Section 4.1.1 filter on (N, 4) xyxy boxes of a W x H image -> the kept (M, 4) boxes, order preserved.

    min_side > 0 adds SoCo's w >= min_side and h >= min_side (SoCo: 32).
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    keep = _ratio_ok(boxes) & _scale_ok(boxes, width, height) & _side_ok(boxes, min_side)
    return boxes[keep]


def filter_with_fallback(boxes: np.ndarray, width: float, height: float, min_side: float = 0):
    """filter_boxes, then SoCo's fallbacks for an image left with no box -> (boxes (M, 4) float32, level).

    Levels (SoCo selective_search/filter_ss_proposals_json_post_no_prop.py): "filter" = the full filter; "ratio" =
    aspect ratio + min side (SoCo's filter_ratio); "size" = the absolute size check alone, w, h >= min_side (SoCo's
    filter_none; with min_side=0 every non-empty box); "image" = the whole image [0, 0, W, H].
    # DEVIATION (follows SoCo; no flag): the paper does not say what an image keeps when the filter leaves nothing;
    the levels are counted in the proposals file's summary.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    for level, keep in (("filter", None), ("ratio", _ratio_ok(boxes) & _side_ok(boxes, min_side)),
                        ("size", _side_ok(boxes, min_side))):
        kept = filter_boxes(boxes, width, height, min_side) if keep is None else boxes[keep]
        if len(kept):
            return kept, level
    return np.array([[0, 0, width, height]], dtype=np.float32), "image"


def decode_image(data: bytes | np.ndarray) -> np.ndarray | None:
    """File bytes -> RGB uint8 (H, W, 3), or None when unreadable.

    cv2.IMREAD_COLOR turns grayscale, alpha, 16-bit and CMYK JPEG into 8-bit BGR; we convert to RGB.
    """
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else data
    if buf.size == 0:
        return None
    try:
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error:
        return None
    if bgr is None or bgr.ndim != 3 or bgr.shape[0] == 0 or bgr.shape[1] == 0:
        return None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


if __name__ == "__main__":  # the CLI of the precompute (ss_proposals.main); its spawned workers import ss_proposals
    import ss_proposals

    ss_proposals.main(sys.argv[1:])
