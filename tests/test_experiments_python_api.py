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
