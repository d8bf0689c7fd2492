"""``theorylab train charlm`` from the command line: a short run, --resume, and bad input (exit 2, nothing written)."""

from __future__ import annotations

import json

import pytest
import torch

from theorylab.cli import main

TINY = ["--seq-len", "16", "--layers", "1", "--width", "16", "--heads", "2", "--num-features", "8",
        "--batch-size", "4", "--warmup", "2", "--eval-chars", "300", "--threads", "1"]


def charlm(out, *extra: str) -> int:
    return main(["train", "charlm", "--out", str(out), *TINY, *extra])


def snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


def test_short_run_writes_metrics_and_a_weights_only_checkpoint(tmp_path, capsys):
    assert charlm(tmp_path, "--attention", "linear", "--steps", "3") == 0
    m = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for key in ("final_bpc", "tokens_per_second", "steps", "config"):
        assert key in m
    assert m["steps"] == 3 and m["config"]["attention"] == "linear" and m["config"]["seq_len"] == 16
    assert m["world_size"] == 1 and m["backend"] is None and 0 < m["final_bpc"] < 10
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["config"]["attention"] == "linear"
    out = capsys.readouterr().out
    assert "bits/char" in out and "metrics.json" in out


def test_a_run_in_process_leaves_torchs_thread_count_as_it_was(tmp_path):
    """--threads sets this process's intra-op threads for the run only (it had stayed at 1 for whatever the
    caller ran next, e.g. every later test in the same pytest process)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert charlm(tmp_path, "--steps", "1") == 0  # TINY has --threads 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_resume_extends_a_run_to_the_same_result(tmp_path):
    assert charlm(tmp_path / "full", "--steps", "6") == 0
    assert charlm(tmp_path / "two", "--steps", "3") == 0
    assert charlm(tmp_path / "two", "--steps", "6", "--resume") == 0
    full = json.loads((tmp_path / "full" / "metrics.json").read_text(encoding="utf-8"))
    two = json.loads((tmp_path / "two" / "metrics.json").read_text(encoding="utf-8"))
    assert two["resumed_from_step"] == 3
    assert two["train_bpc"] == full["train_bpc"] and two["final_bpc"] == full["final_bpc"]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("args, message", [
    (["--attention", "cosine"], "invalid choice: 'cosine'"),
    (["--seq-len", "0"], "seq-len must be positive, got 0"),
    (["--seq-len", "-4"], "seq-len must be positive, got -4"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--seq-len", "1000000"], "too long"),
    (["--width", "10", "--heads", "4"], "not divisible"),
    (["--threads", "100000000"], "--threads must lie in [1, "),  # used to crash torch's thread pool
    (["--lr", "1e308"], "float32's largest"),  # used to fail inside the optimizer
    (["--seed", "99999999999999999999999"], "invalid seed"),
    (["--seed", "-1"], "invalid seed"),
])
def test_bad_arguments_exit_2_and_write_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["train", "charlm", "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_resume_without_a_checkpoint_exits_2(tmp_path, capsys):
    assert charlm(tmp_path / "none", "--resume") == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_corrupt_checkpoint_exits_2_and_is_left_alone(tmp_path, capsys):
    assert charlm(tmp_path, "--steps", "2") == 0
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # truncated, as by a crash of a non-atomic writer
    before = snapshot(tmp_path)
    assert charlm(tmp_path, "--steps", "4", "--resume") == 2
    assert "corrupt" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["model", "optimizer"])
def test_a_checkpoint_with_non_finite_values_exits_2_and_is_left_alone(tmp_path, capsys, where):
    """A resume from damaged weights trained one step and blamed the lr ("training loss became nan at step 3;
    lower the learning rate"), exit 1; `sample` had already refused such a file."""
    import torch

    assert charlm(tmp_path, "--steps", "2") == 0
    ckpt = tmp_path / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    tensors = state["model"] if where == "model" else state["optimizer"]["state"][0]
    name = next(k for k, t in tensors.items() if t.is_floating_point() and t.dim() > 0)
    tensors[name].view(-1)[0] = float("nan")
    torch.save(state, ckpt)
    before = snapshot(tmp_path)
    assert charlm(tmp_path, "--steps", "4", "--resume") == 2
    err = capsys.readouterr().err
    assert "corrupt or tampered: non-finite values in" in err and name in err
    assert snapshot(tmp_path) == before


def test_existing_checkpoint_is_not_overwritten_without_resume_or_overwrite(tmp_path, capsys):
    assert charlm(tmp_path, "--steps", "2") == 0
    before = snapshot(tmp_path)
    assert charlm(tmp_path, "--steps", "2") == 2
    assert "--resume" in capsys.readouterr().err
    assert snapshot(tmp_path) == before
    assert charlm(tmp_path, "--steps", "2", "--overwrite") == 0


def test_resume_with_contradicting_options_exits_2(tmp_path, capsys):
    assert charlm(tmp_path, "--steps", "2") == 0
    before = snapshot(tmp_path)
    assert main(["train", "charlm", "--out", str(tmp_path), "--resume", "--steps", "4", "--width", "32"]) == 2
    assert "--width 32 (checkpoint: 16)" in capsys.readouterr().err
    assert charlm(tmp_path, "--resume", "--steps", "1") == 2
    assert "beyond --steps 1" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_plain_resume_finishes_a_crashed_run_like_an_uninterrupted_one(tmp_path, monkeypatch):
    """A run killed after its step-3 checkpoint, restarted with only --resume, reaches its --steps 6 target."""
    from theorylab.experiments import trainer

    assert charlm(tmp_path / "full", "--steps", "6") == 0
    real_sample = trainer.sample_batch

    def crash_at_step_5(*args, step, **kw):
        if step == 4:
            raise KeyboardInterrupt
        return real_sample(*args, step=step, **kw)

    monkeypatch.setattr(trainer, "sample_batch", crash_at_step_5)
    assert charlm(tmp_path / "cut", "--steps", "6", "--checkpoint-every", "3") == 130
    assert not (tmp_path / "cut" / "metrics.json").exists()
    monkeypatch.setattr(trainer, "sample_batch", real_sample)
    assert main(["train", "charlm", "--out", str(tmp_path / "cut"), "--resume", "--threads", "1"]) == 0
    full = json.loads((tmp_path / "full" / "metrics.json").read_text(encoding="utf-8"))
    cut = json.loads((tmp_path / "cut" / "metrics.json").read_text(encoding="utf-8"))
    assert cut["steps"] == 6 and cut["resumed_from_step"] == 3
    assert cut["train_bpc"] == full["train_bpc"] and cut["final_bpc"] == full["final_bpc"]


@pytest.mark.parametrize("out", ["/proc/theorylab-no", "bad\x00name"])
def test_unwritable_out_exits_2_before_training(out, capsys):
    assert main(["train", "charlm", "--out", out, *TINY, "--steps", "1"]) == 2
    assert "cannot write to output folder" in capsys.readouterr().err


def test_out_below_a_file_exits_2(tmp_path, capsys):
    (tmp_path / "file").write_text("keep me")
    assert charlm(tmp_path / "file" / "run", "--steps", "1") == 2
    assert "cannot write to output folder" in capsys.readouterr().err


def test_a_diverging_run_exits_1_with_the_reason_not_a_traceback(tmp_path, capsys):
    assert charlm(tmp_path / "big-lr", "--lr", "1e30", "--steps", "3") == 1
    err = capsys.readouterr().err
    assert "training loss became nan" in err and "lower the learning rate" in err and "Traceback" not in err


def test_a_checkpoint_holding_code_is_refused_without_torchs_unsafe_advice(tmp_path, capsys):
    """A pickle that is not weights-only: say why, and never suggest weights_only=False (arbitrary code)."""
    assert charlm(tmp_path, "--steps", "1") == 0
    torch.save({"format": "x", "payload": object()}, tmp_path / "checkpoint.pt")  # a class: not weights-only
    assert charlm(tmp_path, "--steps", "2", "--resume") == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "corrupt or not a checkpoint" in err
    assert "weights_only" not in err and "Re-running" not in err


def test_a_run_into_a_busy_out_exits_2_and_writes_nothing(tmp_path, capsys):
    from theorylab.cli._args import exclusive_output

    with exclusive_output(tmp_path):
        assert charlm(tmp_path, "--attention", "linear", "--steps", "2") == 2
    assert "another theorylab run is writing into" in capsys.readouterr().err
    assert snapshot(tmp_path) == {}


def test_a_stray_rank_without_world_size_is_a_single_process_that_takes_the_lock(tmp_path, capsys, monkeypatch):
    """RANK=1 alone (left by another tool) made the CLI a silent non-main rank: no lock, no messages, while the
    trainer ran as rank 0 and overwrote a running run's metrics.json."""
    from theorylab.cli._args import exclusive_output

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "1")
    with exclusive_output(tmp_path):
        assert charlm(tmp_path, "--attention", "linear", "--steps", "2", "--overwrite") == 2
    assert "another theorylab run is writing into" in capsys.readouterr().err
    assert snapshot(tmp_path) == {}


@pytest.mark.parametrize(("rank", "world"), [("abc", "2"), ("0", "0")])
def test_an_invalid_torchrun_environment_exits_2_naming_it(tmp_path, capsys, monkeypatch, rank, world):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", world)
    assert charlm(tmp_path / "run", "--steps", "2") == 2
    err = capsys.readouterr().err
    assert f"RANK={rank!r}, WORLD_SIZE={world!r}" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_refused_device_leaves_no_folder_behind(tmp_path, capsys, monkeypatch):
    """--device cuda without CUDA exited 2 but left the new --out folder behind, empty (the device was checked after
    the folder was made); the other argument checks leave nothing."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert charlm(tmp_path / "new", "--steps", "2", "--device", "cuda") == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert charlm(tmp_path / "a" / "b" / "new", "--steps", "2", "--device", "cuda") == 2
    assert not (tmp_path / "a").exists()  # nor its parents
    (tmp_path / "kept").mkdir()  # a folder that existed before is left alone
    assert charlm(tmp_path / "kept", "--steps", "2", "--device", "cuda") == 2
    assert (tmp_path / "kept").is_dir()
