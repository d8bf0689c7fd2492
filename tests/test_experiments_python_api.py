"""The training experiments driven from Python: checks before training, folders, checkpoints, dtypes."""

import pathlib

import numpy as np
import pytest
import torch

from theorylab import experiments
from theorylab.experiments import (
    CharLMConfig,
    CharTransformer,
    load_trained_model,
    read_resume_checkpoint,
    save_checkpoint,
    train_charlm,
)
from theorylab.experiments.trainer import lm_loss

TINY = {"seq_len": 16, "layers": 1, "width": 16, "heads": 2, "batch_size": 4, "num_features": 8, "warmup": 1}


def _config(**kw):
    return CharLMConfig(**{**TINY, **kw})


@pytest.mark.parametrize("kwargs, error, match", [
    ({"eval_chars": 1}, ValueError, "eval_chars must be >= 2, got 1"),
    ({"steps": 2.5}, TypeError, "steps must be an integer; got 2.5"),
    ({"steps": 0}, ValueError, "steps must be >= 1"),
    ({"eval_every": True}, TypeError, "eval_every must be an integer"),
    ({"config": {"seq_len": 16}}, TypeError, r"config must be a CharLMConfig \(CharLMConfig.from_dict"),
])
def test_arguments_are_checked_before_anything_trains(kwargs, error, match, tmp_path, monkeypatch):
    """eval_chars=1 had failed after the whole run, losing the steps since the last checkpoint."""
    from theorylab.experiments import trainer

    monkeypatch.setattr(trainer, "_train", lambda *a, **k: pytest.fail("trained before the check"))
    args = {"config": _config(), "steps": 3, **kwargs}
    with pytest.raises(error, match=match):
        train_charlm(args.pop("config"), args.pop("steps"), out_dir=tmp_path, **args)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_holding_a_run_is_not_overwritten_without_asking(tmp_path):
    """A second run into the folder had replaced the first one's checkpoint, and an interrupted one left a folder
    whose metrics and checkpoint were of different runs."""
    first = train_charlm(_config(), 2, out_dir=tmp_path)
    with pytest.raises(ValueError, match="checkpoint.pt' exists: pass resume_from=read_resume_checkpoint"):
        train_charlm(_config(attention="favor"), 2, out_dir=tmp_path)
    assert read_resume_checkpoint(tmp_path)["config"]["attention"] == "softmax"
    resumed = train_charlm(_config(), 3, out_dir=tmp_path, resume_from=read_resume_checkpoint(tmp_path))
    assert resumed.metrics["resumed_from_step"] == 2 and first.metrics["steps"] == 2
    again = train_charlm(_config(attention="favor"), 2, out_dir=tmp_path, overwrite=True)
    assert again.metrics["config"]["attention"] == "favor"
    model, vocab = load_trained_model(tmp_path / "checkpoint.pt")  # the file itself, as `theorylab sample` takes
    assert model.config.attention == "favor" and len(vocab) > 10


def test_training_inside_no_grad_still_trains(tmp_path):
    """Called inside torch.no_grad() it had failed with autograd's 'element 0 of tensors does not require grad'."""
    plain = train_charlm(_config(), 2)
    with torch.no_grad():
        inside = train_charlm(_config(), 2)
    for a, b in zip(plain.model.parameters(), inside.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_float64_models_loss_is_float64():
    """.float() had cast float64 logits down: gradcheck through the loss failed."""
    torch.manual_seed(0)
    model = CharTransformer(7, _config(width=8, heads=2, seq_len=4)).double()
    x, y = torch.randint(0, 7, (2, 4)), torch.randint(0, 7, (2, 4))
    assert model.loss(x, y).dtype == torch.float64
    assert lm_loss(model(x), y).dtype == torch.float64
    assert lm_loss(model(x).to(torch.bfloat16), y).dtype == torch.float32  # half precision is still widened
    assert torch.autograd.gradcheck(lambda logits: lm_loss(logits, y), (model(x).detach().requires_grad_(),))


@pytest.mark.parametrize("payload, where", [
    ({"config": _config()}, r"payload\['config'\] is a CharLMConfig"),
    ({"path": pathlib.Path(".")}, r"payload\['path'\] is a PosixPath|payload\['path'\] is a WindowsPath"),
    ({"nested": {"x": [1, np.zeros(2)]}}, r"payload\['nested'\]\['x'\]\[1\] is a ndarray"),
])
def test_save_checkpoint_refuses_what_the_load_would_refuse(payload, where, tmp_path):
    """Such payloads were written, then refused by load_checkpoint as 'corrupt or not a checkpoint'."""
    with pytest.raises(TypeError, match=where):
        save_checkpoint(tmp_path / "c.pt", payload)
    assert not (tmp_path / "c.pt").exists()
    with pytest.raises(TypeError, match="payload must be a dict; got list"):
        save_checkpoint(tmp_path / "c.pt", [1])


def test_what_the_docstrings_reference_is_exported():
    assert experiments.read_resume_checkpoint is read_resume_checkpoint
    assert experiments.StepInfo.__name__ == "StepInfo"
    assert "num_features" in CharLMConfig.__doc__ and "Attributes" in experiments.TrainResult.__doc__


def test_the_metrics_record_the_dtype_the_default_dtype_decided():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        result = train_charlm(_config(), 1)
    finally:
        torch.set_default_dtype(previous)
    assert result.metrics["dtype"] == "float64" and train_charlm(_config(), 1).metrics["dtype"] == "float32"


def test_overwrite_pairs_its_barriers_on_every_rank_whatever_each_sees(tmp_path, monkeypatch):
    """Under torchrun the CLI had removed the old run on rank 0 before train_charlm looked: rank 1, still seeing
    it, entered barriers that rank 0 skipped, and the job hung with the old run already deleted."""
    from theorylab.experiments import trainer

    calls = []
    monkeypatch.setattr(trainer, "barrier", lambda env: calls.append("barrier"))
    monkeypatch.setattr(trainer, "_train", lambda *a, **k: calls.append("train"))
    for existing in (True, False):
        calls.clear()
        if existing:
            (tmp_path / "checkpoint.pt").write_bytes(b"x")
        train_charlm(_config(), 2, out_dir=tmp_path, overwrite=True)
        assert calls == ["barrier", "barrier", "train"] and not (tmp_path / "checkpoint.pt").exists()
    with pytest.raises(ValueError, match="resume_from and overwrite=True contradict"):
        train_charlm(_config(), 2, out_dir=tmp_path, overwrite=True, resume_from={"config": _config().to_dict(),
                                                                                  "step": 1})


def test_load_trained_model_loads_the_file_it_is_given(tmp_path):
    """A file of another name had been taken for its folder, and the folder's checkpoint.pt loaded instead."""
    train_charlm(_config(), 1, out_dir=tmp_path)
    (tmp_path / "checkpoint.pt").rename(tmp_path / "softmax_run.pt")
    train_charlm(_config(attention="favor"), 1, out_dir=tmp_path, overwrite=True)
    assert load_trained_model(tmp_path / "softmax_run.pt")[0].config.attention == "softmax"
    assert load_trained_model(tmp_path)[0].config.attention == "favor"


def test_a_swapped_models_config_rebuilds_it():
    """After swap_attention, config still said the old kind: a checkpoint of it reloaded another model."""
    from theorylab.attention import swap_attention

    torch.manual_seed(0)
    model = CharTransformer(11, _config(layers=2))
    swap_attention(model, "favor", num_features=8, seed=1)
    assert model.config.attention == "favor" and model.config.num_features == 8
    again = CharTransformer(11, model.config)
    again.load_state_dict(model.state_dict())
    x = torch.randint(0, 11, (2, 16))
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    swap_attention(model.blocks[0], "linear")  # one block alone: no config describes the model
    with pytest.raises(ValueError, match="attention kinds differ"):
        _ = model.config


def test_training_inside_inference_mode_still_trains():
    with torch.inference_mode():
        result = train_charlm(_config(), 1)
    assert all(not p.is_inference() for p in result.model.parameters())


@pytest.mark.parametrize("value", [np.float64(2.5), (lambda: __import__("collections").namedtuple("P", "a")(1))(),
                                   __import__("collections").defaultdict(list), {1}, b"x", bytearray(b"x"), 1j])
def test_save_checkpoint_refuses_subclasses_the_load_refuses(value, tmp_path):
    """np.float64 (a float), namedtuples (tuples) and defaultdicts (dicts) passed isinstance and were written; sets,
    bytes and complex numbers load on torch 2.13 but not on 2.4, which the package supports."""
    with pytest.raises(TypeError, match=r"payload\['x'\] is a"):
        save_checkpoint(tmp_path / "c.pt", {"x": value})


def test_save_checkpoint_takes_what_the_load_takes(tmp_path):
    from theorylab.experiments import load_checkpoint

    payload = {"t": (1, [2.5, "x"]), "d": torch.float16, 1.5: "float key", (1, 2): "tuple key", None: 0}
    save_checkpoint(tmp_path / "c.pt", payload)
    assert load_checkpoint(tmp_path / "c.pt") == payload
