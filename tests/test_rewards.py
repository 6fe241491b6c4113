"""Rewards for GRPO (minke.rl.rewards): accuracy, R1's format, DAPO's overlong penalty, custom callables."""

import sys
import types

import pytest
import torch

from minke.rl.rewards import (RewardError, Rewards, accuracy, format_ok, load_callable, overlong_penalty,
                              reflection_rate)
from minke.tasks import Problem, problems

B = "\\boxed"


@pytest.fixture
def arith():
    return problems("arithmetic", "train", 3)


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "minke_test_rw.py").write_text(
        "def length_bonus(problem, response):\n    return len(response) / 10\n"
        "def boom(problem, response):\n    if 'x' in response:\n        raise ZeroDivisionError('no x')\n"
        "    return 1.0\n"
        "def nan(problem, response):\n    return float('nan')\n"
        "def nothing(problem, response):\n    return None\n"
        "class K:\n    @staticmethod\n    def half(problem, response):\n        return 0.5\n"
        "NOT_CALLABLE = 3\n")
    (tmp_path / "minke_test_broken_rw.py").write_text("raise RuntimeError('broken at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("minke_test_rw", "minke_test_broken_rw"):
        sys.modules.pop(name, None)


# ---------------------------------------------------------------- accuracy

def test_accuracy_builtin_tasks(arith):
    p = problems("countdown", "train", 1)[0]
    assert accuracy(p, p.solution) == 1.0
    assert accuracy(arith[0], f"reasoning</think>{B}{{{arith[0].answer}}}") == 1.0
    assert accuracy(arith[0], f"{B}{{{arith[0].answer}}} then {B}{{-12345}}") == 0.0  # the LAST box counts
    assert accuracy(arith[0], arith[0].answer) == 0.0  # no box, no credit


def test_accuracy_free_form_uses_math_equal(monkeypatch):
    calls = []

    def fake_math_equal(gold, response, timeout=2.0):
        calls.append((gold, response))
        return {"right": True, "wrong": False}.get(response)  # anything else: unparseable gold (None)

    monkeypatch.setitem(sys.modules, "minke.tasks.mathcheck",
                        types.SimpleNamespace(math_equal=fake_math_equal))
    p = Problem(task="math", prompt="q", answer="\\frac12", solution="")
    assert [accuracy(p, r) for r in ("right", "wrong", "?")] == [1.0, 0.0, 0.0]
    assert calls[0] == ("\\frac12", "right")  # gold first: math-verify's argument order matters


def test_accuracy_free_form_with_math_verify():
    pytest.importorskip("minke.tasks.mathcheck")
    pytest.importorskip("math_verify")
    p = Problem(task="math", prompt="q", answer="\\frac{1}{2}", solution="")
    assert accuracy(p, f"so</think>{B}{{\\frac{{1}}{{2}}}}") == 1.0
    assert accuracy(p, f"so</think>{B}{{3}}") == 0.0


# ---------------------------------------------------------------- format

@pytest.mark.parametrize("response, ok", [
    (f"step 1\nstep 2\n</think>\n\nThe answer is {B}{{3}}.", True),
    (f"r</think>{B}{{\\frac{{1}}{{2}}}}", True),              # nested braces
    ("r</think>the answer is 3", False),                        # no box
    (f"r</think>{B}{{}}", False),                               # empty box
    (f"r</think>{B}{{  }}", False),                             # blank box
    (f"r</think>{B}{{3", False),                                # unbalanced box
    (f"r {B}{{3}}", False),                                     # never closes the thinking
    (f"r {B}{{3}}</think>", False),                             # box only inside the thinking
    (f"a</think>b</think>{B}{{3}}", False),                     # two closes
    (f"<think>r</think>{B}{{3}}", False),                       # a second open (the prompt opened one)
    (f"r</think>{B}{{3}}<think>more", False),                   # reopens after the answer
    (f"  \n </think>{B}{{3}}", False),                          # blank reasoning
    ("", False),
])
def test_format_think_opened(response, ok):
    assert format_ok(response, think_opened=True) is ok


def test_cold_start_targets_are_well_formed():
    from minke.data.prompts import r1_response
    from minke.tasks import TASKS

    for name in TASKS:
        for p in problems(name, "train", 3, difficulty=2):
            assert format_ok(r1_response(p)) and accuracy(p, r1_response(p)) == 1.0


@pytest.mark.parametrize("response, ok", [
    (f"<think>r</think>{B}{{3}}", True),
    (f"\n  <think>\nr\n</think>\n\n{B}{{3}}", True),            # leading whitespace is fine
    (f"r<think>r</think>{B}{{3}}", False),                      # text before <think>
    (f"r</think>{B}{{3}}", False),                              # no <think>
    (f"<think>r<think>r</think>{B}{{3}}", False),               # two opens
    (f"</think><think>r</think>{B}{{3}}", False),               # close before open
    (f"<think> </think>{B}{{3}}", False),                       # blank reasoning
    (f"<think>r</think>", False),                               # no answer
])
def test_format_think_not_opened(response, ok):
    assert format_ok(response, think_opened=False) is ok


# ---------------------------------------------------------------- overlong

@pytest.mark.parametrize("length, want", [(0, 0.0), (80, 0.0), (81, -0.05), (90, -0.5), (100, -1.0),
                                          (101, -1.0), (10_000, -1.0)])
def test_overlong_penalty(length, want):
    assert overlong_penalty(length, max_len=100, buffer=20) == pytest.approx(want)


@pytest.mark.parametrize("max_len, buffer", [(100, 0), (100, 101), (100, -5)])
def test_overlong_bad_buffer(max_len, buffer):
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(50, max_len, buffer)


# ---------------------------------------------------------------- custom callables

def test_load_callable(reward_module):
    assert load_callable("minke_test_rw:length_bonus")(None, "abcde") == 0.5
    assert load_callable("minke_test_rw:K.half")(None, "") == 0.5


@pytest.mark.parametrize("spec, msg", [
    ("minke_test_rw", "expected 'module:function'"),
    ("minke_test_rw:", "expected 'module:function'"),
    ("minke_no_such_module_xyz:f", "cannot import module 'minke_no_such_module_xyz'"),
    ("minke_test_broken_rw:f", "broken at import"),
    ("minke_test_rw:missing", "has no attribute 'missing'"),
    ("minke_test_rw:K.missing", "has no attribute 'missing'"),
    ("minke_test_rw:NOT_CALLABLE", "not callable"),
])
def test_load_callable_errors_name_the_spec(reward_module, spec, msg):
    with pytest.raises(RewardError, match=msg) as e:
        load_callable(spec)
    assert repr(spec) in str(e.value)


@pytest.mark.parametrize("fn, msg", [("boom", "raised on sample 1: ZeroDivisionError: no x"),
                                     ("nan", "returned nan on sample 0"),
                                     ("nothing", "returned None on sample 0, not a number")])
def test_custom_reward_failures_name_callable_and_sample(reward_module, arith, fn, msg):
    r = Rewards(custom=[(f"minke_test_rw:{fn}", 1.0)])
    with pytest.raises(RewardError, match=msg) as e:
        r.score(arith[:2], ["fine", "has an x"])
    assert f"minke_test_rw:{fn}" in str(e.value)


def test_custom_reward_bad_spec_fails_at_construction():
    with pytest.raises(RewardError, match="minke_no_such_module_xyz"):
        Rewards(custom=[("minke_no_such_module_xyz:f", 1.0)])


# ---------------------------------------------------------------- combined score

def test_score_weighted_total(reward_module, arith):
    a0, a1, a2 = (p.answer for p in arith)
    responses = [f"ok</think>{B}{{{a0}}}",      # right, formatted
                 f"{B}{{{a1}}}",                   # right, no </think>
                 f"ok</think>{B}{{-99999}}"]       # wrong, formatted
    rw = Rewards(weights={"accuracy": 1.0, "format": 0.5}, overlong=(10, 4),
                 custom=[("minke_test_rw:length_bonus", 2.0)])
    total, comps = rw.score(arith, responses, lengths=[5, 8, 12])
    assert comps["accuracy"] == [1.0, 1.0, 0.0]
    assert comps["format"] == [1.0, 0.0, 1.0]
    assert comps["overlong"] == [0.0, -0.5, -1.0]  # free up to 6 tokens, -1 at 10
    bonus = [len(r) / 10 for r in responses]
    assert comps["minke_test_rw:length_bonus"] == pytest.approx(bonus)
    want = [1 + 0.5 + 0 + 2 * bonus[0], 1 + 0 - 0.5 + 2 * bonus[1], 0 + 0.5 - 1 + 2 * bonus[2]]
    assert total.dtype == torch.float32 and total.shape == (3,)
    torch.testing.assert_close(total, torch.tensor(want))


def test_score_defaults_and_errors(arith):
    rw = Rewards(think_opened=False, weights={"accuracy": 1.0})  # format logged, weight 0
    total, comps = rw.score(arith[:1], [f"<think>r</think>{B}{{{arith[0].answer}}}"])
    assert total.tolist() == [1.0] and comps["format"] == [1.0] and "overlong" not in comps
    with pytest.raises(ValueError, match="unknown reward weight"):
        Rewards(weights={"acc": 1.0})
    with pytest.raises(ValueError, match="overlong=\\(max_len, buffer\\)"):
        Rewards(weights={"overlong": 1.0})
    with pytest.raises(ValueError, match="buffer"):
        Rewards(overlong=(10, 0))
    with pytest.raises(ValueError, match="token lengths"):
        Rewards(overlong=(10, 4)).score(arith[:1], ["x"])
    with pytest.raises(ValueError, match="2 responses"):
        Rewards().score(arith[:1], ["x", "y"])


# ---------------------------------------------------------------- reflection

def test_reflection_rate():
    responses = ["Wait, that is wrong.", "no reflection here", "I verified it", "VERIFY: 2+2=4",
                 "awaiting; checking", "let me check."]
    assert reflection_rate(responses) == pytest.approx(3 / 6)  # whole words only: not verified/checking
    assert reflection_rate([]) == 0.0
