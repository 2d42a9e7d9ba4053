"""``python -m worker``: one worker process with the settings of the environment (AEX_*)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

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


def main() -> int:
    from worker.run import run_worker

    settings = Settings()
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
