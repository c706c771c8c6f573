#!/usr/bin/env bash
# Install atomnas_mm and its pinned stack into .venv at the repository root.
#
# Usage: bash tools/install.sh
# Environment:
#   ATOMNAS_WHEELHOUSE  directory holding a prebuilt mmcv-2.1.0 wheel (optional);
#                       without it mmcv is compiled from the PyPI sdist (~10-20 min on 2 cores).
#   PYTHON              interpreter used to create the venv (default python3.11 or python3).
# Re-running is fast: a stamp of the requirement files skips pip when nothing changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
VENV="$ROOT/.venv"
PIP="$VENV/bin/python -m pip"
STAMP="$VENV/.atomnas_stamp"
want_stamp="$(cat requirements/*.txt setup.py tools/install.sh | sha256sum | cut -d' ' -f1)"

install_fashion_mnist() {
  if [ -d /usr/share/datasets/fashion-mnist ]; then
    return
  fi
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[install] apt-get install dataset-fashion-mnist (demo data)"
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
      || echo "[install] WARNING: apt could not install dataset-fashion-mnist; the demo and its test will ask for it"
  else
    echo "[install] NOTE: apt-get unavailable (or not root): install the Debian package" \
         "'dataset-fashion-mnist' yourself to run the demo"
  fi
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ] \
   && "$VENV/bin/python" -c "import atomnas_mm" >/dev/null 2>&1; then
  echo "[install] .venv is up to date"
  install_fashion_mnist
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
$PIP install -q --upgrade pip
# torch first and alone: it is large, and the later installs must see it.
$PIP install -q -r requirements/torch.txt
$PIP install -q -r requirements/runtime.txt -r requirements/tests.txt

if ! "$VENV/bin/python" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '2.1.0'" >/dev/null 2>&1; then
  wheel=""
  if [ -n "${ATOMNAS_WHEELHOUSE:-}" ]; then
    wheel="$(ls "$ATOMNAS_WHEELHOUSE"/mmcv-2.1.0-*.whl 2>/dev/null | head -n1 || true)"
  fi
  if [ -n "$wheel" ]; then
    echo "[install] mmcv from $wheel"
    $PIP install -q --no-deps "$wheel"
  else
    echo "[install] building mmcv 2.1.0 with ops from the sdist (C++20 patch); this takes 10-20 minutes"
    tmp="$(mktemp -d)"
    # --no-build-isolation: mmcv's setup.py needs torch just to report its metadata
    $PIP download -q --no-deps --no-binary :all: --no-build-isolation mmcv==2.1.0 -d "$tmp"
    tar -xzf "$tmp"/mmcv-2.1.0.tar.gz -C "$tmp"
    sed -i 's/-std=c++17/-std=c++20/g' "$tmp/mmcv-2.1.0/setup.py"
    MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" \
      $PIP install -q --no-build-isolation --no-deps "$tmp/mmcv-2.1.0"
    rm -rf "$tmp"
  fi
  # mmcv's own runtime deps (pure Python): addict, packaging, pyyaml, yapf, ...
  $PIP install -q addict packaging Pillow pyyaml yapf
fi

# openmim: its declared deps would downgrade setuptools, so install them by hand.
$PIP install -q --no-deps openmim==0.3.9
$PIP install -q click colorama model-index tabulate requests rich pandas

$PIP install -q --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c "import atomnas_mm, mmcv.ops, mmdet, mmpretrain; print('[install] ok:', atomnas_mm.__version__)"
echo "$want_stamp" > "$STAMP"
install_fashion_mnist
