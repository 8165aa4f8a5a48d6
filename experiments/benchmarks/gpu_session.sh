#!/usr/bin/env bash
# One prepared run on a single-GPU machine: everything this project checks or measures on a GPU,
# each stage bounded by `timeout`, every log and result written under $OUT.
#
#   OUT=/tmp/gpu bash experiments/benchmarks/gpu_session.sh [stages...]
#
# (PRESET=tiny runs the recall stage as a smoke test on any machine.)
#
# Stages (default: env kernels bench, about 8 minutes on an H200; recall on request):
#   env      versions of jax/flax/optax/orbax/chex, the device, nvidia-smi
#   recall   the recall pipeline's `gpu` preset (teacher, distill, export of the parameters), in the
#            background while the kernel tests run (correctness only, so sharing the GPU is fine);
#            RECALL_VARIANTS trains several variants side by side (see below).
#            Parameters, logs and metrics come back in recall.tar.gz.
#   kernels  the kernel tests with the Pallas kernels compiled for real: the Triton family
#            (`pallas_gpu` in tests/kernels/kernel_helpers.py, the `triton` smoke tests, and
#            "pallas" = pallas_triton on a GPU in the fused-step tests), the XLA forms, and the
#            export tests (lowering for TPU and CUDA); f32 products at full precision
#            (JAX_DEFAULT_MATMUL_PRECISION=highest: the kernels' default precision is JAX's)
#   bench    experiments/benchmarks/bench_kernels.py, bf16, T = 4K, 16K, 64K, head dim 64 and 128:
#            linear attention, the hybrid and the fused LoLA prefill, Pallas (Triton) vs XLA, with
#            compile times and the bf16 matmul peak measured in the same process; one process
#            (and timeout) per suite, so a slow suite does not lose the others' results
# Files written (the device tool returns at most 8): summary.txt, kernel_tests.log, bench.log,
# bench_kernels_gpu.json (every suite's rows and its markdown table), recall.tar.gz.
set -u
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
# Packages the GPU image lacks (ml_collections), fetched beforehand with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl ml_collections==1.1.0
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
STAGES=${*:-env kernels bench}
has() { [[ " $STAGES " == *" $1 "* ]]; }
say() { echo "== $(date +%T) $*" | tee -a "$OUT/summary.txt"; }
START=$(date +%s)

if has env; then
  say env
  python3 - 2>&1 <<'EOF' | tee -a "$OUT/summary.txt"
import jax, flax, optax, chex, orbax.checkpoint as ocp
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__,
      "chex", chex.__version__, "orbax", ocp.__version__, "devices", jax.devices())
EOF
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
    | tee -a "$OUT/summary.txt"
fi

RECALL_PIDS=""
# RECALL_VARIANTS: space-separated "name:pipeline flags" (flags joined by '+'), trained side by side;
# default one variant "a" with the committed configs.
VARIANTS=${RECALL_VARIANTS:-a:}
if has recall; then
  for spec in $VARIANTS; do
    v=${spec%%:*}
    extra=${spec#*:}
    extra=${extra//+/ }
    say "recall $v (background) $extra"
    mkdir -p /tmp/recall_$v
    (
      timeout "${RECALL_TIMEOUT:-330}" python3 -m experiments.recall.pipeline \
        --preset="${PRESET:-gpu}" --workdir=/tmp/recall_$v --stages=teacher,distill,export \
        --export_params_dir=/tmp/recall_$v/params $extra >/tmp/recall_$v.log 2>&1
      echo "recall $v exit $?" >>/tmp/recall_$v.log
    ) &
    RECALL_PIDS="$RECALL_PIDS $!"
  done
fi

if has kernels; then
  say kernels
  JAX_DEFAULT_MATMUL_PRECISION=highest timeout "${KERNEL_TIMEOUT:-200}" python3 -m pytest -q \
    -p no:cacheprovider -o addopts="" -m "not slow" \
    tests/kernels/test_kernels_linear.py tests/kernels/test_kernels_hybrid.py \
    tests/kernels/test_kernels_lola_chunk.py tests/kernels/test_kernels_export.py \
    -k "pallas_gpu or xla or triton or export or lola_chunk" >"$OUT/kernel_tests.log" 2>&1
  say "kernel tests exit $?: $(tail -1 "$OUT/kernel_tests.log")"
fi

if [[ -n "$RECALL_PIDS" ]]; then
  wait $RECALL_PIDS
  for spec in $VARIANTS; do
    v=${spec%%:*}
    say "recall $v: $(tail -1 /tmp/recall_$v.log)"
    grep -E "^ *step " /tmp/recall_$v.log | tail -3 | tee -a "$OUT/summary.txt"
    mkdir -p /tmp/recall_$v/params && cp /tmp/recall_$v.log /tmp/recall_$v/params/recall.log
    cp /tmp/recall_$v/teacher/metrics.jsonl /tmp/recall_$v/params/teacher_metrics.jsonl 2>/dev/null
    cp /tmp/recall_$v/hybrid/metrics.jsonl /tmp/recall_$v/params/hybrid_metrics.jsonl 2>/dev/null
  done
  tar -czf "$OUT/recall.tar.gz" -C /tmp $(cd /tmp && ls -d recall_*/params)
fi

if has bench; then
  say bench
  for suite in linear hybrid lola; do
    # shellcheck disable=SC2086
    timeout "${BENCH_TIMEOUT:-130}" python3 -m experiments.benchmarks.bench_kernels \
      --suites=$suite ${BENCH_ARGS:---seq_lens=4096,16384,65536 --head_dims=64,128 --iters=3} \
      --dtype=bfloat16 --out=/tmp/bench_$suite.json >>"$OUT/bench.log" 2>&1
    say "bench $suite exit $?"
  done
  python3 - "$OUT/bench_kernels_gpu.json" <<'EOF' | tee -a "$OUT/summary.txt"
import json, os, sys
runs = {s: json.load(open(f"/tmp/bench_{s}.json")) for s in ("linear", "hybrid", "lola")
        if os.path.exists(f"/tmp/bench_{s}.json")}
json.dump(runs, open(sys.argv[1], "w"), indent=1)
for s, r in runs.items():
  print(f"## {s} (bf16 matmul peak {r['meta']['bf16_matmul_peak_tflops']:.3g} TFLOP/s)")
  print(r["markdown"])
  for key, ratio in r["pallas_over_xla"].items():
    print(f"pallas/xla time {key}: {ratio:.2f}")
EOF
fi

say "done after $(($(date +%s) - START))s"
