#!/usr/bin/env bash
# Every GPU check of the speed work (DESIGN section 13) in one run, for a machine with one CUDA GPU, torch's
# CUDA build and this project's requirements, from the repository's root:
#
#     bash benchmarks/gpu_checks.sh OUT_DIR [SECONDS]          # PYTHON=... to use another interpreter than python3
#
# The steps, most needed first. Each writes its log (and JSON) under OUT_DIR and a line to OUT_DIR/summary.txt;
# a step that fails does not stop the next, and a step is skipped when less than its limit is left of SECONDS
# (default 540), so a lease of a few minutes still brings back the first ones. At most 8 files, all in OUT_DIR.
#   device         the GPU, torch, Triton and CUDA versions (the script stops here if torch sees no GPU)
#   kernel_tests   tests/test_kernels.py natively on the GPU, and the --amp bf16 test (tests/test_speed_options.py)
#   env            PortfolioEnv and SpecialistEnv at 4,096 / 65,536 / 262,144 rows (target: 20M steps/s at
#                  4,096), each Triton kernel's GB/s against the card's copy bandwidth (target: 50% at 262,144).
#                  The compiled steps call the Triton kernels from inside torch.compile, which has never run: if
#                  this step fails, it runs again with MTQ_KERNELS=torch (Inductor's own kernels), as do the next
#   pipeline       the default `pipeline.py --mode train --device cuda` (target: 60 s), each phase's parts
#   cudagraphs     each phase's ms per minibatch at small sizes (`--sections training`), then the same with
#                  Inductor's CUDA graphs (TORCHINDUCTOR_CUDAGRAPHS=1): do they run, and are they faster?
#                  (Phases 2 and 3 carry the meta-controller's tracker from one compiled bar to the next, which
#                  CUDA graph trees may refuse.)
set -uo pipefail

out=${1:?usage: bash benchmarks/gpu_checks.sh OUT_DIR [SECONDS]}
budget=${2:-540}
py=${PYTHON:-python3}
mkdir -p "$out"
summary="$out/summary.txt"
: >"$summary"
start=$SECONDS

say() { echo "$*" | tee -a "$summary"; }

step() { # step NAME LIMIT COMMAND...: COMMAND, killed after LIMIT seconds, run only if LIMIT seconds are left;
    # returns COMMAND's exit status (125 when skipped)
    local name=$1 limit=$2 left=$((budget - (SECONDS - start)))
    shift 2
    if ((left < limit)); then
        say "$name: skipped ($left s left of $budget, it may take $limit)"
        return 125
    fi
    local began=$SECONDS rc
    timeout "$limit" env $kernels "$@" >"$out/$name.log" 2>&1
    rc=$?
    local stopped=""
    ((rc == 124)) && stopped=" (stopped at its $limit s)"
    say "$name${kernels:+ ($kernels)}: exit $rc after $((SECONDS - began)) s$stopped"
    tail -n 4 "$out/$name.log" | sed 's/^/    /' | tee -a "$summary"
    return $rc
}
kernels="" # MTQ_KERNELS=torch once the Triton kernels have failed inside a compiled step

say "gpu_checks at commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%FT%TZ)"
if ! "$py" - >>"$summary" 2>&1 <<'EOF'; then
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA GPU (torch.cuda.is_available() is False): run this on a GPU machine")
try:
    import triton

    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
props = torch.cuda.get_device_properties(0)
print(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs; "
      f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}")
EOF
    tail -n 1 "$summary" >&2
    exit 1
fi
tail -n 1 "$summary"

step kernel_tests 150 "$py" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_speed_options.py \
    -k "not compile_runs"
env_rows=("$py" -m benchmarks.throughput --sections env --devices cuda --batch-sizes 4096 65536 262144 \
    --json "$out/env.json")
step env 150 "${env_rows[@]}"
rc=$?
if ((rc != 0 && rc != 125)); then
    kernels="MTQ_KERNELS=torch"
    step env 150 "${env_rows[@]}"
fi
step pipeline 300 "$py" -m benchmarks.throughput --sections pipeline --train-device cuda --json "$out/pipeline.json"
step cudagraphs 240 bash -c '"$0" -m benchmarks.throughput --sections training --train-device cuda &&
    TORCHINDUCTOR_CUDAGRAPHS=1 "$0" -m benchmarks.throughput --sections training --train-device cuda' "$py"
say "done after $((SECONDS - start)) s"
