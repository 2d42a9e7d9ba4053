"""The one adapter over rq: every use of rq beyond its public API (its Redis layout, its registries, its job
life) is here, so the API, the CLI and the workers see aex's job records and never rq's internals.

``tests/jobs/test_rqueue.py`` pins the rq behaviour relied on here (rq 3.0, constraints.txt)."""

from __future__ import annotations

# --- API side (service, CLI): enqueue, read, cancel, wait, reuse ----------------------------

# --- worker side: starting, leasing, ending and reaping jobs ---------------------------------
