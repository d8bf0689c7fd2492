"""Tests written for mutants of the char-LM training loop (trainer, charlm, distributed, progress) and of the
benchmarks (``theorylab bench optim|rnn|attention`` and its CLI) that the rest of the suite let through: each pins
down one behaviour that a plausible one-line change broke silently."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import statistics

import pytest
import torch

from theorylab.bench import attention as bench_attention
from theorylab.bench import optim as bench_optim
from theorylab.bench import rnn as bench_rnn
from theorylab.cli import bench as cli_bench
from theorylab.cli import main
from theorylab.experiments import distributed, progress, trainer
from theorylab.experiments.charlm import _MAX_LR, SIZE_LIMITS, CharLMConfig, CharTransformer
from theorylab.experiments.checkpoint import CheckpointError
from theorylab.experiments.data import CharCorpus, CharVocab, load_corpus
from theorylab.experiments.distributed import DistEnv, init_distributed, job_rank_world, shard_items
from theorylab.experiments.trainer import (
    evaluate_bpc,
    read_resume_checkpoint,
    train_charlm,
    unigram_bpc,
    validate_run,
)


def tiny(**kw) -> CharLMConfig:
    base = dict(seq_len=16, layers=1, width=16, heads=2, num_features=8, batch_size=4, warmup=2)
    return CharLMConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step run of the tiny model: (out folder, its TrainResult)."""
    out = tmp_path_factory.mktemp("trained")
    return out, train_charlm(tiny(), 2, out_dir=out, eval_chars=300)


def tampered(trained, tmp_path, change) -> dict:
    """read_resume_checkpoint of a copy of the trained run's checkpoint after ``change(ckpt)``."""
    ckpt = torch.load(trained[0] / "checkpoint.pt", weights_only=True)
    change(ckpt)
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    return read_resume_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------------------------ trainer
def test_max_chars_below_two_is_refused_by_name():
    """evaluate_bpc names max_chars when it is below 2 (not only the generic 'need at least 2 characters')."""
    model = CharTransformer(len(load_corpus().vocab), tiny(seq_len=8))
    with pytest.raises(ValueError, match="max_chars must be >= 2, got 1"):
        evaluate_bpc(model, load_corpus().heldout, 8, max_chars=1)


def test_unigram_bpc_is_add_one_smoothed_training_frequencies_scored_on_held_out_text():
    """The unigram baseline: counts of the training text plus one, scored (bits) on the held-out characters."""
    corpus = CharCorpus(CharVocab("abc"), train=torch.tensor([0, 0, 0, 1]), heldout=torch.tensor([1, 2]),
                        sha256="x", python="3")
    # counts + 1 = (4, 2, 1) of 7
    assert unigram_bpc(corpus) == pytest.approx(-(math.log2(2 / 7) + math.log2(1 / 7)) / 2, rel=1e-12)


def test_a_checkpoint_without_its_corpus_hash_is_refused_by_name(trained, tmp_path):
    """A checkpoint lacking data_sha256 is a CheckpointError naming it, not a KeyError."""
    with pytest.raises(CheckpointError, match="lacks data_sha256"):
        tampered(trained, tmp_path, lambda c: c.pop("data_sha256"))


def test_a_checkpoint_with_target_steps_zero_is_refused(trained, tmp_path):
    """target_steps is a step count >= 1: 0 marks a tampered checkpoint."""
    with pytest.raises(CheckpointError, match="target_steps=0"):
        tampered(trained, tmp_path, lambda c: c.update(target_steps=0))
    assert tampered(trained, tmp_path, lambda c: c.update(target_steps=1))["target_steps"] == 1


def test_a_checkpoint_step_of_true_is_refused(trained, tmp_path):
    """step must be a plain int: True (an int subclass) marks a tampered checkpoint."""
    with pytest.raises(CheckpointError, match="invalid step True"):
        tampered(trained, tmp_path, lambda c: c.update(step=True))


def test_adam_moments_of_the_transposed_shape_are_refused(trained, tmp_path):
    """exp_avg of a (64, 16) weight saved as (16, 64): the same size, the wrong shape; refused before training."""
    def transpose(ckpt):
        state = next(s for s in ckpt["optimizer"]["state"].values()
                     if s["exp_avg"].dim() == 2 and s["exp_avg"].shape[0] != s["exp_avg"].shape[1])
        state["exp_avg"] = state["exp_avg"].T.contiguous()

    ckpt = tampered(trained, tmp_path, transpose)
    with pytest.raises(CheckpointError, match="does not fit this model.*exp_avg"):
        train_charlm(tiny(), 3, resume_from=ckpt, eval_chars=300)


def test_a_window_as_long_as_the_shorter_split_is_refused():
    """validate_run refuses a seq_len equal to the shorter split's length (not only a longer one)."""
    corpus = load_corpus()
    n = min(corpus.train.numel(), corpus.heldout.numel())
    with pytest.raises(ValueError, match="too long"):
        validate_run(tiny(seq_len=n))
    validate_run(tiny(seq_len=n - 1))


def test_zero_steps_is_a_value_error():
    """train_charlm needs at least one step: steps=0 is refused before anything is built."""
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        train_charlm(tiny(), 0)


@pytest.mark.parametrize("kw", [dict(eval_every=-1), dict(checkpoint_every=-1)])
def test_negative_intervals_are_value_errors(kw):
    """checkpoint_every and eval_every are refused below 0, each on its own."""
    with pytest.raises(ValueError, match="must be >= 0"):
        train_charlm(tiny(), 1, **kw)


def test_adam_runs_with_betas_0_9_and_0_99(trained):
    """The optimizer is Adam with betas (0.9, 0.99): the checkpoint's parameter group records them."""
    ckpt = torch.load(trained[0] / "checkpoint.pt", weights_only=True)
    assert tuple(ckpt["optimizer"]["param_groups"][0]["betas"]) == (0.9, 0.99)


def test_a_resumed_run_counts_tokens_and_seconds_from_the_checkpoint_on(trained):
    """Resuming at step 2 of 3 carries over tokens_seen and train_seconds: the metrics cover all 3 steps."""
    out, first = trained
    ckpt = read_resume_checkpoint(out)
    result = train_charlm(tiny(), 3, resume_from=ckpt, eval_chars=300)
    assert result.metrics["tokens_seen"] == 3 * 4 * 16 == first.metrics["tokens_seen"] + 4 * 16
    assert result.metrics["train_seconds"] > ckpt["train_seconds"] > 0
    assert result.metrics["resumed_from_step"] == 2


def test_a_fresh_run_reports_its_metrics_faithfully(trained):
    """A fresh run: resumed_from_step is None, tokens_seen = steps x batch x seq_len, final_train_bpc is the last
    step's loss."""
    m = trained[1].metrics
    assert m["resumed_from_step"] is None
    assert m["tokens_seen"] == 2 * 4 * 16
    assert len(m["train_bpc"]) == 2 and m["train_bpc"][0] != m["train_bpc"][1]
    assert m["final_train_bpc"] == m["train_bpc"][-1]
    assert m["eval_chars"] == 300


def test_the_gradient_clip_of_the_config_is_the_one_applied():
    """grad_clip is used: a step whose gradient is clipped to norm 1e-9 (below Adam's eps) is not the step of an
    unclipped-size gradient (Adam's first step is otherwise scale-free)."""
    a, b = (train_charlm(tiny(grad_clip=clip), 1, eval_chars=2).model for clip in (1e-9, 1.0))
    assert not torch.equal(a.head.weight, b.head.weight)


def test_eval_chars_beyond_the_held_out_text_is_reported_as_its_length():
    """metrics.eval_chars is the number of characters evaluated: at most the held-out text's length."""
    m = train_charlm(tiny(), 1, eval_chars=10**9).metrics
    assert m["eval_chars"] == load_corpus().heldout.numel()




def test_one_non_finite_parameter_is_enough_to_refuse_a_checkpoint(tmp_path, monkeypatch):
    """Only one parameter turned NaN (the others finite): the checkpoint of that step is still refused."""
    def poison_one(params, max_norm):
        next(iter(params)).grad.fill_(float("inf"))  # Adam: inf / inf = NaN in that parameter only

    monkeypatch.setattr(trainer.torch.nn.utils, "clip_grad_norm_", poison_one)
    with pytest.raises(FloatingPointError, match="weights became non-finite at step 1"):
        train_charlm(tiny(), 3, out_dir=tmp_path, checkpoint_every=1, eval_chars=50)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_the_seed_sets_the_initial_model():
    """The untrained model (the step-0 eval) depends on config.seed, not only the batches do."""
    bpc0 = [train_charlm(tiny(seed=seed), 1, eval_every=1, eval_chars=50).evals[0] for seed in (0, 1)]
    assert bpc0[0]["step"] == bpc0[1]["step"] == 0
    assert bpc0[0]["heldout_bpc"] != bpc0[1]["heldout_bpc"]


def test_a_rank_other_than_0_reports_no_progress_and_writes_nothing(tmp_path):
    """Rank 2 of 4 (the first process of a second machine, local rank 0): no on_step calls, no files; only global
    rank 0 is the main process. (No process group is needed: all_reduce_sum and barrier are no-ops without one.)"""
    env = DistEnv(rank=2, world_size=4, local_rank=0, local_world_size=2)
    assert not env.is_main
    calls = []
    train_charlm(tiny(), 2, out_dir=tmp_path, env=env, eval_chars=50, on_step=calls.append)
    assert calls == [] and list(tmp_path.iterdir()) == []

# ------------------------------------------------------------------------------------------------------- charlm
LIMITS = {"seq_len": 2**24, "layers": 4096, "width": 2**16, "heads": 2**12, "num_features": 2**16, "batch_size": 2**20}


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_each_size_limit_is_inclusive(name):
    """A size equal to its (documented) limit is accepted; one more is refused."""
    limit = LIMITS[name]
    assert SIZE_LIMITS[name] == limit
    base = dict(width=4096) if name == "heads" else dict(heads=4) if name == "width" else {}
    assert getattr(CharLMConfig(**base, **{name: limit}), name) == limit
    with pytest.raises(ValueError, match=f"must be at most {limit}"):
        CharLMConfig(**base, **{name: limit + 1})


@pytest.mark.parametrize("bad", [dict(layers=True), dict(grad_clip=0.0), dict(seed=1.0)])
def test_config_refuses_a_bool_size_and_a_zero_grad_clip(bad):
    """True is not a layer count (bool is an int subclass) nor 1.0 a seed; grad_clip must be > 0, not >= 0."""
    with pytest.raises(ValueError):
        CharLMConfig(**bad)


def test_the_largest_learning_rate_is_accepted():
    """lr may equal its bound (float32's largest over 10)."""
    assert CharLMConfig(lr=_MAX_LR).lr == _MAX_LR


def test_from_dict_ignores_keys_it_does_not_know():
    """A config dict with an extra key (e.g. written by a later version) still reads."""
    c = tiny()
    assert CharLMConfig.from_dict({**c.to_dict(), "dropout": 0.1}) == c


def test_model_layout_mlp_width_head_without_bias_and_small_position_embeddings():
    """Pre-LN blocks with an MLP of width 4W, a bias-free output head, GPT-2 init (N(0, 0.02) positions; the
    second MLP layer at 0.02/sqrt(2L))."""
    torch.manual_seed(0)
    model = CharTransformer(50, tiny(width=64, heads=4, layers=8, seq_len=256))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["blocks.0.mlp.0.weight"] == (256, 64) and shapes["blocks.0.mlp.2.weight"] == (64, 256)
    assert "head.bias" not in shapes
    assert float(model.position_embedding.weight.detach().std()) == pytest.approx(0.02, rel=0.05)
    assert float(model.blocks[0].mlp[2].weight.detach().std()) == pytest.approx(0.02 / 4, rel=0.05)



# -------------------------------------------------------------------------------------------------- distributed
def _launcher(monkeypatch, gpus: int, **variables: int) -> list[int]:
    """This process under a launcher that set ``variables`` (the others unset) on a machine with ``gpus`` GPUs
    (simulated: no process group is joined); returns the thread counts set."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    threads: list[int] = []
    monkeypatch.setattr(distributed.torch, "set_num_threads", threads.append)
    return threads


def test_auto_without_cuda_is_the_cpu(monkeypatch):
    """--device auto on a machine without CUDA is the CPU (single process)."""
    _launcher(monkeypatch, gpus=0)
    assert init_distributed("auto").device == torch.device("cpu")


def test_rank_without_world_size_is_not_torchrun(monkeypatch):
    """RANK alone (another tool's variable) does not make a torchrun job: a single process, no KeyError."""
    _launcher(monkeypatch, gpus=0, RANK=3)
    assert init_distributed("cpu") == DistEnv()
    assert job_rank_world() == (0, 1)  # it had been rank 3: a silent non-main rank without the folder's lock


def test_missing_local_variables_default_to_a_single_local_process(monkeypatch):
    """Without LOCAL_RANK / LOCAL_WORLD_SIZE: local rank 0 of 1 (not the global rank); env_rank is the global one."""
    _launcher(monkeypatch, gpus=0, RANK=1, WORLD_SIZE=2)
    env = init_distributed("cpu")
    assert (env.rank, env.local_rank, env.local_world_size, env.backend) == (1, 0, 1, "gloo")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert job_rank_world() == (1, 2)


@pytest.mark.parametrize(("rank", "world"), [("abc", "2"), ("0", "0"), ("2", "2"), ("-1", "2"), ("0", "x")])
def test_an_invalid_torchrun_environment_is_named(monkeypatch, rank, world):
    """RANK=abc and WORLD_SIZE=0 had raised ValueError and ZeroDivisionError tracebacks from the CLI."""
    _launcher(monkeypatch, gpus=0, RANK=rank, WORLD_SIZE=world)
    with pytest.raises(ValueError, match=f"RANK={rank!r}, WORLD_SIZE={world!r}"):
        job_rank_world()


def test_shard_items_refuses_a_negative_rank():
    """rank -1 is not a rank (items[-1::w] would be a wrong shard)."""
    with pytest.raises(ValueError, match="rank -1"):
        shard_items(list(range(6)), -1, 2)


# ----------------------------------------------------------------------------------------------------- progress
@pytest.mark.parametrize(("value", "tty", "expected"), [("no", True, True), ("False", True, True), (" 0 ", True, True),
                                                        ("yes", True, False), ("", False, False)])
def test_progress_ci_values_that_mean_off_are_case_and_space_insensitive(monkeypatch, value, tty, expected):
    """CI=no, CI=False and CI=' 0 ' mean 'not CI' (a bar is drawn on a terminal); any other value means CI; and
    without a terminal on stderr there is no bar even outside CI."""
    monkeypatch.setenv("CI", value)
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: tty, raising=False)
    assert progress.show_progress() is expected



# -------------------------------------------------------------------------------------------------- bench optim
def _fake_rounds(times_of):
    """An interleaved_times that calls each function once and returns ``times_of(name, rounds)`` as its times."""
    calls = []

    def fake(fns, *, rounds, warmup=1, **kw):
        calls.append({"rounds": rounds, "warmup": warmup, **kw})
        for fn in fns.values():
            fn()
        return {name: times_of(name, rounds) for name in fns}

    return fake, calls


def test_optim_rows_report_medians_iqr_ratios_and_mib(monkeypatch):
    """Each row: the median and IQR of its times (ms), its median over each torch baseline's, the state and work
    buffers in MiB; torch's thread count is restored afterwards."""
    base = {"torch AdamW foreach": 2.0, "torch AdamW fused": 4.0}
    fake, calls = _fake_rounds(lambda name, r: [base.get(name, 1.0) * t for t in (1, 2, 3, 4, 100)])
    monkeypatch.setattr(bench_optim, "interleaved_times", fake)
    before = torch.get_num_threads()
    res = bench_optim._measure([(8, 8), (8,)], threads=before + 1, rounds=5, compile_chain=False)
    assert torch.get_num_threads() == before and calls[0]["rounds"] == 5
    rows = {r["optimizer"]: r for r in res["rows"]}
    ours = rows["theorylab AdamW"]
    assert ours["median_ms"] == 3e3
    q = statistics.quantiles([1, 2, 3, 4, 100], n=4)
    assert ours["iqr_ms"] == pytest.approx((q[2] - q[0]) * 1e3)
    assert (ours["vs_torch_foreach"], ours["vs_torch_fused"]) == (0.5, 0.25)
    ref = torch.optim.AdamW(bench_optim._param_set([(8, 8), (8,)]), **bench_optim.HYPER, foreach=True)
    ref.step()
    assert rows["torch AdamW foreach"]["state_mib"] * 2**20 == bench_optim._state_bytes(ref) > 0
    assert rows["theorylab AdamW"]["work_buffers_mib"] > 0


def test_optim_run_measures_the_right_sizes_threads_and_rounds(monkeypatch):
    """--quick: one thread, 15 rounds, no compile; full: 1 and all threads, 25 rounds, the compiled chain at one
    thread only; the parameter count and the hyperparameters (betas as a list) are reported."""
    seen = []

    def measure(shapes, threads, rounds, compile_chain):
        seen.append((threads, rounds, compile_chain))
        return {"threads": threads, "rounds": rounds, "rows": []}

    monkeypatch.setattr(bench_optim, "_measure", measure)
    monkeypatch.setattr(bench_optim.torch, "get_num_threads", lambda: 4)
    quick = bench_optim.run(quick=True)
    assert seen == [(1, 15, False)] and quick["parameters"] == 725_504 and quick["tensors"] == 28
    seen.clear()
    full = bench_optim.run(quick=False)
    assert seen == [(1, 25, True), (4, 25, False)] and full["parameters"] == 9_979_904
    assert full["hyperparameters"]["betas"] == [0.9, 0.999] and full["hyperparameters"]["lr"] == 1e-3


def test_optim_targets_are_met_at_their_bounds_exactly():
    """A ratio equal to its bound (1.1x foreach, 1.3x fused) meets the target; a little more does not; the table
    says NOT met."""
    names = [name for name, *_ in bench_optim.TARGETS]

    def judged(foreach, fused):
        res = {"threads": 1, "rows": [{"optimizer": n, "vs_torch_foreach": foreach, "vs_torch_fused": fused}
                                      for n in names]}
        return bench_optim.targets({"quick": False, "results": [res]})

    assert [t["met"] for t in judged(1.1, 1.3)] == [True] * len(names)
    assert [t["met"] for t in judged(1.15, 1.31)] == [False] * len(names)
    result = {"parameters": 1, "tensors": 1, "torch": "x", "results": [], "targets": judged(1.15, 1.31)}
    assert "NOT met" in bench_optim.format_table(result)


# ---------------------------------------------------------------------------------------------------- bench rnn
def test_rnn_timed_rounds_take_the_median_and_warm_up_only_when_repeating(monkeypatch):
    """_timed: the median of its rounds; one warm-up round before several rounds, none before a single one."""
    fake, calls = _fake_rounds(lambda name, r: [1.0, 2.0, 30.0][:r])
    monkeypatch.setattr(bench_rnn, "interleaved_times", fake)
    t, out = bench_rnn._timed({"a": lambda: 7}, 3)
    assert t == {"a": 2.0} and out == {"a": 7} and calls[-1]["warmup"] == 1
    bench_rnn._timed({"a": lambda: 7}, 1)
    assert calls[-1]["warmup"] == 0


def test_rnn_full_run_reports_what_it_measured(monkeypatch):
    """The full grid with stand-ins for the computations: one repeat only at H=256, T=10,000; the SVD reference up
    to T=1000 included; seconds include the trajectory; speed-ups are baseline / ours; extensions per step;
    log_norm_T is the last step's; lambda_1 the largest exponent; the autograd baseline gets B=2."""
    times = {"ours": 2.0, "trajectory": 1.0, "reference": 12.0, "autograd": 8.0}
    fake, _ = _fake_rounds(lambda name, r: [times[name]] * r)
    monkeypatch.setattr(bench_rnn, "interleaved_times", fake)
    batches = []

    def norms(factors, stats):
        stats.update(extensions=50, cholesky=0, fallbacks=0, rescaled=0)
        return torch.arange(5.0)[None]

    def jac_norms(rnn, x, h0):
        batches.append(x.shape[0])
        return torch.zeros(x.shape[0], 3)

    monkeypatch.setattr(bench_rnn, "jacobian_factors", lambda rnn, x, h0: None)
    monkeypatch.setattr(bench_rnn, "log_norms_of_products", norms)
    monkeypatch.setattr(bench_rnn, "log_norms_of_products_reference", lambda factors: torch.arange(5.0)[None])
    monkeypatch.setattr(bench_rnn, "lyapunov_spectrum", lambda rnn, x, h0, k: torch.linspace(1.0, 0.0, k)[None])
    monkeypatch.setattr(bench_rnn, "log_jacobian_norms", jac_norms)
    monkeypatch.setattr(bench_rnn, "_autograd_log_norms", lambda rnn, x: torch.zeros(x.shape[0], 3))
    result = bench_rnn.run(quick=False)
    rows = result["log_jacobian_norms"]
    assert [(r["H"], r["T"]) for r in rows if r["repeats"] == 1] == [(256, 10000)]
    assert [r["T"] for r in rows if "svd_per_step_seconds" in r] == [1000] * 5
    first = rows[0]
    assert first["seconds"] == 3.0 and first["speedup_vs_svd_per_step"] == 4.0
    assert first["extensions_per_step"] == 50 / first["T"] and first["log_norm_T"] == 4.0
    assert all(r["lambda_1"] == 1.0 for r in result["lyapunov_spectrum"])
    assert all(r["speedup_vs_autograd"] == 4.0 for r in result["vs_autograd"]) and set(batches) == {2}


def test_rnn_target_is_the_row_at_both_h_and_t_and_is_strict():
    """The target row is the one at H=256 AND T=10,000; 30.0 s exactly does not meet '< 30 s'; the table says
    NOT met and prints — for NaN."""
    rows = [{"H": 256, "T": 1000, "seconds": 1.0}, {"H": 256, "T": 10000, "seconds": 30.0}]
    (target,) = bench_rnn.targets({"log_jacobian_norms": rows})
    assert target["measured"] == 30.0 and target["must_met"] is False
    result = {"log_jacobian_norms": [], "lyapunov_spectrum": [], "vs_autograd": [], "targets": [target]}
    assert "NOT met" in bench_rnn.format_table(result)
    assert bench_rnn._fmt(math.nan) == "—"



# ---------------------------------------------------------------------------------------------- bench attention
def test_matmul_rate_counts_two_flops_per_multiply_add(monkeypatch):
    """matmul_gflops: 2 n^3 FLOPs over the best time (every call here takes 0.5 s)."""
    clock = itertools.count(0.0, 0.5)
    monkeypatch.setattr(bench_attention.time, "perf_counter", lambda: next(clock))
    assert bench_attention.matmul_gflops(size=8, repeats=2) == 2 * 8**3 / 0.5 / 1e9


def test_sdpa_flops_are_nominal_and_halved_when_causal():
    """SDPA's FLOPs: 4 B H n^2 d, half of it when causal."""
    full = 4 * bench_attention.B * bench_attention.H * 128 * 128 * bench_attention.D
    assert bench_attention._flops("torch SDPA (exact)", 128, False) == full
    assert bench_attention._flops("torch SDPA (exact)", 128, True) == full / 2


def test_attention_measure_reports_the_median_of_the_rounds(monkeypatch):
    """_measure's seconds are the median of the timed calls, not the fastest."""
    fake, _ = _fake_rounds(lambda name, r: [1.0, 2.0, 30.0])
    monkeypatch.setattr(bench_attention, "interleaved_times", fake)
    assert bench_attention._measure({"a": lambda: None}, budget_s=0.0)["a"][:2] == (2.0, 3)


def test_attention_inputs_scale_q_and_k_but_not_v():
    """qk_std scales q and k (so |q|^2/sqrt(d) is about 1); v keeps unit variance."""
    q1, k1, v1 = bench_attention._inputs(8)
    q, k, v = bench_attention._inputs(8, qk_std=0.5)
    assert torch.equal(q, 0.5 * q1) and torch.equal(k, 0.5 * k1) and torch.equal(v, v1)


def test_attention_accuracy_is_relative_to_the_exact_output(monkeypatch):
    """Relative error = mean |approx - exact| / mean |exact|, for every contender but SDPA itself."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(bench_attention, "contenders", lambda causal: {
        "torch SDPA (exact)": lambda q, k, v: sdpa(q, k, v, is_causal=causal),
        "double": lambda q, k, v: 2 * sdpa(q, k, v, is_causal=causal)})
    errs = bench_attention._accuracy(True, n=16)
    assert set(errs) == {"double"} and errs["double"] == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("quick", [True, False])
def test_attention_run_rows_peak_efficiency_and_forward_backward_contenders(monkeypatch, quick):
    """Rows: peak in MiB, efficiency = GFLOP / s / the higher of the two matmul rates; forward+backward at n=1024
    (--quick, without performer-pytorch) or 8192 (full, with it), ours also with recompute."""
    rates = iter([100.0, 200.0])
    monkeypatch.setattr(bench_attention, "matmul_gflops", lambda: next(rates))
    monkeypatch.setattr(bench_attention, "_performer", lambda causal, device="cpu": lambda q, k, v: v)
    monkeypatch.setattr(bench_attention, "_measure", lambda calls, budget: {n: (0.5, 3, 2**21) for n in calls})
    monkeypatch.setattr(bench_attention, "_flops", lambda name, n, causal: 1e9)
    monkeypatch.setattr(bench_attention, "_accuracy", lambda causal: {})
    monkeypatch.setattr(bench_attention, "PeakMemory", contextlib.nullcontext)  # its first use imports dynamo
    result = bench_attention._run([64], quick, 1.0, lambda label: None)
    fwd = [r for r in result["rows"] if r["pass"] == "forward"]
    assert len(fwd) == 6 and all(r["peak_mib"] == 2.0 and r["efficiency"] == 1.0 / 0.5 / 200.0 for r in fwd)
    assert result["matmul_gflops"] == 200.0
    fb = [r for r in result["rows"] if r["pass"] == "forward+backward"]
    assert {r["n"] for r in fb} == {1024 if quick else 8192}
    names = {"theorylab FAVOR+", "torch SDPA (exact)", bench_attention.RECOMPUTE}
    assert {r["impl"] for r in fb} == (names if quick else names | {"performer-pytorch"})


def _attention_result(rows):
    result = {"setting": {"B": 1, "H": 8, "d": 64, "m": 256, "dtype": "float32"}, "torch": "x", "threads": 1,
              "performer_pytorch": None, "matmul_gflops": 1.0, "quick": False,
              "rows": [{"impl": i, "causal": c, "n": n, "pass": p, "seconds": s, "calls": 3, "peak_mib": m,
                        "gflop": None, "efficiency": None} for i, c, n, p, s, m in rows],
              "relative_error_vs_exact_n1024": {}}
    return {**result, "targets": bench_attention.targets(result)}


def test_attention_targets_at_their_bounds_and_forward_backward_rows_apart():
    """Memory ratio 2.0 meets '<= 2x'; a causal speed-up of 2.2 misses '>= 2.5x'; a forward+backward speed-up of
    exactly 1.0 misses '> 1x' and reads 'goal not met' (it has no must); forward rows at the forward+backward n
    are not mistaken for forward+backward ones."""
    ours, sdpa, fwd, fb = "theorylab FAVOR+", "torch SDPA (exact)", "forward", "forward+backward"
    result = _attention_result([(ours, True, 16384, fwd, 1.0, 2.0), (sdpa, True, 16384, fwd, 2.2, 1.0),
                                (ours, True, 8192, fwd, 1.0, 1.0), (sdpa, True, 8192, fwd, 5.0, 1.0),
                                (ours, True, 8192, fb, 1.0, 1.0), (sdpa, True, 8192, fb, 1.0, 1.0)])
    t = {x["target"].split(" (")[0]: x for x in result["targets"]}
    mem = t["causal extra memory / SDPA causal's"]
    assert mem["measured"] == 2.0 and mem["must_met"] is True and mem["goal_met"] is False
    causal = t["causal speed-up vs SDPA causal"]
    assert causal["measured"] == pytest.approx(2.2) and causal["must_met"] is False
    fbt = t["causal forward+backward speed-up vs SDPA causal"]
    assert fbt["measured"] == 1.0 and fbt["goal_met"] is False
    line = next(x for x in bench_attention.format_table(result).splitlines() if "forward+backward speed-up" in x)
    assert line.endswith("goal not met")


def test_attention_memory_ratio_against_a_zero_peak_is_not_measured():
    """SDPA causal with a zero extra peak: no ratio (not a ZeroDivisionError)."""
    ours, sdpa = "theorylab FAVOR+", "torch SDPA (exact)"
    result = _attention_result([(ours, True, 64, "forward", 1.0, 2.0), (sdpa, True, 64, "forward", 1.0, 0.0),
                                (ours, True, 32, "forward+backward", 1.0, 1.0)])
    mem = next(x for x in result["targets"] if x["target"].startswith("causal extra memory"))
    assert mem["measured"] is None and mem["must_met"] is None


# ---------------------------------------------------------------------------------------------------- cli bench
def test_bench_json_of_blank_name_is_refused_before_the_bench(monkeypatch, capsys):
    """--json ' ' (blank) is refused like --json '', before any benchmarking."""
    monkeypatch.setattr(bench_rnn, "run", lambda quick: pytest.fail("the bench ran"))
    assert main(["bench", "rnn", "--json", " "]) == 2
    assert "needs a file name" in capsys.readouterr().err


def test_bench_json_name_of_exactly_the_filesystem_limit_is_accepted(tmp_path, monkeypatch):
    """A --json file name of exactly NAME_MAX bytes can be written; one byte more cannot, also where pathlib's
    is_dir() answers False for a too-long name (Python >= 3.12) instead of raising (3.11)."""
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    assert cli_bench._check_json_target(str(tmp_path / ("x" * limit))) is None
    assert cli_bench._check_json_target(str(tmp_path / ("x" * (limit + 1)))) is not None
    is_dir = cli_bench.Path.is_dir
    monkeypatch.setattr(cli_bench.Path, "is_dir", lambda self: len(self.name) <= limit and is_dir(self))
    err = cli_bench._check_json_target(str(tmp_path / ("x" * (limit + 1))))
    assert err is not None and "longer than the filesystem allows" in err


def test_a_missing_dependency_of_a_suite_is_not_reported_as_an_unimplemented_suite(monkeypatch):
    """Only the suite's own module missing means 'not implemented yet'; a module it imports that is missing
    propagates (the real cause)."""
    def missing(name):
        raise ModuleNotFoundError("No module named 'somedep'", name="somedep")

    monkeypatch.setattr(cli_bench.importlib, "import_module", missing)
    with pytest.raises(ModuleNotFoundError, match="somedep"):
        cli_bench.run(argparse.Namespace(suite="rnn", json=None, quick=True), [])


def test_bench_passes_quick_prints_the_table_and_writes_json_with_a_newline(tmp_path, monkeypatch, capsys):
    """--quick reaches the suite (and its absence too); the table is printed; the JSON file ends in a newline and
    its path is reported."""
    seen = []
    monkeypatch.setattr(bench_optim, "run", lambda quick: seen.append(quick) or {"suite": "optim"})
    monkeypatch.setattr(bench_optim, "format_table", lambda result: "THE TABLE")
    out = tmp_path / "o.json"
    assert main(["bench", "optim", "--quick", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "THE TABLE" in text and f"wrote {out}" in text
    assert out.read_text(encoding="utf-8").endswith("}\n") and json.loads(out.read_text(encoding="utf-8"))
    assert main(["bench", "optim"]) == 0 and seen == [True, False]
