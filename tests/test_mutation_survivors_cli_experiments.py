"""Tests written for mutants of the CLI (_args, verify, train), checkpoints, the char corpus and the RNN tasks that
the rest of the suite let through: each pins down one behaviour that a plausible one-line change broke silently."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from theorylab.claims import Evidence, Section
from theorylab.cli import _args, main, verify

TINY = ["--seq-len", "16", "--layers", "1", "--width", "16", "--heads", "2", "--num-features", "8",
        "--batch-size", "4", "--warmup", "2", "--eval-chars", "300", "--threads", "1"]


def charlm(out, *extra: str) -> int:
    return main(["train", "charlm", "--out", str(out), *TINY, *extra])


@pytest.fixture
def fake_sections(monkeypatch):
    """Replace the claims by instant ones: ``set(kind -> [fn, ...])`` picks what ``verify`` runs; each call of a claim
    is recorded as (seed, quick)."""
    calls: list[tuple[int, bool]] = []
    chosen: list[Section] = []

    def confirmed(seed, quick):
        calls.append((seed, quick))
        return Evidence(confirmed=True, numbers={"seed": seed}, method="m")

    def select(only, extras):
        return list(chosen) or [Section("2.1", "t", "s", "claim", confirmed)]

    monkeypatch.setattr(verify, "select_sections", select)
    return calls, chosen, confirmed


# ------------------------------------------------------------------------------------------------------- _args
def test_seed_accepts_both_ends_of_its_range():
    """--seed takes 0 and 2**32 - 1 (both ends of numpy's range) and refuses 2**32."""
    assert _args.seed("0") == 0
    assert _args.seed(str(2**32 - 1)) == 2**32 - 1 == _args.MAX_SEED
    with pytest.raises(Exception, match="must lie in"):
        _args.seed(str(2**32))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc (a folder even root cannot write)")
def test_an_existing_folder_that_cannot_be_written_is_refused():
    """check_writable writes a probe file: an existing folder whose files cannot be created is not 'writable'."""
    assert _args.check_writable(Path("/proc/self")) is not None


@pytest.mark.skipif(_args.fcntl is None or not os.path.isdir("/proc/self/fd"), reason="needs flock and /proc")
def test_a_folder_that_cannot_be_locked_leaks_no_file_descriptor(tmp_path, monkeypatch):
    """When flock fails (NFS), the folder's descriptor is closed at once, not leaked for every run."""
    import errno

    def refused(fd, op):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(_args.fcntl, "flock", refused)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with _args.exclusive_output(tmp_path):
            pass
    assert len(os.listdir("/proc/self/fd")) == before


# ------------------------------------------------------------------------------------------------------ verify
def test_a_report_html_folder_is_refused_before_any_claim_runs(fake_sections, tmp_path, capsys):
    """verify checks report.html as well as results.json for a folder in the way, before running any claim."""
    calls, _, _ = fake_sections
    (tmp_path / "report.html").mkdir()
    assert main(["verify", "--out", str(tmp_path)]) == 2
    assert "a folder of that name exists" in capsys.readouterr().err
    assert calls == [] and not (tmp_path / "results.json").exists()


def test_exit_1_when_only_some_claims_are_confirmed(fake_sections, tmp_path):
    """One refuted claim among confirmed ones makes verify exit 1, not 0."""
    _, chosen, confirmed = fake_sections
    chosen += [Section("2.1", "t", "s", "claim", confirmed),
               Section("2.2", "t", "s", "claim", lambda seed, quick: Evidence(False, {"x": 1.0}, "m"))]
    assert main(["verify", "--out", str(tmp_path)]) == 1


def test_a_refuted_extra_section_makes_verify_exit_1(fake_sections, tmp_path, capsys):
    """Extras count toward the exit code and the summary: all claims confirmed but an extra refuted exits 1."""
    _, chosen, confirmed = fake_sections
    chosen += [Section("2.1", "t", "s", "claim", confirmed),
               Section("rnn-x", "t", "s", "extra", lambda seed, quick: Evidence(False, {"x": 1.0}, "m"))]
    assert main(["verify", "--extras", "--out", str(tmp_path)]) == 1
    assert "1/2 confirmed" in capsys.readouterr().out


def test_results_record_the_command_line_and_the_options(fake_sections, tmp_path):
    """results.json names the command as typed ('theorylab verify ...'); --seed and --quick reach the claims."""
    calls, _, _ = fake_sections
    argv = ["verify", "--out", str(tmp_path), "--seed", "7", "--quick"]
    assert main(argv) == 0
    env = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["environment"]
    assert env["command"] == " ".join(["theorylab", *argv])
    assert env["seed"] == 7 and env["quick"] is True and calls == [(7, True)]


def test_verify_defaults_to_seed_0_and_full_size(fake_sections, tmp_path):
    """Without --seed and --quick the claims run with seed 0 at full size."""
    calls, _, _ = fake_sections
    assert main(["verify", "--out", str(tmp_path)]) == 0
    env = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["environment"]
    assert calls == [(0, False)] and env["seed"] == 0 and env["quick"] is False


def test_an_interrupted_run_renders_the_report_of_its_finished_claims(fake_sections, tmp_path, capsys):
    """Ctrl-C after a finished claim exits 130 and writes report.html with that claim (the partial results)."""
    _, chosen, confirmed = fake_sections

    def interrupt(seed, quick):
        raise KeyboardInterrupt

    chosen += [Section("2.1", "t", "s", "claim", confirmed), Section("2.2", "t", "s", "claim", interrupt)]
    assert main(["verify", "--out", str(tmp_path)]) == 130
    assert "partial results" in capsys.readouterr().err
    assert (tmp_path / "report.html").exists()
    assert [c["id"] for c in json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["claims"]] == ["2.1"]



# ------------------------------------------------------------------------------------------------------- train
@pytest.fixture
def fake_training(monkeypatch):
    """Replace train_charlm by one that records (steps, keyword arguments) and returns at once."""
    from types import SimpleNamespace

    from theorylab.experiments import trainer

    calls: list[tuple[int, dict]] = []

    def record(config, steps, **kw):
        calls.append((steps, kw))
        return SimpleNamespace(metrics={"steps": steps, "final_bpc": 1.0, "unigram_bpc": 4.0,
                                        "tokens_per_second": 1.0, "world_size": 1})

    monkeypatch.setattr(trainer, "train_charlm", record)
    return calls


def test_zero_checkpoint_and_eval_intervals_are_accepted(fake_training, tmp_path):
    """--checkpoint-every 0 and --eval-every 0 mean 'only at the end': valid, passed through as 0."""
    assert charlm(tmp_path, "--steps", "2", "--checkpoint-every", "0", "--eval-every", "0") == 0
    (steps, kw), = fake_training
    assert steps == 2 and kw["checkpoint_every"] == 0 and kw["eval_every"] == 0


def test_eval_chars_below_two_is_a_usage_error(fake_training, tmp_path, capsys):
    """--eval-chars 1 (no prediction to score) exits 2 naming the option, before training; 2 is accepted."""
    assert charlm(tmp_path / "a", "--steps", "1", "--eval-chars", "1") == 2
    assert "--eval-chars must be >= 2" in capsys.readouterr().err and fake_training == []
    assert charlm(tmp_path / "b", "--steps", "1", "--eval-chars", "2") == 0
    assert fake_training[0][1]["eval_chars"] == 2


def test_a_fresh_run_has_the_documented_defaults(fake_training, tmp_path):
    """Without options: 300 steps, a checkpoint every 100 steps, held-out eval only at the end, on all of it."""
    assert main(["train", "charlm", "--out", str(tmp_path)]) == 0
    (steps, kw), = fake_training
    assert steps == 300 and kw["checkpoint_every"] == 100 and kw["eval_every"] == 0 and kw["eval_chars"] is None


def test_threads_may_use_every_available_core(fake_training, tmp_path, capsys):
    """--threads N is accepted up to the CPUs this process may use (inclusive); one more is a usage error."""
    from theorylab.experiments.distributed import available_cores

    cpus = available_cores()
    before = torch.get_num_threads()
    assert charlm(tmp_path / "a", "--steps", "1", "--threads", str(cpus)) == 0
    assert torch.get_num_threads() == before
    assert charlm(tmp_path / "b", "--steps", "1", "--threads", str(cpus + 1)) == 2
    assert f"--threads must lie in [1, {cpus}]" in capsys.readouterr().err


def test_resume_and_overwrite_together_are_refused_and_keep_the_run(tmp_path, capsys):
    """--resume --overwrite is a usage error (exit 2): the checkpoint is neither resumed nor deleted."""
    assert charlm(tmp_path, "--steps", "1") == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    capsys.readouterr()
    assert charlm(tmp_path, "--resume", "--overwrite") == 2
    assert "--resume and --overwrite contradict each other" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_finished_run_can_be_resumed_at_its_own_target(tmp_path, capsys):
    """--resume of a run already at its target step (no --steps) exits 0 and says there is nothing to train; it had
    rewritten the checkpoint and metrics and printed the old result as if it had trained."""
    assert charlm(tmp_path, "--steps", "2") == 0
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    capsys.readouterr()
    assert charlm(tmp_path, "--resume") == 0
    assert "already at step 2; nothing to train" in capsys.readouterr().out
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()} == before
    assert charlm(tmp_path, "--resume", "--steps", "3") == 0  # extending it still trains
    assert json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))["resumed_from_step"] == 2


def test_resume_takes_the_checkpoints_target_and_options_unless_given(tmp_path, monkeypatch):
    """A resumed run trains to the checkpoint's target steps with its saved options; an option given now wins."""
    from types import SimpleNamespace

    from theorylab.experiments import trainer

    assert charlm(tmp_path, "--steps", "3", "--checkpoint-every", "1", "--eval-every", "1") == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    ckpt["step"] = 1  # as if the run had been interrupted after its first checkpoint
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    calls = []

    def record(config, steps, **kw):
        calls.append((steps, kw))
        return SimpleNamespace(metrics={"steps": steps, "final_bpc": 1.0, "unigram_bpc": 4.0,
                                        "tokens_per_second": 1.0, "world_size": 1})

    monkeypatch.setattr(trainer, "train_charlm", record)
    assert main(["train", "charlm", "--out", str(tmp_path), "--resume", "--eval-every", "2"]) == 0
    (steps, kw), = calls
    assert steps == 3 and kw["resume_from"]["step"] == 1
    assert kw["checkpoint_every"] == 1 and kw["eval_every"] == 2 and kw["eval_chars"] == 300


def test_the_progress_of_a_resumed_run_starts_at_its_checkpoint_step(fake_training, tmp_path, monkeypatch):
    """On a terminal the progress bar of a resumed run starts at the checkpoint's step, out of the new target."""
    from rich.progress import Progress

    from theorylab.cli import train as train_cli
    from theorylab.experiments.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "checkpoint.pt", {"step": 2})
    monkeypatch.setattr("theorylab.experiments.trainer.read_resume_checkpoint",
                        lambda out: {"step": 2, "target_steps": 2, "config": {}})
    bars: list[Progress] = []
    monkeypatch.setattr(train_cli, "_progress_bar", lambda main: bars.append(Progress(disable=True)) or bars[-1])
    assert main(["train", "charlm", "--out", str(tmp_path), "--resume", "--steps", "5"]) == 0
    (task,) = bars[0].tasks
    assert task.completed == 2 and task.total == 5


# -------------------------------------------------------------------------------------------------- checkpoint
def test_a_checkpoint_is_fsynced_and_renamed_from_a_temporary_file_beside_it(tmp_path, monkeypatch):
    """save_checkpoint writes a temporary file in the target's own folder, fsyncs it, then renames it into place."""
    from theorylab.experiments import checkpoint

    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append((Path(a), Path(b))), real_replace(a, b))[1])
    checkpoint.save_checkpoint(tmp_path / "c.pt", {"format": "x"})
    assert len(synced) == 1
    (tmp, final), = renamed
    assert final == tmp_path / "c.pt" and tmp.parent == tmp_path  # same folder: the rename is atomic


def test_an_interrupted_checkpoint_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) while a checkpoint is written keeps the old one and leaves no temporary file."""
    from theorylab.experiments import checkpoint

    checkpoint.save_checkpoint(tmp_path / "c.pt", {"format": "x", "n": 1})
    before = (tmp_path / "c.pt").read_bytes()

    def interrupted(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path / "c.pt", {"format": "x", "n": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"] and (tmp_path / "c.pt").read_bytes() == before


def test_a_folder_in_place_of_a_checkpoint_is_no_checkpoint(tmp_path):
    """load_checkpoint on a folder says there is no checkpoint there (not that a file is corrupt)."""
    from theorylab.experiments.checkpoint import CheckpointError, load_checkpoint

    (tmp_path / "checkpoint.pt").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "checkpoint.pt")



def test_a_checkpoint_that_is_not_a_dict_is_refused(tmp_path):
    """load_checkpoint refuses a file holding a list (weights-only loadable, but not a checkpoint dict)."""
    from theorylab.experiments.checkpoint import CheckpointError, load_checkpoint

    torch.save([1, 2, 3], tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a dict"):
        load_checkpoint(tmp_path / "c.pt")


class _Opaque:
    pass


def test_a_refused_pickle_is_reported_by_its_reason_only(tmp_path):
    """A checkpoint holding an arbitrary object is refused with the unpickler's reason, not torch's advice to
    load it unsafely."""
    from theorylab.experiments.checkpoint import CheckpointError, load_checkpoint

    torch.save({"format": "x", "obj": _Opaque()}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "c.pt")
    text = str(info.value)
    assert "Unsupported global" in text and "_Opaque" in text and "can still be loaded" not in text


def test_save_checkpoint_creates_missing_folders(tmp_path):
    """save_checkpoint creates the checkpoint's folder (and its parents) when they do not exist yet."""
    from theorylab.experiments.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint(tmp_path / "a" / "b" / "c.pt", {"format": "x", "n": 3})
    assert load_checkpoint(tmp_path / "a" / "b" / "c.pt", expected_format="x")["n"] == 3


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="no POSIX modes")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_a_checkpoint_gets_the_mode_an_ordinary_file_would(tmp_path, umask, mode):
    """checkpoint.pt is created 0666 minus the umask (as the report beside it), not mkstemp's 0600."""
    import stat

    from theorylab.experiments.checkpoint import save_checkpoint

    old = os.umask(umask)
    try:
        save_checkpoint(tmp_path / "c.pt", {"format": "x"})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "c.pt").stat().st_mode) == mode


# ------------------------------------------------------------------------------------------------- char corpus
def test_topic_groups_compare_the_last_window_of_each_topic():
    """Two topics sharing only their final span characters (a whole topic of exactly span characters) are grouped."""
    from theorylab.experiments import data

    assert data.topic_groups({"a": "abcdef", "b": "xxabcdef"}, span=6) == [["a", "b"]]


def test_held_out_groups_stop_once_the_target_is_reached_exactly():
    """split_topics stops as soon as the held-out characters reach the target (>=), adding no further group."""
    from theorylab.experiments import data

    topics = {"a": "a" * 9, "b": "b", "c": "c" * 10}  # 20 characters; target 10 = all of 'c'
    assert data.split_topics(topics, 0.5) == (["a", "b"], ["c"])


def test_a_split_never_holds_out_every_topic():
    """split_topics keeps at least one topic for training, even when holding out all would meet the fraction."""
    from theorylab.experiments import data

    assert data.split_topics({"a": "a" * 50, "b": "b" * 50}, 0.99) == (["a"], ["b"])
    with pytest.raises(ValueError, match="holds out nothing"):
        data.split_topics({"a": "a" * 10}, 0.9)


def test_vocabulary_characters_must_be_distinct():
    """CharVocab refuses a character list with a repeat (ids would be ambiguous)."""
    from theorylab.experiments.data import CharVocab

    with pytest.raises(ValueError, match="distinct"):
        CharVocab("abca")


def test_load_corpus_refuses_a_held_out_fraction_of_one():
    """heldout_fraction lies in the open interval (0, 1): 1.0 is refused with that message."""
    from theorylab.experiments.data import load_corpus

    with pytest.raises(ValueError, match=r"heldout_fraction must be in \(0, 1\)"):
        load_corpus(1.0)


def test_the_corpus_hash_covers_both_sides_of_the_split():
    """CharCorpus.sha256 is of the training and the held-out text (another split gives another hash)."""
    import hashlib

    from theorylab.experiments.data import load_corpus

    corpus = load_corpus()
    train, heldout = corpus.vocab.decode(corpus.train), corpus.vocab.decode(corpus.heldout)
    assert corpus.sha256 == hashlib.sha256(f"{train}\0{heldout}".encode()).hexdigest()
    assert corpus.sha256 != hashlib.sha256(train.encode()).hexdigest()


def test_sample_batch_can_draw_the_last_window_of_the_text():
    """Every window start 0 .. N - seq_len - 1 can be drawn, the last one included."""
    from theorylab.experiments.data import sample_batch

    tokens = torch.arange(10)
    starts = {int(x[0]) for step in range(20) for x in sample_batch(tokens, 8, 8, seed=0, step=step)[0]}
    assert starts == {0, 1}


def test_a_text_exactly_seq_len_long_is_too_short():
    """A text of seq_len characters has no window of seq_len + 1: ValueError naming it, not a torch error."""
    from theorylab.experiments.data import sample_batch

    with pytest.raises(ValueError, match="too long"):
        sample_batch(torch.arange(8), 4, 8, seed=0, step=0)
    assert sample_batch(torch.arange(9), 4, 8, seed=0, step=0)[0].shape == (4, 8)


# ------------------------------------------------------------------------------------------------------ rnn tasks
def test_adding_markers_reach_both_ends_of_their_halves():
    """The first marker can fall on step 0 and the second on the last step T - 1."""
    from theorylab.rnn.tasks import adding_problem

    x, _ = adding_problem(2000, 6, torch.Generator().manual_seed(0))
    marked = x[..., 1].sum(0)  # (T,) how often each step is marked
    assert (marked > 0).all()


def test_the_copy_task_needs_at_least_one_step():
    """copy_memory refuses T < 1 (the delimiter would overwrite the last symbol)."""
    from theorylab.rnn.tasks import copy_memory

    with pytest.raises(ValueError, match="T >= 1"):
        copy_memory(3, 0, torch.Generator())


def test_copy_symbols_use_all_eight_categories():
    """The copied symbols are drawn from all 8 categories 1..8 (the baseline assumes 8)."""
    from theorylab.rnn.tasks import COPY_SYMBOLS, copy_memory

    _, y = copy_memory(200, 3, torch.Generator().manual_seed(0))
    assert set(y[:, -10:].unique().tolist()) == set(range(1, COPY_SYMBOLS + 1))


def test_digits_split_depends_on_its_seed():
    """digits_sequences(seed) shuffles by its seed: 1347 training and 450 test images, another order per seed."""
    from theorylab.rnn.tasks import digits_sequences

    a, b = digits_sequences(0), digits_sequences(1)
    assert len(a[1]) == len(b[1]) == 1347 and len(a[3]) == 450
    assert not torch.equal(a[1], b[1])


def test_train_is_reproducible_from_its_seed():
    """train(seed=s) gives the same result twice whatever ran before (it seeds the initial weights too)."""
    from theorylab.rnn.tasks import train

    first = train("adding", 4, hidden=4, iterations=2, batch=4, seed=3)
    torch.rand(5)  # moves torch's global generator
    assert train("adding", 4, hidden=4, iterations=2, batch=4, seed=3) == first


def test_digits_are_scored_on_the_held_out_images(monkeypatch):
    """The digits metric is the accuracy on the test split, never on training images."""
    from theorylab.rnn import tasks

    x = torch.rand(40, 64, 1)
    zeros, ones = torch.zeros(20, dtype=torch.long), torch.ones(20, dtype=torch.long)
    monkeypatch.setattr(tasks, "digits_sequences", lambda seed=0: (x[:20], zeros, x[20:], ones))  # train 0, test 1
    r = tasks.train("digits", 64, hidden=4, iterations=30, batch=8, lr=0.1)
    assert r.metric == 0.0 and not r.solved


def test_orthogonal_init_zeroes_the_recurrent_bias():
    """orthogonal=True starts from an orthogonal W and a zero bias b."""
    from theorylab.rnn.tasks import SequenceModel

    model = SequenceModel(2, 8, 1, orthogonal=True)
    assert torch.equal(model.rnn.b.detach(), torch.zeros_like(model.rnn.b))


def test_the_readout_reads_the_squashed_state():
    """SequenceModel's outputs are readout(tanh(h_t)) of the h-form states, at every step or at the last."""
    from theorylab.rnn.tasks import SequenceModel

    torch.manual_seed(0)
    model = SequenceModel(2, 5, 3)
    x = torch.randn(4, 6, 2) * 3
    states, last = model.rnn(x)
    out, h = model(x)
    torch.testing.assert_close(out, model.readout(torch.tanh(last)))
    torch.testing.assert_close(model(x, every_step=True)[0], model.readout(torch.tanh(states)))


def test_train_loss_is_the_mean_of_the_last_ten_losses():
    """TrainResult.train_loss averages the last 10 minibatch losses, so it falls as training goes on."""
    from theorylab.rnn.tasks import train

    kw = dict(hidden=8, batch=16, lr=1e-2, orthogonal=True, clip=1.0)
    short = train("adding", 4, iterations=10, **kw)
    long = train("adding", 4, iterations=60, **kw)
    assert long.train_loss < short.train_loss


def test_an_untrained_copy_model_is_not_solved():
    """After one step the copy task is far from solved (metric > 0.5): solved means metric <= 0.5."""
    from theorylab.rnn.tasks import train

    r = train("copy", 2, hidden=4, iterations=1, batch=4)
    assert r.metric > 0.5 and not r.solved


def test_max_grad_norm_is_the_largest_norm_seen():
    """max_grad_norm is the maximum over all steps, so it never falls below the first step's norm."""
    from theorylab.rnn.tasks import train

    kw = dict(hidden=8, batch=16, lr=3e-2, seed=1)
    first = train("adding", 6, iterations=1, **kw).max_grad_norm
    assert train("adding", 6, iterations=40, **kw).max_grad_norm >= first


def test_batch_generators_of_different_steps_do_not_collide():
    """batch_generator seeds with all 64 bits of the mixed state: steps 1509 and 3732 of seed 0 draw different
    batches (folding the two 32-bit words into one with '|' made them equal)."""
    from theorylab.experiments.data import batch_generator, sample_batch

    assert batch_generator(0, 1509).initial_seed() != batch_generator(0, 3732).initial_seed()
    tokens = torch.arange(10_000)
    assert not torch.equal(sample_batch(tokens, 8, 8, seed=0, step=1509)[0],
                           sample_batch(tokens, 8, 8, seed=0, step=3732)[0])
