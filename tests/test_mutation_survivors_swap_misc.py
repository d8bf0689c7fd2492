"""Tests written for mutants of attention/swap, rnn/_threads, cost/fit, data, env, cli/env and claims/catalogue that
the rest of the suite let through: each pins down one behaviour that a plausible one-line change broke silently."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import io
import json
import platform
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from theorylab import env
from theorylab.attention import MultiheadAttention, swap_attention
from theorylab.claims.catalogue import BY_ID, CATALOGUE, CLAIM_IDS, QUESTIONS
from theorylab.cli import main
from theorylab.cost import fit_power_law
from theorylab.data import digits_split
from theorylab.report import render_report
from theorylab.rnn._threads import SMALL_WORK, numpy_blas_threads, threads_for

# ------------------------------------------------------------------------------------------------ attention/swap
E, H, N, B = 16, 2, 6, 2
F64 = torch.float64


def _x(n=N):
    return torch.randn(B, n, E, dtype=F64, generator=torch.Generator().manual_seed(1))


def _trained_mha(**kwargs):
    """An nn.MultiheadAttention whose biases are not torch's zeros (as after training)."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True, dtype=F64, **kwargs)
    with torch.no_grad():
        for p in mha.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mha


def test_softmax_swap_copies_trained_in_and_out_projection_biases():
    """from_torch copies in_proj_bias and out_proj.bias: a model with non-zero biases keeps its outputs."""
    mha = _trained_mha()
    assert mha.in_proj_bias.abs().min() > 0 and mha.out_proj.bias.abs().min() > 0
    ours = swap_attention(copy.deepcopy(mha), "softmax")
    inner = ours.attention
    torch.testing.assert_close(torch.cat([inner.q_proj.bias, inner.k_proj.bias, inner.v_proj.bias]),
                               mha.in_proj_bias, rtol=0, atol=0)
    torch.testing.assert_close(inner.out_proj.bias, mha.out_proj.bias, rtol=0, atol=0)
    x = _x()
    torch.testing.assert_close(ours(x, x, x)[0], mha(x, x, x, need_weights=False)[0], rtol=1e-12, atol=1e-12)


def test_a_change_of_kind_of_a_bias_free_model_adds_no_biases():
    """A swapped model built with bias=False keeps no biases when it changes kind."""
    first = swap_attention(nn.MultiheadAttention(E, H, bias=False, batch_first=True), "linear")
    again = swap_attention(first, "favor", num_features=8).attention
    assert all(p.bias is None for p in (again.q_proj, again.k_proj, again.v_proj, again.out_proj))


def test_a_change_of_kind_keeps_dropout():
    """Dropout is carried over on a change of kind (not only from torch's module)."""
    first = swap_attention(nn.MultiheadAttention(E, H, dropout=0.3, batch_first=True), "linear")
    assert swap_attention(first, "softmax").attention.dropout.p == 0.3


def test_linear_to_favor_keeps_recompute_and_uses_the_default_number_of_features():
    """recompute carries from "linear" to "favor"; num_features is carried only from FAVOR+ (linear's ELU map has
    head_dim features, which must not become FAVOR+'s feature count)."""
    first = swap_attention(nn.MultiheadAttention(E, H, batch_first=True), "linear", recompute=True)
    favor = swap_attention(first, "favor").attention
    assert favor.recompute
    assert favor.feature_map.num_features == 256 == MultiheadAttention(E, H, kind="favor").feature_map.num_features


def test_favor_to_favor_draws_its_own_features():
    """A change of kind copies the projections only: the new FAVOR+ module's random features follow its own seed
    and number of features, not the old module's buffer."""
    first = swap_attention(nn.MultiheadAttention(E, H, batch_first=True), "favor", num_features=8, seed=0)
    again = swap_attention(first, "favor", seed=1).attention
    want = MultiheadAttention(E, H, kind="favor", num_features=8, seed=1).feature_map.projection
    torch.testing.assert_close(again.feature_map.projection, want, rtol=0, atol=0)
    assert not torch.equal(again.feature_map.projection, first.attention.feature_map.projection)
    assert swap_attention(first, "favor", num_features=4).attention.feature_map.num_features == 4


def _is_causal(drop_in, **call):
    """Whether the drop-in's output at the first positions ignores later tokens."""
    x = _x()
    later = x.clone()
    later[:, 3:] += 5.0
    return torch.allclose(drop_in(x, x, x, **call)[0][:, :3], drop_in(later, later, later, **call)[0][:, :3])


def test_the_is_causal_hint_alone_makes_the_call_causal():
    """forward(..., is_causal=True) with no attn_mask is causal (the docstring's 'or when is_causal is set')."""
    drop_in = swap_attention(nn.MultiheadAttention(E, H, batch_first=True, dtype=F64), "linear")
    assert not _is_causal(drop_in)
    assert _is_causal(drop_in, is_causal=True)


def test_a_module_built_causal_stays_causal_with_a_mask_that_blocks_nothing():
    """An all-zero attn_mask blocks nothing, but a module built causal is causal for every call."""
    drop_in = swap_attention(nn.MultiheadAttention(E, H, batch_first=True, dtype=F64), "linear", causal=True)
    assert _is_causal(drop_in, attn_mask=torch.zeros(N, N, dtype=F64))
    assert _is_causal(drop_in, attn_mask=torch.zeros(N, N, dtype=torch.bool))


def test_a_plus_infinity_mask_entry_is_refused_as_a_bias():
    """Only 0 and -inf are a float mask's values; +inf is an additive bias (NaN in torch), not a blocked key."""
    drop_in = swap_attention(nn.MultiheadAttention(E, H, batch_first=True, dtype=F64), "linear")
    x = _x()
    pad = torch.zeros(B, N, dtype=F64)
    pad[0, -1] = float("inf")
    with pytest.raises(ValueError, match="additive bias"):
        drop_in(x, x, x, key_padding_mask=pad)
    plus_inf_causal = torch.zeros(N, N, dtype=F64).masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("inf"))
    with pytest.raises(ValueError, match="additive bias"):
        drop_in(x, x, x, attn_mask=plus_inf_causal)


# ------------------------------------------------------------------------------------------------- rnn/_threads
@pytest.fixture
def two_torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_threads_for_drops_to_one_thread_strictly_below_small_work(two_torch_threads):
    """Kernels of fewer than SMALL_WORK = 2**17 flops run on one thread; from 2**17 flops on, the setting stays;
    either way it is restored after the block."""
    assert SMALL_WORK == 2**17
    for work, inside in ((0, 1), (2**16, 1), (2**17 - 1, 1), (2**17, 2), (2**20, 2)):
        with threads_for(work):
            assert torch.get_num_threads() == inside, work
        assert torch.get_num_threads() == 2


def test_numpy_blas_threads_lowers_and_restores_the_blas_thread_count():
    """numpy_blas_threads(1) puts numpy's BLAS libraries (as threadpoolctl lists them) on one thread inside the block
    and restores each after."""
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads():
        return [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]

    with threadpool_limits(2, user_api="blas"):
        before = blas_threads()
        if not before or max(before) < 2:
            pytest.skip("no BLAS library on more than one thread here")
        with numpy_blas_threads(1):
            assert blas_threads() == [1] * len(before)
        assert blas_threads() == before


# ----------------------------------------------------------------------------------------------------- cost/fit
@pytest.mark.parametrize(("x", "y"), [([0, 1, 2], [1, 2, 3]),  # log 0 = -inf: x must be positive
                                      ([1, 2, float("inf")], [1, 2, 3]),  # x must be finite
                                      ([1, 2, 3], [1, 2, float("inf")]),  # y must be finite
                                      ([2, 2, 2], [1, 2, 3])])  # one distinct x: no slope to fit
def test_power_law_fit_refuses_x_it_cannot_fit(x, y):
    """Zero, infinite or all-equal x (and infinite y) are a ValueError, never a warning and a NaN fit."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning (log 0) or RankWarning on the way
        with pytest.raises(ValueError, match="need >= 2 distinct positive x"):
            fit_power_law(x, y)


def test_power_law_fit_calls_many_points_equal_to_a_few_ulps_constant():
    """The 'constant up to rounding' allowance is 64 ulps per point (summed over the points): 16 values of y that
    differ by ±40 ulps of 1 have R² 1.0, not the noise of a fit to rounding errors."""
    eps = np.finfo(float).eps
    y = 1.0 + 40 * eps * (-1.0) ** np.arange(16)
    assert len(set(y.tolist())) == 2
    assert fit_power_law(np.arange(1.0, 17.0), y).r2 == 1.0


def test_power_law_fit_allowance_grows_with_the_size_of_log_y():
    """log y of y near e^30 rounds at 30x the ulps of log y near 1: y = exp(a) for a equal to 30 up to 8 ulps is
    constant (R² 1.0)."""
    eps = np.finfo(float).eps
    y = np.exp(30.0 * (1 + 4 * eps * (-1.0) ** np.arange(16)))
    assert len(set(y.tolist())) == 2
    assert fit_power_law(np.arange(1.0, 17.0), y).r2 == 1.0


# ------------------------------------------------------------------------------------------------------- data
def test_digits_split_is_stratified_seeded_and_standardised_by_the_training_split():
    """A quarter of each class is held out (stratified), the split follows its seed, and the features are
    standardised with the training split's own mean and std (constant pixels left at 0)."""
    s = digits_split(0)
    assert s.x_train.shape == (1347, 64) and s.x_test.shape == (450, 64) and s.x_train.dtype == torch.float64
    assert digits_split(0, dtype=torch.float32).x_test.dtype == torch.float32
    counts_train, counts_test = torch.bincount(s.y_train, minlength=10), torch.bincount(s.y_test, minlength=10)
    assert ((counts_test - 0.25 * (counts_train + counts_test)).abs() < 1).all()  # stratified: exact to one image
    torch.testing.assert_close(s.x_train.mean(0), torch.zeros(64, dtype=torch.float64), rtol=0, atol=1e-12)
    std = s.x_train.std(0, unbiased=False)
    varying = std > 0
    torch.testing.assert_close(std[varying], torch.ones_like(std[varying]), rtol=1e-12, atol=0)
    assert not varying.all() and (s.x_train[:, ~varying] == 0).all() and s.x_test.isfinite().all()
    assert not s.x_test.mean(0)[varying].abs().lt(1e-12).all()  # the test split's own statistics are not used
    other = digits_split(1)
    assert not torch.equal(other.y_test, s.y_test)


def test_digits_split_keeps_each_image_with_its_label():
    """Images and labels stay paired in both splits: 1-nearest-neighbour from the training split labels the test
    split ~98% right (a shuffled pairing would give ~10%)."""
    s = digits_split(0)
    nearest = torch.cdist(s.x_test, s.x_train).argmin(1)
    assert (s.y_train[nearest] == s.y_test).double().mean() > 0.9


def test_digits_split_names_a_bad_test_fraction():
    """test_fraction outside (0, 1) is refused by name, before sklearn sees it."""
    for bad in (0, 0.0, 1, 1.0, 1.5):
        with pytest.raises(ValueError, match="test_fraction must lie in"):
            digits_split(0, bad)


# ------------------------------------------------------------------------------------------------ env, cli/env
@pytest.fixture
def four_cpus_and_cgroup(tmp_path, monkeypatch):
    """Four CPUs in the affinity mask; the cgroup files point at tmp_path. Returns a writer of (v2, v1 quota,
    v1 period)."""
    monkeypatch.setattr(env.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    v2, v1q, v1p = tmp_path / "cpu.max", tmp_path / "quota", tmp_path / "period"
    monkeypatch.setattr(env, "CGROUP_CPU_MAX", str(v2))
    monkeypatch.setattr(env, "CGROUP_V1_QUOTA", (str(v1q), str(v1p)))

    def write(v2_text=None, quota=None, period="100000"):
        if v2_text is not None:
            v2.write_text(v2_text, encoding="utf-8")
        if quota is not None:
            v1q.write_text(quota, encoding="utf-8")
            v1p.write_text(period, encoding="utf-8")

    return write


def test_a_fractional_quota_is_rounded_up_below_the_cpu_count(four_cpus_and_cgroup):
    """docker --cpus 1.5 on four CPUs: 2 usable cores (rounded up, not down); a zero quota still gives one."""
    four_cpus_and_cgroup(v2_text="150000 100000")
    assert env.available_cores() == 2
    four_cpus_and_cgroup(v2_text="0 100000")
    assert env.available_cores() == 1


def test_cgroup_v2_without_a_quota_is_not_overridden_by_v1_files(four_cpus_and_cgroup):
    """cpu.max saying "max" means no quota: the v1 files are not consulted then."""
    four_cpus_and_cgroup(v2_text="max 100000", quota="50000")
    assert env._cgroup_cpu_quota() is None
    assert env.available_cores() == 4


@pytest.mark.parametrize(("quota", "period"), [("50000", "0"), ("0", "100000")])
def test_a_v1_quota_or_period_of_zero_is_no_quota(four_cpus_and_cgroup, quota, period):
    """cfs_quota_us/cfs_period_us must both be positive to be a quota (a period of 0 does not divide by zero)."""
    four_cpus_and_cgroup(quota=quota, period=period)
    assert env._cgroup_cpu_quota() is None
    assert env.available_cores() == 4


def _fake_open(text):
    def fake(path, *args, **kwargs):
        if path != "/proc/cpuinfo":
            return open(path, *args, **kwargs)
        if text is None:
            raise FileNotFoundError(path)
        return io.StringIO(text)

    return fake


def test_cpu_model_reads_the_model_name_line_and_falls_back_to_platform(monkeypatch):
    """/proc/cpuinfo's "model name" is the CPU, not its "model" number; without the file, platform's name."""
    cpuinfo = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel\t\t: 85\nmodel name\t: Fancy CPU @ 2.0GHz\n"
    monkeypatch.setattr(env, "open", _fake_open(cpuinfo), raising=False)
    assert env.cpu_model() == "Fancy CPU @ 2.0GHz"
    monkeypatch.setattr(env, "open", _fake_open(None), raising=False)
    assert env.cpu_model() == (platform.processor() or platform.machine())


def test_environment_records_a_utc_date_and_missing_packages_as_none(monkeypatch):
    """The date is ISO 8601 to the second in UTC; a package that is not installed is None (the CLI prints
    'not installed'); the thread counts and CUDA are recorded."""
    monkeypatch.setattr(env, "_PACKAGES", ("torch", "no-such-package-theorylab"))
    e = env.environment()
    assert e["versions"]["no-such-package-theorylab"] is None and isinstance(e["versions"]["torch"], str)
    date = datetime.datetime.fromisoformat(e["date"])
    assert date.utcoffset() == datetime.timedelta(0) and date.microsecond == 0 and "." not in e["date"]
    assert e["torch_threads"] == torch.get_num_threads()
    assert e["torch_interop_threads"] == torch.get_num_interop_threads()
    assert e["cuda_available"] == torch.cuda.is_available()


def test_theorylab_env_prints_not_installed_for_a_missing_package(monkeypatch, capsys):
    """`theorylab env` names a missing package 'not installed'; --json prints the same mapping with null."""
    monkeypatch.setattr(env, "_PACKAGES", ("no-such-package-theorylab",))
    assert main(["env"]) == 0
    assert re.search(r"no-such-package-theorylab: not installed$", capsys.readouterr().out, re.M)
    assert main(["env", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["versions"] == {"no-such-package-theorylab": None}


# ------------------------------------------------------------------------------------------- claims/catalogue
def test_every_claim_belongs_to_the_question_its_id_names():
    """Claim "3.5" is in Q3, "4.3a" in Q4 …: the question of each claim is Q + the first digit of its ID, every
    question has a title, and the IDs are the 16 of the problem set, in order, each found by BY_ID."""
    assert CLAIM_IDS == ("1.1", "1.2", "1.3", "2.1", "2.2", "2.3", "3.1", "3.2", "3.3", "3.4", "3.5", "4.1", "4.2",
                         "4.3a", "4.3b", "4.4")
    assert all(c.question == f"Q{c.id[0]}" for c in CATALOGUE)
    assert set(QUESTIONS) == {c.question for c in CATALOGUE} == {"Q1", "Q2", "Q3", "Q4"}
    assert all(BY_ID[i] is c for i, c in zip(CLAIM_IDS, CATALOGUE, strict=True))


def test_the_report_heads_each_question_with_its_title():
    """The report groups claims under "Qn — title" headings (a question missing from QUESTIONS would fall under
    "Other claims")."""
    record = {"id": "3.3", "title": "t", "kind": "claim", "verdict": "confirmed", "statement": "", "method": "",
              "evidence": {}, "key": [], "figures": [], "seconds": 1.0}
    page = render_report({"claims": [record], "environment": {}})
    assert "<h2>Q3 — Attention and its cost</h2>" in page and "Other claims" not in page


def test_claim_info_is_immutable():
    """ClaimInfo is a frozen dataclass: the shared catalogue cannot be edited by a caller."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        CATALOGUE[0].title = "changed"  # type: ignore[misc]
