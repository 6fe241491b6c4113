"""Long context: YaRN extension as a training stage (`minke pretrain --model CKPT --extend-to N`), its
config.json in minke and transformers, the bad inputs, and the passkey-retrieval evaluation."""

import json
import random
import warnings

import pytest
import torch

import minke
from minke.config import ConfigError, ModelConfig, extend_context, preset
from minke.data.tokenizer import train_tokenizer
from minke.eval import passkey
from minke.eval import run as eval_run
from minke.inference.engine import Completion, Engine
from minke.tasks import corpus
from minke.train import checkpoint, pretrain


# ---- the config ------------------------------------------------------------------------------------
def test_extend_context_sets_deepseek_v3_yarn():
    cfg = preset("tiny", max_position_embeddings=256)
    ext = extend_context(cfg, 2048)
    assert ext.max_position_embeddings == 2048
    assert ext.rope_scaling == {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256,
                                "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    # a second stage (V3: 4K → 32K → 128K) extends from the same original length
    again = extend_context(ext, 4096)
    assert again.rope_scaling["factor"] == 16.0 and again.rope_scaling["original_max_position_embeddings"] == 256
    # an existing YaRN keeps its own mscale (V2-Lite's 0.707)
    v2 = extend_context(preset("v2-lite"), 327680)
    assert v2.rope_scaling["factor"] == 80.0 and v2.rope_scaling["mscale"] == 0.707
    assert cfg.rope_scaling is None  # the input is not changed


def test_extension_factor_below_one_and_bad_lengths_are_refused():
    cfg = preset("tiny", max_position_embeddings=256)
    with pytest.raises(ConfigError, match=r"rope_scaling.factor = 128 / original_max_position_embeddings 256 = 0.5"):
        extend_context(cfg, 128)
    with pytest.raises(ConfigError, match="below the model's max_position_embeddings 2048"):
        extend_context(extend_context(cfg, 2048), 1024)
    with pytest.raises(ConfigError, match="rope_scaling.factor must be >= 1"):
        ModelConfig.from_dict({**cfg.to_dict(), "rope_scaling": {"type": "yarn", "factor": 0.5,
                                                                "original_max_position_embeddings": 256}})
    with pytest.raises(ConfigError, match="original_max_position_embeddings=4096 must be a positive integer <= "
                                          "max_position_embeddings=256"):
        ModelConfig.from_dict({**cfg.to_dict(), "rope_scaling": {"type": "yarn", "factor": 2.0,
                                                                "original_max_position_embeddings": 4096}})


# ---- the training stage ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(corpus(300, seed=0), vocab_size=320, out_dir=d)
    return d


def flags(out, *extra, steps=3):
    return ["--out", str(out), "--docs", "300", "--eval-docs", "40", "--batch-size", "2", "--steps", str(steps),
            "--warmup", "1", "--eval-every", "100", "--save-every", "100", "--eval-batches", "1",
            "--eval-problems", "0", "--log-every", "100", "--mtp-lambda", "0.3", *extra]


@pytest.fixture(scope="module")
def short(tmp_path_factory, tok_dir):
    """A tiny model trained at 64 tokens (max_position_embeddings 64)."""
    out = tmp_path_factory.mktemp("short") / "run"
    assert pretrain.main(flags(out, "--tokenizer", str(tok_dir), "--seq-len", "64",
                               "--set", "max_position_embeddings=64")) == 0
    return out / "final"


@pytest.fixture(scope="module")
def extended(tmp_path_factory, short):
    out = tmp_path_factory.mktemp("long") / "run"
    assert pretrain.main(flags(out, "--model", str(short), "--extend-to", "256", steps=2)) == 0
    return out / "final"


def test_extend_to_writes_yarn_config_and_trains_at_the_new_length(short, extended):
    cfg = json.loads((extended / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 256
    assert cfg["rope_scaling"] == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                   "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    state = checkpoint.load_state(extended)
    assert state["run"]["seq_len"] == 256 and state["run"]["extend_to"] == 256  # windows of the new length
    # the weights started from the short model's: the embedding moved by two small steps only
    a, b = minke.load(short, dtype=torch.float32), minke.load(extended, dtype=torch.float32)
    delta = (a.embed_tokens.weight - b.embed_tokens.weight).abs().max().item()
    assert 0 < delta < 0.05, delta


def test_extended_checkpoint_gives_transformers_logits_past_the_original_length(extended):
    """config.json's YaRN reloads in transformers: the same logits over 200 tokens (> 64, the original
    length, where YaRN's interpolated frequencies and its mscale² softmax scale matter): what minke wrote
    is read the same way there. Fails with minke's YaRN ramp dropped (every frequency divided by the
    factor: 0.029 off)."""
    from transformers import DeepseekV3ForCausalLM

    ours = minke.load(extended, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = DeepseekV3ForCausalLM.from_pretrained(extended, dtype=torch.float32).eval()
    x = torch.randint(3, 300, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(x).logits - hf(x).logits).abs().max().item()
    assert diff <= 1e-4, diff
    # the same weights without YaRN are far off (the barely trained model attends almost uniformly, so
    # "far" is relative): the match above is YaRN's
    plain = minke.load(extended, dtype=torch.float32,
                       config=ModelConfig.load(extended).replace(rope_scaling=None))
    with torch.no_grad():
        off = (plain(x).logits - hf(x).logits).abs().max().item()
    assert off > 20 * max(diff, 1e-6), (off, diff)


def test_extend_to_bad_inputs_name_the_field(tmp_path, short, capsys):
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--extend-to", "256"])
    assert "--extend-to needs --model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--model", str(short), "--preset", "small"])
    assert "--preset applies to a fresh model" in capsys.readouterr().err
    # factor below 1: 32 / 64
    assert pretrain.main(flags(tmp_path / "a", "--model", str(short), "--extend-to", "32")) == 1
    err = capsys.readouterr().err
    assert "--extend-to 32" in err and "rope_scaling.factor = 32 / original_max_position_embeddings 64 = 0.5" in err
    # a context longer than max_position_embeddings without extending
    assert pretrain.main(flags(tmp_path / "b", "--model", str(short), "--seq-len", "128")) == 1
    err = capsys.readouterr().err
    assert "--seq-len 128 exceeds the model's max_position_embeddings 64" in err and "--extend-to" in err


# ---- passkey retrieval -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pk_tok():
    return train_tokenizer(passkey.corpus(300, 2, 20, seed=0), vocab_size=320)


def test_passkey_prompt_fills_the_context_and_places_the_key_by_depth(pk_tok):
    tok = pk_tok
    context = 512
    positions = []
    for depth in passkey.DEPTHS:
        ids, pos = passkey.prompt(tok, context, depth, 12345, random.Random(1))
        longest = max(len(tok.encode(s)) for s in passkey.FILLER)
        assert context - passkey.ANSWER_TOKENS - longest < len(ids) <= context - passkey.ANSWER_TOKENS
        text = tok.decode(ids, skip_special_tokens=True)
        assert text.startswith(passkey.INTRO) and text.endswith(passkey.QUESTION)
        assert text.count("12345") == 1 and tok.decode(ids[pos:]).startswith(passkey.key_sentence(12345))
        assert ids[0] == tok.bos_id
        positions.append(pos)
    n_fixed = len(tok.encode(passkey.INTRO)) + 1
    assert positions[0] == n_fixed  # depth 0: right after the intro
    assert positions == sorted(positions) and positions[2] == pytest.approx(context / 2, abs=context * 0.06)
    q = len(tok.encode(passkey.key_sentence(12345) + passkey.QUESTION))
    ids, _ = passkey.prompt(tok, context, 1.0, 12345, random.Random(1))
    assert positions[-1] == len(ids) - q  # depth 1: right before the question
    with pytest.raises(ValueError, match="too short"):
        passkey.prompt(tok, 40, 0.5, 12345, random.Random(1))


def test_retrieved_is_exact():
    assert passkey.retrieved(" 12345.", 12345) and passkey.retrieved("12345", 12345)
    assert not passkey.retrieved(" 123456.", 12345) and not passkey.retrieved(" 1234.", 12345)
    assert not passkey.retrieved(" The pass key", 12345) and not passkey.retrieved("", 12345)
    assert passkey.digits_right(" 12395.", 12345) == 0.8 and passkey.digits_right("", 12345) == 0.0


class ForcedEngine(Engine):
    """Answers every prompt with its own key (``right``) or with key + 1, as a model would that always
    retrieves, or never does."""

    def __init__(self, model, tok, right):
        super().__init__(model, max_batch=4)
        self.tok, self.right = tok, right

    def generate(self, prompts, params=None, n=1):
        out = []
        for p in prompts:
            key = int(self.tok.decode(p).split("The pass key is ")[1][:5])
            ids = self.tok.encode(f" {key if self.right else key + 1}.") + [self.tok.eos_id]
            out.append(Completion(request_id=len(out), prompt_ids=list(p), token_ids=ids, finish_reason="stop"))
        return out


@pytest.mark.parametrize("right", [True, False])
def test_passkey_scores_a_model_forced_right_or_wrong(pk_tok, right):
    model = minke.build(preset("tiny", vocab_size=320, max_position_embeddings=512, num_nextn_predict_layers=0))
    res = passkey.evaluate(ForcedEngine(model, pk_tok, right), pk_tok, 512, depths=[0.0, 0.5, 1.0], trials=3)
    assert [r["rate"] for r in res["depths"]] == [float(right)] * 3
    o = res["overall"]
    assert (o["n"], o["correct"], o["rate"]) == (9, 9 * right, float(right))
    assert o["digits"] == 1.0 if right else 0.5 <= o["digits"] < 1.0  # key + 1: most digits still in place
    assert [r["depth"] for r in res["depths"]] == [0.0, 0.5, 1.0]
    json.dumps(res)  # the result is JSON


def test_passkey_through_the_engine_and_the_context_limit(pk_tok):
    """A random model through the real engine retrieves nothing; a context beyond max_position_embeddings
    is an error naming it."""
    model = minke.build(preset("tiny", vocab_size=320, max_position_embeddings=256))
    res = passkey.evaluate(model, pk_tok, 256, depths=[0.0, 1.0], trials=2)
    assert res["overall"]["rate"] == 0.0 and res["config"]["max_position_embeddings"] == 256
    assert all(s["answer"] is not None for s in res["samples"])
    with pytest.raises(ValueError, match="context 512 exceeds the model's max_position_embeddings 256"):
        passkey.evaluate(model, pk_tok, 512, trials=1)


def test_minke_eval_task_passkey_cli(extended, tmp_path, capsys):
    """`minke eval --task passkey`: refuses a context past max_position_embeddings (256 here), runs past it
    with --extrapolate or --yarn, writes the JSON; --write-corpus writes training documents."""
    with pytest.raises(SystemExit, match="--context 512 exceeds max_position_embeddings 256"):
        eval_run.main(["--task", "passkey", "--model", str(extended), "--context", "512"])
    out = tmp_path / "pk.json"
    assert eval_run.main(["--task", "passkey", "--model", str(extended), "--context", "300", "--extrapolate",
                          "--trials", "1", "--depths", "0", "100", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["depth"] for r in res["depths"]] == [0.0, 1.0] and res["config"]["max_position_embeddings"] == 300
    assert res["config"]["rope_scaling"]["factor"] == 4.0  # the checkpoint's own YaRN, unchanged
    assert eval_run.main(["--task", "passkey", "--model", str(extended), "--context", "512", "--yarn",
                          "--trials", "1", "--depths", "50", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["config"]["rope_scaling"]["factor"] == 8.0  # 512 / 64
    assert "passkey retrieval at context 512" in capsys.readouterr().out
    docs = tmp_path / "pk.jsonl"
    assert eval_run.main(["--task", "passkey", "--write-corpus", str(docs), "--docs", "5", "--sentences", "1", "3"]) == 0
    rows = [json.loads(line)["text"] for line in docs.read_text().splitlines()]
    assert len(rows) == 5 and all(r.startswith(passkey.INTRO) and passkey.QUESTION in r for r in rows)
    assert eval_run.main(["--task", "passkey", "--write-corpus", str(docs), "--docs", "40", "--recall", "0.5"]) == 0
    rows = [json.loads(line)["text"] for line in docs.read_text().splitlines()]
    copies = [r for r in rows if not r.startswith(passkey.INTRO)]
    assert 8 <= len(copies) <= 32  # about half, seeded
    for r in copies:  # the keys, then the same keys again
        first, again = r.removeprefix("Remember these numbers: ").split(". Again: ")
        assert again == first + "." and all(len(k) == 5 for k in first.split())
    with pytest.raises(SystemExit):
        eval_run.main(["--task", "passkey", "--write-corpus", str(docs), "--recall", "1.5"])
