#!/usr/bin/env bash
# The one command for a lent GPU (issues 7 and 6): bench/gpu_check.py, then the largest part of the GPU study
# (study.py --preset gpu) that fits the time left. Run from the repo root on the device machine:
#     bash bench/gpu_run.sh                        # $OUT/gpu_check.md, $OUT/study.tgz, $OUT/run.log
# Environment knobs (seconds / study.py flags):
#     DEADLINE_S  whole script, default 540 (the device tool's call limit is 600)
#     CHECK_S     gpu_check.py's --budget-s, default 200; 0 skips gpu_check
#     STUDY_ARGS  default: the Table 1 pair scratch vs joint at 100 % labels, one seed, shortened schedules
#     PY          python, default python3
# What the device image lacks travels in .whl/ (git-ignored; pass carry=[".whl"]):
#     .whl/pycocotools-*.whl   COCO masks and evaluation (the image has no pycocotools)
#     .whl/proposals_paper.npz selective search of the embedded pool, computed on the dev machine: the image's
#                              opencv-python-headless has no cv2.ximgproc, and opencv-contrib's wheel (69 MB) is over
#                              the tool's 64 MiB. The study's selective-search recall cell fails there for that reason.
# The study resumes: carry results_gpu/ (git-ignored) from an earlier call's study.tgz to skip the cells it finished.
# Check the script on a CPU: PY=.venv/bin/python SMOKE=1 bash bench/gpu_run.sh
set -u
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_run}; mkdir -p "$OUT"
DEADLINE_S=${DEADLINE_S:-540}
CHECK_S=${CHECK_S:-200}
STUDY_ARGS=${STUDY_ARGS:---preset gpu --methods scratch,joint --fractions 1 --iters 600 --pre-steps 200 --shots none \
--no-ablation --seeds 1 --jobs 2}
START=$(date +%s)
left() { echo $(( DEADLINE_S - ($(date +%s) - START) )); }
exec > >(tee "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1

if ls .whl/pycocotools-*.whl >/dev/null 2>&1 && ! $PY -c "import pycocotools" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/pycocotools-*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import torch, torchvision, cv2; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'cv2', cv2.__version__, 'ximgproc', hasattr(cv2, 'ximgproc'), 'cuda', torch.cuda.is_available())"

echo "== gpu_check ($(left) s left)"
if [ -n "${SMOKE:-}" ]; then
    $PY bench/gpu_check.py --smoke
elif [ "$CHECK_S" = 0 ]; then
    echo "skipped (CHECK_S=0)"
else
    timeout $(( CHECK_S + 60 )) $PY bench/gpu_check.py --budget-s "$CHECK_S"
fi
echo "gpu_check exit $?"

echo "== dataset ($(left) s left)"
$PY -c "import os, synthetic; synthetic.ensure_synthetic_dataset(workers=min(16, os.cpu_count() or 1))" || exit 1
if [ -f .whl/proposals_paper.npz ] && [ ! -f .cache/synth/proposals_paper.npz ]; then
    cp .whl/proposals_paper.npz .cache/synth/proposals_paper.npz
fi

[ -n "${SMOKE:-}" ] && STUDY_ARGS="--preset smoke --methods scratch,joint --fractions 1 --shots none --no-ablation"
T=$(( $(left) - 30 ))  # 30 s kept for the report and the tarball
echo "== study.py $STUDY_ARGS (timeout ${T} s)"
if [ "$T" -gt 60 ]; then
    timeout "$T" $PY study.py $STUDY_ARGS --results results_gpu
    echo "study exit $?"
    $PY study.py $STUDY_ARGS --results results_gpu --report-only
    tar czf "$OUT/study.tgz" --exclude='*.pth' results_gpu
else
    echo "skipped: too little time left"
fi
echo "== done in $(( $(date +%s) - START )) s"
