"""Hierarchical grouping of selective search in numpy (paper section 4.1.1; Uijlings et al. [20]).

Section 4.1.1 runs selective search on a graph segmentation (min_size = 10, k = 500, sigma = 0.9). The grouping
starts from the segmentation's regions and repeatedly merges the most similar pair of neighbouring regions until one
region per connected part is left; every region of the hierarchy (initial and merged) gives a box. The similarity
is the mean of four terms, each in [0, 1] (OpenCV's Multiple(Color, Texture, Size, Fill) with weights 1/4):
    colour   sum_k min(c_i^k, c_j^k)   c: 25 bins per channel, all channels L1-normalised together (75 bins)
    texture  sum_k min(t_i^k, t_j^k)   t: 8 oriented gradient maps per channel (Scharr along x and y, on the image
                                       and on the image rotated by 45 degrees, positive and negative parts), each
                                       min-max scaled to 0..255, 10 bins each; L1-normalised (240 bins)
    size     1 - (size_i + size_j) / size_im
    fill     1 - (size(BB_ij) - size_i - size_j) / size_im      BB_ij: the box around both regions
A merged region's histograms are the size-weighted means of its parts', its neighbours the union of theirs. With
equal weights, size + fill = 2 - size(BB_ij) / size_im: the regions' sizes cancel, so the merge order is that of
the cost size(BB_ij) / size_im - colour - texture (= 2 - 4 x similarity), lowest first.

This follows OpenCV's SelectiveSearchSegmentation (opencv_contrib ximgproc) definitions so that the boxes come out
the same: histogram bins, the gradient maps, float32 histograms and similarity terms, neighbours taken from the left,
upper and upper-left pixel of every pixel outside the first row and column, inclusive boxes, every node's box kept
once (the caller sorts them: OpenCV's order, level x random, carries no information). What differs is how:
histograms in one pass over the pixels per map (cv2.calcHist over the label's two bytes and the value, or
np.bincount; a texture map's + and - histograms from one joint count, split by an exact 0/1 matrix product) instead
of one masked pass per region, boxes from the ends of each row's label runs, a heap with lazy invalidation (stale
entries dropped in bulk once they outnumber the live pairs 3 to 1; the pop order, hence the merge order, is that of
the (cost, i, j) tuples either way) instead of re-sorting all pairs after each merge, and the new region's histogram
similarity to all its neighbours in one numpy expression. Two shortcuts change last bits (DEVIATION, see _cost and
_gradients): the cost above instead of OpenCV's float32 sum of four terms, each histogram summed bin by bin, and the
rotated gradients rotated back straight into the image's frame. Either could reorder two merges of near-equal
similarity, as could ties (OpenCV's std::sort is not stable); on the 70+ images measured the box sets are identical
to OpenCV's (bench/RESULTS.md sections 3b, 3c).

Symbols (paper / [20] -> code)
    r_i           a region of the hierarchy              node index (initial regions 0..n-1 = segmentation labels)
    c_i, t_i      colour / texture histogram             feats[:, :25C], feats[:, 25C:] (float32, L1-normalised)
    size(r_i)     region size in pixels                  sizes (int64)
    BB_ij         box around r_i and r_j                 x1, y1, x2, y2 (x2, y2 exclusive; OpenCV's x + w)
    size_im       image size in pixels                   area

Public
    region_features(image, labels) -> (feats (n, 105 C) float32, sizes (n,) int64, boxes (n, 4) int64)
    neighbour_pairs(labels)        -> (E, 2) int64 pairs i < j of touching regions
    group(feats, sizes, boxes, pairs, area) -> (n + merges, 4) int64 boxes of every node, in node order
    hierarchical_grouping(image, labels) -> (M, 4) int32 unique (x, y, w, h) boxes: the set OpenCV's process() gives
"""
from __future__ import annotations

import heapq

import cv2
import numpy as np

COLOR_BINS = 25  # per channel, over 0..255
TEXTURE_BINS = 10  # per gradient map, over 0..255
STALE_FACTOR = 3  # group() rebuilds its heap when it holds more than 3 entries per live pair
CALCHIST_MAX_LABELS = 1 << 16  # _histograms: labels as 2 uint8 bytes for cv2.calcHist, else np.bincount
DENSE_PAIR_KEYS = 1 << 22  # neighbour_pairs dedupes with an n^2 table (4 MB) up to n = 2048 regions, else sorts


def _bins(nbins: int, scale: int = 1) -> np.ndarray:
    """(256,) uint8 lookup table: the bin of each uint8 value among nbins equal bins over 0..255, times scale.

    floor(v * nbins / 256): calcHist's uniform bins; equal to OpenCV's (int)(v / 25.6f) for the texture."""
    return (np.arange(256) * nbins // 256 * scale).astype(np.uint8)


def _gradients(image: np.ndarray) -> list[list[np.ndarray]]:
    """image uint8 (H, W, C) -> per channel 4 float32 (H, W) maps: Scharr d/dx, d/dy, and d/dx, d/dy of the image
    rotated by 45 degrees (bilinear, zero border, into its bounding box) and rotated back (OpenCV's texture maps)."""
    H, W = image.shape[:2]
    centre = (W / 2.0, H / 2.0)
    rot = cv2.getRotationMatrix2D(centre, 45.0, 1.0)
    _, _, bw, bh = cv2.RotatedRect(centre, (W, H), 45.0).boundingRect()
    rot[0, 2] += bw / 2.0 - centre[0]
    rot[1, 2] += bh / 2.0 - centre[1]
    back = cv2.getRotationMatrix2D((float(bw // 2), float(bh // 2)), -45.0, 1.0)
    back[:, 2] -= ((bw - W) // 2, (bh - H) // 2)  # OpenCV rotates back into (bh, bw), then crops (H, W) from there
    # DEVIATION: we rotate back straight into the crop (2.1x fewer pixels); warpAffine's fixed-point coordinates then
    # round differently: the rotated maps differ by up to 0.25 (of +/-4080); on the 8 bench photos 71 of 18 M
    # pixel-map texture codes (0.0004 %) changed bin, and no box.
    # warpAffine is ~2x faster per channel on 4 channels than on 3: a 3-channel image turns as RGBA (alpha unused)
    four = cv2.cvtColor(image, cv2.COLOR_RGB2RGBA) if image.shape[2] == 3 else image
    out = []
    for plane, turned in zip(cv2.split(image), cv2.split(cv2.warpAffine(four, rot, (bw, bh)).reshape(bh, bw, -1))):
        maps = [cv2.Scharr(plane, cv2.CV_32F, 1, 0), cv2.Scharr(plane, cv2.CV_32F, 0, 1)]
        maps += [cv2.warpAffine(cv2.Scharr(turned, cv2.CV_32F, dx, dy), back, (W, H)) for dx, dy in ((1, 0), (0, 1))]
        out.append(maps)
    return out


def _texture_codes(image: np.ndarray) -> list[np.ndarray]:
    """image uint8 (H, W, C) -> 4C uint8 (H, W) codes bin(positive part) * 10 + bin(negative part), one per
    gradient map in OpenCV's order (channel, then d/dx, d/dy, rotated d/dx, rotated d/dy).

    Each part (THRESH_TOZERO / THRESH_TOZERO_INV at 0) is min-max scaled to uint8 (cv2.normalize = convertTo with
    OpenCV's scale and shift; a constant part gives 0 there as in OpenCV), then binned into 10 bins of 25.6.
    """
    hi, lo = _bins(TEXTURE_BINS, TEXTURE_BINS), _bins(TEXTURE_BINS)
    codes = []
    for g in (g for maps in _gradients(image) for g in maps):  # (H, W) float32
        pos = cv2.normalize(cv2.threshold(g, 0, 0, cv2.THRESH_TOZERO)[1], None, 0, 255, cv2.NORM_MINMAX, cv2.CV_8U)
        neg = cv2.normalize(cv2.threshold(g, 0, 0, cv2.THRESH_TOZERO_INV)[1], None, 0, 255, cv2.NORM_MINMAX,
                            cv2.CV_8U)
        codes.append(cv2.add(cv2.LUT(pos, hi), cv2.LUT(neg, lo)))
    return codes


def _histograms(labels: np.ndarray, maps: list[np.ndarray], nbins: int, top: int, n: int) -> np.ndarray:
    """labels int32 (H, W) in 0..n-1, maps: uint8 (H, W) each, values < top -> (n, len(maps), nbins) int64 counts
    per region and map of the bins floor(v * nbins / top).

    cv2.calcHist over (label // 256, label % 256, v) (no binning pass, ~1.3x faster than np.bincount on
    label * nbins + bin) while its float32 counts are exact (< 2^24 pixels) and labels fit 2 bytes; else bincount."""
    out = np.empty((n, len(maps), nbins), np.int64)
    if n <= CALCHIST_MAX_LABELS and labels.size < 1 << 24:  # 2^24: float32 counts exact
        nh = (n + 255) >> 8  # label // 256 in 0..nh-1
        hi, lo = (labels >> 8).astype(np.uint8), (labels & 255).astype(np.uint8)  # (H, W) each
        for m, v in enumerate(maps):
            hist = cv2.calcHist([hi, lo, v], [0, 1, 2], None, [nh, 256, nbins], [0, nh, 0, 256, 0, top])
            out[:, m] = hist.reshape(-1, nbins)[:n]  # (nh * 256, nbins) float32 -> the first n labels
        return out
    base = labels.reshape(-1).astype(np.intp) * nbins  # (P,) intp
    buf = np.empty_like(base)
    to_bin = (np.arange(256) * nbins // top).astype(np.uint8)  # LUT: v -> its bin
    for m, v in enumerate(maps):
        np.add(base, cv2.LUT(v, to_bin).reshape(-1), out=buf)
        out[:, m] = np.bincount(buf, minlength=n * nbins).reshape(n, nbins)
    return out


def _marginals(nbins: int, dtype) -> np.ndarray:
    """(nbins^2, 2 nbins) 0/1 matrix: joint bin a * nbins + b -> columns a and nbins + b (both marginals)."""
    joint = np.arange(nbins * nbins)
    out = np.zeros((nbins * nbins, 2 * nbins), dtype)
    out[joint, joint // nbins] = 1
    out[joint, nbins + joint % nbins] = 1
    return out


def _boxes(labels: np.ndarray, n: int) -> np.ndarray:
    """labels (H, W) in 0..n-1 -> (n, 4) int64 x1, y1, x2, y2 (x2, y2 exclusive) per region.

    Only the ends of each run of equal labels along a row matter (~6x fewer pixels than the image): the first
    pixel of a run gives x1, y1 and y2 candidates, the last one x2."""
    first = np.ones(labels.shape, bool)  # (H, W): pixel starts a run
    first[:, 1:] = labels[:, 1:] != labels[:, :-1]
    last = np.ones(labels.shape, bool)  # (H, W): pixel ends a run
    last[:, :-1] = first[:, 1:]
    W = labels.shape[1]
    starts = np.flatnonzero(first)  # (K,) int64, K runs, row-major (2-D np.nonzero is ~6x slower)
    ys, xs = np.divmod(starts, W)
    ls, lx = labels.reshape(-1)[starts], np.flatnonzero(last) % W  # (K,) labels and last x of the runs
    boxes = np.empty((n, 4), np.int64)
    boxes[:, :2] = np.iinfo(np.int64).max
    boxes[:, 2:] = -1
    np.minimum.at(boxes[:, 0], ls, xs)
    np.minimum.at(boxes[:, 1], ls, ys)
    np.maximum.at(boxes[:, 2], ls, lx)
    np.maximum.at(boxes[:, 3], ls, ys)
    boxes[:, 2:] += 1
    return boxes


def region_features(image: np.ndarray, labels: np.ndarray):
    """image uint8 (H, W, C), labels int32 (H, W) in 0..n-1 -> feats (n, 25C + 80C) float32 (colour | texture
    histograms, each L1-normalised), sizes (n,) int64, boxes (n, 4) int64 x1, y1, x2, y2 (x2, y2 exclusive)."""
    image = image.reshape(*labels.shape, -1)
    C = image.shape[2]
    n = int(labels.max()) + 1
    color = _histograms(labels, cv2.split(image), COLOR_BINS, 256, n)  # (n, C, 25) over 0..255
    sizes = color[:, 0].sum(axis=1)  # (n,) int64: each pixel in one bin of the first channel
    codes = _texture_codes(image)  # 4C (H, W) uint8 in 0..99
    joint = _histograms(labels, codes, TEXTURE_BINS ** 2, TEXTURE_BINS ** 2, n).reshape(n * 4 * C, -1)  # (4Cn, 100)
    exact = np.float32 if labels.size < 1 << 24 else np.float64  # integer counts <= H*W stay exact in sums
    texture = joint.astype(exact) @ _marginals(TEXTURE_BINS, exact)  # (4Cn, 2 = +/- x 10): ~4x faster than sums
    feats = [color.reshape(n, -1).astype(np.float32) / (sizes * C).astype(np.float32)[:, None],
             texture.reshape(n, -1).astype(np.float32) / (sizes * 8 * C).astype(np.float32)[:, None]]
    return np.concatenate(feats, axis=1), sizes, _boxes(labels, n)


def neighbour_pairs(labels: np.ndarray) -> np.ndarray:
    """labels (H, W) -> (E, 2) int64 unique pairs i < j of regions that touch: each pixel outside the first row and
    column against its left, upper and upper-left pixel (OpenCV's is_neighbour)."""
    n = int(labels.max()) + 1
    W = labels.shape[1]
    flat = labels.reshape(-1)  # (H*W,): 1-D shifts and index lists, ~2x faster than masking 2-D views
    keys = []
    for off in (1, W, W + 1):  # left, upper, upper-left pixel
        p = np.flatnonzero(flat[off:] != flat[:-off]) + off  # (B,) int64 pixels whose neighbour differs
        p = p[(p >= W) & (p % W != 0)]  # outside the first row and column
        a, b = flat[p], flat[p - off]
        keys.append(np.minimum(a, b).astype(np.int64) * n + np.maximum(a, b))
    keys = np.concatenate(keys)  # (B,) int64 i * n + j, with repeats
    if n * n <= DENSE_PAIR_KEYS:  # a table of all n^2 keys: no sort
        seen = np.zeros(n * n, bool)
        seen[keys] = True
        keys = np.flatnonzero(seen)
    else:
        keys = np.unique(keys)
    return np.stack(np.divmod(keys, n), axis=1)


def _cost(feats_a: np.ndarray, feats_b: np.ndarray, boxes_a: np.ndarray, boxes_b: np.ndarray,
          area: int) -> np.ndarray:
    """Merge costs of k pairs -> (k,) float64; the lower, the more similar: cost = 2 - 4 * similarity.

    feats_* (k, D) float32 features (colour | texture histograms), boxes_* (k, 4) int64 x1, y1, -x2, -y2 (x2, y2
    exclusive). similarity = (colour + texture + size + fill) / 4 with size + fill = (1 - (s_a + s_b) / A) +
    (1 - (BB_ab - s_a - s_b) / A) = 2 - BB_ab / A: the sizes cancel, so cost = BB_ab / A - sum_k min(f_a^k, f_b^k),
    which orders the pairs as the similarity does. _Hierarchy.new_pairs computes the same numbers one pair at a time.
    # DEVIATION: OpenCV adds the four float32 terms, each histogram bin by bin; we sum the minima pairwise (numpy)
    # in float32 and the rest in float64: the order of two pairs whose similarities differ in the last float32 bits
    # may differ from OpenCV's (never seen: bench/RESULTS.md section 3b).
    """
    box = np.minimum(boxes_a, boxes_b)  # (k, 4) the enclosing box, signed
    bb = (box[:, 0] + box[:, 2]) * (box[:, 1] + box[:, 3])  # (k,) int64 (-w) (-h), exact
    return bb / area - np.add.reduce(np.minimum(feats_a, feats_b), axis=1)


class _Hierarchy:
    """The growing hierarchy: node t's features and box, size (initial regions first), neighbours, liveness."""

    def __init__(self, feats: np.ndarray, sizes: np.ndarray, boxes: np.ndarray, pairs: np.ndarray, area: int):
        n, D = feats.shape
        self.signed = np.concatenate([boxes[:, :2], -boxes[:, 2:]], axis=1)  # (n, 4) int64 x1, y1, -x2, -y2
        self.rows = np.zeros((2 * n, D), np.float32)  # node t's features
        self.rows[:n] = feats
        self.feat = list(self.rows)  # (D,) float32 views: list indexing beats 2-D indexing per merge
        self.boxes_py = self.signed.tolist()  # the boxes as Python ints, for the merges
        self.sizes = sizes.tolist()  # Python ints, appended per merge
        self.area, self.t = area, n  # t: the next node's index
        self.alive = [True] * n + [False] * n
        self.adj = [set() for _ in range(2 * n)]  # neighbours of each live node
        for i, j in pairs.tolist():
            self.adj[i].add(j)
            self.adj[j].add(i)

    def cost(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Initial regions a, b: (k,) each -> (k,) float64 merge costs."""
        r, s = self.rows, self.signed
        return _cost(r.take(a, axis=0), r.take(b, axis=0), s.take(a, axis=0), s.take(b, axis=0), self.area)

    def new_pairs(self, t: int, near: list[int]) -> list[tuple[float, int, int]]:
        """Heap entries (cost, t, k) of node t with each node k of near (k >= 1): _cost's numbers, the box term in
        Python ints (w h / A is correctly rounded either way), the histogram term in one numpy expression."""
        m = self.rows.take(near, axis=0)  # (k, D); take: ~4x faster than fancy indexing for small k
        overlap = np.add.reduce(np.minimum(m, self.rows[t], out=m), axis=1).tolist()  # (k,) float32 sums
        x1, y1, x2, y2 = self.boxes_py[t]  # signed: x1, y1, -x2, -y2
        boxes, area, out = self.boxes_py, self.area, []
        for s, k in zip(overlap, near):
            b = boxes[k]  # conditional expressions, not min(): a function call per term costs more in this loop
            w = (x1 if x1 < b[0] else b[0]) + (x2 if x2 < b[2] else b[2])  # minus the union's width
            h = (y1 if y1 < b[1] else b[1]) + (y2 if y2 < b[3] else b[3])
            out.append((w * h / area - s, t, k))
        return out

    def merge(self, i: int, j: int) -> tuple[int, list[int]]:
        """Merge live nodes i, j into the new node t -> (t, t's neighbours: the union of i's and j's)."""
        t, f, s = self.t, self.feat, self.sizes
        si, sj = s[i], s[j]
        np.divide(f[i] * si + f[j] * sj, si + sj, out=f[t])  # float32 (NEP 50), OpenCV's weighted mean
        s.append(si + sj)
        bi, bj = self.boxes_py[i], self.boxes_py[j]
        self.boxes_py.append([min(bi[0], bj[0]), min(bi[1], bj[1]), min(bi[2], bj[2]), min(bi[3], bj[3])])
        self.alive[i] = self.alive[j] = False
        self.alive[t] = True
        adj = self.adj
        near = adj[i] | adj[j]
        near.discard(i)
        near.discard(j)
        for k in near:
            nk = adj[k]
            nk.discard(i)
            nk.discard(j)
            nk.add(t)
        adj[t], adj[i], adj[j] = near, None, None
        self.t += 1
        return t, list(near)

    def node_boxes(self) -> np.ndarray:
        """(t, 4) int64 x1, y1, x2, y2 (exclusive) of all nodes so far."""
        b = np.array(self.boxes_py, np.int64)
        return np.concatenate([b[:, :2], -b[:, 2:]], axis=1)


def group(feats: np.ndarray, sizes: np.ndarray, boxes: np.ndarray, pairs: np.ndarray, area: int) -> np.ndarray:
    """Hierarchical grouping of [20] (Alg. 1): merge the most similar neighbouring pair until none is left.

    feats (n, D) float32 (colour | texture histograms), sizes (n,) int64, boxes (n, 4) int64 x1, y1, x2, y2
    (exclusive) of the n initial regions; pairs (E, 2) neighbouring regions; area: image size in pixels
    -> (n + merges, 4) int64 boxes of all nodes, in node order (initial regions, then one per merge).
    Heap of (cost, i, j); pairs of a node merged since are skipped when popped (lazy invalidation), or dropped in
    bulk once there are more than STALE_FACTOR entries per live pair; the loop ends when no live pair is left.
    """
    h = _Hierarchy(feats, sizes, boxes, pairs, area)
    a, b = pairs[:, 0], pairs[:, 1]
    heap = list(zip(h.cost(a, b).tolist(), a.tolist(), b.tolist()))
    heapq.heapify(heap)
    alive, pop, push = h.alive, heapq.heappop, heapq.heappush
    live = sum(map(len, h.adj)) // 2  # neighbouring pairs of live nodes: each has a heap entry, the rest are stale
    while live:
        _, i, j = pop(heap)
        if alive[i] and alive[j]:
            live -= len(h.adj[i]) + len(h.adj[j]) - 1  # pairs with i or j (i-j counted twice) die
            t, near = h.merge(i, j)
            live += len(near)
            if near:
                for entry in h.new_pairs(t, near):
                    push(heap, entry)
            if len(heap) > STALE_FACTOR * live:  # drop the stale entries: cheaper than popping them one by one
                heap = [e for e in heap if alive[e[1]] and alive[e[2]]]
                heapq.heapify(heap)
    return h.node_boxes()


def hierarchical_grouping(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """image uint8 (H, W, C) (the image that was segmented), labels int32 (H, W) of the graph segmentation, sides
    < 65536 -> (M, 4) int32 unique (x, y, w, h) boxes of all hierarchy nodes, sorted (the set OpenCV's process()
    returns)."""
    if max(labels.shape) >= 1 << 16:
        raise ValueError(f"image sides must be < 65536, got {labels.shape}")
    feats, sizes, boxes = region_features(image, labels)
    nodes = group(feats, sizes, boxes, neighbour_pairs(labels), labels.size)  # (n + merges, 4)
    xywh = np.concatenate([nodes[:, :2], nodes[:, 2:] - nodes[:, :2]], axis=1)  # (n + merges, 4) int64 < 2^16
    keys = np.unique(((xywh[:, 0] << 16 | xywh[:, 1]) << 16 | xywh[:, 2]) << 16 | xywh[:, 3])  # 1-D: ~10x faster
    return np.stack([keys >> 48, keys >> 32 & 0xFFFF, keys >> 16 & 0xFFFF, keys & 0xFFFF], axis=1).astype(np.int32)
