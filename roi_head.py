"""RoI feature extraction and the Fast R-CNN box head g (paper sections 3.3-3.4, Eqs. 2-4).

Sections
--------
- 3.3, Eqs. 2-4: h_i = g(RoIAlign(f(V), b_i)) -- ``multilevel_roi_align`` is RoIAlign over the FPN pyramid,
  ``BoxHead`` is g.
- 3.4: scale-aware assignment of each box to one FPN level, "analogous to SoCo" -- ``assign_levels``.

Symbols
-------
=========  ============================================================================================
f          feature extractor (backbone + FPN), model.FeatureExtractor; gives P2..P5
P2..P5     FPN levels with strides 4, 8, 16, 32 (level index 0..3 here: 0 = P2)
b_i        the i-th box of an image, xyxy in the pixels of the view it lives on
RoIAlign   torchvision.ops.roi_align, 7x7 output, aligned=True (half-pixel corrected), Mask R-CNN [18]
g          the Fast R-CNN box head (BoxHead): (N, 256, 7, 7) -> (N, 1024)
h_i        g's output for box b_i (Eqs. 2-4)
K          boxes per image (4 in the paper)
=========  ============================================================================================

Public functions
----------------
- ``box_scale(boxes)`` -> (N,) float sqrt(w h) of each xyxy box (0 for degenerate boxes); used by ``assign_levels``.
- ``assign_levels(boxes, mode="soco", num_levels=4, thresholds=(48, 96, 192), k0=4, canonical_size=224)``
  -> (N,) int64 level index (0 = P2).
- ``multilevel_roi_align(features, boxes, strides, output_size=7, sampling_ratio=0, mode="soco", sync_free=None)``
  -> (sum K_i, C, 7, 7), in input box order; without a host sync on an accelerator.
- ``class ConvNormAct(in_channels, out_channels, norm="bn")``: 3x3 conv -> norm ("bn", "gn" or "none") -> ReLU,
  one conv layer of ``BoxHead``.
- ``class BoxHead(in_channels=256, resolution=7, kind="4conv1fc", conv_dim=256, fc_dim=1024, norm="bn")``: g.
  ``BoxHead.torchvision_key_map()`` maps its state_dict keys onto torchvision's ``FastRCNNConvFCHead``.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

# SoCo's scale-aware ranges, in the view's own pixels: sqrt(wh) <= 48 -> P2, <= 96 -> P3, <= 192 -> P4, else P5.
SOCO_THRESHOLDS = (48, 96, 192)
# Where multilevel_roi_align parks a box on the levels it does not belong to (view pixels): any point left of and
# above -1 map pixel after scaling makes RoIAlign return 0 before reading the map.
OFF_MAP = -1.0e4
GN_GROUPS = 32  # GroupNorm groups, the detectron2 / torchvision default for 256-channel heads


# ----------------------------------------------------------------------------------------------------------------
# Level assignment (section 3.4)
# ----------------------------------------------------------------------------------------------------------------
def box_scale(boxes):
    """sqrt(w h) of each box: boxes (N, 4) xyxy -> (N,) float; degenerate boxes give 0."""
    return torch.sqrt((boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(dim=1))  # (N, 2) w, h -> (N,)


def assign_levels(boxes, mode="soco", num_levels=4, thresholds=SOCO_THRESHOLDS, k0=4, canonical_size=224):
    # Section 3.4 (scale-aware assignment, SoCo); FPN paper (Lin et al. 2017) Eq. 1 for mode "fpn"
    """One FPN level per box. boxes (N, 4) xyxy view pixels -> (N,) int64, 0 = P2.

    mode "soco" (default, section 3.4 "analogous to SoCo"): s = sqrt(wh) in the view's own pixels;
        s <= thresholds[0] -> P2, s <= thresholds[1] -> P3, ... else the next level (boundaries inclusive).
    mode "fpn" (FPN paper (Lin et al. 2017), Eq. 1 there; for fine-tuning):
        k = floor(k0 + log2(s / canonical_size)), clamped to [2, 2 + num_levels - 1], returned as k - 2.
    Pure function: no state, result on boxes.device.
    """
    s = box_scale(boxes.float())  # (N,)
    if mode == "soco":
        # The number of thresholds below s: s <= t0 -> 0, t0 < s <= t1 -> 1, ... (inclusive upper boundaries).
        # Comparisons with Python numbers: no thresholds tensor copied to the device (a host sync on CUDA).
        levels = torch.zeros_like(s, dtype=torch.int64)
        for t in thresholds:
            levels += s > t
        return levels.clamp(max=num_levels - 1)
    if mode == "fpn":
        # 1e-6 keeps s == canonical_size * 2^n on level k0 + n despite log2 rounding (torchvision's LevelMapper eps).
        k = torch.floor(k0 + torch.log2(s / canonical_size) + 1e-6)  # (N,), -inf for empty boxes
        k = k.clamp(min=2, max=2 + num_levels - 1)  # clamp in float first: -inf -> 2 before the int cast
        return (k - 2).to(torch.int64)
    raise ValueError(f"unknown level assignment mode {mode!r} (expected 'soco' or 'fpn')")


# ----------------------------------------------------------------------------------------------------------------
# RoIAlign over the pyramid (Eqs. 2-4: RoIAlign(f(V), b_i))
# ----------------------------------------------------------------------------------------------------------------
def _boxes_to_rois(boxes):
    """list of B tensors (K_i, 4) -> rois (sum K_i, 5) = (image index, x1, y1, x2, y2)."""
    ks = {b.shape[0] for b in boxes}
    if len(ks) == 1:  # the same K for every image (pre-training): 3 kernels instead of 2 per image
        idx = torch.arange(len(boxes), dtype=boxes[0].dtype, device=boxes[0].device).repeat_interleave(ks.pop())
        return torch.cat([idx[:, None], torch.cat(boxes)], dim=1)
    rois = []
    for i, b in enumerate(boxes):
        idx = torch.full((b.shape[0], 1), float(i), dtype=b.dtype, device=b.device)  # (K_i, 1)
        rois.append(torch.cat([idx, b], dim=1))  # (K_i, 5)
    return torch.cat(rois, dim=0)


def multilevel_roi_align(features, boxes, strides, output_size=7, sampling_ratio=0, mode="soco", sync_free=None):
    # Eqs. 2-4: RoIAlign(f(V), b_i)
    """RoIAlign over the FPN pyramid, each box pooled on its own FPN level only.

    features: list of L tensors (B, C, H_l, W_l), P2 first (pass P2..P5 only; no P6 for RoIs).
    boxes:    list of B tensors (K_i, 4) xyxy in the view's pixels (like torchvision.ops.roi_align).
    strides:  L ints, the stride of each level (spatial_scale = 1 / stride).
    sampling_ratio: 0 = adaptive, ceil(roi size / output size) samples per bin, detectron2's ROIAlignV2
        default (torchvision's MultiScaleRoIAlign uses 2).
    mode: level assignment, see ``assign_levels``.
    sync_free: None = by device: True on an accelerator (``_pool_masked``: no host sync), False on the CPU
        (``_pool_grouped``: a sync costs nothing there and it does ~1/L of the RoIAlign loop work). The two give the
        same values bit for bit; only a level without boxes differs: a zero gradient (masked) or none (grouped).
    Returns (sum K_i, C, output_size, output_size) in input order (image 0's boxes first).
    """
    if len(features) != len(strides):
        raise ValueError(f"{len(features)} feature levels but {len(strides)} strides")
    if len(boxes) != features[0].shape[0]:
        raise ValueError(f"{len(boxes)} box tensors for a batch of {features[0].shape[0]} images")
    ref = features[0]
    B, C = ref.shape[:2]
    # Boxes stay float32 (float64 with float64 maps): in bf16 a coordinate near 224 px is off by up to 1 px.
    box_dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
    boxes = [b.to(device=ref.device, dtype=box_dtype) for b in boxes]
    if sum(b.shape[0] for b in boxes) == 0:
        return ref.new_zeros((0, C, output_size, output_size))
    rois = _boxes_to_rois(boxes)  # (N, 5) = (image index, x1, y1, x2, y2)
    levels = assign_levels(rois[:, 1:], mode=mode, num_levels=len(features))  # (N,)
    # Low-precision maps are pooled in float32, as torchvision's autocast rule for roi_align does; made contiguous in
    # the same copy (roi_align would copy a channels_last map once more to make it contiguous).
    maps = [(feat.to(box_dtype, memory_format=torch.contiguous_format), 1.0 / stride)
            for feat, stride in zip(features, strides)]
    pool = _pool_masked if (ref.device.type != "cpu" if sync_free is None else sync_free) else _pool_grouped
    return pool(maps, rois, levels, output_size, sampling_ratio).to(ref.dtype)


def _pool_masked(maps, rois, levels, output_size, sampling_ratio):
    """No host sync: each level's RoIAlign gets all N RoIs, those of the other levels parked at OFF_MAP.

    A box far outside the map pools exactly 0 and back-propagates nothing, at no memory traffic (0 samples per bin
    with sampling_ratio 0; otherwise every sample returns 0 before reading the map), so the L results add up to each
    box's own-level result bit for bit. On one H100 the grouped version cost 3 syncs per call, 18 per joint step
    (bench/RESULTS.md). maps: L (map (B, C, H_l, W_l), spatial scale); rois (N, 5); levels (N,).
    """
    L, N = len(maps), rois.shape[0]
    own = levels[None, :, None] == torch.arange(L, device=levels.device)[:, None, None]  # (L, N, 1)
    parked = torch.where(own, rois[None, :, 1:], OFF_MAP)  # (L, N, 4): other levels' boxes off the map
    per_level = torch.cat([rois[None, :, :1].expand(L, N, 1), parked], dim=2)  # (L, N, 5)
    pooled = None
    for (feat, scale), r in zip(maps, per_level):
        out = roi_align(feat, r, output_size, spatial_scale=scale, sampling_ratio=sampling_ratio,
                        aligned=True)  # (N, C, 7, 7)
        pooled = out if pooled is None else pooled + out  # exact: the other levels add zeros
    return pooled


def _pool_grouped(maps, rois, levels, output_size, sampling_ratio):
    """One host sync: RoIs sorted by level, each level's group pooled alone, then put back in input order."""
    n = rois.shape[0]
    order = torch.argsort(levels, stable=True)  # (N,) level-major, input order inside a level
    counts = torch.bincount(levels, minlength=len(maps)).tolist()  # boxes per level: the host sync
    pooled = [roi_align(feat, r, output_size, spatial_scale=scale, sampling_ratio=sampling_ratio, aligned=True)
              for (feat, scale), r, k in zip(maps, rois[order].split(counts), counts) if k]  # (N_l, C, 7, 7)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n, device=order.device)
    return torch.cat(pooled).index_select(0, inverse)  # back to input order; autograd to every used level


# ----------------------------------------------------------------------------------------------------------------
# The Fast R-CNN box head g
# ----------------------------------------------------------------------------------------------------------------
class ConvNormAct(nn.Module):
    """3x3 conv (no bias when normalised) -> norm -> ReLU: (N, C_in, 7, 7) -> (N, C_out, 7, 7).

    Submodules ``conv`` and ``norm`` (Identity for norm="none") map onto torchvision's Conv2dNormActivation
    indices 0 and 1.
    """

    def __init__(self, in_channels, out_channels, norm="bn"):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=(norm == "none"))
        if norm == "bn":
            self.norm = nn.BatchNorm2d(out_channels)
        elif norm == "gn":
            self.norm = nn.GroupNorm(GN_GROUPS, out_channels)
        elif norm == "none":
            self.norm = nn.Identity()
        else:
            raise ValueError(f"unknown norm {norm!r} (expected 'bn', 'gn' or 'none')")
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class BoxHead(nn.Module):
    """The Fast R-CNN head g (Eqs. 2-4): RoI features (N, C, 7, 7) -> h (N, fc_dim).

    kind "4conv1fc" (SoCo's head, the pre-training default): 4 x ConvNormAct(conv_dim) -> flatten
        (conv_dim * 7 * 7 = 12544) -> Linear(fc_dim) -> ReLU.
    kind "2fc" (the usual Faster R-CNN head, for fine-tuning): flatten (C * 7 * 7) -> Linear(fc_dim) -> ReLU
        -> Linear(fc_dim) -> ReLU.
    State-dict keys: ``convs.{i}.conv.*``, ``convs.{i}.norm.*``, ``fcs.{j}.*``; ``torchvision_key_map()`` gives
    the 1:1 mapping onto ``torchvision.models.detection.faster_rcnn.FastRCNNConvFCHead``.
    """

    KINDS = {"4conv1fc": (4, 1), "2fc": (0, 2)}  # kind -> (number of convs, number of FC layers)

    def __init__(self, in_channels=256, resolution=7, kind="4conv1fc", conv_dim=256, fc_dim=1024, norm="bn"):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"unknown box head kind {kind!r} (expected one of {sorted(self.KINDS)})")
        num_convs, num_fcs = self.KINDS[kind]
        self.kind = kind
        self.out_channels = fc_dim
        convs, c = [], in_channels
        for _ in range(num_convs):
            convs.append(ConvNormAct(c, conv_dim, norm))
            c = conv_dim
        self.convs = nn.Sequential(*convs)  # empty for "2fc"
        fcs, d = [], c * resolution * resolution  # 12544 for 256 x 7 x 7
        for _ in range(num_fcs):
            fcs.append(nn.Linear(d, fc_dim))
            d = fc_dim
        self.fcs = nn.ModuleList(fcs)
        self._init_weights()

    def _init_weights(self):
        # Convs: He normal, fan_out (detectron2's c2_msra_fill; torchvision's FastRCNNConvFCHead does the same).
        # Linears: He uniform with a=1 (detectron2's c2_xavier_fill). Biases zero.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, a=1)
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x):
        """x (N, C, 7, 7) RoI features -> h (N, fc_dim)."""
        x = self.convs(x)  # (N, conv_dim, 7, 7)
        x = torch.flatten(x, 1)  # (N, conv_dim * 49)
        for fc in self.fcs:
            x = F.relu(fc(x))  # (N, fc_dim)
        return x

    def torchvision_key_map(self):
        """{our state_dict key: FastRCNNConvFCHead key}; that head is Sequential(Conv2dNormActivation x n_conv,
        Flatten, (Linear, ReLU) x n_fc), so conv block i is index i and FC j is index n_conv + 1 + 2 j."""
        n_conv = len(self.convs)
        mapping = {}
        for key in self.state_dict():
            parts = key.split(".")
            if parts[0] == "convs":  # convs.{i}.conv.* -> {i}.0.*, convs.{i}.norm.* -> {i}.1.*
                sub = {"conv": "0", "norm": "1"}[parts[2]]
                mapping[key] = ".".join([parts[1], sub] + parts[3:])
            else:  # fcs.{j}.* -> {n_conv + 1 + 2 j}.*
                mapping[key] = ".".join([str(n_conv + 1 + 2 * int(parts[1]))] + parts[2:])
        return mapping
