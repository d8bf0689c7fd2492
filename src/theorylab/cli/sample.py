"""``theorylab sample RUN_DIR``: text from a trained char-LM (``theorylab train charlm --out RUN_DIR``).

Decoding is incremental: kinds "linear", "favor" and "separable" carry their attention layers' recurrent states
(each new character costs the same, whatever the text before it), "softmax" a KV cache per layer."""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

from ._args import MAX_SEED, folder, seed


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate text with a model trained by `theorylab train charlm`",
                       description="Continue a prompt with the char-LM whose checkpoint.pt is in RUN_DIR. Prints the "
                                   "prompt and its continuation on stdout, the speed on stderr. Exit 2 for bad "
                                   "arguments or an unusable checkpoint.")
    p.add_argument("run_dir", type=folder, metavar="RUN_DIR",
                   help="the --out folder of `theorylab train charlm` (or its checkpoint.pt)")
    p.add_argument("--prompt", default="The ", help="text to continue (characters of the training text; default: "
                                                    "'The ')")
    p.add_argument("--chars", type=int, default=200,
                   help="characters to generate (default: 200; with the prompt at most the model's --seq-len)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="softmax temperature; 0 picks the most likely character every time (default: 0.8)")
    p.add_argument("--seed", type=seed, default=0, help=f"sampling seed, 0..{MAX_SEED} (default: 0)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    def error(message: str) -> int:
        print(f"theorylab sample: error: {message}", file=sys.stderr)
        return 2

    if args.chars < 0:
        return error(f"--chars must be >= 0, got {args.chars}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        return error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not args.prompt:
        return error("--prompt must hold at least one character")
    import torch

    from ..experiments.checkpoint import CheckpointError

    try:
        return _sample(args, torch.Generator().manual_seed(args.seed))
    except CheckpointError as e:
        return error(str(e))
    except FloatingPointError as e:
        print(f"theorylab sample: {e}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:  # out of memory (a model too large for this machine): no traceback
        if not isinstance(e, MemoryError) and "allocate" not in str(e):
            raise
        print(f"theorylab sample: out of memory ({str(e).strip().splitlines()[0][:200]})", file=sys.stderr)
        return 1


def _sample(args: argparse.Namespace, generator: Any) -> int:
    from pathlib import Path

    from ..experiments.charlm import DECODING
    from ..experiments.trainer import CHECKPOINT_FILE, load_trained_model

    run_dir = Path(args.run_dir)
    try:  # Python 3.11's pathlib lets "file name too long" (and a NUL byte) through as exceptions
        is_file = run_dir.is_file()
    except (OSError, ValueError) as e:
        print(f"theorylab sample: error: RUN_DIR {str(run_dir)!r} cannot be used: {e}", file=sys.stderr)
        return 2
    if is_file:  # the checkpoint itself was named: its folder; any other file is a mistake
        if run_dir.name != CHECKPOINT_FILE:
            print(f"theorylab sample: error: RUN_DIR {str(run_dir)!r} is a file; give the run's folder (the --out "
                  f"of `theorylab train charlm`) or its {CHECKPOINT_FILE}", file=sys.stderr)
            return 2
        run_dir = run_dir.parent
    model, vocab = load_trained_model(run_dir)
    try:
        prompt = vocab.encode(args.prompt)[None]
    except ValueError as e:  # names a character the model never saw
        print(f"theorylab sample: error: --prompt: {e}", file=sys.stderr)
        return 2
    if prompt.shape[1] + args.chars > model.max_len:
        print(f"theorylab sample: error: the prompt ({prompt.shape[1]} characters) and --chars {args.chars} exceed "
              f"the model's {model.max_len} positions (its --seq-len)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    tokens = model.generate(prompt, args.chars, temperature=args.temperature, generator=generator)
    seconds = time.perf_counter() - start
    print(vocab.decode(tokens[0]))
    how = DECODING[model.config.attention]
    rate = f"{args.chars / seconds:,.0f} chars/s" if seconds > 0 else "-"
    print(f"{args.chars} characters in {seconds:.2f} s ({rate}; {model.config.attention} attention, {how})",
          file=sys.stderr)
    return 0
