"""Seeded rotations: orthogonality, inverse, the fast Walsh-Hadamard transform, and determinism."""

import pytest
import torch

from turboquant_hf import Rotation
from turboquant_hf.rotation import fwht

DIMS = (64, 80, 96, 112, 128, 256)
KINDS = ("hadamard", "dense")


def sylvester(dim: int) -> torch.Tensor:
    """Sylvester Hadamard matrix H_dim in float64: H_1 = [1], H_2n = [[H, H], [H, -H]]."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat((torch.cat((h, h), dim=1), torch.cat((h, -h), dim=1)), dim=0)
    return h


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dim", DIMS)
def test_matrix_is_orthogonal(dim, kind):
    """R R^T = R^T R = I to 1e-5 (float32)."""
    r = Rotation(dim, kind, seed=3).matrix()
    assert r.shape == (dim, dim) and r.dtype == torch.float32
    eye = torch.eye(dim)
    torch.testing.assert_close(r @ r.T, eye, rtol=0, atol=1e-5)
    torch.testing.assert_close(r.T @ r, eye, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dim", DIMS)
def test_rotate_matches_matrix_and_unrotate_inverts(dim, kind, generator):
    """rotate(x) = x @ R^T, unrotate(y) = y @ R, unrotate(rotate(x)) = x, norms preserved."""
    rotation = Rotation(dim, kind, seed=1)
    r = rotation.matrix().double()
    x = torch.randn(4, 5, dim, generator=generator)
    y = rotation.rotate(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), x.double() @ r.T, rtol=0, atol=1e-5)
    torch.testing.assert_close(rotation.unrotate(y).double(), y.double() @ r, rtol=0, atol=1e-5)
    torch.testing.assert_close(rotation.unrotate(y), x, rtol=0, atol=1e-5)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dim", (1, 2, 4, 8, 64, 128, 256))
def test_fwht_equals_sylvester_matmul(dim, generator):
    """fwht(x) == x @ H (float64), for leading dims too; dtype and shape are kept."""
    x = torch.randn(3, 2, dim, generator=generator, dtype=torch.float64)
    out = fwht(x)
    assert out.shape == x.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, x @ sylvester(dim), rtol=0, atol=1e-12)
    ints = torch.randint(-50, 50, (dim,), generator=generator, dtype=torch.float64)
    assert torch.equal(fwht(ints), ints @ sylvester(dim))  # integers: exact


def test_fwht_is_self_inverse_up_to_dim():
    """H H = dim * I, so fwht(fwht(x)) = dim * x."""
    x = torch.arange(128, dtype=torch.float64)
    assert torch.equal(fwht(fwht(x)), 128 * x)


@pytest.mark.parametrize("dim", (64, 128, 256))
def test_hadamard_is_scaled_sylvester_times_signs(dim):
    """For powers of two, R = H D / sqrt(dim) with D = diag(+-1)."""
    rotation = Rotation(dim, "hadamard", seed=5)
    assert rotation.kind == "hadamard" and rotation.dense is None
    signs = rotation.signs.double()
    assert set(signs.tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(rotation.matrix().double(), sylvester(dim) * signs / dim**0.5, rtol=0, atol=1e-7)
    assert rotation.nbytes == dim * 4 + dim * dim * 4  # the signs, and the matrix built from them above


@pytest.mark.parametrize("dim", (80, 96, 112, 24))
def test_non_power_of_two_hadamard_falls_back_to_dense(dim):
    """'hadamard' for dims that are not powers of two is the dense rotation of the same seed."""
    rotation = Rotation(dim, "hadamard", seed=7)
    assert rotation.requested == "hadamard" and rotation.kind == "dense" and rotation.signs is None
    assert torch.equal(rotation.matrix(), Rotation(dim, "dense", seed=7).matrix())
    assert rotation.nbytes == dim * dim * 4


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dim", (64, 96))
def test_seed_determines_rotation(dim, kind):
    """Same seed -> identical matrix; different seed -> different matrix."""
    a = Rotation(dim, kind, seed=11).matrix()
    assert torch.equal(a, Rotation(dim, kind, seed=11).matrix())
    assert not torch.allclose(a, Rotation(dim, kind, seed=12).matrix())


@pytest.mark.parametrize("kind", KINDS)
def test_independent_of_global_rng(kind):
    """Rotations use their own CPU generator: the global RNG neither affects them nor is consumed."""
    torch.manual_seed(1)
    a = Rotation(96, kind, seed=0).matrix()
    torch.manual_seed(2)
    state = torch.get_rng_state()
    b = Rotation(96, kind, seed=0).matrix()
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)


def test_dense_has_haar_sign_convention():
    """Dense R is Q of QR(G) with diag(R_qr) signs folded in, i.e. the unique QR with positive diagonal."""
    dim = 32
    gaussian = torch.randn(dim, dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    q = Rotation(dim, "dense", seed=4).matrix().double()
    upper = q.T @ gaussian  # G = Q U with U upper triangular and positive diagonal
    torch.testing.assert_close(torch.tril(upper, -1), torch.zeros(dim, dim, dtype=torch.float64), rtol=0, atol=1e-5)
    assert torch.all(torch.diagonal(upper) > 0)


def test_to_copies_state():
    """to(device) returns an equal rotation and leaves the original untouched."""
    rotation = Rotation(64, "hadamard", seed=2)
    moved = rotation.to("cpu")
    assert moved is not rotation and moved.kind == rotation.kind
    assert torch.equal(moved.matrix(), rotation.matrix())


def test_unknown_kind_raises():
    """Only 'hadamard' and 'dense' exist."""
    with pytest.raises(ValueError, match="rotation"):
        Rotation(64, "givens")
