"""The same ``theorylab train charlm`` command under torchrun with 2 processes (DDP, gloo on CPU).

Each rank takes half of every global batch and DDP averages the gradients, so the 2-process run is the 1-process
run up to floating-point rounding: the test compares the two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from theorylab.experiments.distributed import available_cores

ARGS = ["train", "charlm", "--attention", "favor", "--steps", "4", "--seq-len", "16", "--layers", "1",
        "--width", "16", "--heads", "2", "--num-features", "8", "--batch-size", "4", "--warmup", "2",
        "--eval-chars", "400"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    return {**env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _torchrun(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m theorylab ARGS``, started again (at most twice) when a port it
    had found free was taken by another process before it bound it (the suite runs other socket tests beside it)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for _attempt in range(3):
        done = subprocess.run([*torchrun, "-m", "theorylab", *args], env=_env(), capture_output=True, text=True,
                              timeout=timeout)
        text = (done.stdout + done.stderr).lower()
        if done.returncode == 0 or not ("address already in use" in text or "eaddrinuse" in text):
            break
    return done


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path):
    two = _torchrun([*ARGS, "--out", str(tmp_path / "ddp")], timeout=180)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-4000:]
    assert two.stdout.count("bits/char") == 1  # only rank 0 reports
    one = subprocess.run([sys.executable, "-m", "theorylab", *ARGS, "--out", str(tmp_path / "single")],
                         env=_env(), capture_output=True, text=True, timeout=180)
    assert one.returncode == 0, one.stderr[-4000:]

    m2 = json.loads((tmp_path / "ddp" / "metrics.json").read_text(encoding="utf-8"))
    m1 = json.loads((tmp_path / "single" / "metrics.json").read_text(encoding="utf-8"))
    # each of the 2 ranks takes half the cores (1 on CI's 2 cores, 8 on a 16-core machine)
    assert (m2["world_size"], m2["backend"], m2["threads_per_rank"]) == (2, "gloo", max(1, available_cores() // 2))
    assert m1["world_size"] == 1
    assert m2["train_bpc"] == pytest.approx(m1["train_bpc"], rel=1e-4)
    assert m2["final_bpc"] == pytest.approx(m1["final_bpc"], rel=1e-4)
    a = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for k in b["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_torchrun_bad_input_exits_2_on_every_rank(tmp_path):
    r = _torchrun(["train", "charlm", "--seq-len", "0", "--out", str(tmp_path / "x")], timeout=120)
    assert r.returncode != 0
    assert r.stderr.count("seq-len must be positive") == 1  # rank 0 says it once
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_busy_out_exits_2_on_every_rank(tmp_path):
    """Only rank 0 takes the --out lock; when it was held elsewhere rank 0 exited 2 and the other ranks waited for
    it in init_process_group (30 minutes by default). The ranks are started by hand here, as a launcher without
    torchrun's agent would (torchrun itself kills the others once one fails, which would hide the wait)."""
    import socket

    from theorylab.cli._args import exclusive_output

    out = tmp_path / "busy"
    out.mkdir()
    for _attempt in range(3):  # the free port is released before rank 0 binds it: another process may take it
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        ranks = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        with exclusive_output(out):
            procs = [subprocess.Popen([sys.executable, "-m", "theorylab", *ARGS, "--out", str(out)],
                                      env={**_env(), **ranks, "RANK": str(r), "LOCAL_RANK": str(r)},
                                      stderr=subprocess.PIPE, text=True) for r in range(2)]
            try:
                errs = [p.communicate(timeout=120)[1] for p in procs]
            except subprocess.TimeoutExpired:  # rank 1 can join another test's job that took the port (seen once
                for p in procs:  # under -n 2): try another port; the wait this test guards against hangs each time
                    p.kill()
                    p.communicate()
                errs = ["address already in use (or taken by another job): timed out"] * 2
        if not any("address already in use" in e.lower() for e in errs):
            break
    assert [p.returncode for p in procs] == [2, 2]
    assert "another theorylab run is writing into" in errs[0] and errs[1] == ""  # rank 0 says it
    assert list(out.iterdir()) == []


def test_a_usage_error_on_another_rank_waits_for_rank_0_to_report_it(tmp_path, monkeypatch, capsys):
    """Under torchrun, a rank other than 0 that exited 2 first made torchrun stop rank 0 before it had printed the
    reason (seen once with torch 2.4). Such a rank now waits; torchrun ends the wait when rank 0 exits."""
    from theorylab.cli import main, train

    slept = []
    monkeypatch.setattr(train.time, "sleep", slept.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, delays in (("1", [train.NON_MAIN_EXIT_DELAY_S]), ("0", [])):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)  # one machine: rank 0 alone says it
        slept.clear()
        assert main(["train", "charlm", "--seq-len", "0", "--out", str(tmp_path / "x")]) == 2
        assert slept == delays
        assert capsys.readouterr().err.count("seq-len must be positive") == (rank == "0")
    assert not (tmp_path / "x").exists()


def test_a_usage_error_on_another_machine_is_reported_there(tmp_path, monkeypatch, capsys):
    """Rank 1 as the first process of a second machine ("the same command on each node", one with fewer cores):
    its refusal had been printed nowhere, and torchrun showed only "exitcode: 2"."""
    from theorylab.cli import main, train

    monkeypatch.setattr(train.time, "sleep", lambda s: None)
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        monkeypatch.setenv(name, value)
    assert main(["train", "charlm", "--seq-len", "0", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("theorylab train charlm (rank 1): error: ") == 1 and "seq-len must be positive" in err


def test_threads_beyond_the_share_of_the_cpus_under_torchrun_are_refused(tmp_path, monkeypatch, capsys):
    """--threads 2 with two processes on 2 CPUs had been accepted: 4 threads on 2 CPUs, 3.5x slower."""
    from theorylab.cli import main
    from theorylab.experiments import distributed

    monkeypatch.setattr(distributed, "available_cores", lambda: 2)
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    assert main(["train", "charlm", "--threads", "2", "--out", str(tmp_path / "x")]) == 2
    assert ("--threads must lie in [1, 1] (the 2 CPUs this process may use, shared by the 2 processes on this "
            "machine), got 2") in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _as_rank(monkeypatch, local_rank: int, local_world: int, gpus: int) -> None:
    """This process as rank ``local_rank`` of a torchrun job on one machine with ``gpus`` GPUs (simulated: the
    process group and the GPUs are stand-ins)."""
    from theorylab.experiments import distributed

    for name, value in (("RANK", local_rank), ("WORLD_SIZE", local_world), ("LOCAL_RANK", local_rank),
                        ("LOCAL_WORLD_SIZE", local_world)):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)  # no process group is joined
    monkeypatch.setattr(distributed.torch, "set_num_threads", lambda n: None)


@pytest.mark.parametrize("local_rank", [0, 1])
def test_auto_trains_on_cpu_when_the_machine_has_fewer_gpus_than_processes(monkeypatch, local_rank):
    """Two ranks on a one-GPU machine: rank 1 used to call torch.cuda.set_device(1) ("invalid device ordinal")."""
    from theorylab.experiments.distributed import init_distributed

    _as_rank(monkeypatch, local_rank, 2, gpus=1)
    if local_rank == 0:
        with pytest.warns(UserWarning, match=r"2 processes on this machine but 1 GPU\(s\): training on CPU"):
            env = init_distributed("auto")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the warning comes once per machine
            env = init_distributed("auto")
    assert (env.device, env.backend, env.local_rank) == (torch.device("cpu"), "gloo", local_rank)
    with pytest.raises(ValueError, match=r"2 processes on this machine but 1 GPU\(s\).*--nproc_per_node 1"):
        init_distributed("cuda")


def test_a_job_over_several_machines_with_too_few_gpus_is_refused_not_split_over_two_backends(monkeypatch):
    """Each node decides alone: one with too few GPUs must not pick gloo while the others pick nccl."""
    from theorylab.experiments.distributed import init_distributed

    _as_rank(monkeypatch, 1, 2, gpus=1)
    monkeypatch.setenv("WORLD_SIZE", "4")  # 2 nodes of 2 processes
    with pytest.raises(ValueError, match=r"2 processes on this machine but 1 GPU\(s\).*1 on every node"):
        init_distributed("auto")


def test_a_launcher_without_local_world_size_gets_an_error_not_a_missing_gpu(monkeypatch):
    """Without LOCAL_WORLD_SIZE (a launcher other than torchrun) local rank 1 on a one-GPU machine was sent to
    cuda:1, which does not exist."""
    from theorylab.experiments.distributed import init_distributed

    _as_rank(monkeypatch, 1, 2, gpus=1)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    with pytest.raises(ValueError, match=r"2 processes on this machine but 1 GPU\(s\)"):
        init_distributed("auto")


def test_auto_takes_one_gpu_per_process_when_there_are_enough(monkeypatch):
    from theorylab.experiments.distributed import init_distributed

    _as_rank(monkeypatch, 1, 2, gpus=2)
    env = init_distributed("auto")
    assert (env.device, env.backend) == (torch.device("cuda", 1), "nccl")


def test_an_interrupt_at_start_up_is_reported_once_under_torchrun(monkeypatch, capsys):
    """Ctrl-C in the first seconds (while the subcommands import) printed "theorylab: interrupted" from every rank."""
    from theorylab import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert cli.main(["train", "charlm"]) == 130
        assert capsys.readouterr().err.count("theorylab: interrupted") == (rank == "0")
    monkeypatch.delenv("WORLD_SIZE")  # RANK alone (left by another tool) is a single process, as job_rank_world says
    assert cli.main(["train", "charlm"]) == 130
    assert "theorylab: interrupted" in capsys.readouterr().err


def test_sigterm_keeps_its_default_action_while_the_process_group_forms(tmp_path, monkeypatch, capsys):
    """A Python SIGTERM handler runs only once the C++ call it interrupts returns: installed before
    init_distributed, it left rank 0 waiting (up to torch's 30-minute timeout) for a rank that never came, where
    SIGTERM had ended it at once."""
    import signal

    from theorylab.cli import main
    from theorylab.experiments import distributed

    seen = []

    def init_distributed(device, threads):
        seen.append(signal.getsignal(signal.SIGTERM))
        raise ValueError("stop here")

    monkeypatch.setattr(distributed, "init_distributed", init_distributed)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["train", "charlm", "--out", str(tmp_path / "x"), "--steps", "1"]) == 2
    assert seen == [before] and "stop here" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["", "1.5", "0", "-3"])
def test_a_malformed_local_world_size_is_named(tmp_path, monkeypatch, capsys, value):
    from theorylab.cli import main

    for name, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", value)):
        monkeypatch.setenv(name, v)
    assert main(["train", "charlm", "--out", str(tmp_path / "x"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert f"LOCAL_WORLD_SIZE must be a positive integer (torchrun sets it), got {value!r}" in err
    assert "Traceback" not in err
