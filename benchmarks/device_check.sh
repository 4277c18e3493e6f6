#!/usr/bin/env bash
# The GPU checks CPU machines cannot do, as one short script (about 5 minutes on one GPU):
#   1. the MoE figure on the GPU (issue 3: vectorised vs per-sample loop, forward+backward, batch 8);
#   2. training on CUDA: --precision auto (the banner must say bf16 on a GPU of capability 8.0+, fp16 below),
#      with --channels-last; then --precision fp16 + GradScaler (forced, as on a Kaggle T4), 2 of 3 epochs, and a
#      resume that must go on where it stopped with the scaler's state; fp16 with --grad-clip 0;
#   3. a session end: SIGTERM to the run's whole process group (DataLoader workers included) mid-epoch: exit 143,
#      a mid-epoch last.pth, a resume that finishes; best_model.pth holds the epoch last.pth calls best;
#   4. the trainer's overhead over a bare loop on the GPU, with the host reads per optimizer step (at most 1);
#   5. peak CUDA memory with and without gradient checkpointing;
#   6. NCCL: a one-process torchrun (one GPU: two NCCL ranks cannot share it);
#   7. --compile, last (its first compile takes minutes).
# Each step has its own time limit; the log goes to $OUT/device_check.log when OUT is set (the device tool), else
# to /tmp/device_check.log. Usage:
#   bash benchmarks/device_check.sh            # on the GPU machine
#   DEVICE=cpu IMG=128 MEM=edgenext_xx_small bash benchmarks/device_check.sh
#                                              # wiring check on a CPU machine (NCCL and compile skipped;
#                                              # fp16 runs there too, as CPU autocast with an enabled GradScaler)
#   N=48 ...                                   # fewer synthetic images (default 240), for a quicker CPU check
# Missing packages on a machine without internet: download wheels where pip works and put them in .whl/
# (python 3.12 example; the device README has the platform flags):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     albumentations==2.0.8 albucore==0.0.24 simsimd stringzilla pydantic==2.14.4 pydantic-core \
#     annotated-types typing-inspection pysodmetrics==1.6.2
# This script installs whatever is in .whl/ into /tmp/site first.
set -u
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda} IMG=${IMG:-256} MEM=${MEM:-edgenext_small edgenext_base} N=${N:-240}
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
       --device "$DEVICE" --synthetic-n $N)
# the precision the banner printed must be the one this device should get
PRECISION='import re, sys, torch
log, want = open(sys.argv[1]).read(), sys.argv[2]
if want == "auto": want = "fp32" if not torch.cuda.is_available() else "bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16"
line = re.search(r"^Precision: .*$", log, re.M)
print(line and line[0]); sys.exit(not (line and line[0].startswith("Precision: " + want)))'
# best_model.pth holds the epoch last.pth calls best; the scaler state of an fp16 run
CKPT='import os, sys, torch
for d in sys.argv[1:]:
    if not os.path.exists(f"{d}/last.pth"): print(d, "has no last.pth: its run failed above"); continue
    last, best = (torch.load(f"{d}/{f}", weights_only=True) for f in ("last.pth", "best_model.pth"))
    print(d, "epoch", last["epoch"], "best", last["best_epoch"], "best_model.pth", best["epoch"], "scaler", last["scaler"] or "off")
    assert best["epoch"] == last["best_epoch"] == best["best_epoch"]'
# SIGTERM to the whole process group in epoch 2: exit 143 after a mid-epoch save; the resume finishes (argv: the command)
SIGTERM='import os, signal, subprocess, sys, torch
ck = sys.argv[sys.argv.index("--checkpoint-dir") + 1]
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
out = []
for line in p.stdout:
    out.append(line)
    if line.startswith("  epoch 2: batch"): os.killpg(p.pid, signal.SIGTERM); break
out += p.stdout.read(); p.wait(); print("".join(out[-4:]).rstrip())
c = torch.load(ck + "/last.pth", weights_only=True)
print("exit", p.returncode, "saved at epoch", c["epoch"], "batch", c["batch"])
assert p.returncode == 143 and c["batch"] > 0 and "killed by signal" not in "".join(out)
r = subprocess.run(sys.argv[1:] + ["--resume-from", "auto"], capture_output=True, text=True)
print("resumed:", [l for l in r.stdout.splitlines() if l.startswith("Epoch")], "exit", r.returncode)
sys.exit(r.returncode)'

$PY -c "import torch, timm, albumentations, py_sod_metrics; print('torch', torch.__version__, 'timm', timm.__version__,
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
step "MoE speed" 120 $PY benchmarks/moe_speed.py --device "$DEVICE"
mkdir -p $RUN
step "train, --precision auto (bf16 where native), channels-last" 240 \
  bash -o pipefail -c "$PY ${TRAIN[*]} --epochs 3 --channels-last --checkpoint-dir $RUN/auto | tee $RUN/auto.log"
step "the banner's precision is the device's" 30 $PY -c "$PRECISION" $RUN/auto.log auto
step "train, --precision fp16 + GradScaler (as on a T4), 2 of 3 epochs" 180 \
  bash -c "$PY ${TRAIN[*]} --precision fp16 --epochs 3 --stop-after 2 --checkpoint-dir $RUN/fp16 > $RUN/fp16.log; \
           rc=\$?; cat $RUN/fp16.log; [ \$rc = 3 ]"  # 3: stopped by --stop-after, resumable
step "the banner says fp16" 30 $PY -c "$PRECISION" $RUN/fp16.log fp16
step "resume the fp16 run: epoch 3 only" 120 \
  $PY "${TRAIN[@]}" --precision fp16 --epochs 3 --checkpoint-dir $RUN/fp16 --resume-from auto
step "fp16 with --grad-clip 0" 120 $PY "${TRAIN[@]}" --precision fp16 --grad-clip 0 --epochs 1 --checkpoint-dir $RUN/noclip
step "SIGTERM to the process group mid-epoch, then resume" 240 \
  $PY -c "$SIGTERM" $PY "${TRAIN[@]}" --epochs 2 --checkpoint-dir $RUN/sigterm
step "checkpoints: best_model.pth = last.pth's best; scaler states" 60 $PY -c "$CKPT" $RUN/auto $RUN/fp16 $RUN/sigterm
step "trainer overhead (and host reads per step)" 180 $PY benchmarks/trainer_overhead.py --device "$DEVICE" --batch 16
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
