#!/usr/bin/env bash
# The GPU runs of this project, one step per argument, as run on the lent H200 (torch 2.11, triton 3.6, no pip):
#
#   bash benchmarks/run_on_gpu.sh check passkey      # then, in the next call while the machine is warm:
#   bash benchmarks/run_on_gpu.sh kernels e2e-decode
#
# Steps (measured durations on the H200, machine start not included):
#   check       benchmarks/gpu_check.py: compiled engines vs the oracle, AOTI round trips in subprocesses  ~3 min
#   check-engines  the same without the AOTI round trips                                            ~1.5 min
#   aoti        only the AOTI round trips of gpu_check.py                                              ~1.5 min
#   check-padded  gpu_check.py --only-padded: mixed-length batches (Triton kernels with per-row positions
#               vs each row alone; padded engines, bf16/fp32, both backends, vs the oracle per row)  ~8 min (H100)
#   mixed-decode  benchmarks/mixed_decode.py: decode of 8 rows at 4K..64K vs equal-length batches,
#               Llama-3 shape, inductor                                                         ~2 min (H100)
#   check-families  benchmarks/family_check.py: Qwen3-8B and Gemma-3-4B shapes (4 layers, random bf16) vs the
#               oracle, both backends and modes, prompts past Gemma 3's 1024-token window         ~3 min (H100)
#   e2e-qwen3   benchmarks/e2e.py --models qwen3 --sections decode: Qwen3-8B shape, seeded random gates at
#               sparsity 0.5, DuoAttention vs all-retrieval (prefill: E2E_MODELS=qwen3 ... e2e-prefill)  (not yet run)
#   passkey     train the bundled passkey model, identify its heads, run the needle study           ~6 min
#   kernels     benchmarks/kernels.py, every section (sweeps, FlexAttention, fp16 / head dim 64)    ~6 min
#   e2e-decode  benchmarks/e2e.py --backend inductor --sections decode, Llama-3 then Llama-2      ~6 min
#               (E2E_ARGS adds arguments, e.g. "--streaming-decode one,tiles": both streaming decode kernels)
#   e2e-prefill the same, --sections prefill --skip-hf, for E2E_MODELS (default "llama3 llama2")  ~4.5 min
#               per model (two engine compiles, a warm-up per length): one model per call fits 10 minutes
#   tp-bench    benchmarks/tp_bench.py under torchrun on TP_NPROC GPUs (default: every GPU; needs 2 or more):
#               Llama-3-8B shape at 512K, TP=1 vs TP=N balanced vs natural head placement; TP_ARGS adds arguments
#               (e.g. "--contexts 131072 524288" or "--engines balanced,natural")         (not yet run; 3 compiles)
#   paged-check benchmarks/paged_check.py: paged retrieval KV, the Triton kernels through block tables vs the
#               reference (bf16/fp32, head dim 128, page sizes 16/64/5), and paged engines (inductor, CUDA-graph
#               decode) under the scheduler with preemptions vs generate alone (CPU dry run: --dry-run, ~2 min)
#                                                                                                ~5 min (H100)
#   serve-bench benchmarks/serve_bench.py: a request stream through the serving scheduler, DuoAttention vs all
#               retrieval at the same KV budget, Llama-3 shape, 8K..32K prompts (SERVE_ARGS adds arguments,
#               e.g. "--requests 32 --max-prompt 65536")          ~9.5 min; each engine's runs get
#               --run-seconds after its warm-up (the first run shared one deadline: DuoAttention's warm-up ate its half)
#   serve-steps benchmarks/serve_steps.py: the scheduler's prefill-chunk and decode steps timed alone, per engine,
#               with kernel breakdowns (STEPS_ARGS adds arguments, e.g. "--page-size 16": paged engines) ~4 min
#   start-bench benchmarks/start_bench.py: compile(), cold / warm first token, load(package) to first token, each
#               in a fresh process, Llama-3-8B shape, random bf16 weights; the package's read bandwidth
#                                                                            ~3.6 min (H100), ~5 min (H200)
#   package-check  benchmarks/package_check.py: tiny Llama, Inductor engine vs eager engine tokens, then a
#               package loaded in a fresh process: same tokens, no graph compiled, nor by a server on it (< 1 min)
#   tree-ab     benchmarks/tree_ab.py: source trees side by side (AB_TREES, default "_base ."), fresh processes
#               taking them in turn: cold first token and generate, prefill at 512/2048/8000, decode, Llama-3-8B
#               shape; make _base (an empty folder) with
#               `git archive <commit> duo_compile kernels passes models | tar -x -C _base` and carry it; AB_ARGS adds arguments (e.g. "--rounds 1 --profile"); DUO_BENCH_MASKS=random (start-bench too): per-layer head splits vary     ~5 min for 2 rounds (H100)
#   region-cost benchmarks/region_host_cost.py --whole: host time of a 512-token prefill's layer-region calls
#               and of what the engine does around them (value table, argument lists), then the prefill through
#               the regions and through the same graph compiled whole, alternating in one process; Llama-3-8B
#               shape; DUO_BENCH_MASKS applies; REGION_ARGS adds arguments (e.g. "--profile $OUT": profiler
#               tables of both)                                                       ~1.5 min (H100), ~2 with --profile
#   triton-pack-check  benchmarks/triton_pack_check.py: the compiled Triton kernel folders and host modules an
#               engine package would carry from a process that ran a tiny engine                       (< 1 min)
# Results go to $OUT (at most 8 files come back from the device tool: the passkey outputs are one tarball).
# The project is not installed there: symlinks make duo_compile.kernels/.passes/.models importable from the
# checkout (what `pip install -e .` maps), and PYTHONPATH puts the checkout first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for d in kernels passes models; do [ -e "duo_compile/$d" ] || ln -s "../$d" "duo_compile/$d"; done
COMMIT="${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"  # the device copy's .git can lag: pass COMMIT=

for step in "$@"; do
    echo "== $step ($(date +%T))"
    case "$step" in
        check) timeout 420 python3 benchmarks/gpu_check.py 2>&1 | tee "$OUT/gpu_check.log" ;;
        check-engines) timeout 300 python3 benchmarks/gpu_check.py --skip-aoti 2>&1 | tee "$OUT/gpu_check.log" ;;
        aoti) timeout 300 python3 benchmarks/gpu_check.py --only-aoti 2>&1 | tee "$OUT/gpu_check_aoti.log" ;;
        check-padded) timeout 560 python3 benchmarks/gpu_check.py --only-padded 2>&1 | tee "$OUT/gpu_check_padded.log" ;;
        mixed-decode)
            timeout 420 python3 benchmarks/mixed_decode.py --out "$OUT" --commit "$COMMIT" ${MIXED_ARGS:-} 2>&1 \
                | tee "$OUT/mixed_decode.log" ;;
        check-families)
            timeout 420 python3 benchmarks/family_check.py 2>&1 | tee "$OUT/family_check.log" ;;
        e2e-qwen3)
            timeout 280 python3 benchmarks/e2e.py --out "$OUT" --models qwen3 --backend inductor --sections decode \
                --skip-hf --commit "$COMMIT" ${E2E_ARGS:-} 2>&1 | tee "$OUT/e2e_qwen3_inductor.log" ;;
        package-check)
            timeout 240 python3 benchmarks/package_check.py 2>&1 | tee "$OUT/package_check.log" ;;
        triton-pack-check)
            timeout 120 python3 benchmarks/triton_pack_check.py 2>&1 | tee "$OUT/triton_pack_check.log" ;;
        start-bench)
            # START_ARGS adds arguments, e.g. "--roles cold,load" (no warm process)
            timeout 560 python3 benchmarks/start_bench.py --out "$OUT" --commit "$COMMIT" ${START_ARGS:-} 2>&1 \
                | tee "$OUT/start_bench.log" ;;
        passkey)
            rm -rf /tmp/pk
            timeout 470 python3 scripts/train_passkey_model.py --out /tmp/pk --device cuda --time-budget 300 \
                --identify-steps 400 --study --samples-per-cell 8 2>&1 | tee "$OUT/train.log"
            tar czf "$OUT/passkey.tgz" -C /tmp pk ;;
        kernels)
            # KERNEL_SECTIONS="ceilings decode gemv" runs only those sections (default: every section)
            timeout 560 python3 -m benchmarks.kernels --out "$OUT/kernels_h200.json" --commit "$COMMIT" \
                --deadline 480 ${KERNEL_SECTIONS:+--sections $KERNEL_SECTIONS} 2>&1 | tee "$OUT/kernels_h200.log" ;;
        e2e-decode)
            for model in llama3 llama2; do
                hf=(); [ "$model" = llama3 ] && hf=(--skip-hf)
                timeout 280 python3 benchmarks/e2e.py --out "$OUT" --models "$model" \
                    --backend inductor --sections decode "${hf[@]}" --commit "$COMMIT" ${E2E_ARGS:-} 2>&1 \
                    | tee "$OUT/e2e_${model}_inductor.log"
            done ;;
        e2e-prefill)
            for model in ${E2E_MODELS:-llama3 llama2}; do
                timeout 540 python3 benchmarks/e2e.py --out "$OUT" --models "$model" \
                    --backend inductor --sections prefill --skip-hf --commit "$COMMIT" ${E2E_ARGS:-} 2>&1 \
                    | tee "$OUT/e2e_${model}_prefill.log"
            done ;;
        tp-bench)
            nproc="${TP_NPROC:-$(nvidia-smi -L | wc -l)}"
            timeout 570 python3 -m torch.distributed.run --nproc-per-node "$nproc" -m benchmarks.tp_bench --out "$OUT" \
                --commit "$COMMIT" ${TP_ARGS:-} 2>&1 | tee "$OUT/tp_bench.log" ;;
        paged-check) timeout 400 python3 benchmarks/paged_check.py 2>&1 | tee "$OUT/paged_check.log" ;;
        serve-steps)
            timeout 400 python3 benchmarks/serve_steps.py --out "$OUT" --commit "$COMMIT" ${STEPS_ARGS:-} 2>&1 \
                | tee "$OUT/serve_steps.log" ;;
        serve-bench)
            timeout 570 python3 benchmarks/serve_bench.py --out "$OUT" --commit "$COMMIT" ${SERVE_ARGS:-} 2>&1 \
                | tee "$OUT/serve_bench.log" ;;
        region-cost)
            timeout 300 python3 benchmarks/region_host_cost.py --whole --out "$OUT/region_host_cost.json" ${REGION_ARGS:-} 2>&1 \
                | tee "$OUT/region_host_cost.log" ;;
        tree-ab)
            timeout 570 python3 benchmarks/tree_ab.py --out "$OUT" --commit "$COMMIT" --trees ${AB_TREES:-_base .} \
                ${AB_ARGS:-} 2>&1 | tee "$OUT/tree_ab.log" ;;
        *) echo "unknown step '$step' (check, check-engines, aoti, check-padded, check-families, mixed-decode," \
                "passkey, kernels, e2e-decode, e2e-prefill, e2e-qwen3, tp-bench, paged-check, serve-bench, serve-steps," \
                "start-bench, triton-pack-check, package-check, tree-ab, region-cost)" >&2
           exit 2 ;;
    esac
done
