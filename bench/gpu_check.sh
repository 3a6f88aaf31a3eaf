#!/usr/bin/env bash
# moekit's GPU device check, for a bare GPU machine whose image has torch and triton and no network: makes a venv
# on top of the image's packages with this checkout importable as moekit (moekit.kernels from kernels/, as the
# editable install maps it), then runs bench/gpu_check.py within its time budget. Everything goes to $OUT.
#
#   OUT=/some/dir bash bench/gpu_check.sh [--smoke] [more gpu_check.py options]
#
#   PYTHON=python3          the image's interpreter (must import torch and triton)
#   GPU_CHECK_BUDGET_S=450  seconds for gpu_check.py's phases (the whole call stays under 8 minutes)
#   MOEKIT_WHEELS=DIR       optional wheelhouse for what the image lacks (pytest, transformers, ...), made
#                           beforehand where PyPI is reachable: pip download -d DIR pytest transformers==5.24.0
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
W=$(mktemp -d "${TMPDIR:-/tmp}/moekit-gpu-check.XXXXXX")
export TRITON_CACHE_DIR="$W/triton-cache" PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET
LOG="$OUT/setup.log"
: >"$LOG"
log() { echo "[gpu_check.sh $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$LOG" 2>&1 || log "no nvidia-smi"
if ! "$PY" -c 'import torch, triton' >>"$LOG" 2>&1; then
    log "$PY cannot import torch and triton; set PYTHON to the image's interpreter"
    exit 2
fi
"$PY" -m venv --without-pip "$W/venv" >>"$LOG" 2>&1 || { log "could not make a venv with $PY"; exit 2; }
SITE=$("$W/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# The image's python may itself be a venv, which --system-site-packages would not see through: add the base
# interpreter's site directories (and the .pth files in them) by hand.
"$PY" - >"$SITE/_base_site.pth" <<'EOF'
import site, sys
dirs = site.getsitepackages() + [site.getusersitepackages()]
dirs += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
for d in dict.fromkeys(dirs):
    print(f"import site; site.addsitedir({d!r})")
EOF

# What the image lacks, from an optional wheelhouse (never from an index: there is no network).
MISSING=$("$W/venv/bin/python" - <<'EOF'
import importlib.util
wanted = {"pytest": "pytest", "transformers": "transformers", "safetensors": "safetensors", "yaml": "pyyaml"}
print(" ".join(pkg for mod, pkg in wanted.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$MISSING" ]; then
    if [ -n "${MOEKIT_WHEELS:-}" ] && "$PY" -m pip --version >/dev/null 2>&1; then
        log "installing from $MOEKIT_WHEELS: $MISSING"
        "$PY" -m pip install -q --no-index --find-links "$MOEKIT_WHEELS" --target "$W/extra" $MISSING >>"$LOG" 2>&1 &&
            echo "$W/extra" >"$SITE/_extra.pth" || log "wheelhouse install failed (see above)"
    else
        log "missing here: $MISSING (gpu_check.py records what it cannot run; MOEKIT_WHEELS fills the gap)"
    fi
fi

# This checkout as `moekit`, with `moekit.kernels` served from kernels/ (pyproject's package-dir).
cat >"$SITE/_moekit_checkout.py" <<EOF
import importlib.abc, importlib.util, os, sys
ROOT = "$REPO"
sys.path.insert(0, ROOT)
class _KernelsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "moekit.kernels":
            return None
        where = os.path.join(ROOT, "kernels")
        return importlib.util.spec_from_file_location(
            name, os.path.join(where, "__init__.py"), submodule_search_locations=[where])
sys.meta_path.insert(0, _KernelsFinder())
EOF
echo "import _moekit_checkout" >"$SITE/_moekit_checkout.pth"
if ! (cd / && "$W/venv/bin/python" -c 'import moekit.kernels.ops, moekit.runtime; print(moekit.kernels.__file__)') >>"$LOG" 2>&1; then
    log "this checkout does not import in the venv (see $LOG)"
    exit 2
fi
log "venv $W/venv ready; running gpu_check.py with a ${BUDGET} s budget"
timeout $((BUDGET + 25)) "$W/venv/bin/python" "$REPO/bench/gpu_check.py" --out "$OUT" --budget-s "$BUDGET" "$@"
RC=$?
log "gpu_check.py exit $RC; summary: $OUT/summary.md"
exit $RC
