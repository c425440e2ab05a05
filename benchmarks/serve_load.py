"""Load benchmark for ``loratune serve``: throughput and latency with and without dynamic batching.

For each scenario the script starts ``loratune serve`` on 127.0.0.1 in a subprocess, sends
``--requests`` single-text ``POST /v1/summarize`` requests from ``--concurrency`` clients, and
reports requests/s, p50/p95 latency, failures, and the mean number of prompts per
``generate()`` call (read from ``/health``). The batching scenario then sends one request from
each of ``--burst`` clients at once and counts failures.

Every scenario is bounded: clients start no new request after ``--max-seconds``, and each
request times out after ``--max-seconds``. Traffic goes to 127.0.0.1 only.

    python benchmarks/serve_load.py --data path/to/samsum/test.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from loratune.data.loading import DEMO_DIR, read_rows

HOST = "127.0.0.1"


@dataclass
class LoadResult:
    name: str
    requests: int
    failed: int
    concurrency: int
    seconds: float
    latencies: list[float]
    prompts_per_batch: float

    def row(self) -> str:
        ok = sorted(self.latencies)
        p50 = 1000 * statistics.median(ok) if ok else float("nan")
        p95 = 1000 * ok[min(len(ok) - 1, int(0.95 * len(ok)))] if ok else float("nan")
        rate = len(ok) / self.seconds if self.seconds else 0.0
        return (f"| {self.name} | {self.concurrency} | {self.requests} | {self.failed} | {self.seconds:.1f} | "
                f"{rate:.2f} | {p50:.0f} | {p95:.0f} | {self.prompts_per_batch:.1f} |")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace, port: int, max_batch_size: int) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "loratune.cli.main", "serve", args.target,
        f"generation.max_new_tokens={args.max_new_tokens}",
        "--host", HOST, "--port", str(port),
        "--max-batch-size", str(max_batch_size), "--batch-wait-ms", str(args.batch_wait_ms),
        "--max-queue", str(max(1024, 2 * args.burst)),
    ]
    env = dict(os.environ)
    if args.server_threads:
        env["OMP_NUM_THREADS"] = str(args.server_threads)  # torch reads it at import for its thread pool
    with open(args.log_dir / f"serve-batch{max_batch_size}.log", "w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}; see its log")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the server at {url} was not ready after {timeout_s} s")


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def run_load(url: str, texts: list[str], count: int, concurrency: int, max_seconds: float) -> tuple[list[float], int, float]:
    """Send ``count`` requests from ``concurrency`` clients; return latencies, failures and wall time."""
    next_index = 0
    latencies: list[float] = []
    failures = 0
    started = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal next_index, failures
        while next_index < count and time.perf_counter() - started < max_seconds:
            text = texts[next_index % len(texts)]
            next_index += 1
            sent = time.perf_counter()
            try:
                response = await http.post(f"{url}/v1/summarize", json={"text": text})
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - sent)
            else:
                failures += 1

    async with httpx.AsyncClient(timeout=max_seconds, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return latencies, failures, time.perf_counter() - started


def batch_stats(url: str) -> tuple[int, int]:
    health = httpx.get(f"{url}/health", timeout=10).json()
    return health["prompts_run"], health["batches_run"]


def measure(name: str, url: str, texts: list[str], count: int, concurrency: int, max_seconds: float) -> LoadResult:
    prompts_before, batches_before = batch_stats(url)
    latencies, failures, seconds = asyncio.run(run_load(url, texts, count, concurrency, max_seconds))
    prompts_after, batches_after = batch_stats(url)
    batches = batches_after - batches_before
    per_batch = (prompts_after - prompts_before) / batches if batches else 0.0
    return LoadResult(name, len(latencies) + failures, failures, concurrency, seconds, latencies, per_batch)


def run_scenario(args: argparse.Namespace, texts: list[str], max_batch_size: int) -> list[LoadResult]:
    port = free_port()
    url = f"http://{HOST}:{port}"
    process = start_server(args, port, max_batch_size)
    try:
        wait_ready(url, process)
        httpx.post(f"{url}/v1/summarize", json={"text": texts[0]}, timeout=args.max_seconds)  # warm-up
        label = f"batching (max {max_batch_size}, wait {args.batch_wait_ms:g} ms)" if max_batch_size > 1 else "no batching"
        results = [measure(label, url, texts, args.requests, args.concurrency, args.max_seconds)]
        if max_batch_size > 1 and args.burst:
            results.append(measure(f"{label}, burst", url, texts, args.burst, args.burst, args.max_seconds))
        return results
    finally:
        stop_server(process)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="embedded:smollm2-135m-instruct", help="run folder, merged folder or base model")
    parser.add_argument("--data", type=Path, default=DEMO_DIR / "test.jsonl",
                        help="JSONL/CSV/Parquet file whose 'dialogue' column supplies the texts (default: demo test set)")
    parser.add_argument("--requests", type=int, default=64, help="requests per scenario (default: 64)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients per scenario (default: 16)")
    parser.add_argument("--burst", type=int, default=200, help="clients sending one request each at once; 0 skips it (default: 200)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per summary (default: 32)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="server --max-batch-size with batching (default: 8)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0, help="server --batch-wait-ms (default: 10)")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="time bound per scenario and per request (default: 600)")
    parser.add_argument("--server-threads", type=int, default=0,
                        help="torch CPU threads of the server (OMP_NUM_THREADS); 0 keeps torch's default")
    parser.add_argument("--log-dir", type=Path, default=Path("runs/bench-serve"), help="server logs (default: runs/bench-serve)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    texts = [row["dialogue"] for row in read_rows(args.data) if row.get("dialogue")]
    print(f"target {args.target}; {len(texts)} texts from {args.data}; max_new_tokens {args.max_new_tokens}; "
          f"server threads {args.server_threads or 'default'}; {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()})", flush=True)

    results = run_scenario(args, texts, args.max_batch_size) + run_scenario(args, texts, 1)
    print("| scenario | clients | requests | failed | seconds | requests/s | p50 ms | p95 ms | prompts per batch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for result in results:
        print(result.row())
    return 1 if any(result.failed for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
