"""The standalone scripts in benchmarks/ that README numbers come from still run (tiny sizes, seconds)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from attention_helpers import _CXX

from theorylab.claims import q4_weight_decay as q4

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
pytestmark = pytest.mark.skipif(not BENCHMARKS.is_dir(), reason="benchmarks/ ships with a checkout only")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_q4_power_writes_the_claims_numbers_and_a_readout(tmp_path, monkeypatch):
    power = _load("q4_power")
    tiny = dataclasses.replace(q4.QUICK, n_lr=3, n_wd=3, steps=10, n_train=60)
    monkeypatch.setattr(q4, "FULL", tiny)
    out = tmp_path / "power.json"
    monkeypatch.setattr(sys, "argv", ["q4_power", "--replicates", "2", "--data-seeds", "3", "--json", str(out)])
    power.main()
    result = json.loads(out.read_text(encoding="utf-8"))
    (row,) = result["rows"]
    assert row["replicates"] == 2 and row["numbers"]["seeds"] == 2 and row["numbers"]["steps"] == 10
    assert result["readout"] in ("power", "no effect at this power")
    power_holds = row["adam_gap_resolved"] and row["point_criterion_passes"]
    assert (result["readout"] == "power") == power_holds
    assert row["verify_rule_confirms"] <= power_holds  # verify's rule adds the SGD conditions


def test_q4_power_refuses_one_replicate(monkeypatch):
    power = _load("q4_power")
    monkeypatch.setattr(sys, "argv", ["q4_power", "--replicates", "1"])
    with pytest.raises(SystemExit) as exc:
        power.main()
    assert exc.value.code == 2


def test_q4_rotational_equilibrium_runs(tmp_path, monkeypatch):
    bench = _load("q4_rotational_equilibrium")
    out = tmp_path / "eq.json"
    monkeypatch.setattr(sys, "argv", ["q4_rotational_equilibrium", "--steps", "6", "--tail", "3", "--json", str(out)])
    bench.main()
    rows = json.loads(out.read_text(encoding="utf-8"))["rows"]
    assert len(rows) == 2 * sum(len(v) for v in bench.DECAYS.values())
    assert all(len(r["angular_step"]) == len(bench.LRS) and all(a >= 0 for a in r["angular_step"]) for r in rows)


@pytest.mark.parametrize("kind", ["favor", "separable"])
def test_attention_revisions_times_a_revision_against_the_working_tree(tmp_path, monkeypatch, kind):
    if not (BENCHMARKS.parent / ".git").exists():
        pytest.skip("attention_revisions.py takes revisions from git: a git checkout only")
    revisions = _load("attention_revisions")
    out = tmp_path / "revisions.json"
    monkeypatch.setattr(sys, "argv", ["attention_revisions", "HEAD", "--worktree", "--kind", kind, "--ns", "40",
                                      "--rounds", "1", "--json", str(out)])
    revisions.main()
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["revisions"] == ["HEAD", "worktree"] and result["kind"] == kind
    assert [(row["n"], row["pass"]) for row in result["rows"]] == [(40, "forward"), (40, "forward+backward")]
    for row in result["rows"]:
        assert all(ms > 0 for ms in row["median_ms"].values())
        assert row["max_abs_diff_vs_first"]["HEAD"] == 0.0 and row["max_abs_diff_vs_first"]["worktree"] < 1e-5


def test_attention_revisions_needs_two_revisions(monkeypatch):
    revisions = _load("attention_revisions")
    monkeypatch.setattr(sys, "argv", ["attention_revisions", "HEAD"])
    with pytest.raises(SystemExit, match="2"):
        revisions.main()


def test_attention_revisions_refuses_a_revision_twice(monkeypatch, capsys):
    revisions = _load("attention_revisions")
    monkeypatch.setattr(sys, "argv", ["attention_revisions", "HEAD", "HEAD"])
    with pytest.raises(SystemExit):
        revisions.main()
    assert "each label once (HEAD HEAD)" in capsys.readouterr().err


def test_attention_revisions_takes_a_package_unpacked_elsewhere(tmp_path, monkeypatch, capsys):
    revisions = _load("attention_revisions")
    package = BENCHMARKS.parent / "src" / "theorylab"
    out = tmp_path / "packages.json"
    monkeypatch.setattr(sys, "argv", ["attention_revisions", "--package", f"copy={package}", "--worktree", "--ns",
                                      "24", "--rounds", "1", "--json", str(out)])
    revisions.main()
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["revisions"] == ["copy", "worktree"]
    assert all(row["max_abs_diff_vs_first"]["worktree"] == 0.0 for row in result["rows"])
    monkeypatch.setattr(sys, "argv", ["attention_revisions", "--package", f"copy={tmp_path}", "--worktree"])
    with pytest.raises(SystemExit):
        revisions.main()
    assert "holding a package's __init__.py" in capsys.readouterr().err


def test_gpu_optim_times_every_contender_per_step(tmp_path, monkeypatch):
    """benchmarks/gpu_optim.py runs the same code on the CPU: every contender, per-step times, the JSON. Its
    read-backs are n/a there, also on a machine with a GPU (where torch's count said 0 for the CPU's steps: the
    H200 in the twenty-fifth session), which the patched count stands for."""
    gpu_optim = _load("gpu_optim")
    monkeypatch.setattr(gpu_optim, "cuda_read_backs", lambda fn: (fn(), 0)[1])
    out = tmp_path / "optim.json"
    result = gpu_optim.main(["--device", "cpu", "--quick", "--steps", "2", "--rounds", "2", "--json", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    rows = {r["optimizer"]: r for r in result["rows"]}
    assert set(rows) >= {"theorylab AdamW", "theorylab AdamW fused", "torch AdamW foreach", "torch AdamW fused"}
    assert rows["torch AdamW fused"]["vs_torch_fused"] == 1.0
    assert all(r["median_ms_per_step"] > 0 and r["read_backs_per_step"] is None for r in rows.values())
    assert all(r["read_backs_first_step"] is None for r in rows.values())
    assert result["parameters"] == 725_504 and result["steps"] == 2


def test_gpu_optim_refuses_zero_steps(capsys):
    gpu_optim = _load("gpu_optim")
    with pytest.raises(SystemExit) as e:
        gpu_optim.main(["--device", "cpu", "--steps", "0"])
    assert e.value.code == 2 and "--steps and --rounds must be >= 1, got 0" in capsys.readouterr().err


def test_gpu_optim_divides_each_call_by_its_steps(monkeypatch):
    """A timed call runs --steps steps: the table's time is per step."""
    gpu_optim = _load("gpu_optim")
    calls = []

    def fake_times(fns, rounds, warmup):
        for fn in fns.values():
            fn()
            calls.append(fn)
        return {name: [0.006] * rounds for name in fns}

    monkeypatch.setattr(gpu_optim, "interleaved_times", fake_times)
    result = gpu_optim.main(["--device", "cpu", "--quick", "--steps", "3", "--rounds", "2"])
    assert len(calls) == 7
    assert all(abs(r["median_ms_per_step"] - 2.0) < 1e-9 for r in result["rows"])
    assert all(r["vs_torch_fused"] == 1.0 for r in result["rows"])


@pytest.mark.slow
def test_gpu_optim_compiles_our_chain_on_request():
    """``--compile`` (which benchmarks/gpu_check.sh passes) adds our chain through torch.compile(opt.step)."""
    if shutil.which(_CXX) is None:
        pytest.skip(f"torch.compile's CPU backend needs a C++ compiler ({_CXX})")
    gpu_optim = _load("gpu_optim")
    result = gpu_optim.main(["--device", "cpu", "--quick", "--steps", "2", "--rounds", "2", "--compile"])
    rows = {r["optimizer"]: r for r in result["rows"]}
    assert set(gpu_optim.COMPILED) <= set(rows) and all(rows[n]["median_ms_per_step"] > 0 for n in gpu_optim.COMPILED)
    assert "torch.compile(step)" in gpu_optim.format_table(result)


def test_gpu_optim_profile_adds_the_host_share_and_no_kernel_counts_off_a_gpu(capsys):
    """--profile: each row gets the host's ms per step (queueing the steps, before the synchronize), and the
    kernel launches and kernel time, which only a GPU has (None on the CPU, "n/a" in the table)."""
    gpu_optim = _load("gpu_optim")
    result = gpu_optim.main(["--device", "cpu", "--quick", "--steps", "2", "--rounds", "1", "--profile"])
    for row in result["rows"]:
        assert row["host_ms_per_step"] > 0
        assert row["kernel_launches_per_step"] is None and row["kernel_ms_per_step"] is None
    table = capsys.readouterr().out
    assert "host ms" in table and "kernel ms" in table and "n/a" in table


def test_gpu_optim_host_time_is_per_step_and_excludes_the_synchronize(monkeypatch):
    """host_ms_per_step divides each call's time by its steps and takes the median of the calls."""
    gpu_optim = _load("gpu_optim")
    clock = iter([0.0, 0.004, 1.0, 1.010, 2.0, 2.006])  # calls of 4, 10 and 6 ms over 2 steps each
    monkeypatch.setattr(gpu_optim, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    assert gpu_optim.host_ms_per_step(lambda: None, 2, torch.device("cpu"), calls=3) == pytest.approx(3.0)


def test_decode_kv_cache_runs_and_its_contenders_agree(monkeypatch, capsys):
    """The README's numbers for theorylab's own KVCache come from this script; its preallocated cache must
    compute what the library's does (the same outputs), or the comparison would be of different work."""
    bench = _load("decode_kv_cache")
    monkeypatch.setattr(bench, "TOKENS", 3)
    monkeypatch.setattr(sys, "argv", ["decode_kv_cache", "--contexts", "8"])
    bench.main()
    assert "n =      8: theorylab KVCache" in capsys.readouterr().out
    from theorylab.attention import KVCache
    from theorylab.attention.exact import cached_softmax_attention

    keys, values, x = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 1, 4)
    library, _ = cached_softmax_attention(x, x, x, KVCache(keys, values))
    cached_keys, cached_values = torch.cat([keys, x], 2), torch.cat([values, x], 2)
    preallocated = torch.nn.functional.scaled_dot_product_attention(x, cached_keys, cached_values)
    torch.testing.assert_close(library, preallocated)
