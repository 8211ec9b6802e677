"""Per-module ranks from whitened spectra: spend a uniform ρ's parameter budget where it removes most error.

Pure arithmetic on spectra (no model, no files). For module ``m`` with weight ``W`` (out × in) and
calibration statistics ``C = Σ XᵀX``, the activation-aware truncation error at rank ``k`` is
``E_m(k) = Σ_{i>k} σ_i²`` where ``σ_i²`` are the eigenvalues of ``W C Wᵀ`` (the squared singular values
of ``W S``, ``S Sᵀ = C``). Each rank unit costs ``out + in`` parameters. Greedy water-filling on the
gains ``σ_{k+1}² / Σ_i σ_i²`` per parameter (non-increasing in ``k``, so greedy is optimal for this
separable objective) minimises ``Σ_m E_m(k_m) / E_m(0)`` subject to the parameters spent staying within
the budget. A module whose rank reaches ``out·in/(out+in)`` is cheaper dense and is kept dense.

Exact accounting (so that the emulator never holds more parameters than the uniform one):

* the default budget is what the uniform build keeps in these modules,
  ``Σ_m rank_for_ratio(ρ, out, in) · (out + in)``;
* every module starts at rank 1 (the budget always covers that, since ``rank_for_ratio ≥ 1``);
  the greedy then buys ranks 2, 3, … in the order of their gains, skipping a step that does not fit
  (a cheaper step of another module may still fit);
* the step that reaches the dense threshold ``k_max = out·in // (out+in)`` costs what makes the module
  dense, ``out·in − (k_max − 1)(out + in)``, not just ``out + in``.

Hence every compressed module gets rank ≥ 1 and ``Σ kept parameters ≤ budget``.
(The quality benchmark's first version budgeted ``ρ Σ out·in``, allowed rank 0 — then raised to 1 —
and charged a dense module ``k_max (out+in)``; both could overspend by less than one rank unit per module.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from emloc_engine.core.ranks import rank_for_ratio


def dense_threshold(out_features: int, in_features: int) -> int:
    """``k_max = out·in // (out+in)``: from this rank on the factors hold at least as many parameters as ``W``."""
    return out_features * in_features // (out_features + in_features)


def uniform_budget(shapes: Mapping[str, tuple[int, int]], ratio: float) -> int:
    """Parameters the uniform build keeps in these modules: ``Σ rank_for_ratio(ρ, out, in)·(out+in)``."""
    total = 0
    for out_f, in_f in shapes.values():
        total += min(rank_for_ratio(ratio, out_f, in_f), out_f, in_f) * (out_f + in_f)
    return total


def kept_parameters(shapes: Mapping[str, tuple[int, int]], overrides: Sequence[tuple[str, int]],
                    dense: Sequence[str]) -> int:
    """Parameters of an allocation: ``k (out+in)`` per compressed module, ``out·in`` per dense one."""
    total = sum(k * sum(shapes[n]) for n, k in overrides)
    return total + sum(shapes[n][0] * shapes[n][1] for n in dense)


def allocate_ranks(spectra: Mapping[str, Sequence[float]], shapes: Mapping[str, tuple[int, int]], ratio: float,
                   *, budget: int | None = None) -> tuple[tuple[tuple[str, int], ...], tuple[str, ...]]:
    """Ranks per module that minimise the summed relative whitened error within a uniform ρ's budget.

    Args:
        spectra: module name -> descending ``σ_i²`` of ``W S`` (eigenvalues of ``W C Wᵀ``, ≥ 0); at least
            the first ``k_max`` values are used, normalised by the sum of all given values.
        shapes: module name -> ``(out, in)`` of its weight; every name of ``spectra``.
        ratio: the uniform keep-ratio ρ whose parameter count is the budget.
        budget: parameters to spend instead (default :func:`uniform_budget`; the emulator passes the
            uniform count under the user's per-module ρ overrides). Never less than rank 1 everywhere.

    Returns:
        ``(rank_overrides, dense)``: exact module names with their rank (every compressed module,
        rank ≥ 1, in the order of ``spectra``), and the names kept dense — exactly the modules whose
        rank reached ``k_max`` (modules with ``k_max ≤ 1`` stay at rank 1, as in the uniform build).

    Raises:
        ValueError: a module without a shape, or a negative / non-finite spectrum value.
    """
    names = list(spectra)
    missing = [n for n in names if n not in shapes]
    if missing:
        raise ValueError(f"no shape for {missing[:5]}")
    if budget is None:
        budget = uniform_budget({n: shapes[n] for n in names}, ratio)
    ranks = dict.fromkeys(names, 1)
    spent = sum(sum(shapes[n]) for n in names)
    steps: list[tuple[float, int, int, str]] = []  # (-gain per parameter, i, module order, name): step i → rank i+1
    for order, name in enumerate(names):
        values = [float(v) for v in spectra[name]]
        if any(not v >= 0.0 or v == float("inf") for v in values):
            raise ValueError(f"spectrum of {name} holds negative or non-finite values")
        out_f, in_f = shapes[name]
        k_max = dense_threshold(out_f, in_f)
        total = sum(values) or 1.0
        for i in range(1, min(k_max, len(values))):
            steps.append((-values[i] / total / (out_f + in_f), i, order, name))
    steps.sort()
    for _, i, _, name in steps:
        if ranks[name] != i:  # ranks are bought in order per module (gains are non-increasing)
            continue
        out_f, in_f = shapes[name]
        k_max = dense_threshold(out_f, in_f)
        cost = out_f + in_f if i + 1 < k_max else out_f * in_f - i * (out_f + in_f)
        if spent + cost > budget:
            continue
        ranks[name] = i + 1
        spent += cost
    dense = tuple(n for n in names if ranks[n] >= dense_threshold(*shapes[n]) >= 2)
    overrides = tuple((n, ranks[n]) for n in names if n not in dense)
    return overrides, dense


__all__ = ["allocate_ranks", "dense_threshold", "kept_parameters", "uniform_budget"]
