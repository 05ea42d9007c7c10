"""A bounded loopback load test of the OpenAI-compatible server.

Starts ``mlx_specstream.server`` in this process on 127.0.0.1 (a free port), measures
each prompt once with a single client (the reference outputs), then runs
``--clients`` concurrent clients doing ``--requests`` requests each (alternating
plain and streamed requests, temperature 0), and prints requests/s, p50/p95 latency,
time to first token of the streamed requests, failures, and whether every
concurrent output equals the single-client output.  It stops by itself; the exit
status is 0 when nothing failed and every output matched.

    python benchmarks/load_test.py [--model PATH] [--clients 8] [--requests 5]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any

import mlx_specstream  # noqa: F401  (BLAS set-up before mlx.core is imported)
from mlx_specstream import load
from mlx_specstream.files import atomic_write_text
from mlx_specstream.server import make_server

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Explain photosynthesis in two sentences.",
    "List three uses of a paperclip.",
    "Translate 'good morning' into Spanish and German.",
    "What is 17 times 23?",
    "Write a haiku about autumn.",
    "Give me a SQL query that counts rows per day.",
]


@dataclass
class Result:
    prompt: str
    text: str | None
    latency_s: float
    ttft_s: float | None
    completion_tokens: int
    tokens_per_pass: float
    error: str | None = None


def request(
    port: int, prompt: str, max_tokens: int, stream: bool, chat: bool, timeout: float
) -> Result:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict[str, Any] = {"model": "default", "max_tokens": max_tokens, "temperature": 0}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream:
        body["stream"] = True
    tic = time.perf_counter()
    ttft = None
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return Result(
                prompt,
                None,
                time.perf_counter() - tic,
                None,
                0,
                0.0,
                f"HTTP {resp.status}: {resp.read()[:200]!r}",
            )
        if not stream:
            obj = json.loads(resp.read())
            c = obj["choices"][0]
            text = c["message"]["content"] if chat else c["text"]
            usage = obj["usage"]
        else:
            parts, usage = [], None
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    raise RuntimeError(obj["error"]["message"])
                if obj.get("usage"):
                    usage = obj["usage"]
                for c in obj["choices"]:
                    piece = c["delta"].get("content") if chat else c.get("text")
                    if piece:
                        if ttft is None:
                            ttft = time.perf_counter() - tic
                        parts.append(piece)
            text = "".join(parts)
            if usage is None:
                raise RuntimeError("the stream ended without usage / [DONE]")
        return Result(
            prompt,
            text,
            time.perf_counter() - tic,
            ttft,
            usage["completion_tokens"],
            usage.get("tokens_per_pass", 0.0),
        )
    except Exception as e:  # counted as a failure
        return Result(
            prompt, None, time.perf_counter() - tic, ttft, 0, 0.0, f"{type(e).__name__}: {e}"
        )
    finally:
        conn.close()


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the default model)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--requests", type=int, default=5, help="requests per client (default 5)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request")
    p.add_argument(
        "--completions",
        action="store_true",
        help="use /v1/completions with raw prompts instead of chat",
    )
    p.add_argument("--no-speculative", action="store_true", help="serve autoregressively")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--json", default=None, help="also write the summary here")
    args = p.parse_args(argv)
    chat = not args.completions

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tokenizer = load(args.model)
    decode = {"speculative": not args.no_speculative}
    server = make_server(model, tokenizer, "default", "127.0.0.1", 0, decode_kwargs=decode)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        prompts = PROMPTS[: max(1, min(len(PROMPTS), args.clients * args.requests))]
        # 1. one client, one request per prompt: the reference outputs and latencies
        single = {
            pr: request(port, pr, args.max_tokens, stream=False, chat=chat, timeout=args.timeout)
            for pr in prompts
        }
        bad = [r for r in single.values() if r.error]
        if bad:
            print(f"single-client requests failed: {bad[0].error}", file=sys.stderr)
            return 1
        # 2. concurrent clients
        results: list[Result] = []
        lock = threading.Lock()
        barrier = threading.Barrier(args.clients)

        def client(i: int) -> None:
            barrier.wait()
            for j in range(args.requests):
                pr = prompts[(i * args.requests + j) % len(prompts)]
                r = request(
                    port,
                    pr,
                    args.max_tokens,
                    stream=(i + j) % 2 == 1,
                    chat=chat,
                    timeout=args.timeout,
                )
                with lock:
                    results.append(r)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        tic = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - tic
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)

    ok = [r for r in results if r.error is None]
    failures = [r for r in results if r.error is not None]
    mismatches = [r for r in ok if r.text != single[r.prompt].text]
    lat = [r.latency_s for r in ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tokens = sum(r.completion_tokens for r in ok)
    single_lat = [r.latency_s for r in single.values()]
    summary = {
        "clients": args.clients,
        "requests": len(results),
        "failures": len(failures),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(ok) / wall, 3),
        "completion_tokens_per_s": round(tokens / wall, 2),
        "latency_p50_s": round(percentile(lat, 0.5), 3),
        "latency_p95_s": round(percentile(lat, 0.95), 3),
        "ttft_p50_s": round(percentile(ttft, 0.5), 3) if ttft else None,
        "single_client_latency_p50_s": round(statistics.median(single_lat), 3),
        "tokens_per_pass_mean": round(statistics.fmean(r.tokens_per_pass for r in ok), 3)
        if ok
        else None,
        "outputs_equal_single_client": not mismatches and not failures,
        "mismatches": len(mismatches),
    }
    print(
        f"{summary['requests']} requests from {args.clients} clients in {wall:.2f} s "
        f"({args.max_tokens} max tokens, {'chat' if chat else 'completions'})"
    )
    print(f"  requests/s        {summary['requests_per_s']}")
    print(f"  tokens/s          {summary['completion_tokens_per_s']} (completion, all clients)")
    print(
        f"  latency p50/p95   {summary['latency_p50_s']} / {summary['latency_p95_s']} s "
        f"(single client p50 {summary['single_client_latency_p50_s']} s)"
    )
    print(f"  TTFT p50 (stream) {summary['ttft_p50_s']} s")
    print(f"  tokens per pass   {summary['tokens_per_pass_mean']}")
    print(f"  failures          {len(failures)}")
    for r in failures[:5]:
        print(f"    {r.error}")
    print(
        f"  outputs equal single-client outputs (temp 0): "
        f"{'yes' if summary['outputs_equal_single_client'] else 'NO'}"
        + (f" ({len(mismatches)} differ)" if mismatches else "")
    )
    if args.json:
        atomic_write_text(args.json, json.dumps(summary, indent=2))
    return 0 if summary["outputs_equal_single_client"] else 1


if __name__ == "__main__":
    sys.exit(main())
