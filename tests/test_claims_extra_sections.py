"""Sections of one's own (``theorylab.claims.extra``), as a researcher's journey met them (session 28)."""

import json
import os
import warnings

import pytest

from theorylab.claims import Evidence, base, extra
from theorylab.cli import main


@pytest.fixture
def registry(monkeypatch):
    """The registry of extra sections, restored after the test."""
    monkeypatch.setattr(base, "_EXTRAS", dict(base._EXTRAS))
    return base._EXTRAS


def _confirmed(seed: int, quick: bool) -> Evidence:
    return Evidence(True, {"x": 1.0}, "m")


def test_a_section_that_changes_directory_loses_nothing(registry, tmp_path, monkeypatch):
    """os.chdir in a section sent the later writes of a relative --out elsewhere: a FileNotFoundError traceback,
    no report.html, and the finished sections lost."""
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    @extra("cd-check", "A section that changes directory")
    def cd_check(seed: int, quick: bool) -> Evidence:
        os.chdir(elsewhere)
        return Evidence(True, {"x": 1.0}, "m")

    assert main(["verify", "--only", "2.2", "cd-check", "--out", "out"]) == 0
    assert os.getcwd() == str(tmp_path)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["complete"] and [r["id"] for r in results["extras"]] == ["cd-check"]
    assert (tmp_path / "out" / "report.html").exists() and not (elsewhere / "out").exists()


@pytest.mark.parametrize(("args", "error", "message"), [
    ((7, "title"), TypeError, "section_id must be a str; got int"),
    (("t-none", None), TypeError, "title must be a str; got NoneType"),
    (("t", "title", 3.0), TypeError, "statement must be a str"),
    (("adam step", "title"), ValueError, "'adam step' cannot be given to --only"),
    (("a,b", "title"), ValueError, "'a,b' cannot be given to --only"),
    ((" 2.1", "title"), ValueError, "' 2.1' cannot be given to --only"),
    (("--seed", "title"), ValueError, "'--seed' cannot be given to --only"),
    (("", "title"), ValueError, "'' cannot be given to --only"),
])
def test_an_id_or_title_the_run_cannot_use_is_refused_at_registration(registry, args, error, message):
    """A non-string title or ID failed in the summary table after the run (main raised, the exit status lost); an
    ID with a space or comma could never be selected, and " 2.1" ran claim 2.1 in the section's place."""
    with pytest.raises(error, match=message):
        extra(*args)
    assert base._EXTRAS == registry


def test_registering_another_function_under_a_taken_id_warns(registry):
    """A second section registered by mistake under the same ID replaced the first without a word; the same
    function again (a notebook cell run twice) is no mistake."""
    extra("my-check", "First")(_confirmed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extra("my-check", "First, again")(_confirmed)

    def other(seed: int, quick: bool) -> Evidence:
        return Evidence(True, {"y": 1.0}, "m")

    with pytest.warns(UserWarning, match=r"'my-check' \(.*_confirmed\) is replaced by .*other"):
        extra("my-check", "Second")(other)
    assert base._EXTRAS["my-check"].fn is other


def test_a_section_that_leaves_a_deleted_temporary_folder_as_its_directory(registry, tmp_path):
    """Working in a TemporaryDirectory left a working directory that no longer exists: the first restoring version
    failed there (os.getcwd), made that section and every later one errors, and left torch's default dtype
    changed for the caller (the review)."""
    import tempfile

    import torch

    @extra("tmp-cd", "A section that works in a temporary folder")
    def tmp_cd(seed: int, quick: bool) -> Evidence:
        torch.set_default_dtype(torch.float64)
        with tempfile.TemporaryDirectory() as folder:
            os.chdir(folder)
        return Evidence(True, {"x": 1.0}, "m")

    extra("after", "A section after it")(_confirmed)
    here = os.getcwd()
    out = tmp_path / "out"
    assert main(["verify", "--only", "tmp-cd", "after", "--out", str(out)]) == 0
    verdicts = [(r["id"], r["verdict"]) for r in json.loads((out / "results.json").read_text())["extras"]]
    assert verdicts == [("tmp-cd", "confirmed"), ("after", "confirmed")]
    assert os.getcwd() == here and torch.get_default_dtype() == torch.float32


def test_a_section_without_a_statement_registers(registry, tmp_path):
    """None is the usual way to say "no statement", and the report skips it (the review)."""
    extra("no-statement", "A title", None)(_confirmed)
    assert main(["verify", "--only", "no-statement", "--out", str(tmp_path)]) == 0
