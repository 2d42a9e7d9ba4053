"""Prometheus metrics: requests of this API process, plus the cluster's queues, workers and
jobs read from Redis at scrape time (the workers count job ends and durations there).

The queue gauges (waiting, running, the oldest waiting job's age) are what an autoscaler
scales workers on (deploy/: KEDA). They describe the whole cluster, so every API replica
reports the same values: aggregate them across replicas with ``max``, never ``sum``."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from redis import Redis
from redis.exceptions import RedisError

from jobs.metrics import read_job_metrics
from jobs.queues import QUEUE_NAMES, JobKind
from jobs.rqueue import oldest_wait_seconds, queue_depth, running_count
from jobs.rqueue.layout import live_worker_keys


class ClusterCollector:
    """Queue depth, running jobs, the oldest waiting job's age, live workers, job outcomes and
    durations, from Redis."""

    def __init__(self, conn: Redis):
        self.conn = conn

    def collect(self):
        up = GaugeMetricFamily("aex_redis_up", "1 when Redis answered this scrape")
        try:
            depth = GaugeMetricFamily("aex_queue_depth", "jobs waiting in a queue", labels=["queue"])
            running = GaugeMetricFamily(
                "aex_jobs_running",
                "jobs of a queue running now (live leases; batch mates each count)",
                labels=["queue"],
            )
            oldest = GaugeMetricFamily(
                "aex_queue_oldest_age_seconds",
                "seconds since the job at the head of a queue (the longest waiting) was submitted; 0 when none waits",
                labels=["queue"],
            )
            workers = GaugeMetricFamily("aex_workers", "live workers serving a queue", labels=["queue"])
            for kind in JobKind:
                depth.add_metric([kind.value], queue_depth(self.conn, kind))
                running.add_metric([kind.value], running_count(self.conn, kind))
                oldest.add_metric([kind.value], oldest_wait_seconds(self.conn, kind))
                workers.add_metric([kind.value], len(live_worker_keys(self.conn, QUEUE_NAMES[kind])))
            data = read_job_metrics(self.conn)
        except RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield depth
        yield running
        yield oldest
        yield workers
        jobs = CounterMetricFamily(
            "aex_jobs",
            "jobs ended, by kind and outcome (finished, failed, cancelled, "
            "abandoned = worker lost, reused = answered from an earlier "
            "identical request's result)",
            labels=["kind", "outcome"],
        )
        for (kind, outcome), n in sorted(data["outcomes"].items()):
            jobs.add_metric([kind, outcome], n)
        yield jobs
        hist = HistogramMetricFamily("aex_job_duration_seconds", "run time of finished jobs, by kind", labels=["kind"])
        for kind, d in data["durations"].items():
            hist.add_metric([kind], [(str(le), n) for le, n in d["buckets"]] + [("+Inf", d["count"])], d["sum"])
        yield hist


class Metrics:
    """The API process's registry (one per app, so tests can build many apps)."""

    def __init__(self, conn: Redis):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "aex_http_requests",
            "HTTP requests, by method, route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "aex_http_request_duration_seconds",
            "HTTP request latency, by method and route",
            ["method", "route"],
            registry=self.registry,
        )
        self.registry.register(ClusterCollector(conn))


# The label values of a request's method: these, else "other" (a client may send any token as
# a method; each would be a new time series).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "other"


def route_label(scope) -> str:
    """The route template that matched (``/v1/jobs/{job_id}``), never the raw path:
    "unmatched" for a path no route has (404) or a method none takes (405)."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else "unmatched"


class MetricsMiddleware:
    """Pure ASGI middleware: count every request under its route template and its method
    (bounded label values: ``route_label``, ``method_label``)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            method, route = method_label(scope["method"]), route_label(scope)
            self.metrics.requests.labels(method, route, str(status["code"])).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - start)
