"""The activation-aware factoriser: optimality, exactness and robustness on bad statistics."""

from __future__ import annotations

import pytest
import torch

from emloc_engine.stages.emulator.factorize import (
    factorize,
    normalized_statistics,
    whitened_error,
)

SHAPES = [(24, 40), (40, 24), (32, 32)]


def _data(out_f: int, in_f: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    scale = torch.logspace(-2, 1, in_f, dtype=torch.float64)  # anisotropic activations
    x = torch.randn(400, in_f, generator=g, dtype=torch.float64) * scale
    return w, x


def _plain_svd(w: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


@pytest.mark.parametrize("shape", SHAPES)
def test_full_rank_reproduces_weight(shape: tuple[int, int]) -> None:
    w, x = _data(*shape)
    f = factorize(w, x.T @ x, rank=10_000)
    assert f.rank == min(shape)
    assert torch.allclose(f.u @ f.v, w, atol=1e-10)
    assert f.rel_error < 1e-6


@pytest.mark.parametrize("shape", SHAPES)
def test_low_rank_weight_is_exact_at_its_rank(shape: tuple[int, int]) -> None:
    out_f, in_f = shape
    g = torch.Generator().manual_seed(1)
    w = torch.randn(out_f, 5, generator=g, dtype=torch.float64) @ torch.randn(5, in_f, generator=g, dtype=torch.float64)
    _, x = _data(*shape)
    for k in (5, 7):
        f = factorize(w, x.T @ x, rank=k)
        assert torch.allclose(f.u @ f.v, w, atol=1e-9), k


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 4, 12])
def test_whitened_error_beats_plain_svd_and_is_reported(shape: tuple[int, int], k: int) -> None:
    w, x = _data(*shape, seed=k)
    f = factorize(w, x.T @ x, rank=k)
    ours = whitened_error(w, f.u @ f.v, x)
    plain = whitened_error(w, _plain_svd(w, k), x)
    assert ours <= plain * (1 + 1e-12)
    assert ours < 0.95 * plain  # strongly anisotropic data: the whitening must matter
    assert f.rel_error == pytest.approx(ours / whitened_error(w, torch.zeros_like(w), x), rel=1e-6)


def test_matches_the_reference_formula_when_c_is_definite() -> None:
    """u v equals U_k Σ_k V_kᵀ S⁻¹ of the method (eigh root of C, full SVD of W S)."""
    w, x = _data(20, 30)
    c = x.T @ x
    evals, q = torch.linalg.eigh(c)
    s = q * evals.sqrt()
    u, sig, vh = torch.linalg.svd(w @ s, full_matrices=False)
    ref = (u[:, :6] * sig[:6]) @ vh[:6] @ torch.linalg.inv(s)
    f = factorize(w, c, rank=6)
    assert torch.allclose(f.u @ f.v, ref, atol=1e-8)


def _bad_statistics(kind: str, in_f: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, in_f, generator=g, dtype=torch.float64)
    if kind == "zero":
        x[:, 3] = 0.0
        x[:, 7] = 0.0
    elif kind == "duplicate":
        x[:, 5] = x[:, 4]
    elif kind == "collinear":
        x[:, 10] = 2.0 * x[:, 1] - 0.5 * x[:, 2]
    elif kind == "few_tokens":
        x = x[: in_f // 3]
    elif kind == "ill_conditioned":
        x = x * torch.logspace(-9, 3, in_f, dtype=torch.float64)
    elif kind == "all_zero":
        x = torch.zeros_like(x)
    return x


@pytest.mark.parametrize("kind", ["zero", "duplicate", "collinear", "few_tokens", "ill_conditioned", "all_zero"])
@pytest.mark.parametrize("shape", [(16, 24), (40, 24)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_singular_and_ill_conditioned_statistics_do_not_fail(kind: str, shape: tuple[int, int],
                                                             dtype: torch.dtype) -> None:
    out_f, in_f = shape
    w, _ = _data(out_f, in_f, seed=3)
    x = _bad_statistics(kind, in_f)
    c = (x.T @ x).to(torch.float32 if dtype == torch.float32 else torch.float64)
    for k in (3, 10, min(shape)):
        f = factorize(w, c, rank=k, dtype=dtype)
        approx = f.u.double() @ f.v.double()
        assert torch.isfinite(approx).all()
        # Never amplifies: the product is a projection of W, so its norm cannot exceed W's.
        assert torch.linalg.matrix_norm(approx) <= torch.linalg.matrix_norm(w) * (1 + 1e-4)
        # Still at least as good as plain SVD on the data the statistics came from.
        tol = (1e-9 if dtype == torch.float64 else 1e-4) * whitened_error(w, torch.zeros_like(w), x)
        assert whitened_error(w, approx, x) <= whitened_error(w, _plain_svd(w, k), x) + tol
    full = factorize(w, c, rank=min(shape), dtype=dtype)
    if out_f <= in_f:  # a full orthonormal basis of the output space: exact whatever C is
        atol = 1e-9 if dtype == torch.float64 else 1e-4
        assert torch.allclose(full.u.double() @ full.v.double(), w, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_statistic_rounding_made_indefinite_still_factorises(dtype: torch.dtype) -> None:
    """A shared direction (a bias every token gets) and low-rank variation, plus symmetric noise: C has
    eigenvalues far below zero relative to its mean one (a Cholesky root of C̃ + 0.1 I failed on such a
    statistic, as on the TF32 statistics of Qwen2.5-14B's first block on an H100). The factors stay
    close to those of the exact statistic: the noise only moved the bottom of the spectrum."""
    in_f, out_f, k = 64, 160, 8
    g = torch.Generator().manual_seed(5)
    shared = torch.randn(in_f, generator=g, dtype=torch.float64)
    x = shared + 3.0 * torch.randn(400, 12, generator=g, dtype=torch.float64) @ torch.randn(
        12, in_f, generator=g, dtype=torch.float64)
    exact = x.T @ x
    noise = torch.randn(in_f, in_f, generator=g, dtype=torch.float64)
    mean = float(torch.diagonal(exact).sum()) / in_f
    noise = (noise + noise.T) * (0.3 * mean / float(torch.linalg.eigvalsh(noise + noise.T).abs().max()))
    noisy = exact + noise
    assert float(torch.linalg.eigvalsh(normalized_statistics(noisy))[0]) < -0.2
    w, _ = _data(out_f, in_f, seed=6)
    got = factorize(w, noisy.to(dtype), rank=k, dtype=dtype)
    ref = factorize(w, exact, rank=k)
    approx = got.u.double() @ got.v.double()
    assert torch.isfinite(approx).all()
    base = whitened_error(w, torch.zeros_like(w), x)
    err, ref_err = whitened_error(w, approx, x), whitened_error(w, ref.u @ ref.v, x)
    assert err <= ref_err + 1e-3 * base
    assert err < whitened_error(w, _plain_svd(w, k), x)


def test_non_finite_statistics_raise() -> None:
    w, x = _data(8, 8)
    c = x.T @ x
    c[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        factorize(w, c, rank=2)


def test_randomized_solver_is_close_to_exact() -> None:
    g = torch.Generator().manual_seed(4)
    w = torch.randn(256, 384, generator=g, dtype=torch.float64)
    x = torch.randn(2000, 384, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, 384, dtype=torch.float64)
    c = x.T @ x
    exact = factorize(w, c, rank=40)
    fast = factorize(w, c, rank=40, solver="randomized")
    assert exact.rel_error <= fast.rel_error <= exact.rel_error * 1.005
    again = factorize(w, c, rank=40, solver="randomized")
    assert torch.equal(fast.u, again.u)  # seeded: resumable builds stay bit-identical


def test_factor_norms_are_balanced() -> None:
    w, x = _data(30, 20)
    f = factorize(w, x.T @ x, rank=8)
    assert torch.allclose(f.u.norm(dim=0), f.v.norm(dim=1), rtol=1e-8)


def test_bad_arguments() -> None:
    w, x = _data(8, 6)
    with pytest.raises(ValueError, match="does not fit"):
        factorize(w, torch.eye(5, dtype=torch.float64), rank=2)
    with pytest.raises(ValueError, match="rank"):
        factorize(w, x.T @ x, rank=0)
