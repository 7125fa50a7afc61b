"""Tests for data.py and synthetic.py: normalisation, the pretraining dataset (per-sample seeding, worker count and
epoch sampler, boxes drawn among the visible proposals, errors, unicode paths), bad images, the synthetic set, the CLI.
The view geometry and colour of augment.py are tested in test_augment.py."""
import io
import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

import augment
import data
import ss_proposals
import synthetic


def test_normalize():
    x = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8)
    ref = TF.normalize(x.float() / 255, list(data.IMAGENET_MEAN), list(data.IMAGENET_STD))
    assert torch.allclose(data.normalize(x), ref, atol=1e-5)


# ---- dataset -------------------------------------------------------------------------------------------------------
def write_images(root: Path, n: int, seed: int = 0) -> dict:
    """n synthetic PNGs in two subfolders + proposals: each object's box plus a random box."""
    rng, props = np.random.default_rng(seed), {}
    for i in range(n):
        h, w = int(rng.integers(40, 64)), int(rng.integers(40, 64))
        img, objs = synthetic.synthetic_scene(rng, (h, w), min_side=10)
        rel = f"s{i % 2}/im{i}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / rel)
        boxes = [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] for ys, xs in (np.nonzero(m) for m, _ in objs)]
        props[rel] = np.array(boxes + [[2, 3, w - 5, h - 2]], np.float32)
    return props


def batches(ds, workers, epoch=0, persistent=False, sampler=None):
    ds.set_epoch(epoch)
    loader = DataLoader(ds, batch_size=2, num_workers=workers, sampler=sampler, persistent_workers=persistent)
    return list(loader)


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_samples_do_not_depend_on_worker_count(tmp_path):
    props = write_images(tmp_path, 6)
    ds = data.PretrainDataset(tmp_path, props, K=3, seed=7, size=48, small_size=24)
    b0, b2 = batches(ds, 0), batches(ds, 2)
    assert_same(b0, b2)
    assert b0[0]["v1"].shape == (2, 3, 48, 48) and b0[0]["v3"].shape == (2, 3, 24, 24)
    assert b0[0]["b1"].shape == (2, 3, 4) and b0[0]["t1"].shape == (2, 4)
    e1 = batches(ds, 2, epoch=1)
    assert not torch.equal(e1[0]["v2"], b0[0]["v2"])  # a new epoch draws new views
    assert torch.equal(ds[(1, 0)]["v2"], e1[0]["v2"][0])  # (epoch, index) items
    # persistent workers: the epoch travels with the index through EpochSampler
    sampler = data.EpochSampler(torch.utils.data.SequentialSampler(ds))
    loader = DataLoader(ds, batch_size=2, num_workers=2, sampler=sampler, persistent_workers=True)
    seen = []
    for e in (0, 1):
        sampler.set_epoch(e)
        seen.append(list(loader))
    assert_same(seen[0], b0)
    assert_same(seen[1], e1)


def test_boxes_visible_in_all_views_and_transforms(tmp_path):
    props = write_images(tmp_path, 4, seed=1)
    ds = data.PretrainDataset(tmp_path, props, K=4, size=64, small_size=32, jitter=False, color=False)
    for i in range(len(ds)):
        for e in range(3):
            item = ds[(e, i)]
            for k, size in ((1, 64), (2, 64), (3, 32)):
                b = item[f"b{k}"]
                assert b.shape == (4, 4) and (b >= 0).all() and (b <= size).all()
                assert ((b[:, 2:] - b[:, :2]) >= augment.MIN_BOX_SIDE).all()
            # the affine t maps original boxes onto the returned ones; recover the originals from V1
            sx, tx, sy, ty = item["t1"].double()
            b1 = item["b1"].double()
            xs, ys = (b1[:, [0, 2]] - tx) / sx, (b1[:, [1, 3]] - ty) / sy
            orig = torch.stack([xs.min(1).values, ys[:, 0], xs.max(1).values, ys[:, 1]], 1)
            sx, tx, sy, ty = item["t2"].double()
            x2, y2 = orig[:, [0, 2]] * sx + tx, orig[:, [1, 3]] * sy + ty
            mapped = torch.stack([x2.min(1).values, y2[:, 0], x2.max(1).values, y2[:, 1]], 1).clamp(0, 64)
            assert torch.allclose(mapped, item["b2"].double(), atol=1e-3)


def test_rpn_targets_are_v1_boxes_before_the_jitter(tmp_path):
    """r1 (Eq. 1's V1 pseudo ground truth) is V1's box before SoCo's jitter: the b1 of the same draw without jitter.
    The jitter moves some b1 boxes; b2, b3 and the views' geometry do not depend on it."""
    props = write_images(tmp_path, 4, seed=2)
    kw = dict(K=4, seed=3, size=64, small_size=32, color=False)
    on, off = data.PretrainDataset(tmp_path, props, **kw), data.PretrainDataset(tmp_path, props, jitter=False, **kw)
    moved = 0
    for i in range(len(on)):
        for e in range(3):
            a, b = on[(e, i)], off[(e, i)]
            assert torch.equal(a["r1"], b["b1"]) and torch.equal(b["r1"], b["b1"])
            assert torch.equal(a["b2"], b["b2"]) and torch.equal(a["b3"], b["b3"]) and torch.equal(a["t1"], b["t1"])
            moved += int((a["b1"] != a["r1"]).any(1).sum())
    assert moved > 0  # p = 0.5 per box: some of the 48 boxes moved


def test_v2_ratio_reaches_the_draw(tmp_path):
    """ratio=(1, 1): V2 is a square crop of the square V1, so V2's scale over V1's is the same along x and y (t1, t2:
    the views' affine maps from the image); SoCo's default ratio gives non-square crops."""
    props = write_images(tmp_path, 4, seed=5)
    kw = dict(K=2, size=64, small_size=32, jitter=False, color=False)
    for ratio, square in (((1, 1), True), (augment.V2_RATIO, False)):
        ds = data.PretrainDataset(tmp_path, props, ratio=ratio, **kw)
        zoom = [(ds[(e, i)]["t2"][[0, 2]] / ds[(e, i)]["t1"][[0, 2]]).abs() for e in range(3) for i in range(len(ds))]
        assert all(torch.isclose(z[0], z[1]) for z in zoom) == square  # S / cw == S / ch


def test_min_visible_reaches_the_draw(tmp_path):
    """min_visible=1: every drawn box lies whole in every view (its clipped box is the unclipped one)."""
    props = write_images(tmp_path, 4, seed=4)
    ds = data.PretrainDataset(tmp_path, props, K=4, size=64, small_size=32, jitter=False, color=False,
                              min_visible=1.0)
    for i in range(len(ds)):
        item = ds[(0, i)]
        if item["fallback"]:
            continue
        for k in (2, 3):  # V1 shows the whole image; boxes of V2 / V3 mapped from r1 must not have been clipped
            sx, tx, sy, ty = item["t1"].double()
            b1 = item["r1"].double()
            xs, ys = (b1[:, [0, 2]] - tx) / sx, (b1[:, [1, 3]] - ty) / sy
            sx, tx, sy, ty = item[f"t{k}"].double()
            x2, y2 = xs * sx + tx, ys * sy + ty
            full = torch.stack([x2.min(1).values, y2[:, 0], x2.max(1).values, y2[:, 1]], 1)
            assert torch.allclose(full, item[f"b{k}"].double(), atol=1e-3)


def test_few_or_no_visible_proposals(tmp_path):
    props = write_images(tmp_path, 2)
    rels = sorted(props)
    props[rels[0]] = np.array([[10, 10, 30, 30]], np.float32)  # one proposal: repeated K times
    props[rels[1]] = np.array([[0, 0, 1, 1]], np.float32)  # 1 px: never visible -> the common region
    ds = data.PretrainDataset(tmp_path, props, K=4, size=48, small_size=24, jitter=False)
    one = ds[0]
    assert not one["fallback"] and all((one[f"b{k}"] == one[f"b{k}"][0]).all() for k in (1, 2, 3))
    none = ds[1]
    assert none["fallback"]
    assert torch.allclose(none["b2"], torch.tensor([0.0, 0, 48, 48]).expand(4, 4), atol=1e-3)  # all of V2
    assert torch.allclose(none["b3"], torch.tensor([0.0, 0, 24, 24]).expand(4, 4), atol=1e-3)


def drawn_indices(item, boxes, size, small_size):
    """The proposals (rows of boxes, original pixels) that item's r1 rows are (V1's boxes before the jitter), and the
    mask of those visible in all three views of item's geometry (rebuilt from t1..t3)."""
    views = [{"affine": item[f"t{k}"].double().numpy(), "size": s}
             for k, s in ((1, size), (2, size), (3, small_size))]
    v1 = augment.map_boxes_views(boxes.astype(np.float64), views)[1][0]  # (N, 4) V1 pixels, clipped
    diff = np.abs(item["r1"].double().numpy()[:, None] - v1[None]).max(-1)  # (K, N)
    assert (diff.min(1) < 1e-3).all()
    return diff.argmin(1), augment.visible(boxes, views, data.MIN_VISIBLE)


def test_k_distinct_boxes_drawn_among_the_visible(tmp_path):
    """3.2: the K boxes are K different proposals among those visible in all views (r1: before the jitter, which is
    on); with fewer visible than K, all of them, repeated; a new epoch draws other boxes."""
    props = write_images(tmp_path, 2, seed=5)
    rng = np.random.default_rng(0)
    rels = sorted(props)
    for rel, n_central in ((rels[0], 12), (rels[1], 3)):
        H, W = np.asarray(Image.open(tmp_path / rel)).shape[:2]
        c = np.array([W, H, W, H]) * (0.5 + rng.uniform(-0.05, 0.05, (n_central, 1)))  # centres, then half sides
        half = np.array([W, H, W, H]) * rng.uniform(0.1, 0.25, (n_central, 4)) * [-1, -1, 1, 1]
        tiny = np.array([[0, 0, 1, 1], [W - 1, 0, W, 1], [0, H - 1, 1, H], [W - 1, H - 1, W, H]])  # never visible
        props[rel] = np.concatenate([np.round(c + half), tiny]).astype(np.float32)
    K = 4
    ds = data.PretrainDataset(tmp_path, props, K=K, size=64, small_size=32, color=False, jitter=True)
    enough = few = 0
    choices = set()
    for e in range(10):
        for i, rel in enumerate(rels):
            item = ds[(e, i)]
            if item["fallback"]:
                continue
            idx, vis = drawn_indices(item, props[rel], 64, 32)
            assert vis[idx].all(), (e, i)
            if vis.sum() >= K:
                assert len(set(idx.tolist())) == K, (e, i, idx)  # K distinct proposals
                enough += 1
            else:
                assert set(idx.tolist()) == set(np.flatnonzero(vis).tolist()), (e, i, idx, vis)
                few += vis.sum() >= 2
            if i == 0:
                choices.add(frozenset(idx.tolist()))
    assert enough >= 5 and few >= 2, (enough, few)
    assert len(choices) >= 3  # the choice varies across epochs


def test_dataset_errors(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty.*no images"):
        data.PretrainDataset(tmp_path / "empty", {})
    props = write_images(tmp_path / "imgs", 5)
    short = dict(list(props.items())[:2])
    with pytest.raises(ValueError, match=r"no proposals for 3 of 5 images.*s\d/im\d\.png"):
        data.PretrainDataset(tmp_path / "imgs", short)
    with pytest.warns(UserWarning, match="skipping 3 images"):
        assert len(data.PretrainDataset(tmp_path / "imgs", short, max_missing=3)) == 2
    with pytest.raises(ValueError, match="not found"):
        data.PretrainDataset(tmp_path / "nowhere", props)
    # selective search gives unreadable images no entry: skipped with a warning, not an error
    (tmp_path / "imgs" / "s0" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.warns(UserWarning, match="1 unreadable"):
        assert len(data.PretrainDataset(tmp_path / "imgs", props)) == 5


def test_unicode_paths_and_a_proposals_file(tmp_path):
    props = write_images(tmp_path, 2)
    os_name = next(iter(props))
    (tmp_path / os_name).rename(tmp_path / "s0" / "ünï cödé.png")
    props["s0/ünï cödé.png"] = props.pop(os_name)
    ss_proposals.precompute(tmp_path, tmp_path / "props.npz", workers=1, progress=False)
    ds = data.PretrainDataset(tmp_path, tmp_path / "props.npz", size=32, small_size=16)
    assert {ds.path(i).name for i in range(len(ds))} == {"ünï cödé.png", "im1.png"}
    assert all(ds[i]["v1"].shape == (3, 32, 32) for i in range(len(ds)))


def write_bad_inputs(root: Path) -> dict:
    """The awkward files of issue 3, each with the RGB array it should decode to (None: must be rejected)."""
    rng = np.random.default_rng(0)
    rgb = cv2.GaussianBlur(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), (0, 0), 2)
    root.mkdir(parents=True, exist_ok=True)
    expect = {}
    Image.fromarray(rgb[..., 0]).save(root / "gray.png")
    expect["gray.png"] = np.repeat(rgb[..., :1], 3, 2)
    Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (40, 48), dtype=np.uint8)])).save(root / "rgba.png")
    expect["rgba.png"] = rgb
    cv2.imwrite(str(root / "deep16.png"), rgb[..., ::-1].astype(np.uint16) * 257)  # 16-bit: v * 257 -> v
    expect["deep16.png"] = rgb
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg", quality=98)
    expect["cmyk.jpg"] = rgb
    Image.fromarray(rgb).convert("P").save(root / "palette.png")
    expect["palette.png"] = np.asarray(Image.fromarray(rgb).convert("P").convert("RGB"))
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    (root / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[:300])
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "empty.png").write_bytes(b"")
    Image.fromarray(rgb[:10, :30]).save(root / "tiny.png")
    expect.update({k: None for k in ("truncated.png", "truncated.jpg", "corrupt.jpg", "empty.png", "tiny.png")})
    return expect


def test_decode_bad_inputs(tmp_path):
    for name, want in write_bad_inputs(tmp_path).items():
        if want is None:
            with pytest.raises(ValueError, match=name):
                data.decode_image(tmp_path / name)
            continue
        got = data.decode_image(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == want.shape, name
        tol = 4 if name.endswith(".jpg") else 0  # JPEG is lossy
        assert np.abs(got.astype(int) - want).mean() <= tol, name


def test_bad_images_are_replaced_and_counted(tmp_path):
    expect = write_bad_inputs(tmp_path)
    props = {name: np.array([[4, 4, 30, 30]], np.float32) for name in expect}
    ds = data.PretrainDataset(tmp_path, props, K=2, size=32, small_size=16)
    bad = {i for i in range(len(ds)) if expect[ds.path(i).name] is None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [ds[i] for i in range(len(ds))]
    assert {i for i, it in enumerate(items) if it["replaced"]} == bad
    assert ds.replaced == len(bad) == 5 and len(ds.bad) == 5
    assert {Path(str(w.message).split(":")[0]).name for w in caught} == {ds.path(i).name for i in bad}
    again = data.PretrainDataset(tmp_path, props, K=2, size=32, small_size=16)
    for i in bad:  # the replacement is deterministic
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert torch.equal(again[i]["v1"], items[i]["v1"])


# ---- embedded dataset ----------------------------------------------------------------------------------------------
def test_synthetic_scene_masks():
    rng = np.random.default_rng(3)
    for _ in range(20):
        img, objs = synthetic.synthetic_scene(rng, (70, 90))
        assert img.shape == (70, 90, 3) and img.dtype == np.uint8
        assert 1 <= len(objs) <= synthetic.MAX_OBJECTS
        total = np.zeros((70, 90), int)
        for m, c in objs:
            assert 1 <= c <= len(synthetic.CLASSES) and m.sum() >= synthetic.MIN_AREA
            total += m
        assert total.max() <= 1  # visible masks never overlap: later objects hide earlier ones


def test_synthetic_dataset_is_deterministic_and_valid(tmp_path):
    kw = dict(seed=3, n_unlabelled=5, n_train=4, n_val=3)
    a = synthetic.ensure_synthetic_dataset(tmp_path / "a", **kw)
    b = synthetic.ensure_synthetic_dataset(tmp_path / "b", **kw, workers=2)  # same bytes from 2 processes
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert len(list((a / "unlabelled").glob("*/*.png"))) == 5 and len(list((a / "train").glob("*.png"))) == 4
    for split, n in (("train", 4), ("val", 3)):
        coco = COCO(str(a / "annotations" / f"{split}.json"))
        assert len(coco.getImgIds()) == n and len(coco.getAnnIds()) >= n
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(synthetic.CLASSES)
        for ann in coco.loadAnns(coco.getAnnIds()):
            info = coco.loadImgs(ann["image_id"])[0]
            m = coco.annToMask(ann)
            ys, xs = np.nonzero(m)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ann["area"] == m.sum() and ann["iscrowd"] == 0
            img = data.decode_image(a / split / info["file_name"])
            assert img.shape == (info["height"], info["width"], 3)
    # cached: a second call does not regenerate; another parameter does; a foreign folder is refused
    stamp = (a / "meta.json").stat().st_mtime_ns
    assert synthetic.ensure_synthetic_dataset(tmp_path / "a", **kw) == a
    assert (a / "meta.json").stat().st_mtime_ns == stamp
    synthetic.ensure_synthetic_dataset(tmp_path / "a", **{**kw, "n_val": 2})
    assert len(json.loads((a / "annotations" / "val.json").read_text())["images"]) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".a.") and not p.name.endswith(".lock")]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "photo.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a synthetic dataset"):
        synthetic.ensure_synthetic_dataset(tmp_path / "mine", **kw)


@pytest.mark.parametrize("color_on", ["loader", "device"])
def test_data_cli_draws_the_views(pool, tmp_path, monkeypatch, color_on):
    from PIL import Image

    images, proposals = pool
    import color_device

    out, calls = tmp_path / "views.png", []
    real = color_device.color_batch
    monkeypatch.setattr(color_device, "color_batch", lambda *a: calls.append(1) or real(*a))
    data.main(["--data", str(images), "--proposals", str(proposals), "--show", "2", "--size", "64",
               "--color-on", color_on, "--out", str(out)])
    assert Image.open(out).size == (3 * 224, 2 * 224)  # 3 panels of cell_px per sample row
    assert len(calls) == (6 if color_on == "device" else 0)  # device: the colour applied to every view drawn
    with pytest.raises(SystemExit, match="--proposals"):
        data.main(["--data", str(images)])
