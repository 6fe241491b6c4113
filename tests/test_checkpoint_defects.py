"""Checkpoint defects (issue 11 item 10): save holds one shard at a time; MTP layers can be dropped on
purpose at load; resume skips an unreadable newest checkpoint; a step already on disk is replaced,
not kept; --resume A --out B refuses a B holding another run's checkpoints."""

import json
import warnings
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

import minke
from minke.model import weights
from minke.model.weights import CheckpointError
from minke.train import checkpoint


def ids(vocab):
    return torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(0))


# ---- weights.save: shard by shard -------------------------------------------------------------------
@pytest.mark.parametrize("fp8", [False, True])
def test_save_builds_and_writes_one_shard_at_a_time(tmp_path, monkeypatch, fp8):
    """When a shard is written, no tensor built for the previous shard is still alive: the CPU copies
    of a checkpoint never all exist at once (they did: 2x the model's memory)."""
    model = minke.build(minke.preset("tiny"), seed=1)
    alive, prev = [], []
    real = weights.save_file

    def spy(tensors, filename, metadata=None):
        alive.append(sum(r() is not None for r in prev))
        prev[:] = [weakref.ref(t) for t in tensors.values()]
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(weights, "save_file", spy)
    minke.save(model, tmp_path, fp8=fp8, max_shard_bytes=200_000)
    assert len(alive) > 2 and alive == [0] * len(alive)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = {fn: load_file(tmp_path / fn) for fn in set(index["weight_map"].values())}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for f in files.values()
                                                  for t in f.values())
    for key, fn in index["weight_map"].items():  # an FP8 weight and its scale share a file
        if key.endswith("weight_scale_inv"):
            assert index["weight_map"][key[: -len("_scale_inv")]] == fn
    back = minke.load(tmp_path, dtype=torch.float32)
    if not fp8:
        for k, v in model.state_dict().items():
            assert torch.equal(v, back.state_dict()[k]), k


# ---- loading without the MTP layers, on purpose -----------------------------------------------------
@pytest.fixture
def mtp_dir(tmp_path):
    model = minke.build(minke.preset("tiny", num_nextn_predict_layers=2), seed=0)
    minke.save(model, tmp_path)
    return tmp_path, model


def test_load_with_mtp_dropped_on_purpose(mtp_dir):
    d, model = mtp_dir
    x = ids(model.config.vocab_size)
    no_mtp = model.config.replace(num_nextn_predict_layers=0)
    for kw in (dict(), dict(config=no_mtp)):  # the checkpoint's config.json says how many to drop
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a choice, not a surprise: nothing to warn about
            back = minke.load(d, dtype=torch.float32, drop_mtp=True, **kw)
        assert len(back.mtp) == 0 and back.config.num_nextn_predict_layers == 0
        with torch.no_grad():
            assert torch.equal(back(x).logits, model(x).logits)


def test_mtp_layers_into_a_config_without_mtp_need_the_choice(mtp_dir):
    d, model = mtp_dir
    L = model.config.num_hidden_layers
    with pytest.raises(CheckpointError, match=rf"model\.layers\.{L}\..*drop_mtp=True"):
        minke.load(d, config=model.config.replace(num_nextn_predict_layers=0))


def test_dropping_mtp_still_needs_every_main_tensor_and_no_stray_layer(mtp_dir):
    d, model = mtp_dir
    sd = load_file(d / "model.safetensors")
    del sd["model.layers.1.mlp.gate.weight"]
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.mlp\.gate\.weight"):
        minke.load(d, drop_mtp=True)
    sd = load_file(d / "model.safetensors")
    sd["model.layers.1.mlp.gate.weight"] = model.layers[1].mlp.gate.weight.detach().clone()
    sd["model.layers.9.input_layernorm.weight"] = torch.ones(model.config.hidden_size)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="layer 9 is beyond"):
        minke.load(d, drop_mtp=True)


# ---- resuming --------------------------------------------------------------------------------------
class Tok:
    """What checkpoint.save needs of a tokenizer."""

    def save(self, d):
        (d / "tokenizer.json").write_text("{}")


@pytest.fixture(scope="module")
def small_model():
    return minke.build(minke.preset("tiny", num_hidden_layers=2, num_nextn_predict_layers=0), seed=0)


def saved(out, model, steps, tag="run"):
    for s in steps:
        checkpoint.save(out, s, model, Tok(), {"step": s, "run": tag}, keep=5)
    return out


def truncate(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


@pytest.mark.parametrize("victim", ["trainer_state.pt", "model.safetensors", "config.json", "tokenizer.json"])
def test_resume_falls_back_past_an_unreadable_newest(tmp_path, small_model, victim):
    out = saved(tmp_path / "run", small_model, [1, 2])
    truncate(out / "step-000002" / victim)
    assert checkpoint.latest(out).name == "step-000002"  # complete-looking, yet unreadable
    with pytest.warns(UserWarning, match=rf"step-000002.*{victim}"):
        p, state = checkpoint.newest_loadable(out)
    assert p.name == "step-000001" and state["step"] == 1
    assert (out / "step-000002").exists()  # left in place unless asked


def test_quarantined_checkpoint_is_out_of_reach(tmp_path, small_model):
    out = saved(tmp_path / "run", small_model, [1, 2])
    (out / "step-000002" / checkpoint.STATE).write_bytes(b"not a pickle")
    with pytest.warns(UserWarning, match=r"moved to bad-step-000002"):
        p, _ = checkpoint.newest_loadable(out, quarantine=True)
    assert p.name == "step-000001" and checkpoint.latest(out).name == "step-000001"
    checkpoint.clean(out)
    assert (out / "bad-step-000002" / "config.json").exists()  # kept for a person to look at
    saved(out, small_model, [2])
    assert checkpoint.load_state(out / "step-000002")["step"] == 2


def test_no_loadable_checkpoint(tmp_path, small_model):
    out = saved(tmp_path / "run", small_model, [1])
    truncate(out / "step-000001" / "model.safetensors")
    with pytest.warns(UserWarning):
        assert checkpoint.newest_loadable(out) is None
    assert checkpoint.newest_loadable(tmp_path / "nothing") is None


def test_save_replaces_a_step_already_on_disk(tmp_path, small_model):
    """A run resumed from step 1 while a stale step 2 exists (another run's, or one skipped as
    unreadable) must write its own step 2, not keep the old one."""
    out = saved(tmp_path / "run", small_model, [1, 2], tag="old")
    saved(out, small_model, [2], tag="new")
    assert checkpoint.load_state(out / "step-000002")["run"] == "new"
    assert not list(out.glob("ckpt.*"))


def test_resume_into_another_runs_out_is_refused(tmp_path, small_model):
    a = saved(tmp_path / "a", small_model, [1, 2])
    b = saved(tmp_path / "b", small_model, [3], tag="other")
    with pytest.raises(CheckpointError, match=r"--out .*b already holds checkpoints \(step-000003\)"):
        checkpoint.check_resume_out(a, b)
    checkpoint.check_resume_out(a, a)  # continuing in place
    checkpoint.check_resume_out(a, tmp_path / "a" / ".." / "a")
    checkpoint.check_resume_out(a, tmp_path / "fresh")  # a new directory
