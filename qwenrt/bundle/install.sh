#!/usr/bin/env bash
# Install a qwenrt bundle on this machine: no network, no compiler.
#
#   ./install.sh [DIR] [--service] [--port N] [--host ADDR] [--runtime NAME] [--memory-max SIZE] [--no-probe]
#
# DIR (default /opt/qwenrt) becomes a Python virtual environment holding qwenrt, its
# model under DIR/qwenrt-home/models, and its caches. Steps: check the Python and every
# file of the bundle against its recorded sha256, install the wheels from the bundle only
# (pip --no-index), copy the model, run each engine once on it (qwenrt's probe: an engine
# that crashes on this CPU is caught here, not in production), and with --service install
# a systemd unit for 'qwenrt serve'. Set PYTHON to choose the interpreter (default python3).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python3}
DIR=/opt/qwenrt
SERVICE=0
PROBE=1
SERVICE_ARGS=()

fail() { echo "install.sh: error: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

DIR_GIVEN=0
while [ $# -gt 0 ]; do
    case "$1" in
        --service) SERVICE=1 ;;
        --no-probe) PROBE=0 ;;
        --port|--host|--runtime|--memory-max|--user)
            [ $# -ge 2 ] || fail "$1 needs a value"
            SERVICE_ARGS+=("$1" "$2"); shift ;;
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) fail "unknown option $1 (see --help)" ;;
        *) [ "$DIR_GIVEN" = 0 ] || fail "one install folder only (got $DIR and $1)"; DIR=$1; DIR_GIVEN=1 ;;
    esac
    shift
done

command -v "$PYTHON" >/dev/null || fail "$PYTHON not found; install Python $(sed -n 's/.*"python": "\([0-9.]*\)".*/\1/p' "$HERE/bundle.json") or set PYTHON"
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
    || fail "$PYTHON cannot make virtual environments (Debian and Ubuntu: apt install python3-venv)"

say "checking the bundle …"
"$PYTHON" "$HERE/verify.py" "$HERE"

mkdir -p "$DIR" || fail "cannot create $DIR"
DIR=$(cd "$DIR" && pwd)
if [ -n "$(ls -A "$DIR")" ] && [ ! -f "$DIR/pyvenv.cfg" ]; then
    fail "$DIR is not empty and not a qwenrt install; choose an empty folder"
fi

say "installing into $DIR (wheels from the bundle only) …"
"$PYTHON" -m venv "$DIR"
# --force-reinstall: over an earlier install, a rebuilt qwenrt of the same version still replaces the old one.
"$DIR/bin/python" -m pip install --quiet --no-index --no-deps --force-reinstall --disable-pip-version-check \
    "$HERE"/wheels/*.whl \
    || fail "pip could not install the bundle's wheels (see above)"

MODEL_NAME=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["model"]["name"])' "$HERE/bundle.json")
MODELS="$DIR/qwenrt-home/models"
MODEL="$MODELS/$MODEL_NAME"
say "copying the model to $MODEL …"
mkdir -p "$MODELS"
rm -rf "$MODEL.partial"
cp -r "$HERE/model" "$MODEL.partial"
rm -rf "$MODEL"
mv "$MODEL.partial" "$MODEL"
cp "$HERE/README.md" "$DIR/BUNDLE-README.md"

if [ "$PROBE" = 1 ]; then
    # Each engine runs the model once: qwenrt probes it in a child process first and keeps
    # the outcome (and any safe fallback it needed) for every later start.
    for engine in $("$DIR/bin/python" -c 'import json, sys; print(" ".join(json.load(open(sys.argv[1]))["model"]["engines"]))' "$HERE/bundle.json"); do
        say "running $engine on this CPU …"
        "$DIR/bin/qwenrt" chat --model "$MODEL" --runtime "$engine" --max-tokens 8 -p "Say hello." >/dev/null \
            || fail "$engine cannot run this model on this machine (see above)"
    done
fi

if [ "$SERVICE" = 1 ]; then
    "$DIR/bin/python" -m qwenrt.bundle.service --prefix "$DIR" --model "$MODEL" "${SERVICE_ARGS[@]}"
elif [ ${#SERVICE_ARGS[@]} -gt 0 ]; then
    fail "${SERVICE_ARGS[0]} is an option of --service"
fi

say "done. Try: $DIR/bin/qwenrt chat -p 'Hello'   or   $DIR/bin/qwenrt serve"
