"""The machine as the package sees it: usable CPUs (affinity mask and container quota)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from theorylab import env


def _affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.fixture
def cgroup(tmp_path, monkeypatch):
    """Point the cgroup files at tmp_path; returns a writer for (v2 text, v1 quota, v1 period)."""
    v2, v1q, v1p = tmp_path / "cpu.max", tmp_path / "cfs_quota_us", tmp_path / "cfs_period_us"
    monkeypatch.setattr(env, "CGROUP_CPU_MAX", str(v2))
    monkeypatch.setattr(env, "CGROUP_V1_QUOTA", (str(v1q), str(v1p)))
    monkeypatch.setattr(env, "PROC_SELF_CGROUP", str(tmp_path / "proc-self-cgroup"))  # absent unless written

    def write(v2_text: str | None = None, quota: str | None = None, period: str = "100000") -> None:
        if v2_text is not None:
            v2.write_text(v2_text, encoding="utf-8")
        if quota is not None:
            v1q.write_text(quota, encoding="utf-8")
            v1p.write_text(period, encoding="utf-8")

    return write


@pytest.mark.parametrize(("text", "quota"), [("max 100000\n", None), ("200000 100000\n", 2.0),
                                             ("150000 100000\n", 1.5), ("garbage", None), ("5 0", None)])
def test_cgroup_v2_quota(cgroup, text, quota):
    cgroup(v2_text=text)
    assert env._cgroup_cpu_quota() == quota


@pytest.mark.parametrize(("quota_us", "quota"), [("-1", None), ("50000", 0.5), ("300000", 3.0), ("x", None)])
def test_cgroup_v1_quota(cgroup, quota_us, quota):
    cgroup(quota=quota_us)
    assert env._cgroup_cpu_quota() == quota


def test_no_cgroup_files_means_no_quota(cgroup):
    assert env._cgroup_cpu_quota() is None
    assert env.available_cores() == _affinity()


def test_a_quota_caps_the_usable_cores_rounded_up_and_never_below_one(cgroup):
    cgroup(v2_text="50000 100000")  # half a CPU
    assert env.available_cores() == 1
    cgroup(v2_text=f"{100000 * (_affinity() + 5)} 100000")  # a quota above the CPUs: the CPUs
    assert env.available_cores() == _affinity()
    if _affinity() >= 2:
        cgroup(v2_text="150000 100000")
        assert env.available_cores() == 2


def test_a_quota_on_the_process_cgroup_or_an_ancestor_counts_outside_a_cgroup_namespace(cgroup, tmp_path):
    """Only the mount's cpu.max was read: without a cgroup namespace (a systemd unit with CPUQuota=, docker
    --cgroupns=host) that is the root's, which has none, and the quota of the process's own cgroup was missed."""
    (tmp_path / "proc-self-cgroup").write_text("0::/system.slice/job.service\n", encoding="utf-8")
    cgroup(v2_text="max 100000")
    assert env._cgroup_cpu_quota() is None  # no file below the root yet
    own = tmp_path / "system.slice" / "job.service"
    own.mkdir(parents=True)
    (own / "cpu.max").write_text("max 100000\n", encoding="utf-8")
    (tmp_path / "system.slice" / "cpu.max").write_text("300000 100000\n", encoding="utf-8")
    assert env._cgroup_cpu_quota() == 3.0  # the ancestor's
    (own / "cpu.max").write_text("150000 100000\n", encoding="utf-8")
    assert env._cgroup_cpu_quota() == 1.5  # the tightest
    assert env.available_cores() == min(_affinity(), 2)


def test_cgroup_v1_lines_are_ignored(cgroup, tmp_path):
    (tmp_path / "proc-self-cgroup").write_text("4:cpu,cpuacct:/x\n", encoding="utf-8")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "cpu.max").write_text("50000 100000\n", encoding="utf-8")
    cgroup(quota="300000")
    assert env._cgroup_cpu_quota() == 3.0  # v1's: the v1 line names no v2 cgroup


def test_a_cgroup_outside_the_namespace_root_is_not_read_as_one_below_it(cgroup, tmp_path):
    """``0::/../sibling`` (a process outside its cgroup namespace's root) had dropped the "..", reading the quota
    of ROOT/sibling, another cgroup."""
    (tmp_path / "proc-self-cgroup").write_text("0::/../sibling\n", encoding="utf-8")
    (tmp_path / "sibling").mkdir()
    (tmp_path / "sibling" / "cpu.max").write_text("50000 100000\n", encoding="utf-8")
    cgroup(v2_text="max 100000")
    assert env._cgroup_v2_files() == [env.CGROUP_CPU_MAX]
    assert env._cgroup_cpu_quota() is None


def test_the_environment_records_the_cores_this_run_may_use(monkeypatch):
    """cpu_count is the machine's; under taskset or a container's quota the run uses fewer, as 4.4's workers do."""
    monkeypatch.setattr(env, "available_cores", lambda: 1)
    e = env.environment()
    assert e["available_cores"] == 1 and e["cpu_count"] == os.cpu_count()


def test_the_environment_names_the_gpus_and_the_cuda_build(monkeypatch):
    """A GPU bug report needs the devices and the CUDA build; it had recorded only cuda_available."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"GPU {i}")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91000)
    monkeypatch.setattr(torch.cuda, "nccl", SimpleNamespace(version=lambda: (2, 27, 3)))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    cuda = env.environment()["cuda"]
    assert cuda == {"count": 2, "devices": ["GPU 0", "GPU 1"], "cuda_version": "13.0", "cudnn": 91000,
                    "nccl": "2.27.3"}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # names only once CUDA is up: reading
    assert env.environment()["cuda"]["devices"] is None  # them would make a context on every GPU


def test_the_environment_records_omp_num_threads_and_the_source_commit(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    e = env.environment()
    assert e["omp_num_threads"] == "1"
    if (Path(env.__file__).resolve().parents[2] / ".git").exists():  # a checkout: its commit, 12 hex digits
        assert e["source"] is not None and len(e["source"].split("+")[0]) == 12
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert env.environment()["omp_num_threads"] is None
    monkeypatch.setattr(env, "__file__", "/nonexistent/site-packages/theorylab/env.py")
    assert env._source_commit() is None  # an installed copy
