#!/usr/bin/env bash
# The Python environment benchmarks/serve_peers/triton_peer.py runs under (serve_load.py's "triton" peer).
#
#   benchmarks/serve_peers/setup_triton_env.sh [ENV_DIR] [PROJECT_VENV]     # defaults: /tmp/tritonenv /work/venv
#
# Why a separate env: nvidia-pytriton needs numpy < 2 (the project venv has numpy 2), and the Triton
# python-backend stub it ships for 3.11 links the system's libpython3.11.so (Debian 12: 3.11.2) while it
# loads the stdlib of the interpreter that started PyTriton. Under pyenv's 3.11.7 that stdlib calls
# _thread.RLock._recursion_count (multiprocessing/resource_tracker.py), which 3.11.2's C module lacks:
# "'_thread.RLock' object has no attribute '_recursion_count'" and the model never loads. A venv made
# from the system's own /usr/bin/python3.11 keeps interpreter, stdlib and libpython the same version.
# torch, Pillow and the rest come from the project venv (same cp311 ABI) through a .pth file placed
# after this env's own site-packages, so its numpy 1.26 wins.
set -euo pipefail
ENV_DIR=${1:-/tmp/tritonenv}
PROJECT_VENV=${2:-/work/venv}
SYSTEM_PY=${SYSTEM_PY:-/usr/bin/python3.11}
"$SYSTEM_PY" -m venv "$ENV_DIR"
"$ENV_DIR/bin/pip" install --quiet --upgrade pip
"$ENV_DIR/bin/pip" install --quiet "nvidia-pytriton==0.7.0"
SITE=$("$ENV_DIR/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
PROJECT_SITE=$("$PROJECT_VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$PROJECT_SITE" > "$SITE/zz_project_venv.pth"
"$ENV_DIR/bin/python" -c "import sys, numpy, torch, pytriton; print(sys.version.split()[0], 'numpy', numpy.__version__, 'torch', torch.__version__)"
echo "XCEPTION_TRITON_PYTHON=$ENV_DIR/bin/python"
