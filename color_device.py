"""BYOL's colour augmentation (paper 4.1.2) applied on the device to a whole batch of views (issue 7's fast path).

augment.apply_color applies one view's colour with OpenCV in a loader worker: about a third of a three-view sample's
CPU time (bench/data_pipeline.py). With train.py --color-on device the worker only draws the parameters
(augment.draw_color: the same draws in the same order, so the same geometry, boxes and parameters) and color_batch
applies them here, on the batch, with torch ops in float32. After each operation the values are rounded and saturated
to 0..255, as the uint8 OpenCV path does. Brightness and contrast give the loader's values, saturation, grayscale
and blur agree within 1 level and solarize exactly; the hue is continuous here (within 1 level of torchvision's
adjust_hue) where OpenCV's 8-bit HSV has 256 steps per turn, so after a hue shift single pixels differ by up to ~12
levels from the loader's, < 0.5 level on average (tests/test_color_device.py).

Operations (BYOL / SoCo, augment.py): colour jitter (brightness f x; contrast f x + (1 - f) mean luma; saturation
f x + (1 - f) luma; hue rotated by h turns) in a random order per view, p 0.8; grayscale p 0.2; Gaussian blur;
solarize (values >= 128 inverted). The order is per sample, so the batch cannot apply one operation after another.
Brightness, contrast and saturation are affine maps of a pixel's RGB: each of the four jitter positions is one
batched 3 x 3 matrix plus offset per view (the identity where that position holds the hue or the jitter is off).
The hue, the only non-linear one, runs once: the positions before it (p < q), the hue, then those after it (p > q).

Symbols
    B, H, W     batch size, view height, width
    P           len(augment.COLOR_FIELDS) = 12 parameters per view: jitter, f_b, f_c, f_s, f_h (turns), order0..3,
                gray, sigma (px, 0 = no blur), solarize
    q           (B,) the hue's position among the four jitter operations (4 when the jitter is off)
    M, o        (B, 3, 3), (B, 3): one jitter position's affine map x -> M x + o per view
    c           (B, 4): per jitter position, o's coefficient of the mean luma (not an offset itself): o = c mean_luma(x)
                on all three channels, x the image as it is when that position applies; 1 - f_c at the contrast's
                position, 0 at the others (and where the jitter is off)

Public
    rgb_to_hsv(x) -> hsv;  hsv_to_rgb(hsv) -> x      float (B, 3, H, W), RGB in 0..1 <-> h in turns [0, 1), s, v in 0..1
    affine_step(x, M, o) -> x                        M x + o per pixel, rounded and saturated to 0..255
    jitter_maps(params) -> M (B, 4, 3, 3), c (B, 4), q (B,)   each jitter position's affine map, the hue's position
    gaussian_taps(sigma) -> (B, 2 R + 1)             per-view blur kernels, OpenCV's size 2 round(3 sigma) + 1
    color_batch(x uint8 (B, 3, H, W), params float (B, P)) -> uint8 (B, 3, H, W)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from augment import COLOR_FIELDS, COLOR_OPS, LUMA

FIELD = {name: i for i, name in enumerate(COLOR_FIELDS)}
BRIGHTNESS, CONTRAST, SATURATION, HUE = (COLOR_OPS.index(op) for op in ("brightness", "contrast", "saturation", "hue"))
MAX_RADIUS = 6  # blur taps each side: round(3 sigma) for draw_color's largest sigma, 2 px (larger ones are truncated)

_CONST: dict = {}  # device -> (luma (3,), identity (3, 3)): made once per device (a host-to-device copy syncs)


def _constants(device) -> tuple[torch.Tensor, torch.Tensor]:
    if device not in _CONST:
        _CONST[device] = (torch.tensor(LUMA.tolist(), device=device), torch.eye(3, device=device))
    return _CONST[device]


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) RGB in 0..1 -> HSV: h in turns [0, 1) (0 for greys), s = (max - min) / max, v = max."""
    r, g, b = x.unbind(1)  # (B, H, W) each
    v, lo = x.amax(1), x.amin(1)
    d = v - lo
    s = d / v.clamp_min(1e-12)  # 0 where v = 0 (then d = 0)
    dd = d.clamp_min(1e-12)
    h = torch.where(v == r, (g - b) / dd, torch.where(v == g, 2 + (b - r) / dd, 4 + (r - g) / dd))  # sixths of a turn
    h = torch.where(d > 0, (h / 6) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, v], 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) h in turns, s, v in 0..1 -> RGB in 0..1: channel n of (R, G, B) = v - v s clamp(min(k,
    4 - k), 0, 1) with k = (n' + 6 h) mod 6, n' = 5, 3, 1 (the closed form of the six-sector rule)."""
    h, s, v = hsv[:, 0:1], hsv[:, 1:2], hsv[:, 2:3]  # (B, 1, H, W)
    n = torch.arange(5.0, 0.0, -2.0, device=hsv.device).view(1, 3, 1, 1)  # 5, 3, 1 made on the device: no copy
    k = (n + 6 * h) % 6  # (B, 3, H, W)
    return v - v * s * torch.minimum(k, 4 - k).clamp(0, 1)


def affine_step(x: torch.Tensor, M: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) 0..255, M (B, 3, 3), o (B, 3) -> M x + o at every pixel, rounded and saturated (uint8's
    saturate_cast). The identity (M = I, o = 0) returns x unchanged for integer-valued x."""
    B, C, H, W = x.shape
    y = torch.baddbmm(o.unsqueeze(2), M, x.reshape(B, C, H * W))  # (B, 3, H W)
    return y.view(B, C, H, W).round_().clamp_(0, 255)


def jitter_maps(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """params (B, P) -> the affine map of each jitter position, before the contrast's mean: M (B, 4, 3, 3), c (B, 4)
    (the offset is c x the mean luma of the image as it is when that position applies), and q (B,) the hue's position
    (4 where the jitter is off). The identity where the position holds the hue or the jitter is off."""
    luma, eye = _constants(params.device)
    jitter = params[:, FIELD["jitter"]] > 0  # (B,)
    op = params[:, FIELD["order0"]:FIELD["order3"] + 1].long()  # (B, 4) COLOR_OPS index at each position
    f = params[:, FIELD["brightness"]:FIELD["hue"] + 1].gather(1, op)  # (B, 4) that operation's factor
    fe = f[:, :, None, None]  # (B, 4, 1, 1)
    M = torch.where((op == SATURATION)[:, :, None, None], fe * eye + (1 - fe) * luma.expand(3, 3), fe * eye)
    linear = jitter[:, None] & (op != HUE)  # (B, 4)
    M = torch.where(linear[:, :, None, None], M, eye)
    c = torch.where(linear & (op == CONTRAST), 1 - f, torch.zeros_like(f))
    q = torch.where(jitter, (op == HUE).long().argmax(1), torch.full_like(op[:, 0], 4))
    return M, c, q


def _jitter_step(y: torch.Tensor, M: torch.Tensor, c: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """One jitter position for the views where `on` (B,): y -> M y + c mean_luma(y), rounded and saturated."""
    luma, eye = _constants(y.device)
    mean = y.mean((2, 3)) @ luma  # (B,) mean luma of the values (cv2.mean, then the luma weights)
    o = (torch.where(on, c, torch.zeros_like(c)) * mean)[:, None].expand(-1, 3)  # (B, 3)
    return affine_step(y, torch.where(on[:, None, None], M, eye), o)


def gaussian_taps(sigma: torch.Tensor) -> torch.Tensor:
    """sigma (B,) px -> (B, 2 MAX_RADIUS + 1) normalised taps exp(-t^2 / (2 sigma^2)) for |t| <= round(3 sigma) (the
    kernel size OpenCV picks for uint8, augment._blur), zero outside; sigma = 0 gives the identity [.., 0, 1, 0, ..]."""
    t = torch.arange(-MAX_RADIUS, MAX_RADIUS + 1, device=sigma.device, dtype=sigma.dtype)  # (T,)
    s = torch.where(sigma > 0, sigma, torch.ones_like(sigma))[:, None]  # (B, 1), no 0 / 0
    w = torch.exp(-t ** 2 / (2 * s ** 2)) * (t.abs() <= torch.round(3 * sigma)[:, None])  # (B, T)
    return w / w.sum(1, keepdim=True)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W), sigma (B,) -> separable Gaussian blur per view, reflected borders (OpenCV's
    BORDER_REFLECT_101 = torch's "reflect"), rounded and saturated."""
    B, C, H, W = x.shape
    taps = gaussian_taps(sigma).repeat_interleave(C, 0)  # (B C, T): the same kernel for a view's 3 channels
    y = F.pad(x.reshape(1, B * C, H, W), [MAX_RADIUS] * 4, mode="reflect")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # full float32 taps (cuDNN's default: TF32)
        y = F.conv2d(y, taps[:, None, :, None], groups=B * C)  # vertical: (1, B C, H, W + 2 R)
        y = F.conv2d(y, taps[:, None, None, :], groups=B * C)  # horizontal: (1, B C, H, W)
    return y.view(B, C, H, W).round_().clamp_(0, 255)


def color_batch(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) RGB views (any memory format) and their parameters (B, P) (augment.draw_color, on x's device)
    -> uint8 (B, 3, H, W) in x's memory format: jitter in each view's order, grayscale, blur, solarize. float32
    throughout (autocast off). Views must be larger than MAX_RADIUS (the blur's reflected border). No host sync."""
    B, C, H, W = x.shape
    if min(H, W) <= MAX_RADIUS:
        raise ValueError(f"color_batch: views of {H} x {W} px; the blur's border needs sides > {MAX_RADIUS}")
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if cl else torch.contiguous_format
    with torch.autocast(x.device.type, enabled=False):
        return _color(x.float().contiguous(), params.to(torch.float32)).to(torch.uint8).contiguous(memory_format=fmt)


def _color(y: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """color_batch on float (B, 3, H, W) 0..255, contiguous -> the same, integer-valued."""
    B, C, H, W = y.shape
    luma, _ = _constants(y.device)
    M, c, q = jitter_maps(p)  # (B, 4, 3, 3), (B, 4), (B,)
    for pos in range(3):  # the affine operations before the hue (pos < q <= 3)
        y = _jitter_step(y, M[:, pos], c[:, pos], pos < q)
    h = rgb_to_hsv(y / 255)
    h[:, 0] = (h[:, 0] + p[:, FIELD["hue"], None, None]) % 1.0  # rotate the hue (f_h = 0 where the jitter is off)
    hue = (hsv_to_rgb(h) * 255).round_().clamp_(0, 255)
    y = torch.where((q < 4).view(-1, 1, 1, 1), hue, y)
    for pos in range(1, 4):  # the affine operations after the hue (pos > q >= 0; none where q = 4: no jitter)
        y = _jitter_step(y, M[:, pos], c[:, pos], (pos > q) & (q < 4))
    gray = (y * luma.view(1, 3, 1, 1)).sum(1, keepdim=True).round_()  # (B, 1, H, W)
    y = torch.where((p[:, FIELD["gray"]] > 0).view(-1, 1, 1, 1), gray.expand(-1, C, -1, -1), y)
    y = _blur(y, p[:, FIELD["sigma"]])
    return torch.where((p[:, FIELD["solarize"]] > 0).view(-1, 1, 1, 1) & (y >= 128), 255 - y, y)
