#!/bin/sh
# Make the Dockerfile's base image (debian:bookworm-slim) available to the local engine.
#
#   docker/debian-base-image.sh [IMAGE]      (default debian:bookworm-slim)
#
# 1. nothing to do when the engine already has the image;
# 2. else `docker pull` it (Docker Hub);
# 3. else (Docker Hub unreachable) build it from Debian's own mirror with
#    `debootstrap --variant=minbase bookworm`, made slim the way the official image is
#    (no docs, man pages or locales; apt cleans after itself; sources for bookworm,
#    bookworm-updates and bookworm-security), and `docker import` it under the same name.
#    The Dockerfile stays a plain `FROM debian:bookworm-slim`.
#
# Needs root and a running Docker engine; installs debootstrap with apt-get if missing.
# DEBIAN_MIRROR (default http://deb.debian.org/debian) and DEBIAN_SECURITY_MIRROR
# (default http://deb.debian.org/debian-security) choose the mirrors.
set -eu

IMAGE=${1:-debian:bookworm-slim}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
PULL_TIMEOUT_S=${PULL_TIMEOUT_S:-120}

say() { echo "base-image: $*" >&2; }

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  say "$IMAGE is present"
  exit 0
fi
if timeout "$PULL_TIMEOUT_S" docker pull --quiet "$IMAGE" >/dev/null 2>&1; then
  say "pulled $IMAGE"
  exit 0
fi
say "cannot pull $IMAGE (Docker Hub unreachable?); building it with debootstrap from $MIRROR"
if ! command -v debootstrap >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

rootfs=$(mktemp -d /var/tmp/execbox-base-XXXXXX)
cleanup() {
  # never delete through a mount (debootstrap mounts /proc and /sys inside; a failed run may leave them)
  grep -o " $rootfs[^ ]*" /proc/mounts | sort -r | while read -r mnt; do umount -l "$mnt" || true; done
  rm -rf --one-file-system "$rootfs"
}
trap cleanup EXIT INT TERM

debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 || {
  tail -n 30 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"

# Slim, as debian:bookworm-slim: dpkg leaves out docs, man pages and locales from now on ...
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
CFG
# ... apt keeps no downloaded packages, no translations, no suggested packages installed
cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'CFG'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CFG
echo 'Acquire::Languages "none";' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"
echo 'Apt::AutoRemove::SuggestsImportant "false";' >"$rootfs/etc/apt/apt.conf.d/docker-autoremove-suggests"
rm -f "$rootfs/etc/apt/sources.list"
cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<CFG
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
CFG
# ... and what is already there goes too
find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf "$rootfs/usr/share/man/"* "$rootfs/usr/share/info/"* "$rootfs/usr/share/locale/"* \
       "$rootfs/var/cache/apt/"*.bin "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/lib/apt/lists/"* \
       "$rootfs/var/log/"*.log "$rootfs/var/log/apt/"* "$rootfs/root/.bash_history" 2>/dev/null || true
: >"$rootfs/etc/machine-id"
rm -f "$rootfs/etc/hostname" "$rootfs/etc/resolv.conf"

tar --numeric-owner --xattrs -C "$rootfs" -c . \
  | docker import --change 'CMD ["bash"]' --message "debootstrap --variant=minbase bookworm ($MIRROR)" - "$IMAGE" >/dev/null
say "built $IMAGE with debootstrap ($(docker image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
