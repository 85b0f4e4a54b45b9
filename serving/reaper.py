"""The watchdog that makes tritonserver die with its launcher (standard library only).

`serving.launcher.Server.start()` runs this file as a small process of its own session:

    python reaper.py LAUNCHER_PID SERVER_PID SHM_PREFIX [PATH ...]

It waits (pidfd, no polling) until either process ends. If the server ends first, the
launcher is in charge and the reaper just exits. If the launcher ends first (SIGKILL,
a crash: nothing of it ran its cleanup), the reaper SIGKILLs the server's process group
(tritonserver and its Python stubs), removes the shared-memory regions whose names start
with SHM_PREFIX, and the PATHs (the temporary backend dir, the admin key file, the
generated repository).

The /proc readings of the serving package live here too (`proc_stat`, `process_group_members`,
`cpu_seconds`), since this file may import only the standard library.

Why not PR_SET_PDEATHSIG: the parent-death signal follows the *thread* that started the
server, so a server started from a worker thread would be killed when that thread ends.
"""
from __future__ import annotations

import os
import select
import shutil
import signal
import sys
import time
from pathlib import Path


def _pidfd(pid: int):
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the parenthesised command (state ppid pgrp ...),
    None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def process_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is pgid (Linux /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        rest = proc_stat(int(d.name)) if d.name.isdigit() else None
        if rest is not None and int(rest[2]) == pgid and rest[0] != "Z":
            out.append(int(d.name))
    return out


def cpu_seconds(pids) -> float:
    """utime + stime (s) of processes, from /proc (e.g. a server and its Python stubs)."""
    ticks = 0
    for pid in pids:
        rest = proc_stat(pid)
        if rest is not None:
            ticks += int(rest[11]) + int(rest[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def reap(server_pid: int, shm_prefix: str, paths: list[str]) -> None:
    """SIGKILL the server's group, then remove its shared memory and temporary paths."""
    deadline = time.monotonic() + 10.0
    while process_group_members(server_pid) and time.monotonic() < deadline:
        try:
            os.killpg(server_pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    if shm_prefix:
        for f in Path("/dev/shm").glob(shm_prefix + "*"):
            try:
                f.unlink()
            except OSError:
                pass
    for p in paths:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                os.unlink(p)
            except OSError:
                pass


def main(argv: list[str]) -> int:
    launcher, server, shm_prefix, paths = int(argv[0]), int(argv[1]), argv[2], argv[3:]
    # a terminal's Ctrl-C is the launcher's to handle; this process only outlives it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fds = {}
    for name, pid in (("launcher", launcher), ("server", server)):
        fd = _pidfd(pid)
        if fd is None:
            fds = {name: None}
            break
        fds[name] = fd
    if "launcher" in fds and fds["launcher"] is None:
        reap(server, shm_prefix, paths)  # the launcher is already gone
        return 0
    if "server" in fds and fds["server"] is None:
        return 0  # the server is already gone: the launcher cleans up after it
    ready, _, _ = select.select(list(fds.values()), [], [])
    if fds["launcher"] in ready and fds["server"] not in ready:
        reap(server, shm_prefix, paths)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
