"""``python -m worker``: one worker process with the settings of the environment (AEX_*)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from jobs.settings import Settings
from models.errors import AexError


def _exit_with_parent(parent: int) -> None:
    # Started by `aex serve` / `aex worker --count N`: if the supervisor dies without
    # stopping us (SIGKILL), shut down warmly instead of lingering as an orphan.
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="aex-parent-watch").start()


def lower_priority(nice: int | None) -> None:
    """Run every thread of this process at nice ``nice`` at least: those running now (Linux
    keeps a nice value per thread; importing torch starts some) and, through the calling
    thread, those started later. A process may raise its nice value, never lower it, without
    privileges."""
    if not nice:
        return
    tasks = Path("/proc/self/task")
    for tid in [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [0]:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), nice))
        except ProcessLookupError:  # a thread that ended meanwhile
            continue


def main() -> int:
    settings = Settings()
    lower_priority(settings.worker_nice)

    from worker.run import run_worker

    if settings.parent_pid:
        _exit_with_parent(settings.parent_pid)
    try:
        run_worker(settings)
    except AexError as exc:
        print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
