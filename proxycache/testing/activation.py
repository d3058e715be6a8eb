"""
Start a program as systemd's socket activation does: a listening socket at
file descriptor 3, C{LISTEN_FDS=1}, C{LISTEN_PID} set to the program's own
pid (it keeps the pid: this execs) and C{LISTEN_FDNAMES} (systemd names each
socket, by default after its unit; Twisted ignores descriptors without names).  The socket stays open in whoever started
it, as in systemd, so the kernel keeps accepting while the program restarts.

    python -m proxycache.testing.activation FD PROGRAM [ARGS...]

(C{FD}: the listening socket's descriptor in this process, passed with C{pass_fds}.)
"""

from __future__ import annotations

import os
import sys

SD_LISTEN_FDS_START = 3  # the first descriptor systemd passes
SOCKET_NAME = "proxycache.socket"  # the name systemd gives the socket of contrib/proxycache.socket


def main(argv: list[str]) -> None:
    fd, program = int(argv[1]), argv[2:]
    if fd != SD_LISTEN_FDS_START:
        os.dup2(fd, SD_LISTEN_FDS_START)
        os.close(fd)
    os.set_inheritable(SD_LISTEN_FDS_START, True)
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDNAMES"] = SOCKET_NAME
    os.execv(program[0], program)


if __name__ == "__main__":
    main(sys.argv)
