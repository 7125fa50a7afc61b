"""Pre-training data: images + selective-search boxes -> samples of three box-aware views (paper section 3.2).

Section 3.2: K boxes per image are drawn at random among the precomputed selective-search proposals (K = 4, 3.4),
among those visible in all three views of section 4.1.2 (augment.py: the geometry, colour and box jitter). Up to 5
geometry tries and padding by repetition follow SoCo's code (reference.md); unreadable images are replaced. The
embedded default dataset lives in synthetic.py and is re-exported here.

Symbols
    H, W         original image height, width (px)
    S, s         view sides: V1, V2 are S x S (224), V3 is s x s (112)
    K            boxes per sample (4)
    N            proposals of one image
    t1..t3       each view's affine map (sx, tx, sy, ty) from original pixels (augment.py): x_view = sx * x + tx,
                 y_view = sy * y + ty; a horizontal flip has sx < 0. Returned so that boxes can be moved between views.

Conventions: boxes are float32 xyxy, continuous pixel coordinates of the image/view they live on (a box covering a
whole W x H image is [0, 0, W, H]). Views are uint8 (3, S, S) RGB; `normalize` makes floats on the device.

Public
    normalize(x uint8 (B, 3, H, W)) -> float (B, 3, H, W)           ImageNet mean / std
    decode_image(path, min_side=16) -> uint8 (H, W, 3) RGB          ValueError naming the file if unusable
    list_images(root) -> sorted relative posix paths of the images under root (any depth)
    sample_seed(seed, epoch, index) -> int                          63-bit seed of one sample's generator
    PretrainDataset(image_root, proposals, K=4, seed=0, size=224, small_size=112, v3_mode="downsample", ...)
    collate_channels_last(items) -> dict                            default_collate, views in channels_last
    EpochSampler(sampler)                                           yields (epoch, index): for persistent workers
    SkipSampler(dataset, num_replicas, rank, ...)                   DistributedSampler + mid-epoch resume (.skip)
    make_loader(dataset, sampler, batch_size, workers, device)      the run's one loader (persistent, pinned)
    to_device(batch, device, channels_last, color=None)             views, boxes, transforms, rpn_boxes on the device
    ensure_synthetic_dataset(root=None, seed=0, ...) -> Path;  synthetic_scene(rng, size)   (from synthetic.py)
    embedded_pool() -> (image folder, proposals file)              the embedded default data, made once
    main(argv)                                                      CLI: draw samples as a PNG (figures.plot_views)

    python data.py --show 4 --out views.png       # 4 samples of the embedded pool: V1, V2, V3 and their K boxes
    python data.py --data DIR --proposals F.npz --show 4 --color-on device
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch

# augment also turns off OpenCV's thread pool (cv2.setNumThreads(0)) on import: loader workers are the parallelism.
from augment import (COLOR_ON, MIN_VISIBLE, V2_RATIO, Draws, common_region, map_boxes_views, render_views,
                     sample_geometry, visible_mapped)
from synthetic import CLASSES, ensure_synthetic_dataset, synthetic_scene  # noqa: F401  (re-exported)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png")  # as ss_proposals.IMAGE_EXTENSIONS: the images it keys proposals by
MIN_IMAGE_SIDE = 16  # px; smaller files are icons or broken thumbnails, no object-level content: treated as bad
MAX_TRIES = 5  # SoCo: geometry redrawn up to 5 times until some proposal is visible in every view
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
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):  # as ss_proposals.find_images
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        out += [(rel / f).as_posix() for f in filenames if f.lower().endswith(IMG_EXTENSIONS)]
    return sorted(out)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """One sample's generator seed from (seed, epoch, index): the same whatever the worker or process count."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: a valid torch.Generator seed


class PretrainDataset(torch.utils.data.Dataset):
    """Unlabelled images under image_root (any depth) + their selective-search proposals -> three views, K boxes.

    proposals: a dict {relative posix path: (N, 4) xyxy original pixels} or a path for ss_proposals.load_proposals.
    Checked up front: an empty folder or readable images without proposals (more than max_missing of them; those few are
    skipped with a warning) raise ValueError; unreadable images without proposals (selective search skips them) are
    skipped with a warning. An image with an empty proposal array gets the whole image as its one box (SoCo). Item
    (dict): v1, v2 uint8 (3, S, S), v3 uint8 (3, s, s); b1, b2, b3 float32 (K, 4) xyxy in their view's pixels (b1 after
    SoCo's box jitter, for L_det); r1 float32 (K, 4): V1's boxes before the jitter, Eq. 1's pseudo ground truth with b2,
    b3 (3.2: the RPN regresses the selective-search boxes); t1, t2, t3 float32 (4,) affine (sx, tx, sy, ty) original ->
    view; c1, c2, c3 float32 (12,) the view's colour parameters (augment.COLOR_FIELDS), already applied to the pixels
    with color_on="loader" (the default), to be applied on the device by color_device.color_batch with "device"; index;
    replaced (the image was unreadable and replaced), fallback (no proposal was visible in all views: the box is the
    region common to all views). Per-sample randomness comes from sample_seed(seed, epoch, index), so a sample is the
    same whatever the number of workers or processes; call set_epoch(e) before building each epoch's DataLoader
    (persistent_workers=False), or sample (epoch, index) items with EpochSampler (persistent workers). Views are (3, S,
    S) permuted views of (S, S, 3) arrays: the default collate stacks them into a new batch tensor.
    """

    def __init__(self, image_root, proposals, K: int = 4, seed: int = 0, size: int = 224, small_size: int = 112,
                 v3_mode: str = "downsample", color: bool = True, jitter: bool = True,
                 min_visible: float = MIN_VISIBLE, max_missing: int = 0, color_on: str = "loader",
                 ratio: tuple = V2_RATIO):
        if color_on not in COLOR_ON:
            raise ValueError(f"color_on must be one of {COLOR_ON}, not {color_on!r}")
        self.root = Path(image_root)
        if not self.root.is_dir():
            raise ValueError(f"{self.root}: image folder not found")
        files = list_images(self.root)
        if not files:
            raise ValueError(f"{self.root}: no images ({', '.join(IMG_EXTENSIONS)}) in this folder or its subfolders")
        source = "the proposals dict"
        if not isinstance(proposals, dict):
            import ss_proposals  # only needed for a proposals file
            source, proposals = str(proposals), ss_proposals.load_proposals(proposals)
        absent = [f for f in files if f not in proposals]
        missing, unreadable = [], []  # selective search gives an unreadable image no entry: those are skipped
        for f in absent:
            if len(missing) > max_missing:
                break
            (missing if _readable(self.root / f) else unreadable).append(f)
        if len(missing) > max_missing:
            raise ValueError(f"{source}: no proposals for {len(absent)} of {len(files)} images under {self.root}, "
                             f"{len(missing)} or more of them readable (e.g. {missing[:3]}); it has {len(proposals)} "
                             f"entries, e.g. {list(proposals)[:3]}. Rerun the command that made it, `python "
                             f"selective_search.py {self.root} OUT.npz [--shard i/n] [options]`, with the same OUT "
                             "(for shard files: their name without .shard{i}of{n}) and options: it retries the images "
                             "it recorded as unreadable and adds missing ones. Or pass the proposals file made for "
                             "this folder.")
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
        self.color, self.jitter, self.min_visible, self.color_on = color, jitter, min_visible, color_on
        self.ratio = tuple(ratio)  # V2's crop aspect range (and V3's with v3_mode="independent")
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
        """Geometry and K boxes visible in all views: up to MAX_TRIES geometries (SoCo), padded by repetition.
        -> (views, boxes (K, 4) original pixels, their clipped view boxes (3, K, 4), fallback)."""
        for _ in range(MAX_TRIES):
            views = sample_geometry(H, W, g, self.size, self.small_size, self.v3_mode, ratio=self.ratio)
            full, clipped = map_boxes_views(boxes, views)  # (3, N, 4) xyxy view pixels, float64
            idx = np.flatnonzero(visible_mapped(full, clipped, self.min_visible))
            if len(idx):
                break
        # DEVIATION (no flag; counted as "fallback" in log.jsonl): the paper does not say what to do when no box is
        # visible in all three views; the region every view shows becomes the K boxes (and Eq. 1's targets)
        if not len(idx):  # nothing visible after MAX_TRIES
            region = np.repeat(common_region(views, H, W), self.K, 0)  # (K, 4)
            return views, region, map_boxes_views(region, views)[1], True
        order = idx[torch.randperm(len(idx), generator=g.g).numpy()][: self.K]
        pick = order[np.arange(self.K) % len(order)]  # (K,) padded by repetition
        return views, boxes[pick], clipped[:, pick], False

    def __getitem__(self, item) -> dict:
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        g = Draws(torch.Generator().manual_seed(sample_seed(self.seed, epoch, index)))
        image, j = self._load(index)
        self.replaced += j != index
        H, W = image.shape[:2]
        boxes = self.boxes[self.offsets[j]:self.offsets[j + 1]]
        boxes = np.clip(boxes, 0, [W, H, W, H])
        boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
        if not len(boxes):  # DEVIATION (follows SoCo; no flag): no proposal left, the whole image is the box
            boxes = np.array([[0, 0, W, H]], np.float32)
        views, chosen, mapped, fallback = self._choose(boxes, H, W, g)
        out = {"index": index, "replaced": j != index, "fallback": fallback,
               "r1": torch.from_numpy(mapped[0].astype(np.float32))}  # render_views jitters a copy
        rendered = render_views(image, chosen, views, g, self.color, self.jitter, mapped, self.color_on)
        for k, (v, (px, b, c)) in enumerate(zip(views, rendered), 1):
            out[f"v{k}"], out[f"b{k}"], out[f"c{k}"] = px, b, c
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


def embedded_pool() -> tuple[Path, Path]:
    """The embedded default data: (folder of the synthetic pool's unlabelled images, their selective-search proposals
    file at the paper preset, 4.1.1), both made once into .cache/synth/ and reused."""
    root = ensure_synthetic_dataset() / "unlabelled"
    proposals = root.parent / "proposals_paper.npz"
    if not proposals.exists():
        import ss_proposals
        ss_proposals.precompute(root, proposals, preset="paper", workers=max(1, os.cpu_count() or 1))
    return root, proposals


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


class SkipSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that skips the first `skip` indices of this epoch (mid-epoch resume)."""

    skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self):
        return super().__len__() - self.skip


def make_loader(dataset, sampler, batch_size: int, workers: int, device) -> torch.utils.data.DataLoader:
    """One loader for the whole run (workers persist across epochs); pinned memory and channels_last batches on CUDA."""
    return torch.utils.data.DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                                       pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                       collate_fn=collate_channels_last if device.type == "cuda" else None)


def to_device(batch: dict, device, channels_last: bool, color=None):
    """uint8 views -> normalised float on the device (normalisation on the device, not in the loader), after their
    colour if `color` (color_fn's) is given: color(views, the batch's c1..c3 parameters). Returns views, boxes (L_det's
    b1..b3), transforms (t1..t3, or None) and rpn_boxes (Eq. 1's r1, b2, b3, or None: a batch without r1)."""
    fmt = torch.channels_last if channels_last and device.type == "cuda" else torch.contiguous_format
    views = [batch[f"v{j}"].to(device, non_blocking=True) for j in (1, 2, 3)]  # uint8 (B, 3, S, S)
    if color is not None:
        views = [color(v, batch[f"c{j}"].to(device, non_blocking=True)) for j, v in zip((1, 2, 3), views)]
    views = [normalize(v).contiguous(memory_format=fmt) for v in views]
    boxes = [batch[f"b{j}"].to(device, non_blocking=True) for j in (1, 2, 3)]
    transforms = [batch[f"t{j}"].to(device, non_blocking=True) for j in (1, 2, 3)] if "t1" in batch else None
    rpn_boxes = [batch["r1"].to(device, non_blocking=True), *boxes[1:]] if "r1" in batch else None
    return views, boxes, transforms, rpn_boxes


def main(argv=None):
    """Draw --show samples (V1, V2, V3 with their K boxes, after colour) into a PNG: what pre-training sees."""
    import argparse

    p = argparse.ArgumentParser(description="Draw pre-training samples (section 4.1.2's three views, section 3.2's "
                                            "K boxes) into a PNG.")
    p.add_argument("--data", help="image folder; default: the embedded synthetic pool (and its cached proposals)")
    p.add_argument("--proposals", help="selective-search proposals file of --data (selective_search.py, 4.1.1)")
    p.add_argument("--show", type=int, default=4, help="samples to draw (the first ones of the epoch)")
    p.add_argument("--epoch", type=int, default=0, help="which epoch's draw of the views")
    p.add_argument("--size", type=int, default=224, help="4.1.2: V1/V2 side (V3 is half of it)")
    p.add_argument("--num-boxes", type=int, default=4, help="3.4: K boxes per sample")
    p.add_argument("--color-on", default="loader", choices=COLOR_ON,
                   help="colour by the loader (OpenCV) or by color_device.color_batch (train.py --color-on)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="views.png", help="PNG to write")
    a = p.parse_args(argv)
    if a.data and not a.proposals:
        raise SystemExit(f"--data {a.data} needs --proposals (run selective_search.py on it first, section 4.1.1)")
    root, proposals = (Path(a.data), Path(a.proposals)) if a.data else embedded_pool()
    ds = PretrainDataset(root, proposals, K=a.num_boxes, seed=a.seed, size=a.size, small_size=a.size // 2,
                         color_on=a.color_on)
    samples = [ds[(a.epoch, i)] for i in range(min(a.show, len(ds)))]
    if a.color_on == "device":
        import color_device
        for s in samples:
            for k in (1, 2, 3):
                s[f"v{k}"] = color_device.color_batch(s[f"v{k}"][None], s[f"c{k}"][None])[0]
    import figures
    print(f"{figures.plot_views(samples, a.out)}: {len(samples)} samples of {root}")


if __name__ == "__main__":
    main()
