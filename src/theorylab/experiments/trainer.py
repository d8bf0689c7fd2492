"""The training loop of ``theorylab train charlm``: single process or DistributedDataParallel under torchrun.

Each step: the global batch of that step (seeded by ``(seed, step)``; this rank's rows only), next-character
cross-entropy, backward (DDP averages the gradients over the ranks, so the update is that of the global batch),
gradient clipping, Adam at ``config.lr_at(step)``. Nothing in a step depends on state outside the model, the
optimizer and the step number, which is what the checkpoint holds: resuming at step t reproduces the
uninterrupted run.

Held-out bits per character: the mean cross-entropy (in bits) of predicting every held-out character from the
ones before it inside non-overlapping windows of ``seq_len`` characters.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..seeding import keeps_global_rng, seed_global
from .charlm import CharLMConfig, CharTransformer
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import CharCorpus, CharVocab, eval_windows, legacy_sha256, load_corpus, sample_batch
from .distributed import DistEnv, all_reduce_sum, barrier, shard_items

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
CHECKPOINT_FORMAT = "theorylab-charlm-v1"
LN2 = math.log(2.0)


@dataclass(frozen=True)
class StepInfo:
    """What a progress display needs after each step."""

    step: int  # steps done so far
    steps: int  # target
    train_bpc: float  # this step's training loss, bits per character (mean over the global batch)
    tokens_per_second: float  # training throughput so far (all ranks together)


@dataclass
class TrainResult:
    """What :func:`train_charlm` returns.

    Attributes:
        metrics: what ``metrics.json`` holds: ``final_bpc`` (held-out bits per character at the end),
            ``tokens_per_second``, ``steps``, ``train_seconds``, ``tokens_seen``, ``final_train_bpc``,
            ``unigram_bpc`` (the baseline of character frequencies), ``parameters``, ``config``,
            ``resumed_from_step``, ``world_size``, ``backend``, ``device``, ``threads_per_rank``, ``dtype`` (of
            the model's parameters: torch's default dtype when it was built), ``eval_chars``,
            ``data``, ``evals`` and ``train_bpc`` (per step).
        model: the trained model (unwrapped from DDP), on its device.
        checkpoint: the checkpoint file written, or None without ``out_dir``.
        evals: the held-out measurements ``{"step", "seconds", "heldout_bpc"}``: at the end, and every
            ``eval_every`` steps when asked.
    """

    metrics: dict[str, Any]
    model: CharTransformer  # the trained model (unwrapped from DDP), on its device
    checkpoint: Path | None = None
    evals: list[dict[str, float]] = field(default_factory=list)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-character cross-entropy in nats; logits ``(B, N, V)``, targets ``(B, N)``. Half-precision logits are
    taken in float32; float64 ones stay float64."""
    flat = logits.reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat.to(torch.promote_types(flat.dtype, torch.float32)), targets.reshape(-1),
                           reduction=reduction)


@torch.no_grad()
def evaluate_bpc(model: CharTransformer, tokens: torch.Tensor, seq_len: int, *, env: DistEnv | None = None,
                 max_chars: int | None = None, batch_size: int = 16) -> float:
    """Bits per character of ``model`` on ``tokens[:max_chars]`` (all of it by default).

    Args:
        model: the char-LM, evaluated in eval mode (its own mode is restored afterwards).
        tokens: a 1-D tensor of character ids (e.g. ``load_corpus().heldout``).
        seq_len: the context of each window, at most the model's (``config.seq_len``): every character after the
            first is predicted once, from up to ``seq_len`` characters before it.
        checkpoint_every: write ``checkpoint.pt`` into ``out_dir`` every this many steps, and at the end (default
            100; 0: at the end only). A run interrupted between two resumes from the last one.
        env: the distributed environment (None: one process).
        max_chars: only the first ``max_chars`` (>= 2) characters (None: all).
        batch_size: windows per forward pass (memory, not the result).

    The windows are shared out over the ranks; the sums of cross-entropy and counts are added up over them, so
    every rank returns the same number, equal to the single-process one up to rounding.
    """
    env = env or DistEnv()
    if max_chars is not None:
        if max_chars < 2:
            raise ValueError(f"max_chars must be >= 2, got {max_chars}")
        tokens = tokens[:max_chars]
    if tokens.numel() < 2:
        raise ValueError(f"need at least 2 characters to predict one, got {tokens.numel()}")
    windows = shard_items(eval_windows(tokens, seq_len), env.rank, env.world_size)
    was_training = model.training
    model.eval()
    count: float  # an int until all_reduce_sum returns it as a float
    total, count = 0.0, 0
    try:
        by_length: dict[int, list[int]] = {}
        for start, length in windows:
            by_length.setdefault(length, []).append(start)
        for length, starts in by_length.items():
            for i in range(0, len(starts), batch_size):
                s = torch.tensor(starts[i:i + batch_size])
                w = tokens[s[:, None] + torch.arange(length + 1)].to(env.device)  # (b, length + 1)
                total += float(lm_loss(model(w[:, :-1]), w[:, 1:], reduction="sum"))
                count += w.shape[0] * length
    finally:
        model.train(was_training)
    total, count = all_reduce_sum(env, [total, count])
    return total / count / LN2


def unigram_bpc(corpus: CharCorpus) -> float:
    """Held-out bits per character of the character frequencies of the training text (add-one smoothed)."""
    counts = torch.bincount(corpus.train, minlength=len(corpus.vocab)).double() + 1.0
    logp = torch.log2(counts / counts.sum())
    return float(-logp[corpus.heldout].mean())


def read_resume_checkpoint(out_dir: str | Path, corpus: CharCorpus | None = None) -> dict[str, Any]:
    """The checkpoint in ``out_dir`` to resume from, checked to belong to a char-LM run on this text."""
    ckpt = load_checkpoint(Path(out_dir) / CHECKPOINT_FILE, expected_format=CHECKPOINT_FORMAT)
    missing = [k for k in ("step", "config", "model", "optimizer", "data_sha256") if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint in {str(out_dir)!r} lacks {', '.join(missing)}")
    corpus = corpus or load_corpus()
    if ckpt["data_sha256"] == legacy_sha256():
        raise CheckpointError(f"checkpoint in {str(out_dir)!r} was trained on the held-out split used before "
                              "2026-11-26 (part of its held-out text was training text); start afresh with "
                              "--overwrite")
    if ckpt["data_sha256"] != corpus.sha256:
        raise CheckpointError(f"checkpoint in {str(out_dir)!r} was trained on a different pydoc_data text "
                              f"(Python {ckpt.get('python', '?')}; this is Python {corpus.python})")
    try:
        CharLMConfig.from_dict(ckpt["config"])
    except (AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint in {str(out_dir)!r} has an invalid config: {e}") from e
    step, options = ckpt["step"], ckpt.get("options", {})
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint in {str(out_dir)!r} has an invalid step {step!r}")
    if not isinstance(options, dict) or not set(options) <= {"checkpoint_every", "eval_every", "eval_chars", "threads"}:
        raise CheckpointError(f"checkpoint in {str(out_dir)!r} has invalid options {options!r}")
    # a tampered or foreign checkpoint: each field as train_charlm writes it, else an error now (not a traceback
    # after the training)
    least = {"eval_chars": 2, "threads": 1}
    problems = [f"options.{k}={v!r}" for k, v in options.items()
                if not (_is_int(v, least.get(k, 0)) or (k == "eval_chars" and v is None))]
    if "target_steps" in ckpt and not _is_int(ckpt["target_steps"], 1):
        problems.append(f"target_steps={ckpt['target_steps']!r}")
    if not _numbers(ckpt.get("train_bpc", [])):
        problems.append("train_bpc is not a list of numbers")
    evals = ckpt.get("evals", [])
    if not (isinstance(evals, list) and all(isinstance(e, dict) and set(e) == {"step", "seconds", "heldout_bpc"}
                                            and _is_int(e["step"], 0) and _numbers([e["seconds"], e["heldout_bpc"]])
                                            for e in evals)):
        problems.append("evals is not a list of {step, seconds, heldout_bpc}")
    if not _numbers([ckpt.get("train_seconds", 0.0)]) or not _is_int(ckpt.get("tokens_seen", 0), 0):
        problems.append("train_seconds or tokens_seen is invalid")
    # training never saves non-finite weights or moments (it stops first): a damaged file, which would otherwise
    # train one step and blame the learning rate
    bad = _non_finite(ckpt.get("model"), "") + _non_finite(ckpt.get("optimizer", {}).get("state")
                                                           if isinstance(ckpt.get("optimizer"), dict) else None,
                                                           "optimizer state ")
    if bad:
        problems.append(f"non-finite values in {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}")
    if problems:
        raise CheckpointError(f"checkpoint in {str(out_dir)!r} is corrupt or tampered: {'; '.join(problems)}")
    return ckpt


def _non_finite(tree: Any, prefix: str) -> list[str]:
    """The names of the floating-point tensors in a nested dict that hold NaN or ±inf."""
    if isinstance(tree, torch.Tensor):
        return [prefix.rstrip(". ")] if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else []
    if isinstance(tree, dict):
        return [name for k, v in tree.items() for name in _non_finite(v, f"{prefix}{k}.".lstrip("."))]
    return []


ADAM_STATE = {"step", "exp_avg", "exp_avg_sq"}  # torch.optim.Adam's per-parameter state (amsgrad off)


def load_trained_model(out_dir: str | Path) -> tuple[CharTransformer, CharVocab]:
    """The model of the char-LM run in ``out_dir`` (its ``checkpoint.pt``; or that file itself, as ``theorylab
    sample`` takes it), in eval mode on the CPU, and its vocabulary; CheckpointError says what is wrong with the
    checkpoint."""
    path = Path(out_dir)
    is_file = False
    with contextlib.suppress(OSError, ValueError):  # a name too long or with a NUL: load_checkpoint says so
        is_file = path.is_file()
    ckpt = load_checkpoint(path if is_file else path / CHECKPOINT_FILE, expected_format=CHECKPOINT_FORMAT)
    where = f"checkpoint in {str(out_dir)!r}"
    missing = [k for k in ("config", "model", "vocab") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{where} lacks {', '.join(missing)}")
    try:
        config = CharLMConfig.from_dict(ckpt["config"])
        vocab = CharVocab(ckpt["vocab"]) if isinstance(ckpt["vocab"], str) and ckpt["vocab"] else None
    except (AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where} has an invalid config or vocabulary: {e}") from e
    if vocab is None:
        raise CheckpointError(f"{where} has no vocabulary (a non-empty string of characters)")
    model = CharTransformer(len(vocab), config)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{where} does not fit its own config and vocabulary: {first}") from e
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:  # training never saves such weights (it stops first): a tampered or damaged file
        more = ", ..." if len(bad) > 3 else ""
        raise CheckpointError(f"{where} holds non-finite weights ({', '.join(bad[:3])}{more})")
    return model.eval(), vocab


def _check_optimizer_state(optimizer: torch.optim.Optimizer, built: list[dict[str, Any]]) -> None:
    """ValueError unless each parameter's state is Adam's (a one-element step and moments of its shape) and each
    group's settings are those the configuration builds (``built``; the lr aside, which the schedule sets at every
    step): a loaded ``maximize=True`` had trained uphill to 11 bits/char, ``amsgrad=True`` failed mid-run."""
    if len(built) != len(optimizer.param_groups):
        raise ValueError(f"optimizer state has {len(optimizer.param_groups)} parameter groups, not {len(built)}")
    for i, (group, want) in enumerate(zip(optimizer.param_groups, built, strict=True)):
        for key, value in want.items():
            if key != "lr" and _plain(group.get(key)) != _plain(value):
                raise ValueError(f"optimizer parameter group {i} has {key}={group.get(key)!r}, not {value!r}")
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if not state:
                continue
            if set(state) != ADAM_STATE:
                raise ValueError(f"optimizer state has keys {sorted(state)}, not {sorted(ADAM_STATE)}")
            if not isinstance(state["step"], torch.Tensor) or state["step"].numel() != 1:
                raise ValueError(f"optimizer state 'step' is not a one-element tensor: {state['step']!r}")
            for key in ("exp_avg", "exp_avg_sq"):
                value = state[key]
                if not isinstance(value, torch.Tensor) or value.shape != p.shape:
                    raise ValueError(f"optimizer state {key!r} has shape {tuple(getattr(value, 'shape', ()))} "
                                     f"for a parameter of shape {tuple(p.shape)}")


def _plain(value: Any) -> Any:
    """A setting comparable with ==: tuples and lists alike (betas)."""
    return tuple(_plain(v) for v in value) if isinstance(value, (list, tuple)) else value


def _is_int(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _numbers(values: Any) -> bool:
    return isinstance(values, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def validate_run(config: CharLMConfig, world_size: int = 1) -> None:
    """ValueError naming the problem if ``config`` cannot run on ``world_size`` processes with this corpus."""
    if config.batch_size % world_size:
        raise ValueError(f"batch-size {config.batch_size} must be divisible by the number of processes "
                         f"{world_size} (it is the global batch)")
    corpus = load_corpus()
    if config.seq_len >= min(corpus.train.numel(), corpus.heldout.numel()):
        raise ValueError(f"seq-len {config.seq_len} is too long for the held-out text of "
                         f"{corpus.heldout.numel()} characters")


@keeps_global_rng  # it seeds torch's generator for the model's initialisation: the caller's state comes back
def train_charlm(config: CharLMConfig, steps: int, *, out_dir: str | Path | None = None,
                 resume_from: dict[str, Any] | None = None, env: DistEnv | None = None,
                 checkpoint_every: int = 100, eval_every: int = 0, eval_chars: int | None = None,
                 on_step: Callable[[StepInfo], None] | None = None, overwrite: bool = False) -> TrainResult:
    """Train the char-LM of ``config`` up to step ``steps``; return metrics and the model.

    Args:
        config: the model, data and optimisation settings (:class:`CharLMConfig`).
        steps: train up to this step (a positive integer; with ``resume_from``, at least the checkpoint's step).
        out_dir: where ``checkpoint.pt`` (every ``checkpoint_every`` steps and at the end) and ``metrics.json`` go
            (written by rank 0 only); None writes nothing. A folder that holds a checkpoint is refused unless
            ``resume_from`` continues it or ``overwrite`` starts afresh (which removes the old run's checkpoint
            and metrics first). Unlike ``theorylab train charlm``, this function does not lock the folder: two
            processes training into one folder overwrite each other.
        resume_from: a checkpoint from :func:`read_resume_checkpoint`; training continues from its step, the
            model, optimizer, losses and evaluations bit for bit (the run's old ``metrics.json`` is removed first
            when there are steps to train: an interruption must not leave it beside a newer checkpoint). Its
            config must equal ``config``. The options below are this call's: to continue the run as it was (as
            ``theorylab train charlm --resume`` does), pass the checkpoint's again,
            ``**{k: v for k, v in ckpt["options"].items() if k != "threads"}`` (an ``eval_chars`` of its own
            otherwise mixes curves measured on other held-out characters).
        env: the distributed environment (:func:`theorylab.experiments.distributed.init_distributed`); None is a
            single process on the CPU.
        eval_every: also measure held-out bits/char before training and every this many steps (0: only at the
            end), recorded with the training seconds so far: the bits/char-against-wall-clock curve.
        eval_chars: evaluate on the first ``eval_chars`` (>= 2) held-out characters only (None: all of them).
        on_step: called after every step (rank 0 only) with a :class:`StepInfo`, e.g. to drive a progress bar.
        overwrite: start afresh in an ``out_dir`` that holds a checkpoint (see ``out_dir``).

    Raises:
        TypeError: ``config`` is not a CharLMConfig, or a count is not an integer.
        ValueError: a count out of range, a folder that holds another run, or a resume whose config differs from
            the checkpoint's; each checked before anything trains.

    Training runs with gradients on, also when called inside ``torch.no_grad()``. The model is built in torch's
    default dtype (float32 unless ``torch.set_default_dtype`` says otherwise).
    """
    env = env or DistEnv()
    if not isinstance(config, CharLMConfig):
        raise TypeError(f"config must be a CharLMConfig (CharLMConfig.from_dict(d) for a dict); got "
                        f"{type(config).__name__}")
    steps = _count("steps", steps, 1)
    checkpoint_every, eval_every = _count("checkpoint_every", checkpoint_every, 0), _count("eval_every", eval_every, 0)
    if eval_chars is not None:
        eval_chars = _count("eval_chars", eval_chars, 2)  # one character is no prediction: found only at the end
    validate_run(config, env.world_size)
    corpus = load_corpus()
    start = 0
    if resume_from is not None:
        saved = CharLMConfig.from_dict(resume_from["config"])
        if saved != config:
            raise ValueError(f"config {config} differs from the checkpoint's {saved}")
        start = int(resume_from["step"])
        if start > steps:
            raise ValueError(f"the checkpoint is at step {start}, beyond steps={steps}")
        if overwrite:
            raise ValueError("resume_from and overwrite=True contradict each other: resume continues the run that "
                             "overwrite would remove")
    elif out_dir is not None and overwrite:  # on every rank, whatever each sees: the barriers must pair up
        barrier(env)  # every rank has looked before rank 0 removes: an interrupted new run must not leave the old
        if env.is_main:  # run to be resumed, nor its metrics beside the new checkpoint
            for name in (CHECKPOINT_FILE, METRICS_FILE):
                (Path(out_dir) / name).unlink(missing_ok=True)
        barrier(env)
    elif out_dir is not None and (Path(out_dir) / CHECKPOINT_FILE).exists():
        raise ValueError(f"{str(Path(out_dir) / CHECKPOINT_FILE)!r} exists: pass resume_from="
                         f"read_resume_checkpoint(out_dir) to continue that run, or overwrite=True to start afresh")
    # inference_mode(False) and enable_grad: training needs autograd, whatever mode the caller is in
    with torch.inference_mode(False), torch.enable_grad():
        return _train(config, steps, corpus, start, out_dir, resume_from, env, checkpoint_every, eval_every,
                      eval_chars, on_step)


def _count(name: str, value: object, lowest: int) -> int:
    """``value`` as an int >= ``lowest``: TypeError (bool and float included) or ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer; got {value!r}")
    if value < lowest:
        raise ValueError(f"{name} must be >= {lowest}, got {value}")
    return int(value)


def _train(config: CharLMConfig, steps: int, corpus: CharCorpus, start: int, out_dir: str | Path | None,
           resume_from: dict[str, Any] | None, env: DistEnv, checkpoint_every: int, eval_every: int,
           eval_chars: int | None, on_step: Callable[[StepInfo], None] | None) -> TrainResult:
    """The training of :func:`train_charlm`, its arguments checked."""

    seed_global(config.seed, env.device)  # the same initial model on every rank (DDP also broadcasts rank 0's)
    model = CharTransformer(len(corpus.vocab), config).to(env.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, 0.99))
    losses: list[float] = []
    evals: list[dict[str, float]] = []
    train_seconds, tokens_seen = 0.0, 0
    if resume_from is not None:
        try:  # a checkpoint that unpickles but does not fit this model (tampered, or another version of it)
            model.load_state_dict(resume_from["model"])
            built = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            optimizer.load_state_dict(resume_from["optimizer"])
            _check_optimizer_state(optimizer, built)  # torch's Adam checks neither shapes nor settings
            losses = [float(v) for v in resume_from.get("train_bpc", [])]
            evals = [dict(e) for e in resume_from.get("evals", [])]
            train_seconds = float(resume_from.get("train_seconds", 0.0))
            tokens_seen = int(resume_from.get("tokens_seen", 0))
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"the checkpoint does not fit this model (corrupt, or written by another "
                                  f"version): {type(e).__name__}: {first}") from e
    ddp: nn.Module = model
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / CHECKPOINT_FILE if out is not None else None
    if out is not None and resume_from is not None and start < steps and env.is_main:
        # once the checkpoint is known to fit (a refused one must leave every file as it was): the run's metrics
        # would describe an older model than the checkpoints written from now on, were this run interrupted (an
        # extension by --resume --steps N had left them so)
        (out / METRICS_FILE).unlink(missing_ok=True)

    def checkpoint(step: int, wait: bool = True) -> None:
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):  # keep the last good checkpoint
            raise FloatingPointError(f"the weights became non-finite at step {step}; lower the learning rate")
        if ckpt_path is not None and env.is_main:
            save_checkpoint(ckpt_path, {
                "format": CHECKPOINT_FORMAT, "step": step, "target_steps": steps, "config": config.to_dict(),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "train_bpc": losses, "evals": evals, "train_seconds": train_seconds, "tokens_seen": tokens_seen,
                "vocab": corpus.vocab.chars, "data_sha256": corpus.sha256, "python": corpus.python,
                # threads: a resumed run continues on as many (another count rounds differently)
                "options": {"checkpoint_every": checkpoint_every, "eval_every": eval_every, "eval_chars": eval_chars,
                            "threads": torch.get_num_threads()}})
        if wait:
            barrier(env)

    def heldout_bpc(step: int) -> float:
        bpc = evaluate_bpc(model, corpus.heldout, config.seq_len, env=env, max_chars=eval_chars)
        if not math.isfinite(bpc):  # the last step can diverge with a finite training loss (measured before it)
            raise FloatingPointError(f"held-out loss became {bpc} at step {step}; lower the learning rate")
        return bpc

    if resume_from is not None and evals and evals[-1]["step"] == start and start > 0 and \
            not (eval_every and start % eval_every == 0):
        evals.pop()  # the final eval of the run being extended, off the eval grid: an uninterrupted run has none
    if resume_from is not None and eval_every and 0 < start < steps and start % eval_every == 0 and \
            (not evals or evals[-1]["step"] != start):  # checkpointed by a Ctrl-C in its final evaluation, and
        evals.append({"step": start, "seconds": train_seconds, "heldout_bpc": heldout_bpc(start)})  # now extended

    model.train()
    if eval_every and start == 0:  # the untrained model: the start of the bits/char-against-time curve
        evals.append({"step": 0, "seconds": 0.0, "heldout_bpc": heldout_bpc(0)})
    for step in range(start, steps):
        t0 = time.perf_counter()
        lr = config.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = sample_batch(corpus.train, config.batch_size, config.seq_len, seed=config.seed, step=step,
                            rank=env.rank, world_size=env.world_size)
        x, y = x.to(env.device), y.to(env.device)
        loss = lm_loss(ddp(x), y)  # (,) this rank's mean; DDP averages the gradients over the ranks
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        (loss_sum,) = all_reduce_sum(env, [loss.item()])  # .item() waits for the step to finish
        train_seconds += time.perf_counter() - t0
        tokens_seen += config.batch_size * config.seq_len
        losses.append(loss_sum / env.world_size / LN2)
        done = step + 1
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"training loss became {losses[-1]} at step {done}; lower the learning rate")
        if eval_every and done % eval_every == 0 and done < steps:
            evals.append({"step": done, "seconds": train_seconds, "heldout_bpc": heldout_bpc(done)})
        if checkpoint_every and done % checkpoint_every == 0 and done < steps:
            checkpoint(done)
        if on_step is not None and env.is_main:
            on_step(StepInfo(done, steps, losses[-1], tokens_seen / max(train_seconds, 1e-12)))

    try:
        final_bpc = heldout_bpc(steps)
    except KeyboardInterrupt:  # trained, not yet evaluated: keep the training for --resume (a divergence that the
        if start < steps:      # evaluation finds still writes nothing); no barrier: every rank is stopping
            checkpoint(steps, wait=False)
        raise
    if not evals or evals[-1]["step"] != steps:
        evals.append({"step": steps, "seconds": train_seconds, "heldout_bpc": final_bpc})
    checkpoint(steps)
    metrics = {
        "final_bpc": final_bpc,
        "tokens_per_second": tokens_seen / train_seconds if train_seconds > 0 else float("nan"),
        "steps": steps,
        "train_seconds": train_seconds,
        "tokens_seen": tokens_seen,
        "final_train_bpc": losses[-1] if losses else float("nan"),
        "unigram_bpc": unigram_bpc(corpus),
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": config.to_dict(),
        "resumed_from_step": start if resume_from is not None else None,
        "world_size": env.world_size,
        "backend": env.backend,
        "device": str(env.device),
        "threads_per_rank": torch.get_num_threads(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),  # torch's default dtype decided it
        "eval_chars": min(eval_chars, corpus.heldout.numel()) if eval_chars else corpus.heldout.numel(),
        "data": corpus.describe(),
        "evals": evals,
        "train_bpc": losses,
    }
    if out is not None and env.is_main:
        from ..claims.engine import json_safe, write_json_atomic

        write_json_atomic(out / METRICS_FILE, json_safe(metrics))
    barrier(env)
    return TrainResult(metrics=metrics, model=model, checkpoint=ckpt_path, evals=evals)
