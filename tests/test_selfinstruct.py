"""Training prompts without a dataset: requests written by the model, real offline
sources, and distillation of conversations (tiny models, a few tokens each)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import mlx_specstream  # noqa: F401  (BLAS before mlx.core)
from mlx_specstream.training import sources
from mlx_specstream.training.selfinstruct import (
    NearDuplicates,
    clean_request,
    template_prefix,
    write_requests,
)

import pytest
from mlx_lm.utils import load as lm_load


def _lenient(text: str) -> str | None:
    text = text.strip()
    return text or None


def test_template_prefix_stops_where_the_user_writes(tiny_folder: Path):
    _, tok = lm_load(str(tiny_folder))
    ids = template_prefix(tok, [])
    text = tok.decode(ids)
    assert text.endswith("<|im_start|>user\n")
    hist = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    text2 = tok.decode(template_prefix(tok, hist))
    assert "hello" in text2 and text2.endswith("<|im_start|>user\n")


def test_clean_request_filters():
    assert clean_request("  Write a short poem about the sea.  ") == (
        "Write a short poem about the sea.")
    assert clean_request("hi") is None  # too short
    assert clean_request("Sure, here is the poem you asked for today") is None  # an answer
    assert clean_request("<|im_start|>assistant write a poem") is None  # template debris
    assert clean_request("这是 一个 中文 的 请求 吗") is None  # not English
    assert clean_request("x = [1, 2, 3] ; y = {4: 5} ; z = (6)") is None  # mostly symbols


def test_near_duplicates():
    d = NearDuplicates(0.6)
    assert d.add("How can I improve my sleep at night?")
    assert not d.add("How can I improve my sleep at night")
    assert d.add("Write a Python function that reverses a string.")


def test_write_requests_resumes_and_follows_up(tiny_folder: Path, tmp_path: Path):
    base, tok = lm_load(str(tiny_folder))
    out = tmp_path / "requests.jsonl"
    s1 = write_requests(base, tok, 5, out, batch_size=4, max_tokens=6,
                        accept=_lenient, keep_cut=True, progress=False)
    assert s1["written"] == 5 and not s1["stalled"]
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(r["messages"][-1]["role"] == "user" for r in recs)
    s2 = write_requests(base, tok, 8, out, batch_size=4, max_tokens=6,
                        accept=_lenient, keep_cut=True, progress=False)
    assert s2["already_done"] == 5 and s2["written"] == 3
    hist = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
    fu = tmp_path / "followups.jsonl"
    write_requests(base, tok, 2, fu, batch_size=4, max_tokens=6, accept=_lenient, keep_cut=True,
                   histories=hist, progress=False)
    for line in fu.read_text().splitlines():
        r = json.loads(line)
        assert r["task"] == "follow-up" and r["messages"][:2] == hist[0]


def test_write_requests_stops_when_nothing_is_usable(tiny_folder: Path, tmp_path: Path):
    base, tok = lm_load(str(tiny_folder))
    s = write_requests(base, tok, 3, tmp_path / "r.jsonl", batch_size=2, max_tokens=4,
                       accept=lambda _t: None, max_idle_rounds=2, progress=False)
    assert s["stalled"] and s["written"] == 0


def test_distill_cli_conversations_and_sampled_answers(tiny_folder: Path, tmp_path: Path):
    from mlx_specstream.cli import main
    from mlx_specstream.training.data import load_split

    p = tmp_path / "p.jsonl"
    convs = [[{"role": "user", "content": f"question {i}"},
              {"role": "assistant", "content": "an answer"},
              {"role": "user", "content": f"and then {i}?"}] for i in range(30)]
    p.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    out = tmp_path / "d"
    args = ["distill", "--model", str(tiny_folder), "--output", str(out), "--sources", "none",
            "--prompts", str(p), "--max-tokens", "4", "--batch-size", "8",
            "--sampled-fraction", "0.5", "--no-progress"]
    assert main(args) == 0
    recs = [json.loads(x) for f in ("train", "valid")
            for x in (out / f"{f}.jsonl").read_text().splitlines()]
    greedy = [r for r in recs if "temp" not in r]
    sampled = [r for r in recs if "temp" in r]
    assert len(greedy) == 30 and 0 < len(sampled) < 30
    assert all(len(r["messages"]) == 4 and r["messages"][-1]["role"] == "assistant"
               for r in recs)
    valid = [json.loads(x) for x in (out / "valid.jsonl").read_text().splitlines()]
    assert valid and all("temp" not in r for r in valid)  # valid: greedy answers only
    assert load_split(out, "train", lm_load(str(tiny_folder))[1])
    assert main(args) == 0  # resumes: nothing new
    assert sum(1 for f in ("train", "valid")
               for _ in (out / f"{f}.jsonl").read_text().splitlines()) == len(recs)


def test_stdlib_passage_tasks():
    items = sources.source_prompts("passages", 5)
    assert len(items) == 5
    assert all(len(c) == 1 and len(c[0]["content"]) > 300 for c in items)
    assert items == sources.source_prompts("passages", 5)  # fixed order
    with pytest.raises(ValueError, match="unknown prompt source"):
        sources.source_prompts("nope")


@pytest.mark.skipif(importlib.util.find_spec("chitchat_dataset") is None,
                    reason="chitchat-dataset not installed")
def test_chitchat_later_turns_have_history():
    from mlx_specstream.training.data import chitchat_prompts

    items = sources.source_prompts("chitchat-turns", 200)
    assert len(items) == 200
    for c in items:
        roles = [m["role"] for m in c]
        assert len(c) >= 3 and roles[-1] == "user"
        assert roles == ["user" if i % 2 == 0 else "assistant" for i in range(len(c))]
    held = set(chitchat_prompts()[1])
    assert not any(c[-1]["content"] in held for c in items[:50] if len(c[-1]["content"]) > 40)


@pytest.mark.skipif(importlib.util.find_spec("chatterbot_corpus") is None,
                    reason="chatterbot-corpus not installed")
def test_chatterbot_questions():
    items = sources.source_prompts("chatterbot")
    assert len(items) > 300
    assert all(len(c[0]["content"].split()) >= 3 for c in items)


def test_task_mix():
    from mlx_specstream.training.selfinstruct import TASKS, parse_tasks, steer

    assert parse_tasks(None) == TASKS
    mix = parse_tasks("coding=3,lists")
    assert [t.name for t in mix] == ["coding"] * 3 + ["lists"]

    class Tok:
        def apply_chat_template(self, *a, **k):
            return "<|im_start|>user\n" + a[0][0]["content"]

    rng = __import__("random").Random(0)
    names = {steer(rng, Tok(), parse_tasks("coding"))[0] for _ in range(20)}
    assert names == {"coding"}
    for bad, msg in (("cooking", "unknown task"), ("coding=0", ">= 1"),
                     ("coding=x", "whole number"), (",", "no task")):
        with pytest.raises(ValueError, match=msg):
            parse_tasks(bad)


def test_code_texts_are_real_functions_and_resume(tmp_path: Path):
    import ast

    from mlx_specstream.training.distill import read_records, write_code_texts

    items = sources.code_texts(30, seed=1)
    assert len(items) == 30 and len({s for s, _ in items}) == 30
    for src, code in items:
        assert src.split(":")[0] not in sources.HELDOUT_FILES
        ast.parse(code)  # whole functions, dedented
        assert code.lstrip().startswith(("def ", "async def ", "@"))
    assert write_code_texts(tmp_path, 10, seed=1)["written"] == 10
    r = write_code_texts(tmp_path, 30, seed=1)  # an interrupted run resumes
    assert (r["written"], r["already_done"]) == (20, 10)
    recs = read_records(tmp_path)
    assert [x["source"] for x in recs] == [s for s, _ in items]
    assert not (tmp_path / "valid.jsonl").exists()  # validation holds model answers only
