"""`qwenrt serve` under load: closed-loop clients, open-loop arrivals, constrained decoding, log-probabilities.

For each engine a real server runs on the demo model (its own process, as deployed).

- Closed loop: N clients each send streaming requests back to back, every answer exactly
  --max-tokens long (ignore_eos): aggregate completion tokens per second of wall time,
  first-token and inter-token latency percentiles as the clients saw them.
- Open loop: requests arrive at a fixed rate (Poisson, seeded), whether or not the
  earlier ones have finished, as users arrive: the same percentiles, and goodput (answers
  per second that met the SLO: first token within --slo-first-token, mean time between
  tokens within --slo-inter-token).
- Constrained decoding: the same request with and without a JSON schema, interleaved;
  decode tokens/s from the server's own timings (issue 18's target: at most 10 % lower).
- Log-probabilities: the same request with and without ``logprobs`` and 20 alternatives a
  token, interleaved; what they cost each engine's decode and first token.

Percentiles are compare's (qwenrt.compare.stats). The load generator is deliberately thin
(raw SSE lines over httpx, no JSON parsing but the last chunks) because it shares the
machine's cores with the server.

A second, in-process measurement compares one stream on OpenVINO's LLMPipeline (what
chat and compare use) with one stream through the continuous-batching pipeline that
the server runs: the price of batching when there is nothing to batch.

Writes bench/serve_load.json and bench/serve_load.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
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
import psutil

from qwenrt.compare.runner import environment
from qwenrt.compare.stats import percentile
from qwenrt.host import this_host
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
        """The engine's peak: qwenrt serve runs it in a child of the process started here."""
        pids = [self.process.pid, *(child.pid for child in psutil.Process(self.process.pid).children(recursive=True))]
        return max(_peak_of(pid) for pid in pids)

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return -9


def _peak_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


async def one_request(client: httpx.AsyncClient, url: str, question: str, max_tokens: int,
                      extra: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    body = {"model": "bench", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}} | (extra or {})  # fmt: skip
    sent = time.perf_counter()
    token_times: list[float] = []
    usage: dict[str, int] | None = None
    timings: dict[str, Any] = {}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if '"content":"' in line and '"content":""' not in line:
                token_times.append(time.perf_counter())
            elif '"timings"' in line:
                timings = json.loads(line[6:])["timings"]
            elif '"usage"' in line:
                usage = json.loads(line[6:])["usage"]
    done = time.perf_counter()
    if usage is None or not token_times:
        raise RuntimeError("an answer ended without its usage chunk")
    tokens = usage["completion_tokens"]
    first = token_times[0]
    return {"sent": sent, "first_token": first - sent, "done": done, "tokens": tokens,
            "inter_token": [b - a for a, b in itertools.pairwise(token_times)],
            "decode_tps": (tokens - 1) / (done - first) if tokens > 1 and done > first else 0.0,
            "server_decode_tps": timings.get("decode_tokens_per_second")}  # fmt: skip


def latency_summary(requests: list[dict[str, Any]]) -> dict[str, float]:
    """First-token and inter-token percentiles (ms), compare's percentile code."""
    first = [r["first_token"] for r in requests]
    between = [gap for r in requests for gap in r["inter_token"]]
    summary = {}
    for name, values in (("first_token_ms", first), ("inter_token_ms", between)):
        for label, share in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            summary[f"{name}_{label}"] = round(percentile(values, share) * 1000, 1)
    return summary


async def load(url: str, clients: int, requests_per_client: int, max_tokens: int) -> dict[str, Any]:
    async def client_loop(index: int, client: httpx.AsyncClient) -> list[dict[str, Any]]:
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
    return {
        "clients": clients,
        "requests": len(requests),
        "completion_tokens": tokens,
        "seconds": round(finished - started, 3),
        "aggregate_tokens_per_second": round(tokens / (finished - started), 2),
        **latency_summary(requests),
        "per_request_decode_tps_median": round(statistics.median(r["decode_tps"] for r in requests), 2),
    }


async def open_loop(url: str, rate: float, requests: int, max_tokens: int, slo_first_s: float,
                    slo_between_s: float, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Requests arriving as a Poisson process of ``rate`` per second, each sent at its time."""
    gaps = random.Random(seed).expovariate
    arrivals, at = [], 0.0
    for _ in range(requests):
        arrivals.append(at)
        at += gaps(rate)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=requests + 1)) as client:
        await one_request(client, url, QUESTIONS[0], 8)  # warm-up
        started = time.perf_counter()

        async def arrive(index: int, offset: float) -> dict[str, Any]:
            await asyncio.sleep(max(0.0, started + offset - time.perf_counter()))
            return await one_request(client, url, QUESTIONS[index % len(QUESTIONS)], max_tokens)

        results = await asyncio.gather(*(arrive(i, offset) for i, offset in enumerate(arrivals)))
        finished = time.perf_counter()
    good = [r for r in results if r["first_token"] <= slo_first_s
            and statistics.fmean(r["inter_token"] or [0.0]) <= slo_between_s]  # fmt: skip
    return {
        "rate_per_second": rate,
        "requests": requests,
        "seconds": round(finished - started, 3),
        "aggregate_tokens_per_second": round(sum(r["tokens"] for r in results) / (finished - started), 2),
        **latency_summary(results),
        "met_slo": len(good),
        "goodput_per_second": round(len(good) / (finished - started), 3),
    }


# A request whose answer is long JSON either way: free, or held to the schema.
LANGUAGES_PROMPT = ("List twenty programming languages as JSON: an object with a 'languages' array of objects, "
                    "each with a 'name' and a one-sentence 'description'.")  # fmt: skip
LANGUAGES_SCHEMA = {"type": "object", "properties": {"languages": {"type": "array", "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "description": {"type": "string"}},
    "required": ["name", "description"]}}}, "required": ["languages"]}  # fmt: skip


async def interleaved(url: str, prompt: str, variants: dict[str, dict[str, Any]], repeat: int,
                      max_tokens: int) -> dict[str, Any]:  # fmt: skip
    """One stream at a time, the variants of one request in turn, ``repeat`` rounds after a warm-up
    of each: decode tok/s from the server's timings and first token as the client saw it."""
    rates: dict[str, list[float]] = {label: [] for label in variants}
    firsts: dict[str, list[float]] = {label: [] for label in variants}
    tokens: dict[str, list[int]] = {label: [] for label in variants}
    async with httpx.AsyncClient(timeout=600) as client:
        for extra in variants.values():
            await one_request(client, url, prompt, 8, extra)  # a grammar compiled, a scorer loaded, once
        for _ in range(repeat):
            for label, extra in variants.items():
                result = await one_request(client, url, prompt, max_tokens, extra)
                rates[label].append(result["server_decode_tps"])
                firsts[label].append(result["first_token"] * 1000)
                tokens[label].append(result["tokens"])
    return {"repeat": repeat, "max_tokens": max_tokens, "decode_tps": rates, "first_token_ms": firsts,
            "tokens": tokens}  # fmt: skip


async def constrained_against_free(url: str, repeat: int, max_tokens: int) -> dict[str, Any]:
    """Decode tokens/s of one stream, with and without the schema, interleaved (server timings)."""
    constrained = {"response_format": {"type": "json_schema",
                                       "json_schema": {"name": "languages", "schema": LANGUAGES_SCHEMA}},
                   "ignore_eos": False}  # fmt: skip
    row = await interleaved(url, LANGUAGES_PROMPT, {"free": {"ignore_eos": False}, "json_schema": constrained},
                            repeat, max_tokens)  # fmt: skip
    free, held = (statistics.median(row["decode_tps"][label]) for label in ("free", "json_schema"))
    return row | {"free_decode_tps_median": round(free, 2), "json_schema_decode_tps_median": round(held, 2),
                  "cost_share": round(1 - held / free, 4)}  # fmt: skip


async def logprobs_against_plain(url: str, repeat: int, max_tokens: int) -> dict[str, Any]:
    """The same request with and without 20 log-probability alternatives a token."""
    row = await interleaved(url, LANGUAGES_PROMPT, {"plain": {}, "logprobs": {"logprobs": True, "top_logprobs": 20}},
                            repeat, max_tokens)  # fmt: skip
    medians = {label: round(statistics.median(values), 2) for label, values in row["decode_tps"].items()}
    firsts = {label: round(statistics.median(values), 1) for label, values in row["first_token_ms"].items()}
    return row | {"decode_tps_median": medians, "first_token_ms_median": firsts,
                  "decode_share": round(medians["logprobs"] / medians["plain"], 4)}  # fmt: skip


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
    parser.add_argument("--rates", default="0.25,0.5", help="open-loop arrival rates, requests per second")
    parser.add_argument("--open-requests", type=int, default=16, help="requests per open-loop rate")
    parser.add_argument("--slo-first-token", type=float, default=2.0, help="seconds")
    parser.add_argument("--slo-inter-token", type=float, default=0.1, help="seconds, mean per answer")
    parser.add_argument("--constrained-repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "serve_load.json")
    args = parser.parse_args()
    model = args.model or default_model_dir()
    threads = args.threads or physical_cores()
    clients = [int(c) for c in args.clients.split(",")]
    rates = [float(r) for r in args.rates.split(",")]
    results: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": str(model),
        "host": this_host().describe(),
        "threads": threads,
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests_per_client,
        "slo": {"first_token_s": args.slo_first_token, "inter_token_s": args.slo_inter_token},
        "environment": environment(model, ["gguf", "openvino"]),
        "servers": {},
    }
    for runtime in ("gguf", "openvino"):
        server = Server(runtime, model, threads, parallel=max(clients))
        try:
            rows, open_rows = [], []
            for count in clients:
                log(f"{runtime}: {count} client(s)")
                rows.append(asyncio.run(load(server.url, count, args.requests_per_client, args.max_tokens)))
            for rate in rates:
                log(f"{runtime}: open loop, {rate} requests/s")
                open_rows.append(asyncio.run(open_loop(server.url, rate, args.open_requests, args.max_tokens,
                                                       args.slo_first_token, args.slo_inter_token)))  # fmt: skip
            log(f"{runtime}: constrained decoding")
            constrained = asyncio.run(constrained_against_free(server.url, args.constrained_repeat, 128))
            log(f"{runtime}: log-probabilities")
            logprobs = asyncio.run(logprobs_against_plain(server.url, args.constrained_repeat, 128))
            health = server.health()
            peak = server.peak_rss()
        finally:
            exit_code = server.stop()
        results["servers"][runtime] = {"rows": rows, "open_loop": open_rows, "constrained": constrained,
                                       "logprobs": logprobs, "peak_rss_bytes": peak, "health": health,
                                       "exit_code": exit_code}  # fmt: skip
    results["single_stream"] = single_stream_pipelines(model, threads, args.max_tokens, repeat=5)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    markdown = render(results)
    args.out.with_suffix(".md").write_text(markdown)
    print(markdown)


def render(results: dict[str, Any]) -> str:
    slo = results["slo"]
    lines = [
        f"# `qwenrt serve` under load ({results['date'][:10]})",
        "",
        f"Host: {results['host']['cpu']}. Demo model, {results['threads']} threads, {results['max_tokens']} tokens "
        "per answer (ignore_eos), greedy; server and clients share the machine's cores. Latencies as the clients "
        "saw them (ms).",
        "",
        f"Closed loop ({results['requests_per_client']} streaming requests per client, back to back):",
        "",
        "| engine | clients | requests | aggregate tok/s | first token p50 / p90 / p99 "
        "| between tokens p50 / p90 / p99 | per-request decode tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for runtime, server in results["servers"].items():
        for row in server["rows"]:
            lines.append(
                f"| {runtime} | {row['clients']} | {row['requests']} | {row['aggregate_tokens_per_second']:.1f} "
                f"| {_triple(row, 'first_token_ms')} | {_triple(row, 'inter_token_ms')} "
                f"| {row['per_request_decode_tps_median']:.1f} |"
            )
    lines += ["", f"Open loop (Poisson arrivals; SLO: first token within {slo['first_token_s']:g} s and "
              f"{slo['inter_token_s'] * 1000:.0f} ms between tokens on average):", "",
              "| engine | requests/s | requests | aggregate tok/s | first token p50 / p90 / p99 "
              "| between tokens p50 / p90 / p99 | met the SLO | goodput (answers/s) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for runtime, server in results["servers"].items():
        for row in server["open_loop"]:
            lines.append(
                f"| {runtime} | {row['rate_per_second']:g} | {row['requests']} "
                f"| {row['aggregate_tokens_per_second']:.1f} "
                f"| {_triple(row, 'first_token_ms')} | {_triple(row, 'inter_token_ms')} "
                f"| {row['met_slo']} / {row['requests']} | {row['goodput_per_second']:.3f} |"
            )
    lines += ["", "Constrained decoding (one stream, the same request with and without a JSON schema, interleaved; "
              "decode tok/s from the server's timings, medians):", "",
              "| engine | free | JSON schema | cost |", "|---|---:|---:|---:|"]  # fmt: skip
    for runtime, server in results["servers"].items():
        row = server["constrained"]
        lines.append(f"| {runtime} | {row['free_decode_tps_median']:.1f} | {row['json_schema_decode_tps_median']:.1f} "
                     f"| {row['cost_share'] * 100:+.1f} % |")  # fmt: skip
    lines += ["", "Log-probabilities (one stream, the same request with and without `logprobs` and 20 alternatives a "
              "token, interleaved; medians):", "",
              "| engine | decode tok/s without | with | with / without | first token without / with (ms) |",
              "|---|---:|---:|---:|---:|"]  # fmt: skip
    for runtime, server in results["servers"].items():
        row = server["logprobs"]
        rates, firsts = row["decode_tps_median"], row["first_token_ms_median"]
        lines.append(f"| {runtime} | {rates['plain']:.1f} | {rates['logprobs']:.1f} | {row['decode_share']:.2f} "
                     f"| {firsts['plain']:.0f} / {firsts['logprobs']:.0f} |")  # fmt: skip
    lines += ["", "Server peak RSS: OpenVINO's includes the log-probability scorer (a second copy of the weights).", "",
              "| engine | server peak RSS (MB) | peak generations at once | exit code on SIGTERM |",
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


def _triple(row: dict[str, Any], name: str) -> str:
    return " / ".join(f"{row[f'{name}_{label}']:.0f}" for label in ("p50", "p90", "p99"))


if __name__ == "__main__":
    main()
