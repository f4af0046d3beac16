#!/usr/bin/env bash
# Set up everything fedser needs on a fresh Debian/Ubuntu machine, idempotently:
#   - Debian packages (only when missing; needs root or sudo),
#   - .venv with fedser[dev] pinned by constraints.txt (re-installed when pyproject/constraints change),
#   - .venv-tflite-runtime: tflite-runtime 2.14 with numpy<2, the second runtime the tests cover
#     (best effort: where no wheel exists, those tests skip and say why).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] < (3, 14) else 1)'; then
  echo "fedser needs Python 3.11-3.13; $PY is $("$PY" --version 2>&1). Set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

# Debian packages: venv support and PortAudio (the microphone backend of sounddevice); for the tests,
# Chromium (headless, the web pages) and PulseAudio with ALSA's pulse plugin (a null sink stands in for a
# microphone, so the capture path runs through the real PortAudio stack); systemd for systemd-analyze, which
# checks the units in deploy/ (it does not need systemd running); faketime sets a wrong clock for one process
# (fedser-edge doctor's clock check).
DEB_PACKAGES=(python3-venv libportaudio2 chromium pulseaudio pulseaudio-utils libasound2-plugins systemd faketime)
missing=()
for pkg in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null \
    || echo "warning: could not install ${missing[*]} (the microphone path needs libportaudio2, the page tests chromium)" >&2
fi

stamp_of() { cat pyproject.toml constraints.txt | sha256sum | cut -c1-16; }
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ "$(cat .venv/.fedser-stamp 2>/dev/null)" != "$(stamp_of)" ]; then
  echo "installing fedser[dev] into .venv (first time: about a minute)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
  stamp_of > .venv/.fedser-stamp
fi

if [ ! -f .venv-tflite-runtime/.fedser-stamp ]; then
  rm -rf .venv-tflite-runtime
  if "$PY" -m venv .venv-tflite-runtime && .venv-tflite-runtime/bin/python -m pip install -q \
      "tflite-runtime==2.14.0" "numpy<2" "cryptography>=41" "requests>=2.31" "soundfile>=0.12"; then
    echo ok > .venv-tflite-runtime/.fedser-stamp
  else
    echo "note: tflite-runtime 2.14 does not install here; its tests will be skipped" >&2
    rm -rf .venv-tflite-runtime
  fi
fi
