"""CPU time of a process tree from /proc: the service's own CPU per request, split into the
service process itself and everything below it (fork server, bwrap, the sandboxes).

For a root pid, ``tree_cpu(pid)`` reads, for the root and each live descendant, its
utime + stime (all threads) and cutime + cstime (children it has reaped). Between two
readings, the difference of the sums is the CPU that the whole tree used: a descendant
that exited in between appears in its parent's cutime/cstime, and its own earlier reading
is subtracted, so nothing is lost or counted twice (granularity: one clock tick, 10 ms, per
process per reading). A descendant re-parented out of the tree before it ends (gVisor's
sandbox processes, when a gVisor sandbox is recycled) takes its CPU with it: when that
makes the sum smaller than the service process's own CPU, only the latter is reported.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["TreeCpu", "descendants", "listening_pid", "proc_stat_fields"]

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def proc_stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 is the state), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def descendants(root: int) -> dict[tuple[int, int], int]:
    """{(pid, starttime): pid} of every live descendant of ``root``."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = proc_stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append((int(entry), int(fields[19])))
    found: dict[tuple[int, int], int] = {}
    stack = [root]
    while stack:
        for pid, start in children.get(stack.pop(), []):
            found[(pid, start)] = pid
            stack.append(pid)
    return found


def _cpu_s(fields: list[str]) -> tuple[float, float]:
    """(own utime + stime, reaped children's cutime + cstime) in seconds."""
    return (int(fields[11]) + int(fields[12])) * _TICK_S, (int(fields[13]) + int(fields[14])) * _TICK_S


class TreeCpu:
    """Readings of a process tree's CPU; ``since(reading)`` gives what was used in between."""

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid

    def read(self) -> dict[tuple[int, int], tuple[float, float]] | None:
        """{(pid, starttime): (own_s, reaped_children_s)} for the root and its descendants."""
        root = proc_stat_fields(self.root_pid)
        if root is None:
            return None
        reading = {(self.root_pid, int(root[19])): _cpu_s(root)}
        for key, pid in descendants(self.root_pid).items():
            fields = proc_stat_fields(pid)
            if fields is not None and int(fields[19]) == key[1]:
                reading[key] = _cpu_s(fields)
        return reading

    def since(self, before: dict[tuple[int, int], tuple[float, float]] | None) -> dict[str, float] | None:
        """CPU seconds used since ``before``: the service process itself, and everything under it."""
        after = self.read()
        if before is None or after is None:
            return None
        root_key = next(k for k in after if k[0] == self.root_pid)
        if root_key not in before:
            return None  # the service restarted in between
        own_root = after[root_key][0] - before[root_key][0]
        total = sum(sum(v) for v in after.values()) - sum(sum(v) for v in before.values())
        if total < own_root:
            # a descendant ended and was reaped outside the tree (runsc's sandbox processes are
            # re-parented): its CPU since ``before`` is lost, the sum is not a figure
            return {"service_process_s": round(own_root, 3)}
        return {"service_process_s": round(own_root, 3), "below_service_s": round(total - own_root, 3),
                "total_s": round(total, 3)}


def listening_pid(port: int) -> int | None:
    """The process listening on TCP ``port`` of this host (the oldest, if several share it)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    if not inodes:
        return None
    wanted = {f"socket:[{inode}]" for inode in inodes}
    owners: list[tuple[int, int]] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") in wanted:
                    fields = proc_stat_fields(int(entry))
                    owners.append((int(fields[19]) if fields else 0, int(entry)))
                    break
            except OSError:
                continue
    return min(owners)[1] if owners else None
