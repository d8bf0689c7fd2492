"""Hostile command lines: any argv gives exit 0, 1 or 2 and a message, never a traceback."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from theorylab.claims import CLAIM_IDS, Evidence, Section
from theorylab.cli import main, verify

TOKENS = ["verify", "bench", "env", "--quick", "--extras", "--only", "--out", "--seed", "--json", "--help",
          "attention", "optim", "rnn", "2.1", "4.3a", "9.9", "", "-1", "abc", "1e309", "--", "-", "\x00x", "é"]


@pytest.fixture
def fake_claims(monkeypatch):
    """Replace the real claims by an instant one, so only argument handling is exercised."""

    def instant(seed, quick):
        return Evidence(confirmed=True, numbers={"seed": seed}, method="m")

    real_select = verify.select_sections

    def select(only, extras):
        real_select(only, extras)  # keeps the real validation of IDs
        return [Section(i, "t", "s", "claim", instant) for i in (only or CLAIM_IDS[:1])]

    monkeypatch.setattr(verify, "select_sections", select)
    monkeypatch.setattr("theorylab.cli.bench.run", lambda args, argv: 0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=8)), max_size=6))
def test_any_argv_gives_an_exit_code_not_a_traceback(argv, fake_claims, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a stray relative --out lands in tmp_path
    if "--out" not in argv and argv[:1] == ["verify"]:
        argv += ["--out", str(tmp_path / "o")]
    code = main(argv)
    assert code in (0, 1, 2)
    capsys.readouterr()


@pytest.mark.parametrize("argv, message", [
    (["verify", "--only"], "expected at least one argument"),
    (["verify", "--seed", "x"], "invalid seed 'x'"),
    (["verify", "--seed", "-1"], "invalid seed -1"),  # used to fail inside claim 4.4 after 6 s of training
    (["verify", "--seed", "99999999999999999999999"], "must lie in [0, 4294967295]"),
    (["bench", "rnn", "--quick", "--json", "/proc/theorylab-no/x.json"], "cannot write to the --json file's"),
    (["verify", "--only", "2.1", "nope"], "valid IDs"),
    (["bench"], "required: suite"),
    # an empty --out (an unset shell variable) used to mean the current folder: verify wrote a report there
    (["verify", "--out", ""], "invalid folder ''"),
    (["verify", "--out", "  "], "give a folder name"),
    (["train", "charlm", "--out", ""], "invalid folder ''"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_name_the_problem(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("out", ["bad\x00name", "/proc/version/sub"])
def test_impossible_out_is_refused(out, capsys):
    assert main(["verify", "--only", "2.2", "--out", out]) == 2
    assert "cannot write to output folder" in capsys.readouterr().err


def test_out_pointing_at_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep me")
    assert main(["verify", "--only", "2.2", "--out", str(f)]) == 2
    assert f"output folder {str(f)!r} is a file, not a folder" in capsys.readouterr().err
    assert f.read_text(encoding="utf-8") == "keep me"


def test_a_second_run_into_a_busy_out_is_refused_and_the_lock_is_released(fake_claims, tmp_path, capsys):
    """Two runs into one --out interleaved their writes; a run now holds the folder (flock) while it works."""
    from theorylab.cli._args import exclusive_output

    out = tmp_path / "o"
    out.mkdir()
    with exclusive_output(out):  # as another run would hold it
        assert main(["verify", "--only", "2.2", "--out", str(out)]) == 2
        assert "another theorylab run is writing into" in capsys.readouterr().err
        assert not (out / "results.json").exists()
    assert main(["verify", "--only", "2.2", "--out", str(out)]) == 0  # released when the holder ends
    assert (out / "results.json").exists()
    assert main(["verify", "--only", "2.2", "--out", str(out)]) == 0  # and by a run that ended
    assert sorted(p.name for p in out.iterdir()) == sorted(["results.json", "report.html"])  # no lock file


def test_only_given_twice_runs_both_lists(fake_claims, tmp_path, capsys):
    """A second --only silently replaced the first: '--only 2.1 --only 2.2' ran 2.2 alone and exited 0."""
    import json

    assert main(["verify", "--only", "2.1", "--only", "2.2", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert [c["id"] for c in results["claims"]] == ["2.1", "2.2"]


def test_an_interrupt_before_anything_is_written_renders_no_stale_report(fake_claims, tmp_path, capsys, monkeypatch):
    """Ctrl-C before the first results.json write rendered an earlier run's complete results as 'partial'."""
    from theorylab.claims import engine

    assert main(["verify", "--only", "2.1", "--out", str(tmp_path)]) == 0
    before = (tmp_path / "report.html").read_bytes()

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "environment", interrupted)
    capsys.readouterr()
    assert main(["verify", "--only", "2.1", "--out", str(tmp_path)]) == 130
    assert "before any result was written" in capsys.readouterr().err
    assert (tmp_path / "report.html").read_bytes() == before


def test_a_folder_that_cannot_be_locked_runs_unlocked_with_a_warning(fake_claims, tmp_path, capsys, monkeypatch):
    """NFS refuses an exclusive flock on a folder (EBADF), and a folder that can be written but not read cannot be
    opened: both escaped as tracebacks. They now run as before locks existed, saying so."""
    import errno

    from theorylab.cli import _args

    def refused(fd, op):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(_args.fcntl, "flock", refused)
    assert main(["verify", "--only", "2.2", "--out", str(tmp_path)]) == 0
    assert "cannot lock" in capsys.readouterr().err
