#!/usr/bin/env bash
# The Raspberry Pi install, proven under emulation (docs/raspberry-pi.md says what this can and cannot tell).
#
#   scripts/pi-check.sh                           bookworm (Python 3.11) and trixie (3.13), both runtimes
#   scripts/pi-check.sh --suites bookworm         one Debian release
#   scripts/pi-check.sh --runtimes ai-edge-litert one runtime (ai-edge-litert, tflite-runtime)
#   scripts/pi-check.sh --build-only              only build (or find) the cached root file systems
#   scripts/pi-check.sh --affine                  personalize() with the bundled model's input affine, not the
#                                                 head only (about 90 minutes more under emulation on 2 shared
#                                                 cores: measured in stop 24, docs/raspberry-pi.md)
#   scripts/pi-check.sh --wheel-from REV          check the wheel of a git revision (e.g. one before a fix, to see
#                                                 the check fail) instead of the working tree's
#
# For each Debian release: an arm64 root file system built with debootstrap (cached in $PI_CHECK_CACHE,
# default .cache/pi-rootfs; the first build takes minutes under emulation: 3-6 for bookworm, about 23 for
# trixie on 2 cores), run under qemu-user-static through binfmt_misc, with a Raspberry Pi 4's /proc/cpuinfo
# bound in (the emulated TFLite runtime crashes reading an x86 host's). In it, for each runtime, a fresh venv
# gets the project's wheel (built here with pip wheel --no-deps) with [edge,audio] from the package index,
# binary wheels only, and scripts/pi_check_device.py runs the device path on real RAVDESS clips (from
# ../shared/data/ravdess or $FEDSER_RAVDESS, else synthetic tones): import without tensorflow/librosa/numba,
# classify, feedback, personalize(), fedser-edge --help and status. Its predictions must equal the host's.
#
# tflite-runtime publishes aarch64 wheels up to cp311 only: on trixie (3.13) that case is reported as
# "no wheel" and does not fail the check. Needs root (debootstrap, chroot, mounts) and the network (Debian
# mirror, PyPI); installs debootstrap, qemu-user-static and binfmt-support when missing.
# Exit status 0 when every check ran; results in $PI_CHECK_CACHE/results/<release>-<runtime>.json.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
CACHE=$(realpath -m "${PI_CHECK_CACHE:-$REPO/.cache/pi-rootfs}")
MIRROR=${PI_CHECK_MIRROR:-http://deb.debian.org/debian}
SUITES="bookworm trixie"
RUNTIMES="ai-edge-litert tflite-runtime"
BUILD_ONLY=0
WHEEL_FROM=""
AFFINE_ARG=""
while [ $# -gt 0 ]; do
  case "$1" in
    --suites) SUITES=$2; shift 2 ;;
    --runtimes) RUNTIMES=$2; shift 2 ;;
    --build-only) BUILD_ONLY=1; shift ;;
    --wheel-from) WHEEL_FROM=$2; shift 2 ;;
    --affine) AFFINE_ARG=--affine; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

[ "$(id -u)" -eq 0 ] || { echo "pi-check needs root (debootstrap, chroot and mounts); run it with sudo" >&2; exit 2; }
say() { printf '[pi-check] %s\n' "$*"; }

# --- the host: debootstrap, qemu-user-static, binfmt_misc ------------------------------------------------
missing=()
for pkg in debootstrap qemu-user-static binfmt-support; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 || { echo "binfmt qemu-aarch64 is not enabled" >&2; exit 2; }

# --- the root file systems (cached) -------------------------------------------------------------------
mkdir -p "$CACHE/results"
build_rootfs() {  # $1 = suite
  local root="$CACHE/$1"
  if [ -f "$root/.fedser-rootfs-ok" ]; then return 0; fi
  say "building the arm64 $1 root file system in $root (debootstrap under emulation: minutes)"
  rm -rf "$root.tmp"
  local t0=$SECONDS
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,libportaudio2,ca-certificates \
    "$1" "$root.tmp" "$MIRROR" > "$CACHE/$1-debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/$1-debootstrap.log"; echo "debootstrap $1 failed" >&2; return 1; }
  echo "$((SECONDS - t0))" > "$root.tmp/.fedser-rootfs-ok"
  rm -rf "$root" && mv "$root.tmp" "$root"
  say "$1 root file system built in $((SECONDS - t0)) s"
}

for suite in $SUITES; do build_rootfs "$suite"; done
[ "$BUILD_ONLY" -eq 1 ] && exit 0

# --- the wheel, the clips, the host's reference run ---------------------------------------------------
PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python
rm -rf "$CACHE/wheel" "$CACHE/source" && mkdir -p "$CACHE/wheel"
SOURCE=.
if [ -n "$WHEEL_FROM" ]; then
  SOURCE="$CACHE/source" && mkdir -p "$SOURCE"
  git archive --format=tar "$WHEEL_FROM" | tar -x -C "$SOURCE"
  say "the wheel of $WHEEL_FROM ($(git log -1 --format='%h %s' "$WHEEL_FROM" | cut -c1-80))"
fi
"$PY" -m pip wheel -q --no-deps -w "$CACHE/wheel" "$SOURCE" >/dev/null
WHEEL=$(ls "$CACHE"/wheel/fedser-*.whl)
say "wheel $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) kB)"

CLIPS="$CACHE/clips"; rm -rf "$CLIPS"; mkdir -p "$CLIPS"
RAVDESS_DIR=${FEDSER_RAVDESS:-$REPO/../shared/data/ravdess}
if [ -d "$RAVDESS_DIR" ]; then
  # held-out actors 21-24 (the bundled model never heard them): neutral, happy, sad, angry; both sentences.
  for a in 21 22 23 24; do for e in 01 03 04 05; do for s in 01 02; do
    for f in "$RAVDESS_DIR/Actor_$a/03-01-$e-01-$s-01-$a".*; do [ -f "$f" ] && cp "$f" "$CLIPS/"; done
  done; done; done
fi
say "clips: $(ls "$CLIPS" | wc -l) RAVDESS files (none: synthetic tones)"
REFERENCE=""
if "$PY" -c "import edge_sdk" 2>/dev/null; then
  rm -rf "$CACHE/host-state"
  "$PY" scripts/pi_check_device.py --reference --state "$CACHE/host-state" --clips "$CLIPS" $AFFINE_ARG \
    --out "$CACHE/results/host-reference.json" > "$CACHE/results/host-reference.log" 2>&1 \
    && REFERENCE="$CACHE/results/host-reference.json"
fi

# --- one run: a fresh venv in the emulated system, the wheel from the index, the device path --------------
PI4_CPUINFO="processor	: 0
BogoMIPS	: 108.00
Features	: fp asimd evtstrm crc32 cpuid
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x0
CPU part	: 0xd08
CPU revision	: 3
"
mounted=()
cleanup() {
  local i
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[$i]}" 2>/dev/null || true; done
  mounted=()
}
trap cleanup EXIT

run_one() {  # $1 = suite, $2 = runtime; prints a summary line, returns 0 (passed or no wheel) or 1
  local suite=$1 rt=$2 root="$CACHE/$1" venv="/opt/fedser-$2" log="$CACHE/results/$1-$2.log"
  local res="$CACHE/results/$1-$2.json"
  rm -f "$res" "$log"
  { for i in 0 1 2 3; do printf '%s\n' "${PI4_CPUINFO/processor	: 0/processor	: $i}"; done
    printf 'Hardware\t: BCM2835\nRevision\t: c03111\nModel\t\t: Raspberry Pi 4 Model B Rev 1.1\n'; } > "$root/etc/pi4-cpuinfo"
  mount -t proc proc "$root/proc" && mounted+=("$root/proc")
  mount --bind "$root/etc/pi4-cpuinfo" "$root/proc/cpuinfo" && mounted+=("$root/proc/cpuinfo")
  mount -t sysfs sysfs "$root/sys" && mounted+=("$root/sys")
  mount --bind /dev "$root/dev" && mounted+=("$root/dev")
  cp -L /etc/resolv.conf "$root/etc/resolv.conf"
  # The host's CA bundle (PIP_CERT, else Debian's): a network whose TLS goes through an inspecting proxy is only
  # trusted with its CA, which the fresh root file system lacks.
  local ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
  if [ -f "$ca" ]; then cp -L "$ca" "$root/etc/ssl/host-ca.crt"; else : > "$root/etc/ssl/host-ca.crt"; fi
  local certenv=""; [ -s "$root/etc/ssl/host-ca.crt" ] && certenv="PIP_CERT=/etc/ssl/host-ca.crt"
  rm -rf "$root/opt/check" "$root$venv" "$root/tmp/state-$rt" && mkdir -p "$root/opt/check/clips"
  cp "$WHEEL" scripts/pi_check_device.py constraints.txt "$root/opt/check/"
  cp -r "$CLIPS/." "$root/opt/check/clips/"
  local whl="/opt/check/$(basename "$WHEEL")" reqs
  if [ "$rt" = ai-edge-litert ]; then
    reqs="'$whl[edge,audio]' -c /opt/check/constraints.txt"  # the versions CI tests on x86
  else  # as scripts/setup.sh's .venv-tflite-runtime: tflite-runtime 2.14 with numpy<2, no ai-edge-litert
    reqs="'$whl[audio]' tflite-runtime==2.14.0 'numpy<2' 'cryptography>=41' 'requests>=2.31' 'soundfile>=0.12'"
  fi
  local t0=$SECONDS rc=0
  chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 $certenv \
    PIP_DISABLE_PIP_VERSION_CHECK=1 TF_CPP_MIN_LOG_LEVEL=2 /bin/sh -ec "
      python3 -m venv $venv
      base=\$(du -sk $venv | cut -f1)
      rm -rf /opt/check/wheels && mkdir /opt/check/wheels
      $venv/bin/pip download -q --only-binary=:all: -d /opt/check/wheels $reqs
      echo wheels \$(ls /opt/check/wheels | wc -l) \$(du -sk /opt/check/wheels | cut -f1)
      $venv/bin/pip install -q --no-index --find-links /opt/check/wheels $reqs
      echo installed_kb \$((\$(du -sk $venv | cut -f1) - base))
      echo install_s \$((\$(date +%s) - $(date +%s)))
      cd /tmp && $venv/bin/python /opt/check/pi_check_device.py --state /tmp/state-$rt --clips /opt/check/clips \
        --out /opt/check/result.json $AFFINE_ARG
    " > "$log" 2>&1 || rc=$?
  cleanup
  local secs=$((SECONDS - t0))
  if [ $rc -ne 0 ] && grep -q "No matching distribution found for tflite-runtime" "$log"; then
    say "$suite/$rt: NO WHEEL (tflite-runtime 2.14 publishes aarch64 wheels for cp38-cp311 only)"
    echo '{"status": "no wheel"}' > "$res"
    return 0
  fi
  if [ $rc -ne 0 ]; then
    local why="exit status $rc"; [ $rc -eq 139 ] && why="segmentation fault (rc 139)"
    say "$suite/$rt: FAILED, $why, in $(grep '^\[pi-check\]' "$log" | tail -1 || echo 'the install') (log $log)"
    tail -15 "$log" | sed 's/^/    /'
    printf '{"status": "failed", "rc": %d, "step": "%s"}\n' "$rc" \
      "$(grep '^\[pi-check\]' "$log" | tail -1 | tr -d '"')" > "$res"
    return 1
  fi
  "$PY" - "$root/opt/check/result.json" "$log" "$res" "$REFERENCE" "$secs" <<'EOF'
import json, sys
result, log, out, ref, secs = json.load(open(sys.argv[1])), open(sys.argv[2]).read().split(), sys.argv[3], \
    sys.argv[4], int(sys.argv[5])
result["wheels"], result["wheels_kb"] = int(log[log.index("wheels") + 1]), int(log[log.index("wheels") + 2])
result["installed_kb"], result["install_s"] = int(log[log.index("installed_kb") + 1]), int(log[log.index("install_s") + 1])
result["run_s"], result["status"] = secs, "passed"
if ref:
    host = json.load(open(ref))
    result["same_predictions_as_host"] = host["predicted"] == result["predicted"]
    result["host_loss_after"] = host["personalize"]["loss_after"]
    if not result["same_predictions_as_host"]:
        result["status"] = "failed: predictions differ from the host's"
    mine_p, host_p = result["personalize"], host["personalize"]
    result["personalize_same_as_host"] = (mine_p["status"], mine_p.get("input_affine")) == \
        (host_p["status"], host_p.get("input_affine"))
    if not result["personalize_same_as_host"]:
        result["status"] = f"failed: personalize {mine_p} differs from the host's {host_p}"
    if "input_grad" in host:  # the input affine's gradient: the host's loss, and its gradient's size, to 1e-4
        mine, theirs = result.get("input_grad", {}), host["input_grad"]
        result["input_grad_same_as_host"] = bool(mine) and all(
            abs(mine[k] - theirs[k]) <= 1e-4 * max(1.0, abs(theirs[k])) for k in ("loss", "grad_abs_sum"))
        if not result["input_grad_same_as_host"]:
            result["status"] = f"failed: input_grad {mine} differs from the host's {theirs}"
json.dump(result, open(out, "w"), indent=1)
p = result["personalize"]
print(f"[pi-check] {result['python']} {result['runtime']['module']} {result['runtime']['version']}: "
      f"{result['wheels']} wheels ({result['wheels_kb'] / 1024:.0f} MB), installed {result['installed_kb'] / 1024:.0f} MB "
      f"in {result['install_s']} s; {result['clips']} clips right {result['right']}/{result['total']}"
      f"{' (= host)' if result.get('same_predictions_as_host') else ''}; "
      f"input_grad {result.get('input_grad', {}).get('loss')}{' (= host)' if result.get('input_grad_same_as_host') else ''}; "
      f"personalize {p['status']}{' (input affine)' if p.get('input_affine') else ''} "
      f"(loss {p['loss_before']:.4f} -> {p['loss_after'] if p['loss_after'] is None else round(p['loss_after'], 4)}, "
      f"host {result.get('host_loss_after')}; affine score {p.get('input_affine_score')}); "
      f"max RSS {result['max_rss_mb']} MB; {result['status']}")
sys.exit(0 if result["status"] == "passed" else 1)
EOF
}

failed=0
for suite in $SUITES; do
  for rt in $RUNTIMES; do
    say "$suite/$rt: installing and running (under emulation: minutes)"
    run_one "$suite" "$rt" || failed=1
  done
done
exit $failed
