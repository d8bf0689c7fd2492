"""The seeded generator of a random feature map travels in its state_dict: a map (or a model holding one) loaded
from a checkpoint redraws exactly what the saved one would have, which a run that redraws its features
periodically (Performers) needs to resume bit for bit."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from theorylab.attention import MultiheadAttention, PositiveRandomFeatures, TrigRandomFeatures, swap_attention

MAPS = [PositiveRandomFeatures, TrigRandomFeatures]


def _saved_and_loaded(state: dict) -> dict:
    """A round trip through torch.save and torch.load(weights_only=True), as a checkpoint makes it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _draws(fm, n: int = 3) -> list[torch.Tensor]:
    out = []
    for _ in range(n):
        fm.redraw()
        out.append(fm.projection.clone())
    return out


@pytest.mark.parametrize("cls", MAPS)
def test_a_loaded_map_redraws_what_the_saved_one_would_have(cls):
    saved = cls(8, 16, seed=7)
    _draws(saved, 2)  # the saved map is mid-sequence
    loaded = cls(8, 16, seed=123)
    loaded.load_state_dict(_saved_and_loaded(saved.state_dict()))
    assert torch.equal(loaded.projection, saved.projection)
    for a, b in zip(_draws(saved), _draws(loaded), strict=True):
        assert torch.equal(a, b)


def test_the_state_dict_holds_only_tensors_and_the_generator_state_is_bytes():
    state = PositiveRandomFeatures(8, 16, seed=7).state_dict()
    assert set(state) == {"projection", "_extra_state"}
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert state["_extra_state"].dtype == torch.uint8 and state["_extra_state"].dim() == 1
    assert PositiveRandomFeatures(8, 16).state_dict()["_extra_state"].numel() == 0  # unseeded: nothing to save


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64])
def test_a_state_dict_cast_to_another_dtype_still_restores_the_generator(dtype):
    """Code that maps .to(dtype) over a checkpoint's values (as moving a model between precisions does) keeps the
    bytes 0..255 exactly in every real dtype."""
    saved = PositiveRandomFeatures(8, 16, seed=7)
    loaded = PositiveRandomFeatures(8, 16, seed=0)
    loaded.load_state_dict({k: v.to(dtype) for k, v in saved.state_dict().items()})
    for a, b in zip(_draws(saved), _draws(loaded), strict=True):
        assert torch.equal(a, b)  # the buffer keeps its dtype; only the loaded first draw was rounded
    assert torch.equal(loaded._generator.get_state(), saved._generator.get_state())


def test_a_state_dict_from_before_the_generator_was_saved_still_loads_strictly():
    """Version 1 (no generator state): loads as it always did, the loaded map keeping its own generator."""
    saved = PositiveRandomFeatures(8, 16, seed=7)
    old = saved.state_dict()
    del old["_extra_state"]
    old._metadata[""]["version"] = 1
    loaded = PositiveRandomFeatures(8, 16, seed=3)
    loaded.load_state_dict(_saved_and_loaded(old))
    assert torch.equal(loaded.projection, saved.projection)
    loaded.redraw()
    assert torch.equal(loaded.projection, _draws(PositiveRandomFeatures(8, 16, seed=3), 1)[0])
    PositiveRandomFeatures(8, 16, seed=3).load_state_dict({"projection": saved.projection})  # hand-built: no version


def test_a_current_state_dict_without_the_generator_state_is_refused_when_strict():
    state = PositiveRandomFeatures(8, 16, seed=7).state_dict()
    del state["_extra_state"]
    with pytest.raises(RuntimeError, match="_extra_state"):
        PositiveRandomFeatures(8, 16, seed=3).load_state_dict(state)


def test_unseeded_and_seeded_states_load_into_each_other():
    """An unseeded map saves no generator (its draws are torch's global generator's): loading that leaves the
    target's own generator. A seeded state loaded into an unseeded map makes it continue the saved sequence."""
    seeded, unseeded = PositiveRandomFeatures(8, 16, seed=7), PositiveRandomFeatures(8, 16)
    target = PositiveRandomFeatures(8, 16, seed=3)
    target.load_state_dict(unseeded.state_dict())
    assert torch.equal(target.projection, unseeded.projection)
    assert torch.equal(_draws(target, 1)[0], _draws(PositiveRandomFeatures(8, 16, seed=3), 1)[0])
    unseeded.load_state_dict(seeded.state_dict())
    assert torch.equal(_draws(unseeded, 1)[0], _draws(seeded, 1)[0])


@pytest.mark.parametrize(("state", "match"), [
    (torch.zeros(2, 3, dtype=torch.uint8), "1-D tensor of bytes"),
    (torch.zeros(5, dtype=torch.bool), "1-D tensor of bytes"),
    (torch.full((5,), 256.0), "not bytes"),
    (torch.full((5,), 0.5), "not bytes"),
    (torch.full((5,), -1.0), "not bytes"),
    (torch.full((5,), float("nan")), "not bytes"),
    (torch.zeros(7, dtype=torch.uint8), "not a CPU generator state"),
])
def test_a_corrupt_generator_state_is_refused_by_name(state, match):
    fm = PositiveRandomFeatures(8, 16, seed=7)
    before = fm._generator.get_state()
    with pytest.raises(ValueError, match=match):
        fm.load_state_dict({"projection": fm.projection, "_extra_state": state})
    assert torch.equal(fm._generator.get_state(), before)  # the generator is left as it was


def test_a_multihead_module_resumes_its_feature_redraws():
    saved = MultiheadAttention(32, 4, kind="favor", num_features=32, seed=0)
    saved.feature_map.redraw()
    loaded = MultiheadAttention(32, 4, kind="favor", num_features=32, seed=5)
    loaded.load_state_dict(_saved_and_loaded(saved.state_dict()))
    x = torch.randn(2, 10, 32)
    for _ in range(2):
        saved.feature_map.redraw()
        loaded.feature_map.redraw()
        torch.testing.assert_close(loaded(x, x, x), saved(x, x, x), rtol=0, atol=0)


def test_a_swapped_encoder_resumes_its_feature_redraws():
    def model(seed):
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        return swap_attention(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), "favor", seed=seed,
                              num_features=32)

    saved, loaded = model(1), model(2)
    loaded.load_state_dict(_saved_and_loaded(saved.state_dict()))
    maps = [[m for m in net.modules() if isinstance(m, PositiveRandomFeatures)] for net in (saved, loaded)]
    assert len(maps[0]) == 2
    for a, b in zip(*maps, strict=True):
        assert torch.equal(_draws(a, 1)[0], _draws(b, 1)[0])
