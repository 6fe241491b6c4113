"""Answer checkers become GRPO rewards and eval graders: whatever a policy writes, `check` returns a bool,
False for anything it cannot interpret, within milliseconds (issue 15)."""

import contextlib
import random
import signal
import time
from collections import Counter

import pytest

from minke.tasks import TASKS, extract_boxed, problems

CPU_BOUND = 0.5  # seconds of this process's CPU per call: generous, and immune to other jobs' load
HANG_GUARD = 5.0  # wall seconds before a call is interrupted, so a regression fails fast instead of hanging


@contextlib.contextmanager
def hang_guard(seconds=HANG_GUARD):
    def fire(signum, frame):
        raise AssertionError(f"call did not return within {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def timed_check(task, problem, response):
    with hang_guard():
        t0 = time.process_time()
        result = task.check(problem, response)
        cpu = time.process_time() - t0
    assert type(result) is bool, f"{task.name}: check returned {result!r} on {response!r:.60}"
    assert cpu < CPU_BOUND, f"{task.name}: check took {cpu:.3f} s CPU on {response!r:.60}"
    return result


def _script(digits: str, zero: str) -> str:
    return digits.translate({ord("0") + i: ord(zero) + i for i in range(10)})


def garbage(problem) -> dict[str, object]:
    """Adversarial responses none of which is a correct answer to `problem`."""
    right = problem.solution.rsplit("\\boxed{", 1)[1][:-1]  # the correct boxed answer
    mb = 1 << 20
    return {
        "20,000 boxes": "\\boxed{" * 20_000,  # issue 15: 305 s on arithmetic
        "5,000 digits": "\\boxed{" + "9" * 5000 + "}",  # issue 15: ValueError on arithmetic
        "5,000 digits unclosed": "\\boxed{" + "9" * 5000,
        "4,400 digits + ws": "\\boxed{1" + "0 " * 4400 + "}",
        "megabyte of digits": "\\boxed{" + "9" * mb + "}",
        "megabyte of text": "x" * mb,
        "megabyte then box": "y" * mb + "\\boxed{not a number}",
        "megabyte of {": "\\boxed{" + "{" * mb,
        "megabyte of }{": "\\boxed{" + "}{" * (mb // 2),
        "box of a megabyte of {}": "\\boxed{" + "{}" * (mb // 2) + "}",
        "megabyte of boxes": "\\boxed{" * (mb // 7),
        "megabyte of NUL": "\x00" * mb,
        "huge expression": "\\boxed{" + "1+" * 100_000 + "1}",
        "huge product": "\\boxed{" + "*".join(["99"] * 66) + "}",
        "deep parens": "\\boxed{" + "(" * 100_000 + "1" + ")" * 100_000 + "}",
        "deep parens, short": "\\boxed{" + "(" * 99 + "7" + ")" * 99 + "}",
        "too deep for the parser": "\\boxed{" + "(" * 250 + ")" * 250 + "}",
        "unary chain": "\\boxed{" + "-" * 198 + "1}",
        "division chain": "\\boxed{" + "1/" * 99 + "0}",
        "unbalanced (": "\\boxed{((1+2)}",
        "unbalanced )": "\\boxed{(1+2))}",
        "empty box": "\\boxed{}",
        "stray braces": "}" * 1000 + "\\boxed{" + "{" * 1000,
        "nested boxes": "\\boxed{" * 500 + "}" * 499,
        "control chars": "\\boxed{\x1b[31m5\x1b[0m\x07\x08\x0b\x0c\r}",
        "NUL inside": "\\boxed{1\x00}",
        "NUL only": "\\boxed{\x00}",
        "lone surrogate": "\\boxed{\ud800}",
        "surrogate + digit": "\\boxed{1\udfff}",
        "zero-width": "\\boxed{1\u200b\u200e2\ufeff}",
        "hex literal": "\\boxed{0x10}",
        "underscore literal": "\\boxed{1_0}",
        "float": "\\boxed{1e400}",
        "power": "\\boxed{9**9**9**9}",
        "injection": "\\boxed{__import__('os').system('true')}",
        # The right answer in other scripts' digits: int() accepts them, the checkers deliberately don't.
        "Arabic-Indic digits": f"\\boxed{{{_script(right, '٠')}}}",
        "fullwidth digits": f"\\boxed{{{_script(right, '０')}}}",
        "Devanagari digits": f"\\boxed{{{_script(right, '०')}}}",
        "right answer unboxed": right,
        "right answer, truncated box": "\\boxed{" + right,
        "right answer, then a wrong box": f"\\boxed{{{right}}} no: \\boxed{{{'9' * 30}}}",
    }


@pytest.mark.parametrize("name", sorted(TASKS))
def test_adversarial_outputs_are_false_and_fast(name):
    task = TASKS[name]
    for difficulty in (1, 3):
        p = task.generate(3, difficulty)
        for label, response in garbage(p).items():
            assert timed_check(task, p, response) is False, f"{name}: {label}"
        for response in (None, b"\\boxed{1}", 42, ["\\boxed{1}"]):  # not a str: wrong, not a crash
            assert timed_check(task, p, response) is False


PIECES = ["\\boxed{", "\\boxed", "{", "}", "(", ")", "+", "-", "*", "/", "=", "0", "7", "99", "9" * 50,
          " ", ",", "\u2212", "\u00d7", "\u00f7", "\x00", "\x01", "\x02", "\n", "\ud83d", "١", "７",
          "\\frac{1}{2}", "x", "é", "<think>", "</think>", "1.5", "1e9", "_", "**", "\\"]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_random_adversarial_outputs_return_bool_quickly(name):
    task, rng = TASKS[name], random.Random(15)
    p = task.generate(5, 2)
    for _ in range(400):
        n = rng.choice([1, 5, 30, 300, 3000])
        response = "".join(rng.choice(PIECES) for _ in range(n))
        if rng.random() < 0.3:
            response = p.solution + response  # right answer followed by garbage
        timed_check(task, p, response)  # a bool within the bound (right or wrong)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_correct_answers_still_pass_under_noise(name):
    task = TASKS[name]
    for p in problems(name, "test", 30, 3):
        assert timed_check(task, p, p.solution)
        # a repetition loop after the answer leaves only truncated boxes: the complete one still counts
        assert timed_check(task, p, p.solution + " wait \\boxed{" * 20_000)
        assert timed_check(task, p, "\x00\ud800" * 1000 + "{" * 10_000 + p.solution + "}" * 50)


def reference_extract_boxed(text):
    """The former quadratic definition: for each opening from the right, scan forward for its close."""
    start = text.rfind("\\boxed{")
    while start != -1:
        depth, i = 1, start + len("\\boxed{")
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len("\\boxed{"): i - 1]
        start = text.rfind("\\boxed{", 0, start)
    return None


def test_extract_boxed_matches_the_reference_and_is_linear():
    rng = random.Random(0)
    pieces = ["\\boxed{", "{", "}", "a", "\x01", "\x02", "\\box", "ed{", "\\boxed", "\ud800"]
    for _ in range(20_000):
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        assert extract_boxed(s) == reference_extract_boxed(s), repr(s)
    assert extract_boxed("\\boxed{" * 3 + "}") == ""
    assert extract_boxed("\\boxed{a\\boxed{b}c") == "b"  # inner box closes, outer does not
    assert extract_boxed("\\boxed{a\\boxed{b}c}") == "b"  # nested: the inner (rightmost) opening counts
    assert extract_boxed("\\boxed {1}") is None  # only the exact spelling opens a box
    # the answer is found wherever it lies, with chunk boundaries anywhere
    for pad in (0, 1, 4095, 4096, 4097, 70_000):
        assert extract_boxed("{" * pad + "\\boxed{x{y}}" + "}{" * pad) == "x{y}"
        assert extract_boxed("\\boxed{" + "{}" * pad + "}" + "{" * pad) == "{}" * pad
    for text in ["\\boxed{" * 20_000, "\\boxed{" + "{" * (1 << 20), "\\boxed{" + "{}" * (1 << 19) + "}"]:
        with hang_guard():
            t0 = time.process_time()
            extract_boxed(text)
            assert time.process_time() - t0 < CPU_BOUND


# --- math_equal: free-form answers through math-verify in a bounded worker process -------------------

from minke.tasks import mathcheck  # noqa: E402
from minke.tasks.mathcheck import math_equal  # noqa: E402

SLACK = 5.0  # wall seconds beyond the timeout: a (re)start of the worker, a loaded CI machine


def timed_math_equal(gold, response, timeout=2.0):
    t0 = time.monotonic()
    result = math_equal(gold, response, timeout=timeout)
    assert time.monotonic() - t0 < timeout + SLACK, f"math_equal({gold!r:.30}, {response!r:.60})"
    return result


def test_math_equal_judges_forms_of_the_same_answer():
    for gold, response in [("\\frac{1}{2}", "so \\boxed{0.5}"), ("\\frac{1}{2}", "\\boxed{1/2}"),
                           ("\\frac{1}{2}", "\\boxed{\\dfrac12}"), ("18", "\\boxed{18.0}"),
                           ("1,234", "\\boxed{1234}"), ("x^2+1", "\\boxed{1+x^2}"),
                           ("3\\sqrt{13}", "\\boxed{\\sqrt{117}}"), (72, "\\boxed{72}"),
                           ("\\boxed{7}", "\\boxed{7}")]:  # a gold solution text keeps its own box
        assert timed_math_equal(gold, response) is True, (gold, response)
    for gold, response in [("10", "\\boxed{11}"), ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}"),
                           ("2", "\\boxed{x}"),
                           ("10", "the answer is 10"),  # no box: wrong, no fallback extraction
                           ("10", "\\boxed{10} no, \\boxed{11}"),  # the last box counts
                           ("10", "\\boxed{10")]:  # truncated
        assert timed_math_equal(gold, response) is False, (gold, response)
    for gold in ["", "   ", "}{", None, ["1"], "x" * (mathcheck.MAX_GOLD_CHARS + 1)]:  # no parse: None
        assert timed_math_equal(gold, "\\boxed{1}") is None, gold
        assert timed_math_equal(gold, "no box at all") is None, gold


def test_math_equal_is_bounded_on_adversarial_responses():
    for response in ["\\boxed{" * 20_000, "\\boxed{" + "9" * 5000 + "}", "\\boxed{" + "9" * (1 << 20) + "}",
                     "z" * (1 << 20), "\x00" * 1000 + "\\boxed{\x00}", "\\boxed{\ud800}", "\\boxed{1\udfff}",
                     "\\boxed{" + "(" * 300 + ")" * 300 + "}", "\\boxed{}", "\\boxed{\\frac{1}{0}}",
                     "\\boxed{9^{9^{9^{9}}}}",  # sympy busy in Python: the worker stops itself
                     "\\boxed{10^{10^{10}}}",  # stuck in C: the worker is killed, restarted on the next call
                     None, b"\\boxed{2}", 2]:
        assert timed_math_equal("2", response, timeout=0.5) is False, f"{response!r:.60}"
    assert timed_math_equal("2", "\\boxed{2}") is True  # still works after a kill


def test_math_equal_off_the_main_thread():
    """math-verify's own timeout (signal.alarm) raises off the main thread; this path must not."""
    import threading

    results, errors = [], []

    def run():
        try:
            results.append(math_equal("2", "\\boxed{9^{9^{9^{9}}}}", timeout=0.5))
            results.append(math_equal("\\frac{1}{2}", "\\boxed{0.5}"))
            results.append(math_equal("}{", "\\boxed{1}"))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    assert Counter(results) == {False: 3, True: 3, None: 3}  # interleaved across threads
    assert time.monotonic() - t0 < 3 * (0.5 + 2 * 0.1) + SLACK  # the calls take turns on one worker


def test_math_equal_kills_a_worker_that_does_not_answer(tmp_path, monkeypatch):
    mute = tmp_path / "mute.py"
    mute.write_text("import sys, time\nprint('ready', flush=True)\nsys.stdin.readline()\ntime.sleep(600)\n")
    mathcheck.close()
    monkeypatch.setattr(mathcheck, "_WORKER", mute)
    t0 = time.monotonic()
    assert math_equal("2", "\\boxed{2}", timeout=0.3) is False
    assert time.monotonic() - t0 < 0.3 + SLACK
    assert mathcheck._worker.proc is None  # killed; the next call starts a fresh one
    broken = tmp_path / "broken.py"
    broken.write_text("print('error ImportError: No module named math_verify', flush=True)\n")
    monkeypatch.setattr(mathcheck, "_WORKER", broken)
    with pytest.raises(RuntimeError, match="math_verify"):
        math_equal("2", "\\boxed{2}")
    monkeypatch.undo()
    assert math_equal("2", "\\boxed{2}") is True
