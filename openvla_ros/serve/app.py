"""``python -m openvla_ros.serve``: the policy behind OpenVLA's REST API, batched across robots.

    python -m openvla_ros.serve --model DIR_OR_HUB_ID [--quantization 4bit] [--unnorm-key K]
        [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-batch 8] [--batch-window-ms 5]

Endpoints:

- ``POST /act``: the request of :mod:`openvla_ros.serve.engine`; answers the action as json-numpy, so a
  client written for OpenVLA's ``deploy.py`` works unchanged. Errors: a JSON ``{"error": ...}`` with 400
  (malformed body), 401 (no or wrong key), 413 (body too large), 422 (a field with a wrong value), 500
  (the model failed), 503 (shutting down); the server goes on serving after each.
- ``GET /health``: model, mode, device, chunk size, queue depth, requests served, p50/p95 latency.
- ``GET /metrics``: the same counters in Prometheus text format.

It binds to 127.0.0.1 unless ``--host`` says otherwise. With ``--api-key`` (or ``OPENVLA_API_KEY``) every
request needs ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``. There is no TLS: put it behind a
reverse proxy on networks you do not trust. Ctrl-C or SIGTERM stops taking connections, lets the
running batch finish and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from openvla_ros.serve.arrays import encode_array
from openvla_ros.serve.batching import Batcher, ServerClosingError, Stats
from openvla_ros.serve.engine import Engine, RequestError

logger = logging.getLogger("openvla_ros.serve")

DEFAULT_MAX_REQUEST_MB = 16.0


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def authorized(headers: Any, api_key: str | None) -> bool:
    """True when no key is set, or the request carries it (``Authorization: Bearer KEY`` or ``X-API-Key``)."""
    if not api_key:
        return True
    given = headers.get("x-api-key")
    authorization = headers.get("authorization", "")
    if given is None and authorization.lower().startswith("bearer "):
        given = authorization[len("bearer "):].strip()
    return given is not None and hmac.compare_digest(given.encode(), api_key.encode())


def metrics_text(engine: Engine, batcher: Batcher) -> str:
    """The counters of ``/health`` in Prometheus text format."""
    stats = batcher.stats
    lines = [
        "# HELP openvla_requests_total Requests answered with an action.",
        "# TYPE openvla_requests_total counter", f"openvla_requests_total {stats.requests}",
        "# HELP openvla_request_failures_total Valid requests the model failed on (500/503).",
        "# TYPE openvla_request_failures_total counter", f"openvla_request_failures_total {stats.failed}",
        "# HELP openvla_requests_refused_total Requests refused before the model (4xx).",
        "# TYPE openvla_requests_refused_total counter", f"openvla_requests_refused_total {stats.refused}",
        "# HELP openvla_batches_total Batches run.",
        "# TYPE openvla_batches_total counter", f"openvla_batches_total {stats.batches}",
        "# HELP openvla_batch_size_max The largest batch run.",
        "# TYPE openvla_batch_size_max gauge", f"openvla_batch_size_max {stats.largest_batch}",
        "# HELP openvla_batch_size_mean The mean batch size.",
        "# TYPE openvla_batch_size_mean gauge", f"openvla_batch_size_mean {stats.mean_batch():.4f}",
        "# HELP openvla_queue_depth Requests waiting for a batch.",
        "# TYPE openvla_queue_depth gauge", f"openvla_queue_depth {batcher.queue_depth}",
        "# HELP openvla_latency_seconds Request latency from arrival at the batcher to the result (last 1000).",
        "# TYPE openvla_latency_seconds summary",
    ]
    for quantile in (0.5, 0.95):
        value = stats.quantile(quantile)
        lines.append(f'openvla_latency_seconds{{quantile="{quantile}"}} {"NaN" if value is None else f"{value:.6f}"}')
    lines.append(f'openvla_model_info{{model="{engine.model_name}",mode="{engine.mode}",device="{engine.device}",'
                 f'kind="{"oft" if engine.chunked else "token"}"}} 1')
    return "\n".join(lines) + "\n"


def health(engine: Engine, batcher: Batcher) -> dict[str, Any]:
    stats = batcher.stats
    p50, p95 = stats.quantile(0.5), stats.quantile(0.95)
    return {**engine.describe(), "queue_depth": batcher.queue_depth, "requests_served": stats.requests,
            "requests_failed": stats.failed, "requests_refused": stats.refused, "batches": stats.batches,
            "largest_batch": stats.largest_batch, "mean_batch": round(stats.mean_batch(), 3),
            "max_batch": batcher.max_batch, "batch_window_ms": batcher.window_s * 1e3,
            "latency_p50_ms": None if p50 is None else p50 * 1e3, "latency_p95_ms": None if p95 is None else p95 * 1e3}


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the body is {int(declared)} bytes, the limit is {limit} (--max-request-mb): send a "
                                "smaller image or a JPEG")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the body is over the limit of {limit} bytes (--max-request-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(engine: Engine, batcher: Batcher, api_key: str | None = None,
               max_request_bytes: int = int(DEFAULT_MAX_REQUEST_MB * 1e6)) -> FastAPI:
    """Returns the FastAPI application of ``engine`` behind ``batcher``."""
    app = FastAPI(title="openvla_ros policy server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.batcher = engine, batcher

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        if not authorized(request.headers, api_key):
            batcher.stats.record_refusal()
            return _error(401, "missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")
        return await call_next(request)

    @app.post("/act")
    async def act(request: Request):
        try:
            body = await _read_body(request, max_request_bytes)
            try:
                payload = json.loads(body)
            except ValueError as exc:
                raise RequestError(400, f"the body is not JSON: {exc}") from exc
            job = await run_in_threadpool(engine.parse, payload)
        except RequestError as exc:
            batcher.stats.record_refusal()
            return _error(exc.status, exc.message)
        try:
            result = await asyncio.wrap_future(batcher.submit(job))
        except ServerClosingError as exc:
            return _error(503, f"{exc}; retry against a running server")
        except Exception as exc:  # the model's failure: this request fails, the server goes on
            logger.error("the model failed on a request: %s", exc)
            return _error(500, f"the model failed: {type(exc).__name__}: {exc}")
        encoded = encode_array(result)
        return JSONResponse(json.dumps(encoded) if job.encoded else encoded)

    @app.get("/health")
    async def get_health():
        return health(engine, batcher)

    @app.get("/metrics")
    async def get_metrics():
        return PlainTextResponse(metrics_text(engine, batcher), media_type="text/plain; version=0.0.4")

    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m openvla_ros.serve",
                                     description="Serve an OpenVLA policy over OpenVLA's REST API (/act), batched.")
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id (token or OpenVLA-OFT)")
    parser.add_argument("--quantization", default="none", choices=("none", "8bit", "4bit"))
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bfloat16, float16, float32")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--unnorm-key", default=None, help="the default statistics (requests may name others)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--api-key", default=os.environ.get("OPENVLA_API_KEY"),
                        help="require this key on every request (default: $OPENVLA_API_KEY; none)")
    parser.add_argument("--max-batch", type=int, default=8, help="most requests in one batch (default 8)")
    parser.add_argument("--batch-window-ms", type=float, default=5.0,
                        help="how long a batch waits for more requests after the first (default 5)")
    parser.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_MB,
                        help=f"largest request body in MB (default {DEFAULT_MAX_REQUEST_MB:g})")
    parser.add_argument("--cpu-threads", type=int, default=0, help="torch threads on the CPU (default: torch's)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.max_batch < 1:
        parser.error(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.batch_window_ms < 0:
        parser.error(f"--batch-window-ms must be >= 0, got {args.batch_window_ms}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0..65535, got {args.port}")
    if args.max_request_mb <= 0:
        parser.error(f"--max-request-mb must be > 0, got {args.max_request_mb}")
    logging.basicConfig(level=args.log_level.upper(), format="[%(levelname)s] %(name)s: %(message)s")
    if not _is_loopback(args.host) and not args.api_key:
        logger.warning("binding to %s without --api-key: anyone who reaches this port can drive the policy",
                       args.host)
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; choose another --port or "
              "stop what uses it", file=sys.stderr)
        return 2
    import torch

    from openvla_ros.errors import OpenVLAError
    from openvla_ros.model.oft_policy import load_policy_auto

    if args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)
    try:
        policy = load_policy_auto(args.model, quantization=args.quantization, dtype=args.dtype, device=args.device,
                                  unnorm_key=args.unnorm_key)
    except OpenVLAError as exc:
        sock.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mode = args.quantization if args.quantization != "none" else str(
        next(policy.model.parameters()).dtype).replace("torch.", "")
    engine = Engine(policy, args.model, mode)
    batcher = Batcher(engine.run, max_batch=args.max_batch, window_s=args.batch_window_ms / 1e3, stats=Stats())
    return serve(create_app(engine, batcher, args.api_key, int(args.max_request_mb * 1e6)), batcher, sock,
                 args.log_level, f"{engine.describe()['kind']} model {args.model} ({mode} on {engine.device})")


def serve(app: Any, batcher: Batcher, sock: socket.socket, log_level: str, what: str) -> int:
    """Runs uvicorn on a bound socket until Ctrl-C or SIGTERM; returns 0 after a clean stop."""
    import uvicorn

    received: list[int] = []
    # uvicorn stops gracefully on these signals and raises them again afterwards: they end up here.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda number, frame: received.append(number))
    sock.listen(128)
    host, port = sock.getsockname()[:2]
    print(f"serving {what} on http://{host}:{port}", flush=True)
    config = uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_graceful_shutdown=60,
                            access_log=log_level == "debug")
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        batcher.close()
    names = ", ".join(dict.fromkeys(signal.Signals(number).name for number in received)) or "the server stopped"
    print(f"stopped ({names}); {batcher.stats.requests} request(s) served", flush=True)
    return 0
