"""``python -m theorylab``: the command line of :mod:`theorylab.cli`."""

import sys

try:
    from theorylab.cli import main
except KeyboardInterrupt:  # Ctrl-C while the command line loads (argparse, gettext): as a run interrupted later
    print("theorylab: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
