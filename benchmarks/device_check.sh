#!/usr/bin/env bash
# The GPU checks CPU machines cannot do, as one short script (about 5 minutes on one GPU):
#   1. the MoE figure on the GPU (issue 3: vectorised vs per-sample loop, forward+backward, batch 8);
#   2. training on CUDA with AMP: bf16 where supported, then fp16 + GradScaler (forced, as on a Kaggle T4),
#      with --channels-last, a checkpoint, and a resume of the fp16 run that must go on where it stopped;
#   3. the trainer's overhead over a bare loop on the GPU (host syncs per step show up here, not on CPU);
#   4. peak CUDA memory with and without gradient checkpointing;
#   5. NCCL: a one-process torchrun (one GPU: two NCCL ranks cannot share it);
#   6. --compile, last (its first compile takes minutes).
# Each step has its own time limit; the log goes to $OUT/device_check.log when OUT is set (the device tool), else
# to /tmp/device_check.log. Usage:
#   bash benchmarks/device_check.sh            # on the GPU machine
#   DEVICE=cpu IMG=128 MEM=edgenext_xx_small bash benchmarks/device_check.sh
#                                              # wiring check on a CPU machine (fp16, NCCL and compile skipped)
# Missing packages on a machine without internet: download wheels where pip works and put them in .whl/
# (python 3.12 example; the device README has the platform flags):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     albumentations==2.0.8 albucore==0.0.24 simsimd stringzilla pydantic==2.14.4 pydantic-core \
#     annotated-types typing-inspection pysodmetrics==1.6.2
# This script installs whatever is in .whl/ into /tmp/site first.
set -u
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda} IMG=${IMG:-256} MEM=${MEM:-edgenext_small edgenext_base}
LOG=${OUT:-/tmp}/device_check.log
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CODSEG_CACHE=/tmp/codseg-cache
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
exec > >(tee "$LOG") 2>&1
fails=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, report its status
  local name=$1 limit=$2; shift 2
  echo; echo "=== $name ($(date +%T), limit ${limit}s)"
  timeout "$limit" "$@"; local rc=$?
  echo "=== $name: exit $rc"; [ $rc -eq 0 ] || fails=$((fails + 1))
}
RUN=/tmp/codseg-device-runs; rm -rf $RUN
TRAIN=(-m codseg train --dataset-path synthetic --backbone edgenext_xx_small --no-pretrained --img-size $IMG
       --stage1-epochs 1 --batch-size 16 --accumulation-steps 1 --lr 0.002 --scheduler cosine --num-workers 4
       --device "$DEVICE")
FP16='import sys, torch; torch.cuda.is_bf16_supported = lambda *a, **k: False; from codseg.cli import main; sys.exit(main())'

$PY -c "import torch, timm, albumentations, py_sod_metrics; print('torch', torch.__version__, 'timm', timm.__version__,
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
step "MoE speed" 120 $PY benchmarks/moe_speed.py --device "$DEVICE"
step "train, AMP auto (bf16 where supported), channels-last" 240 \
  $PY "${TRAIN[@]}" --epochs 3 --channels-last --checkpoint-dir $RUN/auto
if [ "$DEVICE" != cpu ]; then
  step "train, fp16 + GradScaler (bf16 hidden), 2 of 3 epochs" 180 \
    $PY -c "$FP16" train "${TRAIN[@]:3}" --epochs 3 --stop-after 2 --checkpoint-dir $RUN/fp16
  step "resume the fp16 run: epoch 3 only" 120 \
    $PY -c "$FP16" train "${TRAIN[@]:3}" --epochs 3 --checkpoint-dir $RUN/fp16 --resume-from auto
fi
step "trainer overhead" 180 $PY benchmarks/trainer_overhead.py --device "$DEVICE" --batch 16
step "memory with and without gradient checkpointing" 180 \
  $PY benchmarks/memory_peak.py --device "$DEVICE" --backbones $MEM --batches 4 8
if [ "$DEVICE" != cpu ]; then
  step "NCCL, one process under torchrun" 180 \
    $PY -m torch.distributed.run --standalone --nproc_per_node 1 "${TRAIN[@]}" --epochs 1 --stage1-epochs 0 \
      --checkpoint-dir $RUN/nccl
  step "--compile" 420 $PY "${TRAIN[@]}" --epochs 1 --stage1-epochs 0 --compile --checkpoint-dir $RUN/compile
fi
echo; echo "device check: $fails step(s) failed"
exit $fails
