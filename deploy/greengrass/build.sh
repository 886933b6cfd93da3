#!/bin/sh
# `gdk component build` (custom build): lays out greengrass-build/ as the GDK CLI expects —
#   recipes/recipe.yaml
#   artifacts/<component>/<version>/edgeloop-<version>-py3-none-any.whl, device.toml, fleet.pub
# then `gdk component publish` uploads the artifacts and fills in BUCKET_NAME, COMPONENT_NAME and
# COMPONENT_VERSION in the artifact URIs.
#
# FLEET_PUB   the fleet's public key (from `edgeloop keys init`), default ./fleet.pub
# WHEEL       a prebuilt edgeloop wheel to ship instead of building one from this checkout
# BUILD_DIR   output folder, default ./greengrass-build
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-python3}
FLEET_PUB=${FLEET_PUB:-$HERE/fleet.pub}
BUILD_DIR=${BUILD_DIR:-$HERE/greengrass-build}

die() { echo "build.sh: $*" >&2; exit 1; }
[ -f "$FLEET_PUB" ] || die "no fleet public key at $FLEET_PUB (set FLEET_PUB; see edgeloop keys init)"

read_gdk() {
  "$PYTHON" -c 'import json, sys
c = json.load(open(sys.argv[1]))["component"]
name = next(iter(c))
print(name if sys.argv[2] == "name" else c[name]["version"])' "$HERE/gdk-config.json" "$1"
}
NAME=$(read_gdk name)
VERSION=$(read_gdk version)
ART=$BUILD_DIR/artifacts/$NAME/$VERSION

rm -rf "$BUILD_DIR"
mkdir -p "$BUILD_DIR/recipes" "$ART"
if [ -n "${WHEEL:-}" ]; then
  cp "$WHEEL" "$ART/"
else
  "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$ART" "$REPO"
fi
[ -f "$ART/edgeloop-$VERSION-py3-none-any.whl" ] \
  || die "expected edgeloop-$VERSION-py3-none-any.whl (gdk-config.json version = pyproject version?)"
cp "$HERE/device.toml" "$ART/device.toml"
cp "$FLEET_PUB" "$ART/fleet.pub"
cp "$HERE/recipe.yaml" "$BUILD_DIR/recipes/recipe.yaml"
echo "built $NAME $VERSION in $BUILD_DIR"
