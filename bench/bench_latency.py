"""The latency budget of a classify request through ``aex serve``, stage by stage, the Redis round trips per job,
and the service against the model run image by image in process, side by side in one run.

Run: ``.venv/bin/python bench/bench_latency.py [--checkpoint C] [--clients 1,8,32]
[--budget 1,8] [--duration S] [--warmup S] [--keys K]``.

1. In process, before the service starts: decode the PNG and run the model on it, batch 1,
   one image after another (``bench_service.in_process``), with torch's threads (one per
   core, or ``--threads``) and with one thread: images/s and latency. The baseline of every
   ratio is the faster of the two (one thread wins when other work keeps a core busy).
2. ``aex serve`` with its defaults (the embedded Redis, persistent: append-only, fsync before
   each answer; one worker; dynamic batching as configured by default) on a free loopback
   port, its log at WARNING; ``--keys`` API keys (submit, read) made with the admin token.
3. For each ``--clients`` count K: K threads, each with its own keep-alive connection and
   key (round robin), post a different image to /v1/classify as fast as answers come
   (every multipart body is built before the clock starts), for ``--duration`` s after
   ``--warmup`` s. Throughput, p50/p95 latency, statuses; every answer checked against the
   model run here on that client's own image (``bench_service.verify``).
4. The budget (for the ``--budget`` counts): each request's stages, median and p95 in ms.
   The API's stages come from its ``Server-Timing`` header (``service.timing``), the worker's
   from the result's ``provenance.timings``: each a monotonic-clock duration measured within
   one process. Three rows use rq's wall-clock stamps of the job instead (``enqueued_at`` by
   the API process, ``started_at`` and ``ended_at`` by the worker; one host, one clock):
   the queue wait (enqueued -> claimed), the worker's run (claimed -> end stamped, less its
   timed stages) and "end written, API woken" = enqueue + wait - queue wait - run.
5. CPU per request: the user and system CPU time of each process (the API, the worker,
   Redis, the clients) over a phase, from the moment its clients start (their bodies built),
   divided by its requests (``/proc/<pid>/stat``).
6. Redis round trips per job (a pipeline or transaction is one, ``jobs.roundtrips``): the
   API's, exactly per request (the ``redis`` entry of ``Server-Timing``); the worker's, the
   round trips it sent between the start and the end of a phase (its registration's
   ``aex_redis_round_trips``, written with every heartbeat; read once the worker is idle)
   over the jobs it ran, idle loop turns of the phase included.

Prints the table and one JSON line with every number.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import in_process, pick_checkpoint, start_service, test_png, verify

from models.store.checkpoint import load_checkpoint

SERIALS = itertools.count(1)  # no image is sent twice in a run (no answer comes from result reuse)

# (label, how it is computed); "api:" a Server-Timing stage, "worker:" a provenance timing.
API_STAGES = [
    ("multipart parse", "api:parse"),
    ("authentication", "api:auth"),
    ("audit, pending record", "api:audit"),
    ("admission (decode, checks)", "api:admission"),
    ("lookup: earlier result, depth, epoch", "api:lookup"),
    ("capacity, job id", "api:capacity"),
    ("seal the upload", "api:seal"),
    ("enqueue: share, upload, job, wake-up", "api:enqueue"),
    ("wait for the end", "api:wait"),
]
WAIT_PARTS = [
    ("  queue wait (enqueued -> claimed)*", "queued"),
    ("  worker: gather batch mates", "worker:gather_seconds"),
    ("  worker: claim", "worker:claim_seconds"),
    ("  worker: read the upload", "worker:read_seconds"),
    ("  worker: decode", "worker:decode_seconds"),
    ("  worker: forward pass", "worker:inference_seconds"),
    ("  worker: rest of its run*", "run_rest"),
    ("  end written, API woken*", "woken"),
]
AFTER = [
    ("job view", "api:view"),
    ("response (JSON)", "api:respond"),
    ("audit, final record", "api:audit-end"),
    ("rest of the API", "api_rest"),
    ("HTTP, sockets, client", "http"),
]


def parse_server_timing(value: str) -> dict[str, float]:
    """``Server-Timing`` into {name: ms} (``redis``: its round-trip count)."""
    out: dict[str, float] = {}
    for item in value.split(","):
        name, *params = [p.strip() for p in item.split(";")]
        for p in params:
            key, _, v = p.partition("=")
            if key in ("dur", "desc"):
                out[name] = float(v.strip('"'))
    return out


def multipart(png: bytes, model: str) -> tuple[bytes, str]:
    boundary = secrets.token_hex(16)
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + png
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


class Redis:
    """The service's embedded Redis, found by the socket its log names (in AEX_REDIS_DIR)."""

    def __init__(self, folder: Path):
        import re

        import redis

        found = re.findall(r"accept connections at (\S+\.sock)", (folder / "redis.log").read_text())
        if not found:
            raise SystemExit(f"the embedded Redis's socket is not named in {folder / 'redis.log'}")
        self.conn = redis.Redis(unix_socket_path=found[-1])

    def worker_round_trips(self) -> int:
        keys = sorted(k.decode() for k in self.conn.smembers("rq:workers"))
        return sum(int(self.conn.hget(k, "aex_redis_round_trips") or 0) for k in keys)


def processes(serve_pid: int) -> dict[str, list[int]]:
    """The processes whose CPU time a request costs: the API (``aex serve`` itself), its
    workers and its redis-server (its children), and the clients (this process)."""
    found: dict[str, list[int]] = {"API": [serve_pid], "worker": [], "Redis": [], "clients": [os.getpid()]}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == serve_pid:
            found["Redis" if b"redis-server" in cmd else "worker"].append(int(pid))
    return found


def cpu_seconds(pids: dict[str, list[int]]) -> dict[str, float]:
    """User and system CPU seconds each group of ``processes`` has used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, group in pids.items():
        total = 0
        for pid in group:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        out[name] = total / tick
    return out


def make_keys(url: str, admin: str, n: int) -> list[str]:
    import httpx

    tokens = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=30) as http:
        for i in range(n):
            resp = http.post("/v1/keys", json={"name": f"bench-{i}", "scopes": ["submit", "read"]})
            resp.raise_for_status()
            tokens.append(resp.json()["token"])
    return tokens


def drive(url: str, tokens: list[str], model: str, size: int, channels: int, clients: int, warmup, duration, started):
    """K client threads as in the module docstring; returns every request's record.
    ``started()`` is called once every body is built, just before the clients start (the CPU
    spent building them is not the clients')."""
    host, port = url.removeprefix("http://").split(":")
    records: list[dict] = []
    lock = threading.Lock()
    # Bodies ready before the clock starts: enough for 600 answers a second in all.
    per_client = int((warmup + duration) * 600 / clients) + 50
    bodies = [
        [
            (serial, *multipart(test_png(size, channels, serial), model))
            for serial in itertools.islice(SERIALS, per_client)
        ]
        for _ in range(clients)
    ]
    short = []
    start = time.monotonic() + 0.2
    measure_from, stop_at = start + warmup, start + warmup + duration

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        auth = f"Bearer {tokens[i % len(tokens)]}"
        while time.monotonic() < start:
            time.sleep(0.001)
        for serial, body, ctype in bodies[i]:
            t0 = time.monotonic()
            if t0 >= stop_at:
                break
            conn.request("POST", "/v1/classify", body, {"Authorization": auth, "Content-Type": ctype})
            resp = conn.getresponse()
            data = resp.read()
            t1 = time.monotonic()
            rec = {
                "serial": serial,
                "status": resp.status,
                "ms": (t1 - t0) * 1e3,
                "measured": t0 >= measure_from and t1 <= stop_at,
                "server": parse_server_timing(resp.getheader("server-timing") or ""),
            }
            if resp.status == 200:
                view = json.loads(data)
                rec["result"], rec["timings"] = view.get("result") or {}, view.get("timings") or {}
            with lock:
                records.append(rec)
        else:
            short.append(i)
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if short:
        print(f"warning: {len(short)} client(s) ran out of images before the end", file=sys.stderr)
    return records


def stage_values(rec: dict) -> dict[str, float]:
    """Every row of the budget for one request, in ms."""
    server, out = rec["server"], {}
    for name, value in server.items():
        if name != "redis":
            out[f"api:{name}"] = value
    timings = (rec.get("result") or {}).get("provenance", {}).get("timings", {})
    for name, value in timings.items():
        out[f"worker:{name}"] = value * 1e3
    view = rec.get("timings") or {}
    queued, run = view.get("queued_seconds"), view.get("run_seconds")
    if queued is not None and run is not None:
        out["queued"] = queued * 1e3
        timed = sum(out.get(f"worker:{k}", 0.0) for k in ("gather_seconds", "read_seconds", "decode_seconds"))
        out["run_rest"] = run * 1e3 - timed - out.get("worker:inference_seconds", 0.0)
        out["woken"] = out.get("api:enqueue", 0.0) + out.get("api:wait", 0.0) - (queued + run) * 1e3
    api_stages = [k for k in out if k.startswith("api:") and k != "api:total"]
    if "api:total" in out:
        out["api_rest"] = out["api:total"] - sum(out[k] for k in api_stages)
        out["http"] = rec["ms"] - out["api:total"]
    out["client"] = rec["ms"]
    return out


def summarize(records: list[dict], duration: float, worker_trips: int | None, jobs: int) -> dict:
    measured = [r for r in records if r["measured"]]
    ok = [r for r in measured if r["status"] == 200]
    statuses: dict[int, int] = {}
    for r in measured:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    rows = [stage_values(r) for r in ok]
    names = sorted({k for row in rows for k in row})
    stages = {
        n: {
            "p50": float(np.percentile([row[n] for row in rows if n in row], 50)),
            "p95": float(np.percentile([row[n] for row in rows if n in row], 95)),
            "mean": float(np.mean([row[n] for row in rows if n in row])),
        }
        for n in names
    }
    api_trips = [r["server"]["redis"] for r in ok if "redis" in r["server"]]
    batch = [int(r["result"]["provenance"]["method"].get("batch_size", 1)) for r in ok]
    return {
        "requests_per_s": len(ok) / duration,
        "p50_ms": stages["client"]["p50"] if rows else float("nan"),
        "p95_ms": stages["client"]["p95"] if rows else float("nan"),
        "ok": len(ok),
        "statuses": statuses,
        "mean_batch_size": float(np.mean(batch)) if batch else float("nan"),
        "stages": stages,
        "api_round_trips": {
            "mean": float(np.mean(api_trips)) if api_trips else None,
            "min": min(api_trips, default=None),
            "max": max(api_trips, default=None),
        },
        "worker_round_trips": {
            "total": worker_trips,
            "jobs": jobs,
            "per_job": worker_trips / jobs if worker_trips is not None and jobs else None,
        },
    }


def print_budget(phases: dict[int, dict], counts: list[int]) -> None:
    head = "".join(f"{f'{k} client' + ('s' if k > 1 else ''):>22s}" for k in counts)
    print(f"{'stage (ms)':40s}{head}")
    print(f"{'':40s}" + "".join(f"{'p50':>11s}{'p95':>11s}" for _ in counts))

    def line(label: str, key: str) -> None:
        cells = ""
        for k in counts:
            s = phases[k]["stages"].get(key)
            cells += f"{s['p50']:11.2f}{s['p95']:11.2f}" if s else f"{'-':>11s}{'-':>11s}"
        print(f"{label:40s}{cells}")

    line("client: request to answer", "client")
    named = {key for _, key in API_STAGES + WAIT_PARTS + AFTER} | {"api:total"}
    # Stages of another version of the API (its own names), after the ones named here.
    other = sorted({key for k in counts for key in phases[k]["stages"] if key.startswith("api:")} - named)
    for label, key in API_STAGES + [(key.removeprefix("api:"), key) for key in other] + WAIT_PARTS + AFTER:
        line(label, key)
    api = "".join(
        f"{phases[k]['api_round_trips']['mean']:11.1f}{'':11s}" if phases[k]["api_round_trips"]["mean"] else ""
        for k in counts
    )
    wrk = "".join(f"{phases[k]['worker_round_trips']['per_job'] or float('nan'):11.1f}{'':11s}" for k in counts)
    print(f"{'Redis round trips per job: API':40s}{api}")
    print(f"{'Redis round trips per job: worker':40s}{wrk}")
    for name in ("API", "worker", "Redis", "clients"):
        cells = "".join(f"{phases[k]['cpu_ms_per_request'][name]:11.2f}{'':11s}" for k in counts)
        print(f"{f'CPU ms per request: {name}':40s}{cells}")
    print("* wall-clock stamps of two processes (rq's enqueued_at, started_at, ended_at), one host")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="checkpoint to serve (default: the first bundled, cifar10-robust)")
    ap.add_argument("--clients", default="1,8,32", help="comma list of concurrent client counts")
    ap.add_argument("--budget", default="1,8", help="the client counts whose stage table is printed")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds measured per client count")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--keys", type=int, default=8, help="API keys the clients spread over")
    ap.add_argument("--threads", type=int, help="torch threads in process (default: one per core)")
    ap.add_argument("--worker-threads", type=int, help="AEX_TORCH_THREADS of the worker (default: aex serve's)")
    ap.add_argument("--set", action="append", default=[], metavar="AEX_X=V", help="a setting of aex serve (repeat)")
    args = ap.parse_args()
    print(json.dumps(run(args)))


def run(args: argparse.Namespace) -> dict:
    clients = [int(c) for c in str(args.clients).split(",")]
    budget = [int(c) for c in str(args.budget).split(",")]
    threads = args.threads or os.cpu_count() or 1
    scratch = Path(tempfile.mkdtemp(prefix="aex-bench-latency-"))
    phases: dict[int, dict] = {}
    try:
        checkpoint = pick_checkpoint(args.checkpoint, scratch)
        meta = load_checkpoint(checkpoint)[1]
        png = test_png(meta.input_size, meta.in_channels)
        # torch's threads, and one thread (faster on a machine whose cores are busy): the
        # baseline is the faster of the two.
        locals_ = [in_process(checkpoint, png, t, args.duration) for t in sorted({threads, 1}, reverse=True)]
        local = max(locals_, key=lambda r: r["images_per_s"])
        load = os.getloadavg()[0]
        extra = dict(item.split("=", 1) for item in args.set)
        proc, url, admin = start_service(
            checkpoint, "bench", 1, args.worker_threads, scratch, None, loose_limits=False, extra_env=extra
        )
        try:
            tokens = make_keys(url, admin, args.keys)
            store = Redis(scratch / f"redis-{url.rsplit(':', 1)[1]}")
            for k in clients:
                time.sleep(1.0)  # the worker idle: its last heartbeat wrote its count
                before = store.worker_round_trips()
                pids = processes(proc.pid)
                cpu_before: dict[str, float] = {}
                records = drive(
                    url,
                    tokens,
                    "bench",
                    meta.input_size,
                    meta.in_channels,
                    k,
                    args.warmup,
                    args.duration,
                    lambda before=cpu_before, pids=pids: before.update(cpu_seconds(pids)),
                )
                cpu = {name: t - cpu_before[name] for name, t in cpu_seconds(pids).items()}
                time.sleep(1.0)
                after = store.worker_round_trips()
                jobs = sum(
                    1 for r in records if r["status"] in (200, 202) and not (r.get("result") or {}).get("reused")
                )
                phase = summarize(records, args.duration, after - before, jobs)
                # CPU per request over the whole phase (its warm-up included), each process's.
                phase["cpu_ms_per_request"] = {name: t * 1e3 / len(records) for name, t in cpu.items()}
                answers = [(r["serial"], r["result"]) for r in records if r.get("result")]
                phase["verified"] = verify(checkpoint, answers, meta.input_size, meta.in_channels)
                phases[k] = phase
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    label = checkpoint.parent.name if checkpoint.stem == "model" else checkpoint.name
    print(
        f"checkpoint {label}: {meta.arch}, {meta.input_size}x{meta.input_size}x{meta.in_channels}; "
        f"{os.cpu_count()} cores; in process {threads} torch threads; aex serve defaults, 1 worker"
        f"{f', AEX_TORCH_THREADS={args.worker_threads}' if args.worker_threads else ''}"
        f"{''.join(f', {item}' for item in args.set)}; {args.keys} API keys; "
        f"load average {load:.2f} when the service started"
    )
    print(f"{'':34s}{'per s':>9s}{'p50 ms':>9s}{'p95 ms':>9s}{'x in-proc':>10s}{'batch':>7s}  answers")
    for r in locals_:
        label_local = f"in process, one by one, {r['threads']} thr" + ("*" if r is local else "")
        print(f"{label_local:34s}{r['images_per_s']:9.1f}{r['p50_ms']:9.2f}{r['p95_ms']:9.2f}")
    for k, r in phases.items():
        r["ratio_to_in_process"] = r["requests_per_s"] / local["images_per_s"]
        v = r["verified"]
        print(
            f"{f'aex serve, {k} clients':34s}{r['requests_per_s']:9.1f}{r['p50_ms']:9.2f}{r['p95_ms']:9.2f}"
            f"{r['ratio_to_in_process']:10.2f}{r['mean_batch_size']:7.1f}  {v['checked'] - v['wrong']}/{v['checked']}"
            f" their own; statuses {r['statuses']}"
        )
    targets = {}
    if 8 in phases:
        targets["ratio_8_clients"] = phases[8]["ratio_to_in_process"]
    if 32 in phases:
        targets["ratio_32_clients"] = phases[32]["ratio_to_in_process"]
    if 1 in phases:
        targets["p50_1_client_minus_in_process_ms"] = phases[1]["p50_ms"] - local["p50_ms"]
    print("* the baseline: the faster in-process run")
    print(
        "targets: "
        + ", ".join(f"{k} {v:.2f}" for k, v in targets.items())
        + " (wanted: >= 1.5 at 8, >= 2.0 at 32, <= 5 ms at 1)"
    )
    # The utilisation law: no run answers more than the cores over a request's CPU time (every
    # process of the service and the clients), whatever its latency; what the ratio could reach.
    cores = os.cpu_count() or 1
    ceilings = []
    for k, r in phases.items():
        cpu_ms = sum(r["cpu_ms_per_request"].values())
        r["ceiling_per_s"] = cores * 1e3 / cpu_ms
        r["cores_busy"] = r["requests_per_s"] * cpu_ms / (cores * 1e3)
        ceilings.append(
            f"{k} clients {cpu_ms:.2f} ms -> {r['ceiling_per_s']:.0f}/s "
            f"({r['ceiling_per_s'] / local['images_per_s']:.2f}x), cores {100 * r['cores_busy']:.0f}% busy"
        )
    print(f"ceiling ({cores} cores / CPU ms per request): " + "; ".join(ceilings))
    print()
    shown = [k for k in budget if k in phases]
    if shown:
        print_budget(phases, shown)
    return {"checkpoint": label, "in_process": local, "in_process_runs": locals_, "service": phases, "targets": targets}


if __name__ == "__main__":
    main()
