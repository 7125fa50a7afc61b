"""Tests for augment.py: the three views' geometry (affine maps, V3 as V2 at half size, V2's crop range), boxes
mapped through the views and their vectorised path, V1's box jitter, and the colour ops against torchvision."""
import cv2
import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

import augment

GREY, BRIGHT = 100, 250


def bright_box(view: torch.Tensor):
    """xyxy box of the pixels brighter than the midpoint of grey and bright, or None."""
    m = view.max(0).values.numpy() > (GREY + BRIGHT) / 2
    if not m.any():
        return None
    ys, xs = np.nonzero(m)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


@pytest.mark.parametrize("v3_mode", ["downsample", "independent"])
@pytest.mark.parametrize("lo, hi", [(60, 120), (200, 420)])  # large: shrunk by exact halvings after a trim
def test_views_keep_a_bright_square_inside_its_box(v3_mode, lo, hi):
    rng = np.random.default_rng(lo)
    flips = set()
    for seed in range(40):
        H, W = int(rng.integers(lo, hi)), int(rng.integers(lo, hi))
        side = int(rng.integers(lo // 5, lo // 2))
        y0, x0 = int(rng.integers(0, H - side)), int(rng.integers(0, W - side))
        img = np.full((H, W, 3), GREY, np.uint8)
        img[y0:y0 + side, x0:x0 + side] = BRIGHT
        box = np.array([[x0, y0, x0 + side, y0 + side]], np.float32)
        g = torch.Generator().manual_seed(seed)
        views = augment.three_views(img, box, g, size=96, small_size=48, v3_mode=v3_mode, color=False, jitter=False)
        assert [v.shape for v, _ in views] == [(3, 96, 96), (3, 96, 96), (3, 48, 48)]
        for k, (v, b) in enumerate(views):
            b = b[0].numpy()
            found = bright_box(v)
            if found is None:  # the square is outside this crop: the clipped box must be empty
                assert (b[2] - b[0]) * (b[3] - b[1]) < 1.0, (seed, k, b)
            else:
                assert np.abs(found - b).max() <= 1.5, (seed, k, found, b)
        # flips: a square left of centre in V1 appears on the right when V1 is flipped
        flips.add(bool((views[0][1][0, 0] + views[0][1][0, 2]) / 2 > 48) == bool(x0 + side / 2 < W / 2))
    assert flips == {True, False}  # both flipped and unflipped V1 occurred


@pytest.mark.parametrize("v3_mode", ["downsample", "independent"])
def test_view_pixels_follow_the_affine_maps(v3_mode):
    """Render a float image whose pixels hold their own (x, y) centre: each view pixel must hold the original point
    that the view's affine map sends to its centre (resizes are exact on linear ramps; borders excluded)."""
    rng = np.random.default_rng(1)
    for seed in range(20):
        H, W = int(rng.integers(40, 420)), int(rng.integers(40, 420))
        ys, xs = np.mgrid[0:H, 0:W].astype(np.float32) + 0.5
        img = np.dstack([xs, ys, np.zeros_like(xs)])
        views = augment.sample_geometry(H, W, torch.Generator().manual_seed(seed), 64, 32, v3_mode)
        for v, px in zip(views, augment.render_geometry(img, views)):
            sx, tx, sy, ty = v["affine"]
            c = np.arange(v["size"]) + 0.5
            want_x, want_y = (c - tx) / sx, (c - ty) / sy
            inner = slice(3, -3)  # bilinear clamps at the border
            assert np.abs(px[inner, inner, 0] - want_x[None, inner]).max() < 1e-2 * max(1, 1 / abs(sx))
            assert np.abs(px[inner, inner, 1] - want_y[inner, None]).max() < 1e-2 * max(1, 1 / abs(sy))


def test_v3_downsample_is_v2_at_half_size():
    img = np.random.default_rng(1).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    box = np.array([[10, 10, 50, 60]], np.float32)
    v = augment.three_views(img, box, torch.Generator().manual_seed(3), size=64, small_size=32, color=False)
    down = cv2.resize(v[1][0].permute(1, 2, 0).numpy(), (32, 32), interpolation=cv2.INTER_AREA)
    assert np.array_equal(down, v[2][0].permute(1, 2, 0).numpy())
    assert torch.allclose(v[2][1], v[1][1] / 2)


def test_v2_crop_range_follows_4_1_2():
    """4.1.2: V2 is a crop of V1 (S x S) of area fraction in [0.5, 1] and aspect ratio w/h in [3/4, 4/3], drawn with
    sample_geometry's defaults as PretrainDataset calls it; over 200 draws the whole range is used. The crop sides are
    rounded to pixels: a side of >= 158 px moves the area by < 0.0035 and the ratio by < 0.009."""
    S, eps = 224, 0.01
    areas, ratios = [], []
    for seed in range(200):
        H, W = 150 + seed, 450 - seed  # PretrainDataset passes the image's size; V2 crops V1, whatever it is
        v1, v2, _ = augment.sample_geometry(H, W, torch.Generator().manual_seed(seed))
        assert v1["size"] == v2["size"] == S and v2["source"] == "v1"
        top, left, h, w = v2["crop"]
        assert 0 <= top and top + h <= S and 0 <= left and left + w <= S, (seed, v2["crop"])
        areas.append(w * h / S**2)
        ratios.append(w / h)
    assert 0.5 - eps <= min(areas) and max(areas) <= 1, (min(areas), max(areas))
    assert 3 / 4 - eps <= min(ratios) and max(ratios) <= 4 / 3 + eps, (min(ratios), max(ratios))
    assert min(areas) < 0.6 and max(areas) > 0.9  # the range is used, not a narrower one
    assert min(ratios) < 0.8 and max(ratios) > 1.25


def test_box_jitter_only_on_v1_and_bounded():
    img = np.full((80, 80, 3), GREY, np.uint8)
    box = np.array([[20, 20, 60, 60]], np.float32)
    moved = 0
    for seed in range(30):
        a = augment.three_views(img, box, torch.Generator().manual_seed(seed), 64, 32, color=False, jitter=False)
        b = augment.three_views(img, box, torch.Generator().manual_seed(seed), 64, 32, color=False, jitter=True)
        for k in (1, 2):  # V2, V3 geometry comes before V1's jitter draws: identical boxes
            assert torch.equal(a[k][1], b[k][1])
        d = (b[0][1] - a[0][1]).abs()
        wh = (a[0][1][0, 2:] - a[0][1][0, :2]).repeat(2)
        assert (d <= 0.1 * wh + 1e-4).all()
        moved += bool(d.max() > 0)
    assert 5 < moved < 25  # p = 0.5 per box


def per_box_jitter(boxes, r, size, p=0.5, ratio=0.1):
    """augment.jitter_boxes as first written (one numpy call per box): the reference of the vectorised one."""
    out = boxes.copy()
    for k in range(len(boxes)):
        if r() < p:
            wh = np.tile(boxes[k, 2:] - boxes[k, :2], 2)
            out[k] += np.array([r(-ratio, ratio) for _ in range(4)]) * wh
    out = np.clip(out, 0, size)
    out[:, 2:] = np.maximum(out[:, 2:], out[:, :2])
    return out


@pytest.mark.parametrize("v3_mode", ["downsample", "independent"])
def test_vectorised_box_path_equals_per_view_one(v3_mode):
    """map_boxes_views / visible_mapped / jitter_boxes (one numpy call for all views or boxes) give exactly the
    values of map_boxes per view, the per-view visibility loop and a per-box jitter, and consume the same draws."""
    rng, flips = np.random.default_rng(4), set()
    for seed in range(60):
        H, W = int(rng.integers(30, 600)), int(rng.integers(30, 600))
        xy = rng.uniform(-10, [W, H], (40, 2))
        boxes = np.hstack([xy, xy + rng.uniform(0.5, 0.6 * max(H, W), (40, 2))]).astype(np.float32)  # (N, 4)
        views = augment.sample_geometry(H, W, torch.Generator().manual_seed(seed), 96, 48, v3_mode)
        flips |= {bool(v["affine"][0] < 0) for v in views}
        full, clipped = augment.map_boxes_views(boxes, views)  # (3, N, 4)
        ok = np.ones(len(boxes), bool)
        for j, v in enumerate(views):
            assert np.array_equal(full[j], augment.map_boxes(boxes, v, clip=False))
            assert np.array_equal(clipped[j], augment.map_boxes(boxes, v))
            wh = clipped[j][:, 2:] - clipped[j][:, :2]
            area = (full[j][:, 2] - full[j][:, 0]) * (full[j][:, 3] - full[j][:, 1])
            ok &= (wh.min(1) >= augment.MIN_BOX_SIDE) & (wh[:, 0] * wh[:, 1] >= augment.MIN_VISIBLE * area)
        assert np.array_equal(augment.visible(boxes, views), ok)
        a, b = (augment.Draws(torch.Generator().manual_seed(seed)) for _ in range(2))
        assert np.array_equal(augment.jitter_boxes(clipped[0], a, 96), per_box_jitter(clipped[0], b, 96))
        assert a() == b()  # the same number of draws consumed
    assert flips == {True, False}


def test_colour_ops_match_torchvision():
    x = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8), (0, 0), 1.5)
    t = torch.from_numpy(x).permute(2, 0, 1)
    ref = lambda y: y.permute(1, 2, 0).numpy().astype(int)  # noqa: E731
    cases = [(augment._brightness, TF.adjust_brightness, 1.3, 1), (augment._brightness, TF.adjust_brightness, 0.7, 1),
             (augment._contrast, TF.adjust_contrast, 1.4, 2), (augment._contrast, TF.adjust_contrast, 0.6, 2),
             (augment._saturation, TF.adjust_saturation, 1.2, 1), (augment._saturation, TF.adjust_saturation, 0.8, 1),
             (augment._hue, TF.adjust_hue, 0.1, 3), (augment._hue, TF.adjust_hue, -0.07, 3)]
    for ours, theirs, f, tol in cases:
        diff = np.abs(ours(x, f).astype(int) - ref(theirs(t, f)))
        assert diff.max() <= tol, (ours.__name__, f, diff.max())
        assert np.abs(ours(x, f).astype(int) - x).max() > tol  # the op did something
    assert np.abs(augment._gray3(x).astype(int) - ref(TF.rgb_to_grayscale(t, 3))).max() <= 1
    for sigma in (0.3, 1.0, 2.0):
        k = 2 * int(round(3 * sigma)) + 1
        diff = np.abs(augment._blur(x, sigma).astype(int) - ref(TF.gaussian_blur(t, [k, k], [sigma, sigma])))
        assert diff.max() <= 1, (sigma, diff.max())
    solar = cv2.LUT(x, augment.SOLARIZE_LUT)
    assert np.array_equal(solar, ref(TF.solarize(t, 128)))


def _color_augment_before_the_split(x, g, blur_p, solarize_p, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2):
    """augment.color_augment as it was before draw_color / apply_color (commit dddd0d4): draws interleaved with ops."""
    r = augment._draws(g)
    if r() < jitter_p:
        b, c, s, h = jitter
        factors = [r(1 - b, 1 + b), r(1 - c, 1 + c), r(1 - s, 1 + s), r(-h, h)]
        keys = [r() for _ in range(4)]
        for i in sorted(range(4), key=keys.__getitem__):
            x = (augment._brightness, augment._contrast, augment._saturation, augment._hue)[i](x, factors[i])
    if r() < gray_p:
        x = augment._gray3(x)
    if r() < blur_p:
        x = augment._blur(x, r(0.1, 2.0))
    if r() < solarize_p:
        x = cv2.LUT(x, augment.SOLARIZE_LUT)
    return x


def test_split_colour_draws_and_applies_as_before():
    """draw_color + apply_color = the former color_augment: the same pixels and the same draws in the same order
    (the next number from the generator agrees), so --color-on loader samples are those of earlier versions."""
    x = cv2.GaussianBlur(np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8), (0, 0), 1.0)
    for seed in range(40):
        blur_p, solarize_p = (1.0, 0.0) if seed % 2 else (0.1, 0.2)  # V1's and V2/V3's settings
        g_old, g_new = (augment.Draws(torch.Generator().manual_seed(seed)) for _ in range(2))
        old = _color_augment_before_the_split(x, g_old, blur_p, solarize_p)
        assert np.array_equal(augment.color_augment(x, g_new, blur_p, solarize_p), old), seed
        assert g_old() == g_new(), seed


def test_colour_changes_pixels_but_not_boxes():
    img = np.random.default_rng(2).integers(0, 255, (50, 60, 3), dtype=np.uint8)
    box = np.array([[5, 5, 40, 45]], np.float32)
    plain = augment.three_views(img, box, torch.Generator().manual_seed(5), 64, 32, color=False)
    col = augment.three_views(img, box, torch.Generator().manual_seed(5), 64, 32, color=True)
    assert any(not torch.equal(p[0], c[0]) for p, c in zip(plain, col))
    assert torch.equal(plain[1][1], col[1][1]) and torch.equal(plain[2][1], col[2][1])
    for v, b in col:
        assert v.dtype == torch.uint8 and b.dtype == torch.float32 and b.shape == (1, 4)

