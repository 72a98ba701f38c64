#!/usr/bin/env bash
# Every benchmark of README at the smallest size, one after another, on the tiny demo model: proves each
# command still runs end to end and writes its table (numbers at this size mean nothing). Results go to
# $SMOKE_OUT (default: a fresh temporary folder), never to benchmarks/results/. Stops at the first failure.
#   make bench-smoke            # ~16 min on 2 CPU cores
#   benchmarks/smoke.sh streaming flash    # only these
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-${VENV:-.venv}/bin/python}
OUT=${SMOKE_OUT:-$(mktemp -d -t bench-smoke-XXXX)}
mkdir -p "$OUT"
declare -A RUNS=(
  [chat]="benchmarks/compare.py --demo-size tiny --topics 1 --turns 2 --max-tokens 4 --out-dir $OUT/chat"
  [streaming]="benchmarks/streaming_benchmark.py --model tiny --ticks 16 --questions 2 --rate 4 --out-dir $OUT/streaming --providers vllm-stateful,vllm-prefix-cache,vllm-prefix-warming"
  [flash]="benchmarks/flash_benchmark.py --model tiny --ticks 16 --questions 2 --rate 4 --out $OUT/flash"
  [sessions]="benchmarks/session_turn_latency.py --model tiny --turns 4 --window 2 --out-dir $OUT/sessions"
  [probe]="benchmarks/ingest_probe.py --model tiny --contexts 200 --append-sizes 17 --query-threads 2 --out-dir $OUT/probe"
  [multi-tenant]="benchmarks/multi_tenant.py --quick --sessions 2 --duration-s 4 --probe-max-sessions 2 --out $OUT/multi_tenant"
  [lifecycle]="benchmarks/lifecycle.py --quick --out $OUT/lifecycle"
  [scale-out]="benchmarks/scale_out.py --quick --setups \"1 engine\" --out $OUT/scale_out"
  [session-latency]="benchmarks/session_latency.py --model tiny --sessions 2 --turns 6 --head 2 --tail 2 --warmup-turns 1 --out-dir $OUT/session_latency"
  [profile]="benchmarks/profile_request.py --model tiny --contexts 256,1024 --requests 4 --out-dir $OUT/profile"
  [ingest]="benchmarks/ingest_vs_prefill.py --model tiny --contexts 256 --chunks 17,128 --repeats 1 --out-dir $OUT/ingest"
  [floor]="benchmarks/query_floor.py --model tiny --contexts 256,512 --repeats 1 --out-dir $OUT/floor"
  [render]="benchmarks/chat_render_cost.py --model tiny --turns 2,4 --repeats 2 --out-dir $OUT/render"
  [dtype]="benchmarks/dtype_prefill.py --model tiny --prompt-tokens 64 --prompts 1 --decode-tokens 4 --out-dir $OUT/dtype"
)
ORDER=(chat streaming flash sessions probe multi-tenant lifecycle scale-out session-latency profile ingest floor render dtype)
for name in "${@:-${ORDER[@]}}"; do
  [[ -n "${RUNS[$name]:-}" ]] || { echo "unknown benchmark $name; known: ${ORDER[*]}" >&2; exit 2; }
  start=$SECONDS
  echo "== $name: python ${RUNS[$name]}"
  eval "$PY ${RUNS[$name]}" > "$OUT/$name.log" 2>&1 || { echo "FAILED $name (log: $OUT/$name.log)"; tail -30 "$OUT/$name.log"; exit 1; }
  summary=$(find "$OUT/${name//-/_}" -name summary.md 2>/dev/null | head -1)
  [[ -n "$summary" ]] || { echo "FAILED $name: no summary.md under $OUT/${name//-/_}"; exit 1; }
  echo "   ok in $((SECONDS - start)) s; $summary"
done
echo "all in $OUT"
