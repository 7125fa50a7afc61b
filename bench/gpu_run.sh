#!/usr/bin/env bash
# The one command for a lent GPU (issues 7 and 6): bench/gpu_check.py (with its torch.compile stage), then an
# end-to-end train.py run (loader workers, logging and checkpoints included: the H100 run measured 372 images/s
# there against 602 for the step alone), then, if asked, part of the GPU study (study.py --preset gpu).
# Run from the repo root on the device machine:
#     bash bench/gpu_run.sh                        # $OUT/gpu_check.md, $OUT/e2e_log.jsonl, $OUT/run.log
#                                                  # $OUT/e2e_color_device_log.jsonl
# Environment knobs (seconds / study.py flags):
#     DEADLINE_S  whole script, default 540 (the device tool's call limit is 600)
#     CHECK_S     gpu_check.py's --budget-s, default 420 (stages 1-5 took 46 s on one H100, 5b ~40 s, 1b's compile
#                 ~30-60 s (estimate); stage 2b, the whole model compiled, runs after stage 2 if 240 s are left
#                 (an estimate: on the CPU it compiled in 1.7x the extractors' time), 2c, the same with CUDA
#                 graphs, if 120 s are left); 0 skips gpu_check
#     E2E_S       the train.py run (ResNet-50, 224/112, batch 128, bf16 + channels_last, 12 workers), default 60
#                 (gpu_check may take CHECK_S + 60 s: the tool's call limit is 600 s); 0 skips it
#     E2E_DEVICE_S  the same run with --color-on device (colour on the GPU, color_device.py), default 60; 0 skips
#                 it; it runs only if that many seconds + 15 are left (else it says so)
#     STUDY_ARGS  study.py flags, default empty (skipped; the H100 study part is in results/gpu_part_h100.md), e.g.
#                 "--preset gpu --methods scratch,joint --fractions 1 --iters 600 --pre-steps 200 --shots none
#                 --no-ablation --seeds 1 --jobs 2"
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
CHECK_S=${CHECK_S:-420}
E2E_S=${E2E_S:-60}
E2E_DEVICE_S=${E2E_DEVICE_S:-60}
STUDY_ARGS=${STUDY_ARGS:-}
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
    timeout $(( CHECK_S + 60 )) $PY bench/gpu_check.py --budget-s "$CHECK_S" --compile
fi
echo "gpu_check exit $?"

echo "== dataset ($(left) s left)"
$PY -c "import os, synthetic; synthetic.ensure_synthetic_dataset(workers=min(16, os.cpu_count() or 1))" || exit 1
if [ -f .whl/proposals_paper.npz ] && [ ! -f .cache/synth/proposals_paper.npz ]; then
    cp .whl/proposals_paper.npz .cache/synth/proposals_paper.npz
fi

E2E_ARGS="--depth 50 --size 224 --small-size 112 --anchor-sizes 24,48,96,192 --batch-size 128 --amp --channels-last \
--workers 12 --epochs 100 --max-steps 400 --log-every 20 --ckpt-every 100"
[ -n "${SMOKE:-}" ] && E2E_ARGS="--max-steps 4 --log-every 2 --ckpt-every 2 --workers 1" && E2E_S=60
[ -n "${SMOKE:-}" ] && E2E_DEVICE_S=60
e2e() {  # $1 seconds, $2 name of the log in $OUT, then extra train.py flags
    local secs=$1 name=$2; shift 2
    echo "== train.py end to end, $secs s: $E2E_ARGS $*"
    rm -rf /tmp/e2e
    timeout "$secs" $PY train.py --mode joint --out /tmp/e2e $E2E_ARGS "$@" >/tmp/e2e.out 2>&1
    echo "train.py exit $? (124 = stopped by the timeout, as planned)"; tail -c 600 /tmp/e2e.out; echo
    cp /tmp/e2e/log.jsonl "$OUT/$name" 2>/dev/null && cat "$OUT/$name"
}
[ "$E2E_S" -gt 0 ] && e2e "$E2E_S" e2e_log.jsonl
if [ "$E2E_DEVICE_S" -gt 0 ]; then
    if [ "$(left)" -gt $(( E2E_DEVICE_S + 15 )) ]; then
        e2e "$E2E_DEVICE_S" e2e_color_device_log.jsonl --color-on device
    else
        echo "== train.py --color-on device: skipped, $(left) s left (needs $(( E2E_DEVICE_S + 15 )))"
    fi
fi

[ -n "${SMOKE:-}" ] && STUDY_ARGS="--preset smoke --methods scratch,joint --fractions 1 --shots none --no-ablation"
T=$(( $(left) - 30 ))  # 30 s kept for the report and the tarball
echo "== study.py $STUDY_ARGS (timeout ${T} s)"
if [ -z "$STUDY_ARGS" ]; then
    echo "skipped (STUDY_ARGS empty)"
elif [ "$T" -gt 60 ]; then
    timeout "$T" $PY study.py $STUDY_ARGS --results results_gpu
    echo "study exit $?"
    $PY study.py $STUDY_ARGS --results results_gpu --report-only
    tar czf "$OUT/study.tgz" --exclude='*.pth' results_gpu
else
    echo "skipped: too little time left"
fi
echo "== done in $(( $(date +%s) - START )) s"
