#!/usr/bin/env bash
# Inverse problems with PnP-GD on the FFHQ-256 test images:
#   bash quick_start/posterior-sample.sh {box_inpainting|gaussian_deblur_circ|motion_deblur_circ|super_resolution|phase_retrieval} [options]
# The checkpoint is looked for in ../model_zoo/ncvsd (or ../model_zoo) under any of the names it is known by,
# the test images in ../data/test/ffhq_val or ../data/test. NET=... and DATA=... override both.
set -e
TASK=${1:?usage: bash quick_start/posterior-sample.sh TASK_NAME [options]}
shift

first_existing() {
    for candidate in "$@"; do
        if [ -e "$candidate" ]; then echo "$candidate"; return; fi
    done
}

NAMES="edm2-ffhq256-xs.pkl ncvsd-ffhq256-xs.pkl ncvsd-ffhq256.pkl"
NET=${NET:-$(first_existing $(for n in $NAMES; do echo ../model_zoo/ncvsd/$n ../model_zoo/$n; done))}
DATA=${DATA:-$(first_existing ../data/test/ffhq_val ../data/test)}
if [ -z "$NET" ]; then
    echo "No NCVSD FFHQ-256 checkpoint found: download https://huggingface.co/xypeng9903/ncvsd/resolve/main/edm2-ffhq256-xs.pkl into ../model_zoo/ncvsd/ (or set NET=path)" >&2
    exit 1
fi
if [ -z "$DATA" ]; then
    echo "No test images found: put the FFHQ-256 validation images (256x256 PNGs) in ../data/test/ffhq_val (or set DATA=folder)" >&2
    exit 1
fi
python posterior_sample.py --net="$NET" --data="$DATA" --preset="$TASK" --outdir="results/$TASK" "$@"
