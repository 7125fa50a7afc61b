"""Labelled data for fine-tuning: COCO JSON loading and checks, label-fraction and K-shot subsets, the dataset.

Paper 4.3 (COCO full / 10% / 1%, SODA10M) and 4.4 (PASCAL VOC few-shot after [33], TFA; VOC XML -> COCO and TFA's
VOC splits: voc_data.py). Not an equation file.

COCO handling (as detectron2 / torchvision train on COCO): crowd annotations (iscrowd = 1) are dropped from training
targets (COCOeval still ignores detections on them); images without annotations load (finetune.py drops them from
training unless --keep-empty, as detectron2's FILTER_EMPTY_ANNOTATIONS and torchvision's references do);
category ids (COCO's are non-contiguous, 1..90) map to labels 1..C in increasing id order and back (`cat_ids`).
Boxes [x, y, w, h] are clipped to the image; one with a side < MIN_BOX_SIDE px after clipping is skipped and
counted. Missing iscrowd / area are filled (0 / box w * h) as pycocotools needs them. Segmentations: a polygon
with fewer than 6 numbers, an odd count or non-numbers is dropped and counted ("bad polygon"), an annotation left
with no valid polygon is skipped and counted ("no valid polygon"); `segmentation: []` or none means no mask (the box
is the training mask, but mask AP needs masks: `require_masks`). Malformed input raises ValueError naming the file
and the entry: an RLE whose size is not the image's [height, width], a width / height that is not a positive number,
a category id that is not an int, a split with no images.

Few-shot protocol (4.4.1, TFA [33]): the paper drops TFA's base-training stage, so every class is few-shot: for each
class, images containing it are drawn (seeded) until exactly K of its instances are collected (images that would
overshoot are passed over), and only that class's annotations are kept in those images (TFA's per-class K-shot
files). Table 2's "All" mAP50 of 1-5 shows the base classes were K-shot too. `base_full=True` instead keeps every
annotation of the non-novel classes (the generalised few-shot setting of [34]); `novel` otherwise only selects which
classes the "novel" metric averages.

Symbols
    N   train images; C classes; K shots (instances per class)

Public
    MIN_BOX_SIDE
    CocoSet = load_coco(json_path, image_root, check_files=True)   .images, .anns (per image id), .cat_ids, .names
    require_masks(cocoset) -> None        ValueError naming the file when some annotation has no mask (no mask AP)
    label_fraction_subset(image_ids, fraction, seed) -> sorted image ids
    kshot_subset(cocoset, shots, seed, novel=None, base_full=False) -> {image_id: [annotation, ...]}
    ann_mask(annotation, h, w) -> uint8 (h, w)   its polygons or RLE decoded; the clipped box filled when it has none
    DetectionDataset(cocoset, train=True, with_masks=False, keep=None, seed=0): item -> (image uint8 (3,H,W), target);
        in eval mode an unreadable image gives (None, {"image_id", "file_name", "error"}) (predict.predict skips it)
    DetectionDataset.orientations() -> [0 | 1 per item]   1 where the image is portrait (height > width)
    collate(batch) -> (images list, targets list)
    InfiniteSampler(n, rank, world, seed, start=0)   (index, pass) keys for DetectionDataset, endless, per rank
    AspectRatioBatches(sampler, groups, batch, start=0)   batches of keys of one orientation (aspect-ratio grouping)

Project-local dependencies: none (numpy, torch, OpenCV, pycocotools only): the file can be copied alone.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils

MIN_BOX_SIDE = 1.0  # px after clipping: thinner boxes carry no usable regression target
READ_FLAG = getattr(cv2, "IMREAD_COLOR_RGB", cv2.IMREAD_COLOR)  # OpenCV >= 4.10 decodes straight to RGB (as data.py)


@dataclass
class CocoSet:
    """A checked COCO split. anns[image_id]: its usable non-crowd annotations (bbox clipped, xyxy in "box")."""
    path: str
    root: str
    images: dict = field(default_factory=dict)     # id -> image record
    anns: dict = field(default_factory=dict)       # id -> list of annotation records (+ "box": xyxy clipped)
    cat_ids: list = field(default_factory=list)    # label l <-> category id cat_ids[l - 1]
    names: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)    # reason -> count
    label_of: dict = field(default_factory=dict)   # category id -> label 1..C
    unmasked: list = field(default_factory=list)   # ids (else locations) of annotations without a usable mask

    def label(self, cat_id: int) -> int:
        return self.label_of[cat_id]


def _need(obj, keys, where: str):
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing {missing}: {json.dumps(obj)[:160]}")


def _number(v) -> bool:
    """A finite int or float (a JSON true / false is no number here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_coco(json_path, image_root, check_files: bool = True) -> CocoSet:
    """Read and check a COCO detection JSON; ValueError naming the file and the entry for malformed content or a
    split with no images, FileNotFoundError listing missing image files (check_files)."""
    json_path = str(json_path)
    try:
        with open(json_path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path}: not valid JSON ({e})") from e
    _need(d, ("images", "annotations", "categories"), json_path)
    cs = CocoSet(json_path, str(image_root))
    _add_categories(cs, d["categories"])
    for i, im in enumerate(d["images"]):
        where = f"{json_path}: images[{i}]"
        _need(im, ("id", "file_name", "width", "height"), where)
        if not all(_number(im[k]) and im[k] > 0 for k in ("width", "height")):
            raise ValueError(f"{where}: width {im['width']!r} and height {im['height']!r} must be positive numbers")
        if im["id"] in cs.images:
            raise ValueError(f"{where}: duplicate image id {im['id']}")
        cs.images[im["id"]], cs.anns[im["id"]] = im, []
    if not cs.images:
        raise ValueError(f"{json_path}: no images (an empty split: nothing to train on or evaluate)")
    for i, a in enumerate(d["annotations"]):
        for reason in _add_annotation(cs, a, f"{json_path}: annotations[{i}]"):
            cs.skipped[reason] = cs.skipped.get(reason, 0) + 1
    if check_files:
        missing = [im["file_name"] for im in cs.images.values()
                   if not os.path.isfile(os.path.join(image_root, im["file_name"]))]
        if missing:
            raise FileNotFoundError(f"{json_path}: {len(missing)} image files missing under {image_root}, "
                                    f"e.g. {missing[:3]}")
    return cs


def _add_categories(cs: CocoSet, categories) -> None:
    """cs.cat_ids / names / label_of from the JSON's categories; ValueError for a non-int or duplicate id."""
    for i, c in enumerate(categories):
        _need(c, ("id",), f"{cs.path}: categories[{i}]")
        if not isinstance(c["id"], int) or isinstance(c["id"], bool):
            raise ValueError(f"{cs.path}: categories[{i}]: category id {c['id']!r} is not an int")
    cats = sorted(categories, key=lambda c: c["id"])
    cs.cat_ids, cs.names = [c["id"] for c in cats], [c.get("name", str(c["id"])) for c in cats]
    if len(set(cs.cat_ids)) != len(cs.cat_ids):
        raise ValueError(f"{cs.path}: duplicate category ids {cs.cat_ids}")
    cs.label_of = {c: i + 1 for i, c in enumerate(cs.cat_ids)}


def _valid_polygon(p) -> bool:
    """A COCO polygon pycocotools can rasterise: a flat list of >= 3 (x, y) pairs of finite numbers."""
    return isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(_number(v) for v in p)


def _segmentation(seg, im: dict, where: str):
    """(usable segmentation or None, number of dropped polygons) of an annotation on image im; ValueError naming
    the entry for an RLE that is not of the image's [height, width] or a segmentation of another type."""
    if seg is None or seg == []:
        return None, 0
    if isinstance(seg, list):
        valid = [p for p in seg if _valid_polygon(p)]
        return valid or None, len(seg) - len(valid)
    if not isinstance(seg, dict) or "counts" not in seg or not isinstance(seg.get("size"), list):
        raise ValueError(f"{where}: segmentation {str(seg)[:80]} is neither polygons nor an RLE with size, counts")
    if [int(v) if _number(v) else v for v in seg["size"]] != [im["height"], im["width"]]:
        raise ValueError(f"{where}: RLE size {seg['size']} differs from image {im['id']}'s [height, width] "
                         f"[{im['height']}, {im['width']}]")
    return seg, 0


def _add_annotation(cs: CocoSet, a, where: str) -> list:
    """Check one annotation and file it under its image with its clipped xyxy "box" (iscrowd, area filled; bad
    polygons dropped); returns the reasons to count (bad polygon per dropped polygon; crowd, degenerate box or no
    valid polygon when it is skipped), raises ValueError naming the entry when it is malformed."""
    where += f" (id {a.get('id') if isinstance(a, dict) else '?'})"
    _need(a, ("image_id", "category_id", "bbox"), where)
    if a["image_id"] not in cs.images:
        raise ValueError(f"{where}: unknown image_id {a['image_id']!r}")
    if a["category_id"] not in cs.label_of:
        raise ValueError(f"{where}: unknown category_id {a['category_id']!r} (categories: {cs.cat_ids})")
    b = a["bbox"]
    if not (isinstance(b, list) and len(b) == 4 and all(_number(v) for v in b)):
        raise ValueError(f"{where}: bbox {b!r} is not four finite numbers [x, y, w, h]")
    im = cs.images[a["image_id"]]
    seg, bad = _segmentation(a.get("segmentation"), im, where)
    reasons = ["bad polygon"] * bad
    if seg is None:
        cs.unmasked.append(a.get("id", where))
    if bad and seg is None:
        return reasons + ["no valid polygon"]
    if a.get("iscrowd", 0):
        return reasons + ["crowd"]
    x1, y1 = min(max(b[0], 0.0), im["width"]), min(max(b[1], 0.0), im["height"])
    x2, y2 = min(max(b[0] + b[2], 0.0), im["width"]), min(max(b[1] + b[3], 0.0), im["height"])
    if x2 - x1 < MIN_BOX_SIDE or y2 - y1 < MIN_BOX_SIDE:
        return reasons + ["degenerate box"]
    rec = {**a, "iscrowd": 0, "area": a.get("area", float(b[2] * b[3])),
           "box": [float(x1), float(y1), float(x2), float(y2)]}
    if "segmentation" in a:
        rec["segmentation"] = seg or []
    cs.anns[a["image_id"]].append(rec)
    return reasons


def require_masks(cs: CocoSet) -> None:
    """ValueError naming the file when some annotation of the split (crowds included) has no usable mask (no
    segmentation, or only malformed polygons): pycocotools' mask AP needs every ground truth's mask, so a Mask R-CNN
    run must refuse such a val split before training rather than lose its mask AP after it."""
    if cs.unmasked:
        raise ValueError(f"{cs.path}: {len(cs.unmasked)} annotations have no usable segmentation (e.g. ids "
                         f"{cs.unmasked[:5]}): mask AP cannot be evaluated on this split; train a box-only detector "
                         "or give a val split with masks")


def label_fraction_subset(image_ids, fraction: float, seed: int = 0) -> list:
    """A seeded random fraction of the images (4.3: 1% / 10% of train2017), at least one; sorted ids."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction {fraction} not in (0, 1]")
    ids = sorted(image_ids)
    if not ids:
        raise ValueError("label fraction subset of an empty split: no images to choose from")
    n = max(1, int(round(fraction * len(ids))))
    pick = np.random.default_rng(seed).choice(len(ids), size=n, replace=False)
    return sorted(ids[i] for i in pick)


def kshot_subset(cs: CocoSet, shots: int, seed: int = 0, novel=None, base_full: bool = False) -> dict:
    """K-shot training set (4.4, TFA): {image_id: kept annotations}. See the module docstring for the protocol.

    A class with fewer than K instances in total keeps all of them (a warning says so).
    """
    rng = np.random.default_rng(seed)
    novel = set(novel if novel is not None else cs.cat_ids)
    keep: dict = {}
    for cat in cs.cat_ids:
        if base_full and cat not in novel:
            for iid, anns in cs.anns.items():
                sel = [a for a in anns if a["category_id"] == cat]
                if sel:
                    keep.setdefault(iid, []).extend(sel)
            continue
        having = sorted(iid for iid, anns in cs.anns.items() if any(a["category_id"] == cat for a in anns))
        count = 0
        for j in rng.permutation(len(having)):
            sel = [a for a in cs.anns[having[j]] if a["category_id"] == cat]
            if count + len(sel) <= shots:
                keep.setdefault(having[j], []).extend(sel)
                count += len(sel)
            if count == shots:
                break
        if count < shots:
            warnings.warn(f"{cs.path}: category {cat} gives only {count} of {shots} shots", stacklevel=2)
    return {iid: sorted(anns, key=lambda a: a.get("id", 0)) for iid, anns in sorted(keep.items())}


def _decode_image(path) -> np.ndarray:
    """Any image file -> uint8 (H, W, 3) RGB through OpenCV (8-bit, 3 channels, EXIF orientation applied), as
    data.decode_image(path, min_side=1); ValueError(f"{path}: ...") when it cannot be read or decoded."""
    try:
        buf = np.fromfile(str(path), dtype=np.uint8)
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e})") from e
    img = cv2.imdecode(buf, READ_FLAG) if buf.size else None
    if img is None:
        raise ValueError(f"{path}: not a decodable image (empty, corrupt, truncated or unsupported format)")
    return img if READ_FLAG != cv2.IMREAD_COLOR else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def ann_mask(a: dict, h: int, w: int) -> np.ndarray:
    """An annotation's mask uint8 (h, w) from polygons or RLE; the clipped box filled when it has none."""
    seg = a.get("segmentation")
    if not seg:
        m = np.zeros((h, w), np.uint8)
        x1, y1, x2, y2 = a["box"]
        m[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))] = 1
        return m
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = seg
    return mask_utils.decode(rle).astype(np.uint8)


class DetectionDataset(torch.utils.data.Dataset):
    """(image uint8 (3, H, W), target) items; target: boxes (M, 4) xyxy float32, labels (M,) int64 1..C,
    masks (M, H, W) uint8 (with_masks), image_id. Training flips horizontally with p = 0.5 (seeded per item
    and epoch). keep: {image_id: annotations} (a K-shot set) or a list of image ids; None = all images.

    An image that fails to decode (or whose size is not the JSON's) warns, naming the file, and is counted (.bad).
    Training replaces it by the next one, never a crash. Evaluation (train=False) never substitutes (its predictions
    would go under the wrong image id): the item is (None, {"image_id", "file_name", "error"}), which predict.predict
    skips and records, so that only the images actually predicted are evaluated.
    """

    def __init__(self, cs: CocoSet, train: bool = True, with_masks: bool = False, keep=None, seed: int = 0):
        self.cs, self.train, self.with_masks, self.seed, self.epoch = cs, train, with_masks, seed, 0
        if isinstance(keep, dict):
            self.ids, self.anns = list(keep), keep
        else:
            self.ids = sorted(keep) if keep is not None else sorted(cs.images)
            self.anns = cs.anns
        self.bad = 0

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def orientations(self) -> list[int]:
        """Per item: 1 for a portrait image (height > width, from the JSON), else 0 (AspectRatioBatches' groups;
        square images go with the landscape ones)."""
        return [int(self.cs.images[i]["height"] > self.cs.images[i]["width"]) for i in self.ids]

    def __getitem__(self, key):
        """key: an index, or (index, pass) from InfiniteSampler (the pass seeds the flip)."""
        i, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        if not 0 <= i < len(self.ids):
            raise IndexError(f"index {i} out of range for {len(self.ids)} images")
        if not self.train:
            iid = self.ids[i]
            try:
                img = self._decode(iid)
            except ValueError as e:
                self.bad += 1
                warnings.warn(f"{e}; image {iid} skipped: left out of the evaluation ({self.bad} skipped so far)",
                              stacklevel=2)
                return None, {"image_id": iid, "file_name": self.cs.images[iid]["file_name"], "error": str(e)}
            return self._item(iid, img, epoch)
        for j in range(len(self.ids)):
            iid = self.ids[(i + j) % len(self.ids)]
            try:
                img = self._decode(iid)
            except ValueError as e:
                self.bad += 1
                warnings.warn(f"{e}; using the next image instead ({self.bad} replaced so far)", stacklevel=2)
                continue
            return self._item(iid, img, epoch)
        raise ValueError(f"{self.cs.path}: no image under {self.cs.root} could be decoded")

    def _decode(self, iid):
        """Image iid as uint8 (H, W, 3) RGB; ValueError naming the file if unreadable or not of the JSON's size."""
        im = self.cs.images[iid]
        img = _decode_image(os.path.join(self.cs.root, im["file_name"]))
        H, W = img.shape[:2]
        if (W, H) != (im["width"], im["height"]):
            raise ValueError(f"{self.cs.path}: image {iid} ({im['file_name']}) is {W}x{H}, the JSON says "
                             f"{im['width']}x{im['height']}")
        return img

    def _item(self, iid, img: np.ndarray, epoch: int):
        H, W = img.shape[:2]
        anns = self.anns.get(iid, [])
        boxes = torch.tensor([a["box"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.cs.label(a["category_id"]) for a in anns], dtype=torch.int64)
        target = {"boxes": boxes, "labels": labels, "image_id": iid}
        if self.with_masks:
            masks = np.stack([ann_mask(a, H, W) for a in anns]) if anns else np.zeros((0, H, W), np.uint8)
            target["masks"] = torch.from_numpy(masks)
        image = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)  # (3, H, W) uint8
        flip = self.train and bool(np.random.default_rng([self.seed, epoch, iid]).random() < 0.5)
        if flip:
            image = image.flip(-1)
            target["boxes"] = torch.stack([W - boxes[:, 2], boxes[:, 1], W - boxes[:, 0], boxes[:, 3]], dim=1)
            if self.with_masks:
                target["masks"] = target["masks"].flip(-1)
        return image, target


def collate(batch):
    """List of (image, target) -> (images list, targets list): images keep their own sizes."""
    return [b[0] for b in batch], [b[1] for b in batch]


class InfiniteSampler(torch.utils.data.Sampler):
    """Seeded reshuffled passes over the data, split across ranks, as (index, pass) keys, starting after `start`
    keys of this rank (resume). Iteration-based training: no epoch boundary to synchronise."""

    def __init__(self, n: int, rank: int, world: int, seed: int, start: int = 0):
        if n < 1:
            raise ValueError("InfiniteSampler: no items to sample (empty train subset)")
        self.n, self.rank, self.world, self.seed, self.start = n, rank, world, seed, start

    def __iter__(self):
        reps = math.ceil(self.world / self.n)  # fewer images than ranks: repeat them
        e, skip = 0, self.start
        while True:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + e))
            share = perm.repeat(reps)[self.rank::self.world].tolist()
            for i in share[skip:]:
                yield (i, e)
            skip, e = max(0, skip - len(share)), e + 1


class AspectRatioBatches(torch.utils.data.Sampler):
    """Batches of `batch` keys from `sampler` whose items share a group (DetectionDataset.orientations: landscape or
    portrait), as detectron2's ASPECT_RATIO_GROUPING and torchvision's GroupedBatchSampler: a batch padded to its
    largest image wastes less. A key waits in its group's buffer until the group holds `batch` keys. The batches are
    a function of the sampler's stream alone, so a resumed run builds the sampler from its start and skips its first
    `start` batches (keys only: no image is read)."""

    def __init__(self, sampler, groups: list[int], batch: int, start: int = 0):
        self.sampler, self.groups, self.batch, self.start = sampler, groups, batch, start

    def __iter__(self):
        buffers, made = {}, 0
        for key in self.sampler:  # an index, or InfiniteSampler's (index, pass)
            g = self.groups[key[0] if isinstance(key, tuple) else key]
            buffers.setdefault(g, []).append(key)
            if len(buffers[g]) == self.batch:
                if made >= self.start:
                    yield buffers[g]
                buffers[g], made = [], made + 1
