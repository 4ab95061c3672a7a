#!/usr/bin/env bash
# Build the container image from the repository's Dockerfile with buildah, without any public
# image registry, then check the built image (scripts/ci/check-image.py).
#
#   1. a Debian rootfs (mmdebstrap) with python3, python3-venv and the tools the Dockerfile's
#      RUN steps use, imported as the local base image localhost/python-base;
#   2. `buildah build --isolation chroot --build-arg PYTHON_IMAGE=localhost/python-base`
#      (the Dockerfile itself is unchanged for users with a normal registry);
#   3. check-image.py mounts the image's root filesystem and checks uid 10001, no compilers,
#      no pip and the entrypoint running under chroot as uid 10001; as a control, the same
#      checks must fail on the bare base image.
#
# The rootfs tar is cached in $CACHE_DIR (default /var/cache/credential-broker-ci) and the
# base image in buildah's storage; both are rebuilt when missing or older than
# $ROOTFS_MAX_AGE_DAYS (security updates), so a fresh machine works without any cache.
#
# pip inside the build uses this machine's pip settings: the effective `pip config` (index,
# certificate, trusted hosts) is written to a user pip.conf that is bind-mounted, with the CA
# bundle it names, read-only over /root in the build containers; nothing of it ends up in
# the image (check-image.py checks that no pip.conf is left).
#
# Must run as root (buildah with chroot isolation, chroot for the entrypoint check).
# Usage: scripts/ci/build-image.sh [IMAGE_TAG]     (default localhost/credential-broker:ci)
set -euo pipefail
cd "$(dirname "$0")/../.."

IMAGE="${1:-localhost/credential-broker:ci}"
BASE_IMAGE="localhost/python-base"
CACHE_DIR="${CREDENTIAL_BROKER_CI_CACHE:-/var/cache/credential-broker-ci}"
ROOTFS_MAX_AGE_DAYS="${ROOTFS_MAX_AGE_DAYS:-7}"
SUITE="bookworm"
# passwd: groupadd/useradd for the runtime stage; ca-certificates: like python:3.11-slim.
INCLUDE="python3,python3-venv,python-is-python3,passwd,ca-certificates"
# Like the slim Python images: no manuals, docs (copyright files kept) or translations.
DPKG_OPTS=(
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
)

t0=$(date +%s)
say() { echo "build-image: $* ($(( $(date +%s) - t0 ))s)"; }

if [ "$(id -u)" != 0 ]; then
  echo "build-image: must run as root (buildah --isolation chroot, chroot)" >&2
  exit 1
fi

# --- tools from the Debian packages -------------------------------------------------------
missing=()
command -v buildah >/dev/null 2>&1 || missing+=(buildah)
command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]} with apt-get"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=600 "${missing[@]}"
fi
say "$(buildah --version)"

# --- the base image ------------------------------------------------------------------------
mkdir -p "$CACHE_DIR"
key="$(printf '%s ' "$SUITE" apt "$INCLUDE" "${DPKG_OPTS[@]}" | sha256sum | cut -c1-16)"
rootfs="$CACHE_DIR/rootfs-$SUITE-$key.tar"
if [ -f "$rootfs" ] && [ -n "$(find "$rootfs" -mtime "+$ROOTFS_MAX_AGE_DAYS" -print)" ]; then
  say "cached rootfs is older than $ROOTFS_MAX_AGE_DAYS days, rebuilding"
  rm -f "$rootfs"
fi
if [ ! -f "$rootfs" ]; then
  say "mmdebstrap $SUITE rootfs (--include=$INCLUDE)"
  # mmdebstrap picks the output format from the name: keep the .tar suffix.
  rm -rf "${rootfs%.tar}.part.tar"
  mmdebstrap --quiet --variant=apt --include="$INCLUDE" "${DPKG_OPTS[@]}" "$SUITE" "${rootfs%.tar}.part.tar"
  mv "${rootfs%.tar}.part.tar" "$rootfs"
else
  say "rootfs from cache: $rootfs"
fi
rootfs_sum="$(sha256sum "$rootfs" | cut -d' ' -f1)"
have_sum="$(buildah inspect --type image --format '{{index .OCIv1.Config.Labels "credential-broker.ci.rootfs-sha256"}}' "$BASE_IMAGE" 2>/dev/null || true)"
if [ "$have_sum" != "$rootfs_sum" ]; then
  say "importing the rootfs as $BASE_IMAGE"
  ctr="$(buildah from scratch)"
  buildah add --quiet "$ctr" "$rootfs" / >/dev/null
  buildah config \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 \
    --cmd python3 \
    --label "credential-broker.ci.rootfs-sha256=$rootfs_sum" "$ctr"
  buildah commit --quiet --rm "$ctr" "$BASE_IMAGE" >/dev/null
else
  say "$BASE_IMAGE is up to date with the rootfs"
fi

# --- this machine's pip settings for the build ---------------------------------------------
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mounts=()
python3 - "$work" <<'EOF'
"""Write the effective pip settings (index, certificate, trusted hosts, timeout) to pip.conf."""
import configparser, os, subprocess, sys
work = sys.argv[1]
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
settings = {}
for line in out.splitlines():
    name, _, value = line.partition("=")
    section, _, key = name.rpartition(".")
    if key in ("index-url", "extra-index-url", "trusted-host", "cert", "client-cert", "timeout", "default-timeout", "retries", "proxy"):
        settings[key] = value.strip().strip("'\"")  # later sources (env) override files
conf = configparser.ConfigParser()
conf["global"] = {}
for key, value in settings.items():
    if key in ("cert", "client-cert"):
        if not os.path.isfile(value):
            continue
        with open(value, "rb") as src, open(os.path.join(work, key + ".pem"), "wb") as dst:
            dst.write(src.read())
        value = f"/root/{key}.pem"
    conf["global"][key] = value
os.makedirs(os.path.join(work, ".config", "pip"))
with open(os.path.join(work, ".config", "pip", "pip.conf"), "w") as f:
    conf.write(f)
print("build-image: pip settings passed to the build:", ", ".join(sorted(conf["global"])) or "none")
EOF
# Mounted over root's home, which exists in the base image, so that no mount point is
# created in the image (a bind mount onto a missing path leaves an empty file behind).
mounts+=(--volume "$work:/root:ro")
proxy_args=()
for var in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
  [ -n "${!var:-}" ] && proxy_args+=(--build-arg "$var=${!var}")
done

# --- build -------------------------------------------------------------------------------
# Drop untagged layers of earlier builds (any code change invalidates them anyway), so
# buildah's storage does not grow with every CI run: it holds the base image, the current
# image and at most the previous build's layers (about 450 MB in all).
buildah rmi --prune >/dev/null 2>&1 || true
say "buildah build $IMAGE (PYTHON_IMAGE=$BASE_IMAGE)"
build_start=$(date +%s)
buildah build --quiet --isolation chroot --layers \
  --build-arg "PYTHON_IMAGE=$BASE_IMAGE" "${proxy_args[@]}" "${mounts[@]}" \
  -f Dockerfile -t "$IMAGE" . >/dev/null
say "built $IMAGE in $(( $(date +%s) - build_start ))s"

# --- check ---------------------------------------------------------------------------------
version="$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
python3 scripts/ci/check-image.py --version "$version" "$IMAGE"
say "control: the same checks must fail on the bare base image"
if python3 scripts/ci/check-image.py --quiet --version "$version" "$BASE_IMAGE"; then
  echo "build-image: the checks passed on $BASE_IMAGE, which is not a credential-broker image: the checks are broken" >&2
  exit 1
fi
say "done"
