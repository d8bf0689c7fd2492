"""Char-LM experiment: corpus, batches, model causality, evaluation, checkpoints and exact resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from theorylab.experiments import (
    ATTENTION_KINDS,
    CharLMConfig,
    CharTransformer,
    CharVocab,
    CheckpointError,
    data,
    evaluate_bpc,
    load_checkpoint,
    load_corpus,
    sample_batch,
    save_checkpoint,
    shard_items,
    train_charlm,
)
from theorylab.experiments import trainer as train_module
from theorylab.experiments.data import eval_windows
from theorylab.experiments.trainer import read_resume_checkpoint

TINY = dict(seq_len=16, layers=1, width=16, heads=2, num_features=8, batch_size=4, lr=3e-3, warmup=2)


def tiny(**kw) -> CharLMConfig:
    return CharLMConfig(**{**TINY, **kw})


# ----------------------------------------------------------------------------------------------- corpus, batches
def test_corpus_split_is_by_topic_groups_and_covers_the_text():
    corpus = load_corpus()
    topics = data._topics()
    train_keys, heldout_keys = data.split_topics(topics, 0.1)
    assert sorted(train_keys + heldout_keys) == sorted(topics) and not set(train_keys) & set(heldout_keys)
    train, heldout = corpus.vocab.decode(corpus.train), corpus.vocab.decode(corpus.heldout)
    assert train == "\n\n".join(topics[k] for k in train_keys)
    assert heldout == "\n\n".join(topics[k] for k in heldout_keys)
    assert len(train) > 100_000 and 0.1 <= len(heldout) / (len(train) + len(heldout)) < 0.15
    assert load_corpus() is corpus  # cached


def test_no_long_span_of_held_out_text_occurs_in_the_training_text():
    """A cut at 90% of the characters held out 'while' and 'with', which the training topic 'compound' holds
    nearly whole: 8.4% of the held-out characters lay in 100+ character spans of the training text."""
    corpus = load_corpus()
    train, heldout = corpus.vocab.decode(corpus.train), corpus.vocab.decode(corpus.heldout)
    span = data.SHARED_SPAN
    seen = {train[i:i + span] for i in range(len(train) - span + 1)}
    assert not any(heldout[i:i + span] in seen for i in range(len(heldout) - span + 1))
    assert "while" in data.split_topics(data._topics(), 0.1)[0]  # with 'compound', in training


def test_topic_groups_join_topics_that_share_a_span():
    topics = {"a": "x" * 5 + "shared-text" + "y", "b": "zz", "c": "shared-text!", "d": "q" * 20}
    assert data.topic_groups(topics, span=11) == [["a", "c"], ["b"], ["d"]]
    assert data.topic_groups(topics, span=12) == [["a"], ["b"], ["c"], ["d"]]
    train, heldout = data.split_topics(topics, 0.35)
    assert heldout == ["d"] and train == ["a", "b", "c"]


def test_vocab_round_trip_and_unknown_character():
    vocab = CharVocab.from_text("hello world")
    assert vocab.chars == " dehlorw"
    assert vocab.decode(vocab.encode("world hello")) == "world hello"
    with pytest.raises(ValueError, match="'z'"):
        vocab.encode("zoo")


def test_batch_targets_are_inputs_shifted_and_depend_only_on_seed_and_step():
    tokens = load_corpus().train
    x, y = sample_batch(tokens, 8, 32, seed=3, step=5)
    assert x.shape == y.shape == (8, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, y2 = sample_batch(tokens, 8, 32, seed=3, step=5)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, sample_batch(tokens, 8, 32, seed=3, step=6)[0])
    assert not torch.equal(x, sample_batch(tokens, 8, 32, seed=4, step=5)[0])


@pytest.mark.parametrize("world", [2, 4])
def test_rank_shards_partition_the_global_batch(world):
    tokens = load_corpus().train
    x, _ = sample_batch(tokens, 8, 16, seed=0, step=1)
    shards = [sample_batch(tokens, 8, 16, seed=0, step=1, rank=r, world_size=world)[0] for r in range(world)]
    for r, shard in enumerate(shards):
        assert torch.equal(shard, x[r::world])


def test_bad_batch_arguments():
    tokens = load_corpus().train
    with pytest.raises(ValueError, match="seq_len"):
        sample_batch(tokens, 4, 0, seed=0, step=0)
    with pytest.raises(ValueError, match="batch_size 5"):
        sample_batch(tokens, 5, 8, seed=0, step=0, world_size=2)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 300), seq_len=st.integers(1, 50))
def test_eval_windows_predict_every_character_once(n, seq_len):
    predicted = []
    for start, length in eval_windows(torch.zeros(n), seq_len):
        assert 1 <= length <= seq_len
        predicted += range(start + 1, start + length + 1)
    assert predicted == list(range(1, n))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 40), world=st.integers(1, 6))
def test_shard_items_partition(n, world):
    items = list(range(n))
    shards = [shard_items(items, r, world) for r in range(world)]
    assert sorted(sum(shards, [])) == items
    with pytest.raises(ValueError):
        shard_items(items, world, world)


# ------------------------------------------------------------------------------------------------ config, model
@pytest.mark.parametrize("bad, match", [
    (dict(attention="cosine"), "unknown attention kind 'cosine'"),
    (dict(seq_len=0), "seq-len must be positive, got 0"),
    (dict(seq_len=-3), "seq-len must be positive, got -3"),
    (dict(width=10, heads=4), "not divisible"),
    (dict(lr=0.0), "lr"),
    (dict(lr=float("nan")), "lr"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny(**bad)


def test_learning_rate_schedule_warms_up_then_decays_independently_of_run_length():
    c = tiny(lr=1.0, warmup=4)
    assert [c.lr_at(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert c.lr_at(15) == pytest.approx(math.sqrt(4 / 16))
    assert tiny(warmup=0).lr_at(100) == tiny().lr


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_model_is_causal(kind):
    """Changing characters after position i changes no logit at positions <= i."""
    torch.manual_seed(0)
    model = CharTransformer(30, tiny(attention=kind, seq_len=12)).double().eval()
    x = torch.randint(0, 30, (2, 12))
    x2 = x.clone()
    x2[:, 7:] = (x2[:, 7:] + 1) % 30
    out, out2 = model(x), model(x2)
    assert out.shape == (2, 12, 30)
    torch.testing.assert_close(out[:, :7], out2[:, :7], rtol=1e-10, atol=1e-10)
    assert (out[:, 7:] - out2[:, 7:]).abs().max() > 1e-6


def test_model_rejects_sequences_longer_than_its_positions():
    model = CharTransformer(10, tiny(seq_len=8))
    with pytest.raises(ValueError, match="length 9"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_evaluate_bpc_matches_per_window_reference():
    torch.manual_seed(1)
    config = tiny(seq_len=10)
    model = CharTransformer(103, config)
    tokens = load_corpus().heldout[:95]  # 94 predictions: 9 full windows of 10 and one of 4
    got = evaluate_bpc(model, tokens, 10, batch_size=3)
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, 94, 10):
            w = tokens[s:min(s + 11, 95)][None]
            total += float(F.cross_entropy(model(w[:, :-1])[0], w[0, 1:], reduction="sum"))
            count += w.shape[1] - 1
    assert count == 94
    assert got == pytest.approx(total / count / math.log(2), rel=1e-6)
    assert model.training  # evaluation restores the mode


# ------------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_and_atomic_replace(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"format": "x", "w": torch.arange(3.0), "n": 2, "s": "a", "l": [1.5]})
    got = load_checkpoint(path, expected_format="x")
    assert torch.equal(got["w"], torch.arange(3.0)) and got["n"] == 2 and got["l"] == [1.5]
    before = path.read_bytes()

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"format": "x"})
    assert path.read_bytes() == before  # the old checkpoint survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # and no temporary file is left behind


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    # each makes torch's loader raise something else: UnpicklingError, KeyError (b"junk\n"), EOFError, ...
    for junk in (b"\x00not a checkpoint", b"junk\n", b"", b"\x80\x02", b"PK\x03\x04", b"\x80\x02}q\x00X\x01"):
        bad.write_bytes(junk)
        with pytest.raises(CheckpointError, match="corrupt"):
            load_checkpoint(bad)
    save_checkpoint(tmp_path / "other.pt", {"format": "other"})
    with pytest.raises(CheckpointError, match="format 'other'"):
        load_checkpoint(tmp_path / "other.pt", expected_format="mine")


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path):
    """weights_only=True: a pickle of an arbitrary class is refused, not executed."""
    path = tmp_path / "evil.pt"
    torch.save({"format": "x", "obj": _Opaque()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


class _Opaque:
    pass


# -------------------------------------------------------------------------------------------------- training
def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["softmax", "favor"])
def test_resume_after_a_crash_gives_the_uninterrupted_run(tmp_path, monkeypatch, kind):
    config = tiny(attention=kind)
    full = train_charlm(config, 6, out_dir=tmp_path / "full", eval_chars=300)

    real_sample = train_module.sample_batch

    def crash_at_step_5(*args, step, **kw):
        if step == 4:
            raise KeyboardInterrupt
        return real_sample(*args, step=step, **kw)

    monkeypatch.setattr(train_module, "sample_batch", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_charlm(config, 6, out_dir=tmp_path / "cut", checkpoint_every=3, eval_chars=300)
    monkeypatch.setattr(train_module, "sample_batch", real_sample)
    ckpt = read_resume_checkpoint(tmp_path / "cut")
    assert ckpt["step"] == 3
    resumed = train_charlm(config, 6, out_dir=tmp_path / "cut", resume_from=ckpt, eval_chars=300)

    assert resumed.metrics["resumed_from_step"] == 3
    assert resumed.metrics["train_bpc"] == full.metrics["train_bpc"]
    assert resumed.metrics["final_bpc"] == full.metrics["final_bpc"]
    a, b = _params(full.model), _params(resumed.model)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_ctrl_c_in_the_final_evaluation_keeps_the_training(tmp_path, monkeypatch):
    """The last checkpoint was written after the final held-out evaluation: a Ctrl-C there lost every step since
    the previous checkpoint (all of them with the default --checkpoint-every 100 and --steps 100). Resuming now
    only evaluates, and gives the uninterrupted run."""
    config = tiny()
    full = train_charlm(config, 4, out_dir=tmp_path / "full", eval_chars=300)
    real_eval = train_module.evaluate_bpc

    def interrupt(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "evaluate_bpc", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_charlm(config, 4, out_dir=tmp_path / "cut", checkpoint_every=0, eval_chars=300)
    monkeypatch.setattr(train_module, "evaluate_bpc", real_eval)
    ckpt = read_resume_checkpoint(tmp_path / "cut")
    assert ckpt["step"] == 4
    resumed = train_charlm(config, 4, out_dir=tmp_path / "cut", resume_from=ckpt, eval_chars=300)
    assert resumed.metrics["train_bpc"] == full.metrics["train_bpc"]
    assert resumed.metrics["final_bpc"] == full.metrics["final_bpc"]
    assert [(e["step"], e["heldout_bpc"]) for e in resumed.metrics["evals"]] == [
        (e["step"], e["heldout_bpc"]) for e in full.metrics["evals"]]  # the seconds are timings


def test_a_run_cut_in_its_final_evaluation_then_extended_keeps_that_evaluation(tmp_path, monkeypatch):
    """Checkpointed without the evaluation of its last step (on the eval grid), then extended: the uninterrupted
    longer run has that evaluation, and so does this one."""
    config = tiny()
    longer = train_charlm(config, 6, out_dir=tmp_path / "longer", eval_every=2, eval_chars=300)
    real_eval = train_module.evaluate_bpc
    calls = []

    def interrupt_the_last(*args, **kw):
        calls.append(1)
        if len(calls) == 3:  # steps 0 and 2, then the final one at 4
            raise KeyboardInterrupt
        return real_eval(*args, **kw)

    monkeypatch.setattr(train_module, "evaluate_bpc", interrupt_the_last)
    with pytest.raises(KeyboardInterrupt):
        train_charlm(config, 4, out_dir=tmp_path / "cut", eval_every=2, checkpoint_every=0, eval_chars=300)
    monkeypatch.setattr(train_module, "evaluate_bpc", real_eval)
    extended = train_charlm(config, 6, out_dir=tmp_path / "cut", resume_from=read_resume_checkpoint(tmp_path / "cut"),
                            eval_every=2, eval_chars=300)
    assert [(e["step"], e["heldout_bpc"]) for e in extended.metrics["evals"]] == [
        (e["step"], e["heldout_bpc"]) for e in longer.metrics["evals"]]


def test_training_lowers_the_loss_and_writes_metrics(tmp_path):
    import json

    result = train_charlm(tiny(lr=1e-2, width=32), 30, out_dir=tmp_path, eval_chars=2000, eval_every=10)
    m = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert m["steps"] == 30 and m["config"]["width"] == 32 and m["tokens_per_second"] > 0
    assert m["final_bpc"] == pytest.approx(result.metrics["final_bpc"])
    assert [e["step"] for e in m["evals"]] == [0, 10, 20, 30]
    assert m["evals"][0]["seconds"] == 0.0 and m["evals"][0]["heldout_bpc"] > m["final_bpc"]
    assert m["final_bpc"] < math.log2(103) - 0.5  # well below a uniform guess over the vocabulary
    assert sum(m["train_bpc"][-5:]) < sum(m["train_bpc"][:5])
    assert 4.0 < m["unigram_bpc"] < 5.0
    ckpt = read_resume_checkpoint(tmp_path)
    assert ckpt["step"] == 30 and ckpt["target_steps"] == 30


def test_resume_refuses_another_config(tmp_path):
    train_charlm(tiny(), 2, out_dir=tmp_path, eval_chars=100)
    ckpt = read_resume_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="differs"):
        train_charlm(tiny(width=32), 4, resume_from=ckpt)
    with pytest.raises(ValueError, match="beyond"):
        train_charlm(tiny(), 1, resume_from=ckpt)


def test_resume_refuses_a_checkpoint_of_another_text(tmp_path):
    train_charlm(tiny(), 1, out_dir=tmp_path, eval_chars=100)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    ckpt["data_sha256"] = "0" * 64
    save_checkpoint(tmp_path / "checkpoint.pt", ckpt)
    with pytest.raises(CheckpointError, match="different pydoc_data text"):
        read_resume_checkpoint(tmp_path)
