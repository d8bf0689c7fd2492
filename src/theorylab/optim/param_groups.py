"""Parameter groups with no weight decay on biases and normalisation weights."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .base import check_nonnegative

#: module types whose parameters (scale and shift) are never decayed
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm*, Lazy variants
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def decay_param_groups(model: nn.Module, weight_decay: float, *, decay_embeddings: bool = True,
                       extra_no_decay: tuple[type[nn.Module], ...] = ()) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into a decayed group and a group with ``weight_decay = 0``.

    Not decayed: every bias — a parameter with fewer than 2 dimensions, or whose name has a ``bias`` part
    (``bias``, ``bias_ih_l0``, ``in_proj_bias``: recurrent and attention layers name theirs so) —, every parameter
    of a normalisation module (:data:`NORM_TYPES` and ``extra_no_decay``), and embeddings when
    ``decay_embeddings`` is False. A parameter shared between modules (tied weights) appears once, in the no-decay
    group if any of its owners says so. Empty groups are left out. The groups carry no ``"param_names"``: torch
    then requires names in every group added later (``add_param_group``); :func:`decayed_names` lists them.

    Returns groups for SGD, Adam and AdamW here or any torch.optim optimizer with weight decay, e.g.
    ``AdamW(decay_param_groups(model, 0.1))``. SGDMomentum and RunningAverageSGD have no weight decay and refuse a
    group that asks for one (they had dropped it silently).

    Args:
        model: the module whose parameters are split; only those with ``requires_grad`` are taken (frozen ones are
            left out of both groups).
        weight_decay: λ of the decayed group (the no-decay group gets 0.0); a finite number >= 0, validated here
            but stored as given (theorylab's optimizers convert it to a float when they add the group).
        decay_embeddings: decay ``nn.Embedding`` and ``nn.EmbeddingBag`` weights (default True); False puts them
            in the no-decay group.
        extra_no_decay: further module types (a tuple of classes, default ``()``) whose own parameters are never
            decayed, as :data:`NORM_TYPES`.

    Returns:
        A list of at most two dicts: ``{"params": [...], "weight_decay": weight_decay}`` for the decayed
        parameters, then ``{"params": [...], "weight_decay": 0.0}``, each left out when empty (an empty list when
        nothing is trainable).

    Raises:
        TypeError: weight_decay is not a real number (an int, a float, a numpy scalar or a one-element tensor);
            (Python's own) extra_no_decay is not an iterable of classes.
        ValueError: weight_decay is negative or not finite.
    """
    check_nonnegative(weight_decay, "weight_decay")
    no_decay_types = NORM_TYPES + tuple(extra_no_decay) + (() if decay_embeddings else (nn.Embedding, nn.EmbeddingBag))
    params: dict[int, nn.Parameter] = {}
    exempt: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            key = id(p)
            params.setdefault(key, p)
            if p.dim() < 2 or "bias" in name.split("_") or isinstance(module, no_decay_types):
                exempt.add(key)
    decay = [k for k in params if k not in exempt]
    keep = [k for k in params if k in exempt]
    groups = []
    for keys, wd in ((decay, weight_decay), (keep, 0.0)):
        if keys:
            groups.append({"params": [params[k] for k in keys], "weight_decay": wd})
    return groups


def decayed_names(model: nn.Module, groups: list[dict[str, Any]]) -> dict[str, float]:
    """Qualified parameter name -> the weight decay its group applies (for checking what is decayed).

    Raises ValueError when the groups hold parameters but none of ``model``'s (groups of another model, or of a
    copy of it: an empty answer would read as "nothing is decayed"), or when a group has no ``"weight_decay"``
    (the optimizer's default would apply, which the groups alone do not tell: pass ``optimizer.param_groups``)."""
    for i, g in enumerate(groups):
        if "weight_decay" not in g:
            raise ValueError(f"decayed_names: parameter group {i} has no 'weight_decay' (the optimizer's default "
                             "applies to it): pass optimizer.param_groups, which hold every group's value")
    decay = {id(p): g["weight_decay"] for g in groups
             for p in ([g["params"]] if isinstance(g["params"], Tensor) else g["params"])}
    names = {name: decay[id(p)] for name, p in model.named_parameters(remove_duplicate=False)  # every tied name
             if id(p) in decay}
    if decay and not names:
        raise ValueError(f"decayed_names: none of the {len(decay)} parameters in the groups belongs to the model "
                         "(groups built from another model, or from a copy of it?)")
    return names
