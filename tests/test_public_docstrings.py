"""Every public name has a docstring, and so has every public method or property its class defines (help() showed
nothing for some 30 of them: a typed user's review). ``extra_repr`` is torch's hook, documented by torch."""

import importlib
import inspect

import pytest

SUBPACKAGES = ("rnn", "optim", "attention", "cost", "claims", "report", "experiments")
TORCH_HOOKS = {"extra_repr"}


def _undocumented(module_name: str) -> list[str]:
    module = importlib.import_module(f"theorylab.{module_name}")
    missing = []
    for name in getattr(module, "__all__", []):
        obj = getattr(module, name)
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and not (obj.__doc__ or "").strip():
            missing.append(name)
        if not (inspect.isclass(obj) and obj.__module__.startswith("theorylab")):
            continue
        for attr, value in vars(obj).items():
            if attr.startswith("_") or attr in TORCH_HOOKS:
                continue
            if isinstance(value, property):
                value = value.fget
            elif isinstance(value, (classmethod, staticmethod)):
                value = value.__func__
            if inspect.isfunction(value) and not (value.__doc__ or "").strip():
                missing.append(f"{name}.{attr}")
    return missing


@pytest.mark.parametrize("module_name", SUBPACKAGES)
def test_every_public_name_and_method_has_a_docstring(module_name):
    assert _undocumented(module_name) == []
