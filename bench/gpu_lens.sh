#!/usr/bin/env bash
# The readable-lens recipe (config/gpu.yaml) on one GPU within a fixed wall-clock budget: dump,
# warm start, GRPO, the lens's context ceiling, eval on sotu and on pydoc (another genre), and the
# step profile of bench/gpu.py. Each training phase gets a time budget; when it runs out the
# trainer is sent SIGTERM (it checkpoints), and the lens is saved from that checkpoint by resuming
# with train.steps set to the step reached (the learning rate is constant, so nothing else changes).
#
#   bash bench/gpu_lens.sh [LOG_DIR] [config overrides...]
# Budget knobs (seconds): WS_SECONDS (warm start, default 100), RL_SECONDS (GRPO, default 200),
# EVAL_SECONDS (each eval, default 100), PROFILE_SECONDS (bench/gpu.py --part profile, default
# 180; PROFILE=0 skips it), CEIL_SECONDS (the context ceiling, default 100; CEIL_STEPS its steps,
# default WS_STEPS; CEILING=0 skips it, e.g. when an existing ceiling of the same E shape is copied
# beside the lens afterwards). WS_STEPS caps the warm start's steps (default 600); EVAL_CORPORA
# (default "sotu pydoc"); PY the Python (default python3); PROFILE_ARGS extra profile arguments;
# SKIP_DUMP=1 when the dump is already complete (bench/gpu_lens_sweep.sh runs it once for all).
# WS_BATCH is the warm start's batch (default 64; a launch-bound GPU step costs about the same at
# 256, so a larger batch buys examples, not time). WS_ONLY=1 stops after the warm start;
# WS_LENS=DIR skips it and starts GRPO from that warm-started lens (one warm start shared by the
# variants of bench/gpu_lens_sweep.sh's SHARED_WS=1). STORE_DTYPE (e.g. bfloat16) stores each lens
# copy in that dtype (`consistency-lens cast`) into LOG_DIR, packed instead of the fp32 lens.
# With PACK_DIR set, the lens, logs and results end packed there as parts under 15 MB.
# CPU dry run:  WS_SECONDS=30 RL_SECONDS=30 bash bench/gpu_lens.sh runs/gpu_dry device=cpu \
#                 num_samples=64 val_samples=32 eval.num_samples=32 ...
set -u
out=${1:-runs/gpu_out}
shift || true
overrides=("$@")
mkdir -p "$out"
t0=$(date +%s)
log() { echo "[$(($(date +%s) - t0)) s] $*" | tee -a "$out/timeline.txt"; }
pack() {
    [ -n "${PACK_DIR:-}" ] || return 0
    rm -f "$PACK_DIR"/all.tar*
    local lenses=("$run/lens" "$run/warm_start/lens/lens_config.json")
    [ "${WS_ONLY:-0}" = 1 ] && lenses=("$run/warm_start/lens")
    if [ -n "${STORE_DTYPE:-}" ]; then
        # A cast copy travels; the fp32 lens stays for the stages after (GRPO from a shared warm start).
        local cast=()
        for lens in "${lenses[@]}"; do
            [ -f "$lens/lens_config.json" ] || continue
            local copy=$out/$(basename "$(dirname "$lens")")_lens_$STORE_DTYPE
            # A copy that failed to cast is removed: the fp32 lens travels instead.
            if rm -rf "$copy" && cp -r "$lens" "$copy" &&
                "${cl[@]}" cast "$copy" --dtype "$STORE_DTYPE" >>"$out/cast.log" 2>&1; then
                cast+=("$lens")
            else
                rm -rf "$copy"
            fi
        done
        [ ${#cast[@]} -gt 0 ] && lenses=("$run/warm_start/lens/lens_config.json")
    fi
    tar -cf "$PACK_DIR/all.tar" "$out" "${lenses[@]}" "$run/metrics.jsonl" \
        "$run/warm_start/metrics.jsonl" 2>/dev/null
    split -b 15M "$PACK_DIR/all.tar" "$PACK_DIR/all.tar.part" && rm "$PACK_DIR/all.tar"
}
py=${PY:-python3}
cl=("$py" -m consistency_lens)
cfg=config/gpu.yaml
read -r run ws_objective < <("$py" - "$cfg" "${overrides[@]}" <<'EOF'
import sys
from consistency_lens.config import load_config
from pathlib import Path
train = load_config([Path(sys.argv[1])], sys.argv[2:]).train
print(train.run_dir, train.warm_start.objective)
EOF
)
[ -n "$run" ] || { echo "could not read $cfg with the overrides given" >&2; exit 2; }

# train_for SECONDS RUN_DIR [overrides...]: train within SECONDS, then make sure RUN_DIR/lens exists.
train_for() {
    local seconds=$1 dir=$2
    shift 2
    timeout -s TERM -k 120 "$seconds" "${cl[@]}" train --config "$cfg" "${overrides[@]}" \
        train.run_dir="$dir" "$@" >"$out/$(basename "$dir").log" 2>&1
    local rc=$?
    if [ ! -f "$dir/lens/lens_config.json" ]; then
        local step
        step=$(grep -o 'at step [0-9]*' "$out/$(basename "$dir").log" | tail -1 | grep -o '[0-9]*$')
        log "$dir: stopped (rc $rc) at step ${step:-?}; saving the lens at that step"
        [ -n "$step" ] && "${cl[@]}" train --config "$cfg" "${overrides[@]}" train.run_dir="$dir" \
            "$@" train.steps="$step" --resume >>"$out/$(basename "$dir").log" 2>&1
    fi
    tail -3 "$out/$(basename "$dir").log"
}

log "start: $("$py" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")')"
if [ "${SKIP_DUMP:-0}" != 1 ]; then
    "${cl[@]}" dump --config "$cfg" "${overrides[@]}" >"$out/dump.log" 2>&1 || { log "dump failed"; tail -20 "$out/dump.log"; pack; exit 1; }
    log "dump done"
fi
ws_lens=${WS_LENS:-$run/warm_start/lens}
if [ -z "${WS_LENS:-}" ]; then
    train_for "${WS_SECONDS:-100}" "$run/warm_start" train.objective="$ws_objective" train.steps="${WS_STEPS:-600}" \
        train.warm_start.steps=0 train.alpha.start=0.0 train.batch_size="${WS_BATCH:-64}"
    log "warm start done"
fi
if [ "${WS_ONLY:-0}" = 1 ]; then
    pack
    [ -f "$ws_lens/lens_config.json" ] || { log "no warm-start lens in $ws_lens"; exit 1; }
    exit 0
fi
train_for "${RL_SECONDS:-200}" "$run" train.warm_start.steps=0 train.init_from="$ws_lens"
log "grpo done"
pack  # the lens comes back even if a later stage outruns the call's limit
# Its context ceiling (an E on the true last t_text tokens alone, at the warm start's step cap and
# batch), so that eval reports the lens's gap to it; one that outruns CEIL_SECONDS is left out.
if [ "${CEILING:-1}" != 0 ]; then
    timeout "${CEIL_SECONDS:-100}" "${cl[@]}" train-ceiling --config "$cfg" --checkpoint "$run/lens" \
        "${overrides[@]}" train.run_dir="$run" train.steps="${CEIL_STEPS:-${WS_STEPS:-600}}" \
        train.batch_size="${WS_BATCH:-64}" train.alpha.start=0.0 >"$out/ceiling.log" 2>&1
    log "ceiling rc $?"
fi
for corpus in ${EVAL_CORPORA:-sotu pydoc}; do
    dest=$run/eval_$corpus
    timeout "${EVAL_SECONDS:-100}" "${cl[@]}" eval --config "$cfg" --checkpoint "$run/lens" --output "$dest" \
        "${overrides[@]}" corpus=$corpus >"$out/eval_$corpus.log" 2>&1
    log "eval $corpus rc $?"
    cp "$dest/eval_results.json" "$out/eval_$corpus.json" 2>/dev/null
    "$py" - "$out/eval_$corpus.json" <<'PYEOF'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except OSError:
    sys.exit(0)
recovered = {k: [round(v["kl_recovered"], 3), [round(c, 3) for c in v["kl_recovered_ci"]]]
             for k, v in d["baselines"].items()}
print(json.dumps({"fve": d["fve"], "perplexity": d["perplexity"], "diversity": d["diversity"],
                  "kl_recovered": recovered, "specificity_any": d["specificity"]["buckets"]["any"]}))
PYEOF
done
if [ "${PROFILE:-1}" = 1 ]; then
    timeout "${PROFILE_SECONDS:-180}" "$py" bench/gpu.py --part profile ${PROFILE_ARGS:-} >"$out/profile.jsonl" 2>"$out/profile.err"
    log "profile rc $?"
fi
log "end"
pack
# The status says whether the recipe produced a lens (a later stage may still have run out of time).
[ -f "$run/lens/lens_config.json" ] || { log "no lens in $run"; exit 1; }
