#!/bin/sh
# Entry point of the execbox image: give execbox the container's own cgroup, writable,
# and a /proc without Docker's masks, then run it under tini (pid 1: reaps orphans,
# passes SIGTERM on).
#
# Docker mounts the container's cgroup read-only. execbox needs to create one cgroup per
# sandbox (memory, pids and CPU limits, OOM counts, kill-all), so this remounts the
# container's own cgroup subtree read-write: sandboxes then live *below the container's
# cgroup*, inside its limits, and this execbox never sees (or reaps) the cgroups of the
# host or of another container. That needs CAP_SYS_ADMIN and no AppArmor mount rule,
# which docker-compose.yml grants. Nothing of the host's cgroup tree is mounted.
set -eu

if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
  # cgroup v2 (the container has a cgroup namespace of its own): writable, and the
  # processes moved to a leaf so that the root can delegate controllers to sandboxes
  # (a cgroup with processes cannot enable controllers for its children).
  mount -o remount,rw /sys/fs/cgroup 2>/dev/null || true
  if [ ! -d /sys/fs/cgroup/init ]; then
    mkdir /sys/fs/cgroup/init
    xargs -rn1 </sys/fs/cgroup/cgroup.procs >/sys/fs/cgroup/init/cgroup.procs 2>/dev/null || true
  fi
else
  # cgroup v1: each controller is a bind of the container's own directory
  for dir in /sys/fs/cgroup/*/; do
    dir=${dir%/}
    [ -f "$dir/cgroup.procs" ] || continue
    [ -w "$dir/cgroup.procs" ] && continue  # already writable (e.g. mounted by hand)
    mount -o remount,bind,rw "$dir" \
      || echo "execbox entrypoint: cannot make $dir writable (needs CAP_SYS_ADMIN and apparmor=unconfined)" >&2
  done
fi

# Docker hides parts of /proc behind mounts (/proc/kcore, /proc/sys, ...). The kernel lets a
# new user namespace mount a fresh proc (bubblewrap's sandboxes do) only when no mount hides
# anything of the existing one, so they go (what `--security-opt systempaths=unconfined`
# does, which docker-compose cannot pass). This gives the container nothing new: with
# CAP_SYS_ADMIN it could mount an unmasked proc anyway; the sandboxes see only their own.
awk '$5 ~ "^/proc/" { print $5 }' /proc/self/mountinfo | sort -r | while read -r mnt; do
  umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null \
    || echo "execbox entrypoint: cannot unmount $mnt (bubblewrap sandboxes need an unmasked /proc)" >&2
done

exec /usr/bin/tini -- /opt/execbox/venv/bin/execbox "$@"
