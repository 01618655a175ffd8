#!/usr/bin/env bash
# Several variants of the readable-lens recipe trained side by side on one GPU (each step is
# launch-bound, so two or three runs share a chip at little cost each): one dump, then one
# bench/gpu_lens.sh per variant with its own run directory, logs and packed results.
#
#   bash bench/gpu_lens_sweep.sh OUT_DIR NAME[:override,override...] ...
# e.g. bash bench/gpu_lens_sweep.sh runs/sweep base t8:train.t_text=8
# The budget knobs of bench/gpu_lens.sh (WS_SECONDS, RL_SECONDS, EVAL_CORPORA, ...) apply to
# every variant; PROFILE defaults to 0 here (a profile beside other runs measures nothing) and
# EVAL_CORPORA to sotu (the dumped corpus: variants evaluating another corpus at once would each
# dump its validation split into the same directory). Override values cannot hold a comma
# (variants) or a space (OVERRIDES). Exits 1 if any variant ended without a lens.
# With PACK_DIR set, each variant's results end packed in PACK_DIR/NAME. SHARED_WS=1 trains one
# warm start first (its overrides: OVERRIDES alone; packed in PACK_DIR/warm_start) and every
# variant runs GRPO from it, so the variants differ in GRPO alone and the warm start gets the
# chip to itself (WS_BATCH and WS_SECONDS apply to it); then, unless CEILING=0, one context
# ceiling (all variants share its E shape and T_text) trains from that warm-start lens beside the
# variants' GRPO (CEIL_STEPS at WS_BATCH within CEIL_SECONDS, saved at the step reached when time
# runs out), is copied into each variant's lens at the end and packed in PACK_DIR/ceiling, and
# the variants train none of their own. OVERRIDES (space-separated)
# go to the dump and to every variant, e.g. a CPU dry run:
#   OVERRIDES="device=cpu num_samples=64 val_samples=32 eval.num_samples=32" WS_SECONDS=30 \
#     RL_SECONDS=30 EVAL_CORPORA=sotu bash bench/gpu_lens_sweep.sh runs/sweep_dry a b:train.t_text=8
set -u
out=${1:?OUT_DIR}
shift
mkdir -p "$out"
py=${PY:-python3}
read -ra common <<<"${OVERRIDES:-}"
pids=()
"$py" -m consistency_lens dump --config config/gpu.yaml "${common[@]}" >"$out/dump.log" 2>&1 || { tail -20 "$out/dump.log"; exit 1; }
if [ "${SHARED_WS:-0}" = 1 ]; then
    pack_dir=
    [ -n "${PACK_DIR:-}" ] && pack_dir=$PACK_DIR/warm_start && mkdir -p "$pack_dir"
    WS_LENS= SKIP_DUMP=1 WS_ONLY=1 PROFILE=0 PACK_DIR=$pack_dir bash bench/gpu_lens.sh "$out/warm_start" \
        "${common[@]}" train.run_dir=runs/gpu_shared_ws >"$out/warm_start.log" 2>&1 ||
        { cat "$out/warm_start.log"; exit 1; }
    export WS_LENS=runs/gpu_shared_ws/warm_start/lens
fi
ceil_pid=
if [ "${SHARED_WS:-0}" = 1 ] && [ "${CEILING:-1}" != 0 ]; then
    ceil=("$py" -m consistency_lens train-ceiling --config config/gpu.yaml --checkpoint "$WS_LENS"
        "${common[@]}" train.run_dir=runs/gpu_shared_ws train.batch_size="${WS_BATCH:-64}"
        train.alpha.start=0.0)
    (
        timeout -s TERM -k 120 "${CEIL_SECONDS:-100}" "${ceil[@]}" train.steps="${CEIL_STEPS:-${WS_STEPS:-600}}"
        if [ ! -f "$WS_LENS/context_ceiling/ceiling_config.json" ]; then
            step=$(grep -o 'at step [0-9]*' "$out/ceiling.log" | tail -1 | grep -o '[0-9]*$')
            echo "ceiling stopped at step ${step:-?}; saving it at that step"
            [ -n "$step" ] && "${ceil[@]}" train.steps="$step" --resume
        fi
    ) >"$out/ceiling.log" 2>&1 &
    ceil_pid=$!
    export CEILING=0
fi
for variant in "$@"; do
    name=${variant%%:*}
    overrides=()
    [ "$name" != "$variant" ] && IFS=, read -ra overrides <<<"${variant#*:}"
    pack_dir=
    [ -n "${PACK_DIR:-}" ] && pack_dir=$PACK_DIR/$name && mkdir -p "$pack_dir"
    SKIP_DUMP=1 PROFILE=${PROFILE:-0} EVAL_CORPORA=${EVAL_CORPORA:-sotu} PACK_DIR=$pack_dir \
        bash bench/gpu_lens.sh "$out/$name" "${common[@]}" train.run_dir="runs/gpu_$name" \
        "${overrides[@]}" >"$out/$name.log" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=1
done
if [ -n "$ceil_pid" ]; then
    wait "$ceil_pid"
    tail -3 "$out/ceiling.log"
    if [ -f "$WS_LENS/context_ceiling/ceiling_config.json" ]; then
        for variant in "$@"; do
            lens=runs/gpu_${variant%%:*}/lens
            [ -d "$lens" ] && rm -rf "$lens/context_ceiling" && cp -r "$WS_LENS/context_ceiling" "$lens/"
        done
        if [ -n "${PACK_DIR:-}" ]; then
            mkdir -p "$PACK_DIR/ceiling"
            tar -cf "$PACK_DIR/ceiling/ceiling.tar" "$WS_LENS/context_ceiling" "$out/ceiling.log" \
                runs/gpu_shared_ws/context_ceiling/metrics.jsonl 2>/dev/null
        fi
    else
        echo "no context ceiling: see $out/ceiling.log"
    fi
fi
for variant in "$@"; do
    echo "== ${variant%%:*}"
    cat "$out/${variant%%:*}.log"
done
exit $status
