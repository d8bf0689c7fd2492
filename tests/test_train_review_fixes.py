"""Regressions found by the sixth session's review of the trainer and ``theorylab train``: a divergence on the last
step that exited 0, tampered checkpoint fields that escaped as tracebacks, an interrupt hint that did not continue
an extended run, sizes that overflowed, and the metrics of an extended run."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch

from theorylab.cli import main
from theorylab.experiments import load_corpus
from theorylab.experiments.charlm import CharLMConfig, CharTransformer
from theorylab.experiments.trainer import evaluate_bpc

TINY = ["--seq-len", "16", "--layers", "1", "--width", "16", "--heads", "2", "--num-features", "8",
        "--batch-size", "4", "--warmup", "2", "--eval-chars", "300", "--threads", "1"]


def charlm(out, *extra: str) -> int:
    return main(["train", "charlm", "--out", str(out), *TINY, *extra])


def test_a_divergence_on_the_last_step_exits_1_and_writes_nothing(tmp_path, capsys):
    """The training loss is measured before the step's update: a run diverging on its last step exited 0 with
    final_bpc NaN and a checkpoint of weights around 2e28."""
    assert charlm(tmp_path, "--lr", "1e30", "--steps", "1") == 1
    err = capsys.readouterr().err
    assert "became nan" in err and "lower the learning rate" in err and "Traceback" not in err
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "checkpoint.pt").exists()


def test_non_finite_weights_are_never_checkpointed(tmp_path, capsys, monkeypatch):
    """A step can make the weights NaN while its loss (measured before the update) is finite: the checkpoint of
    that step would then hold them."""
    from theorylab.experiments import trainer

    def poison(params, max_norm):
        for p in params:
            p.grad.fill_(float("inf"))  # Adam: inf / inf = NaN weights

    monkeypatch.setattr(trainer.torch.nn.utils, "clip_grad_norm_", poison)
    assert charlm(tmp_path, "--steps", "5", "--checkpoint-every", "1") == 1
    assert "weights became non-finite at step 1" in capsys.readouterr().err
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_divergence_after_a_checkpoint_says_how_to_start_afresh(tmp_path, capsys):
    """lr 1e30: the step-1 checkpoint holds finite weights of ~1e28 and step 2's loss is NaN; resuming keeps the lr."""
    assert charlm(tmp_path, "--lr", "1e30", "--steps", "5", "--checkpoint-every", "1") == 1
    assert "start afresh with --overwrite and a lower --lr" in capsys.readouterr().err


def test_an_lr_whose_first_adam_step_overflows_float32_exits_2(tmp_path, capsys):
    """lr 3e38 passed the float32 bound, then Adam's first step size lr/(1-β₁) overflowed: a RuntimeError traceback."""
    assert charlm(tmp_path, "--lr", "3e38", "--steps", "1") == 2
    assert "Adam's first step" in capsys.readouterr().err


@pytest.mark.parametrize("tamper", ["checkpoint_every", "eval_chars", "eval_every", "evals", "target_steps",
                                    "adam_state", "train_bpc", "maximize", "amsgrad", "eps", "betas",
                                    "weight_decay"])
def test_tampered_checkpoint_fields_exit_2(tmp_path, capsys, tamper):
    assert charlm(tmp_path, "--steps", "2") == 0
    path = tmp_path / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    if tamper == "checkpoint_every":
        ckpt["options"]["checkpoint_every"] = -1
    elif tamper == "eval_chars":
        ckpt["options"]["eval_chars"] = 1
    elif tamper == "eval_every":
        ckpt["options"]["eval_every"] = "3"
    elif tamper == "evals":
        ckpt["evals"] = [{}]
    elif tamper == "target_steps":
        ckpt["target_steps"] = "abc"
    elif tamper == "train_bpc":
        ckpt["train_bpc"] = ["x"]
    elif tamper == "adam_state":
        state = next(iter(ckpt["optimizer"]["state"].values()))
        state["exp_avg"] = torch.zeros(3, 3, 3)
    else:  # the groups' settings: maximize=True had trained uphill (11 bits/char, exit 0), amsgrad crashed mid-run
        ckpt["optimizer"]["param_groups"][0][tamper] = {"maximize": True, "amsgrad": True, "eps": -1e-8,
                                                        "betas": (5.0, 5.0), "weight_decay": "x"}[tamper]
    torch.save(ckpt, path)
    before = path.read_bytes()
    capsys.readouterr()
    assert main(["train", "charlm", "--out", str(tmp_path), "--resume", "--steps", "4", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "Traceback" not in err
    assert path.read_bytes() == before


def _interrupt_at_step_4(monkeypatch) -> None:
    """Ctrl-C as the training reaches step 4."""
    from theorylab.experiments import trainer

    real_sample = trainer.sample_batch

    def interrupt_at_step_4(*args, step, **kw):
        if step == 4:
            raise KeyboardInterrupt
        return real_sample(*args, step=step, **kw)

    monkeypatch.setattr(trainer, "sample_batch", interrupt_at_step_4)


def test_the_interrupt_hint_continues_an_extended_run(tmp_path, capsys, monkeypatch):
    """'--resume --steps 8', interrupted before its first checkpoint, hinted '--resume', which trained 0 steps."""
    assert charlm(tmp_path, "--steps", "2") == 0
    _interrupt_at_step_4(monkeypatch)
    capsys.readouterr()
    assert main(["train", "charlm", "--out", str(tmp_path), "--resume", "--steps", "8", "--threads", "1"]) == 130
    assert "--resume --steps 8" in capsys.readouterr().err


def test_an_interrupted_extension_leaves_no_metrics_of_an_older_model(tmp_path, monkeypatch):
    """'--resume --steps 8' interrupted at step 4 left metrics.json of the 2-step run beside a later checkpoint."""
    assert charlm(tmp_path, "--steps", "2", "--checkpoint-every", "1") == 0
    assert (tmp_path / "metrics.json").exists()
    _interrupt_at_step_4(monkeypatch)
    assert main(["train", "charlm", "--out", str(tmp_path), "--resume", "--steps", "8", "--threads", "1"]) == 130
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] > 2
    assert not (tmp_path / "metrics.json").exists()


def test_a_checkpoint_that_does_not_fit_leaves_the_metrics_in_place(tmp_path, capsys):
    """The removal of an extended run's old metrics.json came before the checkpoint was loaded into the model: a
    refused checkpoint (exit 2, "nothing is overwritten then") lost the metrics."""
    assert charlm(tmp_path, "--steps", "2") == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    name = next(iter(ckpt["model"]))
    ckpt["model"][name] = torch.zeros(3)  # unpickles, but does not fit the model
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    before = (tmp_path / "metrics.json").read_bytes()
    assert main(["train", "charlm", "--out", str(tmp_path), "--resume", "--steps", "4", "--threads", "1"]) == 2
    assert "does not fit this model" in capsys.readouterr().err
    assert (tmp_path / "metrics.json").read_bytes() == before


def test_a_lost_peer_is_said_in_a_line_with_the_resume_hint(tmp_path, capsys, monkeypatch):
    """A rank killed mid-run made rank 0 print gloo's RuntimeError as a Python traceback, with no way on."""
    from theorylab.experiments import trainer

    assert charlm(tmp_path, "--steps", "2") == 0
    gloo = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:6830: Connection "
            "reset by peer. This is typically caused by a remote worker hanging")

    def peer_killed(*args, **kwargs):
        raise RuntimeError(gloo)

    monkeypatch.setattr(trainer, "train_charlm", peer_killed)
    capsys.readouterr()
    assert main(["train", "charlm", "--out", str(tmp_path), "--resume", "--steps", "4", "--threads", "1"]) == 1
    err = capsys.readouterr().err
    assert "another process of the job failed or was killed ([/pytorch/third_party/gloo" in err
    assert f"--out {tmp_path} --resume --steps 4" in err and "Traceback" not in err


def test_sigterm_stops_training_with_the_resume_hint_and_exit_143(tmp_path, capsys, monkeypatch):
    """A scheduler's SIGTERM had ended a run with exit 143 and no word; Ctrl-C gave the resume command."""
    from theorylab.experiments import trainer

    real_sample = trainer.sample_batch

    def terminated_at_step_3(*args, step, **kw):
        if step == 3:
            if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN, None):  # would kill the runner
                raise AssertionError("train installed no SIGTERM handler")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
            raise AssertionError("SIGTERM was not delivered")
        return real_sample(*args, step=step, **kw)

    monkeypatch.setattr(trainer, "sample_batch", terminated_at_step_3)
    before = signal.getsignal(signal.SIGTERM)
    assert charlm(tmp_path, "--steps", "6", "--checkpoint-every", "1") == 143
    assert f"--out {tmp_path} --resume --steps 6" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize(("flag", "value"), [("--width", "99999999999999999999"), ("--layers", "1000000000"),
                                             ("--batch-size", "99999999999999999999"), ("--heads", "100000")])
def test_absurd_sizes_exit_2(tmp_path, capsys, flag, value):
    """Sizes above 2^63 overflowed inside torch (a traceback and a C++ frame dump); --layers 1e9 built blocks until
    memory ran out."""
    args = list(TINY)
    if flag in args:
        del args[args.index(flag):args.index(flag) + 2]
    assert main(["train", "charlm", "--out", str(tmp_path), *args, flag, value, "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "must be at most" in err and "Traceback" not in err


def test_an_extended_run_has_the_metrics_of_a_run_started_with_that_target(tmp_path):
    """The final eval of the run being extended stayed in the curve: evals at 0, 2, 3, 4, 6 against 0, 2, 4, 6."""
    assert charlm(tmp_path / "ext", "--steps", "3", "--eval-every", "2") == 0
    assert main(["train", "charlm", "--out", str(tmp_path / "ext"), "--resume", "--steps", "6", "--threads", "1"]) == 0
    assert charlm(tmp_path / "full", "--steps", "6", "--eval-every", "2") == 0
    ext, full = (json.loads((tmp_path / d / "metrics.json").read_text(encoding="utf-8")) for d in ("ext", "full"))
    assert [e["step"] for e in ext["evals"]] == [e["step"] for e in full["evals"]] == [0, 2, 4, 6]
    assert [e["heldout_bpc"] for e in ext["evals"]] == [e["heldout_bpc"] for e in full["evals"]]
    assert ext["train_bpc"] == full["train_bpc"]


def test_evaluating_on_fewer_than_two_characters_is_a_value_error():
    config = CharLMConfig(seq_len=8, layers=1, width=16, heads=2)
    model = CharTransformer(len(load_corpus().vocab), config)
    with pytest.raises(ValueError, match="at least 2 characters"):
        evaluate_bpc(model, load_corpus().heldout[:1], 8)


def test_a_busy_folder_is_refused_before_its_checkpoint_is_read(tmp_path, capsys):
    """The lock was taken after the 'checkpoint exists' check (1.6 s later): a run finishing in between was
    retrained over without --overwrite. Now the folder is held first."""
    from theorylab.cli._args import exclusive_output

    assert charlm(tmp_path, "--steps", "1") == 0
    capsys.readouterr()
    with exclusive_output(tmp_path):
        assert charlm(tmp_path, "--steps", "2") == 2
    err = capsys.readouterr().err
    assert "another theorylab run is writing into" in err and "exists: pass --resume" not in err


@pytest.mark.parametrize("tamper", ["missing_exp_avg", "step_of_three"])
def test_adam_state_with_wrong_keys_or_step_exits_2(tmp_path, capsys, tamper):
    assert charlm(tmp_path, "--steps", "2") == 0
    path = tmp_path / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    state = next(iter(ckpt["optimizer"]["state"].values()))
    if tamper == "missing_exp_avg":
        del state["exp_avg"]
    else:
        state["step"] = torch.zeros(3)
    torch.save(ckpt, path)
    capsys.readouterr()
    assert main(["train", "charlm", "--out", str(tmp_path), "--resume", "--steps", "4", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "Traceback" not in err


def test_a_checkpoint_of_the_old_split_is_refused_for_that_reason(tmp_path, capsys):
    """It said 'trained on a different pydoc_data text (Python 3.11.7; this is Python 3.11.7)'."""
    from theorylab.experiments.data import legacy_sha256

    assert charlm(tmp_path, "--steps", "1") == 0
    path = tmp_path / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["data_sha256"] = legacy_sha256()
    torch.save(ckpt, path)
    capsys.readouterr()
    assert main(["train", "charlm", "--out", str(tmp_path), "--resume", "--steps", "2"]) == 2
    assert "held-out split used before 2026-11-26" in capsys.readouterr().err


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.1, 0.5])
def test_the_held_out_share_overshoots_by_at_most_half(fraction):
    """Whole groups were added until the share was reached: 0.01 held out 6.7% (one group of 29,616 characters)."""
    from theorylab.experiments import data

    topics = data._topics()
    total = sum(len(t) for t in topics.values())
    _, heldout = data.split_topics(topics, fraction)
    share = sum(len(topics[k]) for k in heldout) / total
    assert fraction <= share <= 1.5 * fraction


def test_a_held_out_fraction_below_the_smallest_group_is_a_value_error():
    """load_corpus(1e-4) held out nothing (every group overshoots by more than half), failing later in evaluation."""
    from theorylab.experiments import data

    with pytest.raises(ValueError, match="holds out nothing"):
        data.split_topics(data._topics(), 1e-4)


def test_a_warmup_beyond_a_float_exits_2(tmp_path, capsys):
    """--warmup 1e400 passed (only >= 0 was checked) and overflowed at sqrt(warmup / step) on the first step."""
    args = list(TINY)
    del args[args.index("--warmup"):args.index("--warmup") + 2]
    assert main(["train", "charlm", "--out", str(tmp_path), *args, "--warmup", "1" + "0" * 400, "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "warmup must lie in [0, 9007199254740992]" in err and "Traceback" not in err
