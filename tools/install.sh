#!/usr/bin/env bash
# Install atomnas_mm and its pinned stack into .venv at the repository root.
#
# Usage: bash tools/install.sh
# Environment:
#   ATOMNAS_WHEELHOUSE  directory holding a prebuilt mmcv-2.1.0 wheel (optional); without it mmcv's
#                       ops are compiled from the PyPI sdist: a C++20 compiler (g++ >= 10) and the
#                       Python headers are needed, 15 min on 2 idle cores, over an hour on a busy
#                       machine; a progress line comes every ATOMNAS_HEARTBEAT seconds (60).
#   ATOMNAS_TORCH_INDEX extra index for torch, e.g. https://download.pytorch.org/whl/cpu: its
#                       2.14.1+cpu wheel avoids the ~4 GB of CUDA libraries the PyPI wheel pulls.
#   PYTHON              interpreter used to create the venv (default python3.11 or python3).
# Disk: about 7 GB (the venv is 6.3 GB with the PyPI torch). Re-running is fast: a stamp of the
# requirement files and of this script skips pip when nothing changed.
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

# mim (openmim 0.3.9) looks for <site-packages>/atomnas_mm/.mim/{configs,tools,model-index.yml}.
# An editable install runs the sources: atomnas_mm/.mim holds links to configs/, tools/ and
# model-index.yml (setup.py makes them; copies left there by an old `pip wheel .`/`pip install .`
# are replaced, they would be stale), and site-packages has no atomnas_mm folder, so
# `mim train atomnas_mm ...` would not find it: link the source package there and list the link in
# the install's RECORD: `pip uninstall` (also the one before any reinstall) then removes the link
# itself, and pip never writes through it into the sources. Run isolated (-I): an
# atomnas_mm.egg-info in the checkout (left by an old build) is not mistaken for the install.
link_for_mim() {
  "$VENV/bin/python" -I - "$ROOT" <<'PY'
import os, shutil, sys, sysconfig
from importlib import metadata
root = sys.argv[1]
target = os.path.join(root, 'atomnas_mm')
mim = os.path.join(target, '.mim')
stale = os.path.join(root, 'atomnas_mm.egg-info')
if os.path.isdir(stale):  # an old build's leftover: it shadows the install's metadata
    shutil.rmtree(stale)
    print(f'[install] removed {stale} (left by an old build of the checkout)')
link = os.path.join(sysconfig.get_paths()['purelib'], 'atomnas_mm')
if os.path.isdir(link) and not os.path.islink(link):
    sys.exit(0)  # a regular (non-editable) install: mim finds its copies there
os.makedirs(mim, exist_ok=True)
for name in ('configs', 'tools', 'model-index.yml'):
    src, dst = os.path.join(root, name), os.path.join(mim, name)
    if not os.path.exists(src) or (os.path.islink(dst)
                                   and os.path.realpath(dst) == os.path.realpath(src)):
        continue
    if os.path.isdir(dst) and not os.path.islink(dst):
        shutil.rmtree(dst)
        print(f'[install] mim: replaced the stale copy {dst} by a link')
    elif os.path.lexists(dst):
        os.remove(dst)
    os.symlink(os.path.relpath(src, mim), dst)
records = [f.locate() for dist in metadata.distributions(name='atomnas_mm')
           for f in (dist.files or ()) if f.name == 'RECORD']
records = [r for r in records if os.path.realpath(str(r)).startswith(
    os.path.realpath(sys.prefix) + os.sep)]
if not records:
    print('[install] WARNING: atomnas_mm is not installed in this venv (no RECORD); '
          'run: .venv/bin/python -m pip install --no-deps --no-build-isolation -e .')
    sys.exit(0)
if os.path.realpath(link) != os.path.realpath(target):
    if os.path.islink(link):
        os.remove(link)
    os.symlink(target, link)
with open(records[0]) as f:
    listed = any(line.split(',')[0] == 'atomnas_mm' for line in f)
if not listed:
    with open(records[0], 'a') as f:
        f.write('atomnas_mm,,\n')
print(f'[install] mim: {link} -> {target}')
PY
}

# Runs "$@" (the mmcv build) with its output in $1, printing every ATOMNAS_HEARTBEAT seconds the
# elapsed time, the objects compiled so far and the source file being compiled.
build_with_heartbeat() {
  local log=$1 src=$2 total start last pid n current
  shift 2
  total=$(ls "$src"/mmcv/ops/csrc/pytorch/*.cpp "$src"/mmcv/ops/csrc/pytorch/cpu/*.cpp 2>/dev/null | wc -l || true)
  "$@" >"$log" 2>&1 &
  pid=$!
  start=$SECONDS
  last=$SECONDS
  while kill -0 "$pid" 2>/dev/null; do
    sleep 5
    if (( SECONDS - last >= ${ATOMNAS_HEARTBEAT:-60} )); then
      last=$SECONDS
      n=$(find "$src" -name '*.o' 2>/dev/null | wc -l || true)
      current=$(grep -o '[^ "]*\.cpp' "$log" 2>/dev/null | tail -n 1 || true)
      printf '[install] mmcv: %d min %02d s, %d of ~%d objects compiled, now: %s\n' \
        $(( (SECONDS - start) / 60 )) $(( (SECONDS - start) % 60 )) "$n" "$total" \
        "${current:+$(basename "$current")}"
    fi
  done
  if ! wait "$pid"; then
    echo "[install] ERROR: the mmcv build failed; the last lines of $log:"
    tail -n 30 "$log"
    exit 1
  fi
  printf '[install] mmcv built in %d min %02d s\n' $(( (SECONDS - start) / 60 )) $(( (SECONDS - start) % 60 ))
}

check_compiler() {
  local cxx="${CXX:-c++}"
  if ! command -v "$cxx" >/dev/null 2>&1 \
     || ! echo 'int main() { return 0; }' | "$cxx" -std=c++20 -x c++ - -o /dev/null 2>/dev/null; then
    echo "[install] ERROR: compiling mmcv needs a C++20 compiler ($cxx; Debian: apt-get install g++)," \
         "or set ATOMNAS_WHEELHOUSE to a folder with an mmcv-2.1.0 wheel"
    exit 1
  fi
  if ! "$VENV/bin/python" -c "import os, sysconfig, sys; sys.exit(not os.path.isfile(
      os.path.join(sysconfig.get_paths()['include'], 'Python.h')))"; then
    echo "[install] ERROR: compiling mmcv needs the Python headers (Python.h; Debian: apt-get install python3-dev)"
    exit 1
  fi
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ] \
   && "$VENV/bin/python" -c "import atomnas_mm" >/dev/null 2>&1; then
  echo "[install] .venv is up to date"
  link_for_mim
  install_fashion_mnist
  exit 0
fi

free_kb="$(df -Pk "$ROOT" | awk 'NR == 2 {print $4}')"
if [ -n "$free_kb" ] && [ "$free_kb" -lt $((7 * 1024 * 1024)) ] && [ ! -d "$VENV/lib" ]; then
  echo "[install] WARNING: $((free_kb / 1024 / 1024)) GB free here; the venv needs about 7 GB"
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
$PIP install -q --upgrade pip
# torch first and alone: it is large, and the later installs must see it.
echo "[install] torch 2.14.1 (from PyPI ~4 GB with the CUDA libraries it depends on)"
$PIP install -q ${ATOMNAS_TORCH_INDEX:+--extra-index-url "$ATOMNAS_TORCH_INDEX"} -r requirements/torch.txt
echo "[install] mmengine, mmpretrain, mmdet and the test tools"
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
    check_compiler
    log="$VENV/mmcv-build.log"
    echo "[install] building mmcv 2.1.0 with ops from the sdist (C++20 patch): 15 min on 2 idle cores," \
         "over an hour on a busy machine; a progress line every ${ATOMNAS_HEARTBEAT:-60} s (full log: $log)"
    tmp="$(mktemp -d)"
    # --no-build-isolation: mmcv's setup.py needs torch just to report its metadata
    $PIP download -q --no-deps --no-binary :all: --no-build-isolation mmcv==2.1.0 -d "$tmp"
    tar -xzf "$tmp"/mmcv-2.1.0.tar.gz -C "$tmp"
    sed -i 's/-std=c++17/-std=c++20/g' "$tmp/mmcv-2.1.0/setup.py"
    build_with_heartbeat "$log" "$tmp/mmcv-2.1.0" \
      env MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" \
      $PIP install -v --no-build-isolation --no-deps "$tmp/mmcv-2.1.0"
    rm -rf "$tmp"
  fi
  # mmcv's own runtime deps (pure Python): addict, packaging, pyyaml, yapf, ...
  $PIP install -q addict packaging Pillow pyyaml yapf
fi

# openmim: its declared deps would downgrade setuptools, so install them by hand.
$PIP install -q --no-deps openmim==0.3.9
$PIP install -q click colorama model-index tabulate requests rich pandas

echo "[install] atomnas_mm (editable)"
$PIP install -q --no-deps --no-build-isolation -e .
link_for_mim
"$VENV/bin/python" -c "import atomnas_mm, mmcv.ops, mmdet, mmpretrain; print('[install] ok:', atomnas_mm.__version__)"
echo "$want_stamp" > "$STAMP"
install_fashion_mnist
