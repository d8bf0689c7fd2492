"""Extra report section (``--extras``): long-range tasks for the h-form tanh RNN, with and without remedies."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from ..rnn.tasks import train
from .base import Evidence, extra

VARIANTS = {  # name -> (clip, orthogonal)
    "plain": (None, False),
    "clip 1.0": (1.0, False),
    "orthogonal W": (None, True),
    "orthogonal W + clip": (1.0, True),
}


@extra("rnn-tasks", "RNN tasks and remedies: adding, copy memory, sequential digits",
       "The h-form tanh RNN's success falls with the horizon T as ‖∂h_T/∂h_0‖ vanishes; gradient clipping and an "
       "orthogonal initial W change how much gradient reaches the start, measured exactly next to the results.")
def rnn_tasks(seed: int, quick: bool) -> Evidence:
    adding_T: tuple[int, ...]
    copy_T: tuple[int, ...]
    if quick:
        adding_T, copy_T, iterations = (5, 20), (5,), 60
        variants = {k: VARIANTS[k] for k in ("plain", "orthogonal W + clip")}
    else:
        adding_T, copy_T, iterations = (5, 10, 20, 40, 80), (5, 10, 20), 500
        variants = VARIANTS
    hidden, lr = 32, 1e-2
    runs = {}
    for task, horizons in (("adding", adding_T), ("copy", copy_T), ("digits", (64,))):
        for steps in horizons:
            for name, (clip, orth) in variants.items():
                runs[task, steps, name] = train(task, steps, clip=clip, orthogonal=orth, hidden=hidden,
                                                iterations=iterations, lr=lr, seed=seed)

    fig = Figure(figsize=(12, 8))
    (ax1, ax2), (ax3, ax4) = fig.subplots(2, 2)
    markers = dict(zip(variants, "osD^", strict=False))
    for i, name in enumerate(variants):
        style = {"marker": markers[name], "color": f"C{i}", "label": name}
        ax1.plot(adding_T, [runs["adding", t, name].metric for t in adding_T], **style)
        ax2.plot(copy_T, [runs["copy", t, name].metric for t in copy_T], **style)
        ax4.plot(adding_T, [runs["adding", t, name].reach_final for t in adding_T], ls=":", **style)
    ax1.axhline(1.0, color="k", ls="--", lw=1, label="trivial baseline (MSE 1/6)")
    ax1.axhline(0.1, color="grey", ls=":", lw=1, label="'solved' (≤ 0.1 × baseline)")
    for ax in (ax1, ax4):
        ax.set_xscale("log")
        ax.set_xticks(adding_T, [str(t) for t in adding_T])
        ax.minorticks_off()
    ax1.set(yscale="log", xlabel="T (steps)", ylabel="test MSE / (1/6)",
            title=f"Adding problem ({iterations} Adam steps, H = {hidden})")
    ax1.legend(fontsize=7)
    ax2.axhline(1.0, color="k", ls="--", lw=1, label="baseline 10·ln 8/(T+20)")
    ax2.set(xlabel="T (blank steps)", ylabel="test cross-entropy / baseline", title="Copy memory")
    ax2.legend(fontsize=7)
    names = list(variants)
    ax3.bar(np.arange(len(names)), [runs["digits", 64, n].metric for n in names],
            color=[f"C{i}" for i in range(len(names))])
    ax3.axhline(0.1, color="k", ls="--", lw=1, label="chance")
    ax3.set_xticks(np.arange(len(names)), names, fontsize=8)
    ax3.set(ylabel="test accuracy", ylim=(0, 1), title="Sequential digits (64 pixels, one per step)")
    ax3.legend(fontsize=7)
    for name in ("plain", "orthogonal W" if "orthogonal W" in variants else "orthogonal W + clip"):
        # the colour of the variant whose runs these are (--quick has no plain "orthogonal W": its init is that of
        # "orthogonal W + clip", which had been drawn in a colour no variant has)
        label = {"plain": "default init (uniform ±1/√H)", "orthogonal W": name}.get(name, f"orthogonal W ({name})")
        ax4.plot(adding_T, [runs["adding", t, name].reach_init for t in adding_T], lw=3, alpha=0.5,
                 color=f"C{names.index(name)}", label=f"at init: {label}")
    ax4.set(xlabel="T (steps)", ylabel="mean log₁₀ ‖∂h_T/∂h_0‖₂ (exact)",
            title="Gradient reach on the adding task (solid: init, dotted: trained)")
    ax4.legend(fontsize=7)
    fig.tight_layout()

    numbers: dict[str, float] = {}
    for (task, steps, name), r in runs.items():
        tag = f"{task}_T{steps}_{name.replace(' ', '_').replace('+', 'and')}"
        numbers[f"{tag}_metric"] = r.metric
        numbers[f"{tag}_reach_init_log10"] = r.reach_init
        numbers[f"{tag}_max_grad_norm"] = r.max_grad_norm
    plain = [runs["adding", t, "plain"] for t in adding_T]
    orth_name = "orthogonal W + clip"
    reach_gain = min(runs["adding", t, orth_name].reach_init - runs["adding", t, "plain"].reach_init
                     for t in adding_T)
    summary = {
        "adding_plain_metric_shortest_T": plain[0].metric, "adding_plain_metric_longest_T": plain[-1].metric,
        "adding_longest_T_solved_plain": float(max([t for t, r in zip(adding_T, plain, strict=True) if r.solved],
                                                   default=0)),
        "adding_longest_T_solved_orth_clip": float(max(
            [t for t in adding_T if runs["adding", t, orth_name].solved], default=0)),
        "min_reach_gain_orthogonal_log10": reach_gain,
        "digits_accuracy_plain": runs["digits", 64, "plain"].metric,
        "digits_accuracy_orth_clip": runs["digits", 64, orth_name].metric,
    }
    checks = {
        f"adding task, plain RNN: metric {plain[-1].metric:.3g} at T = {adding_T[-1]} worse than "
        f"{plain[0].metric:.3g} at T = {adding_T[0]}": plain[0].metric < plain[-1].metric,
        f"orthogonal W raises log₁₀‖∂h_T/∂h_0‖ at initialisation at every T (least gain {reach_gain:+.2g}, "
        "needs > 0)": reach_gain > 0,
    }
    confirmed = all(checks.values())
    copy_metrics = [runs["copy", t, "plain"].metric for t in copy_T]
    copy_note = f"Copy memory: metric {', '.join(f'{m:.3f}' for m in copy_metrics)} (plain)"
    if all(0.95 <= m <= 1.05 for m in copy_metrics):  # said only when measured: at the baseline's cross-entropy
        copy_note += (" — the tanh RNN stays on the 'blank, then guess' plateau in this budget, the task's known "
                      "failure mode")
    failed = "; ".join(text for text, ok in checks.items() if not ok)
    notes = copy_note + "." if confirmed else f"Not as expected: {failed}. {copy_note}."
    return Evidence(
        confirmed=confirmed,
        numbers={**summary, **numbers},
        key=["adding_longest_T_solved_plain", "adding_longest_T_solved_orth_clip", "min_reach_gain_orthogonal_log10"],
        summary=(f"adding task, plain RNN: metric {plain[0].metric:.3g} at T = {adding_T[0]}, "
                 f"{plain[-1].metric:.3g} at T = {adding_T[-1]} (must be worse at the longest T); orthogonal W "
                 f"changes log₁₀‖∂h_T/∂h_0‖ at initialisation by at least {reach_gain:+.2g} at every T "
                 "(must be > 0)"),
        method=(f"theorylab.rnn.RNN in h-form with tanh (H = {hidden}) and a linear readout of σ(h_t), trained with "
                f"Adam (lr {lr}, batch 64, {iterations} steps) on the adding problem (T in {adding_T}; metric = "
                f"test MSE / (1/6), the predict-1 baseline; solved at ≤ 0.1), copy memory (T in {copy_T}; metric = "
                "test cross-entropy / (10 ln 8/(T+20))) and scikit-learn digits read pixel by pixel (64 steps; "
                f"test accuracy), for the variants {', '.join(variants)} (norm clipping at 1.0; orthogonal W with "
                "b = 0 vs torch.nn.RNN's uniform ±1/√H). Next to each result, the exact ‖∂h_T/∂h_0‖₂ "
                "(log_jacobian_norms, float64, 8 sequences) at initialisation and after training. Confirmed "
                "(as a sanity check, not a claim) when the plain RNN does worse at the longest T than at the "
                "shortest and the orthogonal init lets more gradient reach h_0 at every T."),
        figures={"tasks": fig},
        notes=notes,
        checks=checks,
    )
