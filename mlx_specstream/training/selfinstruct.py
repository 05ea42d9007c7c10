"""User requests written by the chat model itself (the Magpie idea).

An aligned chat model that is given its chat template up to the start of a user turn
writes what a user would type there.  Requests are steered for variety by a task hint
and a topic hint in the system prompt, an optional opening word, and the sampling
temperature; the same works after a conversation's history (follow-up turns).  They
are then filtered: length, mostly English, no template debris, no near-duplicates.

Works for any chat model whose tokenizer has a chat template: the prefix is found by
rendering a sentinel user message and cutting the text where it starts.
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SENTINEL = "\u2063SENTINEL\u2063"


@dataclass(frozen=True)
class Task:
    name: str
    hint: str
    openers: tuple[str, ...]


TASKS: tuple[Task, ...] = (
    Task("writing", "The user asks you to write something for them: an email, a letter, a "
         "short story, a poem, a social media post, a cover letter, a speech or a product "
         "description.",
         ("Write", "Can you write", "Draft", "Help me write", "Compose")),
    Task("explaining", "The user asks you to explain a concept or how something works, in "
         "science, technology, history, economics, health or everyday life.",
         ("Explain", "How does", "Why do", "What is", "Can you explain")),
    Task("coding", "The user asks for help with programming: writing a function, fixing a "
         "bug, explaining a piece of code, using a library, in Python, JavaScript, SQL, C "
         "or the shell.",
         ("Write a Python function", "How do I", "What does this code do", "Fix",
          "Write a function")),
    Task("reasoning", "The user asks you to solve a problem step by step: a math word "
         "problem, a logic puzzle, a comparison, an estimate or a plan.",
         ("If", "A train", "Solve", "Compare", "What is the best way to")),
    Task("advice", "The user asks for advice about their life: health, sleep, exercise, "
         "careers, studying, money, relationships, travel or cooking.",
         ("How can I", "What should I", "Give me tips", "I want to", "Any advice on")),
    Task("lists", "The user asks for a list: ideas, names, steps, pros and cons, "
         "recommendations or examples.",
         ("List", "Give me", "What are some", "Suggest", "Name")),
    Task("rewriting", "The user gives you a sentence or a short paragraph and asks you to "
         "rewrite it: more formal, simpler, shorter, friendlier, or with its grammar fixed.",
         ("Rewrite", "Rephrase", "Make this", "Paraphrase", "Correct the grammar")),
    Task("knowledge", "The user asks a factual question about the world: geography, "
         "animals, space, famous people, inventions, food or culture.",
         ("Who", "What", "Where", "When", "Tell me about")),
    Task("chat", "The user chats casually with you about their day, their hobbies, "
         "their feelings or plans.",
         ("Hey", "I just", "Do you", "I'm feeling", "Guess what")),
)

TOPICS: tuple[str, ...] = (
    "cooking", "travel", "fitness", "personal finance", "gardening", "pets", "music",
    "movies", "books", "history", "physics", "biology", "chemistry", "astronomy",
    "climate", "programming", "databases", "web development", "machine learning",
    "mathematics", "statistics", "job interviews", "small business", "marketing",
    "education", "parenting", "mental health", "sleep", "nutrition", "sports",
    "photography", "art", "architecture", "cars", "smartphones", "video games",
    "languages", "philosophy", "economics", "politics", "law", "medicine", "the ocean",
    "weather", "holidays", "friendship", "remote work", "productivity", "writing",
    "home repair", "fashion", "coffee", "energy", "the internet", "security",
    "time management", "public speaking", "volunteering", "the environment", "space travel",
)


def template_prefix(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the chat template applied to ``messages`` followed by a user turn,
    cut where that user turn's text starts (the model then writes the user's words)."""
    text = tokenizer.apply_chat_template(
        [*messages, {"role": "user", "content": _SENTINEL}], tokenize=False,
        add_generation_prompt=False,
    )
    cut = text.find(_SENTINEL)
    if cut < 0:
        raise ValueError("the chat template drops the user's message; cannot write requests")
    return list(tokenizer.encode(text[:cut], add_special_tokens=False))


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


_DEBRIS = re.compile(r"<\||\|>|\[INST\]|<s>|</s>|^(assistant|user|system)\b", re.I)
_ANSWERISH = re.compile(r"^(sure|certainly|of course|i'm sorry|as an ai|here is|here's)\b", re.I)


def clean_request(text: str, min_words: int = 3, max_words: int = 120) -> str | None:
    """The request, stripped, or None when it fails the filters (length, mostly ASCII
    letters, no template debris, not an answer)."""
    text = text.strip().strip('"').strip()
    words = text.split()
    if not (min_words <= len(words) <= max_words):
        return None
    if _DEBRIS.search(text) or _ANSWERISH.match(text):
        return None
    letters = [c for c in text if c.isalpha()]
    if not letters or sum(c.isascii() for c in letters) / len(letters) < 0.95:
        return None
    if sum(c.isalpha() or c.isspace() for c in text) / len(text) < 0.7:
        return None
    return text


def _shingles(text: str, n: int = 3) -> set[str]:
    w = re.findall(r"[a-z0-9]+", text.lower())
    return {" ".join(w[i : i + n]) for i in range(max(1, len(w) - n + 1))}


class NearDuplicates:
    """Rejects a text whose word 3-grams overlap an earlier one's by ``threshold``
    (Jaccard), through an index from each 3-gram to the texts that hold it."""

    def __init__(self, threshold: float = 0.6) -> None:
        self.threshold = threshold
        self._sets: list[set[str]] = []
        self._index: dict[str, list[int]] = {}

    def add(self, text: str) -> bool:
        s = _shingles(text)
        counts: dict[int, int] = {}
        for g in s:
            for i in self._index.get(g, ()):
                counts[i] = counts.get(i, 0) + 1
        for i, c in counts.items():
            if c / len(s | self._sets[i]) >= self.threshold:
                return False
        self._index.update({g: [*self._index.get(g, []), len(self._sets)] for g in s})
        self._sets.append(s)
        return True


def _default_system(tokenizer: Any) -> str | None:
    """The system prompt the template adds by itself, if any (kept in hints)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=False
    )
    m = re.search(r"system\W*\n(.*?)(<\|im_end\|>|<\|eot_id\|>|</s>|\n)", text, re.S)
    return m.group(1).strip() if m else None


def parse_tasks(spec: str | None) -> tuple[Task, ...]:
    """The task mix of ``--tasks``: comma-separated task names, each optionally with a
    weight (``coding=4,explaining``); None or empty: every task once."""
    if not spec:
        return TASKS
    by_name = {t.name: t for t in TASKS}
    mix: list[Task] = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        name, _, weight = item.partition("=")
        if name not in by_name:
            raise ValueError(f"unknown task {name!r}; tasks: {', '.join(by_name)}")
        try:
            w = int(weight) if weight else 1
        except ValueError:
            raise ValueError(f"task weight must be a whole number, got {item!r}") from None
        if w < 1:
            raise ValueError(f"task weight must be >= 1, got {item!r}")
        mix.extend([by_name[name]] * w)
    if not mix:
        raise ValueError("--tasks names no task")
    return tuple(mix)


def steer(rng: random.Random, tokenizer: Any,
          tasks: tuple[Task, ...] = TASKS) -> tuple[str, list[dict[str, str]], str]:
    """(task name, system messages, opener) for one request, the task drawn from
    ``tasks`` (repeat a task to weight it)."""
    task = rng.choice(tasks)
    topic = rng.choice(TOPICS)
    base = _default_system(tokenizer) or "You are a helpful assistant."
    system = f"{base} {task.hint} This time the topic is {topic}."
    opener = rng.choice(task.openers) if rng.random() < 0.5 else ""
    return task.name, [{"role": "system", "content": system}], opener


def write_requests(
    model: Any,
    tokenizer: Any,
    n: int,
    output: str | Path,
    *,
    seed: int = 0,
    batch_size: int = 32,
    max_tokens: int = 64,
    temps: tuple[float, ...] = (0.8, 1.0),
    histories: list[list[dict[str, str]]] | None = None,
    progress: bool = True,
    accept: Callable[[str], str | None] = clean_request,
    max_idle_rounds: int = 5,
    keep_cut: bool = False,
    tasks: tuple[Task, ...] = TASKS,
) -> dict[str, Any]:
    """Append ``n`` filtered requests to OUTPUT (jsonl: ``{"messages", "task"}``, the
    messages ending with the new user turn).  With ``histories``, each request is a
    follow-up written after one of those conversations (cycled).  Resumes: requests
    already in OUTPUT count towards ``n`` and are not written twice.  ``accept`` cleans
    a request or rejects it (None); after ``max_idle_rounds`` batches in a row without
    one accepted request it stops (``stats["stalled"]``): the model does not write
    usable requests.  A request cut at ``max_tokens`` is rejected unless ``keep_cut``."""
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    if not _has_chat_template(tokenizer):
        raise ValueError("the tokenizer has no chat template: self-instruct needs a chat model")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    dedup = NearDuplicates()
    have = 0
    if output.exists():
        data = output.read_bytes()
        if data and not data.endswith(b"\n"):
            output.write_bytes(data[: data.rfind(b"\n") + 1])
        for line in output.read_text().splitlines():
            rec = json.loads(line)
            dedup.add(rec["messages"][-1]["content"])
            have += 1
    stats = {"already_done": have, "written": 0, "rejected": 0, "tokens": 0, "seconds": 0.0,
             "stalled": False}
    idle = 0
    if have >= n:
        return stats
    rng = random.Random(seed * 7919 + have)
    eos = set(tokenizer.eos_token_ids)
    samplers = {t: make_sampler(temp=t, top_p=0.95) for t in temps}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, initial=have, desc="requests", dynamic_ncols=True, file=sys.stderr)
    tic = time.perf_counter()
    with output.open("a") as out:
        while have < n:
            if idle >= max_idle_rounds:
                stats["stalled"] = True
                break
            idle += 1
            want = min(batch_size, 2 * (n - have))
            jobs = []
            for k in range(want):
                task, system, opener = steer(rng, tokenizer, tasks)
                history = histories[(have + k) % len(histories)] if histories else []
                msgs = history if history else system
                if history:
                    task, opener = "follow-up", ""
                prefix = template_prefix(tokenizer, msgs)
                if opener:
                    prefix += list(tokenizer.encode(opener, add_special_tokens=False))
                jobs.append((task, history, opener, prefix, rng.choice(temps)))
            gen = BatchGenerator(model, stop_tokens=[[t] for t in eos],
                                 completion_batch_size=len(jobs),
                                 prefill_batch_size=min(len(jobs), 8))
            try:
                uids = gen.insert([j[3] for j in jobs], [max_tokens] * len(jobs),
                                  samplers=[samplers[j[4]] for j in jobs])
                meta = dict(zip(uids, jobs, strict=True))
                toks: dict[int, list[int]] = {u: [] for u in uids}
                finished: list[tuple[tuple, list[int], str]] = []
                while responses := gen.next_generated():
                    for r in responses:
                        if r.finish_reason != "stop":
                            toks[r.uid].append(r.token)
                        if r.finish_reason is not None:
                            finished.append((meta[r.uid], toks.pop(r.uid), r.finish_reason))
            finally:
                gen.close()
            for (task, history, opener, _, temp), ids, reason in finished:
                stats["tokens"] += len(ids)
                if (reason != "stop" and not keep_cut) or have >= n:
                    stats["rejected"] += 1
                    continue
                body = tokenizer.decode(ids)
                text = accept((opener + body) if opener else body)
                if text is None or not dedup.add(text):
                    stats["rejected"] += 1
                    continue
                rec = {"messages": [*history, {"role": "user", "content": text}],
                       "task": task, "temp": temp}
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                out.flush()
                have += 1
                idle = 0
                stats["written"] += 1
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    stats["seconds"] = time.perf_counter() - tic
    return stats
