"""The environment a run happened in: versions, CPU, threads (for results.json, the report and bug reports)."""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

_PACKAGES = ("theorylab", "torch", "numpy", "scipy", "scikit-learn", "matplotlib", "rich", "hypothesis",
             "performer-pytorch")


#: where a container's CPU quota lives: cgroup v2 ("QUOTA PERIOD" or "max PERIOD"), then v1 (quota -1: none)
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"
CGROUP_V1_QUOTA = ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")
#: this process's cgroup v2 path ("0::/PATH"), relative to the mount above (outside a cgroup namespace, say a
#: systemd unit with CPUQuota=, the mount's own cpu.max is the root's, which has none)
PROC_SELF_CGROUP = "/proc/self/cgroup"


def available_cores() -> int:
    """The CPUs this process may use: its affinity mask (e.g. under ``taskset``; all CPUs off Linux), capped by a
    container's CPU quota (``docker --cpus 2`` on a 64-core host gives 2), rounded up."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota is not None else cores


def _cgroup_v2_files() -> list[str]:
    """cpu.max of the mount's root, then of this process's cgroup and each of its ancestors below that root."""
    root = os.path.dirname(CGROUP_CPU_MAX)
    files = [CGROUP_CPU_MAX]
    try:
        with open(PROC_SELF_CGROUP) as f:
            lines = f.read().splitlines()
    except OSError:
        return files
    for line in lines:
        parts = [part for part in line[3:].split("/") if part not in ("", ".")]
        # ".." (a cgroup outside this namespace's root) has no file under the mount: dropping it had read a sibling
        if line.startswith("0::") and ".." not in parts:
            files += [os.path.join(root, *parts[:i], "cpu.max") for i in range(len(parts), 0, -1)]
    return files


def _cgroup_cpu_quota() -> float | None:
    """CPUs' worth of time per period that the cgroup allows (the tightest of its own and its ancestors'), or None
    (no quota, or no cgroup files)."""
    quotas, found_v2 = [], False
    for name in _cgroup_v2_files():
        try:
            with open(name) as f:
                quota, period = f.read().split()[:2]
            found_v2 = True
            if quota != "max":
                quotas.append(int(quota) / int(period))
        except (OSError, ValueError, ZeroDivisionError):
            continue
    if found_v2:
        return min(quotas) if quotas else None
    try:
        with open(CGROUP_V1_QUOTA[0]) as fq, open(CGROUP_V1_QUOTA[1]) as fp:
            quota_us, period_us = int(fq.read()), int(fp.read())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),  # the machine's
        "available_cores": available_cores(),  # this run's: affinity and a container's quota (4.4's workers)
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),  # None: unset (torch then takes the cores)
        "cuda_available": torch.cuda.is_available(),
        "cuda": _cuda(),
        "source": _source_commit(),
        "versions": versions,
    }


def _cuda() -> dict[str, Any] | None:
    """The GPUs and the CUDA build a GPU benchmark or bug report needs; None without a GPU. The devices' names only
    where CUDA is initialised already (reading them initialises it: a context on every GPU of a CPU-only run)."""
    if not torch.cuda.is_available():
        return None
    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    except (AttributeError, RuntimeError):  # a build without NCCL
        nccl = None
    count = torch.cuda.device_count()
    names = [torch.cuda.get_device_name(i) for i in range(count)] if torch.cuda.is_initialized() else None
    return {"count": count, "devices": names, "cuda_version": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "nccl": nccl}


def _source_commit() -> str | None:
    """The git commit of the checkout theorylab runs from (an editable install; every commit says 0.1.0), with
    "+changes" when its working tree differs; None for an installed copy, or without git."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    # this checkout's, whatever GIT_DIR a git hook set; --no-optional-locks: status must not rewrite the index
    # (its lock would fail the user's own git commands meanwhile)
    env = {k: v for k, v in os.environ.items() if k not in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE")}

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "--no-optional-locks", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10, env=env)

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    if dirty.returncode != 0:
        return head.stdout.strip() + "+unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
