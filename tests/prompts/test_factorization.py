import pytest
import torch

from pfpl.prompts.factorization import eq4_gradient, factorize, orthonormalise


def _gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_factors_are_orthonormal_and_residual_closes_the_sum():
    p = torch.randn(3, 16, 64, dtype=torch.float64)
    u, v, r = factorize(p, 4, _gens(3))
    eye = torch.eye(4, dtype=torch.float64)
    assert torch.allclose(u.transpose(-1, -2) @ u, eye.expand(3, 4, 4), atol=1e-10)
    assert torch.allclose(v @ v.transpose(-1, -2), eye.expand(3, 4, 4), atol=1e-10)
    assert torch.allclose(u @ v + r, p, atol=1e-12)


def test_fresh_random_start_each_call_and_one_stream_per_prompt():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(1, 16, 64, dtype=torch.float64)
    u1, _, _ = factorize(p, 2, [gen])
    u2, _, _ = factorize(p, 2, [gen])
    assert not torch.allclose(u1, u2)
    both = factorize(p.expand(2, 16, 64), 2, _gens(2, 5))[0]
    alone = factorize(p, 2, _gens(1, 6))[0]
    assert torch.allclose(both[1], alone[0]) and not torch.allclose(both[0], both[1])
    with pytest.raises(ValueError, match="generators"):
        factorize(p.expand(2, 16, 64), 2, _gens(1))


def test_eq4_is_the_tangent_projection_of_the_full_gradient():
    p = torch.randn(1, 16, 64, dtype=torch.float64)
    u, v, _ = factorize(p, 8, _gens(1, 1))
    u, v, p = u[0], v[0], p[0]
    g = torch.randn(16, 64, dtype=torch.float64)  # dL/dP for any loss through u·v
    grad_u, grad_v = g @ v.T, u.T @ g  # chain rule through P = u·v + r
    expected = g @ v.T @ v + u @ u.T @ g - u @ u.T @ g @ v.T @ v
    assert torch.allclose(eq4_gradient(grad_u, grad_v, u, v), expected, atol=1e-10)


def test_eq4_differs_from_the_published_sign_flip():
    p = torch.randn(1, 16, 64, dtype=torch.float64)
    u, v, _ = factorize(p, 4, _gens(1, 2))
    u, v, p = u[0], v[0], p[0]
    g = torch.randn(16, 64, dtype=torch.float64)
    grad_u, grad_v = g @ v.T, u.T @ g
    published = (grad_u @ v + u @ grad_v + u @ u.T @ grad_u @ v) / 10
    assert not torch.allclose(eq4_gradient(grad_u, grad_v, u, v), published, atol=1e-3)


def test_rank_bounds_and_qr_signs():
    with pytest.raises(ValueError, match="rank"):
        factorize(torch.randn(1, 4, 8), 5, _gens(1))
    x = torch.randn(10, 3, dtype=torch.float64)
    q = orthonormalise(x)
    assert (torch.diagonal(q.T @ x) > 0).all()
