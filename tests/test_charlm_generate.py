"""Text generation from the char-LM: ``CharTransformer.generate`` (incremental: a recurrent state or a KV cache per
layer; or the whole text per character) and ``theorylab sample RUN_DIR``."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from theorylab.cli import main
from theorylab.experiments import (
    CharLMConfig,
    CharTransformer,
    CheckpointError,
    load_checkpoint,
    load_trained_model,
    save_checkpoint,
)
from theorylab.experiments.trainer import CHECKPOINT_FILE, CHECKPOINT_FORMAT

TINY = dict(seq_len=48, layers=2, width=16, heads=2, num_features=8, batch_size=4, lr=3e-3, warmup=2)
VOCAB = "abcdefgh \n"


def _model(kind: str, seed: int = 0) -> CharTransformer:
    torch.manual_seed(seed)
    return CharTransformer(len(VOCAB), CharLMConfig(attention=kind, **TINY)).double()


@pytest.mark.parametrize("kind", ["favor", "linear", "separable", "softmax"])
def test_incremental_generation_equals_running_the_whole_text_per_character(kind):
    model = _model(kind)
    prompt = torch.randint(0, len(VOCAB), (3, 7), generator=torch.Generator().manual_seed(1))
    greedy = model.generate(prompt, 30, temperature=0)
    assert torch.equal(greedy, model.generate(prompt, 30, temperature=0, incremental=False))
    sampled = model.generate(prompt, 30, generator=torch.Generator().manual_seed(2))
    again = model.generate(prompt, 30, generator=torch.Generator().manual_seed(2), incremental=False)
    assert torch.equal(sampled, again) and torch.equal(sampled[:, :7], prompt)
    # the logits themselves: the last position of one forward pass against the incremental path's
    text = sampled[:, :-1]
    with torch.no_grad():
        whole = model(text)[:, -1]
        states = [None] * len(model.blocks)
        h = model.token_embedding(text[:, :20]) + model.position_embedding(torch.arange(20))
        for j, block in enumerate(model.blocks):
            h, states[j] = block.step(h, states[j])
        for t in range(20, text.shape[1]):
            h = model.token_embedding(text[:, t:t + 1]) + model.position_embedding(torch.tensor([t]))
            for j, block in enumerate(model.blocks):
                h, states[j] = block.step(h, states[j])
        torch.testing.assert_close(model.head(model.ln_f(h[:, -1])), whole, atol=1e-12, rtol=1e-12)


def test_generate_restores_training_mode_and_zero_steps_return_the_prompt():
    model = _model("favor").train()
    prompt = torch.tensor([[3, 4]])
    assert torch.equal(model.generate(prompt, 0), prompt)
    model.generate(prompt, 3)
    assert model.training
    assert torch.equal(model.generate(prompt.int(), 2, temperature=0), model.generate(prompt, 2, temperature=0))


@pytest.mark.parametrize("prompt, steps, temperature, message", [
    (torch.tensor([[0.0, 1.0]]), 3, 1.0, "integer tensor"),
    (torch.tensor([0, 1]), 3, 1.0, "integer tensor"),
    (torch.zeros(1, 0, dtype=torch.long), 3, 1.0, "P >= 1"),
    (torch.tensor([[True]]), 3, 1.0, "integer tensor"),
    ([[0, 1]], 3, 1.0, "got list"),
    (torch.tensor([[0, len(VOCAB)]]), 3, 1.0, "ids outside 0..9"),
    (torch.tensor([[-1]]), 3, 1.0, "ids outside"),
    (torch.tensor([[0]]), -1, 1.0, "steps must be an integer >= 0"),
    (torch.tensor([[0]]), True, 1.0, "steps must be an integer >= 0"),
    (torch.tensor([[0]]), 2.0, 1.0, "steps must be an integer >= 0"),
    (torch.tensor([[0] * 40]), 9, 1.0, r"prompt \(40\) and steps \(9\) exceed the model's 48 positions"),
    (torch.tensor([[0]]), 3, -0.5, "temperature must be a finite number >= 0"),
    (torch.tensor([[0]]), 3, float("nan"), "temperature"),
    (torch.tensor([[0]]), 3, float("inf"), "temperature"),
    (torch.tensor([[0]]), 3, True, "temperature"),
])
def test_generate_refuses_bad_arguments_naming_them(prompt, steps, temperature, message):
    with pytest.raises(ValueError, match=message):
        _model("favor").generate(prompt, steps, temperature=temperature)


# ---------------------------------------------------------------------------------------------- theorylab sample
def _run_dir(tmp_path, kind: str = "favor", **changes):
    torch.manual_seed(0)
    model = CharTransformer(len(VOCAB), CharLMConfig(attention=kind, **TINY))
    payload = {"format": CHECKPOINT_FORMAT, "step": 1, "config": model.config.to_dict(),
               "model": model.state_dict(), "vocab": VOCAB, **changes}
    save_checkpoint(tmp_path / CHECKPOINT_FILE, {k: v for k, v in payload.items() if v is not None})
    return tmp_path, model


def test_sample_prints_the_prompt_and_its_continuation(tmp_path, capsys):
    run_dir, model = _run_dir(tmp_path)
    assert main(["sample", str(run_dir), "--prompt", "ab c", "--chars", "20", "--seed", "3"]) == 0
    out, err = capsys.readouterr()
    text = out[:-1]  # print's newline (the text may end in one of its own)
    assert text.startswith("ab c") and len(text) == 24 and set(text) <= set(VOCAB)
    assert "20 characters in" in err and "recurrent state" in err
    # the same text as the model's own generate with that seed
    ids = torch.tensor([[VOCAB.index(c) for c in "ab c"]])
    expected = model.eval().generate(ids, 20, temperature=0.8, generator=torch.Generator().manual_seed(3))
    assert text == "".join(VOCAB[i] for i in expected[0])
    loaded, vocab = load_trained_model(run_dir)
    assert vocab.chars == VOCAB and not loaded.training


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "xyz"], "character 'x' is not in the vocabulary"),
    (["--prompt", ""], "--prompt must hold at least one character"),
    (["--chars", "45"], r"the prompt \(4 characters\) and --chars 45 exceed the model's 48 positions"),
    (["--chars", "-1"], "--chars must be >= 0"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--temperature", "nan"], "--temperature"),
    (["--seed", "-3"], "invalid seed -3"),
])
def test_sample_refuses_bad_arguments_with_exit_2(tmp_path, capsys, argv, message):
    run_dir, _ = _run_dir(tmp_path)
    argv = ["--prompt", "abc ", *argv] if "--prompt" not in argv else argv  # the default 'The ' is not in VOCAB
    assert main(["sample", str(run_dir), *argv]) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("damage, message", [
    ("missing", "no checkpoint at"),
    ("junk", "corrupt or not a checkpoint"),
    ("no vocab", "lacks vocab"),
    ("empty vocab", "has no vocabulary"),
    ("repeated vocab", "vocabulary characters must be distinct"),
    ("other vocab size", "does not fit its own config and vocabulary"),
    ("bad config", "invalid config"),
    ("other format", "has format"),
])
def test_sample_refuses_an_unusable_checkpoint_with_exit_2(tmp_path, capsys, damage, message):
    if damage == "missing":
        run_dir = tmp_path
    elif damage == "junk":
        (tmp_path / CHECKPOINT_FILE).write_bytes(b"\x00junk" * 10)
        run_dir = tmp_path
    else:
        changes = {"no vocab": {"vocab": None}, "empty vocab": {"vocab": ""}, "repeated vocab": {"vocab": "aab"},
                   "other vocab size": {"vocab": "abc"}, "bad config": {"config": {"width": -3}},
                   "other format": {"format": "something-else"}}[damage]
        run_dir, _ = _run_dir(tmp_path, **changes)
    assert main(["sample", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if damage not in ("missing", "junk", "other format"):
        with pytest.raises(CheckpointError, match=message):
            load_trained_model(run_dir)


def test_sample_of_a_softmax_run_says_it_uses_a_kv_cache(tmp_path, capsys):
    run_dir, _ = _run_dir(tmp_path, kind="softmax")
    assert main(["sample", str(run_dir), "--prompt", "a", "--chars", "5", "--temperature", "0"]) == 0
    assert "KV cache" in capsys.readouterr().err


TOKENS = ["--prompt", "--chars", "--temperature", "--seed", "abc", "é", "", "0", "-1", "47", "1e309", "nan", "--"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=4)), max_size=6))
def test_any_sample_arguments_give_an_exit_code_not_a_traceback(argv, tmp_path, capsys):
    run_dir = tmp_path / "run"
    if not (run_dir / CHECKPOINT_FILE).exists():
        run_dir.mkdir(exist_ok=True)
        _run_dir(run_dir)
    assert main(["sample", str(run_dir), *argv]) in (0, 2)
    assert "Traceback" not in capsys.readouterr().err


# --------------------------------------------------------------------------- found by the review of the feature
def test_a_tiny_temperature_samples_the_most_likely_character():
    """logits / 1e-40 overflowed to inf, and softmax made NaN of inf - inf: torch.multinomial raised."""
    model = _model("favor")
    prompt = torch.tensor([[1, 2, 3]])
    assert torch.equal(model.generate(prompt, 10, temperature=1e-300), model.generate(prompt, 10, temperature=0))


def test_non_finite_logits_are_an_error_not_a_sample():
    model = _model("favor")
    with torch.no_grad():
        model.head.weight.fill_(1e308)  # finite weights whose logits overflow
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        model.generate(torch.tensor([[1, 2]]), 3)


def test_sample_refuses_a_checkpoint_with_non_finite_weights(tmp_path, capsys):
    _, model = _run_dir(tmp_path)
    state = model.state_dict()
    state["head.weight"][0, 0] = float("nan")
    _run_dir(tmp_path, model=state)
    assert main(["sample", str(tmp_path), "--prompt", "ab"]) == 2
    assert "holds non-finite weights (head.weight)" in capsys.readouterr().err


@pytest.mark.parametrize("raised, message", [
    (FloatingPointError("generate: the model gave non-finite logits after 3 positions"), "non-finite logits"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory"), "out of memory"),
])
def test_sample_reports_a_failing_model_with_exit_1(tmp_path, capsys, monkeypatch, raised, message):
    run_dir, _ = _run_dir(tmp_path)

    def failing(*args, **kwargs):
        raise raised

    monkeypatch.setattr(CharTransformer, "generate", failing)
    assert main(["sample", str(run_dir), "--prompt", "ab", "--chars", "5"]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["a" * 300, "a" * 300 + "/checkpoint.pt", "bad\0name"])
def test_sample_of_an_unusable_run_dir_name_exits_2(tmp_path, capsys, name):
    """A RUN_DIR name longer than the filesystem allows gave an OSError traceback and exit 1 (Python 3.11's
    pathlib raises from is_file())."""
    assert main(["sample", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("theorylab sample: error: ") and "Traceback" not in err
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / name / CHECKPOINT_FILE)
