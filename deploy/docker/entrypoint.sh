#!/bin/sh
# Container entrypoint for the edgeloop images: settle what differs per container, then exec the
# command (exec: the daemon is the process that receives docker's SIGTERM).
#
# Device id (device containers): EDGELOOP_DEVICE_ID if set; else IOTEDGE_DEVICEID (set by the IoT
# Edge agent in every module); else the container's hostname — unique per replica, so
# `docker compose up --scale device=50` gives 50 distinct devices.
#
# FLEET_KEYS_DIR (cloud container): create the fleet signing key there on first start, so that a
# fresh compose fleet needs no manual step. An existing key is never replaced.
set -eu

if [ -z "${EDGELOOP_DEVICE_ID:-}" ]; then
  if [ -n "${IOTEDGE_DEVICEID:-}" ]; then
    EDGELOOP_DEVICE_ID=$IOTEDGE_DEVICEID
  else
    EDGELOOP_DEVICE_ID=$(cat /proc/sys/kernel/hostname)
  fi
  export EDGELOOP_DEVICE_ID
fi

if [ -n "${FLEET_KEYS_DIR:-}" ] && [ ! -e "$FLEET_KEYS_DIR/fleet.key" ]; then
  edgeloop keys init --out "$FLEET_KEYS_DIR"
fi

exec "$@"
