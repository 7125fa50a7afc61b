"""PASCAL VOC for the few-shot protocol (paper 4.4, after TFA [33]): VOC XML -> COCO JSON, which coco_data.load_coco
then reads like any COCO split, TFA's base / novel class splits, and the conversion's command line,
`python finetune.py voc2coco`. Not an equation file.

Public
    VOC_CLASSES, VOC_NOVEL_SPLITS
    novel_ids(spec, cat_ids, names) -> list   --novel '1,2' | voc1..voc3 -> category ids (ValueError if not there)
    voc_to_coco(voc_root, image_sets, out_json, classes=VOC_CLASSES) -> dict
    voc2coco_cli(argv)                    finetune.py voc2coco VOC_ROOT --sets YEAR/SET ... --out JSON

Project-local dependencies: none (the standard library only): the file can be copied alone.
"""
from __future__ import annotations

import argparse
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
# TFA [33] / FSRW's three PASCAL VOC base/novel splits (novel class names).
VOC_NOVEL_SPLITS = {1: ("bird", "bus", "cow", "motorbike", "sofa"), 2: ("aeroplane", "bottle", "cow", "horse", "sofa"),
                    3: ("boat", "cat", "motorbike", "sheep", "sofa")}


def novel_ids(spec: str, cat_ids, names) -> list:
    """--novel '1,2' or 'voc1'..'voc3' (TFA's splits, by class name) -> category ids among cat_ids (names: theirs).
    ValueError naming the spec and the categories for an id or VOC class the split does not have."""
    try:
        if spec.startswith("voc"):
            ids = [cat_ids[list(names).index(n)] for n in VOC_NOVEL_SPLITS[int(spec[3:])]]
        else:
            ids = [int(v) for v in spec.split(",")]
    except (KeyError, ValueError):  # voc4, a VOC class the split lacks, a non-integer id
        ids = []
    if not ids or not set(ids) <= set(cat_ids):
        raise ValueError(f"{spec}: expected category ids among {list(cat_ids)} (names {list(names)}) or voc1/voc2/"
                         "voc3 on a VOC split")
    return ids


def voc_to_coco(voc_root, image_sets, out_json, classes=VOC_CLASSES) -> dict:
    """PASCAL VOC XML -> COCO JSON. image_sets: e.g. ["VOC2007/trainval", "VOC2012/trainval"] (each
    <root>/<year>/ImageSets/Main/<set>.txt). VOC's 1-based pixel boxes become 0-based continuous ones
    (x1 - 1, y1 - 1, x2, y2, as detectron2 reads VOC); "difficult" objects keep iscrowd = 0 with "difficult": 1:
    training and K-shot sampling use them (as TFA [33] and detectron2 do), the evaluation ignores detections on them
    (VOC's rule: box_metrics.voc_map50; COCOeval, TIDE and recall read them as crowd through coco_files.load_coco).
    file_name is relative to voc_root.
    Writes out_json atomically and returns the dict."""
    voc_root, images, anns = Path(voc_root), [], []
    cat = {c: i + 1 for i, c in enumerate(classes)}
    for image_set in image_sets:
        year, split = image_set.split("/")
        ids_file = voc_root / year / "ImageSets" / "Main" / f"{split}.txt"
        if not ids_file.is_file():
            raise FileNotFoundError(f"{ids_file}: image set list not found (expected <root>/<year>/ImageSets/Main)")
        for name in ids_file.read_text().split():
            xml = voc_root / year / "Annotations" / f"{name}.xml"
            try:
                tree = ET.parse(xml).getroot()
            except (ET.ParseError, OSError) as e:
                raise ValueError(f"{xml}: cannot parse VOC annotation ({e})") from e
            size = tree.find("size")
            w, h = int(size.find("width").text), int(size.find("height").text)
            images.append({"id": len(images) + 1, "file_name": f"{year}/JPEGImages/{name}.jpg", "width": w,
                           "height": h})
            for obj in tree.findall("object"):
                cname = obj.find("name").text.strip()
                if cname not in cat:
                    raise ValueError(f"{xml}: unknown class {cname!r} (expected one of {classes})")
                bb = obj.find("bndbox")
                x1, y1, x2, y2 = (float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
                x1, y1 = x1 - 1, y1 - 1
                difficult = obj.find("difficult")
                anns.append({"id": len(anns) + 1, "image_id": images[-1]["id"], "category_id": cat[cname],
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                             "iscrowd": 0, "difficult": int(difficult is not None and difficult.text.strip() == "1")})
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": i, "name": c} for c, i in cat.items()]}
    out = Path(out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(coco))
    os.replace(tmp, out)
    return coco


def voc2coco_cli(argv) -> None:
    p = argparse.ArgumentParser(prog="finetune.py voc2coco", description=voc_to_coco.__doc__)
    p.add_argument("voc_root", help="VOCdevkit folder holding VOC2007/, VOC2012/")
    p.add_argument("--sets", nargs="+", required=True, help="e.g. VOC2007/trainval VOC2012/trainval, or VOC2007/test")
    p.add_argument("--out", required=True, help="COCO JSON to write")
    a = p.parse_args(argv)
    coco = voc_to_coco(a.voc_root, a.sets, a.out)
    print(f"{a.out}: {len(coco['images'])} images, {len(coco['annotations'])} objects; use --train-images (or, for "
          f"a test set, --val-images) {a.voc_root}: the file names are relative to it")
