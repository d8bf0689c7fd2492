"""The seeded generator of a random feature map travels with the map, as the uint8 buffer ``generator_state``: a
map (or a model holding one) loaded from a checkpoint redraws exactly what the saved one would have, which a run
that redraws its features periodically (Performers) needs to resume bit for bit."""

from __future__ import annotations

import io
import pickle

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


def _same_draws(a, b, n: int = 3) -> None:
    for x, y in zip(_draws(a, n), _draws(b, n), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("cls", MAPS)
def test_a_loaded_map_redraws_what_the_saved_one_would_have(cls):
    saved = cls(8, 16, seed=7)
    _draws(saved, 2)  # the saved map is mid-sequence
    loaded = cls(8, 16, seed=123)
    loaded.load_state_dict(_saved_and_loaded(saved.state_dict()))
    assert torch.equal(loaded.projection, saved.projection)
    _same_draws(saved, loaded)


def test_only_a_seeded_map_saves_a_generator_state_and_it_is_bytes():
    """An unseeded map draws from torch's global generator, which it does not own: its state_dict is as before."""
    state = PositiveRandomFeatures(8, 16, seed=7).state_dict()
    assert set(state) == {"projection", "generator_state"}
    assert state["generator_state"].dtype == torch.uint8 and state["generator_state"].dim() == 1
    assert set(PositiveRandomFeatures(8, 16).state_dict()) == {"projection"}


def test_the_module_casts_leave_the_generator_state_alone():
    fm = PositiveRandomFeatures(8, 16, seed=7)
    before = fm.generator_state.clone()
    for cast in (fm.half, fm.double, fm.bfloat16, fm.float):
        cast()
        assert fm.generator_state.dtype == torch.uint8 and torch.equal(fm.generator_state, before)
    _same_draws(fm.float(), PositiveRandomFeatures(8, 16, seed=7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64])
@pytest.mark.parametrize("assign", [False, True])
def test_a_state_dict_cast_to_another_dtype_still_restores_the_generator(dtype, assign):
    """Code that maps .to(dtype) over a checkpoint's values keeps the bytes 0..255 exactly in these dtypes."""
    saved = PositiveRandomFeatures(8, 16, seed=7)
    loaded = PositiveRandomFeatures(8, 16, seed=0)
    loaded.load_state_dict({k: v.to(dtype) for k, v in saved.state_dict().items()}, assign=assign)
    loaded.projection = loaded.projection.float()  # assign=True keeps the cast projection; draws are compared
    _same_draws(saved, loaded)


def test_a_state_dict_without_a_generator_state_keeps_the_maps_own_generator():
    """Saved by an unseeded map, or before the state was saved (version 1): loads strictly, as it always did."""
    saved = PositiveRandomFeatures(8, 16, seed=7)
    old = saved.state_dict()
    del old["generator_state"]
    old._metadata[""]["version"] = 1
    for state in (_saved_and_loaded(old), {"projection": saved.projection}, PositiveRandomFeatures(8, 16).state_dict()):
        loaded = PositiveRandomFeatures(8, 16, seed=3)
        loaded.load_state_dict(state)
        assert torch.equal(loaded.projection, state["projection"])
        _same_draws(loaded, PositiveRandomFeatures(8, 16, seed=3), 1)


def test_an_unseeded_map_takes_on_a_saved_seeded_generator():
    seeded, unseeded = PositiveRandomFeatures(8, 16, seed=7), PositiveRandomFeatures(8, 16)
    unseeded.load_state_dict(seeded.state_dict())
    assert set(unseeded.state_dict()) == {"projection", "generator_state"}
    _same_draws(seeded, unseeded)


@pytest.mark.parametrize(("state", "match"), [
    (torch.zeros(2, 3, dtype=torch.uint8), "1-D tensor of bytes"),
    (torch.zeros(5, dtype=torch.bool), "1-D tensor of bytes"),
    ([1, 2, 3], "1-D tensor of bytes"),
    (torch.full((5,), 256.0), "not bytes"),
    (torch.full((5,), 0.5), "not bytes"),
    (torch.full((5,), -1.0), "not bytes"),
    (torch.full((5,), float("nan")), "not bytes"),
    (torch.zeros(7, dtype=torch.uint8), "not a CPU generator's state"),
])
def test_a_corrupt_generator_state_is_an_error_naming_it_and_is_not_loaded(state, match):
    """Reported as torch reports a size mismatch: the other entries load, then a RuntimeError names every bad one;
    the generator keeps its state (a float 256.0 copied into the uint8 buffer would have wrapped silently)."""
    fm = PositiveRandomFeatures(8, 16, seed=7)
    before = fm.generator_state.clone()
    with pytest.raises(RuntimeError, match=f"generator_state: .*{match}"):
        fm.load_state_dict({"projection": torch.zeros_like(fm.projection), "generator_state": state})
    assert torch.equal(fm.generator_state, before)


def test_a_corrupt_generator_state_inside_a_model_is_reported_with_its_full_key():
    model = nn.Sequential(nn.Linear(4, 4), MultiheadAttention(32, 4, kind="favor", num_features=32, seed=0))
    state = model.state_dict()
    state["1.feature_map.generator_state"] = torch.zeros(7, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"1\.feature_map\.generator_state: .*not a CPU generator's state"):
        model.load_state_dict(state)


@pytest.mark.parametrize("cls", MAPS)
def test_a_map_built_on_the_meta_device_is_drawn_by_reset_parameters(cls):
    """to_empty() leaves uninitialised memory in every buffer, as in torch's own modules; reset_parameters() then
    draws as a map built on the CPU would have."""
    with torch.device("meta"):
        fm = cls(8, 16, seed=7)
    fm = fm.to_empty(device="cpu")
    fm.reset_parameters()
    reference = cls(8, 16, seed=7)
    assert torch.equal(fm.projection, reference.projection)
    _same_draws(fm, reference)


def test_a_generator_state_that_torch_refuses_is_an_error_that_says_what_to_do():
    fm = PositiveRandomFeatures(8, 16, seed=7)
    fm.generator_state.zero_()  # not a valid mt19937 state (what uninitialised memory usually is)
    with pytest.raises(RuntimeError, match="reset_parameters"):
        fm.redraw()
    fm.generator_state = fm.generator_state.to("meta")
    with pytest.raises(RuntimeError, match="meta device"):
        fm.redraw()


def test_reset_parameters_returns_a_map_to_its_construction():
    seeded = PositiveRandomFeatures(8, 16, seed=7)
    _draws(seeded, 2)
    seeded.reset_parameters()
    _same_draws(seeded, PositiveRandomFeatures(8, 16, seed=7))
    unseeded = PositiveRandomFeatures(8, 16)
    unseeded.load_state_dict(PositiveRandomFeatures(8, 16, seed=7).state_dict())  # takes on a generator ...
    unseeded.reset_parameters()  # ... and drops it: torch's global generator draws again
    assert set(unseeded.state_dict()) == {"projection"}
    torch.manual_seed(0)
    unseeded.redraw()
    torch.manual_seed(0)
    assert torch.equal(unseeded.projection, PositiveRandomFeatures(8, 16).projection)


def test_a_whole_map_pickled_before_the_buffer_existed_keeps_its_seeded_sequence():
    """Version 1 kept the torch.Generator itself as ``_generator``: unpickling turns it into the buffer."""
    old = PositiveRandomFeatures(8, 16, seed=7)
    old.__dict__["_generator"] = old._seeded_generator()  # what a version-1 pickle holds ...
    del old._buffers["generator_state"]  # ... instead of the buffer
    loaded = pickle.loads(pickle.dumps(old))
    assert "_generator" not in loaded.__dict__
    _same_draws(loaded, PositiveRandomFeatures(8, 16, seed=7))


def test_functional_call_takes_the_models_own_state_dict_strictly():
    mha = MultiheadAttention(32, 4, kind="favor", num_features=32, seed=0)
    x = torch.randn(2, 10, 32)
    out = torch.func.functional_call(mha, mha.state_dict(), (x, x, x), strict=True)
    torch.testing.assert_close(out, mha(x, x, x), rtol=0, atol=0)


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


@pytest.mark.skipif(not hasattr(torch.compiler, "is_exporting"), reason="torch.export of the package: torch >= 2.5")
def test_an_exported_module_loads_an_eager_state_dict():
    x = torch.randn(2, 10, 32)
    exported = torch.export.export(MultiheadAttention(32, 4, kind="favor", num_features=32, seed=0).eval(),
                                   (x, x, x)).module()
    eager = MultiheadAttention(32, 4, kind="favor", num_features=32, seed=1).eval()
    exported.load_state_dict(eager.state_dict())
    torch.testing.assert_close(exported(x, x, x), eager(x, x, x))


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
        _same_draws(a, b, 1)
