"""An OpenAI-compatible HTTP server: ``mlx-specstream serve [--model PATH] [--port 8080]``.

Routes: POST /v1/chat/completions and /v1/completions (streamed as server-sent
events when ``stream`` is true), GET /v1/models, /v1/models/{id} and /health.  The
``/v1`` prefix is optional.  ``usage`` carries prompt_tokens, completion_tokens and
total_tokens plus the speculative statistics forward_passes, tokens_per_pass,
accepted_per_depth and lookup_accepted.

Only the standard library is used (``http.server.ThreadingHTTPServer``).  Every
request is parsed and validated on its own connection thread; the generation itself
runs on one worker thread that serves every request in one continuous batch
(``batching.BatchDecoder``): requests join the running batch between steps (a new
prompt is prefilled one chunk per step, so the others keep decoding) and leave it when
they end; one forward pass verifies and drafts for all of them.  ``n`` > 1 runs as
that many sequences of the batch.  A client that disconnects (checked between tokens,
and while its job waits) has its sequences dropped from the batch; a request that
fails validation never reaches it, so neither disturbs the others.  ``usage`` adds
per-request tokens_per_second and acceptance (per depth), also logged per request.

Sampling parameters (temperature, top_p, top_k, min_p, repetition_penalty,
repetition_context_size, seed) are passed on to ``stream_generate`` (a build that
cannot sample answers temperature > 0 with a 400).  Without ``temperature`` the
decoding is greedy, as in mlx-lm (OpenAI's default would be 1).  A request whose
``max_tokens`` exceeds the context, or whose prompt does not fit, gets a 400 before
anything is streamed; a generation that reaches the end of the context stops with
finish_reason "length".

In-process use (tests, benchmarks)::

    server = make_server(model, tokenizer, "my-model", "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    ...
    server.shutdown(); server.server_close()
"""

from __future__ import annotations

import argparse
import itertools
import json
import queue
import select
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import mlx_specstream  # noqa: F401  (BLAS set-up before mlx.core is imported)

import mlx.core as mx

from .batching import BatchDecoder, BatchEvent, TextStream, add_with_options
from .generate import GenerationResponse, _encode, load, stream_generate
from .generate_cli import (
    add_decoding_arguments,
    add_model_argument,
    chat_prompt_ids,
    decoding_kwargs,
    is_greedy,
    sampling_kwargs,
)

DEFAULT_MAX_TOKENS = 512
MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_STOP_STRINGS = 16
MAX_CHOICES = 8  # n: sequences of one request
PREFILL_CHUNK = 256  # prompt tokens prefilled per batch step (the others wait that long)
POLL_S = 0.05  # how often a waiting connection thread checks its client

StreamFn = Callable[..., Iterator[GenerationResponse]]


class ApiError(Exception):
    """A request error, sent as OpenAI's error object with the given HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# ------------------------------------------------------------------ request parsing


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _opt_number(body: dict[str, Any], name: str, lo: float, hi: float) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_number(v):
        raise ApiError(400, f"'{name}' must be a number, got {json.dumps(v)}", name, "invalid_type")
    if not lo <= v <= hi:
        raise ApiError(400, f"'{name}' must be in [{lo}, {hi}], got {v}", name, "invalid_value")
    return float(v)


def _opt_int(body: dict[str, Any], name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v):
        raise ApiError(
            400, f"'{name}' must be an integer, got {json.dumps(v)}", name, "invalid_type"
        )
    return int(v)


def _opt_bool(body: dict[str, Any], name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(
            400, f"'{name}' must be a boolean, got {json.dumps(v)}", name, "invalid_type"
        )
    return v


def _message_text(content: Any, i: int) -> str:
    param = f"messages[{i}].content"
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ApiError(400, "only text content parts are supported", param, "invalid_value")
            text = part.get("text")
            if not isinstance(text, str):
                raise ApiError(400, "a text content part needs a string 'text'", param)
            parts.append(text)
        return "".join(parts)
    raise ApiError(400, f"'{param}' must be a string or a list of parts", param, "invalid_type")


_ROLES = {"system", "developer", "user", "assistant", "tool"}


def parse_messages(v: Any) -> list[dict[str, str]]:
    if v is None:
        raise ApiError(400, "'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(v, list):
        raise ApiError(400, "'messages' must be an array", "messages", "invalid_type")
    if not v:
        raise ApiError(400, "'messages' must not be empty", "messages", "invalid_value")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise ApiError(
                400, f"'messages[{i}]' must be an object", f"messages[{i}]", "invalid_type"
            )
        role = m.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise ApiError(
                400,
                f"'messages[{i}].role' must be one of {sorted(_ROLES)}, got {json.dumps(role)}",
                f"messages[{i}].role",
                "invalid_value",
            )
        if "content" not in m and role != "assistant":
            raise ApiError(
                400,
                f"'messages[{i}].content' is required",
                f"messages[{i}].content",
                "missing_required_parameter",
            )
        role = "system" if role == "developer" else role
        out.append({"role": role, "content": _message_text(m.get("content"), i)})
    return out


def parse_prompt(v: Any) -> str | list[int]:
    """A completion prompt: a string, a list of token ids, or a one-element list of either."""
    if v is None:
        raise ApiError(400, "'prompt' is required", "prompt", "missing_required_parameter")
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
        v = v[0]
    if isinstance(v, str):
        if not v:
            raise ApiError(400, "'prompt' must not be empty", "prompt", "invalid_value")
        return v
    if isinstance(v, list) and v and all(_is_int(t) for t in v):
        return [int(t) for t in v]
    if isinstance(v, list) and len(v) > 1:
        raise ApiError(400, "only one prompt per request is supported", "prompt", "invalid_value")
    raise ApiError(
        400, "'prompt' must be a string or an array of token ids", "prompt", "invalid_type"
    )


def parse_stop(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if v else []
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        if len(v) > MAX_STOP_STRINGS:
            raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings", "stop", "invalid_value")
        return [s for s in v if s]
    raise ApiError(400, "'stop' must be a string or an array of strings", "stop", "invalid_type")


@dataclass
class CompletionRequest:
    """A validated request: what to generate and how to answer."""

    chat: bool
    messages: list[dict[str, str]] | None
    prompt: str | list[int] | None
    max_tokens: int
    stream: bool
    include_usage: bool
    stop: list[str]
    gen_kwargs: dict[str, Any] = field(default_factory=dict)
    n: int = 1


def parse_request(
    body: Any,
    chat: bool,
    model_ids: set[str],
    context: int,
    defaults: dict[str, Any] | None = None,
) -> CompletionRequest:
    """The request ``body``; ``defaults`` (temperature, top_p, max_tokens: the server's
    --temp, --top-p, --max-tokens) fill in the fields the request omits."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_type")
    if defaults:
        body = dict(body)
        for key, value in defaults.items():
            if value is None or body.get(key) is not None:
                continue
            if key == "max_tokens" and body.get("max_completion_tokens") is not None:
                continue
            body[key] = value
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise ApiError(400, "'model' must be a string", "model", "invalid_type")
        if model not in model_ids:
            raise ApiError(
                404,
                f"the model '{model}' does not exist (served: {sorted(model_ids)})",
                "model",
                "model_not_found",
            )
    messages = parse_messages(body.get("messages")) if chat else None
    prompt = None if chat else parse_prompt(body.get("prompt"))

    name = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    max_tokens = _opt_int(body, name)
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, context)
    elif max_tokens < 1:
        raise ApiError(400, f"'{name}' must be >= 1, got {max_tokens}", name, "invalid_value")
    elif max_tokens > context:
        raise ApiError(
            400,
            f"'{name}' is {max_tokens} but the model's context is {context} tokens",
            name,
            "context_length_exceeded",
        )

    n = _opt_int(body, "n")
    if n is not None and not 1 <= n <= MAX_CHOICES:
        raise ApiError(400, f"'n' must be in [1, {MAX_CHOICES}], got {n}", "n", "invalid_value")
    if chat and body.get("logprobs"):
        raise ApiError(400, "logprobs are not supported", "logprobs", "unsupported_value")
    if not chat and body.get("logprobs") not in (None, 0, False):
        raise ApiError(400, "logprobs are not supported", "logprobs", "unsupported_value")
    if not chat and body.get("echo"):
        raise ApiError(400, "echo is not supported", "echo", "unsupported_value")
    best_of = _opt_int(body, "best_of")
    if best_of is not None and best_of != 1:
        raise ApiError(400, "only best_of=1 is supported", "best_of", "unsupported_value")

    stream = _opt_bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = bool(opts and opts.get("include_usage"))
    stop = parse_stop(body.get("stop"))

    temp = _opt_number(body, "temperature", 0.0, 2.0)
    top_p = _opt_number(body, "top_p", 0.0, 1.0)
    if top_p is not None and top_p <= 0:
        raise ApiError(400, "'top_p' must be > 0", "top_p", "invalid_value")
    min_p = _opt_number(body, "min_p", 0.0, 1.0)
    rep = _opt_number(body, "repetition_penalty", 1e-6, 100.0)
    top_k = _opt_int(body, "top_k")
    if top_k is not None and top_k < 0:
        raise ApiError(400, "'top_k' must be >= 0", "top_k", "invalid_value")
    rep_ctx = _opt_int(body, "repetition_context_size")
    if rep_ctx is not None and rep_ctx < 1:
        raise ApiError(
            400,
            "'repetition_context_size' must be >= 1",
            "repetition_context_size",
            "invalid_value",
        )
    seed = _opt_int(body, "seed")
    if seed is not None and seed < 0:
        raise ApiError(400, "'seed' must be >= 0", "seed", "invalid_value")
    try:
        gen_kwargs = sampling_kwargs(
            temp=temp,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=rep,
            repetition_context_size=rep_ctx,
            seed=seed,
        )
    except ValueError as e:
        raise ApiError(400, str(e), None, "invalid_value") from e
    return CompletionRequest(
        chat=chat,
        messages=messages,
        prompt=prompt,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=include_usage,
        stop=stop,
        gen_kwargs=gen_kwargs,
        n=n or 1,
    )


# ------------------------------------------------------------------------- worker


_DONE = object()


class Job:
    """One request: its request, an output queue ((choice index, response) pairs, then
    an exception or nothing, then _DONE) and a cancellation flag."""

    def __init__(self, request: CompletionRequest) -> None:
        self.request = request
        self.out: queue.Queue[Any] = queue.Queue()
        self.cancelled = threading.Event()
        self.id = uuid.uuid4().hex[:12]
        self.submitted = time.perf_counter()


@dataclass
class _Choice:
    """A sequence of the batch serving one choice of a job."""

    job: Job
    index: int
    text: TextStream | None = None
    final: GenerationResponse | None = None


class Engine:
    """The model, its tokenizer and the single generation worker thread."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        model_id: str,
        *,
        decode_kwargs: dict[str, Any] | None = None,
        stream_fn: StreamFn | None = None,
        request_defaults: dict[str, Any] | None = None,
        log: bool = False,
        prefill_chunk: int = PREFILL_CHUNK,
    ) -> None:
        self.model = model
        self.log = log
        self.prefill_chunk = prefill_chunk
        self.request_defaults = dict(request_defaults or {})
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.model_ids = {model_id, "default"}
        self.decode_kwargs = dict(decode_kwargs or {})
        self.stream_fn: StreamFn = stream_fn or stream_generate
        # One continuous batch, unless a test replaces the generator (one job at a
        # time then) or the lookup drafter, which is not batched, is asked for.
        self.batching = stream_fn is None and self.decode_kwargs.get("drafter") in (
            None, "streams")
        self.batch_size = 0  # sequences in the running batch
        self.max_batch_size = 0
        args = getattr(model, "args", None)
        self.context = int(getattr(args, "max_position_embeddings", None) or 1 << 30)
        self.created = int(time.time())
        self.completed = 0
        self.cancelled = 0
        self.failed = 0
        self.busy = False
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="specstream-worker", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    def submit(self, request: CompletionRequest) -> Job:
        job = Job(request)
        self._jobs.put(job)
        return job

    def close(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout)

    def _prompt_ids(self, req: CompletionRequest) -> str | list[int]:
        if req.chat:
            assert req.messages is not None
            try:
                ids = chat_prompt_ids(self.tokenizer, req.messages)
            except Exception as e:  # jinja2's TemplateError and the like
                raise ApiError(
                    400,
                    f"the chat template rejected the messages: {e}",
                    "messages",
                    "invalid_value",
                ) from e
            n = len(ids)
            prompt: str | list[int] = ids
        else:
            assert req.prompt is not None
            prompt = req.prompt
            n = len(self.tokenizer.encode(prompt)) if isinstance(prompt, str) else len(prompt)
            if isinstance(prompt, list):
                vocab = getattr(getattr(self.model, "args", None), "vocab_size", None)
                if vocab is not None and any(not 0 <= t < vocab for t in prompt):
                    raise ApiError(
                        400, f"token ids must be in [0, {vocab})", "prompt", "invalid_value"
                    )
        if n >= self.context:
            raise ApiError(
                400,
                f"the prompt has {n} tokens but the model's context is {self.context} tokens",
                "messages" if req.chat else "prompt",
                "context_length_exceeded",
            )
        return prompt

    def _loop(self) -> None:
        try:
            if self.batching:
                self._serve_batch()
            else:
                self._serve_jobs()
        finally:
            release_thread_streams()

    def _request_kwargs(self, req: CompletionRequest) -> dict[str, Any]:
        kwargs = {**self.decode_kwargs, **req.gen_kwargs}
        if kwargs.get("dynamic_tree") and not is_greedy(
            kwargs.get("temp"), kwargs.get("repetition_penalty")
        ):
            del kwargs["dynamic_tree"]  # --dynamic-tree applies to greedy requests
        return kwargs

    # -- the continuous batch --------------------------------------------------------
    def _serve_batch(self) -> None:
        decoder = BatchDecoder(self.model, eos_token_ids=self.tokenizer.eos_token_ids,
                               prefill_chunk=self.prefill_chunk)
        choices: dict[int, _Choice] = {}  # by sequence id
        jobs: dict[Job, list[int]] = {}
        while True:
            try:
                job = self._jobs.get(block=not decoder.active)
            except queue.Empty:
                job = False  # nothing new: step the batch
            while job is not False:
                if job is None:
                    return
                self._admit(job, decoder, choices, jobs)
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    job = False
            for job in [j for j in jobs if j.cancelled.is_set()]:
                for uid in jobs.pop(job):
                    decoder.cancel(uid)
                    del choices[uid]
                self.cancelled += 1
                job.out.put(_DONE)
            if not decoder.active:
                self.busy = False
                continue
            self.busy = True
            self.batch_size = len(decoder.running)
            self.max_batch_size = max(self.max_batch_size, self.batch_size)
            try:
                events = decoder.step()
            except Exception as e:  # noqa: BLE001 (every job of the batch is told)
                for job in jobs:
                    self.failed += 1
                    job.out.put(e)
                    job.out.put(_DONE)
                choices.clear()
                jobs.clear()
                decoder = BatchDecoder(self.model, eos_token_ids=self.tokenizer.eos_token_ids,
                                       prefill_chunk=self.prefill_chunk)
                continue
            for ev in events:
                self._deliver(ev, decoder, choices, jobs)

    def _admit(self, job: Job, decoder: BatchDecoder, choices: dict[int, _Choice],
               jobs: dict[Job, list[int]]) -> None:
        """Validate a job and add its sequences to the batch; a job that fails here is
        answered at once and never joins."""
        if job.cancelled.is_set():
            self.cancelled += 1
            job.out.put(_DONE)
            return
        req = job.request
        uids: list[int] = []
        try:
            prompt = self._prompt_ids(req)
            ids = _encode(self.tokenizer, prompt)  # as stream_generate encodes it
            kwargs = self._request_kwargs(req)
            for i in range(req.n):
                kw = dict(kwargs)
                if kw.get("seed") is not None:
                    kw["seed"] = kw["seed"] + i  # n draws, not n copies of one
                uids.append(add_with_options(decoder, ids, req.max_tokens, **kw))
        except Exception as e:  # handed to the connection thread, which answers
            for uid in uids:
                decoder.cancel(uid)
            self.failed += 1
            job.out.put(e)
            job.out.put(_DONE)
            return
        jobs[job] = uids
        for i, uid in enumerate(uids):
            choices[uid] = _Choice(job, i)

    def _deliver(self, ev: BatchEvent, decoder: BatchDecoder, choices: dict[int, _Choice],
                 jobs: dict[Job, list[int]]) -> None:
        choice = choices.get(ev.uid)
        if choice is None:
            return
        job = choice.job
        if choice.text is None:
            seq = ev.state
            choice.text = TextStream(self.tokenizer, int(seq.prompt.shape[0]),
                                     job.request.stop, seq.stats, seq.prompt_time)
        text = choice.text
        for t in ev.tokens:
            r = text.push(t)
            if text.done:  # a stop string
                decoder.cancel(ev.uid)
                choice.final = r
                break
            job.out.put((choice.index, r))
        if ev.finish is not None and not text.done:
            choice.final = text.end(ev.finish)
        if choice.final is None:
            return
        job.out.put((choice.index, choice.final))
        uids = jobs.get(job, [])
        if all(choices[u].final is not None for u in uids):
            finals = [choices.pop(u).final for u in jobs.pop(job)]
            self.completed += 1
            job.out.put(_DONE)
            if self.log:
                print(request_log(job, finals, self.batch_size), file=sys.stderr, flush=True)


    def _serve_jobs(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                self.cancelled += 1
                job.out.put(_DONE)
                continue
            self.busy = True
            gen = None
            try:
                req = job.request
                if req.n > 1:
                    raise ApiError(400, "n > 1 needs the batching engine (the streams "
                                   "drafter)", "n", "unsupported_value")
                prompt = self._prompt_ids(req)
                kwargs = self._request_kwargs(req)
                if req.stop:
                    kwargs["stop"] = req.stop
                gen = self.stream_fn(self.model, self.tokenizer, prompt, req.max_tokens, **kwargs)
                for r in gen:
                    if job.cancelled.is_set():
                        break
                    job.out.put((0, r))
                if job.cancelled.is_set():
                    self.cancelled += 1
                else:
                    self.completed += 1
            except Exception as e:  # handed to the connection thread, which answers
                self.failed += 1
                job.out.put(e)
            finally:
                if gen is not None and hasattr(gen, "close"):
                    try:
                        gen.close()
                    except Exception:
                        pass
                self.busy = False
                job.out.put(_DONE)


def request_log(job: Job, finals: list[GenerationResponse], batch_size: int) -> str:
    """One line of per-request statistics for the server log."""
    u = _usage(finals)
    seconds = time.perf_counter() - job.submitted
    return (f"request {job.id}: {len(finals)} choice(s), {u['prompt_tokens']} prompt + "
            f"{u['completion_tokens']} tokens in {seconds:.2f} s, "
            f"{u['tokens_per_second']:.1f} tokens/s, {u['tokens_per_pass']:.2f} tokens/pass, "
            f"acceptance {u['acceptance']}, batch of {batch_size}")


def release_thread_streams() -> None:
    """Free the MLX streams of the calling thread.  MLX >= 0.31 wants this at the end
    of every thread that ran MLX work other than the main one; without it the process
    may abort at exit ("terminate called without an active exception")."""
    clear = getattr(mx, "clear_streams", None)
    if clear is not None:
        clear()


def _usage(last: GenerationResponse | list[GenerationResponse]) -> dict[str, Any]:
    """The usage of a request from the last response of each of its choices: tokens
    summed over the choices; tokens/s and tokens/pass of the choices together;
    acceptance: per depth, the fraction of passes that accepted that many drafts."""
    rs = last if isinstance(last, list) else [last]
    completion = sum(r.generation_tokens for r in rs)
    passes = sum(r.forward_passes for r in rs)
    step_tokens = sum(r.tokens_per_pass * r.forward_passes for r in rs)
    depth = max(len(r.accepted_per_depth) for r in rs)
    accepted = [sum(r.accepted_per_depth[d] for r in rs if d < len(r.accepted_per_depth))
                for d in range(depth)]
    return {
        "prompt_tokens": rs[0].prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": rs[0].prompt_tokens + completion,
        "forward_passes": passes,
        "tokens_per_pass": round(step_tokens / passes, 4) if passes else 0.0,
        "accepted_per_depth": accepted,
        "lookup_accepted": sum(r.lookup_accepted for r in rs),
        "tokens_per_second": round(sum(r.generation_tps for r in rs), 2),
        "acceptance": [round(a / passes, 4) for a in accepted] if passes else [],
    }


def _as_api_error(e: BaseException) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, NotImplementedError):
        return ApiError(400, str(e), None, "unsupported_value")
    if isinstance(e, ValueError):  # stream_generate's checks (context, prompt, tree)
        code = "context_length_exceeded" if "context" in str(e) else "invalid_value"
        return ApiError(400, str(e), None, code)
    return ApiError(500, f"generation failed: {type(e).__name__}: {e}", None, None, "server_error")


class ClientGone(Exception):
    pass


# ------------------------------------------------------------------------ HTTP


POST_ROUTES = {
    "/v1/chat/completions": True,
    "/chat/completions": True,
    "/v1/completions": False,
    "/completions": False,
}
GET_ROUTES = {"/health", "/v1/models", "/models"}


class SpecStreamServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], engine: Engine, *, log: bool = False) -> None:
        self.engine = engine
        self.log = log
        super().__init__(address, Handler)

    def server_close(self) -> None:
        super().server_close()
        self.engine.close()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 300  # seconds of socket inactivity (idle keep-alive, stalled readers)
    server_version = f"mlx-specstream/{mlx_specstream.__version__}"
    server: SpecStreamServer

    # ---------------------------------------------------------------- plumbing

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (base signature)
        if self.server.log:
            super().log_message(format, *args)

    def _route(self) -> str:
        path = self.path.split("?", 1)[0]
        return path.rstrip("/") or "/"

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Access-Control-Allow-Origin", "*")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True

    def _send_error(self, e: ApiError, headers: dict[str, str] | None = None) -> None:
        self._send_json(e.status, e.body(), headers)

    def _client_gone(self) -> bool:
        """True when the client has closed its connection (without reading it)."""
        try:
            r, _, _ = select.select([self.connection], [], [], 0)
            if not r:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _read_body(self) -> Any:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(411, "chunked request bodies are not supported; send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise ApiError(411, "Content-Length is required")
        try:
            n = int(length)
        except ValueError:
            self.close_connection = True
            raise ApiError(400, f"bad Content-Length {length!r}") from None
        if n < 0 or n > MAX_BODY_BYTES:
            self.close_connection = True
            raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(n)
        try:
            return json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
            raise ApiError(400, f"could not parse the JSON body of the request: {e}") from None

    # ---------------------------------------------------------------- methods

    def do_GET(self) -> None:  # noqa: N802
        route = self._route()
        engine = self.server.engine
        if route == "/health":
            self._send_json(
                200 if engine.alive else 503,
                {
                    "status": "ok" if engine.alive else "error",
                    "model": engine.model_id,
                    "busy": engine.busy,
                    "queued": engine.queued,
                },
            )
        elif route in ("/v1/models", "/models"):
            self._send_json(200, {"object": "list", "data": [self._model_card()]})
        elif route.startswith(("/v1/models/", "/models/")):
            name = route.split("/models/", 1)[1]
            if name in engine.model_ids:
                self._send_json(200, self._model_card())
            else:
                self._send_error(
                    ApiError(404, f"the model '{name}' does not exist", "model", "model_not_found")
                )
        elif route in POST_ROUTES:
            self._method_not_allowed("POST")
        else:
            self._not_found()

    def do_POST(self) -> None:  # noqa: N802
        route = self._route()
        if route not in POST_ROUTES:
            if route in GET_ROUTES or route.startswith(("/v1/models/", "/models/")):
                self.close_connection = True  # the body was not read
                self._method_not_allowed("GET")
            else:
                self.close_connection = True
                self._not_found()
            return
        engine = self.server.engine
        try:
            body = self._read_body()
            req = parse_request(
                body, POST_ROUTES[route], engine.model_ids, engine.context,
                engine.request_defaults,
            )
        except ApiError as e:
            self._send_error(e)
            return
        self._complete(req)

    def do_OPTIONS(self) -> None:  # noqa: N802
        self.send_response(204)
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "*")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _other(self) -> None:
        route = self._route()
        self.close_connection = True
        if route in POST_ROUTES:
            self._method_not_allowed("POST")
        elif route in GET_ROUTES:
            self._method_not_allowed("GET")
        else:
            self._not_found()

    do_PUT = do_DELETE = do_PATCH = _other  # noqa: N815

    def _not_found(self) -> None:
        self._send_error(
            ApiError(404, f"no route {self.command} {self._route()}", None, "not_found")
        )

    def _method_not_allowed(self, allow: str) -> None:
        self._send_error(
            ApiError(
                405,
                f"method {self.command} is not allowed on {self._route()}; use {allow}",
                None,
                "method_not_allowed",
            ),
            {"Allow": allow},
        )

    def _model_card(self) -> dict[str, Any]:
        engine = self.server.engine
        return {
            "id": engine.model_id,
            "object": "model",
            "created": engine.created,
            "owned_by": "mlx-specstream",
        }

    # ------------------------------------------------------------- generation

    def _responses(self, job: Job) -> Iterator[tuple[int, GenerationResponse]]:
        """The job's (choice index, response) pairs; raises ClientGone (after
        cancelling the job) when the client goes away (checked every POLL_S), or the
        worker's exception."""
        engine = self.server.engine
        checked = time.monotonic()
        while True:
            try:
                item = job.out.get(timeout=POLL_S)
            except queue.Empty:
                item = None
            now = time.monotonic()
            if item is None or now - checked >= POLL_S:
                checked = now
                if self._client_gone():
                    job.cancelled.set()
                    raise ClientGone
            if item is None:
                if not engine.alive:
                    raise ApiError(
                        503, "the generation worker has stopped", None, None, "server_error"
                    )
                continue
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _complete(self, req: CompletionRequest) -> None:
        engine = self.server.engine
        job = engine.submit(req)
        prefix = "chatcmpl" if req.chat else "cmpl"
        meta = {
            "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()),
            "model": engine.model_id,
            "system_fingerprint": f"mlx-specstream-{mlx_specstream.__version__}",
        }
        responses = self._responses(job)
        try:
            try:
                first = next(responses, None)
            except ClientGone:
                self.close_connection = True
                return
            except Exception as e:
                self._send_error(_as_api_error(e))
                return
            if first is None:  # nothing generated (cancelled)
                self._send_error(ApiError(500, "no output", None, None, "server_error"))
                return
            if req.stream:
                self._stream(req, meta, first, responses, job)
            else:
                self._whole(req, meta, first, responses)
        finally:
            job.cancelled.set()  # a no-op when finished; stops the worker otherwise
            responses.close()

    def _whole(
        self,
        req: CompletionRequest,
        meta: dict[str, Any],
        first: tuple[int, GenerationResponse],
        rest: Iterator[tuple[int, GenerationResponse]],
    ) -> None:
        parts: list[list[str]] = [[] for _ in range(req.n)]
        last: list[GenerationResponse | None] = [None] * req.n
        try:
            for i, r in itertools.chain([first], rest):
                parts[i].append(r.text)
                last[i] = r
        except ClientGone:
            self.close_connection = True
            return
        except Exception as e:
            self._send_error(_as_api_error(e))
            return
        finals = [r for r in last if r is not None]
        choices = []
        for i, r in enumerate(last):
            if r is None:
                continue
            text = "".join(parts[i])
            finish = r.finish_reason or "length"
            if req.chat:
                choices.append({
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish,
                })
            else:
                choices.append({"index": i, "text": text, "logprobs": None,
                                "finish_reason": finish})
        obj = "chat.completion" if req.chat else "text_completion"
        self._send_json(
            200,
            {**meta, "object": obj, "choices": choices, "usage": _usage(finals)},
        )

    def _write_event(self, obj: Any) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj)
        try:
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, OSError):
            raise ClientGone from None

    def _stream(
        self,
        req: CompletionRequest,
        meta: dict[str, Any],
        first: tuple[int, GenerationResponse],
        rest: Iterator[tuple[int, GenerationResponse]],
        job: Job,
    ) -> None:
        self.close_connection = True  # the end of the body is the end of the connection
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.send_header("Access-Control-Allow-Origin", "*")
            self.end_headers()
        except OSError:
            return
        obj = "chat.completion.chunk" if req.chat else "text_completion"

        def chunk(i: int, text: str | None, finish: str | None,
                  role: bool = False) -> dict[str, Any]:
            if req.chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice: dict[str, Any] = {"index": i, "delta": delta, "logprobs": None}
            else:
                choice = {"index": i, "text": text or "", "logprobs": None}
            choice["finish_reason"] = finish
            return {**meta, "object": obj, "choices": [choice]}

        try:
            if req.chat:
                for i in range(req.n):
                    self._write_event(chunk(i, "", None, role=True))
            last: list[GenerationResponse | None] = [None] * req.n
            try:
                for i, r in itertools.chain([first], rest):
                    if r.finish_reason is not None:
                        # A choice's final chunk carries its finish reason and its usage.
                        if r.text:
                            self._write_event(chunk(i, r.text, None))
                        final = chunk(i, None if req.chat else "", r.finish_reason)
                        final["usage"] = _usage(r)
                        self._write_event(final)
                    elif r.text:
                        self._write_event(chunk(i, r.text, None))
                    last[i] = r
            except ClientGone:
                raise
            except Exception as e:  # mid-stream failure: say so in the stream
                self._write_event(_as_api_error(e).body())
                return
            finals = [r for r in last if r is not None]
            if req.include_usage and finals:
                self._write_event({**meta, "object": obj, "choices": [], "usage": _usage(finals)})
            self._write_event("[DONE]")
        except ClientGone:
            job.cancelled.set()


# ---------------------------------------------------------------------- factory


def make_server(
    model: Any,
    tokenizer: Any,
    model_id: str = "default",
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    decode_kwargs: dict[str, Any] | None = None,
    stream_fn: StreamFn | None = None,
    log: bool = False,
    request_defaults: dict[str, Any] | None = None,
) -> SpecStreamServer:
    """An OpenAI-compatible server for a loaded model, bound but not yet serving:
    call ``serve_forever()`` (in a thread if need be), then ``shutdown()`` and
    ``server_close()``.  Port 0 picks a free port (see ``server_address``).

    decode_kwargs: fixed ``stream_generate`` keywords (speculative, tree_topk, ...).
    stream_fn: replaces ``stream_generate`` (for tests).
    request_defaults: temperature / top_p / max_tokens for requests that omit them."""
    engine = Engine(
        model, tokenizer, model_id, decode_kwargs=decode_kwargs, stream_fn=stream_fn,
        request_defaults=request_defaults, log=log,
    )
    try:
        return SpecStreamServer((host, port), engine, log=log)
    except BaseException:
        engine.close()
        raise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    parser.add_argument(
        "--model-id", default=None, help="the id clients use (default: the folder name)"
    )
    parser.add_argument("--quiet", action="store_true", help="do not log each request")
    g = parser.add_argument_group("defaults of requests that omit them")
    g.add_argument("--temp", type=float, default=None, help="temperature (default 0: greedy)")
    g.add_argument("--top-p", type=float, default=None, help="top_p (default 1)")
    g.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help=f"max_tokens (default {DEFAULT_MAX_TOKENS}, at most the context)",
    )
    add_decoding_arguments(parser)


def request_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields set by --temp, --top-p, --max-tokens (checked)."""
    out: dict[str, Any] = {}
    if getattr(args, "temp", None) is not None:
        if not 0 <= args.temp <= 2:
            raise ValueError(f"--temp must be in [0, 2], got {args.temp}")
        out["temperature"] = float(args.temp)
    if getattr(args, "top_p", None) is not None:
        if not 0 < args.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
        out["top_p"] = float(args.top_p)
    if getattr(args, "max_tokens", None) is not None:
        if args.max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
        out["max_tokens"] = int(args.max_tokens)
    return out


def run(args: argparse.Namespace) -> int:
    defaults = request_defaults(args)
    decode_kwargs = decoding_kwargs(args)
    model, tokenizer = load(args.model)
    model_id = args.model_id or (Path(args.model).name if args.model else "default")
    server = make_server(
        model,
        tokenizer,
        model_id,
        args.host,
        args.port,
        decode_kwargs=decode_kwargs,
        log=not args.quiet,
        request_defaults=defaults,
    )
    host, port = server.server_address[:2]
    print(f"serving '{model_id}' on http://{host}:{port}/v1 (Ctrl-C to stop)", file=sys.stderr)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
