"""A bounded loopback load test: our server with speculation on, with speculation off,
and ``mlx_lm.server`` on the same model folder, at 1, 2, 4 and 8 concurrent clients, in
one run.

Each server runs as its own process on a free port of 127.0.0.1 (one at a time, so
they never compete for the CPU), with the optimized BLAS set up the same way for all
(mlx_lm.server is started after ``import mlx_specstream``).  After one warm-up request,
every level serves the same ``--prompts`` chat requests (temperature 0, ``--max-tokens``)
shared by its clients, started at once (client i sends requests i, i + clients, ...);
no client starts a request after ``--level-timeout`` seconds.  The 1-client level
serves each request alone: the reference.  Per server and level: aggregate completion
tokens/s (wall time of the level) and its ratio to 1 client, per-request latency
(median, worst), the worst ratio of a request's latency to its latency alone, and
whether every output equals its output alone.  Prints a table and writes
results/load_test.{json,md,png}.

    python benchmarks/load_test.py [--model PATH] [--clients 1 2 4 8] [--prompts 8]
        [--max-tokens 32] [--servers ours ours-ar mlx-lm]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_specstream.files import atomic_write, atomic_write_text

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
RESULTS = Path(__file__).resolve().parent / "results"
SERVERS = {
    "ours": "mlx-specstream serve (speculation on)",
    "ours-ar": "mlx-specstream serve --no-speculative",
    "mlx-lm": "mlx_lm.server",
}


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
    body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0}  # the served model
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(name: str, model: str, port: int) -> list[str]:
    if name == "mlx-lm":
        launch = ("import sys, runpy, mlx_specstream; sys.argv = ['mlx_lm.server'] + "
                  "sys.argv[1:]; runpy.run_module('mlx_lm.server', run_name='__main__')")
        return [sys.executable, "-c", launch, "--model", model, "--port", str(port),
                "--log-level", "WARNING"]
    cmd = [sys.executable, "-m", "mlx_specstream.cli", "serve", "--model", model,
           "--port", str(port), "--quiet"]
    return cmd + (["--no-speculative"] if name == "ours-ar" else [])


def wait_ready(proc: subprocess.Popen, port: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the server did not answer within {timeout} s")


def run_level(port: int, clients: int, prompts: list[str], max_tokens: int, timeout: float,
              level_timeout: float) -> tuple[list[Result], float]:
    """``clients`` clients share ``prompts`` (client i sends prompts i, i + clients, ...
    one after the other, every other one streamed); none starts a request after
    ``level_timeout`` seconds.  Returns the results and the wall time."""
    results: list[Result] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)
    stop_at: list[float] = []

    def client(i: int) -> None:
        barrier.wait()
        for k in range(i, len(prompts), clients):
            if k > i and time.perf_counter() > stop_at[0]:
                return
            r = request(port, prompts[k], max_tokens, stream=k % 2 == 1, chat=True,
                        timeout=timeout)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    tic = time.perf_counter()
    stop_at.append(tic + level_timeout)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - tic


def measure_server(name: str, model: str, levels: list[int], args) -> list[dict[str, Any]]:
    """The levels in order; the first (1 client) serves each prompt alone: its outputs
    and latencies are the reference of the others."""
    port = free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(server_command(name, model, port), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    rows: list[dict[str, Any]] = []
    try:
        wait_ready(proc, port, args.start_timeout)
        request(port, PROMPTS[0], 8, False, True, args.timeout)  # warm-up (compiles)
        alone: dict[str, Result] = {}
        base_tps = None
        for clients in levels:
            results, wall = run_level(port, clients, prompts, args.max_tokens, args.timeout,
                                      args.level_timeout)
            ok = [r for r in results if r.error is None]
            if not alone:
                alone = {r.prompt: r for r in ok}
            lat = [r.latency_s for r in ok]
            slow = [r.latency_s / alone[r.prompt].latency_s for r in ok if r.prompt in alone]
            same = [r.text == alone[r.prompt].text for r in ok if r.prompt in alone]
            tokens = sum(r.completion_tokens for r in ok)
            tps = tokens / wall
            base_tps = base_tps or tps
            row = {
                "server": name, "clients": clients, "requests": len(results),
                "failures": len(results) - len(ok), "wall_s": round(wall, 2),
                "tokens": tokens, "tokens_per_s": round(tps, 2),
                "throughput_over_1_client": round(tps / base_tps, 2),
                "latency_median_s": round(statistics.median(lat), 2) if lat else None,
                "latency_worst_s": round(max(lat), 2) if lat else None,
                "worst_latency_over_alone": round(max(slow), 2) if slow else None,
                "tokens_per_pass": round(statistics.fmean(r.tokens_per_pass for r in ok), 3)
                if ok else None,
                "outputs_equal_alone": all(same) if same else None,
                "errors": sorted({r.error for r in results if r.error})[:3],
            }
            rows.append(row)
            print(f"  {name:8s} {clients} client(s): {row['tokens_per_s']} tokens/s "
                  f"(x{row['throughput_over_1_client']}), latency median "
                  f"{row['latency_median_s']} s, worst {row['latency_worst_s']} s "
                  f"(x{row['worst_latency_over_alone']} alone), failures {row['failures']}",
                  flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return rows


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = ["server", "clients", "requests", "tokens/s", "x 1 client", "latency median s",
            "latency worst s", "worst / alone", "tokens/pass", "= alone"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [SERVERS[r["server"]], r["clients"], f"{r['requests']} ({r['failures']} failed)",
                 r["tokens_per_s"], r["throughput_over_1_client"], r["latency_median_s"],
                 r["latency_worst_s"], r["worst_latency_over_alone"], r["tokens_per_pass"] or "-",
                 {True: "yes", False: "NO", None: "-"}[r["outputs_equal_alone"]]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return (f"Load test: {meta['model']}; the same {meta['prompts']} chat requests "
            f"(temperature 0, {meta['max_tokens']} max tokens) at every level, shared by the "
            f"clients; 1 client = each request alone; {meta['machine']}.\n\n"
            + "\n".join(lines) + "\n")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name in SERVERS:
        rs = [r for r in rows if r["server"] == name]
        if not rs:
            continue
        xs = [r["clients"] for r in rs]
        a.plot(xs, [r["tokens_per_s"] for r in rs], marker="o", label=SERVERS[name])
        b.plot(xs, [r["latency_median_s"] for r in rs], marker="o", label=SERVERS[name])
    a.set(xlabel="concurrent clients", ylabel="aggregate tokens/s", xscale="log", xticks=xs)
    b.set(xlabel="concurrent clients", ylabel="median request latency (s)", xscale="log",
          xticks=xs)
    for ax in (a, b):
        ax.minorticks_off()
        ax.set_xticklabels([str(x) for x in xs])
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the default model)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="concurrency levels (default 1 2 4 8; the first is the reference)")
    p.add_argument("--prompts", type=int, default=8,
                   help="requests per level, shared by its clients (default 8)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request")
    p.add_argument("--servers", nargs="+", default=list(SERVERS), choices=list(SERVERS))
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--level-timeout", type=float, default=120.0,
                   help="seconds after which a level's clients start no new request")
    p.add_argument("--start-timeout", type=float, default=180.0, help="seconds to start")
    p.add_argument("--out", default=str(RESULTS / "load_test"),
                   help="output path without extension (.json, .md, .png are written)")
    args = p.parse_args(argv)
    if args.model is None:
        import mlx_specstream  # noqa: F401  (BLAS set-up before mlx.core is imported)
        from mlx_specstream.default_model import default_model_path

        args.model = str(default_model_path())
    rows: list[dict[str, Any]] = []
    for name in args.servers:
        print(f"{SERVERS[name]}:", flush=True)
        try:
            rows += measure_server(name, args.model, args.clients, args)
        except RuntimeError as e:
            print(f"  {name} failed: {e}", file=sys.stderr)
    meta = {"model": Path(args.model).name, "max_tokens": args.max_tokens, "prompts": args.prompts,
            "clients": args.clients, "machine": f"{os.cpu_count()} CPU cores"}
    table = markdown(rows, meta)
    print()
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps({**meta, "rows": rows}, indent=2))
    atomic_write_text(out.with_suffix(".md"), table)
    plot(rows, out.with_suffix(".png"))
    bad = [r for r in rows if r["failures"] or r["outputs_equal_alone"] is False]
    return 1 if bad and any(r["server"] != "mlx-lm" for r in bad) else 0


if __name__ == "__main__":
    sys.exit(main())
