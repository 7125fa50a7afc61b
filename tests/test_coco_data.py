"""coco_data.py's checks of labelled data (paper 4.3-4.4 inputs): fields pycocotools needs, malformed masks and image
sizes, category ids, empty splits, unreadable images in eval mode, and the files that must be importable alone."""
import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import coco_data  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W, H = 40, 32  # image size of the hand-made splits
CATS = [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]


def write_split(tmp_path, n=3, mutate=None, seg=True):
    """n images W x H (image i filled with grey 40 * i) with one 10 x 8 box each (category 3 or 7), as COCO JSON;
    mutate(d) edits the dict before it is written. Returns (json path, image folder)."""
    (tmp_path / "img").mkdir(exist_ok=True)
    images, anns = [], []
    for i in range(1, n + 1):
        cv2.imwrite(str(tmp_path / "img" / f"{i}.png"), np.full((H, W, 3), 40 * i, np.uint8))
        images.append({"id": i, "file_name": f"{i}.png", "width": W, "height": H})
        x, y = 2 * i, i
        anns.append({"id": 10 + i, "image_id": i, "category_id": CATS[i % 2]["id"], "bbox": [x, y, 10, 8],
                     "iscrowd": 0, "area": 80})
        if seg:
            anns[-1]["segmentation"] = [[x, y, x + 10, y, x + 10, y + 8, x, y + 8]]
    d = {"images": images, "annotations": anns, "categories": [dict(c) for c in CATS]}
    if mutate:
        mutate(d)
    path = tmp_path / "split.json"
    path.write_text(json.dumps(d))
    return path, tmp_path / "img"


# ---------------------------------------------------------------- item 1: fields pycocotools needs, masks
def test_missing_iscrowd_and_area_are_filled_and_require_masks(tmp_path):
    def strip(d):
        for a in d["annotations"]:
            a.pop("iscrowd"), a.pop("area")
    cs = coco_data.load_coco(*write_split(tmp_path, mutate=strip))
    a = cs.anns[1][0]
    assert a["iscrowd"] == 0 and a["area"] == pytest.approx(80)
    coco_data.require_masks(cs)  # every annotation has a polygon: nothing to refuse
    path, img = write_split(tmp_path, seg=False)
    cs = coco_data.load_coco(path, img)
    assert sum(map(len, cs.anns.values())) == 3  # box-only annotations still train (the box is the mask)
    with pytest.raises(ValueError, match=r"split.json: 3 annotations have no usable segmentation.*mask AP"):
        coco_data.require_masks(cs)


# ---------------------------------------------------------------- item 3: malformed masks, sizes, category ids
def test_malformed_polygons_are_dropped_and_counted_and_masks_decode(tmp_path):
    def bad(d):
        a = d["annotations"]
        a[0]["segmentation"] = [[1, 2, 3, 4]]                            # < 6 numbers: the annotation has none left
        a[1]["segmentation"] = [[]]                                      # an empty polygon: none left
        a[2]["segmentation"] = a[2]["segmentation"] + [[1, 2, 3, 4, 5]]  # odd length dropped, the valid one kept
    cs = coco_data.load_coco(*write_split(tmp_path, mutate=bad))
    assert cs.skipped == {"bad polygon": 3, "no valid polygon": 2}
    assert [len(v) for v in cs.anns.values()] == [0, 0, 1] and len(cs.anns[3][0]["segmentation"]) == 1
    with pytest.raises(ValueError, match="2 annotations have no usable segmentation"):
        coco_data.require_masks(cs)
    ds = coco_data.DetectionDataset(cs, train=True, with_masks=True)
    _, t = ds[2]  # the kept polygon decodes (pycocotools crashed on the bad ones inside a loader worker)
    assert t["masks"].shape == (1, H, W) and int(t["masks"].sum()) == 80


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d["annotations"][1].update(segmentation={"size": [10, 10], "counts": [0, 100]}),
     r"split.json: annotations\[1\] \(id 12\): RLE size \[10, 10\] differs from image 2's .* \[32, 40\]"),
    (lambda d: d["images"][0].update(width="40"), r"split.json: images\[0\]: width '40' .* positive numbers"),
    (lambda d: d["images"][2].update(height=0), r"split.json: images\[2\]: .*height 0 must be positive numbers"),
    (lambda d: d["categories"][0].update(id="3"), r"split.json: categories\[0\]: category id '3' is not an int"),
    (lambda d: d.update(images=[], annotations=[]), r"split.json: no images"),
])
def test_malformed_entries_raise_naming_file_and_entry(tmp_path, mutate, match):
    with pytest.raises(ValueError, match=match):
        coco_data.load_coco(*write_split(tmp_path, mutate=mutate))


# ---------------------------------------------------------------- item 2: unreadable images in eval mode
def test_eval_mode_never_substitutes_an_unreadable_image(tmp_path):
    cs = coco_data.load_coco(*write_split(tmp_path))
    (tmp_path / "img" / "2.png").write_bytes((tmp_path / "img" / "2.png").read_bytes()[:40])  # truncated
    ds = coco_data.DetectionDataset(cs, train=False)
    with pytest.warns(UserWarning, match=r"2\.png.*image 2 skipped"):
        image, target = ds[1]
    assert image is None and target["image_id"] == 2 and target["file_name"] == "2.png" and ds.bad == 1
    image, target = ds[2]
    assert target["image_id"] == 3 and int(image[0, 0, 0]) == 120  # its own pixels (grey 40 * 3)
    train = coco_data.DetectionDataset(cs, train=True)
    with pytest.warns(UserWarning, match="using the next image"):
        assert train[1][1]["image_id"] == 3  # training still replaces it


# ---------------------------------------------------------------- item 7: files meant to be copied alone
def test_standalone_files_import_alone(tmp_path):
    """coco_data.py, figures.py, tide.py, box_metrics.py each copied into an empty folder import and work there."""
    names = ("coco_data", "figures", "tide", "box_metrics")
    for n in names:
        (tmp_path / n).mkdir()
        shutil.copy(os.path.join(ROOT, f"{n}.py"), tmp_path / n / f"{n}.py")
    path, img = write_split(tmp_path)
    code = f"""
import importlib.util, sys, warnings
mods = {{}}
for n in {names!r}:
    spec = importlib.util.spec_from_file_location(n, f"{tmp_path}/{{n}}/{{n}}.py")
    mods[n] = sys.modules[n] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(mods[n])
    sys.modules.pop(n, None)
assert not {{"data", "augment", "synthetic"}} & set(sys.modules), "a project file was imported"
cs = mods["coco_data"].load_coco("{path}", "{img}")
image, target = mods["coco_data"].DetectionDataset(cs, train=False)[0]
assert tuple(image.shape) == (3, {H}, {W}) and int(image[0, 0, 0]) == 40
mods["figures"].plot_tide({{"m": {{"Loc": 1.0}}}}, "{tmp_path}/t.png", types=("Loc", "Cls"))
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
