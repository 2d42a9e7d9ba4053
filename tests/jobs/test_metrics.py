"""Job counts and durations in Redis (``jobs.metrics``) on a real redis-server: cumulative buckets read back from one
field written per job, next to the cumulative fields earlier workers wrote."""

from __future__ import annotations

from jobs.keys import duration_key
from jobs.metrics import DURATION_BUCKETS, read_job_metrics, record_job

DB = 12  # shared with tests/service/test_audit.py and test_viewer_token.py: each flushes it around each test


def test_durations_read_back_as_cumulative_buckets_with_one_field_written_per_job(conn):
    for seconds in (0.005, 0.02, 0.02, 3.0, 5000.0):
        record_job(conn, "classify", "finished", seconds)
    record_job(conn, "classify", "failed", None)
    # One bucket field per job (none past the last bound), plus count and sum.
    assert sorted(conn.hkeys(duration_key("classify"))) == [b"count", b"in:0.01", b"in:0.025", b"in:5.0", b"sum"]
    metrics = read_job_metrics(conn)
    buckets = dict(metrics["durations"]["classify"]["buckets"])
    assert list(buckets) == list(DURATION_BUCKETS)
    assert (buckets[0.01], buckets[0.025], buckets[2.5], buckets[5.0], buckets[900.0]) == (1, 3, 3, 4, 4)
    assert metrics["durations"]["classify"]["count"] == 5
    assert metrics["outcomes"][("classify", "finished")] == 5 and metrics["outcomes"][("classify", "failed")] == 1
    # Cumulative counts an earlier worker wrote ("le:<bound>") add to the new ones.
    conn.hset(duration_key("classify"), mapping={f"le:{le}": 2 for le in DURATION_BUCKETS if le >= 1.0})
    buckets = dict(read_job_metrics(conn)["durations"]["classify"]["buckets"])
    assert (buckets[0.5], buckets[1.0], buckets[5.0]) == (3, 5, 6)
