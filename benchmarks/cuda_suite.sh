#!/usr/bin/env bash
# The CUDA checks and GPU benchmarks of the project, in one run (about 5 minutes on one GPU),
# most important first: the layer's reference tests and no-host-sync test on CUDA, the Faster
# R-CNN training step at COCO size, layer speed, the host overhead of a tiny step (the exact and
# the authors' detached gradient against BN), the step at 256 px, a profile, memory, the step
# with grad_nu_stride 3; each writes JSON into OUT_DIR, all log to OUT_DIR/cuda_suite.log.
# Usage: bash benchmarks/cuda_suite.sh OUT_DIR
set -u
out=${1:?usage: cuda_suite.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
log="$out/cuda_suite.log"
run() {  # run NAME COMMAND...: append to the log, keep going on failure
    local name=$1; shift
    echo "== $name: $*" | tee -a "$log"
    "$@" 2>&1 | tee -a "$log" | grep -v "UserWarning\|pkg_resources\|_bootstrap._exec\|warnings.warn"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "!! $name failed (exit $rc)"; status=1; }
}
python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())' | tee "$log"
run reference_tests python3 -m pytest -q -p no:cacheprovider -x tests/test_cbn_layer.py -k reference
[ "$status" -eq 0 ] || exit 1  # no timings of a layer that is wrong on CUDA
run sync_test python3 -m pytest -q -p no:cacheprovider tests/test_cbn_layer.py tests/test_host_sync.py \
    -k "never_wait or sync"
run detector_coco python3 benchmarks/detector_step.py --device cuda --size 800x1088 \
    --repeats 15 --calls 2 --out "$out/detector_step_cuda_800x1088.json"
run layer python3 benchmarks/layer_speed.py --device cuda --repeats 20 --calls 10 \
    --out "$out/layer_speed_cuda.json"
run host_overhead python3 benchmarks/host_overhead.py --device cuda \
    --out "$out/host_overhead_cuda.json"
run detector_256 python3 benchmarks/detector_step.py --device cuda --size 256 \
    --repeats 10 --calls 2 --out "$out/detector_step_cuda_256.json"
run profile python3 benchmarks/profile_cbn.py --device cuda --repeats 5 \
    --out "$out/profile_cbn_cuda.json"
run memory python3 benchmarks/memory.py --device cuda --out "$out/memory_cuda.json"
run detector_coco_s3 python3 benchmarks/detector_step.py --device cuda --size 800x1088 \
    --repeats 10 --calls 2 --variants cbn_sampled --grad-nu-stride 3 \
    --out "$out/detector_step_cuda_800x1088_s3.json"
exit $status
