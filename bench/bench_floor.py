"""The floor under the service's classify throughput: what the model and a bare HTTP stack cost per classify on this machine, and the most any service built on them could reach.

Run: ``.venv/bin/python bench/bench_floor.py [--checkpoint C] [--clients 32] [--duration S]``.

A classify through ``aex serve`` needs, per request, at least: the model's forward pass (at
the batch the service reaches, run on one torch thread as the worker runs it), the HTTP
server reading the multipart upload and writing a JSON answer, and the client sending and
reading it, all on the same cores. Measured here, side by side in one run:

1. in process, as ``bench_latency`` measures its baseline: decode and forward pass, batch 1,
   one image after another, with torch's threads (one per core) and with one thread; the
   faster is the baseline of the targets;
2. the model alone, batched as the worker batches (the fused channels-last copy as its
   frozen graph, ``ServedModel.classifier``), one thread: CPU ms per image at batch 1, 4, 16 and 32;
3. a bare FastAPI application on uvicorn, started as ``aex serve`` starts its API (uvloop,
   the same HTTP implementation, one process), whose one route reads the same multipart
   upload (``request.form()``, the ``image`` part's bytes) and answers a JSON body of a
   classify result's size; nothing else (no authentication, audit trail, encryption, Redis,
   thread pool or queue). ``--clients`` threads post to it as ``bench_latency``'s clients do
   (keep-alive connections, every body built before the clock starts): requests per
   second, the CPU ms per request of the server and of the clients (``/proc/<pid>/stat``).
   The same route with three Redis round trips as the service's route makes them, three ways:
   on redis-py's blocking client in one trip into the thread pool (as the service does), on its
   asyncio client in the event loop, and the blocking client's code in a greenlet inside the
   event loop with its socket waits awaited there (``service.green``, as the API runs a
   submission's job-store work).

The ceiling: on C cores, a service whose every request costs at least the model's CPU at
batch 16 plus the bare server's and the clients' cannot answer more than
C / (model + server + clients) requests per second; its ratio to the baseline is printed
beside the targets (1.5x at 8 clients, 2.0x at 32). Everything a real service adds (the
job store with its writes synced to disk, the worker's bookkeeping, authentication, the
audit trail, encryption at rest) comes on top. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_latency import multipart
from bench_service import free_port, in_process, pick_checkpoint, test_png

from aex.embedded_redis import EmbeddedRedis
from models.data.tensors import load_image_for_model
from models.nn.graph import graph_forward
from models.nn.inference import inference_copy
from models.store.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
RESULT_BYTES = 3_100  # a classify result's JSON (cifar10-robust, top 5, provenance), as the service answers it

# The bare application: one route that reads the upload as the service's does and answers JSON.
BARE_APP = textwrap.dedent(
    f"""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI()
    FILLER = "x" * {RESULT_BYTES - 120}

    @app.post("/v1/classify")
    async def classify(request: Request):
        form = await request.form()
        data = await form["image"].read()
        return JSONResponse({{"id": "0" * 32, "status": "finished", "bytes": len(data), "filler": FILLER}})

    # The same, with what the service's route does besides: one trip into the thread pool
    # (Starlette's run_in_threadpool), where three Redis round trips run on redis-py's
    # blocking client (the service's lookup, enqueue and wait), the upload written once.
    import os
    from redis import Redis
    from starlette.concurrency import run_in_threadpool

    REDIS = Redis(unix_socket_path=os.environ["BARE_REDIS"]) if os.environ.get("BARE_REDIS") else None

    def trips(client, data):
        with client.pipeline(transaction=False) as pipe:
            pipe.get("bare:index")
            pipe.llen("bare:queue")
            pipe.execute()
        client.set("bare:upload", data, ex=60)
        with client.pipeline(transaction=False) as pipe:
            pipe.xread({{"bare:stream": "0-0"}}, block=1)
            pipe.get("bare:upload")
            return len(pipe.execute()[1])

    # The same round trips on redis-py's asyncio client, in the event loop (no thread pool).
    from redis.asyncio import Redis as AsyncRedis

    AREDIS = AsyncRedis(unix_socket_path=os.environ["BARE_REDIS"]) if os.environ.get("BARE_REDIS") else None

    @app.post("/v1/classify-async")
    async def classify_async(request: Request):
        form = await request.form()
        data = await form["image"].read()
        async with AREDIS.pipeline(transaction=False) as pipe:
            pipe.get("bare:index")
            pipe.llen("bare:queue")
            await pipe.execute()
        await AREDIS.set("bare:upload", data, ex=60)
        async with AREDIS.pipeline(transaction=False) as pipe:
            pipe.xread({{"bare:stream": "0-0"}}, block=1)
            pipe.get("bare:upload")
            size = len((await pipe.execute())[1])
        return JSONResponse({{"id": "0" * 32, "status": "finished", "bytes": size, "filler": FILLER}})

    # The blocking round trips of the thread pool's route, run in a greenlet inside the event
    # loop instead, their socket waits awaited there, as aex's API runs a submission's
    # (service/green.py): no thread.
    from service.green import make_green, run_green

    GREDIS = Redis(unix_socket_path=os.environ["BARE_REDIS"]) if os.environ.get("BARE_REDIS") else None
    if GREDIS is not None:
        make_green(GREDIS)

    # The upload read, then trips on client run by run (the thread pool or a greenlet).
    async def with_trips(request, run, client):
        form = await request.form()
        data = await form["image"].read()
        size = await run(trips, client, data)
        return JSONResponse({{"id": "0" * 32, "status": "finished", "bytes": size, "filler": FILLER}})

    @app.post("/v1/classify-green")
    async def classify_green(request: Request):
        return await with_trips(request, run_green, GREDIS)

    @app.post("/v1/classify-pool")
    async def classify_pool(request: Request):
        return await with_trips(request, run_in_threadpool, REDIS)
    """
)


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of process ``pid`` so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def model_per_image(checkpoint: Path, batches: list[int], duration: float) -> dict[int, float]:
    """CPU ms per image of the forward pass as the worker runs it (the fused copy's frozen
    graph, ``models.nn.graph``), one thread, per batch size."""
    torch.set_num_threads(1)
    model, meta = load_checkpoint(checkpoint)
    model.requires_grad_(False)
    example = torch.zeros(1, meta.in_channels, meta.input_size, meta.input_size)
    net, _ = graph_forward(inference_copy(model), example.contiguous(memory_format=torch.channels_last))
    png = test_png(meta.input_size, meta.in_channels, 1)
    x = load_image_for_model(png, meta.input_size, meta.in_channels)
    out = {}
    for n in batches:
        xs = torch.stack([x] * n).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            for _ in range(5):
                net(xs)
            images, start, end = 0, time.process_time(), time.perf_counter() + duration
            while time.perf_counter() < end:
                net(xs)
                images += n
        out[n] = (time.process_time() - start) / images * 1e3
    return out


def bare_server(clients: int, duration: float, size: int, channels: int, route: str, redis_socket: str) -> dict:
    """The bare application under ``clients`` keep-alive clients posting to ``route`` for
    ``duration`` s (the Redis at ``redis_socket`` for the route that uses one)."""
    port = free_port()
    app_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"aex-bench-floor-{os.getpid()}"
    app_dir.mkdir(exist_ok=True)
    (app_dir / "bare_app.py").write_text(BARE_APP)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bare_app:app",
            "--port",
            str(port),
            "--loop",
            "uvloop",
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=app_dir,
        env={**os.environ, "BARE_REDIS": redis_socket, "PYTHONPATH": str(ROOT)},
    )
    try:
        for _ in range(200):
            try:
                http.client.HTTPConnection("127.0.0.1", port, timeout=1).request("GET", "/docs")
                break
            except OSError:
                time.sleep(0.05)
        bodies = [multipart(test_png(size, channels, 10_000 + i), "m") for i in range(64)]
        done = [0] * clients
        start = time.monotonic() + 0.5
        stop = start + duration

        def client(i: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            while time.monotonic() < start:
                time.sleep(0.001)
            k = 0
            while time.monotonic() < stop:
                body, ctype = bodies[(i + k) % len(bodies)]
                conn.request("POST", route, body, {"Content-Type": ctype})
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 200, resp.status
                k += 1
            done[i] = k
            conn.close()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        time.sleep(max(0.0, start - time.monotonic()))
        server0, me0, wall0 = cpu_seconds(server.pid), cpu_seconds(os.getpid()), time.monotonic()
        for t in threads:
            t.join()
        server1, me1, wall1 = cpu_seconds(server.pid), cpu_seconds(os.getpid()), time.monotonic()
    finally:
        server.terminate()
        server.wait(10)
    n = sum(done)
    return {
        "requests_per_s": n / (wall1 - wall0),
        "server_cpu_ms": (server1 - server0) / n * 1e3,
        "client_cpu_ms": (me1 - me0) / n * 1e3,
        "requests": n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=None, help="checkpoint (default: the first bundled)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    args = ap.parse_args()
    checkpoint = pick_checkpoint(
        str(args.checkpoint) if args.checkpoint else None, Path(os.environ.get("TMPDIR", "/tmp"))
    )
    _, meta = load_checkpoint(checkpoint)
    cores = os.cpu_count() or 1
    png = test_png(meta.input_size, meta.in_channels, 1)
    runs = [in_process(checkpoint, png, t, args.duration) for t in sorted({cores, 1}, reverse=True)]
    baseline = max(runs, key=lambda r: r["images_per_s"])
    model = model_per_image(checkpoint, [1, 4, 16, 32], args.duration / 2)
    with tempfile.TemporaryDirectory() as scratch:
        redis = EmbeddedRedis(Path(scratch) / "redis")  # not persistent: no fsync (the service's has one)
        redis.start()
        socket_path = str(redis.socket)
        try:
            bare = bare_server(args.clients, args.duration, meta.input_size, meta.in_channels, "/v1/classify", "")
            pooled = bare_server(
                args.clients, args.duration, meta.input_size, meta.in_channels, "/v1/classify-pool", socket_path
            )
            in_loop = bare_server(
                args.clients, args.duration, meta.input_size, meta.in_channels, "/v1/classify-async", socket_path
            )
            green = bare_server(
                args.clients, args.duration, meta.input_size, meta.in_channels, "/v1/classify-green", socket_path
            )
        finally:
            redis.stop()
    floor_ms = model[16] + bare["server_cpu_ms"] + bare["client_cpu_ms"]
    ceiling = cores / floor_ms * 1e3
    print(f"checkpoint {checkpoint}: {meta.arch}; {cores} cores")
    for r in runs:
        print(f"in process, one by one, {r['threads']} thr   {r['images_per_s']:7.1f}/s  p50 {r['p50_ms']:.2f} ms")
    print(
        "model alone, fused copy's graph, 1 thread, CPU ms per image: "
        + ", ".join(f"batch {n} {ms:.2f}" for n, ms in model.items())
    )
    print(
        f"bare FastAPI on uvicorn, {args.clients} clients: {bare['requests_per_s']:.1f}/s, CPU ms per request: "
        f"server {bare['server_cpu_ms']:.2f}, clients {bare['client_cpu_ms']:.2f}"
    )
    print(
        f"the same with a trip into the thread pool and 3 Redis round trips (redis-py, blocking): "
        f"{pooled['requests_per_s']:.1f}/s, CPU ms per request: server {pooled['server_cpu_ms']:.2f}, "
        f"clients {pooled['client_cpu_ms']:.2f}"
    )
    print(
        f"the same round trips on redis-py's asyncio client, in the event loop: "
        f"{in_loop['requests_per_s']:.1f}/s, CPU ms per request: server {in_loop['server_cpu_ms']:.2f}, "
        f"clients {in_loop['client_cpu_ms']:.2f}"
    )
    print(
        f"the thread pool's blocking round trips in a greenlet in the event loop (service/green.py): "
        f"{green['requests_per_s']:.1f}/s, CPU ms per request: server {green['server_cpu_ms']:.2f}, "
        f"clients {green['client_cpu_ms']:.2f}"
    )
    print(
        f"floor per request: model at batch 16 {model[16]:.2f} + bare server {bare['server_cpu_ms']:.2f} + clients "
        f"{bare['client_cpu_ms']:.2f} = {floor_ms:.2f} CPU ms -> at most {ceiling:.0f}/s on {cores} cores, "
        f"{ceiling / baseline['images_per_s']:.2f}x the baseline ({baseline['images_per_s']:.1f}/s; the target: 2.0x at 32 clients)"
    )
    print(
        json.dumps(
            {
                "in_process": runs,
                "model_cpu_ms_per_image": model,
                "bare_server": bare,
                "bare_server_pool_redis": pooled,
                "bare_server_async_redis": in_loop,
                "bare_server_green_redis": green,
                "floor_cpu_ms": floor_ms,
                "ceiling_per_s": ceiling,
                "ceiling_ratio": ceiling / baseline["images_per_s"],
            }
        )
    )


if __name__ == "__main__":
    main()
