"""minke eval: the metrics against brute force, JSONL parsing, the evaluation's accounting, and the stage
end to end on a tiny checkpoint, in-process and through minke serve (same numbers)."""

import itertools
import json
import math

import pytest
import torch

import minke
from minke.eval import cons_at_k, evaluate, format_table, mean_pass_at_k, pass1, pass_at_k
from minke.eval import data as evdata
from minke.eval.metrics import normalize_answer
from minke.eval.run import main
from minke.eval.sampling import OpenAIBackend, Response

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- metrics ---------------------------------------------------------------------------------------
def brute_pass_at_k(n, c, k):
    """Fraction of all k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_stable():
    n, c, k = 2000, 7, 100
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    assert pass_at_k(n, 0, k) == 0.0 and pass_at_k(n, n, k) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the plain fraction


@pytest.mark.parametrize("args", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_bad_counts(args):
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(*args)


def test_pass1_and_mean_pass_at_k():
    correct = [[True, False, False, False], [True, True, True, True], [False] * 4]
    assert pass1(correct) == pytest.approx((0.25 + 1 + 0) / 3)
    assert mean_pass_at_k(correct, 4) == pytest.approx(2 / 3)
    assert mean_pass_at_k(correct, 2) == pytest.approx((0.5 + 1 + 0) / 3)  # 1 - C(3,2)/C(4,2) = 0.5


def test_cons_at_k_majority_and_ties():
    right = lambda a: a == "5"  # noqa: E731
    assert cons_at_k(["5", "5", "4"], right) == 1.0
    assert cons_at_k(["4", "4", "5"], right) == 0.0
    # tie rule: the fraction of the tied top answers that are correct (random tie-break's expectation)
    assert cons_at_k(["5", "4"], right) == 0.5
    assert cons_at_k(["4", "5", "5", "4", "3"], right) == 0.5
    assert cons_at_k(["4", "6", "5"], right) == pytest.approx(1 / 3)
    assert cons_at_k(["5", "4", "4", "5"], right) == cons_at_k(["4", "5", "5", "4"], right)  # order-free
    # missing answers do not vote; no answer at all scores 0
    assert cons_at_k([None, None, "5"], right) == 1.0
    assert cons_at_k([None, None], right) == 0.0
    # a tie between two correct forms scores 1
    assert cons_at_k(["5", "5.0"], lambda a: float(a) == 5) == 1.0


def test_cons_at_k_votes_by_normalised_answer():
    assert normalize_answer(" \\dfrac{1}{2} ") == normalize_answer("\\frac{1}{2}") == "\\frac{1}{2}"
    assert normalize_answer("$5$.") == normalize_answer("5") == normalize_answer("\\text{5}")
    graded = []
    # "\\frac{1}{2}" twice (two spellings) beats "3" once; the first raw form is what gets graded
    assert cons_at_k(["\\dfrac{1}{2}", "3", "\\frac {1}{2}"], lambda a: graded.append(a) or True) == 1.0
    assert graded == ["\\dfrac{1}{2}"]


# ---- JSONL sets ------------------------------------------------------------------------------------
def test_read_jsonl_layouts(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join([
        json.dumps({"problem": "What is $1+1$?", "answer": "2", "level": 3, "solution": "1+1=2"}),
        "",
        json.dumps({"problem": "AIME-style", "answer": 204}),
        json.dumps({"question": "Tom has 1,000 apples and buys 234. How many?",
                    "answer": "1000 + 234 = 1234\n#### 1,234"}),
    ]) + "\n")
    ps = evdata.read_jsonl(f)
    assert [p.answer for p in ps] == ["2", "204", "1234"]
    assert [p.meta["difficulty"] for p in ps] == [3, None, None]
    assert ps[2].solution == "1000 + 234 = 1234"
    assert {p.task for p in ps} == {"mixed"}
    assert ps[0].meta["source"] == f"{f}:1" and ps[1].meta["source"] == f"{f}:3"
    assert ps[0].message()["content"].startswith("What is $1+1$?\nPlease reason step by step")


@pytest.mark.parametrize("line, why", [
    ('{"problem": "x", "answer": "1"', "not valid JSON"),
    ('{"problem": "x"}', "missing field 'answer'"),
    ('{"text": "x", "answer": "1"}', "missing field 'problem'"),
    ('{"question": "x", "answer": "42"}', "####"),
    ('[1, 2]', "expected a JSON object"),
    ('{"problem": "x", "answer": null}', "'answer' must be a string or a number"),
])
def test_read_jsonl_errors_name_file_and_line(tmp_path, line, why):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"problem": "ok", "answer": "1"}) + "\n\n" + line + "\n")
    with pytest.raises(ValueError) as e:
        evdata.read_jsonl(f)
    assert f"{f}:3" in str(e.value) and why in str(e.value)


def test_cli_reports_bad_jsonl_by_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"problem": "x", "answer": "1"}\n{"problem": "y"}\n')
    with pytest.raises(SystemExit, match=f"{f}:2: missing field 'answer'"):
        main(["--model", str(tmp_path), "--data", str(f)])


# ---- the evaluation's accounting, with a scripted backend ---------------------------------------------
class Scripted:
    """A backend whose i-th problem gets the responses script(i, problem, n)."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def complete(self, problems, fmt, n, params):
        self.calls.append((len(problems), n, [sp.seed for sp in params], params[0].temperature))
        return [[Response(t, "stop", 3) for t in self.script(p, n)] for p in problems]


def test_evaluate_accounting_by_task_and_difficulty():
    problems = evdata.builtin(["arithmetic", "countdown"], [1, 2], 3, "test")
    assert len(problems) == 12 and all(p.meta["difficulty"] in (1, 2) for p in problems)

    def script(p, n):
        if n == 1:  # greedy: right on arithmetic only
            return [f"\\boxed{{{p.answer}}}" if p.task == "arithmetic" else "no idea"]
        good, bad = f"so \\boxed{{{p.answer}}}", "\\boxed{nonsense}"
        # arithmetic: 1 of 4 right (cons: 'nonsense' wins); countdown: 3 of 4 right, one without a box
        return [good, bad, bad, bad] if p.task == "arithmetic" else [good, good, good, "I give up"]

    backend = Scripted(script)
    r = evaluate(backend, None, problems, k=4, greedy=True, seed=7)
    rows = {(x["task"], x["difficulty"]): x for x in r["rows"]}
    assert list(rows) == [("arithmetic", 1), ("arithmetic", 2), ("countdown", 1), ("countdown", 2)]
    for d in (1, 2):
        a, c = rows["arithmetic", d], rows["countdown", d]
        assert (a["n"], a["samples"], a["pass@1"], a["pass@k"], a["cons@k"], a["greedy"]) == (3, 12, 0.25, 1, 0, 1)
        assert (c["pass@1"], c["pass@k"], c["cons@k"], c["greedy"], c["no_answer"]) == (0.75, 1, 1, 0, 3)
    assert r["overall"]["n"] == 12 and r["overall"]["pass@1"] == pytest.approx(0.5)
    assert r["overall"]["greedy"] == 0.5 and r["overall"]["unparsed"] == 0
    # seeds: problem i's request seed + i*k; greedy requests at temperature 0
    seeds = [s for _, n, ss, _ in backend.calls if n == 4 for s in ss]
    assert seeds == [7 + 4 * i for i in range(12)]
    assert {t for _, n, _, t in backend.calls if n == 1} == {0.0}
    table = format_table(r)
    assert "pass@4" in table and "cons@4" in table and "overall" in table and "countdown" in table


def test_unparseable_gold_is_counted_not_raised(tmp_path):
    pytest.importorskip("minke.tasks.mathcheck")
    f = tmp_path / "set.jsonl"
    f.write_text(json.dumps({"problem": "half?", "answer": "\\frac{1}{2}"}) + "\n"
                 + json.dumps({"problem": "broken gold", "answer": "}{"}) + "\n")
    problems = evdata.read_jsonl(f)
    r = evaluate(Scripted(lambda p, n: ["\\boxed{0.5}", "\\boxed{\\frac{1}{2}}"][:n] + ["\\boxed{3}"] * (n - 2)),
                 None, problems, k=2)
    row = r["rows"][0]
    assert row["n"] == 2 and row["unparsed"] == 2  # both samples of the broken gold
    assert row["pass@1"] == pytest.approx(0.5)  # the first problem: both forms verify as 1/2


# ---- end to end on a tiny checkpoint ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from chat_model import make

    model, tok = make()
    d = tmp_path_factory.mktemp("eval_ckpt")
    minke.save(model, d)
    tok.save(d)
    return d, model, tok


def test_eval_stage_end_to_end(ckpt, tmp_path, capsys):
    d, _, _ = ckpt
    out = tmp_path / "eval.json"
    assert main(["--model", str(d), "--tasks", "arithmetic", "countdown", "--difficulties", "1", "2",
                 "--problems", "2", "--k", "2", "--max-tokens", "8", "--greedy", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["config"]["k"] == 2 and r["config"]["temperature"] == 0.6 and r["config"]["top_p"] == 0.95
    assert [(x["task"], x["difficulty"], x["n"], x["samples"]) for x in r["rows"]] == [
        ("arithmetic", 1, 2, 4), ("arithmetic", 2, 2, 4), ("countdown", 1, 2, 4), ("countdown", 2, 2, 4)]
    assert r["overall"]["n"] == 8 and r["overall"]["greedy"] is not None
    assert all(0 <= x[m] <= 1 for x in r["rows"] for m in ("pass@1", "pass@k", "cons@k", "greedy"))
    assert r["overall"]["mean_tokens"] <= 8
    table = capsys.readouterr().out
    assert "pass@2" in table and "arithmetic" in table and "overall" in table


def test_model_dir_without_tokenizer(ckpt, tmp_path):
    d, model, _ = ckpt
    minke.save(model, tmp_path)
    with pytest.raises(SystemExit, match="tokenizer.json not found"):
        main(["--model", str(tmp_path), "--problems", "1"])
    with pytest.raises(SystemExit, match="tokenizer.json not found"):
        main(["--model", str(tmp_path), "--problems", "1", "--base-url", "http://127.0.0.1:9"])
    with pytest.raises(SystemExit, match="127.0.0.1:9/v1/models: request failed"):  # nothing listens there
        main(["--model", str(d), "--problems", "1", "--base-url", "http://127.0.0.1:9"])


def test_base_url_gives_the_same_numbers_as_in_process(ckpt):
    from test_server import serving

    from minke.inference.engine import Engine
    from minke.serve import server

    d, model, tok = ckpt
    problems = evdata.builtin(["arithmetic"], [1], 3, "test")
    kw = dict(k=2, max_tokens=12, greedy=True, seed=3, keep_samples=True)
    direct = evaluate(model, tok, problems, **kw)
    engine = Engine(model, max_batch=16, decode_fn=tok.decode)
    with serving(server.create_app(engine, tok, model_name="tiny", api_key="sk-x")) as url:
        remote = evaluate(OpenAIBackend(url, tok, api_key="sk-x", concurrency=3), tok, problems, **kw)
        with pytest.raises(RuntimeError, match=r"/v1/models: HTTP 401: Incorrect or missing API key"):
            OpenAIBackend(url, tok, api_key="wrong")
    for key in ("rows", "overall", "samples"):
        assert remote[key] == direct[key], key
    # a real comparison: the model wrote text, and sampling at 0.6 differs from greedy somewhere
    texts = [s["text"] for x in direct["samples"] for s in x["samples"]]
    assert any(texts) and texts != [x["greedy_text"] for x in direct["samples"] for _ in range(2)]


def test_base_url_scores_a_model_that_knows_answers():
    """The taught model (test_sample.py) answers one problem right and one wrong: the server path
    must render the very prompt it was trained on (one bos, the chat template) to score it the same."""
    from test_sample import taught
    from test_server import serving

    from minke.data.prompts import FORMATS, prompt_ids
    from minke.inference.engine import Engine
    from minke.serve import server

    model, tok, ps = taught()
    direct = evaluate(model, tok, ps, k=2, max_tokens=48, greedy=True)
    assert direct["overall"]["greedy"] == 0.5 and direct["overall"]["pass@1"] == 0.5
    with serving(server.create_app(Engine(model, max_batch=8, decode_fn=tok.decode), tok, model_name="t")) as url:
        backend = OpenAIBackend(url, tok)
        assert backend.model == "t"  # the server's first model when --api-model is not given
        for fmt in FORMATS:  # the server adds bos to a text prompt: the ids match the in-process ones
            assert tok.encode(backend._prompt(ps[0], fmt), add_bos=True) == prompt_ids(tok, ps[0], fmt)
        remote = evaluate(backend, tok, ps, k=2, max_tokens=48, greedy=True)
    assert remote["rows"] == direct["rows"]


def test_eval_stage_on_jsonl_sets(ckpt, tmp_path):
    pytest.importorskip("minke.tasks.mathcheck")
    d, _, _ = ckpt
    math, gsm = tmp_path / "math500.jsonl", tmp_path / "gsm8k.jsonl"
    rows = [{"problem": f"What is {i}+{i}?", "answer": str(2 * i), "level": 1 + i % 2} for i in range(3)]
    math.write_text("".join(json.dumps(x) + "\n" for x in rows))
    gsm.write_text(json.dumps({"question": "How many?", "answer": "2 + 2 = 4\n#### 4"}) + "\n")
    out = tmp_path / "eval.json"
    assert main(["--model", str(d), "--data", str(math), str(gsm), "--k", "2", "--max-tokens", "8",
                 "--out", str(out)]) == 0
    r = json.loads(out.read_text())  # --data alone: no built-in tasks
    assert [(x["task"], x["difficulty"], x["n"]) for x in r["rows"]] == [
        ("math500", 1, 2), ("math500", 2, 1), ("gsm8k", None, 1)]
    assert r["overall"]["n"] == 4 and r["overall"]["samples"] == 8
