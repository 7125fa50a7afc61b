"""Pre-training data: images + selective-search boxes -> three box-aware views (paper sections 3.2, 4.1.2).

Section 3.2: K boxes per image are drawn at random among the precomputed selective-search proposals (K = 4, 3.4).
Section 4.1.2: V1 = the image resized to S x S; V2 = a random crop of V1 with area scale in [0.5, 1] resized to S;
V3 = V2 downsampled to s x s. Boxes follow every resize, crop and flip exactly. Colour jitter and blur as in BYOL;
the rest (flip, grayscale, solarize, box jitter on V1, up to 5 tries, padding by repetition) follows SoCo's code
(reference.md). The embedded default dataset lives in synthetic.py and is re-exported here.

Symbols
    H, W         original image height, width (px)
    S, s         view sides: V1, V2 are S x S (224), V3 is s x s (112)
    K            boxes per sample (4)
    N            proposals of one image
    (sx, tx, sy, ty)  a view's affine map from original pixels: x_view = sx * x + tx, y_view = sy * y + ty;
                 a horizontal flip has sx < 0. Returned as t1..t3 so that boxes can be moved between views.

Conventions: boxes are float32 xyxy, continuous pixel coordinates of the image/view they live on (a box covering a
whole W x H image is [0, 0, W, H]). Views are uint8 (3, S, S) RGB; `normalize` makes floats on the device.

Public
    normalize(x uint8 (B, 3, H, W)) -> float (B, 3, H, W)           ImageNet mean / std
    decode_image(path, min_side=16) -> uint8 (H, W, 3) RGB          ValueError naming the file if unusable
    list_images(root) -> sorted relative posix paths of the images under root (any depth)
    sample_seed(seed, epoch, index) -> int                          63-bit seed of one sample's generator
    Draws(generator)                                                uniforms from a torch.Generator, 64 per call
    sample_geometry(height, width, generator, ...) -> list of 3 view dicts (size, crop, flip, source, affine)
    map_boxes(boxes, view, clip) / visible(boxes, views) / common_region(views, H, W)      boxes through the views
    render_geometry(image, views) -> 3 x uint8 (S, S, 3);  color_augment(x, g, blur_p, solarize_p) -> uint8
    three_views(image, boxes, generator, size=224, small_size=112, v3_mode="downsample", ...)
        -> [(view uint8 (3, S, S), boxes float32 (K, 4))] x 3
    PretrainDataset(image_root, proposals, K=4, seed=0, size=224, small_size=112, v3_mode="downsample", ...)
    EpochSampler(sampler)                                           yields (epoch, index): for persistent workers
    ensure_synthetic_dataset(root=None, seed=0, ...) -> Path;  synthetic_scene(rng, size)   (from synthetic.py)
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch

from synthetic import CLASSES, ensure_synthetic_dataset, synthetic_scene  # noqa: F401  (re-exported)

# OpenCV without its thread pool: loader workers are the parallelism, and a pool inherited by a forked worker
# deadlocks (cv2.setNumThreads called in a forked child hangs in pthread_cond_destroy, seen with OpenCV 5.0).
cv2.setNumThreads(0)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png")  # as selective_search.IMAGE_EXTENSIONS: the images it keys proposals by
MIN_IMAGE_SIDE = 16  # px; smaller files are icons or broken thumbnails, no object-level content: treated as bad
MAX_TRIES = 5  # SoCo: geometry redrawn up to 5 times until some proposal is visible in every view
# "Visible" in a view: the box clipped to the view keeps >= MIN_VISIBLE of its (unclipped) area there, so that the
# views show mostly the same region, and both clipped sides are >= MIN_BOX_SIDE view pixels (RoIAlign needs some
# extent; the same 2 px floor as model._too_small). SoCo only asks for any overlap; half the box is stricter.
MIN_VISIBLE = 0.5
MIN_BOX_SIDE = 2.0
MAX_REPLACE = 50  # bad images: replacement candidates tried before giving up (then the data is mostly broken)


_NORM_STATS: dict = {}  # device -> (mean, std) (1, 3, 1, 1) in 0-255 units


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) RGB -> float32 (B, 3, H, W) with ImageNet mean / std (on x's device; x's memory format
    is kept). The constants are copied to a device once: torch.tensor(device=cuda) is a synchronising copy."""
    if x.device not in _NORM_STATS:
        _NORM_STATS[x.device] = (torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255,
                                 torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255)
    mean, std = _NORM_STATS[x.device]
    return (x.float() - mean) / std


READ_FLAG = getattr(cv2, "IMREAD_COLOR_RGB", cv2.IMREAD_COLOR)  # OpenCV >= 4.10 decodes straight to RGB


def decode_image(path, min_side: int = MIN_IMAGE_SIDE) -> np.ndarray:
    """Any image file -> uint8 (H, W, 3) RGB. Grayscale, palette, alpha (dropped), 16-bit and CMYK are converted by
    OpenCV (IMREAD_COLOR[_RGB]: 8-bit, 3 channels, EXIF orientation applied, as selective_search.decode_image).
    Raises ValueError(f"{path}: ...") for a file that cannot be read or decoded (corrupt, truncated, empty) or whose
    short side is < min_side px."""
    try:
        buf = np.fromfile(str(path), dtype=np.uint8)
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e})") from e
    img = cv2.imdecode(buf, READ_FLAG) if buf.size else None
    if img is None:
        raise ValueError(f"{path}: not a decodable image (empty, corrupt, truncated or unsupported format)")
    if min(img.shape[:2]) < min_side:
        raise ValueError(f"{path}: image too small ({img.shape[1]}x{img.shape[0]} px, short side < {min_side})")
    return img if READ_FLAG != cv2.IMREAD_COLOR else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _readable(path) -> bool:
    try:
        decode_image(path)
        return True
    except ValueError:
        return False


def list_images(root) -> list[str]:
    """Relative posix paths of the image files under root (any depth), sorted: the keys of the proposals file."""
    root = Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):  # as selective_search.find_images
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        out += [(rel / f).as_posix() for f in filenames if f.lower().endswith(IMG_EXTENSIONS)]
    return sorted(out)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """One sample's generator seed from (seed, epoch, index): the same whatever the worker or process count."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: a valid torch.Generator seed


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


def _crop_params(h: int, w: int, r: Draws, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
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
                    v3_mode: str = "downsample", scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), flip_p: float = 0.5):
    """Random geometry of the three views of an H x W image (4.1.2). Each view: size, crop (top, left, h, w) in its
    source, flip, source ("image": the original; "v1": V1 before its flip; "v2": V2 after its flip), affine.

    V1 = the image (less < 2^k px trimmed on the right/bottom so that shrinking by 2^k is exact) resized to S.
    V2 = a crop of V1, scale in [0.5, 1], aspect ratio in [3/4, 4/3], resized to S.
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


def visible(boxes: np.ndarray, views: list, min_fraction: float = MIN_VISIBLE, min_side: float = MIN_BOX_SIDE):
    """(N, 4) original pixels -> (N,) bool: visible (see MIN_VISIBLE) in every view."""
    ok = np.ones(len(boxes), bool)
    for v in views:
        full = map_boxes(boxes, v, clip=False)
        clipped = np.clip(full, 0, v["size"])
        wh = clipped[:, 2:] - clipped[:, :2]
        area_full = (full[:, 2] - full[:, 0]) * (full[:, 3] - full[:, 1])
        ok &= (wh.min(1) >= min_side) & (wh[:, 0] * wh[:, 1] >= min_fraction * area_full)
    return ok


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
    return cv2.resize(img, (out, out), interpolation=cv2.INTER_LINEAR)


def render_geometry(image: np.ndarray, views: list) -> list[np.ndarray]:
    """uint8 (H, W, 3) -> the three views' pixels, uint8 (S, S, 3), (S, S, 3), (s, s, 3), before colour."""
    v1, v2, v3 = views
    S = v1["size"]
    t, l, h, w = v1["crop"]
    base = _resize(image[t:t + h, l:l + w], S)  # V1 before its flip: V2's source
    out1 = cv2.flip(base, 1) if v1["flip"] else base
    t, l, h, w = v2["crop"]
    out2 = _resize(base[t:t + h, l:l + w], S)
    out2 = cv2.flip(out2, 1) if v2["flip"] else out2
    if v3["source"] == "v2":  # downsample mode: V2's pixels, flip included
        out3 = _resize(out2, v3["size"])
    else:
        t, l, h, w = v3["crop"]
        out3 = _resize(image[t:t + h, l:l + w], v3["size"])
        out3 = cv2.flip(out3, 1) if v3["flip"] else out3
    return [out1, out2, out3]


# ---- colour (BYOL / SoCo: ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, grayscale p 0.2, blur, solarize) -------------
# All on uint8 (H, W, 3) RGB with OpenCV, saturating and rounding after each operation (torchvision's uint8 path
# truncates instead, and our hue has 256 steps per turn: they differ by 1-3 levels, see the tests).
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2, as PIL / torchvision
GRAY_MATRIX = np.tile(LUMA, (3, 1))  # every output channel = the luma


def _gray3(x: np.ndarray) -> np.ndarray:
    """Luma replicated to 3 channels."""
    return cv2.transform(x, GRAY_MATRIX)


def _brightness(x: np.ndarray, f: float) -> np.ndarray:  # x * f
    return cv2.convertScaleAbs(x, alpha=f)


def _contrast(x: np.ndarray, f: float) -> np.ndarray:  # blend with the mean luma: f x + (1 - f) mean
    mean = float(LUMA @ np.array(cv2.mean(x)[:3], np.float32))
    return cv2.transform(x, np.hstack([f * np.eye(3), np.full((3, 1), (1 - f) * mean)]).astype(np.float32))


def _saturation(x: np.ndarray, f: float) -> np.ndarray:  # blend with the luma image: f x + (1 - f) gray
    return cv2.transform(x, (f * np.eye(3) + (1 - f) * GRAY_MATRIX).astype(np.float32))


def _hue(x: np.ndarray, f: float) -> np.ndarray:  # rotate the hue by f turns; 8-bit hue (256 steps per turn)
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] += np.uint8(round(f * 256) % 256)  # uint8 addition wraps around the hue circle
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur, kernel 2 * round(3 sigma) + 1 (OpenCV's own choice for uint8), reflected borders.
    sepFilter2D: the same separable filter as cv2.GaussianBlur, 2-3x faster on uint8 here."""
    k = cv2.getGaussianKernel(2 * int(round(3 * sigma)) + 1, sigma)
    return cv2.sepFilter2D(x, -1, k, k, borderType=cv2.BORDER_REFLECT_101)


SOLARIZE_LUT = np.where(np.arange(256) >= 128, 255 - np.arange(256), np.arange(256)).astype(np.uint8)  # PIL's 128


def color_augment(x: np.ndarray, g, blur_p: float, solarize_p: float,
                  jitter=(0.4, 0.4, 0.2, 0.1), jitter_p: float = 0.8, gray_p: float = 0.2) -> np.ndarray:
    """uint8 (h, w, 3) -> uint8 (h, w, 3): colour jitter (factors and random order as torchvision's ColorJitter),
    grayscale, Gaussian blur sigma ~ U(0.1, 2) px, solarize (values >= 128 inverted, as PIL's ImageOps.solarize)."""
    r = _draws(g)
    if r() < jitter_p:
        b, c, s, h = jitter
        factors = [r(1 - b, 1 + b), r(1 - c, 1 + c), r(1 - s, 1 + s), r(-h, h)]
        for i in np.argsort([r() for _ in range(4)]):  # a random order of the four operations
            x = (_brightness, _contrast, _saturation, _hue)[i](x, factors[i])
    if r() < gray_p:
        x = _gray3(x)
    if r() < blur_p:
        x = _blur(x, r(0.1, 2.0))
    if r() < solarize_p:
        x = cv2.LUT(x, SOLARIZE_LUT)
    return x


def jitter_boxes(boxes: np.ndarray, g, size: int, p: float = 0.5, ratio: float = 0.1):
    """SoCo's box jitter (V1 only): with probability p per box, each coordinate moves by U(-ratio, ratio) x the box
    width (x1, x2) or height (y1, y2); clipped to the size x size view."""
    r, out = _draws(g), boxes.copy()
    for k in range(len(boxes)):
        if r() < p:
            wh = np.tile(boxes[k, 2:] - boxes[k, :2], 2)
            out[k] += np.array([r(-ratio, ratio) for _ in range(4)]) * wh
    out = np.clip(out, 0, size)
    out[:, 2:] = np.maximum(out[:, 2:], out[:, :2])
    return out


def _render(image, boxes, views, g, color: bool, jitter: bool):
    """Pixels and boxes of the three views -> [(uint8 tensor (3, S, S), float32 tensor (K, 4))] x 3."""
    pixels = render_geometry(image, views)
    out = []
    for j, (px, v) in enumerate(zip(pixels, views)):
        if color:  # V1: blur always, no solarize; V2, V3: blur p 0.1, solarize p 0.2 (BYOL's asymmetric pair)
            px = color_augment(px, g, blur_p=1.0 if j == 0 else 0.1, solarize_p=0.0 if j == 0 else 0.2)
        b = map_boxes(boxes, v)
        if j == 0 and jitter:
            b = jitter_boxes(b, g, v["size"])
        # (3, S, S) as a view of the (S, S, 3) array: the collate's stack makes the contiguous batch copy
        out.append((torch.from_numpy(px).permute(2, 0, 1), torch.from_numpy(b.astype(np.float32))))
    return out


def three_views(image: np.ndarray, boxes: np.ndarray, generator: torch.Generator, size: int = 224,
                small_size: int = 112, v3_mode: str = "downsample", color: bool = True, jitter: bool = True,
                scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The three-view box-aware augmentation of 4.1.2 for one image.

    image uint8 (H, W, 3) RGB; boxes (K, 4) xyxy original pixels. Returns [(view uint8 (3, S, S), boxes float32
    (K, 4) xyxy in that view's pixels, clipped)] for V1, V2 (S = size) and V3 (S = small_size). color=False skips the
    colour operations and jitter=False V1's box jitter (tests). All randomness comes from `generator`.
    """
    r = _draws(generator)
    views = sample_geometry(image.shape[0], image.shape[1], r, size, small_size, v3_mode, scale, ratio)
    return _render(image, np.asarray(boxes, np.float32).reshape(-1, 4), views, r, color, jitter)


class PretrainDataset(torch.utils.data.Dataset):
    """Unlabelled images under image_root (any depth) + their selective-search proposals -> three views, K boxes.

    proposals: a dict {relative posix path: (N, 4) xyxy original pixels} or a path for
    selective_search.load_proposals. Checked up front: an empty folder or readable images without proposals (more
    than max_missing of them; those few are skipped with a warning) raise ValueError; unreadable images without
    proposals (selective search skips them) are skipped with a warning. An image with an empty proposal array gets
    the whole image as its one box (SoCo). Item (dict): v1, v2 uint8 (3, S, S), v3 uint8 (3, s, s); b1, b2, b3 float32
    (K, 4) xyxy in their view's pixels; t1, t2, t3 float32 (4,) affine (sx, tx, sy, ty) original -> view; index;
    replaced (the image was unreadable and replaced), fallback (no proposal was visible in all views: the box is the
    region common to all views). Per-sample randomness comes from sample_seed(seed, epoch, index), so a sample is the
    same whatever the number of workers or processes; call set_epoch(e) before building each epoch's DataLoader
    (persistent_workers=False), or sample (epoch, index) items with EpochSampler (persistent workers). Views are
    (3, S, S) permuted views of (S, S, 3) arrays: the default collate stacks them into a new batch tensor.
    """

    def __init__(self, image_root, proposals, K: int = 4, seed: int = 0, size: int = 224, small_size: int = 112,
                 v3_mode: str = "downsample", color: bool = True, jitter: bool = True,
                 min_visible: float = MIN_VISIBLE, max_missing: int = 0):
        self.root = Path(image_root)
        if not self.root.is_dir():
            raise ValueError(f"{self.root}: image folder not found")
        files = list_images(self.root)
        if not files:
            raise ValueError(f"{self.root}: no images ({', '.join(IMG_EXTENSIONS)}) in this folder or its subfolders")
        source = "the proposals dict"
        if not isinstance(proposals, dict):
            import selective_search  # only needed for a proposals file
            source, proposals = str(proposals), selective_search.load_proposals(proposals)
        absent = [f for f in files if f not in proposals]
        missing, unreadable = [], []  # selective search gives an unreadable image no entry: those are skipped
        for f in absent:
            if len(missing) > max_missing:
                break
            (missing if _readable(self.root / f) else unreadable).append(f)
        if len(missing) > max_missing:
            raise ValueError(f"{source}: no proposals for {len(absent) - len(unreadable)} of {len(files)} images "
                             f"under {self.root} (e.g. {missing[:3]}); it has {len(proposals)} entries, e.g. "
                             f"{list(proposals)[:3]}. Run selective_search.py on this folder or pass its file.")
        if missing or unreadable:
            warnings.warn(f"{source}: skipping {len(missing)} images without proposals (e.g. {missing[:3]}) and "
                          f"{len(unreadable)} unreadable ones (e.g. {unreadable[:3]})")
        files = [f for f in files if f in proposals]
        if not files:
            raise ValueError(f"{self.root}: none of its images is readable and has proposals")
        boxes = [np.asarray(proposals[f], np.float32).reshape(-1, 4) for f in files]
        # Flat arrays, not lists of Python objects: loader workers then share them without copy-on-write growth.
        self.files = np.array([f.encode() for f in files], dtype=np.bytes_)  # utf-8
        self.offsets = np.cumsum([0] + [len(b) for b in boxes])
        self.boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32)
        self.K, self.seed, self.size, self.small_size, self.v3_mode = K, seed, size, small_size, v3_mode
        self.color, self.jitter, self.min_visible = color, jitter, min_visible
        self.epoch = 0
        self.bad: set[int] = set()  # indices found unreadable in this process
        self.replaced = 0  # samples served from a replacement image in this process

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> Path:
        return self.root / self.files[index].decode()

    def _load(self, index: int) -> tuple[np.ndarray, int]:
        """Decode image `index`, or a deterministic replacement if it is unreadable: (image, index used)."""
        n = len(self)
        for attempt in range(min(MAX_REPLACE, n)):
            j = index if attempt == 0 else sample_seed(self.seed, -attempt, index) % n  # same every epoch
            if j in self.bad:
                continue
            try:
                return decode_image(self.path(j)), j
            except ValueError as e:
                self.bad.add(j)
                warnings.warn(f"{e}; replaced by another image ({len(self.bad)} unreadable so far)")
        raise RuntimeError(f"{self.root}: {MAX_REPLACE} unreadable images in a row near index {index}")

    def _choose(self, boxes: np.ndarray, H: int, W: int, g: torch.Generator):
        """Geometry and K boxes visible in all views: up to MAX_TRIES geometries (SoCo), padded by repetition."""
        for _ in range(MAX_TRIES):
            views = sample_geometry(H, W, g, self.size, self.small_size, self.v3_mode)
            idx = np.flatnonzero(visible(boxes, views, self.min_visible))
            if len(idx):
                break
        if not len(idx):  # nothing visible after MAX_TRIES: the region every view shows
            return views, np.repeat(common_region(views, H, W), self.K, 0), True
        order = idx[torch.randperm(len(idx), generator=g.g).numpy()][: self.K]
        return views, boxes[order[np.arange(self.K) % len(order)]], False

    def __getitem__(self, item) -> dict:
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        g = Draws(torch.Generator().manual_seed(sample_seed(self.seed, epoch, index)))
        image, j = self._load(index)
        self.replaced += j != index
        H, W = image.shape[:2]
        boxes = self.boxes[self.offsets[j]:self.offsets[j + 1]]
        boxes = np.clip(boxes, 0, [W, H, W, H])
        boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
        if not len(boxes):  # no proposal: the whole image (SoCo)
            boxes = np.array([[0, 0, W, H]], np.float32)
        views, chosen, fallback = self._choose(boxes, H, W, g)
        out = {"index": index, "replaced": j != index, "fallback": fallback}
        for k, (v, (px, b)) in enumerate(zip(views, _render(image, chosen, views, g, self.color, self.jitter)), 1):
            out[f"v{k}"], out[f"b{k}"] = px, b
            out[f"t{k}"] = torch.from_numpy(v["affine"].astype(np.float32))
        return out


def collate_channels_last(items: list[dict]) -> dict:
    """default_collate, but the views (3, S, S) -- permuted views of (S, S, 3) arrays -- are stacked from those arrays
    (a plain copy, not a transposing one) into (B, 3, S, S) tensors with channels_last strides: same values, ~0.5 ms
    less per sample (bench/data_pipeline.py), and a channels_last model on the device needs no transpose."""
    from torch.utils.data import default_collate

    views = {k: torch.stack([it[k].permute(1, 2, 0) for it in items]).permute(0, 3, 1, 2) for k in ("v1", "v2", "v3")}
    rest = default_collate([{k: v for k, v in it.items() if k not in views} for it in items])
    return {**rest, **views}


class EpochSampler(torch.utils.data.Sampler):
    """Wraps a sampler (e.g. DistributedSampler) to yield (epoch, index) items: the epoch travels with each index,
    so persistent loader workers, which keep their own copy of the dataset, still see the current epoch."""

    def __init__(self, sampler):
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)
