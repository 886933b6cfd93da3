#!/bin/sh
# Install the edgeloop device daemon on a Raspberry Pi (or any systemd Linux):
#   PREFIX/opt/edgeloop/venv            virtualenv with edgeloop
#   PREFIX/etc/edgeloop/device.toml     config (written only if absent), mode 0640
#   PREFIX/etc/systemd/system/edgeloop.service
# and a system user "edgeloop" (only as root with --prefix /).
#
#   sudo sh deploy/raspberry-pi/install.sh [--source PATH] [--extras onnx] [--enable]
#
# Options:
#   --prefix DIR       install root (default /); anything else implies --no-user --no-systemctl
#   --source PATH      what to pip-install: a wheel, an sdist or a source tree (default: this repo)
#   --extras LIST      pip extras, e.g. onnx or onnx,aws (default: none)
#   --python PY        interpreter for the virtualenv (default: python3; needs 3.11+)
#   --pip-args ARGS    extra arguments for pip install (e.g. "--no-index --find-links /wheels")
#   --device-id ID     device_id for a new device.toml (default: the short hostname)
#   --no-user          do not create the edgeloop system user
#   --no-systemctl     do not run systemctl daemon-reload
#   --enable           systemctl enable --now edgeloop (needs fleet.pub and TLS files in place)
set -eu

PREFIX=/
SOURCE=
EXTRAS=
PYTHON=python3
PIP_ARGS=
DEVICE_ID=
MAKE_USER=1
RUN_SYSTEMCTL=1
ENABLE=0
HERE=$(cd "$(dirname "$0")" && pwd)

die() { echo "install.sh: $*" >&2; exit 1; }
need_arg() { [ $# -ge 2 ] || die "$1 needs a value"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) need_arg "$@"; PREFIX=$2; shift 2 ;;
    --source) need_arg "$@"; SOURCE=$2; shift 2 ;;
    --extras) need_arg "$@"; EXTRAS=$2; shift 2 ;;
    --python) need_arg "$@"; PYTHON=$2; shift 2 ;;
    --pip-args) need_arg "$@"; PIP_ARGS=$2; shift 2 ;;
    --device-id) need_arg "$@"; DEVICE_ID=$2; shift 2 ;;
    --no-user) MAKE_USER=0; shift ;;
    --no-systemctl) RUN_SYSTEMCTL=0; shift ;;
    --enable) ENABLE=1; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[ -n "$SOURCE" ] || SOURCE=$(cd "$HERE/../.." && pwd)
[ -e "$SOURCE" ] || die "source $SOURCE does not exist"
case "$EXTRAS" in
  *[!A-Za-z0-9_,-]*) die "--extras takes a comma-separated list of names, got '$EXTRAS'" ;;
esac
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
  || die "$PYTHON is missing or older than 3.11 (on Raspberry Pi OS bookworm: apt-get install python3-venv)"

case "$PREFIX" in
  /*) ;;
  *) die "--prefix must be an absolute path, got '$PREFIX'" ;;
esac
PREFIX=${PREFIX%/}
ROOT=${PREFIX:-/}
if [ "$ROOT" != / ]; then
  # A staging or test root: never touch the system's users or systemd.
  MAKE_USER=0
  RUN_SYSTEMCTL=0
fi
if [ "$(id -u)" -ne 0 ]; then
  MAKE_USER=0
  RUN_SYSTEMCTL=0
fi

OPT=$PREFIX/opt/edgeloop
VENV=$OPT/venv
CONF_DIR=$PREFIX/etc/edgeloop
UNIT_DIR=$PREFIX/etc/systemd/system
UNIT=$UNIT_DIR/edgeloop.service
umask 022

# Check everything that can be checked before changing anything.
if [ ! -e "$CONF_DIR/device.toml" ]; then
  [ -n "$DEVICE_ID" ] || DEVICE_ID=$(hostname -s 2>/dev/null || cat /proc/sys/kernel/hostname)
  case "$DEVICE_ID" in
    ''|[!A-Za-z0-9]*|*[!A-Za-z0-9_.-]*) die "device id '$DEVICE_ID' is not valid (letters, digits, _ . -); pass --device-id" ;;
  esac
fi

# 1. the user (no login, no home of its own: systemd's StateDirectory is where it writes)
if [ "$MAKE_USER" -eq 1 ] && ! id edgeloop >/dev/null 2>&1; then
  echo "creating system user edgeloop"
  useradd --system --user-group --home-dir /var/lib/edgeloop --no-create-home \
    --shell /usr/sbin/nologin --comment "edgeloop device daemon" edgeloop
fi

# 2. the virtualenv
mkdir -p "$OPT"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
TARGET=$SOURCE
[ -z "$EXTRAS" ] || TARGET="${SOURCE}[${EXTRAS}]"
echo "installing $TARGET"
# shellcheck disable=SC2086  # PIP_ARGS is a list of words on purpose
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $PIP_ARGS "$TARGET"
[ -x "$VENV/bin/edgeloop" ] || die "pip did not install the edgeloop command into $VENV/bin"
install -m 0644 "$HERE/../README.md" "$OPT/README.md"

# 3. the config (kept if present: it is the operator's)
install -d -m 0750 "$CONF_DIR" "$CONF_DIR/tls"
if [ ! -e "$CONF_DIR/device.toml" ]; then
  echo "writing $CONF_DIR/device.toml (device_id = $DEVICE_ID)"
  sed -e "s#@DEVICE_ID@#$DEVICE_ID#g" -e "s#@CONFIG_DIR@#$CONF_DIR#g" "$HERE/device.toml" > "$CONF_DIR/device.toml.tmp"
  chmod 0640 "$CONF_DIR/device.toml.tmp"
  mv "$CONF_DIR/device.toml.tmp" "$CONF_DIR/device.toml"
else
  echo "keeping existing $CONF_DIR/device.toml"
fi
if id edgeloop >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ] && [ "$ROOT" = / ]; then
  # root owns the config, the daemon's group may read it (it holds the TLS key path and secrets)
  chgrp edgeloop "$CONF_DIR" "$CONF_DIR/tls" "$CONF_DIR/device.toml"
fi

# 4. the systemd unit, pointed at this prefix
install -d -m 0755 "$UNIT_DIR"
sed -e "s#/opt/edgeloop#$OPT#g" -e "s#/etc/edgeloop#$CONF_DIR#g" "$HERE/edgeloop.service" > "$UNIT.tmp"
chmod 0644 "$UNIT.tmp"
mv "$UNIT.tmp" "$UNIT"
echo "installed $UNIT"

if [ "$RUN_SYSTEMCTL" -eq 1 ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  if [ "$ENABLE" -eq 1 ]; then
    systemctl enable --now edgeloop.service
  fi
fi

cat <<NEXT
edgeloop installed in $VENV.
Next:
  1. copy the fleet's public key to $CONF_DIR/fleet.pub
  2. put ca.crt, device.crt and device.key (CN = device id) in $CONF_DIR/tls/
     (chgrp edgeloop, mode 0640) and set broker.url in $CONF_DIR/device.toml
  3. systemctl enable --now edgeloop && journalctl -u edgeloop -f
NEXT
