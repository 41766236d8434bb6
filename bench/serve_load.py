"""`qwenrt serve` under load: aggregate tokens/s at 1, 2 and 4 concurrent clients.

For each engine a real server runs on the demo model (its own process, as deployed);
N clients each send streaming requests back to back, every answer exactly
--max-tokens long (ignore_eos), and the run records the aggregate completion tokens
per second of wall time, each request's first-token latency as its client saw it, and
the server's peak memory. The load generator is deliberately thin (raw SSE lines over
httpx, no JSON parsing but the last chunks) because it shares the machine's cores with
the server.

A second, in-process measurement compares one stream on OpenVINO's LLMPipeline (what
chat and compare use) with one stream through the continuous-batching pipeline that
the server runs: the price of batching when there is nothing to batch.

Writes bench/serve_load.json and bench/serve_load.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from qwenrt.compare.runner import environment
from qwenrt.paths import default_model_dir
from qwenrt.runtimes import EngineOptions, GenerationConfig, StreamEnd, open_engine
from qwenrt.runtimes.threads import physical_cores

HERE = Path(__file__).parent
QUESTIONS = [
    "Explain in three sentences why the sky is blue.",
    "Write a Python function that checks whether a number is prime.",
    "List five uses of a Raspberry Pi in a small workshop.",
    "What is the difference between a process and a thread?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Give three tips for writing clear commit messages.",
    "How does a hash table handle collisions?",
    "Translate 'good morning, how are you?' into French and German.",
]
ANNOUNCE = re.compile(r"serving .* on (http://\S+)/v1")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Server:
    """`qwenrt serve` in its own process, as a user runs it."""

    def __init__(self, runtime: str, model: Path, threads: int, parallel: int) -> None:
        command = [sys.executable, "-m", "qwenrt.cli", "serve", "--runtime", runtime, "--model", str(model),
                   "--port", "0", "--threads", str(threads), "--parallel", str(parallel), "--no-access-log",
                   "--no-prefix-cache"]  # fmt: skip
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        self.url = self._wait_for_announce()

    def _wait_for_announce(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        assert self.process.stderr is not None
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line and self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}")
            if match := ANNOUNCE.search(line):
                return match.group(1)
        raise RuntimeError("the server did not start")

    def peak_rss(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return -9


async def one_request(client: httpx.AsyncClient, url: str, question: str, max_tokens: int) -> dict[str, float]:
    body = {"model": "bench", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    sent = time.perf_counter()
    first: float | None = None
    usage: dict[str, int] | None = None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if first is None and '"content":"' in line and '"content":""' not in line:
                first = time.perf_counter()
            elif '"usage"' in line:
                usage = json.loads(line[6:])["usage"]
    done = time.perf_counter()
    if usage is None or first is None:
        raise RuntimeError("an answer ended without its usage chunk")
    tokens = usage["completion_tokens"]
    return {"sent": sent, "first_token": first - sent, "done": done, "tokens": tokens,
            "decode_tps": (tokens - 1) / (done - first) if tokens > 1 and done > first else 0.0}  # fmt: skip


async def load(url: str, clients: int, requests_per_client: int, max_tokens: int) -> dict[str, Any]:
    async def client_loop(index: int, client: httpx.AsyncClient) -> list[dict[str, float]]:
        results = []
        for round_ in range(requests_per_client):
            question = QUESTIONS[(index + round_ * clients) % len(QUESTIONS)]
            results.append(await one_request(client, url, question, max_tokens))
        return results

    limits = httpx.Limits(max_connections=clients + 1)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_request(client, url, QUESTIONS[0], 8)  # warm-up
        started = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
        finished = time.perf_counter()
    requests = [r for results in per_client for r in results]
    tokens = sum(r["tokens"] for r in requests)
    ttfts = sorted(r["first_token"] for r in requests)
    return {
        "clients": clients,
        "requests": len(requests),
        "completion_tokens": tokens,
        "seconds": round(finished - started, 3),
        "aggregate_tokens_per_second": round(tokens / (finished - started), 2),
        "first_token_ms_median": round(statistics.median(ttfts) * 1000, 1),
        "first_token_ms_p90": round(ttfts[math.ceil(0.9 * len(ttfts)) - 1] * 1000, 1),  # nearest rank
        "per_request_decode_tps_median": round(statistics.median(r["decode_tps"] for r in requests), 2),
    }


def single_stream_pipelines(model: Path, threads: int, tokens: int, repeat: int) -> dict[str, Any]:
    """One stream at a time on LLMPipeline (parallel=1) and on the continuous-batching pipeline."""
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    config = GenerationConfig(max_tokens=tokens, ignore_eos=True)
    results: dict[str, Any] = {}
    for label, parallel in (("LLMPipeline", 1), ("ContinuousBatchingPipeline", 4)):
        log(f"single stream: {label}")
        with open_engine("openvino", model, EngineOptions(threads=threads, prefix_cache=False, parallel=parallel)) as e:
            ids = e.chat_prompt_ids(messages)
            ends: list[StreamEnd] = []
            for index in range(repeat + 1):
                end = [ev for ev in e.stream(ids, config) if isinstance(ev, StreamEnd)][0]
                if index:  # the first is the warm-up
                    ends.append(end)
        results[label] = {
            "first_token_ms": round(statistics.median(end.first_token_latency for end in ends) * 1000, 1),
            "decode_tokens_per_second": round(statistics.median(end.decode_tokens_per_second for end in ends), 2),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None, help="default: one per physical core")
    parser.add_argument("--clients", default="1,2,4")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=HERE / "serve_load.json")
    args = parser.parse_args()
    model = args.model or default_model_dir()
    threads = args.threads or physical_cores()
    clients = [int(c) for c in args.clients.split(",")]
    results: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": str(model),
        "threads": threads,
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests_per_client,
        "environment": environment(model, ["gguf", "openvino"]),
        "servers": {},
    }
    for runtime in ("gguf", "openvino"):
        server = Server(runtime, model, threads, parallel=max(clients))
        try:
            rows = []
            for count in clients:
                log(f"{runtime}: {count} client(s)")
                rows.append(asyncio.run(load(server.url, count, args.requests_per_client, args.max_tokens)))
            health = server.health()
            peak = server.peak_rss()
        finally:
            exit_code = server.stop()
        results["servers"][runtime] = {"rows": rows, "peak_rss_bytes": peak, "health": health, "exit_code": exit_code}
    results["single_stream"] = single_stream_pipelines(model, threads, args.max_tokens, repeat=5)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    markdown = render(results)
    args.out.with_suffix(".md").write_text(markdown)
    print(markdown)


def render(results: dict[str, Any]) -> str:
    lines = [
        f"# `qwenrt serve` under load ({results['date'][:10]})",
        "",
        f"Demo model, {results['threads']} threads, {results['max_tokens']} tokens per answer (ignore_eos), "
        f"{results['requests_per_client']} streaming requests per client, greedy; server and clients share the "
        "machine's cores.",
        "",
        "| engine | clients | requests | aggregate tok/s | first token median (ms) | first token p90 (ms) "
        "| per-request decode tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for runtime, server in results["servers"].items():
        for row in server["rows"]:
            lines.append(
                f"| {runtime} | {row['clients']} | {row['requests']} | {row['aggregate_tokens_per_second']:.1f} "
                f"| {row['first_token_ms_median']:.0f} | {row['first_token_ms_p90']:.0f} "
                f"| {row['per_request_decode_tps_median']:.1f} |"
            )
    lines += ["", "| engine | server peak RSS (MB) | peak generations at once | exit code on SIGTERM |",
              "|---|---:|---:|---:|"]  # fmt: skip
    for runtime, server in results["servers"].items():
        lines.append(
            f"| {runtime} | {server['peak_rss_bytes'] / 1e6:.0f} | {server['health']['peak_active']} "
            f"| {server['exit_code']} |"
        )
    lines += ["", "One stream, in process, OpenVINO:", "", "| pipeline | first token (ms) | decode tok/s |",
              "|---|---:|---:|"]  # fmt: skip
    for label, row in results["single_stream"].items():
        lines.append(f"| {label} | {row['first_token_ms']:.1f} | {row['decode_tokens_per_second']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
