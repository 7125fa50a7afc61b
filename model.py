"""Feature extractor f (ResNet + FPN) and the ADePT pre-training network (paper sections 3, 3.3-3.5, Eq. 8).

The paper's detector has three parts (section 3): a feature extractor f = backbone + FPN, an RPN (rpn.py) and a
Fast R-CNN head g (roi_head.py). Pre-training trains all three without labels: the RPN regresses selective-search
boxes (Eq. 1), the head and the extractor learn from a BYOL-style similarity between views (Eqs. 2-7).

Symbols (paper -> code)
    f_theta, f_xi   online / target feature extractor        ADePT.online.extractor, ADePT.target.extractor
    g_theta, g_xi   online / target Fast R-CNN head          .box_head
    p_theta, p_xi   projector                                 .projector
    q_theta         predictor (online only)                   ADePT.predictor
    c, o, d         RPN conv, objectness, deltas (online only) ADePT.rpn
    V1, V2, V3      the three views (224, 224, 112 px)        views[0..2]
    b               K selective-search boxes per image        boxes[j]: (B, K, 4) xyxy in view j's pixels
    b*              Eq. 1's pseudo ground truth (3.2)          rpn_boxes[j]: the same boxes, V1's before SoCo's jitter
    h               g(RoIAlign(f(V), b)) (Eqs. 2-4)            box_representations
    v, v', v''      q(p(h)) online, p(h) target (Eq. 5)        Encoder.project_boxes -> byol.latent
    L = L_RPN + L_det                                         Eq. 8, total_loss (ADePT.forward)
    C               FPN channels (the FPN paper's d = 256)     fpn_channels / FeatureExtractor(channels=)

Public
    Backbone, FPN, FeatureExtractor        f; `FeatureExtractor(depth, fpn_norm, p6, weights_path, channels)`
    make_norm(kind, channels), ConvNorm    the FPN's normalisation ("bn", "gn", "none") and conv + norm block
    Encoder                                f, g, p: what the target branch copies and averages;
                                           project_boxes(feats, boxes, q=None) -> v (Eqs. 2-5)
    box_representations(feats, boxes, strides, g, sync_free) -> h    Eqs. 2-4, (B, K, 1024)
    total_loss(loss_rpn, loss_det)         Eq. 8
    ADePT(mode, ...)                       forward(views, boxes, transforms=None, rpn_boxes=None) -> dict of losses
                                           for one step; pool_sync_free(): RoI pooling without host reads anywhere
    export_pretrained(model, use_online)   the weights fine-tuning loads (keys: backbone.*, fpn.*, rpn.*, box_head.*)
    maybe_sync_bn(module, device)          SyncBN when running distributed on GPUs
    map_boxes(boxes, t_src, t_dst, size)   boxes from one view's pixels to another's (Table 4's RPN proposals)
    load_weights(path, what) -> dict       torch.load(weights_only) of a weights file, ValueError naming it
"""
from __future__ import annotations

import pickle

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import byol
import roi_head
import rpn

FPN_CHANNELS = 256  # FPN paper's d = 256
MODES = ("joint", "separate", "soco", "byol")


def make_norm(kind: str, channels: int) -> nn.Module:
    """'bn' -> BatchNorm2d, 'gn' -> GroupNorm(32), 'none' -> Identity."""
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(32, channels)  # 32 groups: Wu & He, Group Normalization
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}: expected bn, gn or none")


def load_weights(path, what: str = "weights file") -> dict:
    """torch.load(path, weights_only=True): a file never runs code. ValueError naming the file when it is missing,
    unreadable (truncated or corrupt) or not a dict of tensors."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError):
        raise ValueError(f"{path}: {what} not found") from None
    except pickle.UnpicklingError:  # torch's message suggests weights_only=False: never for a file of unknown origin
        raise ValueError(f"{path}: not a {what}: it holds objects other than tensors, which weights_only=True refuses "
                         "to load (loading them would run code)") from None
    except Exception as e:  # truncated zip, text, ...: whatever else torch.load raises
        raise ValueError(f"{path}: cannot be read as a {what}, truncated or corrupt? ({type(e).__name__}: "
                         f"{str(e)[:120]})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a {what} (a {type(state).__name__}, not a dict)")
    return state


class Backbone(nn.Module):
    """torchvision ResNet (weights=None) returning C2..C5; parameter names equal torchvision's (minus fc)."""

    def __init__(self, depth: int = 50, weights_path: str | None = None):
        super().__init__()
        builders = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34,
                    50: torchvision.models.resnet50, 101: torchvision.models.resnet101}
        if depth not in builders:
            raise ValueError(f"unsupported ResNet depth {depth}: choose from {sorted(builders)}")
        net = builders[depth](weights=None)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(net, name))
        width = 64 if depth < 50 else 256  # BasicBlock vs Bottleneck expansion
        self.out_channels = [width, width * 2, width * 4, width * 8]  # C2..C5
        if weights_path:
            self.load_local(weights_path)

    def load_local(self, path: str) -> None:
        """Initialise from a local torchvision ResNet checkpoint (never downloaded); fc.* is ignored."""
        state = load_weights(path, "torchvision ResNet checkpoint")
        state = state.get("state_dict", state)
        state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(("fc.", "module.fc."))}
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatch: another depth
            raise ValueError(f"{path}: not a ResNet checkpoint of this depth: {str(e)[:300]}") from None
        if missing or unexpected:
            raise ValueError(f"{path}: not a ResNet checkpoint of this depth "
                             f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...)")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        B, C, H, W = x.shape
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        c2 = self.layer1(x)   # (B, C2, H/4, W/4)
        c3 = self.layer2(c2)  # (B, C3, H/8, W/8)
        c4 = self.layer3(c3)  # (B, C4, H/16, W/16)
        c5 = self.layer4(c4)  # (B, C5, H/32, W/32)
        return [c2, c3, c4, c5]


class ConvNorm(nn.Sequential):
    """conv -> norm (no activation), the FPN's lateral and output blocks."""

    def __init__(self, cin: int, cout: int, kernel: int, norm: str):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=(norm == "none"))
        self.norm = make_norm(norm, cout)


class FPN(nn.Module):
    """Feature pyramid (Lin et al. 2017): P2..P5 from C2..C5, optional P6 = max-pool(P5, stride 2).

    P6 is left out in pre-training (4.1.3: 224 px images are too small for it) and used at fine-tuning.
    """

    def __init__(self, in_channels: list[int], out_channels: int = FPN_CHANNELS, norm: str = "bn", p6: bool = False):
        super().__init__()
        self.lateral = nn.ModuleList(ConvNorm(c, out_channels, 1, norm) for c in in_channels)
        self.output = nn.ModuleList(ConvNorm(out_channels, out_channels, 3, norm) for _ in in_channels)
        self.p6 = p6
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # Kaiming-uniform with a=1, as in the FPN/detectron2 code
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        top = self.lateral[-1](feats[-1])  # (B, C, H/32, W/32)
        outs = [self.output[-1](top)]
        for i in range(len(feats) - 2, -1, -1):  # top-down pathway: C4, C3, C2
            lat = self.lateral[i](feats[i])
            top = lat + F.interpolate(top, size=lat.shape[-2:], mode="nearest")
            outs.insert(0, self.output[i](top))
        if self.p6:
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))  # P6, stride 64
        return outs  # P2..P5 (+P6), each (B, C, H/s, W/s)


class FeatureExtractor(nn.Module):
    """The paper's f: backbone + FPN. forward(x (B,3,H,W)) -> [P2, P3, P4, P5(, P6)], each (B, C, H/s, W/s), C =
    channels."""

    def __init__(self, depth: int = 50, fpn_norm: str = "bn", p6: bool = False, weights_path: str | None = None,
                 channels: int = FPN_CHANNELS):
        super().__init__()
        self.backbone = Backbone(depth, weights_path)
        self.fpn = FPN(self.backbone.out_channels, channels, fpn_norm, p6)
        self.strides = (4, 8, 16, 32, 64) if p6 else (4, 8, 16, 32)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.fpn(self.backbone(x))


class Encoder(nn.Module):
    """f, g, p of one branch (Eqs. 2-5). The target branch xi is a copy of this, averaged by EMA."""

    def __init__(self, depth: int, fpn_norm: str, head: str, global_pool: bool = False, channels: int = FPN_CHANNELS):
        super().__init__()
        self.extractor = FeatureExtractor(depth, fpn_norm, channels=channels)
        # RoI pooling without host reads: None = by device (roi_head.multilevel_roi_align); True: ADePT.pool_sync_free
        self.sync_free: bool | None = None
        self.global_pool = global_pool  # the image-level BYOL baseline: C5 -> avg pool, no FPN/head
        if global_pool:
            self.projector = byol.Projector(in_dim=self.extractor.backbone.out_channels[-1])
        else:
            self.box_head = roi_head.BoxHead(channels, kind=head, conv_dim=channels)
            self.projector = byol.Projector(in_dim=self.box_head.out_channels)

    def forward(self, x: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor:
        """x (B,3,S,S), boxes (B,K,4) xyxy view pixels -> projections (B, K, D) (global_pool: (B, D))."""
        if self.global_pool:
            return self.projector(self.extractor.backbone(x)[-1].mean(dim=(2, 3)))
        return self.project_boxes(self.extractor(x), boxes)

    def project_boxes(self, feats: list[torch.Tensor], boxes: torch.Tensor, q: nn.Module | None = None):
        """Eqs. 2-5: feats f(V) = [P2..P5], boxes (B,K,4) xyxy view pixels -> v = q(p(h)) (p(h) without q), (B,K,D)."""
        h = box_representations(feats, boxes, self.extractor.strides, self.box_head, self.sync_free)  # (B, K, 1024)
        return byol.latent(h, self.projector, q)


def box_representations(feats: list[torch.Tensor], boxes: torch.Tensor, strides, g: nn.Module,
                        sync_free: bool | None = None) -> torch.Tensor:
    # Eqs. 2-4: h_i = g(RoIAlign(f(V), b_i)), given feats = f(V)
    """feats [P2..P5] (B, C, H_l, W_l) with their strides; boxes (B, K, 4) xyxy view pixels; g the box head ->
    h (B, K, g.out_channels). Each box is pooled from one FPN level by its scale (roi_head.multilevel_roi_align)."""
    B, K, _ = boxes.shape
    pooled = roi_head.multilevel_roi_align(feats, list(boxes), strides, sync_free=sync_free)  # (B*K, C, 7, 7)
    return g(pooled).view(B, K, -1)


def total_loss(loss_rpn: torch.Tensor, loss_det: torch.Tensor) -> torch.Tensor:
    # Eq. 8: L = L_RPN + L_det (joint mode; separate mode has L_det = 0, soco mode L_RPN = 0)
    return loss_rpn + loss_det


class ADePT(nn.Module):
    """Online branch (f, g, p, q, RPN) + target branch xi (f, g, p); forward returns the losses of one step.

    mode      joint: L = L_RPN + L_det (Eq. 8) from random init (4.2)
              separate: only L_RPN; extractor and head frozen (initialised from a soco run, 4.2)
              soco: only L_det (the SoCo baseline)          byol: image-level BYOL baseline on V1 and V2
                                                            # DEVIATION (baseline, no flag): 4.1.2's geometry with
                                                            BYOL's colour, not BYOL's two random crops
    rpn_grad_to_backbone   Table 4: False (default, best) trains the RPN on detached features
    rpn_proposals          Table 4: False (default, best) feeds the head selective-search boxes only; True adds the
                           RPN's top-K proposals of V1 (top 64 before NMS, 4.1.3) mapped into V2 and V3
    fpn_channels           C of the FPN, RPN and 4conv1fc head (paper: 256; the CPU study narrows it, see study.py)
    anchor_sizes           one anchor side per level P2..P5 (4.1.3: 24, 48, 96, 192 px for 224 px views)
    ignore_border_anchors  Eq. 1 ignores anchors crossing the view's border, as [19] (default False: labelled, as
                           torchvision and detectron2; rpn.py's DEVIATION)
    rpn_views              the views (1-3) whose features Eq. 1 trains on, averaged. Default all three: "these
                           views are passed through the feature extractor and the resulting features are fed to the
                           RPN" (3); 4.1.3 names only the 224 px images. # DEVIATION (interpretation, flag
                           train.py --rpn-views): the paper says neither which views nor how they are combined.
    """

    def __init__(self, mode: str = "joint", depth: int = 50, fpn_norm: str = "bn", head: str = "4conv1fc",
                 rpn_grad_to_backbone: bool = False, rpn_proposals: bool = False, num_boxes: int = 4,
                 fpn_channels: int = FPN_CHANNELS, anchor_sizes: tuple = rpn.PRETRAIN_ANCHOR_SIZES,
                 rpn_views: tuple = (1, 2, 3), ignore_border_anchors: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: expected one of {MODES}")
        if not rpn_views or not set(rpn_views) <= {1, 2, 3} or len(set(rpn_views)) != len(rpn_views):
            raise ValueError(f"rpn_views must be distinct views among 1, 2, 3, not {rpn_views!r}")
        self.rpn_views = tuple(sorted(rpn_views))
        self.mode, self.rpn_grad_to_backbone, self.rpn_proposals = mode, rpn_grad_to_backbone, rpn_proposals
        self.num_boxes, self.anchor_sizes = num_boxes, tuple(anchor_sizes)
        self.ignore_border_anchors = ignore_border_anchors
        self.online = Encoder(depth, fpn_norm, head, global_pool=(mode == "byol"), channels=fpn_channels)
        self.predictor = byol.Predictor()
        self.rpn = rpn.RPNHead(fpn_channels, num_anchors=3) if mode in ("joint", "separate") else None
        self.target = byol.make_target(self.online)
        self._anchors: dict = {}  # (feature sizes, device) -> (N, 4); not state (rebuilt on demand)
        if mode == "separate":  # 4.2: only the RPN is trained
            for m in (self.online, self.predictor):
                m.requires_grad_(False)
        self.train()  # nn.Module starts in training mode without calling train(): the frozen extractor's BN in eval

    def pool_sync_free(self, value: bool | None = True) -> None:
        """RoI pooling of both branches: True = the masked pooling on every device (no host read: what a GPU runs,
        and what lets torch.compile capture a whole step as one graph); None = chosen by device."""
        for branch in (self.online, self.target):
            branch.sync_free = value

    def train(self, mode: bool = True):
        super().train(mode)
        if self.mode == "separate":  # frozen extractor: BN statistics stay those of the SoCo initialisation
            self.online.eval()
        return self

    def forward(self, views: list[torch.Tensor], boxes: list[torch.Tensor],
                transforms: list[torch.Tensor] | None = None,
                rpn_boxes: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Eq. 8: L = L_RPN + L_det for one batch. views: V1 (B,3,224,224), V2 (B,3,224,224), V3 (B,3,112,112),
        normalised; boxes: 3 x (B,K,4) view pixels (L_det's, V1's jittered as SoCo's); transforms: 3 x (B,4)
        original -> view affine maps, needed only with rpn_proposals; rpn_boxes: 3 x (B,K,4) Eq. 1's pseudo ground
        truth, the selective-search boxes themselves (data.py's r1, b2, b3: V1's before the jitter); None: boxes.

        Returns loss (the total), loss_rpn and loss_det, each a scalar tensor.
        """
        zero = views[0].new_zeros(())
        if self.mode == "byol":
            q = [self.predictor(self.online(v, None)) for v in views[:2]]
            with torch.no_grad():
                z = [self.target(v, None) for v in views[:2]]
            loss_det = byol.byol_loss(q[0], q[1], z[0], z[1])
            return {"loss": loss_det, "loss_rpn": zero, "loss_det": loss_det}
        feats = [self.online.extractor(v) for v in views]  # 3 x [P2..P5]
        rpn_boxes = boxes if rpn_boxes is None else rpn_boxes
        loss_rpn = self.rpn_loss(feats, views, rpn_boxes) if self.rpn is not None else zero
        loss_det = zero
        if self.mode != "separate":
            if self.rpn_proposals:
                boxes = self.add_rpn_proposals(feats[0], views, boxes, transforms)
            # Eqs. 2-5 on every view through both branches: v, v', v'' online (theta) and target (xi), Eq. 7's terms
            v_online = [self.online.project_boxes(fj, bj, self.predictor) for fj, bj in zip(feats, boxes)]
            with torch.no_grad():
                v_target = [self.target(vj, bj) for vj, bj in zip(views, boxes)]
            loss_det = byol.detector_loss(v_online, v_target)  # Eq. 7
        return {"loss": total_loss(loss_rpn, loss_det), "loss_rpn": loss_rpn, "loss_det": loss_det}

    def rpn_loss(self, feats, views, boxes) -> torch.Tensor:
        """Eq. 1 on each of rpn_views, the view's K selective-search boxes as pseudo ground truth (3.2); their mean.

        Views of one size (V1 and V2) go through the RPN as one batch: the same loss (the RPN has no batch
        statistics and rpn.rpn_loss normalises each view by its own anchors), fewer operators (each a kernel launch
        on a GPU; bench/RESULTS.md 5c)."""
        by_size: dict = {}  # view size -> the 0-based indices of rpn_views of that size
        for j in self.rpn_views:
            by_size.setdefault(tuple(views[j - 1].shape[-2:]), []).append(j - 1)
        total = views[0].new_zeros(())
        for size, js in by_size.items():
            V = len(js)
            # Table 4's best row (the default): detached features, so the backbone receives only L_det
            fs = [feats[j] if self.rpn_grad_to_backbone else [x.detach() for x in feats[j]] for j in js]
            f = [torch.cat(level) if V > 1 else level[0] for level in zip(*fs)]  # L x (V*B, C, H_l, W_l)
            logits, deltas = self.rpn(f)  # (V*B, N), (V*B, N, 4)
            anchors = self.anchors([tuple(x.shape[-2:]) for x in f], f[0].device)  # (N, 4)
            labels, target_deltas = rpn.rpn_targets(anchors, torch.cat([boxes[j] for j in js]),  # (V*B, N), (.., 4)
                                                    image_size=size if self.ignore_border_anchors else None)
            loss_cls, loss_reg = rpn.rpn_loss(*(t.unflatten(0, (V, -1)) for t in (logits, deltas, labels,
                                                                                  target_deltas)))  # mean over V
            total = total + V * (loss_cls + loss_reg)
        return total / len(self.rpn_views)

    def anchors(self, sizes: list, device) -> torch.Tensor:
        """All levels' anchors (N, 4) for these feature sizes, built once per (sizes, device): make_anchors copies
        its ratios host -> device, a synchronising copy on CUDA, and the anchors never change."""
        key = (tuple(sizes), str(device))
        anchors = self._anchors.get(key)
        if anchors is None:
            anchors = torch.cat(rpn.make_anchors(list(sizes), sizes=self.anchor_sizes, device=device))
            if not torch.compiler.is_compiling():  # compiled step: built in the graph (a cache write would recompile)
                self._anchors[key] = anchors
        return anchors

    @torch.no_grad()
    def add_rpn_proposals(self, feats1, views, boxes, transforms):
        """Table 4 'SS + RPN': append V1's top-K RPN proposals (top 64 before NMS, 4.1.3) to every view's SS boxes.

        transforms: 3 x (B, 4) per-view affine maps (sx, tx, sy, ty) from original-image to view pixels (augment.py;
        data.py items t1..t3).
        """
        B, K, _ = boxes[0].shape
        logits, deltas = self.rpn([x.detach() for x in feats1])
        anchors = rpn.cached_anchors(tuple(tuple(x.shape[-2:]) for x in feats1), sizes=tuple(self.anchor_sizes),
                                     device=logits.device)
        props = rpn.generate_proposals(logits, deltas, anchors, tuple(views[0].shape[-2:]), pre_nms_top_n=64,
                                       post_nms_top_n=K)
        p1 = boxes[0].clone()  # (B, K, 4) V1 pixels; an image with fewer than K proposals keeps its SS boxes there
        for i, (p, _) in enumerate(props):
            p1[i, : len(p)] = p
        out = []
        for vj, bj, tj in zip(views, boxes, transforms):
            pj = map_boxes(p1, transforms[0], tj, size=vj.shape[-1])
            pj = torch.where(_too_small(pj)[..., None], bj, pj)  # fell outside this view's crop: use the SS box
            out.append(torch.cat([bj, pj], dim=1))  # (B, 2K, 4)
        return out


def map_boxes(boxes: torch.Tensor, t_src: torch.Tensor, t_dst: torch.Tensor, size: int) -> torch.Tensor:
    """Map boxes (B,K,4) from one view to another; t_*: (B,4) affine (sx, tx, sy, ty) original -> view pixels.

    x_orig = (x_src - tx_src) / sx_src, x_dst = sx_dst x_orig + tx_dst; a horizontal flip has sx < 0, so x1/x2 are
    re-ordered after mapping. The result is clipped to the (size x size) destination view.
    """
    s_src, o_src = t_src[:, None, [0, 2, 0, 2]], t_src[:, None, [1, 3, 1, 3]]  # (B, 1, 4)
    s_dst, o_dst = t_dst[:, None, [0, 2, 0, 2]], t_dst[:, None, [1, 3, 1, 3]]
    m = (boxes - o_src) / s_src * s_dst + o_dst  # (B, K, 4), possibly x1 > x2 after a flip
    x1, x2 = torch.minimum(m[..., 0], m[..., 2]), torch.maximum(m[..., 0], m[..., 2])
    return torch.stack([x1, m[..., 1], x2, m[..., 3]], dim=-1).clamp(0, size)


def _too_small(boxes: torch.Tensor, min_side: float = 2.0) -> torch.Tensor:
    """(B,K,4) -> (B,K) bool: a side under 2 px carries no RoIAlign signal worth contrasting."""
    return ((boxes[..., 2:] - boxes[..., :2]) < min_side).any(-1)


def export_pretrained(model: ADePT, use_online: bool = False) -> dict[str, torch.Tensor]:
    """The weights fine-tuning loads: backbone.*, fpn.*, box_head.*, rpn.* (3: "only the target branch is kept").

    # DEVIATION (flag --export-online): SoCo's code exports the online branch; the paper keeps the target branch.
    """
    enc = model.online if use_online else model.target
    state = {k.removeprefix("extractor."): v for k, v in enc.state_dict().items() if not k.startswith("projector.")}
    if model.rpn is not None:
        state.update({f"rpn.{k}": v for k, v in model.rpn.state_dict().items()})
    return {k: v.detach().clone().cpu() for k, v in state.items()}


def maybe_sync_bn(module: nn.Module, device: torch.device) -> nn.Module:
    """SyncBN only runs on GPUs (reference.md, traps): convert when distributed on CUDA, else keep BatchNorm."""
    if device.type == "cuda" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module
