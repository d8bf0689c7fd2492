import torch

from theorylab.bench import attention as bench
from theorylab.cost import count_flops


def _row(impl, causal, n, seconds, peak=1.0, kind="forward"):
    return {"impl": impl, "causal": causal, "n": n, "pass": kind, "seconds": seconds, "calls": 3,
            "peak_mib": peak, "gflop": 1.0, "efficiency": 0.5}


def test_targets_and_table():
    ours, sdpa, perf = "theorylab FAVOR+", "torch SDPA (exact)", "performer-pytorch"
    rows = [_row(ours, False, 16384, 0.2), _row(sdpa, False, 16384, 4.0), _row(perf, False, 16384, 0.7),
            _row(ours, True, 16384, 0.4, peak=6.0), _row(sdpa, True, 16384, 2.0, peak=4.0),
            _row(perf, True, 16384, 22.0),
            _row(ours, True, 8192, 0.5, kind="forward+backward"), _row(sdpa, True, 8192, 2.0, kind="forward+backward")]
    result = {"setting": {"B": 1, "H": 8, "d": 64, "m": 256, "dtype": "float32"}, "torch": "x", "threads": 2,
              "performer_pytorch": "1.1.4", "matmul_gflops": 100.0, "quick": False, "rows": rows,
              "relative_error_vs_exact_n1024": {"causal": {ours: 0.1}}}
    targets = {t["target"].split(" (")[0]: t for t in bench.targets(result)}
    nc_perf = targets["non-causal speed-up vs performer-pytorch"]
    assert abs(nc_perf["measured"] - 3.5) < 1e-12 and nc_perf["must_met"] and not nc_perf["goal_met"]
    assert targets["non-causal speed-up vs SDPA"]["goal_met"]  # 20x
    assert abs(targets["causal speed-up vs performer-pytorch"]["measured"] - 55.0) < 1e-12
    assert targets["causal speed-up vs SDPA causal"]["goal_met"] is True  # 5x
    mem = targets["causal extra memory / SDPA causal's"]
    assert mem["measured"] == 1.5 and mem["must_met"] and not mem["goal_met"]
    assert targets["causal forward+backward speed-up vs SDPA causal"]["goal_met"]
    result["targets"] = bench.targets(result)
    table = bench.format_table(result)
    assert "must met, goal not" in table and "goal met" in table and "16384" in table
    # a --quick run measures at a small n: it reports the ratios but does not judge targets stated for n=16384
    quick_table = bench.format_table({**result, "quick": True})
    assert "not judged" in quick_table and "goal met" not in quick_table and "NOT met" not in quick_table


def test_performer_is_skipped_cleanly_when_absent(monkeypatch):
    monkeypatch.setattr(bench, "_performer", lambda causal, device="cpu": None)
    assert set(bench.contenders(True)) == {"theorylab FAVOR+", "torch SDPA (exact)"}


def test_flops_counted_on_meta_equal_a_real_run():
    q, k, v = (torch.randn(1, 8, 256, 64) for _ in range(3))
    for causal in (False, True):
        real = count_flops(bench.contenders(causal)["theorylab FAVOR+"], q, k, v)
        assert bench._flops("theorylab FAVOR+", 256, causal) == real > 0


def test_contenders_compute_attention():
    q, k, v = bench._inputs(256, qk_std=0.35)
    with torch.no_grad():
        for causal in (False, True):
            outs = {name: fn(q, k, v) for name, fn in bench.contenders(causal).items()}
            exact = outs["torch SDPA (exact)"]
            assert (outs["theorylab FAVOR+"] - exact).abs().mean() < 0.5 * exact.abs().mean()


def test_forward_backward_contenders_include_ours_recomputing_with_equal_gradients():
    fns = bench._fwd_bwd_contenders()
    assert bench.RECOMPUTE in fns and "theorylab FAVOR+" in fns
    grads = []
    for name in ("theorylab FAVOR+", bench.RECOMPUTE):
        q, k, v = bench._inputs(256, requires_grad=True)
        fns[name](q, k, v).square().mean().backward()
        grads.append(torch.cat([q.grad, k.grad, v.grad]))
    assert torch.equal(*grads)
