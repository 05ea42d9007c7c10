"""Real prompts that install offline, as conversations ending in a user turn.

* ``chitchat``: the first user turn of each chitchat-dataset conversation;
* ``chitchat-turns``: later turns of the same conversations, with up to 4 earlier turns
  as history (the other speaker's words as the assistant's);
* ``chatterbot``: the questions of chatterbot-corpus (English);
* ``passages``: tasks over real passages (summarise, explain, rewrite, list the key
  points, answer a question) taken from the docstrings of the Python standard library.

Besides prompts, ``stdlib_code`` gives real code as plain text: the functions of the
standard library's modules, for the streams of code models (``distill --code-texts``).

The last ``HELDOUT_CONVERSATIONS`` chitchat conversations are never used.  Each source
is shuffled with a fixed seed, so ``n`` prompts of a source are always the same ones.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import random
import re
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

from .data import HELDOUT_CONVERSATIONS, chitchat_path, chitchat_prompts

Conversation = list[dict[str, str]]


def _user(text: str) -> Conversation:
    return [{"role": "user", "content": text}]


def chitchat_first_turns() -> list[Conversation]:
    return [_user(p) for p in chitchat_prompts()[0]]


def chitchat_later_turns(max_history: int = 4) -> list[Conversation]:
    """Turn i >= 1 of every training conversation, the turns before it as history."""
    with chitchat_path().open() as f:
        data = json.load(f)
    convos = list(data.values()) if isinstance(data, dict) else list(data)
    out = []
    for c in convos[:-HELDOUT_CONVERSATIONS]:
        turns = ["\n".join(m["text"].strip() for m in g if m.get("text", "").strip())
                 for g in c.get("messages") or []]
        turns = [t for t in turns if t]
        for i in range(1, len(turns)):
            start = max(0, i - max_history)
            if (i - start) % 2:  # the history opens with a user turn
                start += 1
            hist = turns[start:i]
            msgs = [{"role": "user" if k % 2 == 0 else "assistant", "content": t}
                    for k, t in enumerate(hist)]
            if not msgs or msgs[-1]["role"] == "user":
                continue
            out.append([*msgs, {"role": "user", "content": turns[i]}])
    return out


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {name} package is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def chatterbot_questions() -> list[Conversation]:
    """The first utterance of every chatterbot-corpus English conversation (read as
    plain YAML lists, so PyYAML is not needed)."""
    root = _package_dir("chatterbot_corpus") / "data" / "english"
    out, seen = [], set()
    for f in sorted(root.glob("*.yml")):
        for m in re.finditer(r"^- - (.+)$", f.read_text(encoding="utf-8"), re.M):
            q = m.group(1).strip().strip("\"'")
            if len(q.split()) >= 3 and q.lower() not in seen:
                seen.add(q.lower())
                out.append(_user(q[0].upper() + q[1:]))
    return out


PASSAGE_TASKS: tuple[str, ...] = (
    "Summarize the following text in two or three sentences.\n\n{p}",
    "Explain this in simple terms for a beginner:\n\n{p}",
    "Rewrite this paragraph so that it is clearer and easier to read:\n\n{p}",
    "List the key points of this text as bullet points.\n\n{p}",
    "{p}\n\nWhat is this text about, and when would someone need it?",
    "Read the text below and answer: what are the main terms it defines?\n\n{p}",
)


# The benchmark suite's passages (benchmarks/suite) come from these files: never trained on.
HELDOUT_FILES = frozenset({
    "_pydecimal.py", "asyncore.py", "timeit.py", "sched.py", "turtle.py", "ast.py",
    "asynchat.py", "plistlib.py", "pydoc.py", "threading.py", "shutil.py", "tempfile.py",
    "uuid.py", "statistics.py",
})


def _stdlib_modules() -> Iterator[tuple[str, str, ast.Module]]:
    """(file name, text, parsed tree) of the standard library's top-level modules, but
    ``HELDOUT_FILES`` and files that do not parse."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(root.glob("*.py")):
        if f.name in HELDOUT_FILES:
            continue
        try:
            text = f.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError):
            continue
        yield f.name, text, tree


def stdlib_passages(min_chars: int = 300, max_chars: int = 1200) -> list[tuple[str, str]]:
    """(source, passage): the docstrings of modules, classes and functions of the
    standard library's top-level modules (but ``HELDOUT_FILES``), within the length
    bounds."""
    out = []
    for name_, _, tree in _stdlib_modules():
        nodes = [tree] + [n for n in ast.walk(tree)
                          if isinstance(n, ast.FunctionDef | ast.ClassDef)]
        for node in nodes:
            doc = ast.get_docstring(node)
            if not doc:
                continue
            doc = re.sub(r"\n\s*\n", "\n\n", doc.strip())
            if min_chars <= len(doc) <= max_chars and doc.count(">>>") == 0:
                name = getattr(node, "name", "")
                out.append((f"{name_}{':' + name if name else ''}", doc))
    return out


def stdlib_code(min_chars: int = 300, max_chars: int = 2400) -> list[tuple[str, str]]:
    """(source, code): the source text of the functions and methods of the standard
    library's top-level modules (but ``HELDOUT_FILES``), within the length bounds, methods
    dedented to the left margin."""
    import textwrap

    out = []
    for name, text, tree in _stdlib_modules():
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            seg = ast.get_source_segment(text, node, padded=True)
            if seg and min_chars <= len(seg) <= max_chars:
                out.append((f"{name}:{node.name}", textwrap.dedent(seg).strip("\n") + "\n"))
    return out


def code_texts(n: int | None = None, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (source, code) pairs of ``stdlib_code`` (all with None), in a fixed shuffled
    order."""
    items = stdlib_code()
    random.Random(seed).shuffle(items)
    return items if n is None else items[:n]


def passage_tasks() -> list[Conversation]:
    rng = random.Random(0)
    return [_user(rng.choice(PASSAGE_TASKS).format(p=p)) for _, p in stdlib_passages()]


SOURCES: dict[str, Callable[[], list[Conversation]]] = {
    "chitchat": chitchat_first_turns,
    "chitchat-turns": chitchat_later_turns,
    "chatterbot": chatterbot_questions,
    "passages": passage_tasks,
}


def source_prompts(name: str, n: int | None = None, seed: int = 0) -> list[Conversation]:
    """``n`` conversations of source ``name`` (all with None), in a fixed shuffled order."""
    if name not in SOURCES:
        raise ValueError(f"unknown prompt source {name!r}; known: {', '.join(SOURCES)}")
    items = SOURCES[name]()
    random.Random(seed).shuffle(items)
    return items if n is None else items[:n]
