"""Three-view box-aware augmentation: one image and its boxes -> V1, V2, V3 and the boxes in each (paper 4.1.2).

Section 4.1.2: V1 = the image resized to S x S; V2 = a random crop of V1 with area scale in [0.5, 1] resized to S;
V3 = V2 downsampled to s x s. Boxes (section 3.2's selective-search boxes, drawn by data.py) follow every resize, crop
and flip exactly. Colour jitter and blur as in BYOL; flip, grayscale, solarize and box jitter on V1 follow SoCo's
code (reference.md). data.py's PretrainDataset draws the geometry and the boxes, then renders them with this module.
The colour is drawn (draw_color) and applied (apply_color) apart, so that it can also run later on the device, on a
whole batch (color_on="device", color_device.py; issue 7's fast path for loaders short of CPU).

Symbols
    H, W         original image height, width (px)
    S, s         view sides: V1, V2 are S x S (224), V3 is s x s (112)
    K            boxes per sample
    N            boxes of one image (proposals)
    (sx, tx, sy, ty)  a view's affine map from original pixels: x_view = sx * x + tx, y_view = sy * y + ty;
                 a horizontal flip has sx < 0 (data.py returns them as t1..t3 so that boxes can move between views).

Conventions: boxes are float32 xyxy, continuous pixel coordinates of the image/view they live on (a box covering a
whole W x H image is [0, 0, W, H]). Views are uint8 (3, S, S) RGB (uint8 (S, S, 3) before the tensor step).
All randomness comes from one torch.Generator (or a Draws wrapping it), so a sample is reproducible from its seed.

Public
    Draws(generator)                                                uniforms from a torch.Generator, 64 per call
    sample_geometry(height, width, generator, ...) -> list of 3 view dicts (size, crop, flip, source, affine)
    map_boxes(boxes, view, clip) / visible(boxes, views) / common_region(views, H, W)      boxes through the views
    map_boxes_views(boxes, views) -> (full, clipped) (V, N, 4);  visible_mapped(full, clipped) -> (N,) bool
                                                                    the same for all views in one call
    render_geometry(image, views) -> 3 x uint8 (S, S, 3);  color_augment(x, g, blur_p, solarize_p) -> uint8
    draw_color(g, blur_p, solarize_p) -> list (COLOR_FIELDS);  apply_color(x, params) -> uint8    the same, in two
    render_views(image, boxes, views, g, color, jitter, mapped=None, color_on="loader")
        -> [(uint8 (3, S, S), float32 (K, 4), float32 (12,) colour parameters)] x 3
    jitter_boxes(boxes, g, size, p=0.5, ratio=0.1) -> (K, 4)         SoCo's box jitter (V1)
    three_views(image, boxes, generator, size=224, small_size=112, v3_mode="downsample", ...)
        -> [(view uint8 (3, S, S), boxes float32 (K, 4))] x 3
    MIN_VISIBLE, MIN_BOX_SIDE                                       when a box counts as visible in a view
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch

# OpenCV without its thread pool: loader workers are the parallelism, and a pool inherited by a forked worker
# deadlocks (cv2.setNumThreads called in a forked child hangs in pthread_cond_destroy, seen with OpenCV 5.0).
cv2.setNumThreads(0)

# "Visible" in a view: the box clipped to the view keeps >= MIN_VISIBLE of its (unclipped) area there, so that the
# views show mostly the same region, and both clipped sides are >= MIN_BOX_SIDE view pixels (RoIAlign needs some
# extent; the same 2 px floor as model._too_small).
# DEVIATION (flag train.py --min-visible): SoCo only asks for any overlap; half the box is stricter.
MIN_VISIBLE = 0.5
MIN_BOX_SIDE = 2.0
# DEVIATION (SoCo's code; flag train.py --v2-ratio): V2's crop has a log-uniform aspect ratio w/h in [3/4, 4/3], as
# RandomResizedCrop's; 4.1.2 names only the scale range. (1, 1): square crops.
V2_RATIO = (3 / 4, 4 / 3)


class Draws:
    """Uniform numbers from a torch.Generator, fetched 64 at a time (a torch call per draw costs ~10 us)."""

    def __init__(self, generator: torch.Generator):
        self.g, self.buf = generator, []

    def __call__(self, lo: float = 0.0, hi: float = 1.0) -> float:
        if not self.buf:
            self.buf = torch.rand(64, generator=self.g, dtype=torch.float64).tolist()[::-1]
        return lo + (hi - lo) * self.buf.pop()

    def randint(self, n: int) -> int:  # uniform in 0..n-1
        return min(int(self(0, n)), n - 1)


def _draws(g) -> Draws:
    return g if isinstance(g, Draws) else Draws(g)


def _crop_params(h: int, w: int, r: Draws, scale=(0.5, 1.0), ratio=V2_RATIO) -> tuple[int, int, int, int]:
    """(top, left, ch, cw) of a random crop of an h x w image: area fraction in `scale`, aspect cw/ch log-uniform in
    `ratio`, 10 tries then the central crop clamped to `ratio` (RandomResizedCrop's sampling rule)."""
    for _ in range(10):
        area = h * w * r(*scale)
        aspect = math.exp(r(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return r.randint(h - ch + 1), r.randint(w - cw + 1), ch, cw
    cw, ch = (w, round(w / ratio[0])) if w / h < ratio[0] else (round(h * ratio[1]), h) if w / h > ratio[1] else (w, h)
    cw, ch = min(cw, w), min(ch, h)
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _halvings(h: int, w: int, out: int) -> int:
    """How many exact 2x area reductions fit before resizing h x w to out x out (each keeps both sides >= out)."""
    if out < 1:  # the loop below would never end
        raise ValueError(f"view side must be >= 1 px, got {out}")
    k = 0
    while (h >> (k + 1)) >= out and (w >> (k + 1)) >= out:
        k += 1
    return k


def _trim(h: int, w: int, out: int) -> tuple[int, int]:
    """Crop h, w down to multiples of 2^k (k = _halvings) so that every halving is exact: boxes stay exact."""
    m = 1 << _halvings(h, w, out)
    return h - h % m, w - w % m


def _view(size: int, crop, flip: bool, source: str, sx: float, tx: float, sy: float, ty: float) -> dict:
    """A view's geometry; the affine (sx, tx, sy, ty) maps original pixels to this view's pixels after the flip."""
    if flip:  # x -> size - x
        sx, tx = -sx, size - tx
    return {"size": size, "crop": crop, "flip": flip, "source": source,
            "affine": np.array([sx, tx, sy, ty], np.float64)}


def sample_geometry(height: int, width: int, generator, size: int = 224, small_size: int = 112,
                    v3_mode: str = "downsample", scale=(0.5, 1.0), ratio=V2_RATIO, flip_p: float = 0.5):
    """Random geometry of the three views of an H x W image (4.1.2). Each view: size, crop (top, left, h, w) in its
    source, flip, source ("image": the original; "v1": V1 before its flip; "v2": V2 after its flip), affine.

    V1 = the image (less < 2^k px trimmed on the right/bottom so that shrinking by 2^k is exact) resized to S.
    V2 = a crop of V1, scale in [0.5, 1], aspect ratio in `ratio` (V2_RATIO: SoCo's [3/4, 4/3]), resized to S.
    V3 "downsample" (paper): V2 downsampled to s, inheriting V2's crop and flip (no flip of its own: it is the same
    picture). # DEVIATION (v3_mode="independent", SoCo's code): V3 is its own RandomResizedCrop(s, scale, ratio)
    of the original image with its own flip.
    """
    r, S, s = _draws(generator), size, small_size
    H, W = _trim(height, width, S)
    v1 = _view(S, (0, 0, H, W), r() < flip_p, "image", S / W, 0.0, S / H, 0.0)
    top, left, ch, cw = _crop_params(S, S, r, scale, ratio)  # a crop of V1 (S x S)
    v2 = _view(S, (top, left, ch, cw), r() < flip_p, "v1", S / W * S / cw, -left * S / cw, S / H * S / ch,
               -top * S / ch)
    if v3_mode == "downsample":
        v3 = {"size": s, "crop": (0, 0, S, S), "flip": False, "source": "v2", "affine": v2["affine"] * (s / S)}
    elif v3_mode == "independent":
        top, left, ch, cw = _crop_params(height, width, r, scale, ratio)
        ch, cw = _trim(ch, cw, s)
        v3 = _view(s, (top, left, ch, cw), r() < flip_p, "image", s / cw, -left * s / cw, s / ch, -top * s / ch)
    else:
        raise ValueError(f"v3_mode must be 'downsample' or 'independent', not {v3_mode!r}")
    return [v1, v2, v3]


def map_boxes(boxes: np.ndarray, view: dict, clip: bool = True) -> np.ndarray:
    """(N, 4) xyxy original pixels -> (N, 4) xyxy in the view's pixels (x1 <= x2 after a flip), clipped to it."""
    sx, tx, sy, ty = view["affine"]
    out = boxes * np.array([sx, sy, sx, sy]) + np.array([tx, ty, tx, ty])
    if sx < 0:  # flipped: x1 and x2 swap
        out = out[:, [2, 1, 0, 3]]
    return np.clip(out, 0, view["size"]) if clip else out


# affine (sx, tx, sy, ty) -> per-coordinate scale (sx, sy, sx, sy) and shift (tx, ty, tx, ty)
XYXY_SCALE, XYXY_SHIFT = np.array([0, 2, 0, 2]), np.array([1, 3, 1, 3])
XYXY_COLS = np.array([[0, 1, 2, 3], [2, 1, 0, 3]])  # original coordinates read by a view: plain / flipped (x2, x1)


def map_boxes_views(boxes: np.ndarray, views: list) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) xyxy original pixels -> (full, clipped), each float64 (V, N, 4) xyxy in every view's pixels: map_boxes
    of all views in one numpy call (each coordinate is the same product and sum, so the same values). A flipped view
    reads x2 as its x1 and x1 as its x2 (the scale and shift are the same for both)."""
    aff = np.array([v["affine"] for v in views])  # (V, 4) sx, tx, sy, ty
    cols = XYXY_COLS[(aff[:, 0] < 0).astype(np.intp)]  # (V, 4)
    full = np.multiply(boxes[:, cols].transpose(1, 0, 2), aff[:, None, XYXY_SCALE], order="C")  # (V, N, 4)
    full += aff[:, None, XYXY_SHIFT]
    sizes = np.array([v["size"] for v in views], np.float64)[:, None, None]  # (V, 1, 1)
    return full, np.clip(full, 0, sizes)


def visible_mapped(full: np.ndarray, clipped: np.ndarray, min_fraction: float = MIN_VISIBLE,
                   min_side: float = MIN_BOX_SIDE) -> np.ndarray:
    """map_boxes_views' (full, clipped) (V, N, 4) -> (N,) bool: visible (see MIN_VISIBLE) in every view."""
    w, h = clipped[..., 2] - clipped[..., 0], clipped[..., 3] - clipped[..., 1]  # (V, N) each
    area_full = (full[..., 2] - full[..., 0]) * (full[..., 3] - full[..., 1])  # (V, N)
    ok = (np.minimum(w, h) >= min_side) & (w * h >= min_fraction * area_full)  # (V, N)
    return ok.all(0)


def visible(boxes: np.ndarray, views: list, min_fraction: float = MIN_VISIBLE, min_side: float = MIN_BOX_SIDE):
    """(N, 4) original pixels -> (N,) bool: visible (see MIN_VISIBLE) in every view."""
    return visible_mapped(*map_boxes_views(boxes, views), min_fraction, min_side)


def common_region(views: list, height: int, width: int) -> np.ndarray:
    """(1, 4) original-pixel box seen by every view (the intersection of their footprints): the fallback box."""
    box = np.array([0.0, 0.0, width, height])
    for v in views:
        sx, tx, sy, ty = v["affine"]
        xs, ys = (np.array([0.0, v["size"]]) - tx) / sx, (np.array([0.0, v["size"]]) - ty) / sy
        box = np.array([max(box[0], xs.min()), max(box[1], ys.min()), min(box[2], xs.max()), min(box[3], ys.max())])
    return box[None].astype(np.float32)


def _resize(img: np.ndarray, out: int) -> np.ndarray:
    """(h, w, 3) -> (out, out, 3): exact 2x area reductions while both sides stay >= out (anti-aliasing; sides are
    multiples of 2^k, see _trim), then bilinear. One area resize at a non-integer ratio costs ~10x more."""
    for _ in range(_halvings(img.shape[0], img.shape[1], out)):
        img = cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA)
    if img.shape[:2] == (out, out):  # e.g. V3 = V2 halved: cv2.resize to the same size is a plain copy
        return img
    return cv2.resize(img, (out, out), interpolation=cv2.INTER_LINEAR)


def render_geometry(image: np.ndarray, views: list) -> list[np.ndarray]:
    """uint8 (H, W, 3) -> the three views' pixels, uint8 (S, S, 3), (S, S, 3), (s, s, 3), before colour."""
    v1, v2, v3 = views
    S = v1["size"]
    top, left, h, w = v1["crop"]
    base = _resize(image[top:top + h, left:left + w], S)  # V1 before its flip: V2's source
    out1 = cv2.flip(base, 1) if v1["flip"] else base
    top, left, h, w = v2["crop"]
    out2 = _resize(base[top:top + h, left:left + w], S)
    out2 = cv2.flip(out2, 1) if v2["flip"] else out2
    if v3["source"] == "v2":  # downsample mode: V2's pixels, flip included
        out3 = _resize(out2, v3["size"])
    else:
        top, left, h, w = v3["crop"]
        out3 = _resize(image[top:top + h, left:left + w], v3["size"])
        out3 = cv2.flip(out3, 1) if v3["flip"] else out3
    return [out1, out2, out3]


# ---- colour (BYOL / SoCo: ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, grayscale p 0.2, blur, solarize) -------------
# All on uint8 (H, W, 3) RGB with OpenCV, saturating and rounding after each operation (torchvision's uint8 path
# truncates instead, and our hue has 256 steps per turn: they differ by 1-3 levels, see the tests).
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2, as PIL / torchvision
GRAY_MATRIX = np.tile(LUMA, (3, 1))  # every output channel = the luma
EYE3 = np.eye(3)  # float64 identity of the blend matrices (made once: np.eye per call cost ~5 us)


def _gray3(x: np.ndarray) -> np.ndarray:
    """Luma replicated to 3 channels."""
    return cv2.transform(x, GRAY_MATRIX)


def _brightness(x: np.ndarray, f: float) -> np.ndarray:  # x * f
    return cv2.convertScaleAbs(x, alpha=f)


def _contrast(x: np.ndarray, f: float) -> np.ndarray:  # blend with the mean luma: f x + (1 - f) mean
    mean = float(LUMA @ np.array(cv2.mean(x)[:3], np.float32))
    m = np.empty((3, 4))  # float64 [f I | (1 - f) mean], then float32 as before
    m[:, :3], m[:, 3] = f * EYE3, (1 - f) * mean
    return cv2.transform(x, m.astype(np.float32))


def _saturation(x: np.ndarray, f: float) -> np.ndarray:  # blend with the luma image: f x + (1 - f) gray
    return cv2.transform(x, (f * EYE3 + (1 - f) * GRAY_MATRIX).astype(np.float32))


def _hue(x: np.ndarray, f: float) -> np.ndarray:  # rotate the hue by f turns; 8-bit hue (256 steps per turn)
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV_FULL)  # (h, w, 3) contiguous
    shift = np.zeros(hsv.shape[1] * 3, np.uint8)  # one row of pixels: (dh, 0, 0) each
    shift[0::3] = round(f * 256) % 256
    rows = hsv.reshape(hsv.shape[0], -1)  # (h, w * 3) view: a contiguous add, 2x faster than hsv[..., 0] += dh
    rows += shift  # uint8 addition wraps around the hue circle; S and V + 0
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur, kernel 2 * round(3 sigma) + 1 (OpenCV's own choice for uint8), reflected borders.
    sepFilter2D: the same separable filter as cv2.GaussianBlur, 2-3x faster on uint8 here."""
    k = cv2.getGaussianKernel(2 * int(round(3 * sigma)) + 1, sigma)
    return cv2.sepFilter2D(x, -1, k, k, borderType=cv2.BORDER_REFLECT_101)


SOLARIZE_LUT = np.where(np.arange(256) >= 128, 255 - np.arange(256), np.arange(256)).astype(np.uint8)  # PIL's 128


# A view's colour parameters (draw_color), in this order; the device path (color_device.py) gets them as float32 rows.
COLOR_FIELDS = ("jitter", "brightness", "contrast", "saturation", "hue", "order0", "order1", "order2", "order3",
                "gray", "sigma", "solarize")
NO_COLOR = [0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0]  # identity: no jitter, gray, blur, solarize
COLOR_OPS = ("brightness", "contrast", "saturation", "hue")  # order0..3 index this tuple


def draw_color(g, blur_p: float, solarize_p: float, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p: float = 0.8,
               gray_p: float = 0.2) -> list[float]:
    """The random colour parameters of one view (BYOL / SoCo), a list in COLOR_FIELDS order: jitter (1.0 if the
    colour jitter applies, p jitter_p), its factors brightness, contrast, saturation in [1 - j, 1 + j] and hue shift
    in [-j, j] turns, order0..3 (the COLOR_OPS indices in the order they apply: torchvision's random order), gray
    (1.0 with p gray_p), sigma (Gaussian blur sigma ~ U(0.1, 2) px with p blur_p, 0.0 = no blur), solarize (1.0 with
    p solarize_p). Unused fields keep NO_COLOR's values; which draws are made depends on the coins, as before."""
    r, p = _draws(g), list(NO_COLOR)
    if r() < jitter_p:
        b, c, s, h = jitter
        p[0:5] = [1.0, r(1 - b, 1 + b), r(1 - c, 1 + c), r(1 - s, 1 + s), r(-h, h)]
        keys = [r() for _ in range(4)]  # a random order of the four operations: argsort of 4 uniforms
        p[5:9] = sorted(range(4), key=keys.__getitem__)  # (np.argsort's order; ties have probability ~2^-50)
    p[9] = float(r() < gray_p)
    if r() < blur_p:
        p[10] = r(0.1, 2.0)
    p[11] = float(r() < solarize_p)
    return p


JITTER_OPS = (_brightness, _contrast, _saturation, _hue)  # COLOR_OPS' functions, in its order


def apply_color(x: np.ndarray, p: list[float]) -> np.ndarray:
    """uint8 (h, w, 3) -> uint8 (h, w, 3): draw_color's parameters p applied with OpenCV: the jitter's four
    operations in p's order, grayscale, blur (kernel 2 round(3 sigma) + 1), solarize (values >= 128 inverted, as
    PIL's ImageOps.solarize)."""
    if p[0]:
        for i in map(int, p[5:9]):
            x = JITTER_OPS[i](x, p[1 + i])
    if p[9]:
        x = _gray3(x)
    if p[10]:
        x = _blur(x, p[10])
    if p[11]:
        x = cv2.LUT(x, SOLARIZE_LUT)
    return x


def color_augment(x: np.ndarray, g, blur_p: float, solarize_p: float,
                  jitter=(0.4, 0.4, 0.2, 0.1), jitter_p: float = 0.8, gray_p: float = 0.2) -> np.ndarray:
    """uint8 (h, w, 3) -> uint8 (h, w, 3): colour jitter (factors and random order as torchvision's ColorJitter),
    grayscale, Gaussian blur sigma ~ U(0.1, 2) px, solarize: apply_color(x, draw_color(g, ...))."""
    return apply_color(x, draw_color(g, blur_p, solarize_p, jitter, jitter_p, gray_p))


def jitter_boxes(boxes: np.ndarray, g, size: int, p: float = 0.5, ratio: float = 0.1):
    """SoCo's box jitter (V1 only): with probability p per box, each coordinate moves by U(-ratio, ratio) x the box
    width (x1, x2) or height (y1, y2); clipped to the size x size view. # DEVIATION (SoCo's code; 4.1.2 names no box
    jitter): on by default, off with train.py --no-box-jitter; Eq. 1 uses V1's boxes before it either way.
    The draws come box by box (a coin, then its 4 moves if it came up), the moves are applied in one numpy call."""
    r, out = _draws(g), boxes.copy()
    rows, moves = [], []
    for k in range(len(boxes)):
        if r() < p:
            rows.append(k)
            moves.append([r(-ratio, ratio) for _ in range(4)])
    if rows:
        wh = boxes[rows, 2:] - boxes[rows, :2]  # (J, 2)
        wh = np.concatenate([wh, wh], 1)  # (J, 4) w, h, w, h of the moved boxes (np.tile's result, 5x cheaper)
        out[rows] += np.array(moves) * wh
    out = np.clip(out, 0, size)
    out[:, 2:] = np.maximum(out[:, 2:], out[:, :2])
    return out


COLOR_ON = ("loader", "device")  # where the colour operations run (render_views, data.PretrainDataset)


def render_views(image, boxes, views, g, color: bool, jitter: bool, mapped: np.ndarray | None = None,
                 color_on: str = "loader"):
    """Pixels and boxes of the three views -> [(uint8 tensor (3, S, S), float32 tensor (K, 4), float32 tensor
    (len(COLOR_FIELDS),) colour parameters)] x 3. color_on="loader" applies the colour here (OpenCV); "device" only
    draws the parameters (the same draws, so the same boxes) and returns the pixels before colour, for
    color_device.color_batch. color=False: no colour, the parameters are NO_COLOR. mapped: the boxes already in
    every view's pixels, clipped (V, K, 4) (map_boxes_views' second output), else computed here."""
    if color_on not in COLOR_ON:
        raise ValueError(f"color_on must be one of {COLOR_ON}, not {color_on!r}")
    pixels, params = render_geometry(image, views), [NO_COLOR] * 3
    if mapped is None:
        mapped = map_boxes_views(boxes, views)[1]  # (V, K, 4) xyxy view pixels, float64
    for j, (px, v) in enumerate(zip(pixels, views)):
        if color:  # V1: blur always, no solarize; V2, V3: blur p 0.1, solarize p 0.2 (BYOL's asymmetric pair)
            params[j] = draw_color(g, blur_p=1.0 if j == 0 else 0.1, solarize_p=0.0 if j == 0 else 0.2)
            if color_on == "loader":
                pixels[j] = apply_color(px, params[j])
        if j == 0 and jitter:  # its draws come between V1's and V2's colour draws
            mapped = mapped.copy()
            mapped[0] = jitter_boxes(mapped[0], g, v["size"])
    boxes32 = mapped.astype(np.float32)  # (V, K, 4)
    colors = torch.tensor(params, dtype=torch.float32)  # (V, len(COLOR_FIELDS))
    # (3, S, S) as a view of the (S, S, 3) array: the collate's stack makes the contiguous batch copy
    return [(torch.from_numpy(px.transpose(2, 0, 1)), torch.from_numpy(b), c)
            for px, b, c in zip(pixels, boxes32, colors)]


def three_views(image: np.ndarray, boxes: np.ndarray, generator: torch.Generator, size: int = 224,
                small_size: int = 112, v3_mode: str = "downsample", color: bool = True, jitter: bool = True,
                scale=(0.5, 1.0), ratio=V2_RATIO) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The three-view box-aware augmentation of 4.1.2 for one image.

    image uint8 (H, W, 3) RGB; boxes (K, 4) xyxy original pixels. Returns [(view uint8 (3, S, S), boxes float32
    (K, 4) xyxy in that view's pixels, clipped)] for V1, V2 (S = size) and V3 (S = small_size). color=False skips the
    colour operations and jitter=False V1's box jitter (tests). All randomness comes from `generator`.
    """
    r = _draws(generator)
    views = sample_geometry(image.shape[0], image.shape[1], r, size, small_size, v3_mode, scale, ratio)
    rendered = render_views(image, np.asarray(boxes, np.float32).reshape(-1, 4), views, r, color, jitter)
    return [(px, b) for px, b, _ in rendered]
