"""The study's report (study.py): mean +- std over seeds, our tables in the layout of the paper's Tables 1-4 with its
numbers beside ours, Figure 1-like TIDE bars, AP against label fraction, and which claims reproduce (sections 4.3-4.5).

Symbols: (m, s, n) mean, sample standard deviation (ddof 1; NaN for one seed) and number of seeds of a cell group;
SE = sqrt(s_a^2 / n_a + s_b^2 / n_b) the standard error of a difference of two means; AP_bb / AP_mk COCO box / mask
AP; nAP / mAP VOC mAP50 of novel / all classes; AR@k proposal recall (eval.proposal_recall).

Verdict of "a > b" (verdict): "reproduces" when m_a - m_b > 2 SE; "same sign, within noise" when 0 < m_a - m_b <=
2 SE; "does not reproduce" otherwise; with one seed only the sign is reported. When no fine-tuned AP_bb reaches
LEARNED_AP the report says that no claim can be judged (the detectors have not learned).

Public: PAPER_T1, PAPER_T2, PAPER_T3, TIDE_COLS, mean_std(values), fmt(ms), summarize(cells), get(S, kind, method,
key, metric) -> (m, s, n) (NAN3 when missing), verdict(a, b), claims(S, preset), tables(S, preset) -> markdown,
plots(S, preset, root) -> [PNG paths], header(preset, files) -> the report's opening paragraph, aggregate(cells, root,
preset, files) -> path of label_efficiency.md.
"""
from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

# Paper numbers for reference (paper.md; Table 1's SoCo / ADePT rows as reference.md). fraction -> (AP_bb, AP_mk).
PAPER_T1 = {"scratch": {1.0: (26.4, 34.0)},  # as printed in Table 1 (mask AP above box AP there)
            "byol": {1.0: (40.6, 36.7), 0.1: (24.5, 23.2), 0.01: (13.0, 12.5)},  # BYOL 1000 epochs
            "soco": {1.0: (41.8, 37.3), 0.1: (28.2, 25.5), 0.01: (15.0, 13.9)},
            "separate": {1.0: (41.9, 37.6), 0.1: (28.6, 25.9), 0.01: (15.3, 14.1)},
            "joint": {1.0: (41.8, 37.5), 0.1: (28.6, 25.8), 0.01: (15.3, 14.2)},
            # Table 4 (joint's switches)
            "rpngrad": {1.0: (41.158, 37.002), 0.1: (27.783, 25.073), 0.01: (14.508, 13.332)},
            "rpnprop": {1.0: (0.564, 0.771), 0.1: (0.020, 0.018), 0.01: (0.015, 0.019)},
            "both": {1.0: (6.784, 6.528), 0.1: (0.003, 0.002), 0.01: (0.001, 0.000)}}
PAPER_T4_JOINT = {1.0: (41.677, 37.342), 0.1: (28.576, 25.794), 0.01: (15.161, 13.938)}  # Table 4's joint row
PAPER_T2 = {"soco": {1: (0.56, 1.14), 5: (1.91, 1.50), 10: (2.96, 2.89)},  # VOC split 1: K -> (novel, all) mAP50
            "separate": {1: (1.60, 1.72), 5: (1.17, 2.25), 10: (3.52, 4.53)},
            "joint": {1: (2.14, 1.62), 5: (1.93, 2.59), 10: (2.91, 4.20)}}
TIDE_COLS = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss", "FalsePos", "FalseNeg")
PAPER_T3 = {"soco": (3.39, 6.45, None, 0.21, 4.15, 6.89, 16.81, 14.57),  # COCO full; Both is not in Table 3
            "separate": (3.18, 6.28, None, 0.22, 4.35, 6.61, 17.40, 13.59),
            "joint": (3.31, 6.44, None, 0.22, 4.40, 6.54, 17.45, 13.75)}
NAMES = {"scratch": "Scratch", "byol": "BYOL", "soco": "SoCo", "separate": "ADePT (sep)", "joint": "ADePT (joint)",
         "rpngrad": "joint, L_RPN to backbone", "rpnprop": "joint, SS + RPN proposals", "both": "joint, both switches",
         "random_rpn": "untrained RPN", "selective_search": "selective search"}
T4 = {"joint": ("L_det", "SS"), "rpngrad": ("L_det + L_RPN", "SS"), "rpnprop": ("L_det", "SS + RPN"),
      "both": ("L_det + L_RPN", "SS + RPN")}
NAN3 = (math.nan, math.nan, 0)
LEARNED_AP = 1.0  # AP_bb (%) under which a fine-tuned detector is taken as not having learned: no verdict is read


def mean_std(values) -> tuple:
    """Finite values -> (mean, sample std (ddof 1, NaN for one value), n); (NaN, NaN, 0) when none."""
    v = np.array([float(x) for x in values if x is not None and math.isfinite(float(x))])
    if not len(v):
        return NAN3
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def fmt(ms) -> str:
    m, s, n = ms
    return "-" if not n else f"{m:.2f}" if not math.isfinite(s) else f"{m:.2f} ± {s:.2f}"


def summarize(cells) -> tuple[dict, dict]:
    """Done cells -> (raw {name: cell.json}, S[kind][method][key][metric] = (mean, std, n) over seeds)."""
    raw, groups = {}, defaultdict(list)
    for c in cells:
        if not c.done:
            continue
        d = raw[c.name] = json.loads((c.folder / "cell.json").read_text())
        i = c.info
        if c.kind == "finetune":
            m = d["metrics"]
            groups["finetune", i["method"], i["key"], "AP_bb"].append(m["bbox"]["AP"])
            groups["finetune", i["method"], i["key"], "AP_mk"].append(m.get("segm", {}).get("AP"))
            for e in TIDE_COLS + ("AP50",):
                groups["tide", i["method"], i["key"], e].append(d["tide_bbox"].get(e))
        elif c.kind == "fewshot":
            v = d["metrics"]["voc_map50"]
            groups["fewshot", i["method"], i["key"], "nAP"].append(v["nAP"])
            groups["fewshot", i["method"], i["key"], "mAP"].append(v["mAP"])
        elif d.get("recall"):
            for k, v in d["recall"].items():
                groups["recall", i["variant"], None, k].append(v)
    S: dict = {}
    for (kind, method, key, metric), vals in groups.items():
        S.setdefault(kind, {}).setdefault(method, {}).setdefault(key, {})[metric] = mean_std(vals)
    return raw, S


def get(S, kind, method, key, metric) -> tuple:
    return S.get(kind, {}).get(method, {}).get(key, {}).get(metric, NAN3)


def verdict(a, b) -> str:
    """Is a > b? a, b: (mean, std, n). See the module docstring."""
    if not a[2] or not b[2]:
        return "not measured"
    d = a[0] - b[0]
    if a[2] < 2 or b[2] < 2:
        return f"{'higher' if d > 0 else 'not higher'} (one seed: sign only)"
    se = math.sqrt(a[1] ** 2 / a[2] + b[1] ** 2 / b[2])
    return "reproduces" if d > 2 * se else "same sign, within noise" if d > 0 else "does not reproduce"


def _cmp(ctx, na, nb, a, b, ref=None) -> list:
    """[row] for the claim "na > nb" in the paper's direction: ref = the paper's (a, b) numbers, swapped with the
    names when the paper has b > a; a tie in the paper is no claim ([])."""
    if ref and ref[0] == ref[1]:
        return []
    if ref and ref[0] < ref[1]:
        na, nb, a, b, ref = nb, na, b, a, (ref[1], ref[0])
    return [{"claim": f"{ctx}: {na} > {nb}", "ours": f"{fmt(a)} vs {fmt(b)}",
             "paper": f"{ref[0]} vs {ref[1]}" if ref else "-", "verdict": verdict(a, b)}]


def claims(S, p) -> list:
    """The paper's claims as comparisons "a > b" on our numbers (rows of the verdict table)."""
    rows, F, top, low = [], sorted(p["fractions"]), max(p["fractions"]), min(p["fractions"])
    ft = lambda m, f: get(S, "finetune", m, f, "AP_bb")  # noqa: E731
    t1 = lambda m, f: (PAPER_T1[m][f][0],) if f in PAPER_T1[m] else None  # noqa: E731
    if top > low:  # a plan with one label fraction has no premise to test
        rows += _cmp("premise (issue 6), Scratch AP_bb", f"{top:.0%} labels", f"{low:.0%}", ft("scratch", top),
                     ft("scratch", low))
    for m in ("soco", "joint"):
        rows += _cmp(f"premise, AP_bb at {low:.0%}", NAMES[m], "Scratch", ft(m, low), ft("scratch", low))
    for f in F:
        for m, base in (("separate", "soco"), ("joint", "soco"), ("soco", "byol")):
            ref = (t1(m, f) or (None,)) + (t1(base, f) or (None,))
            rows += _cmp(f"Table 1, {f:.0%}, AP_bb", NAMES[m], NAMES[base], ft(m, f), ft(base, f),
                         ref if None not in ref else None)
    for k in p["shots"]:
        for m in ("separate", "joint"):
            rows += _cmp(f"Table 2, K={k}, novel mAP50", NAMES[m], "SoCo", get(S, "fewshot", m, k, "nAP"),
                         get(S, "fewshot", "soco", k, "nAP"),
                         (PAPER_T2[m][k][0], PAPER_T2["soco"][k][0]) if k in PAPER_T2["soco"] else None)
    for m in ("separate", "joint"):
        for e in ("Loc", "Miss"):  # the errors 4.5.1 credits RPN pre-training with reducing
            i = TIDE_COLS.index(e)
            rows += _cmp(f"Table 3, {e} error at {top:.0%} (lower is better)", "SoCo", NAMES[m],
                         get(S, "tide", "soco", top, e), get(S, "tide", m, top, e), (PAPER_T3["soco"][i],
                                                                                    PAPER_T3[m][i]))
    for f in p["ablation"]:
        for v in ("rpngrad", "rpnprop", "both"):
            rows += _cmp(f"Table 4, {f:.0%}, AP_bb", "L_det + SS (joint default)", f"{T4[v][0]} + {T4[v][1]}",
                         ft("joint", f), ft(v, f), (PAPER_T4_JOINT[f][0], PAPER_T1[v][f][0]) if f in
                         PAPER_T4_JOINT else None)
    rows += _cmp("3.2, AR@100 on val", "pre-trained RPN (joint)", "untrained RPN",
                 get(S, "recall", "joint", None, "AR@100"), get(S, "recall", "random_rpn", None, "AR@100"))
    return rows


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]) + "\n"


def _paper(m, f, joint=None) -> str:
    v = joint.get(f) if joint and m == "joint" else PAPER_T1.get(m, {}).get(f)
    return f"{v[0]} / {v[1]}" if v else "-"


def tables(S, p) -> str:
    """Markdown: Table 1-like, Table 4-like, few-shot, Table 3-like and AR tables, ours beside the paper's."""
    F, A, K = sorted(p["fractions"], reverse=True), sorted(p["ablation"], reverse=True), p["shots"]
    top = max(F)
    ft = lambda m, f: f"{fmt(get(S, 'finetune', m, f, 'AP_bb'))} / {fmt(get(S, 'finetune', m, f, 'AP_mk'))}"  # noqa
    out = ["## Table 1: Mask R-CNN, AP_bb / AP_mk by label fraction (mean ± std over seeds)\n",
           _table(["pre-training"] + [f"ours {f:.0%}" for f in F] + [f"paper COCO {f:.0%}" for f in F],
                  [[NAMES[m]] + [ft(m, f) for f in F] + [_paper(m, f) for f in F] for m in
                   ("scratch", "byol", "soco", "separate", "joint")])]
    out += ["\n## Table 4: joint-mode switches (ablation), AP_bb / AP_mk\n",
            _table(["loss to backbone", "head proposals"] + [f"ours {f:.0%}" for f in A]
                   + [f"paper {f:.0%}" for f in A],
                   [list(T4[v]) + [ft(v, f) for f in A] + [_paper(v, f, PAPER_T4_JOINT) for f in A] for v in T4])]
    nov = lambda m, k, i: fmt(get(S, "fewshot", m, k, ("nAP", "mAP")[i]))  # noqa: E731
    ref = lambda m, k, i: f"{PAPER_T2[m][k][i]}" if m in PAPER_T2 and k in PAPER_T2[m] else "-"  # noqa: E731
    out += [f"\n## Table 2-like: Faster R-CNN K-shot, VOC mAP50 (novel classes {p.get('novel')}, base classes in "
            "full)\n",
            _table(["pre-training"] + [f"novel K={k}" for k in K] + [f"all K={k}" for k in K]
                   + [f"paper novel K={k}" for k in K] + [f"paper all K={k}" for k in K],
                   [[NAMES[m]] + [nov(m, k, 0) for k in K] + [nov(m, k, 1) for k in K] + [ref(m, k, 0) for k in K]
                    + [ref(m, k, 1) for k in K] for m in p["fewshot"]])]
    rows = [[NAMES[m]] + [fmt(get(S, "tide", m, top, e)) for e in TIDE_COLS + ("AP50",)] for m in
            ("scratch", "byol", "soco", "separate", "joint")]
    rows += [[NAMES[m] + " (paper, COCO)"] + ["-" if v is None else v for v in PAPER_T3[m]] + ["-"] for m in PAPER_T3]
    out += [f"\n## Table 3-like: TIDE dAP50 (box) at {top:.0%} labels (lower is better)\n",
            _table(["pre-training"] + list(TIDE_COLS) + ["AP50"], rows)]
    ar = lambda v, k: fmt(get(S, "recall", v, None, k))  # noqa: E731
    rec = [[NAMES[v]] + [ar(v, k) for k in ("AR@10", "AR@100", "AR@1000", "proposals")]
           for v in ("separate", "joint", "rpngrad", "rpnprop", "both", "random_rpn") if v in S.get("recall", {})]
    rec += [[f"selective search{t}", "-", "-", ar("selective_search", f"{t[1:]}{t[:1]}AR@all") + " (all boxes)",
             ar("selective_search", f"{t[1:]}{t[:1]}proposals")] for t in ("", " filtered")
            if "selective_search" in S.get("recall", {})]
    out += ["\n## Proposal recall on val (class-agnostic AR, %; RPNs: top 1000 after NMS, pre-training anchors)\n",
            _table(["proposals from", "AR@10", "AR@100", "AR@1000", "boxes / image"], rec)]
    return "\n".join(out)


def plots(S, p, root: Path) -> list:
    """ap_vs_labels.png (AP_bb, AP_mk against label fraction, std error bars) and tide.png (Figure 1-like)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from figures import plot_tide
    F = sorted(p["fractions"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for ax, metric in zip(axes, ("AP_bb", "AP_mk")):
        for m in ("scratch", "byol", "soco", "separate", "joint"):
            ms = [get(S, "finetune", m, f, metric) for f in F]
            ax.errorbar([100 * f for f in F], [v[0] for v in ms], yerr=[0 if v[2] < 2 else v[1] for v in ms],
                        marker="o", capsize=3, label=NAMES[m])
        ax.set(xscale="log", xlabel="labelled train images (%)", ylabel=f"{metric} (val)", title=metric)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(root / "ap_vs_labels.png", format="png")
    plt.close(fig)
    top = max(F)
    tide = {NAMES[m]: {e: get(S, "tide", m, top, e)[0] for e in TIDE_COLS} for m in ("scratch", "byol", "soco",
            "separate", "joint") if m in S.get("tide", {})}
    plot_tide({k: {e: (0.0 if not math.isfinite(v) else v) for e, v in d.items()} for k, d in tide.items()},
              root / "tide.png")
    return [root / "ap_vs_labels.png", root / "tide.png"]


def header(p, files) -> str:
    ft, shared = p["ft"], p["shared_pretrain"]
    runs = "one run per variant shared by all fine-tuning seeds" if shared else "one run per seed"
    s = p.get("elapsed_s")
    when = "--report-only: from the cells done" if s is None else f"wall time of this invocation {s / 60:.1f} min"
    command = p.get("command") or (f"python study.py --preset {p['preset']} --seeds {p['seeds']} --val-images "
                                   f"{p.get('val_images') or 0}")
    return (f"# Label-efficiency study on the embedded dataset\n\nGenerated by `{command}` on "
            f"{time.strftime('%Y-%m-%d %H:%M')} "
            f"({when}). Pre-training: ResNet-"
            f"{p['depth']}, {p['pre_steps']} steps of {p['pre_batch']} images at {p['size']}/{p['small_size']} px on "
            f"the unlabelled pool, {runs}. Fine-tuning: Mask R-CNN, batch {ft['batch_size']}, iterations "
            f"{p['iters']} per label fraction; Faster R-CNN K-shot, {p['shot_iters']} iterations; evaluated on "
            f"{p.get('val_n')} val images (`{Path(files[2]).name}`), never seen in pre-training or fine-tuning. The "
            f"paper's numbers (COCO / VOC, ResNet-50, 100 ImageNet epochs) are there for the ordering, not the "
            f"scale. ± is the sample std over seeds"
            f"{' (fine-tuning seeds only: pre-training is shared)' if shared else ''}.\n\n")


def aggregate(cells, root: Path, p: dict, files) -> Path:
    """results/metrics.json (raw cells, summary, verdicts), label_efficiency.md and the PNGs; returns the md path."""
    import eval as ev
    from coco_files import atomic_write
    raw, S = summarize(cells)
    rows = claims(S, p)
    plots(S, p, root)
    counts = {v: sum(r["verdict"].startswith(v) for r in rows) for v in ("reproduces", "same sign", "does not",
                                                                         "higher (one", "not higher")}
    best = max([v["AP_bb"][0] for d in S.get("finetune", {}).values() for v in d.values() if v["AP_bb"][2]],
               default=math.nan)
    md = header(p, files) + tables(S, p) + "\n## Which claims reproduce here\n\n"
    if not best >= LEARNED_AP:
        md += (f"**No claim can be judged from this run: the best fine-tuned AP_bb is {best:.2f} (< {LEARNED_AP}), "
               "so the detectors have not learned yet and the signs below compare noise around 0.** "
               "Longer schedules (more pre-training steps and fine-tuning iterations) are needed.\n\n")
    md += (
        f"Of {len(rows)} comparisons in the paper's direction: {counts['reproduces']} reproduce (difference > 2 SE), "
        f"{counts['same sign']} have the paper's sign within noise, {counts['does not']} do not; with one seed, "
        f"{counts['higher (one']} have the paper's sign and {counts['not higher']} do not (no error bar).\n\n")
    md += _table(["claim", "ours (a vs b)", "paper (a vs b)", "verdict"],
                 [[r["claim"], r["ours"], r["paper"], r["verdict"]] for r in rows])
    md += "\nPlots: `ap_vs_labels.png` (AP against label fraction, std error bars), `tide.png` (Figure 1-like).\n"
    ev.write_metrics({"preset": {k: v for k, v in p.items() if k != "cost"}, "cells": raw, "verdicts": rows,
                      "summary": {k: {m: {str(key): d for key, d in v.items()} for m, v in ms.items()}
                                  for k, ms in S.items()}}, root / "metrics.json")
    atomic_write(root / "label_efficiency.md", md)
    return root / "label_efficiency.md"
