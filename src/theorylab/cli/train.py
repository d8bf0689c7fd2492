"""``theorylab train charlm``: train a character-level language model; the same command runs under torchrun.

Single process::

    theorylab train charlm --attention favor --steps 300 --seq-len 256 --out runs/favor

Two processes with DistributedDataParallel (gloo on CPU, nccl on CUDA); each rank takes its shard of every batch,
rank 0 writes the checkpoint and the metrics::

    torchrun --standalone --nproc_per_node 2 -m theorylab train charlm --attention favor --out runs/favor
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import time
from pathlib import Path

from ._args import (
    MAX_SEED,
    OutputBusyError,
    check_files,
    check_writable,
    exclusive_output,
    folder,
    seed,
    sigterm_as_interrupt,
)

DEFAULT_STEPS = 300
# Options that make up the run's config (CharLMConfig field names); None = not given on the command line.
_CONFIG_OPTIONS = ("attention", "seq_len", "layers", "width", "heads", "num_features", "batch_size", "lr",
                   "warmup", "seed")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on real data (char-level LM per attention kind)",
                       description="Train models on real data. Runs unchanged under "
                                   "`torchrun --nproc_per_node P -m theorylab train ...` (DistributedDataParallel).")
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
    c = tasks.add_parser(
        "charlm", help="decoder-only Transformer on Python's documentation text, bits/char on held-out text",
        description="Train a small decoder-only Transformer on pydoc_data.topics (the documentation that ships with "
                    "Python; about 10% held out, by whole groups of topics that share no 100-character span) "
                    "with one kind of causal attention. Writes DIR/metrics.json "
                    "(final_bpc, tokens_per_second, steps, config, the curves train_bpc and evals, ...) and "
                    "DIR/checkpoint.pt. Exit 0 on success, "
                    "2 for bad arguments or an unusable checkpoint (nothing is overwritten then).")
    from ..experiments.charlm import ATTENTION_KINDS, CharLMConfig

    d = CharLMConfig()
    c.add_argument("--attention", choices=ATTENTION_KINDS, default=None,
                   help=f"attention kind (default: {d.attention})")
    c.add_argument("--steps", type=int, default=None,
                   help=f"train up to this step (default: {DEFAULT_STEPS}; with --resume: the checkpoint's target)")
    c.add_argument("--seq-len", type=int, default=None, help=f"characters per window (default: {d.seq_len})")
    c.add_argument("--out", type=folder, required=True, metavar="DIR", help="folder for metrics.json and checkpoint.pt")
    c.add_argument("--batch-size", type=int, default=None,
                   help=f"global batch, windows per step over all processes (default: {d.batch_size})")
    c.add_argument("--lr", type=float, default=None, help=f"peak Adam learning rate (default: {d.lr})")
    c.add_argument("--warmup", type=int, default=None,
                   help=f"warm-up steps, then lr * sqrt(warmup/step) (default: {d.warmup})")
    c.add_argument("--seed", type=seed, default=None,
                   help=f"initialisation and batch seed, 0..{MAX_SEED} (default: {d.seed})")
    c.add_argument("--layers", type=int, default=None, help=f"Transformer blocks (default: {d.layers})")
    c.add_argument("--width", type=int, default=None, help=f"embedding width (default: {d.width})")
    c.add_argument("--heads", type=int, default=None, help=f"attention heads (default: {d.heads})")
    c.add_argument("--num-features", type=int, default=None,
                   help=f"random features per head, >= 1; used by favor only (default: {d.num_features})")
    c.add_argument("--resume", action="store_true",
                   help="continue from DIR/checkpoint.pt (its config; --steps may extend the run)")
    c.add_argument("--overwrite", action="store_true", help="start afresh even if DIR holds a checkpoint")
    c.add_argument("--checkpoint-every", type=int, default=None, metavar="K",
                   help="write the checkpoint every K steps and at the end (0: only at the end; default: 100; "
                        "with --resume: the checkpoint's)")
    c.add_argument("--eval-every", type=int, default=None, metavar="K",
                   help="also measure held-out bits/char every K steps (default: 0, only at the end; with --resume: "
                        "the checkpoint's)")
    c.add_argument("--eval-chars", type=int, default=None, metavar="N",
                   help="evaluate on the first N >= 2 held-out characters only (default: all; with --resume: "
                        "the checkpoint's)")
    c.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when present (nccl under torchrun), else CPU (gloo); under torchrun on one "
                        "machine with fewer GPUs than processes, CPU with a warning (default: auto)")
    c.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (default: torch's; under torchrun the cores / local processes; "
                        "with --resume: the checkpoint's, where it fits)")
    c.set_defaults(run=run)


class UsageError(ValueError):
    pass


def _local_processes() -> int:
    """The processes on this machine: torchrun's ``LOCAL_WORLD_SIZE``, else 1; a UsageError naming a value that
    is not a count (it had ended in a traceback)."""
    from ..experiments.distributed import launched_by_torchrun

    if not launched_by_torchrun():
        return 1
    value = os.environ.get("LOCAL_WORLD_SIZE", "1")
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise UsageError(f"LOCAL_WORLD_SIZE must be a positive integer (torchrun sets it), got {value!r}")
    return count


def _resumed_threads(given: int | None, saved: int | None, cpus: int, main: bool) -> int | None:
    """The thread count of a run: ``--threads``, else the checkpoint's (a resumed run equals an uninterrupted one
    only on as many threads: another count rounds differently) where it fits in this process's share of the cores
    (under torchrun, the cores over the processes on this machine), else None (the default share). Where the count
    changes, rank 0 says so."""
    if saved is None or given == saved:
        return given
    share = max(1, cpus // _local_processes())
    if given is None and saved <= share:
        return saved
    threads = given if given is not None else share
    if main:
        print(f"theorylab train charlm: resuming on {threads} thread(s) per process where the run so far used "
              f"{saved}: it will differ from an uninterrupted run by rounding", file=sys.stderr)
    return threads


#: how long a rank other than 0 waits before it exits 2 on a usage error, so that rank 0 reports it first
NON_MAIN_EXIT_DELAY_S = 5.0


def resolve_config(args: argparse.Namespace, saved: dict | None):
    """The run's config: defaults (or the checkpoint's) updated with the options given on the command line.

    A resumed run keeps its checkpoint's config; an option that contradicts it is a UsageError.
    """
    from ..experiments.charlm import CharLMConfig

    given = {k: getattr(args, k) for k in _CONFIG_OPTIONS if getattr(args, k) is not None}
    if saved is None:
        try:
            return CharLMConfig(**given)
        except ValueError as e:
            raise UsageError(str(e)) from None
    base = CharLMConfig.from_dict(saved)
    conflicts = [f"--{k.replace('_', '-')} {v} (checkpoint: {getattr(base, k)})"
                 for k, v in given.items() if v != getattr(base, k)]
    if conflicts:
        raise UsageError("a resumed run keeps its checkpoint's settings; these differ: " + ", ".join(conflicts))
    return base


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ..experiments.distributed import job_rank_world

    try:
        rank, world = job_rank_world()
    except ValueError as e:
        print(f"theorylab train charlm: error: {e}", file=sys.stderr)
        return 2
    main = rank == 0  # under torchrun only rank 0 talks
    try:
        with contextlib.ExitStack() as held:  # the output folder's lock, from the checks to the last write
            return _run_charlm(args, main, world, held)
    except UsageError as e:
        if main:
            print(f"theorylab train charlm: error: {e}", file=sys.stderr)
        elif world > 1:
            if os.environ.get("LOCAL_RANK", "0") == "0":
                # the first process on another machine: rank 0's message is in rank 0's machine's log, and the
                # error may be this machine's alone (its cores, its files), which had been reported nowhere
                print(f"theorylab train charlm (rank {rank}): error: {e}", file=sys.stderr)
            # torchrun stops every rank once one has exited with an error: had this rank exited first, rank 0
            # could be stopped before printing why. Under torchrun rank 0's exit ends this wait at once.
            time.sleep(NON_MAIN_EXIT_DELAY_S)
        return 2


def _run_charlm(args: argparse.Namespace, main: bool, world: int, held: contextlib.ExitStack) -> int:
    from ..experiments.checkpoint import CheckpointError
    from ..experiments.distributed import all_reduce_sum, available_cores, device_plan, init_distributed, shutdown
    from ..experiments.trainer import CHECKPOINT_FILE, read_resume_checkpoint, train_charlm, validate_run

    out = Path(args.out)
    for name in ("checkpoint_every", "eval_every"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.eval_chars is not None and args.eval_chars < 2:
        raise UsageError(f"--eval-chars must be >= 2, got {args.eval_chars}")
    cpus = available_cores()  # the CPUs this process may run on (its affinity mask), not all the machine's
    local = _local_processes()
    share = max(1, cpus // local)  # more threads than that only oversubscribes (3.5x slower: 4 threads on 2 CPUs)
    if args.threads is not None and not 1 <= args.threads <= share:
        where = ("the CPUs this process may use" if local == 1 else
                 f"the {cpus} CPUs this process may use, shared by the {local} processes on this machine")
        raise UsageError(f"--threads must lie in [1, {share}] ({where}), got {args.threads}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    try:  # before the output folder is made: a refused device (no CUDA, too few GPUs) must leave none behind
        device_plan(args.device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:  # Python 3.11's pathlib lets "file name too long" (and a NUL byte) through as exceptions
        out_is_dir, out_exists = out.is_dir(), out.exists()
    except (OSError, ValueError) as e:
        raise UsageError(f"--out {str(out)!r} cannot be used: {e}") from None
    if out_exists and not out_is_dir:
        raise UsageError(f"--out {str(out)!r} is a file, not a folder")
    # Rank 0 writes every file, so it holds the folder, and from before the checks that read it: a run that
    # finishes in between must not be overwritten. Under torchrun a busy folder is reported after the process
    # group is up, so that every rank exits 2 together (the others would wait for rank 0 in init).
    locked, busy = _hold(held, out) if main and out_is_dir else (False, None)
    if busy and world == 1:
        raise UsageError(busy)
    saved = None
    if args.resume:
        if args.overwrite:
            raise UsageError("--resume and --overwrite contradict each other")
        try:
            saved = read_resume_checkpoint(out)
        except CheckpointError as e:
            raise UsageError(f"cannot resume: {e}") from None
    elif (out / CHECKPOINT_FILE).exists() and not args.overwrite:
        raise UsageError(f"{str(out / CHECKPOINT_FILE)!r} exists: pass --resume to continue that run or "
                         f"--overwrite to start afresh")
    config = resolve_config(args, saved["config"] if saved else None)
    saved_options = dict(saved.get("options", {})) if saved else {}
    threads = _resumed_threads(args.threads, saved_options.pop("threads", None), cpus, main)
    options = {"checkpoint_every": 100, "eval_every": 0, "eval_chars": None,  # a resumed run keeps its own
               **saved_options,
               **{k: getattr(args, k) for k in ("checkpoint_every", "eval_every", "eval_chars")
                  if getattr(args, k) is not None}}
    steps = args.steps if args.steps is not None else (int(saved.get("target_steps", DEFAULT_STEPS)) if saved
                                                        else DEFAULT_STEPS)
    if saved is not None and steps < int(saved["step"]):
        raise UsageError(f"the checkpoint is at step {saved['step']}, beyond --steps {steps}")
    try:
        validate_run(config, world_size=world)
        if err := check_writable(out) or check_files(out, (CHECKPOINT_FILE, "metrics.json")):
            raise UsageError(err)  # after the other checks, which leave no folder behind
        if main and not locked and busy is None:  # the folder did not exist before
            locked, busy = _hold(held, out)
        if busy and world == 1:
            raise UsageError(busy)
        import torch

        held.callback(torch.set_num_threads, torch.get_num_threads())  # a call of main() leaves the process's as it was
        env = init_distributed(args.device, threads)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if all_reduce_sum(env, [1.0 if busy else 0.0])[0] > 0:
        shutdown(env)
        raise UsageError(busy or "another theorylab run is writing into the output folder (rank 0 found it held)")
    if saved is not None and steps == int(saved["step"]) and _finished(out, steps, saved["config"]):
        shutdown(env)  # nothing to train, and its metrics are written: leave the run's files as they are
        if main:
            print(f"charlm {config.attention}: the run in {str(out)!r} is already at step {steps}; nothing to "
                  f"train (extend it with --resume --steps N, N > {steps})")
        return 0
    # SIGTERM (a scheduler's stop) as Ctrl-C from here on: the resume hint, exit 143 (it had ended the run
    # silently). Not before: a Python handler waits for the C++ call it interrupts, and init_distributed can wait
    # for a missing rank up to torch's process-group timeout, where SIGTERM's default action ends the process at once
    terminated = held.enter_context(sigterm_as_interrupt())
    progress = _progress_bar(main)
    try:
        with progress or contextlib.nullcontext():
            # the loss and speed read "-" until the first step has measured them (not "nan": not a divergence)
            task = progress.add_task(f"charlm {config.attention}", total=steps,
                                     completed=int(saved["step"]) if saved else 0, bpc="-", tps="-") \
                if progress else None

            def on_step(info) -> None:
                if progress is not None:
                    progress.update(task, completed=info.step, bpc=f"{info.train_bpc:.3f}",
                                    tps=f"{info.tokens_per_second:,.0f}")

            result = train_charlm(config, steps, out_dir=out, resume_from=saved, env=env,
                                  on_step=on_step, overwrite=args.overwrite, **options)
    except KeyboardInterrupt:
        if main:
            print(f"{'terminated' if terminated else 'interrupted'}{_resume_hint(out, steps)}", file=sys.stderr)
        return 143 if terminated else 130
    except CheckpointError as e:
        if main:
            print(f"theorylab train charlm: error: cannot resume: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:  # out of memory, or another process lost: say so, no traceback
        if _peer_lost(e):
            if main:
                print(f"theorylab train charlm: another process of the job failed or was killed "
                      f"({str(e).strip().splitlines()[0][:200]}){_resume_hint(out, steps)}", file=sys.stderr)
            return 1
        if not isinstance(e, MemoryError) and "allocate" not in str(e):
            raise
        if main:
            print(f"theorylab train charlm: out of memory ({str(e).strip().splitlines()[0][:200]}); use a "
                  f"smaller --batch-size, --width, --layers, --seq-len or --num-features", file=sys.stderr)
        return 1
    except FloatingPointError as e:  # the loss diverged: a finding about the settings, not a crash
        if main:
            # a resumed run keeps its lr, and the last checkpoint may hold weights already on their way out
            hint = ("; a resumed run keeps its lr: start afresh with --overwrite and a lower --lr"
                    if (out / CHECKPOINT_FILE).exists() else "")
            print(f"theorylab train charlm: {e}{hint}", file=sys.stderr)
        return 1
    finally:
        shutdown(env)
    if main:
        m = result.metrics
        print(f"charlm {config.attention}: {m['steps']} steps, held-out {m['final_bpc']:.3f} bits/char "
              f"(unigram {m['unigram_bpc']:.2f}), {m['tokens_per_second']:,.0f} tokens/s on {m['world_size']} "
              f"process(es); wrote {out / 'metrics.json'} and {out / CHECKPOINT_FILE}")
    return 0


def _resume_hint(out: Path, steps: int) -> str:
    """How to go on after a stopped run: from its last checkpoint (with --steps: a run extended with --resume
    --steps M and stopped before its first checkpoint still has the old target in its checkpoint), or nothing."""
    from ..experiments.trainer import CHECKPOINT_FILE

    if (out / CHECKPOINT_FILE).exists():
        return (f"; continue from the last checkpoint with: theorylab train charlm --out {shlex.quote(str(out))} "
                f"--resume --steps {steps}")
    return " before the first checkpoint: nothing to resume"


def _peer_lost(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because another process of the job went away (killed, crashed):
    torch's distributed errors, and gloo's transport errors, which reach Python as a plain RuntimeError (rank 0 had
    printed that as a traceback)."""
    import torch.distributed as dist

    dist_error = getattr(dist, "DistError", None)
    text = str(e)
    return ((dist_error is not None and isinstance(e, dist_error)) or "gloo/transport" in text
            or "Connection reset by peer" in text or "Connection closed by peer" in text)


def _finished(out: Path, steps: int, config: dict) -> bool:
    """Whether ``out`` holds the metrics of this run at ``steps``: an interrupt between the last checkpoint and the
    metrics (or a target extended and then cut short) leaves them missing or older, and a resume writes them."""
    import json

    from ..experiments.trainer import METRICS_FILE

    try:
        metrics = json.loads((out / METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(metrics, dict) and metrics.get("steps") == steps and metrics.get("config") == config


def _hold(held: contextlib.ExitStack, out: Path) -> tuple[bool, str | None]:
    """(locked, why not): the output folder's lock, held until ``held`` closes."""
    try:
        held.enter_context(exclusive_output(out))
    except OutputBusyError as e:
        return False, str(e)
    return True, None


def _progress_bar(main: bool):
    from ..experiments.progress import progress_console, show_progress

    if not (main and show_progress()):
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[bpc]} bits/char"), TextColumn("{task.fields[tps]} tok/s"),
                    TimeElapsedColumn(), TimeRemainingColumn(), transient=True, console=progress_console())
