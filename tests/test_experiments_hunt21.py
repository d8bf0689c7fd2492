"""Twenty-first session: seeded experiments leave the caller's random state alone; the digits split follows the
seed; a resumed training run keeps its thread count."""

from __future__ import annotations

import torch

from theorylab.rnn import tasks


def test_rnn_task_training_gives_the_caller_its_random_state_back():
    """tasks.train reseeded torch's global generator: whatever the caller had seeded, the next draw after it was
    the same."""
    torch.manual_seed(111)
    expected = torch.rand(3)
    torch.manual_seed(111)
    first = tasks.train("adding", 5, iterations=2, hidden=4, batch=4, seed=0)
    assert torch.equal(torch.rand(3), expected)
    again = tasks.train("adding", 5, iterations=2, hidden=4, batch=4, seed=0)
    assert again == first  # still seeded: the same run


def test_the_digits_task_splits_by_its_seed(monkeypatch):
    """_batch asked digits_sequences() for the seed-0 split whatever the run's seed."""
    seen = []
    real = tasks.digits_sequences

    def spy(seed: int = 0):
        seen.append(seed)
        return real(seed)

    monkeypatch.setattr(tasks, "digits_sequences", spy)
    tasks.train("digits", 8, iterations=1, hidden=4, batch=4, seed=3)
    assert seen and set(seen) == {3}


def _tiny(out, *extra: str) -> int:
    from theorylab.cli import main

    return main(["train", "charlm", "--out", str(out), "--seq-len", "16", "--layers", "1", "--width", "16", "--heads",
                 "2", "--num-features", "8", "--batch-size", "4", "--warmup", "2", "--eval-chars", "300", *extra])


def test_a_resumed_run_keeps_its_thread_count(tmp_path, monkeypatch, capsys):
    """The checkpoint did not record --threads: the resume command that Ctrl-C prints (without it) continued on
    torch's default count, which rounds differently (final bits/char 4.84951969735 against 4.84951961203)."""
    import json

    import theorylab.cli.train as cli_train

    monkeypatch.setattr(cli_train, "available_cores", lambda: 2, raising=False)
    monkeypatch.setattr("theorylab.experiments.distributed.available_cores", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the default a resume without --threads had taken
    try:
        assert _tiny(tmp_path, "--threads", "1", "--steps", "2") == 0
        assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["options"]["threads"] == 1
        assert _tiny(tmp_path, "--resume", "--steps", "3") == 0
        assert json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))["threads_per_rank"] == 1
        assert "resuming on" not in capsys.readouterr().err
        assert _tiny(tmp_path, "--resume", "--steps", "4", "--threads", "2") == 0  # asked for: done, and said
        assert "resuming on 2 thread(s) per process where the run so far used 1" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_a_resume_under_torchrun_keeps_to_its_share_of_the_cores(monkeypatch, capsys):
    """A run of one process on 2 threads, resumed under torchrun with 2 processes per machine, took the saved 2
    threads in each rank: 4 threads on 2 cores, and no word of it."""
    from theorylab.cli.train import _resumed_threads

    assert _resumed_threads(None, 2, cpus=2, main=True) == 2  # one process: the saved count fits
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert _resumed_threads(None, 2, cpus=2, main=True) == 1
    assert "resuming on 1 thread(s) per process where the run so far used 2" in capsys.readouterr().err
    assert _resumed_threads(None, 1, cpus=2, main=True) == 1 and not capsys.readouterr().err


def test_seeded_experiments_queue_no_cuda_seed(monkeypatch):
    """torch.manual_seed also queues a seed for a CUDA runtime not yet started, which fork_rng cannot restore: a
    CPU experiment seeds the CPU generator only."""
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    tasks.train("adding", 5, iterations=1, hidden=4, batch=4, seed=7)
    assert calls == []
