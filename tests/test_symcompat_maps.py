"""Equivariance of every symmetry-compatible update map under its block's group (float64).

Group elements act on a work matrix X (rows = units) as X -> Pi X Q (+ 1 v^T for a shared row
shift): Pi a permutation of the rows, Q an orthogonal map of the columns. For orientation "col"
the same element acts on the transpose.
"""

from __future__ import annotations

import pytest
import torch

from gaugeopt.optim import SymmetryCompatible
from gaugeopt.optim.layerwise import MAPS, apply_map, get_map, muon_update
from gaugeopt.optim.rules import adam_direction_, adam_scalars

F64 = torch.float64
TOL = 1e-10
MAP_NAMES = list(MAPS)
CENTERED_MAPS = [name for name in MAP_NAMES if MAPS[name].centered]
# Maps that are equivariant under the full O(rows) x O(cols), not only row permutations.
FULL_ORTHOGONAL_MAPS = ["muon", "right_spectral", "left_spectral"]
# (rows, cols): a tall vocabulary-like block and a wide router-like block.
SHAPES = [(12, 5), (4, 9)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=F64))
    return Q * torch.sign(torch.diagonal(R))


def random_permutation(n: int, seed: int) -> torch.Tensor:
    return torch.eye(n, dtype=F64)[torch.randperm(n, generator=gen(seed))]


def act(X: torch.Tensor, orientation: str, left: torch.Tensor, right: torch.Tensor, shift=None) -> torch.Tensor:
    """The group element (left on units, right on the other axis, optional shared unit shift)."""
    work = X if orientation == "row" else X.mT
    work = left @ work @ right
    if shift is not None:
        work = work + shift
    return work if orientation == "row" else work.mT


def phi(name: str, X: torch.Tensor, orientation: str) -> torch.Tensor:
    return apply_map(name, X, orientation)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def stored(shape: tuple[int, int], orientation: str, seed: int) -> torch.Tensor:
    """A stored parameter-shaped matrix whose work matrix (units as rows) has ``shape``."""
    X = torch.randn(*shape, generator=gen(seed), dtype=F64)
    return X if orientation == "row" else X.mT.contiguous()


@pytest.mark.parametrize("orientation", ["row", "col"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", MAP_NAMES)
def test_maps_commute_with_unit_permutations_and_orthogonal_maps(name, shape, orientation):
    rows, cols = shape
    X = stored(shape, orientation, seed=rows)
    Pi, Q = random_permutation(rows, 1), random_orthogonal(cols, 2)
    assert max_err(phi(name, act(X, orientation, Pi, Q), orientation), act(phi(name, X, orientation), orientation, Pi, Q)) <= TOL


@pytest.mark.parametrize("orientation", ["row", "col"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", FULL_ORTHOGONAL_MAPS)
def test_spectral_maps_commute_with_orthogonal_maps_on_both_sides(name, shape, orientation):
    rows, cols = shape
    X = stored(shape, orientation, seed=3)
    P, Q = random_orthogonal(rows, 4), random_orthogonal(cols, 5)
    assert max_err(phi(name, act(X, orientation, P, Q), orientation), act(phi(name, X, orientation), orientation, P, Q)) <= TOL


@pytest.mark.parametrize("orientation", ["row", "col"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", CENTERED_MAPS)
def test_centered_maps_are_shift_invariant_and_horizontal(name, shape, orientation):
    rows, cols = shape
    X = stored(shape, orientation, seed=6)
    shift = torch.ones(rows, 1, dtype=F64) @ torch.randn(1, cols, generator=gen(7), dtype=F64)
    identity_rows, identity_cols = torch.eye(rows, dtype=F64), torch.eye(cols, dtype=F64)
    shifted = act(X, orientation, identity_rows, identity_cols, shift)
    out = phi(name, X, orientation)
    assert max_err(phi(name, shifted, orientation), out) <= TOL
    unit_sums = out.sum(dim=0) if orientation == "row" else out.sum(dim=1)  # 1^T Phi over the units
    assert unit_sums.abs().max().item() <= 1e-12
    # and with a permutation, an orthogonal map and a shift at once
    Pi, Q = random_permutation(rows, 8), random_orthogonal(cols, 9)
    moved = act(X, orientation, Pi, Q, shift)
    assert max_err(phi(name, moved, orientation), act(out, orientation, Pi, Q)) <= TOL


@pytest.mark.parametrize("name", [n for n in MAP_NAMES if not MAPS[n].centered])
def test_uncentered_maps_are_not_horizontal(name):
    """Control for the test above: without centring, 1^T Phi is far from zero."""
    X = torch.randn(12, 5, generator=gen(10), dtype=F64) + 1.0
    assert phi(name, X, "row").sum(dim=0).abs().max().item() > 1e-3


def test_adamw_fails_the_orthogonal_cases_but_not_permutations():
    """Two AdamW steps from the same start: rotating the gradients does not rotate the steps."""
    grads = [torch.randn(12, 5, generator=gen(s), dtype=F64) for s in (11, 12)]
    Pi, Q = random_permutation(12, 13), random_orthogonal(5, 14)

    def adam_steps(gradients):  # the one Adam direction of gaugeopt.optim.rules, on a stack of one
        m, v = torch.zeros(1, 12, 5, dtype=F64), torch.zeros(1, 12, 5, dtype=F64)
        for t, g in enumerate(gradients, start=1):
            scalars = adam_scalars(0.9, 0.95, 1e-8, [t])
            scalars = type(scalars)(*(torch.tensor(x, dtype=F64) for x in scalars))
            direction = adam_direction_(g.unsqueeze(0).clone(), m, v, scalars)
        return direction[0]

    base = adam_steps(grads)
    assert max_err(adam_steps([Pi @ g for g in grads]), Pi @ base) <= TOL  # permutations: fine
    rotated_error = max_err(adam_steps([g @ Q for g in grads]), base @ Q)
    assert rotated_error > 0.1  # rotations: AdamW is not equivariant
    # whereas every symmetry-compatible map passes the same rotation
    for name in MAP_NAMES:
        assert max_err(phi(name, grads[0] @ Q, "row"), phi(name, grads[0], "row") @ Q) <= TOL


def test_headwise_muon_commutes_with_independent_per_head_rotations():
    heads, head_dim, d = 3, 4, 10
    W = torch.randn(heads * head_dim, d, generator=gen(15), dtype=F64)
    per_head = torch.block_diag(*[random_orthogonal(head_dim, 16 + h) for h in range(heads)])
    Q = random_orthogonal(d, 20)
    qkv = lambda X: apply_map("muon", X, "row", heads=heads)  # noqa: E731
    assert max_err(qkv(per_head @ W @ Q), per_head @ qkv(W) @ Q) <= TOL
    out_proj = lambda X: apply_map("muon", X, "col", heads=heads)  # noqa: E731
    assert max_err(out_proj(Q @ W.mT @ per_head.mT), Q @ out_proj(W.mT) @ per_head.mT) <= TOL
    # each head block is the Muon update of that block alone (with its own shape's scale)
    blocks = qkv(W).reshape(heads, head_dim, d)
    for h in range(heads):
        assert torch.allclose(blocks[h], muon_update(W[h * head_dim:(h + 1) * head_dim]), atol=1e-14)
    # control: a rotation that mixes heads is outside the per-head group, and head-wise Muon does
    # not commute with it
    mixing = random_orthogonal(heads * head_dim, 21)
    assert max_err(qkv(mixing @ W), mixing @ qkv(W)) > 1e-3


@pytest.mark.parametrize("name", ["muon", "row_norm", "hybrid", "centered_hybrid", "right_spectral"])
def test_expert_stacks_are_updated_per_expert(name):
    """A (E, rows, cols) stack: each expert's update is the map of that expert's matrix, so the map
    commutes with per-expert orthogonal (Muon: on both sides) elements and expert permutations."""
    E, rows, cols = 3, 6, 4
    stack = torch.randn(E, rows, cols, generator=gen(22), dtype=F64)
    out = apply_map(name, stack)
    for e in range(E):
        assert torch.allclose(out[e], apply_map(name, stack[e]), atol=1e-13)
    Qs = torch.stack([random_orthogonal(cols, 30 + e) for e in range(E)])
    Pis = torch.stack([random_permutation(rows, 40 + e) for e in range(E)])
    if name == "muon":
        Pis = torch.stack([random_orthogonal(rows, 50 + e) for e in range(E)])
    order = torch.tensor([2, 0, 1])
    moved = (Pis @ stack @ Qs)[order]
    assert max_err(apply_map(name, moved), (Pis @ out @ Qs)[order]) <= TOL


@pytest.mark.parametrize("name", ["muon", "row_norm", "centered_row_norm", "centered_left_spectral", "centered_hybrid"])
def test_optimizer_trajectory_is_equivariant(name):
    """Momentum is linear, so the whole optimizer trajectory commutes with the group (with weight decay)."""
    rows, cols = 6, 5
    W0 = torch.randn(rows, cols, generator=gen(60), dtype=F64)
    Pi, Q = random_permutation(rows, 61), random_orthogonal(cols, 62)
    a = torch.nn.Parameter(W0.clone())
    b = torch.nn.Parameter(Pi @ W0 @ Q)
    options = dict(rule=name, lr=0.05, weight_decay=0.1, nesterov=True)
    opt_a, opt_b = SymmetryCompatible([a], **options), SymmetryCompatible([b], **options)
    for step in range(4):
        G = torch.randn(rows, cols, generator=gen(70 + step), dtype=F64)
        a.grad, b.grad = G, Pi @ G @ Q
        opt_a.step()
        opt_b.step()
    assert max_err(b.detach(), Pi @ a.detach() @ Q) <= TOL
    # the AdamW rule, given the same treatment, does not follow the rotation
    c, d = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0 @ Q)
    opt_c, opt_d = SymmetryCompatible([c], rule="adamw", lr=0.05), SymmetryCompatible([d], rule="adamw", lr=0.05)
    for step in range(4):
        G = torch.randn(rows, cols, generator=gen(70 + step), dtype=F64)
        c.grad, d.grad = G, G @ Q
        opt_c.step()
        opt_d.step()
    assert max_err(d.detach(), c.detach() @ Q) > 1e-3


def test_registry_and_apply_errors():
    with pytest.raises(ValueError, match="unknown map 'rownorm'; known maps"):
        get_map("rownorm")
    X = torch.randn(4, 3, dtype=F64)
    with pytest.raises(ValueError, match="orientation"):
        apply_map("row_norm", X, "diagonal")
    with pytest.raises(ValueError, match="unexpected"):
        apply_map("row_norm", X, alpha=1.0)
    with pytest.raises(ValueError, match="unknown map 'adamw'"):  # a group's rule, not a map
        apply_map("adamw", X)
    with pytest.raises(ValueError, match="matrix"):
        apply_map("hybrid", torch.randn(4, dtype=F64))
    with pytest.raises(ValueError, match="does not divide"):
        apply_map("muon", X, heads=3)
