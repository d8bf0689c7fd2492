"""The command line, end to end in subprocesses (as a user runs it) and in-process for exit codes."""

import json
import os
import subprocess
import sys

import pytest

from theorylab.cli import main


def theorylab(*args, cwd=None, **env_extra):
    env = {**os.environ, "CI": "1", **env_extra}
    return subprocess.run([sys.executable, "-m", "theorylab", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_verify_quick_q2_end_to_end(tmp_path):
    out = tmp_path / "report"
    # matplotlib's own cache folder: with an unwritable HOME it warns on stderr, which is not ours to test
    proc = theorylab("verify", "--quick", "--only", "2.1", "2.2", "2.3", "--out", str(out),
                     MPLCONFIGDIR=str(tmp_path / "mpl"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [c["verdict"] for c in results["claims"]] == ["confirmed"] * 3
    assert results["environment"]["quick"] is True and results["complete"] is True
    figures = [f for c in results["claims"] for f in c["figures"]]
    assert len(figures) == 3
    page = (out / "report.html").read_text(encoding="utf-8")
    for f in figures:
        assert (out / f).stat().st_size > 5000 and f'src="{f}"' in page
    assert "3/3 confirmed" in proc.stdout
    assert proc.stderr == ""  # no progress bar off a terminal


def test_unknown_claim_id_lists_valid_ids(tmp_path):
    proc = theorylab("verify", "--only", "2.1", "9.9", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert "9.9" in proc.stderr and "valid IDs: 1.1, 1.2, 1.3, 2.1" in proc.stderr
    assert not (tmp_path / "results.json").exists()


def test_unwritable_out_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = theorylab("verify", "--only", "2.2", "--out", str(blocker / "sub"))
    assert proc.returncode == 2
    assert "cannot write to output folder" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args", [["--help"], ["verify", "--help"], ["bench", "--help"], ["env", "--help"]])
def test_help(args):
    assert main(args) == 0


def test_bad_arguments_exit_2(capsys):
    assert main(["verify", "--seed", "abc"]) == 2
    assert main(["nonsense"]) == 2
    assert main(["bench", "nosuchsuite"]) == 2


def test_env_prints_versions(capsys):
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert "torch" in text and "torch_threads" in text
    assert main(["env", "--json"]) == 0
    assert "versions" in json.loads(capsys.readouterr().out)


def test_exit_1_when_a_claim_is_not_confirmed(tmp_path, monkeypatch):
    from theorylab.claims import Evidence, Section
    from theorylab.cli import verify

    def refuted(seed, quick):
        return Evidence(confirmed=False, numbers={"x": 1.0}, method="m")

    monkeypatch.setattr(verify, "select_sections",
                        lambda only, extras: [Section("2.1", "t", "s", "claim", refuted)])
    assert main(["verify", "--out", str(tmp_path)]) == 1
    assert json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["claims"][0]["verdict"] == "refuted"
    assert (tmp_path / "report.html").exists()


def test_python_dash_m_and_console_script_agree():
    proc = theorylab("--help")
    assert proc.returncode == 0 and "verify" in proc.stdout
