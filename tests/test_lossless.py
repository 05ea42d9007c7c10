"""The lossless check (``mlx_specstream.lossless``): our greedy output teacher-forced
through mlx-lm's ``generate_step``, exact with the row-invariant kernel, within the
tolerance under simulated row-count-dependent rounding, and failing on a wrong token."""

from __future__ import annotations

import json

import mlx_specstream  # noqa: F401  (BLAS before mlx.core)
from mlx_specstream.decode import DecodeStats, speculative_steps
from mlx_specstream.lossless import (
    DEFAULT_TOLERANCE_ULPS,
    Divergence,
    LosslessReport,
    check_greedy,
    row_dependent_rounding,
    row_noise,
    ulp,
)
from mlx_specstream.tree import product_tree
from tinymodels import tiny_model

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.generate import generate_step

PROMPTS = [[(seed * 7 + i * 5) % 60 + 1 for i in range(5 + seed)] for seed in range(8)]
N_TOKENS = 24


def ours(model, prompt: list[int]) -> list[int]:
    return list(speculative_steps(model, mx.array(prompt), N_TOKENS, DecodeStats(),
                                  tree=product_tree([3, 2, 1])))


def mlx_lm_greedy(model, prompt: list[int]) -> list[int]:
    return [int(t) for t, _ in generate_step(mx.array(prompt), model.base,
                                             max_tokens=N_TOKENS)]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=0)


def test_ulp_is_the_rounding_step_at_the_top_logit() -> None:
    assert ulp(20.0, "bfloat16") == 0.125
    assert ulp(-20.0, "bfloat16") == 0.125
    assert ulp(40.0, "float16") == 2.0**-5
    assert ulp(0.3, "float32") == 2.0**-23  # below 1 the step at 1
    with pytest.raises(ValueError, match="no rounding step"):
        ulp(1.0, "int8")


def test_mlx_lms_own_output_checks_exact(model) -> None:
    for prompt in PROMPTS[:3]:
        report = check_greedy(model.base, prompt, mlx_lm_greedy(model, prompt))
        assert report.exact and report.passed and report.n_tokens == N_TOKENS


def test_speculative_output_is_exact_with_row_invariant_kernels(model) -> None:
    for prompt in PROMPTS[:3]:
        report = check_greedy(model, prompt, ours(model, prompt))
        assert report.exact, report.summary()
        assert report.dtype == "float32"
        assert report.tolerance_ulps == DEFAULT_TOLERANCE_ULPS["float32"]


def test_simulated_rounding_makes_multi_row_logits_differ(model) -> None:
    tokens = mx.array([PROMPTS[0]])
    before = model.base(tokens)[0, -1]
    with row_dependent_rounding(mx.bfloat16):
        multi = model.base(tokens)[0, -1]
        single = model.base(tokens[:, :1])[0, -1]
    assert not mx.array_equal(multi, before).item()
    assert mx.allclose(multi, before, atol=0.1).item()
    assert mx.array_equal(single, model.base(tokens[:, :1])[0, -1]).item()
    assert nn.Linear.__call__.__name__ == "__call__"  # the classes are restored


def test_divergences_under_simulated_rounding_are_within_tolerance(model) -> None:
    """bfloat16 partial sums in multi-row products: some outputs leave mlx-lm's (under
    the same simulated kernels), and every such token is a near-tie."""
    diverged = 0
    with row_dependent_rounding(mx.bfloat16):
        for prompt in PROMPTS:
            tokens = ours(model, prompt)
            report = check_greedy(model, prompt, tokens, dtype="bfloat16")
            assert report.passed, report.summary()
            if tokens != mlx_lm_greedy(model, prompt):
                diverged += 1
                assert not report.exact
                first = report.divergences[0]
                assert tokens[: first.position] == mlx_lm_greedy(model, prompt)[: first.position]
            for d in report.divergences:
                assert 0 < d.margin <= d.ulps * ulp(d.top_logit, "bfloat16") + 1e-9
                assert d.ulps <= DEFAULT_TOLERANCE_ULPS["bfloat16"]
    assert diverged >= 1  # else the simulation did not exercise the tolerance


def test_a_wrong_token_fails_the_check(model) -> None:
    prompt = PROMPTS[1]
    tokens = ours(model, prompt)
    k = 5
    logits = model.base(mx.array([prompt + tokens[:k]]))[0, -1]
    wrong = list(tokens)
    wrong[k] = int(mx.argmin(logits).item())
    report = check_greedy(model, prompt, wrong)
    assert not report.passed
    first = report.divergences[0]
    assert (first.position, first.token) == (k, wrong[k])
    assert first.argmax == tokens[k]
    expected = (logits.max() - logits.min()).item()
    assert first.margin == pytest.approx(expected, rel=1e-5)
    assert first.ulps > report.tolerance_ulps
    # A tolerance wide enough for any margin passes it: the verdict follows the tolerance.
    assert check_greedy(model, prompt, wrong, tolerance_ulps=first.ulps * 2 ** 10).passed


def test_report_summary_merge_and_json() -> None:
    a = LosslessReport("bfloat16", 12.0, 10, [Divergence(3, 7, 9, 0.25, 2.0, 20.0)])
    b = LosslessReport("bfloat16", 12.0, 5, [Divergence(1, 4, 2, 2.5, 20.0, 20.0)])
    assert a.passed and not a.exact and a.summary().startswith("pass: 10 tokens, 1 not")
    both = a.merge(b)
    assert both.n_tokens == 15 and len(both.divergences) == 2 and not both.passed
    assert both.max_margin == 2.5 and both.summary().startswith("FAIL")
    assert json.loads(json.dumps(both.to_dict()))["max_ulps"] == 20.0
    with pytest.raises(ValueError, match="do not merge"):
        a.merge(LosslessReport("float32", 64.0, 1))
    assert LosslessReport("float32", 64.0, 3).summary().startswith("exact")
    with pytest.raises(ValueError, match="tolerance_ulps"):
        check_greedy(tiny_model("llama").base, [1, 2], [3], tolerance_ulps=-1.0)


def test_row_noise_is_zero_with_row_invariant_kernels_and_not_under_simulation(model) -> None:
    context = PROMPTS[2] + ours(model, PROMPTS[2])[:6]
    assert row_noise(model.base, context, rows=8) == 0.0
    with row_dependent_rounding(mx.bfloat16):
        assert row_noise(model.base, context, rows=8) > 0.0
    with pytest.raises(ValueError, match="at least 2 tokens"):
        row_noise(model.base, [3], rows=8)


def test_a_bfloat16_model_diverges_only_where_row_noise_explains_it() -> None:
    """A tiny random model amplifies rounding far more than a trained one: its margins
    can exceed the default tolerance, but each stays within twice the row noise measured
    at its position, which a wrong token does not."""
    model = tiny_model("llama", seed=0)
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    measured = 0
    with row_dependent_rounding():
        for prompt in PROMPTS[:4]:
            tokens = ours(model, prompt)
            report = check_greedy(model, prompt, tokens)
            assert report.dtype == "bfloat16" and not report.unexplained, report.summary()
            measured += sum(d.row_noise is not None and d.row_noise > 0
                            for d in report.divergences)
        assert measured >= 1
        k = 4
        logits = model.base(mx.array([prompt + tokens[:k]]))[0, -1]
        wrong = tokens[:k] + [int(mx.argmin(logits).item())] + tokens[k + 1:]
        report = check_greedy(model, prompt, wrong)
    flagged = next(d for d in report.divergences if d.position == k)
    assert flagged.token == wrong[k] and flagged.explained_by_rounding is False
    assert not report.passed and report.unexplained[0] is flagged  # later ones follow it


def test_check_command(api_model_dir, tmp_path, capsys) -> None:
    from mlx_specstream import cli

    out = tmp_path / "report.json"
    base = ["check", "--model", str(api_model_dir), "-p", "Hello", "-m", "8"]
    assert cli.main(base + ["--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "exact: " in printed and "not mlx-lm's argmax (float32, tolerance 128 ulps)" in printed
    report = json.loads(out.read_text())
    assert report["exact"] and report["passed"] and 1 <= report["n_tokens"] <= 8
    assert cli.main(base + ["--tolerance", "-1"]) == 1
    assert "--tolerance must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["check", "--help"])
    assert "mlx-lm's own decoding loop" in " ".join(capsys.readouterr().out.split())


def test_a_one_token_prompt_checks_without_row_noise_at_the_first_token(model) -> None:
    tokens = mlx_lm_greedy(model, [7])
    logits = model.base(mx.array([[7]]))[0, -1]
    wrong = [int(mx.argmin(logits).item())] + tokens[1:]
    first = check_greedy(model, [7], wrong).divergences[0]
    assert first.position == 0 and first.row_noise is None
    assert first.explained_by_rounding is None
