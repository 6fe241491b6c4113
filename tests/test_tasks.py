import pytest

from minke.tasks import TASKS, check, corpus, extract_boxed, get_task, problems, split_of
from minke.tasks.countdown import evaluate


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("difficulty", [1, 2, 4])
def test_deterministic_and_solution_checks(name, difficulty):
    task = get_task(name)
    a, b = task.generate(7, difficulty), task.generate(7, difficulty)
    assert a == b and a.task == name
    assert task.generate(8, difficulty).prompt != a.prompt
    for p in problems(name, "train", 200, difficulty):
        assert check(p, p.solution) and task.reward(p, "Thus " + p.solution) == 1.0
        assert extract_boxed(p.solution) is not None


# The difficulty scale each task's docstring states: operand count and digits (arithmetic), how many
# numbers and their range (countdown). Levels 1-3 are the speedrun's; the jump to four-number countdown
# and three-digit operands comes at level 4.
@pytest.mark.parametrize("difficulty,operands,digits", [(1, 2, 2), (2, 3, 2), (3, 4, 2), (4, 5, 3), (5, 5, 3)])
def test_arithmetic_difficulty_scale(difficulty, operands, digits):
    ps = problems("arithmetic", "train", 300, difficulty)
    nums = [[int(t) for t in p.meta["expression"].split()[::2]] for p in ps]
    assert {len(n) for n in nums} == {operands}
    assert max(len(str(x)) for n in nums for x in n) == digits


@pytest.mark.parametrize("difficulty,count,hi", [(1, 3, 10), (2, 3, 20), (3, 3, 50), (4, 4, 25), (5, 4, 50)])
def test_countdown_difficulty_scale(difficulty, count, hi):
    ps = problems("countdown", "train", 300, difficulty)
    assert {len(p.meta["numbers"]) for p in ps} == {count}
    assert max(max(p.meta["numbers"]) for p in ps) == hi and min(min(p.meta["numbers"]) for p in ps) == 1


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_arithmetic_worked_steps_are_true_and_split_by_place_value(difficulty):
    """Every "x op y = z" line of a worked solution is true arithmetic, and a 2-digit operand is split
    into tens and units (81 - 57 as 81 - 50, then - 7; 34 * 2 as 30 * 2 + 4 * 2)."""
    import re

    line = re.compile(r"(-?\d+) ([-+*]) (\d+) = (-?\d+)")
    for p in problems("arithmetic", "train", 200, difficulty):
        for text in p.solution.split("\n")[:-1]:
            m = line.fullmatch(text)
            if m is None:
                assert text.startswith("So "), text
                continue
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            assert c == (a + b if op == "+" else a - b if op == "-" else a * b), text
    p = get_task("arithmetic").generate(0, 1)
    assert p.prompt == "What is 81 - 57?" and p.solution == "81 - 50 = 31\n31 - 7 = 24\n\\boxed{24}"
    q = next(q for q in problems("arithmetic", "train", 200, 2) if "34 * 2" in q.prompt)
    assert q.solution.startswith("30 * 2 = 60\n4 * 2 = 8\n60 + 8 = 68\n")


def test_extract_boxed():
    assert extract_boxed(r"\boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{3} and a truncated \boxed{4") == "3"
    assert extract_boxed("no box: 42") is None


def test_arithmetic_answers_and_rejections():
    task = get_task("arithmetic")
    for p in problems(task, "train", 300, 3):
        assert int(p.answer) == eval(p.meta["expression"])  # trusted generated text; checks precedence
    p = task.generate(0, 1)
    n = int(p.answer)
    assert task.check(p, f"so \\boxed{{ {n} }}") and task.check(p, f"\\boxed{{{n:,}}}")
    assert not task.check(p, f"\\boxed{{{n + 1}}}") and not task.check(p, f"\\boxed{{{n - 1}}}")
    assert not task.check(p, f"the answer is {n}")  # no box
    assert not task.check(p, f"\\boxed{{{n}}} wait, \\boxed{{{n + 1}}}")  # last box counts
    assert not task.check(p, r"\boxed{x}")
    assert max(len(q.solution) for q in problems(task, "train", 300, 2)) < 300


def test_countdown_checker():
    task = get_task("countdown")
    p = task.generate(0, 1)
    p.meta.update(numbers=[1, 2, 4], target=2)
    assert task.check(p, r"\boxed{4 / 2 * 1}") and task.check(p, r"\boxed{(4 - 2) * 1 = 2}")
    assert task.check(p, r"\boxed{4 ÷ 2 × 1}")
    assert not task.check(p, r"\boxed{(1 / 2) * 4}")  # non-integer intermediate
    assert not task.check(p, r"\boxed{4 / 2}")  # 1 unused: each number exactly once
    assert not task.check(p, r"\boxed{4 / 2 * 1 * 1}")  # 1 used twice
    assert not task.check(p, r"\boxed{4 / 2 * 3 / 3}")  # number not given
    assert not task.check(p, r"\boxed{4 + 2 * 1}")  # wrong value
    assert not task.check(p, "4 / 2 * 1")  # no box
    # injection, division by zero, and forms outside the whitelist that would otherwise reach 2
    for bad in ["__import__('os')", "4 / (2 - 2) * 1", "-(2 - 4) * 1", "4.0 / 2 * 1", "4 ** 1 / 2"]:
        assert not task.check(p, f"\\boxed{{{bad}}}"), bad
    assert evaluate("(75 - 25) * 2") == (100, [75, 25, 2])


@pytest.mark.parametrize("name", sorted(TASKS))
def test_train_test_disjoint(name):
    train = {p.prompt for p in problems(name, "train", 2000, 1)}
    test = problems(name, "test", 200, 1)
    assert all(split_of(p.prompt) == "test" for p in test)
    assert not train & {p.prompt for p in test}
    assert len({p.prompt for p in test}) == 200  # distinct


def test_corpus():
    docs = corpus(50, seed=1)
    assert docs == corpus(50, seed=1) and docs != corpus(50, seed=2)
    assert all(d.startswith("Question: ") and "\nAnswer: " in d and "\\boxed{" in d for d in docs)
    assert {d.split()[1] for d in docs} == {"What", "Using"}  # both tasks present
    assert not {d.split("\n")[0][10:] for d in corpus(300, 0, "test")} & {
        d.split("\n")[0][10:] for d in corpus(3000, 0, "train")}


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_countdown_search_trace_rejects_only_real_misses_and_ends_in_the_solution(difficulty):
    """Every step of the trace is true arithmetic, every rejected attempt really misses the target (and
    uses each number once), and the trace ends in the problem's own checked solution."""
    import random
    from fractions import Fraction

    task = TASKS["countdown"]
    rejected = 0
    for p in problems("countdown", "train", 20, difficulty):
        trace = task.search_solution(p, random.Random(p.prompt), failures=3)
        lines = trace.split("\n")
        assert lines[-1] == p.solution.split("\n")[-1] and task.check(p, trace)
        assert lines[-2] == f"{p.meta['target']} is the target."
        for line in lines[:-2]:
            if line.endswith("Wait, try again."):
                value = Fraction(line.split(" is not ")[0])
                assert value != p.meta["target"] and line == f"{value} is not {p.meta['target']}. Wait, try again."
                rejected += 1
                continue
            a, op, b, eq, v = line.split()
            assert eq == "=" and Fraction(v) == {"+": Fraction(a) + Fraction(b), "-": Fraction(a) - Fraction(b),
                                                 "*": Fraction(a) * Fraction(b), "/": Fraction(a) / Fraction(b)}[op]
        assert lines.count("Wait, try again.") == 0  # the phrase only ends a rejection line
        assert task.search_solution(p, random.Random(p.prompt), failures=0) == p.solution.replace(
            "\n\\boxed", f"\n{p.meta['target']} is the target.\n\\boxed")
    assert rejected > 20  # attempts do miss: the trace really searches
