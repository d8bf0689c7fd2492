import time
import warnings

import numpy as np
import pytest
import torch

from theorylab.cost import PeakMemory, count_flops, fit_power_law, interleaved_times, median_time, peak_memory


def test_count_flops_of_a_matmul():
    a, b = torch.randn(30, 20), torch.randn(20, 10)
    assert count_flops(lambda: a @ b) == 2 * 30 * 20 * 10
    assert count_flops(lambda: (a @ b).exp().sum()) == 2 * 30 * 20 * 10  # elementwise ops are not counted


def test_peak_memory_counts_live_tensor_bytes():
    x = torch.randn(100, 100)  # allocated before: not counted

    def two_temporaries():
        y = x @ x  # 40 kB
        z = y.exp()  # 40 kB, both alive
        del y
        w = z + 1  # 40 kB, y freed
        return w.sum()

    assert peak_memory(two_temporaries) == 2 * 100 * 100 * 4 + 4  # z, w and the 4-byte sum
    assert peak_memory(lambda: torch.empty(1000, dtype=torch.float64)) == 8000


def test_peak_memory_is_reproducible_and_views_count_once():
    x = torch.randn(64, 64)

    def fn():
        y = x * 2
        return y.view(-1)[:10], y.t()

    assert peak_memory(fn) == peak_memory(fn) == 64 * 64 * 4


def test_peak_memory_tracker_sees_frees():
    with PeakMemory() as m:
        for _ in range(5):
            t = torch.zeros(1000)
            del t
    assert m.peak == 4000 and m.current == 0


def test_fit_power_law_recovers_exponents():
    x = np.array([16, 32, 64, 128])
    fit = fit_power_law(x, 3.0 * x**1.5)
    assert fit.exponent == pytest.approx(1.5) and fit.coefficient == pytest.approx(3.0) and fit.r2 == pytest.approx(1)
    assert fit(256) == pytest.approx(3.0 * 256**1.5)
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([1, 2], [0, 1])


@pytest.mark.parametrize("x", [[1.0, 1.0 + 1e-15], [1e10, 1e10 + 1e-5], [1e300, float(np.nextafter(1e300, 2e300))]])
def test_fit_power_law_refuses_x_equal_up_to_rounding(x):
    """These had given an exponent of 6e14 with R² = 1, or a meaningless one with numpy's RankWarning."""
    with pytest.raises(ValueError, match="equal up to rounding"):
        fit_power_law(x, [1.0, 2.0])


def test_fit_power_law_refuses_x_beyond_the_float_range():
    with pytest.raises(ValueError, match="float range"):
        fit_power_law([10**400, 10**401], [1.0, 2.0])


def test_median_time_respects_budget():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.01)

    t = median_time(fn, repeats=50, warmup=1, budget_s=0.03)
    assert 0.005 < t < 0.5 and len(calls) < 10


def test_views_of_preexisting_tensors_are_not_allocations():
    x = torch.randn(1000, 100)  # 400 kB allocated before

    def slices():
        return [x[i:i + 10] * 1 for i in range(0, 1000, 100)]  # ten 4 kB results; the slices are views

    assert peak_memory(slices) == 10 * 10 * 100 * 4
    assert peak_memory(lambda: x.t().contiguous()) == 1000 * 100 * 4
    assert peak_memory(lambda: x.add_(0)) == 0


def test_sdpa_on_cpu_tensors_is_counted_like_on_meta():
    """torch's counter has no formula for SDPA's CPU flash kernel: softmax_attention on CPU tensors counted 0."""
    from theorylab.attention import softmax_attention

    q = k = v = torch.randn(1, 2, 64, 64)
    real = count_flops(softmax_attention, q, k, v)
    assert real == count_flops(softmax_attention, *(t.to("meta") for t in (q, k, v))) == 4 * 2 * 64 * 64 * 64
    qg = q.clone().requires_grad_(True)
    both = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(qg, k, v).sum().backward())
    assert both == real + 5 * real // 2  # torch's SDPA backward formula: 2.5x the forward


def test_a_reused_peak_memory_tracker_starts_from_zero():
    tracker = PeakMemory()
    with tracker:
        kept = torch.randn(1000)  # noqa: F841 - alive after the block
    with tracker:
        torch.randn(10)
    assert tracker.peak == 40


def test_power_law_fit_of_constant_data_has_r2_one_whatever_the_rounding():
    """R² of constant y was rounding noise: 1.0, 0.0 or -10.0 for y equal up to the last bit."""
    for y in ([5, 5, 5], [0.3, 0.3, 0.1 + 0.2], [5, 5 * (1 + 2**-52), 5]):
        assert fit_power_law([1, 2, 3], y).r2 == 1.0
    assert fit_power_law([1, 2, 3], [1, 4, 9]).r2 == pytest.approx(1.0)
    assert fit_power_law([1, 2, 3, 4], [1, 3, 2, 4]).r2 < 0.9


def test_matrix_vector_and_dot_products_are_counted():
    """torch's counter had no formula for mv, addmv, dot and vdot: ``A @ x`` counted 0 while nn.Linear on x counted."""
    a, x = torch.randn(300, 200), torch.randn(200)
    assert count_flops(lambda: a @ x) == count_flops(torch.nn.functional.linear, x, a) == 2 * 300 * 200
    assert count_flops(torch.addmv, torch.zeros(300), a, x) == 2 * 300 * 200
    assert count_flops(torch.dot, x, x) == count_flops(torch.vdot, x, x) == 2 * 200
    assert count_flops(lambda: a.to("meta") @ x.to("meta")) == 2 * 300 * 200


def test_in_place_and_batch_summed_matrix_products_are_counted():
    """addmv_, addmm_, baddbmm_ and addbmm counted 0 in torch's counter (their out= forms were counted)."""
    a, x, b = torch.randn(8, 16), torch.randn(16), torch.randn(16, 4)
    a3, b3 = torch.randn(2, 8, 16), torch.randn(2, 16, 4)
    assert count_flops(lambda: torch.zeros(8).addmv_(a, x)) == 2 * 8 * 16
    assert count_flops(lambda: torch.zeros(8, 4).addmm_(a, b)) == count_flops(torch.addmm, torch.zeros(8, 4), a, b)
    assert count_flops(lambda: torch.zeros(8, 4).addmm_(a, b)) == 2 * 8 * 16 * 4
    assert count_flops(lambda: torch.zeros(2, 8, 4).baddbmm_(a3, b3)) == 2 * 2 * 8 * 16 * 4
    assert count_flops(torch.addbmm, torch.zeros(8, 4), a3, b3) == 2 * 2 * 8 * 16 * 4
    assert count_flops(lambda: torch.zeros(8, 4).addbmm_(a3, b3)) == 2 * 2 * 8 * 16 * 4


def test_peak_memory_sees_torch_tensor_of_python_data_and_skips_sparse():
    """torch.tensor(list) reaches the dispatcher as lift_fresh, which returns its argument: it counted 0 bytes.
    A sparse result raised NotImplementedError (no storage) from inside the tracker."""
    assert peak_memory(lambda: torch.tensor([0.0] * 262144)) == 262144 * 4
    assert peak_memory(lambda: torch.randn(4, 4).to_sparse()) == 4 * 4 * 4  # the dense input; sparse not seen


@pytest.mark.parametrize(("x", "y"), [(3, 4), ([[1, 2], [3, 4]], [[1, 2], [3, 4]]), ([1, 2], [1, 2, 3])])
def test_power_law_fit_of_non_vectors_is_a_value_error(x, y):
    with pytest.raises(ValueError, match="1-D sequences of one length"):
        fit_power_law(x, y)


def test_views_of_a_sparse_arguments_parts_allocate_nothing():
    """Sparse arguments were left out of the existing storages: coo._values() counted 24,000 bytes."""
    coo = torch.randn(100, 30).to_sparse()
    csr = torch.randn(100, 30).to_sparse_csr()
    assert peak_memory(lambda: coo._values()) == peak_memory(lambda: coo._indices()) == 0
    assert peak_memory(lambda: csr.values()) == peak_memory(lambda: csr.col_indices()) == 0
    assert peak_memory(lambda: coo._values() * 2) == coo._values().numel() * 4


def test_cuda_read_backs_is_none_without_cuda_and_does_not_call(monkeypatch):
    from theorylab.cost import cuda_read_backs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls = []
    assert cuda_read_backs(lambda: calls.append(1)) is None
    assert calls == []


def test_cuda_read_backs_counts_only_the_synchronising_calls(monkeypatch):
    """On an H200 (torch 2.11) a kernel alone counted 1: the first use of the sync debug mode in a process warns
    that it "is a prototype feature and does not yet detect all synchronizing operations", and the count matched
    "synchroniz" anywhere. This replays that sequence of warnings without a GPU."""
    import warnings

    from theorylab.cost import cuda_read_backs

    mode = {"now": 0, "used": False}

    def set_mode(m):
        if m == "warn" and not mode["used"]:
            mode["used"] = True
            warnings.warn("Synchronization debug mode is a prototype feature and does not yet detect all "
                          "synchronizing operations", UserWarning, stacklevel=2)
        mode["now"] = m

    def read_back():
        if mode["now"] == "warn":
            warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=2)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", set_mode)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: mode["now"])
    assert cuda_read_backs(lambda: None) == 0  # the prototype notice, and no read-back
    assert cuda_read_backs(read_back) == 1
    assert cuda_read_backs(lambda: [read_back(), read_back(), warnings.warn("unrelated", stacklevel=1)]) == 2
    assert mode["now"] == 0
    # a nested count: the outer one sees its own two read-backs (the inner had reset the mode to "default")
    assert cuda_read_backs(lambda: [read_back(), cuda_read_backs(read_back), read_back()]) == 2
    mode["now"] = 2  # the caller's own "error" guard is kept
    cuda_read_backs(lambda: None)
    assert mode["now"] == 2


def test_peak_memory_does_not_count_memory_torch_did_not_allocate():
    """from_numpy and as_tensor share numpy's memory; torch.tensor(array) is one copy. They had counted 4, 4, 4 and 8
    MB: lift_fresh passes their storages through the dispatcher."""
    a = np.zeros(1_000_000, np.float32)
    x = torch.zeros(1_000_000)
    assert peak_memory(torch.from_numpy, a) == 0
    assert peak_memory(torch.as_tensor, a) == 0
    assert peak_memory(lambda: torch.from_numpy(x.numpy())) == 0
    assert peak_memory(torch.tensor, a) == 4_000_000
    assert peak_memory(torch.tensor, [0.0] * 1000) == 4000


def test_interleaved_budget_without_max_rounds_runs_more_rounds():
    # budget_s had been ignored unless max_rounds was given too: exactly `rounds` rounds ran
    times = interleaved_times({"a": lambda: time.sleep(0.005), "b": lambda: time.sleep(0.005)},
                              rounds=2, warmup=0, budget_s=0.1)
    assert len(times["a"]) == len(times["b"]) >= 5  # 0.1 s of 10 ms rounds
    capped = interleaved_times({"a": lambda: time.sleep(0.005)}, rounds=2, warmup=0, max_rounds=3, budget_s=10.0)
    assert len(capped["a"]) == 3


@pytest.mark.parametrize("budget", [float("nan"), -1.0, float("inf"), "1", True])
def test_bad_budgets_are_named(budget):
    with pytest.raises(ValueError, match="budget_s must be a finite number of seconds >= 0"):
        median_time(lambda: None, budget_s=budget)
    with pytest.raises(ValueError, match="budget_s must be a finite number of seconds >= 0"):
        interleaved_times({"a": lambda: None}, budget_s=budget)


def test_interleaved_times_wants_a_mapping():
    with pytest.raises(TypeError, match="fns must be a mapping of names to callables"):
        interleaved_times([lambda: None])  # type: ignore[arg-type]


def test_count_flops_warns_about_fused_kernels_it_cannot_count():
    # torch's inference fast path of nn.MultiheadAttention counted 0 FLOPs without a word (1,179,648 in training)
    mha = torch.nn.MultiheadAttention(64, 4, batch_first=True)
    x = torch.randn(2, 16, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert count_flops(mha, x, x, x) == 1_179_648  # training mode: counted, no warning
    mha.eval()
    with torch.no_grad(), pytest.warns(UserWarning, match=r"aten\._native_multi_head_attention ×1 \(torch's "
                                                         r"inference fast path of nn\.MultiheadAttention"):
        assert count_flops(mha, x, x, x) == 0
    with pytest.warns(UserWarning, match=r"aten\._trilinear ×1 \(nn\.Bilinear"):
        count_flops(torch.nn.Bilinear(6, 4, 3), torch.randn(5, 6), torch.randn(5, 4))


def _cond_matmul(x):
    return torch.cond(x.sum() > 0, lambda x: x @ x, lambda x: x @ x.T, (x,))


def _torch_counts_through_cond() -> bool:
    """Whether torch's own FlopCounterMode takes torch.cond (torch 2.4's asserts that the mode is not registered)."""
    if not hasattr(torch, "cond"):
        return False
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False):
            _cond_matmul(torch.randn(2, 2))
    except (AssertionError, NotImplementedError, RuntimeError):
        return False
    return True


@pytest.mark.skipif(not _torch_counts_through_cond(), reason="this torch's FlopCounterMode cannot run torch.cond")
def test_count_flops_counts_through_torch_cond():
    # a second dispatch mode that watched for the uncounted kernels had made torch.cond raise NotImplementedError
    assert count_flops(_cond_matmul, torch.randn(64, 64)) >= 2 * 64**3
