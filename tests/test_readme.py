"""The README's examples stay true: every ``python`` block runs as printed and does what its comments say, and every
``theorylab`` command it shows parses with the real command line (flags, subcommands, choices)."""

from __future__ import annotations

import ast
import math
import re
import shlex
from pathlib import Path

import pytest
import torch

from theorylab.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text(encoding="utf-8")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
# The README's placeholders in commands, and a value each may take.
PLACEHOLDERS = {"K": "favor", "DIR": "out", "RUN_DIR": "out", "FILE": "out.json", "N": "0", "ID": "1.1"}


def _blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(TEXT) if lang == language]


def _block_importing(name: str) -> str:
    """The one python block that imports ``name`` (found by content, so reordering the README changes nothing)."""
    found = [b for b in _blocks("python") if re.search(rf"\b{name}\b", b.split("\n\n")[0])]
    assert len(found) == 1, f"expected one README python block importing {name}, found {len(found)}"
    return found[0]


def _run(block: str) -> dict:
    """Run a block as printed. The value of each bare expression line (``f(x)   # what it returns``) is kept in
    ``namespace["shown"]`` under the name it calls, so the comments can be checked without computing twice."""
    tree = ast.parse(block)
    for i, node in enumerate(tree.body):
        if isinstance(node, ast.Expr):
            target = ast.Subscript(ast.Name("shown", ast.Load()), ast.Constant(node.lineno), ast.Store())
            tree.body[i] = ast.copy_location(ast.Assign([target], node.value), node)
    namespace: dict = {"__name__": "readme_example", "shown": {}}
    torch.manual_seed(0)
    exec(compile(ast.fix_missing_locations(tree), str(README), "exec"), namespace)
    lines = block.splitlines()
    namespace["shown"] = {lines[n - 1].split("(")[0].strip(): v for n, v in namespace["shown"].items()}
    return namespace


def test_every_python_block_is_covered_below():
    """A new example must get a test of its comments here, not only be run."""
    covered = ("log_jacobian_norms", "momentum_from_running_average", "separable_attention", "swap_attention",
               "decay_param_groups", "count_flops")
    assert len(_blocks("python")) == len(covered)
    for name in covered:
        _block_importing(name)


def test_rnn_example():
    ns = _run(_block_importing("log_jacobian_norms"))
    states, last, shown = ns["states"], ns["last"], ns["shown"]
    assert states.shape == (2, 1000, 256) and last.shape == (2, 256)  # the comment's shapes
    torch.testing.assert_close(last, states[:, -1])
    norms, profile, lyap = shown["log_jacobian_norms"], shown["log_jacobian_profile"], shown["lyapunov_spectrum"]
    assert norms.shape == profile.shape == (2, 1000)  # "(B, T)"
    assert not torch.isnan(norms).any() and not torch.isnan(profile).any()
    assert lyap.shape == (2, 8) and torch.isfinite(lyap).all()  # "(B, 8)"
    assert torch.all(lyap[:, :-1] >= lyap[:, 1:])  # a spectrum: largest first
    cert = shown["certificate"]
    assert cert.delta == pytest.approx(cert.sigma_max * cert.gamma)  # "δ = σ_max(W)·γ"
    assert cert.log_bound(10) == pytest.approx(10 * math.log(cert.delta))  # ".log_bound(T) = T log δ"
    # "sup|σ'| = Φ(√2) + √2 φ(√2) = 1.128904..."
    closed_form = 0.5 * (1 + math.erf(1.0)) + math.sqrt(2.0) * math.exp(-1.0) / math.sqrt(2 * math.pi)
    assert shown["derivative_bound"] == pytest.approx(closed_form, rel=1e-12)
    assert f"{closed_form:.6f}" in _block_importing("log_jacobian_norms")


def test_momentum_example_the_two_optimizers_step_alike():
    ns = _run(_block_importing("momentum_from_running_average"))
    alpha, eps = ns["alpha"], ns["eps"]
    assert alpha == pytest.approx(0.9) and eps == pytest.approx(0.02)  # "(0.9, 0.02) up to rounding"
    model, twin, opt, same = ns["model"], ns["twin"], ns["opt"], ns["same"]
    start = model.weight.detach().clone()
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        xb, yb = torch.randn(32, 64, generator=gen), torch.randint(0, 10, (32,), generator=gen)
        for net, optimizer in ((model, opt), (twin, same)):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(xb), yb).backward()
            optimizer.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (model.weight - start).abs().max() > 1e-3  # they trained: equal because equivalent, not because idle


def test_attention_example():
    ns = _run(_block_importing("separable_attention"))
    for name in ("exact", "approx", "mix"):
        assert ns[name].shape == (2, 8, 4096, 64), name
        assert torch.isfinite(ns[name]).all(), name
    # "≈ exact to ~11%": the example once drew q = k = v, where FAVOR+ is 88% off and a newcomer who checked
    # would have thought it broken
    rel = float((ns["approx"] - ns["exact"]).abs().mean() / ns["exact"].abs().mean())
    assert 0.05 < rel < 0.15, rel
    mha = ns["mha"]
    assert mha(torch.randn(2, 10, 512)).shape == (2, 10, 512)  # "batch first"
    # decoding: the last position through the state equals that position of one causal call
    from theorylab.attention import linear_attention

    whole = linear_attention(ns["q"], ns["k"], ns["v"], ns["fm"], causal=True)
    assert ns["out"].shape == (2, 8, 4095, 64) and ns["state"].length == 4096
    torch.testing.assert_close(ns["last"], whole[:, :, 4095:], atol=1e-5, rtol=1e-5)


def test_attention_example_padding_is_ignored():
    """"True = padding, ignored": the padded batch row equals attention over the truncated sequence."""
    from theorylab.attention import softmax_attention

    q = k = v = torch.randn(1, 2, 40, 8, dtype=torch.float64)
    pad = torch.zeros(1, 40, dtype=torch.bool)
    pad[0, 30:] = True
    padded = softmax_attention(q, k, v, causal=True, key_padding_mask=pad)
    truncated = softmax_attention(q[:, :, :30], k[:, :, :30], v[:, :, :30], causal=True)
    torch.testing.assert_close(padded[:, :, :30], truncated)


def test_swap_attention_example():
    ns = _run(_block_importing("swap_attention"))
    encoder, x, y = ns["encoder"], ns["x"], ns["y"]
    assert y.shape == (2, 2048, 256) and torch.isfinite(y).all()  # the comment's shape
    kinds = {m.attention.kind for m in encoder.modules() if type(m).__name__ == "DropInMultiheadAttention"}
    assert kinds == {"favor"} and not any(isinstance(m, torch.nn.MultiheadAttention) for m in encoder.modules())
    encoder.eval()  # no dropout, so the causal check is exact
    later = x.clone()
    later[:, 1024:] = 0
    mask = torch.nn.Transformer.generate_square_subsequent_mask(2048)
    with torch.no_grad():
        a, b = encoder(x[:1], mask=mask, is_causal=True), encoder(later[:1], mask=mask, is_causal=True)
    torch.testing.assert_close(a[:, :1024], b[:, :1024])  # causal: the second half does not reach the first


def test_weight_decay_example():
    block = _block_importing("decay_param_groups")
    ns = _run(block)
    opt = ns["opt"]
    shown = re.search(r"opt\.transforms\(opt\.param_groups\[0\]\)\s*#\s*(\[.*\])", block)
    assert shown is not None
    assert repr(opt.transforms(opt.param_groups[0])) == shown.group(1)
    decayed, not_decayed = opt.param_groups
    assert decayed["weight_decay"] == 1e-3 and not_decayed["weight_decay"] == 0.0
    model = ns["model"]
    # no decay on biases and on the LayerNorm's weight, decay on the two Linear weights
    assert {id(p) for p in decayed["params"]} == {id(model[0].weight), id(model[3].weight)}


def _commands() -> list[str]:
    """Every ``theorylab`` command line the README shows, in bash blocks and in inline code."""
    found = []
    for body in _blocks("bash"):
        for line in body.replace("\\\n", " ").splitlines():
            found += [seg for seg in line.split("#")[0].split("&&") if re.search(r"\btheorylab (\w)", seg)]
    prose = FENCE.sub("", TEXT)
    found += re.findall(r"`([^`]*\btheorylab (?:verify|bench|train|sample|env)\b[^`]*)`", prose)
    return [" ".join(c.split()) for c in found]


def _argv(command: str) -> list[str]:
    tokens = shlex.split(command)
    start = max(i for i, t in enumerate(tokens) if t.endswith("theorylab")) + 1
    return [PLACEHOLDERS.get(t, t) for t in tokens[start:]]


def test_cost_example():
    ns = _run(_block_importing("count_flops"))
    assert abs(ns["shown"]["fit_power_law"] - 1.0) < 1e-9  # "1.0: linear in n"
    assert ns["shown"]["peak_memory"] == 21295104
    out_bytes = 1 * 8 * 4096 * 64 * 4
    assert out_bytes == 8 * 2**20 < ns["shown"]["peak_memory"]  # "the output's 8 MiB included"


def test_the_readme_shows_commands_of_every_subcommand():
    subcommands = {_argv(c)[0] for c in _commands()}
    assert subcommands == {"verify", "bench", "train", "sample", "env"}


@pytest.mark.parametrize("command", sorted(set(_commands())))
def test_readme_command_parses(command):
    argv = _argv(command)
    if any(t.startswith("[") or "|" in t for t in argv):  # a synopsis: each alternative and each flag must exist
        _check_synopsis(argv)
        return
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:  # argparse's way of refusing
        pytest.fail(f"README command does not parse: theorylab {' '.join(argv)} (exit {e.code})")


def _check_synopsis(argv: list[str]) -> None:
    """A usage line such as ``bench attention|optim|rnn [--quick] [--json FILE]``: its flags and alternatives exist."""
    for token in argv[1:]:
        for word in re.findall(r"[\w-]+", token):
            if word.startswith("--"):
                probe = [argv[0], "--help"] if word == "--help" else [argv[0], word]
                _assert_known_option(probe, word)
            elif "|" in token and not word.isupper():  # alternatives of a positional, e.g. attention|optim|rnn
                _assert_known_option([argv[0], word, "--help"], word)


def _assert_known_option(argv: list[str], word: str) -> None:
    """argparse says "unrecognized arguments" or "invalid choice" for a word it does not know; a missing value is
    a different complaint, so a known flag passes whether or not it takes a value."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        build_parser().parse_args(argv)
    assert "unrecognized arguments" not in err.getvalue(), f"theorylab {argv[0]} has no option {word}"
    assert "invalid choice" not in err.getvalue(), f"theorylab {argv[0]}: {word} is not a choice"
