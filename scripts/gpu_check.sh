#!/usr/bin/env bash
# The GPU check, for the device machine (an H200 with Python 3.12 and torch 2.11 but no fastai, no internet): run from
# the repo root with the wheels of scripts/gpu_wheels.txt carried in .whl/ (scripts/fetch_gpu_wheels.sh puts them
# there), e.g. through the device tool: command `bash scripts/gpu_check.sh`, carry [".whl"], timeout_s 540.
# Installs the wheels into /tmp/site (or $GPU_CHECK_SITE), prints the machine and versions, runs tests/test_gpu.py,
# then the bench on CUDA (the penalties alone, then training epochs). Each step runs whatever the earlier ones did
# ("FAILED: step" marks one that failed); about 4 minutes, at most 7.5 (each step has a timeout). Writes under $OUT (or
# /tmp/gpu_check): log (everything printed), pytest.xml, bench_float32.json, bench_bfloat16.json, train.json.
set -o pipefail
SITE=${GPU_CHECK_SITE:-/tmp/site}  # where the wheels are installed (fresh on the device machine)
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 MPLBACKEND=Agg
step() { echo; echo "=== $* ($(date -u +%H:%M:%S) UTC)"; }
{
    step "install the carried wheels"
    ls .whl/*.whl 2>/dev/null | wc -l
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || echo "FAILED: install wheels"
    export PYTHONPATH=$SITE:$PWD

    step "machine and versions"
    nvidia-smi -L || echo "FAILED: nvidia-smi"
    python3 - <<'PY' || echo "FAILED: versions"
import platform, torch
cuda = torch.cuda.is_available()
print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| available', cuda, '|', torch.cuda.get_device_name(0) if cuda else '-')
import fastai, fastcore, fastai_tar, fastai.text.all
print('fastai', fastai.__version__, '| fastcore', fastcore.__version__, '| fastai_tar', fastai_tar.__version__,
      'from', fastai_tar.__file__)
PY

    step "tests/test_gpu.py"
    timeout 120 python3 -m pytest -q -rA -p no:cacheprovider --rootdir "$PWD" -c setup.cfg --durations=10 \
        --junitxml "$OUT/pytest.xml" tests/test_gpu.py || echo "FAILED: pytest (status $?)"

    # one dtype a run: the bench prints its table at the end, so a run cut short by its timeout shows nothing
    for dtype in float32 bfloat16; do
        step "bench: the penalties on CUDA, $dtype, 5 repeats"
        timeout 110 python3 -m fastai_tar bench --device cuda --dtypes $dtype --repeats 5 \
            --json "$OUT/bench_$dtype.json" || echo "FAILED: bench $dtype (status $?)"
    done

    step "bench --train: AWD-LSTM LM epochs on CUDA, with and without TARCallback"
    timeout 75 python3 -m fastai_tar bench --train --device cuda --json "$OUT/train.json" \
        || echo "FAILED: bench --train (status $?)"

    step "done"
} 2>&1 | tee "$OUT/log"
