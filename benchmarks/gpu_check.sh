#!/usr/bin/env bash
# GPU validation of compactfusion on one H100/H200 (issue 15): one prepared run of at most
# 8 minutes that writes every result under $OUT and fails loudly on any mismatch.
#
# Stages, in order; each runs under its own `timeout` (cap, seconds; GPU_CHECK_CAP_<STAGE>
# overrides it) and later stages run after a failure. Expected times are estimates for one
# H100/H200 with 16 CPU cores; nothing here has run on a GPU yet.
#   setup    carried wheels (--wheelhouse) installed into /tmp; compactfusion made importable
#            (editable install, or a symlink of kernels/ as a fallback)           ~10 s  cap 45
#   env      nvidia-smi, torch / CUDA / cuDNN / Triton / xfuser versions            ~5 s   cap 20
#   tests    (a) pytest -m cuda on every test file with CUDA-marked tests: the Triton kernels
#            compiled (not interpreted) against the torch reference; junit xml; pytest-xdist
#            workers when available; fails if no test ran                          ~60 s  cap 130
#   bench    (b) benchmarks/kernels.py (kernels.csv + kernels.png), its --torch-only CSV,
#            and issue 15's targets (int1/int2 >= 80% copy bandwidth, >= 3x torch; reported,
#            never fatal)                                                           ~60 s  cap 90
#   e2e      (c) benchmarks/gpu_check.py e2e: two ranks sharing the GPU over gloo: gloo probes,
#            compressed all-gather and tiny FLUX ring=2 through xfuser, backend torch vs
#            triton for every codec (bit-identical output and bases; lowrank within its
#            tolerance), sender vs receiver bases, device syncs per step            ~60 s  cap 120
#   compile  (d) transformer.compile(mode="reduce-overhead") of the patched pipeline, then
#            unpatched: outcome, graph breaks, output vs eager. Information only: it never
#            changes the exit status (the compile-safe work, issue 10, may not have landed)
#                                                                                   ~60 s  cap 75
# Sum of caps: 480 s. Exit status: 0 when setup, env, tests, bench and e2e passed, 1 when any
# failed or timed out, 2 for bad arguments.
#
# Running it on the device (/work/.library/device/README.md: the `run` tool):
#   1. Once, here (needs the package index): bash benchmarks/gpu_check.sh --fetch-wheels
#      downloads the xdit extra's pinned wheels (xfuser, yunchang, distvae, diffusers; ~7.5 MB,
#      pure Python) into outputs/wheelhouse (ignored by git). Everything else they import is
#      on the device image; its own torch (2.11, CUDA 13) and Triton (3.6) are used as they are.
#   2. One `run` call:
#        command:   bash benchmarks/gpu_check.sh --wheelhouse outputs/wheelhouse
#        carry:     ["outputs/wheelhouse"]
#        timeout_s: 540
#      $OUT then receives (the tool returns at most 8 files): summary.txt, summary.json,
#      kernels.csv, kernels.png, e2e.json, compile.json, tests_junit.xml and
#      gpu_check.tar.gz (every log and file of the run). The summary table is printed last.
#   3. To rerun only some stages while the machine is warm: add --stages setup,e2e (say);
#      GPU_CHECK_E2E_ARGS / GPU_CHECK_COMPILE_ARGS add arguments to those stages' commands
#      (e.g. GPU_CHECK_E2E_ARGS="--attention-backend SDPA_FLASH --codecs int2 int1"),
#      GPU_CHECK_CAP_<STAGE> (e.g. GPU_CHECK_CAP_E2E=200) changes a stage's cap.
#
# Without a GPU: bash benchmarks/gpu_check.sh --dry-run (or make gpu-check GPU_CHECK_ARGS=
# --dry-run) runs what can run on CPU: the interpreted kernel tests of the same files, the
# kernel benchmark's smoke sizes, the e2e checks on CPU tensors (Triton interpreter vs torch,
# no sync counting) and a dynamo-only compile (backend "eager").
#
# Options:
#   --dry-run            CPU mode (above)
#   --stages LIST        comma-separated subset of setup,env,tests,bench,e2e,compile
#   --out DIR            where results go (default: /tmp/gpu_check when $OUT is set, else
#                        outputs/gpu_check or outputs/gpu_check_dryrun)
#   --export DIR         copy the key files and an archive there (default: $OUT, if set)
#   --wheelhouse DIR     wheels to install (pip --no-index --no-deps --target /tmp/...)
#   --python PY          interpreter (default: .venv/bin/python for --dry-run when present,
#                        else python3)
#   --fetch-wheels       download the wheelhouse (see above) and exit
set -euo pipefail

ALL_STAGES="setup,env,tests,bench,e2e,compile"
DRY_RUN=0
STAGES=$ALL_STAGES
RES=""
EXPORT="${OUT:-}"
WHEELHOUSE=""
PY=""
FETCH=0

die_usage() {
    echo "gpu_check.sh: $1" >&2
    echo "usage: bash benchmarks/gpu_check.sh [--dry-run] [--stages LIST] [--out DIR]" \
        "[--export DIR] [--wheelhouse DIR] [--python PY] [--fetch-wheels]" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --stages) [ $# -ge 2 ] || die_usage "--stages needs a value"; STAGES=$2; shift ;;
        --out) [ $# -ge 2 ] || die_usage "--out needs a value"; RES=$2; shift ;;
        --export) [ $# -ge 2 ] || die_usage "--export needs a value"; EXPORT=$2; shift ;;
        --wheelhouse) [ $# -ge 2 ] || die_usage "--wheelhouse needs a value"; WHEELHOUSE=$2; shift ;;
        --python) [ $# -ge 2 ] || die_usage "--python needs a value"; PY=$2; shift ;;
        --fetch-wheels) FETCH=1 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die_usage "unknown argument: $1" ;;
    esac
    shift
done

for stage in ${STAGES//,/ }; do
    case ",$ALL_STAGES," in
        *",$stage,"*) ;;
        *) die_usage "unknown stage '$stage' (stages: $ALL_STAGES)" ;;
    esac
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

if [ -z "$PY" ]; then
    if [ "$DRY_RUN" = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [[ $PY == */* ]]; then # a path: absolute, since stages also run from other directories
    PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
fi

if [ "$FETCH" = 1 ]; then
    # The pinned versions of the xdit extra, read from pyproject.toml (one source of truth).
    mapfile -t PINS < <("$PY" -c 'import tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["optional-dependencies"]["xdit"]))')
    echo "downloading ${PINS[*]} into outputs/wheelhouse"
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d outputs/wheelhouse "${PINS[@]}"
    ls -l outputs/wheelhouse
    exit 0
fi

if [ -z "$RES" ]; then
    if [ -n "${OUT:-}" ]; then
        RES=/tmp/gpu_check
    elif [ "$DRY_RUN" = 1 ]; then
        RES=outputs/gpu_check_dryrun
    else
        RES=outputs/gpu_check
    fi
fi
# Start from an empty results folder, but never empty one this script did not fill.
if [ -d "$RES" ] && [ -n "$(ls -A "$RES")" ] && [ ! -f "$RES/stages.tsv" ]; then
    die_usage "--out $RES is a non-empty folder without an earlier gpu_check result in it"
fi
rm -rf "$RES"
mkdir -p "$RES"
RES=$(cd "$RES" && pwd)

# The configuration under test comes from the code, not from the caller's environment.
unset COMPACTFUSION_BACKEND
if [ "$DRY_RUN" = 1 ]; then
    export TRITON_INTERPRET=1 # kernels on CPU tensors (set before any kernel is imported)
    DEVICE=cpu
else
    unset TRITON_INTERPRET # compiled kernels, never the interpreter
    DEVICE=cuda
fi
export PYTHONUNBUFFERED=1
SITE=/tmp/gpu_check_site
if [ -n "$WHEELHOUSE" ]; then
    WHEELHOUSE=$(cd "$WHEELHOUSE" && pwd)
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export RES PY DEVICE DRY_RUN SITE WHEELHOUSE REPO

# --------------------------------------------------------------------------------------------
# Stages: each runs in `bash -c` under `timeout`; its output goes to $RES/<stage>.log and a
# one-line note for the summary to $RES/<stage>.note.
# --------------------------------------------------------------------------------------------
note() { printf '%s' "$*" >"$RES/$STAGE_NAME.note"; }

stage_setup() {
    if [ -n "$WHEELHOUSE" ]; then
        shopt -s nullglob
        local wheels=("$WHEELHOUSE"/*.whl)
        [ ${#wheels[@]} -gt 0 ] || { echo "no wheels in $WHEELHOUSE"; note "empty wheelhouse"; return 1; }
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "${wheels[@]}"
        echo "installed ${#wheels[@]} wheels into $SITE"
    fi
    if ! "$PY" -c "import compactfusion.kernels" 2>/dev/null; then
        echo "compactfusion is not importable: installing it editable (offline)"
        if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .; then
            # compactfusion.kernels lives in kernels/ (a package-dir mapping): link it into the
            # package of this (throw-away) checkout and put the checkout on the path instead.
            echo "editable install failed: linking kernels/ into compactfusion/ instead"
            ln -sfn ../kernels compactfusion/kernels
        fi
    fi
    # Imported from another directory (spawned ranks, benchmarks/ as the script directory),
    # the fallback link needs the checkout on the path: later stages add it (pythonpath file).
    if ! (cd /tmp && "$PY" -c "import compactfusion.kernels") 2>/dev/null; then
        echo "$REPO" >"$RES/pythonpath"
        export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    fi
    (cd /tmp && "$PY" - <<'EOF'
import importlib.util
import compactfusion, compactfusion.kernels  # noqa: F401
missing = [m for m in ("xfuser", "yunchang", "distvae", "diffusers", "pytest")
           if importlib.util.find_spec(m) is None]
print("compactfusion from", compactfusion.__file__)
if missing:
    raise SystemExit(f"missing packages: {missing} (carry them: --wheelhouse)")
EOF
    )
    note "ok"
}

stage_env() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi | tee "$RES/nvidia-smi.txt"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,power.limit \
            --format=csv >>"$RES/nvidia-smi.txt" || true
    else
        echo "nvidia-smi: not found" | tee "$RES/nvidia-smi.txt"
    fi
    "$PY" benchmarks/gpu_check.py env --out "$RES/env.json"
    if [ "$DEVICE" = cuda ]; then
        "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
            { note "torch sees no CUDA device"; return 1; }
    fi
    note "$("$PY" -c 'import json,sys; e=json.load(open(sys.argv[1]))
print("torch", e["torch"], "cuda", e["torch_cuda"], "triton", e["triton"],
      (e.get("device") or {}).get("name", "no GPU"))' "$RES/env.json")"
}

stage_tests() {
    local files xdist=()
    mapfile -t files < <(grep -l "mark\.cuda" tests/test_*.py)
    [ ${#files[@]} -gt 0 ] || { note "no test file has CUDA-marked tests"; return 1; }
    local select=(-m cuda)
    if [ "$DRY_RUN" = 1 ]; then
        # No GPU: the same files' interpreted CPU cases, a small sample of them.
        select=(-m "not cuda" -k "test_larger_shapes or test_strided_out_and_inputs")
    elif "$PY" -c "import xdist" 2>/dev/null; then
        xdist=(-n 8) # Triton compiles the kernel variants in parallel workers
    fi
    echo "files: ${files[*]}"
    local rc=0
    "$PY" -m pytest -q -p no:cacheprovider "${select[@]}" "${xdist[@]}" \
        --junitxml="$RES/tests_junit.xml" "${files[@]}" || rc=$?
    local counts
    counts=$("$PY" benchmarks/gpu_check.py junit --xml "$RES/tests_junit.xml") || rc=1
    note "$counts"
    return "$rc"
}

stage_bench() {
    local rc=0
    if [ "$DRY_RUN" = 1 ]; then
        "$PY" benchmarks/kernels.py --device cpu --out "$RES" --codecs int1 int2 || rc=$?
        "$PY" benchmarks/kernels.py --device cpu --torch-only --size 256x3072 --reps 3 \
            --out "$RES" || rc=$?
    else
        "$PY" benchmarks/kernels.py --out "$RES" || rc=$?
        "$PY" benchmarks/kernels.py --torch-only --out "$RES" || rc=$?
    fi
    [ -f "$RES/kernels.csv" ] || { note "no kernels.csv"; return 1; }
    "$PY" benchmarks/gpu_check.py targets --csv "$RES/kernels.csv" --out "$RES/targets.json" \
        >"$RES/targets.txt"
    cat "$RES/targets.txt"
    local met missed
    met=$(grep -c " met$" "$RES/targets.txt" || true)
    missed=$(grep -c " MISSED$" "$RES/targets.txt" || true)
    if [ "$((met + missed))" -gt 0 ]; then
        note "targets (int1/int2, bf16 >= 8 MB): $met met, $missed missed"
    else
        note "targets not evaluated: no bf16 rows >= 8 MB (smoke sizes)"
    fi
    return "$rc"
}

stage_e2e() {
    local rc=0
    # shellcheck disable=SC2086 # GPU_CHECK_E2E_ARGS: extra words, e.g. --attention-backend X
    "$PY" benchmarks/gpu_check.py e2e --device "$DEVICE" --out "$RES/e2e.json" \
        --timeout $((STAGE_CAP - 15)) ${GPU_CHECK_E2E_ARGS:-} || rc=$?
    note "$(grep -E '^E2E (passed|FAILED \()' "$RES/$STAGE_NAME.log" | tail -n 1 || true)"
    return "$rc"
}

stage_compile() {
    local args=()
    if [ "$DRY_RUN" = 1 ]; then args=(--backend eager --no-baseline); fi
    # shellcheck disable=SC2086 # GPU_CHECK_COMPILE_ARGS: extra words, e.g. --no-baseline
    "$PY" benchmarks/gpu_check.py compile --device "$DEVICE" --out "$RES/compile.json" \
        --timeout $((STAGE_CAP - 15)) "${args[@]}" ${GPU_CHECK_COMPILE_ARGS:-}
    note "$("$PY" -c 'import json,sys; r=json.load(open(sys.argv[1]))
parts = [(k, v) for k, v in (r["ranks"][0] if r["ranks"] else {}).items()]
print("; ".join(f"{k}: " + ("compiled, %d graph breaks" % v["dynamo"]["graph_breaks"]
      if v["ok"] else "failed") for k, v in parts) or "no result: " + str(r["error"])[:80])' \
        "$RES/compile.json")"
}

export -f note stage_setup stage_env stage_tests stage_bench stage_e2e stage_compile

declare -A CAPS=([setup]=45 [env]=20 [tests]=130 [bench]=90 [e2e]=120 [compile]=75)
if [ "$DRY_RUN" = 1 ]; then # the CPU and the interpreter are slower; nothing is compiled
    CAPS=([setup]=60 [env]=60 [tests]=300 [bench]=300 [e2e]=400 [compile]=400)
fi

run_stage() {
    local name=$1 cap=${CAPS[$1]} rc=0 status start
    local var="GPU_CHECK_CAP_${name^^}"
    cap=${!var:-$cap}
    start=$(date +%s%N)
    echo "=== [$name] cap ${cap}s"
    # The checkout joins the path only where the setup stage fell back to the kernels link.
    local path=${PYTHONPATH:-}
    if [ -f "$RES/pythonpath" ]; then path="$(cat "$RES/pythonpath")${path:+:$path}"; fi
    PYTHONPATH=$path STAGE_NAME=$name STAGE_CAP=$cap timeout -k 10 "$cap" \
        bash -c "set -eo pipefail; stage_$name" >"$RES/$name.log" 2>&1 || rc=$?
    local seconds
    seconds=$(awk -v a="$start" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
    case $rc in
        0) status=PASS ;;
        124 | 137) status=TIMEOUT ;;
        *) status=FAIL ;;
    esac
    if [ "$name" = compile ] && [ "$status" != PASS ]; then status="INFO-$status"; fi
    local note_text=""
    [ -f "$RES/$name.note" ] && note_text=$(tr '\t\n' '  ' <"$RES/$name.note")
    [ "$status" = TIMEOUT ] && note_text="timed out after ${cap}s; $note_text"
    tail -n 12 "$RES/$name.log" | sed "s/^/  [$name] /"
    echo "=== [$name] $status in ${seconds}s (exit $rc)"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$seconds" "$rc" "$note_text" \
        >>"$RES/stages.tsv"
}

MODE="GPU"
[ "$DRY_RUN" = 1 ] && MODE="CPU dry run"
echo "compactfusion gpu-check ($MODE): stages $STAGES, results in $RES, python $PY"
: >"$RES/stages.tsv"
for stage in ${ALL_STAGES//,/ }; do
    case ",$STAGES," in *",$stage,"*) run_stage "$stage" ;; esac
done

SUMMARY_ARGS=(--stages "$RES/stages.tsv" --env "$RES/env.json" --out-txt "$RES/summary.txt"
    --out-json "$RES/summary.json")
[ "$DRY_RUN" = 1 ] && SUMMARY_ARGS+=(--dry-run)
echo
if ! "$PY" benchmarks/gpu_check.py summary "${SUMMARY_ARGS[@]}"; then
    echo "(the summary could not be rendered; raw stage log:)"
    cat "$RES/stages.tsv"
fi

if [ -n "$EXPORT" ]; then
    mkdir -p "$EXPORT"
    for f in summary.txt summary.json kernels.csv kernels.png e2e.json compile.json \
        tests_junit.xml; do
        if [ -f "$RES/$f" ]; then cp "$RES/$f" "$EXPORT/"; fi
    done
    tar -czf "$EXPORT/gpu_check.tar.gz" -C "$(dirname "$RES")" "$(basename "$RES")"
    echo "exported the key files and gpu_check.tar.gz to $EXPORT"
fi

if awk -F'\t' '$2 == "FAIL" || $2 == "TIMEOUT" { bad = 1 } END { exit !bad }' \
    "$RES/stages.tsv"; then
    echo "GPU CHECK FAILED (see $RES and the table above)" >&2
    exit 1
fi
echo "gpu-check passed ($MODE)"
