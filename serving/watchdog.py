"""The watchdog of one server start: `python -m serving.watchdog PGID IDENTITY`, started by
TritonServer.start() in a session of its own, its standard input a pipe from the launcher.

It waits for the end of that input. A launcher that stopped its server writes "stopped" first:
nothing to do. A launcher that died (SIGKILL, out of memory) wrote nothing; the kernel has
already killed the server (PR_SET_PDEATHSIG), but a Python-backend stub that was still loading
its model then waits for ever for the dead server (Triton 2.51), holding its memory and its
shared-memory region. The watchdog kills what is left of the server's process group and
removes the regions named after the start's identity (serving/launcher.py remove_leftovers).
"""

from __future__ import annotations

import sys
from typing import List, Optional

from serving.launcher import remove_leftovers


def main(argv: Optional[List[str]] = None) -> int:
    pgid, identity = (argv if argv is not None else sys.argv[1:])
    said = sys.stdin.buffer.read()  # until the launcher closes the pipe, or dies
    if said == b"stopped":
        return 0
    left = remove_leftovers(int(pgid), identity)
    print(f"watchdog: the launcher of tritonserver {pgid} ({identity}) died; removed: "
          f"{', '.join(left) or 'nothing was left'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
