"""Activation-aware truncated SVD of one linear layer: statistics -> whitened eigenbasis -> factors.

Pure maths on tensors, no model and no files. The method (``METHOD.md``, Stage 1): for a weight
``W`` (out × in) and the calibration statistic ``C = Σ XᵀX`` (in × in) of its input, find the rank-``k``
matrix ``Wₖ = u v`` that minimises the output error on the calibration data,

.. math::

    \\min_{\\operatorname{rank} W_k \\le k} \\lVert X (W - W_k)^\\top \\rVert_F
    = \\min \\lVert (W - W_k) S \\rVert_F, \\qquad S S^\\top = C .

With ``W S = U Σ Vᵀ`` the minimiser is ``Wₖ = (WS)ₖ S⁻¹ = Uₖ Uₖᵀ W`` when ``S`` is invertible: it is
the projection of ``W`` onto the top-``k`` left singular vectors of the whitened weight. We compute
exactly that projection, which needs no ``S⁻¹``:

* ``out ≤ in``: ``Uₖ`` are the top-``k`` eigenvectors of ``M = W C̃ Wᵀ = (WS)(WS)ᵀ`` (out × out). No
  root of ``C`` is formed at all, so a singular ``C`` cannot fail (Llama's ``down_proj`` never
  factorises its 14336-wide statistic).
* ``out > in``: with the thin QR ``W = Q R``, ``W C̃ Wᵀ = Q (R C̃ Rᵀ) Qᵀ``, so the top-``k``
  eigenvectors ``Z`` of ``R C̃ Rᵀ`` (in × in) give ``Uₖ = Q Z``. No root of ``C`` here either: a
  statistic that rounding made slightly indefinite only moves the bottom eigenvalues. (Until
  2026-12-06 this branch took a Cholesky root of ``C̃ + δI``; the GPU's TF32 statistics of
  Qwen2.5-14B's first block, where one direction carries nearly all the energy, were indefinite
  beyond any small shift and the build stopped.)

``C̃ = C / (tr C / n)`` is trace-normalised (mean eigenvalue 1) in both branches.

The factors split the projection evenly: ``v = D⁻¹ Uₖᵀ W`` and ``u = Uₖ D`` with
``Dᵢ = ‖(Uₖᵀ W)ᵢ‖^{1/2}``, so that column ``i`` of ``u`` and row ``i`` of ``v`` have the same norm
(with ``C = I`` this is exactly ``u = Uₖ√Σₖ``, ``v = √Σₖ Vₖᵀ`` of the method). The product ``u v``
equals the method's ``Uₖ√Σₖ · √Σₖ Vₖᵀ S⁻¹`` whenever ``C`` is positive definite; when it is
singular, ours is the minimiser that leaves directions the calibration never excites unamplified.

One eigendecomposition of size ``min(out, in)`` per module replaces the reference's
eigendecomposition of ``C`` plus a full SVD of ``W S``. ``solver="randomized"`` replaces that
eigendecomposition by a seeded subspace iteration (deterministic for a given device).

:func:`whitened_spectrum` gives all ``min(out, in)`` eigenvalues ``σᵢ²`` of the same whitened weight
(fp64, no root of ``C``): what the spectral rank allocation reads to decide each module's ``k``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from emloc_engine.core.errors import DataError
from emloc_engine.stages.emulator.options import SOLVERS


@dataclass(frozen=True)
class Factors:
    """The two factors of one compressed layer.

    Attributes:
        u: out × k, in the dtype the factoriser computed in.
        v: k × in, same dtype.
        rank: ``k``.
        rel_error: ``‖(W − u v) S‖_F / ‖W S‖_F``, the relative output error on the calibration
            activations (0 at full rank).
    """

    u: torch.Tensor
    v: torch.Tensor
    rank: int
    rel_error: float


def normalized_statistics(c: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``C̃ = sym(C) / (tr C / n)``: symmetric, mean eigenvalue 1; ``I`` when ``C`` is zero.

    Args:
        c: ``Σ XᵀX`` (in × in), any float dtype.
        dtype: dtype of the result.

    Returns:
        The trace-normalised statistic in ``dtype``.

    Raises:
        FloatingPointError: ``C`` holds NaN or Inf (the activations overflowed).
    """
    c = c.to(dtype)
    if not bool(torch.isfinite(c).all()):
        raise FloatingPointError("the calibration statistic holds NaN or Inf")
    n = c.shape[0]
    mean = float(torch.diagonal(c).sum()) / n
    if mean <= 0.0:  # no activation energy at all: every approximation is equally good; use C = I
        return torch.eye(n, dtype=dtype, device=c.device)
    sym = c + c.T  # one n×n temporary (matters for 14336-wide statistics)
    return sym.mul_(0.5 / mean)


def _top_eigenpairs(m: torch.Tensor, k: int, solver: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenvalues (descending) and eigenvectors of a symmetric PSD ``m``."""
    m = (m + m.T) * 0.5
    n = m.shape[0]
    if solver == "eigh" or k + 32 >= n:
        evals, evecs = torch.linalg.eigh(m)
        return evals[-k:].flip(0), evecs[:, -k:].flip(1)
    # Seeded subspace iteration with Rayleigh-Ritz; 4 power steps, oversampling max(32, k/8).
    p = min(n, k + max(32, k // 8))
    gen = torch.Generator(device=m.device).manual_seed(seed)
    q = torch.randn(n, p, dtype=m.dtype, device=m.device, generator=gen)
    for _ in range(5):
        q, _ = torch.linalg.qr(m @ q)
    evals, z = torch.linalg.eigh(q.T @ m @ q)
    return evals[-k:].flip(0), q @ z[:, -k:].flip(1)


def factorize(w: torch.Tensor, c: torch.Tensor, rank: int, *, dtype: torch.dtype | None = None,
              solver: str = "eigh", cache: dict[str, torch.Tensor] | None = None) -> Factors:
    """Activation-aware rank-``k`` factors of one weight (see the module docstring for the maths).

    Args:
        w: the weight ``W`` (out × in), any float dtype, on the device to compute on.
        c: ``Σ XᵀX`` of its input (in × in), fp32 or fp64, same device.
        rank: ``k``; clamped to ``min(out, in)`` (then ``u v = W`` up to rounding).
        dtype: dtype of the linear algebra and of the returned factors; default fp64 on the CPU,
            fp32 elsewhere.
        solver: ``"eigh"`` (exact) or ``"randomized"`` (subspace iteration).
        cache: a dict shared by the modules that read the same ``c`` (q/k/v, gate/up): the
            normalised statistic is computed once per group instead of per module.

    Returns:
        :class:`Factors` with ``u`` (out × k) and ``v`` (k × in) in ``dtype``.

    Raises:
        ValueError: shapes disagree, ``rank < 1`` or an unknown solver.
        FloatingPointError: ``C`` or ``W`` holds NaN or Inf.
    """
    out_f, in_f = w.shape
    if c.shape != (in_f, in_f):
        raise ValueError(f"statistic of shape {tuple(c.shape)} does not fit a weight of shape {tuple(w.shape)}")
    if rank < 1 or solver not in SOLVERS:
        raise ValueError(f"rank must be >= 1 (got {rank}) and solver one of {SOLVERS} (got {solver!r})")
    dt = dtype or (torch.float64 if w.device.type == "cpu" else torch.float32)
    k = min(rank, out_f, in_f)
    wd = w.to(dt)
    if not bool(torch.isfinite(wd).all()):
        raise FloatingPointError("the weight holds NaN or Inf")
    cache = {} if cache is None else cache
    key = f"norm-{dt}"
    if key not in cache:
        cache[key] = normalized_statistics(c, dt)
    if out_f <= in_f:
        m = wd @ cache[key] @ wd.T
        total = float(torch.diagonal(m).sum())
        lam, basis = _top_eigenpairs(m, k, solver)
    else:
        q, r = torch.linalg.qr(wd)
        m = r @ cache[key] @ r.T
        total = float(torch.diagonal(m).sum())
        lam, z = _top_eigenpairs(m, k, solver)
        basis = q @ z
        del q, r
    v = basis.T @ wd
    d = v.norm(dim=1).sqrt()
    d = torch.where(d > 0, d, torch.ones_like(d))
    kept = float(lam.clamp(min=0).sum())
    rel = math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0
    return Factors(u=(basis * d).contiguous(), v=(v / d[:, None]).contiguous(), rank=k, rel_error=rel)


def whitened_error(w: torch.Tensor, w_approx: torch.Tensor, x: torch.Tensor) -> float:
    """``‖X (W − Wₖ)ᵀ‖_F``: the output error of an approximation on activations ``X`` (tokens × in)."""
    return float(torch.linalg.matrix_norm(x @ (w - w_approx).T))


def whitened_spectrum(w: torch.Tensor, c: torch.Tensor, device: torch.device | None = None) -> list[float]:
    """Descending ``σ_i²`` of ``W S`` (``S Sᵀ = C``), fp64, clamped at 0; ``min(out, in)`` values.

    ``out ≤ in``: eigenvalues of ``W C Wᵀ``. ``out > in``: with ``W = Q R`` (thin QR), those of
    ``R C Rᵀ`` (in × in), which are the nonzero ones of ``W C Wᵀ = Q (R C Rᵀ) Qᵀ``. No root of ``C``
    is formed, so a singular ``C`` is fine.

    Raises:
        DataError: ``C`` holds NaN or Inf (the activations overflowed).
    """
    w64 = w.to(device=device, dtype=torch.float64)
    c64 = c.to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(c64).all()):
        raise DataError("A calibration statistic holds NaN or Inf.",
                        hint="The activations overflowed; use compute_dtype float32.")
    if w64.shape[0] > w64.shape[1]:
        w64 = torch.linalg.qr(w64, mode="r").R
    m = w64 @ c64 @ w64.T
    ev = torch.linalg.eigvalsh((m + m.T) / 2).flip(0).clamp_min(0.0)
    return [float(x) for x in ev.cpu().tolist()]
