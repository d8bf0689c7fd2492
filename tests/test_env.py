"""The machine as the package sees it: usable CPUs (affinity mask and container quota)."""

from __future__ import annotations

import os

import pytest

from theorylab import env


def _affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.fixture
def cgroup(tmp_path, monkeypatch):
    """Point the cgroup files at tmp_path; returns a writer for (v2 text, v1 quota, v1 period)."""
    v2, v1q, v1p = tmp_path / "cpu.max", tmp_path / "cfs_quota_us", tmp_path / "cfs_period_us"
    monkeypatch.setattr(env, "CGROUP_CPU_MAX", str(v2))
    monkeypatch.setattr(env, "CGROUP_V1_QUOTA", (str(v1q), str(v1p)))

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
