"""Gauge families: continuous groups acting on named parameters that leave the network's function
unchanged.

Notation: a Linear weight W has shape (out, in); "rows" are outputs. Every family acts on a
``params`` mapping (parameter name -> tensor, e.g. ``dict(model.named_parameters())``) and offers

- ``sample(generator)``: a random group element (a dict of tensors),
- ``apply(params, element)``: the action, in place,
- ``tangents(params)``: the vertical (orbit) directions at ``params``, one per Lie-algebra generator,
- ``pairings(params, grads)``: the inner products <grads, tangent_k> for all k at once (a gradient of
  an invariant loss pairs to zero with every vertical direction),
- ``orbit_coordinates(params)``: coordinates that move along the orbit and that a gauge-respecting
  optimizer must hold fixed.

The families (ddc.md section 2):

``LogitShift``     W -> W + 1 a^T, b -> b + c 1 for a Linear whose output only feeds a softmax over its
                   outputs (the LM head, kind "logit_shift"; an MoE router, kind "router_shift").
``NeuronScaling``  rows (and bias) of the producing Linear times a_i > 0, columns of the consuming
                   Linears divided by a_i, for units that pass through positively homogeneous maps
                   (ReLU, the linear factor of a gated unit, identity).
``NormScaling``    gain g_j (and LayerNorm bias) times s_j > 0, column j of every consumer Linear
                   divided by s_j, when the norm output feeds Linear layers only.
``HeadRotation``   per key/value head g, an orthogonal R_g in the group that commutes with the
                   positional map: W_Q^h -> R_g W_Q^h for every query head h reading g, W_K^g -> R_g W_K^g
                   (kind "qk_rotation"); or W_V^g -> Q_g W_V^g, W_O[:, h] -> W_O[:, h] Q_g^T (kind
                   "vo_rotation").
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

Params = Mapping[str, torch.Tensor]
Element = dict[str, torch.Tensor]


#: The section constant ``c`` of a neuron unit's orbit (:func:`unit_section`): the norm a unit's incoming
#: side takes in canonical coordinates where its outgoing side is zero, in the units of the weights.
#: 1 is the row norm of a unit-variance-preserving initialisation (``std = 1 / sqrt(fan_in)``).
EDGE_SCALE = 1.0


def unit_section(size_squared: torch.Tensor, edge_scale: float = EDGE_SCALE) -> tuple[torch.Tensor, torch.Tensor]:
    """The point of a neuron unit's orbit that a gauge frame reads the unit at.

    A unit with incoming side ``w_in`` and outgoing side ``w_out`` has the orbit
    ``(a w_in, w_out / a)``, ``a > 0``, and one invariant, its size ``l = sqrt(|w_in| |w_out|)``. The
    section is the point of the orbit on the hyperbola ``|w_in|^2 - |w_out|^2 = c^2`` (``c`` =
    ``edge_scale``)::

        |w~_in|^2  = c^2 / 2 + sqrt(c^4 / 4 + l^4),      |w~_out|^2 = l^4 / |w~_in|^2

    It is a smooth function of ``l`` alone, equals the balanced point ``|w~_in| = |w~_out| = l`` for
    ``l >> c``, and is regular where the outgoing side is zero (``|w~_in| = c``); the pair's norm is
    ``rho^2 = |w~_in|^2 + |w~_out|^2 = sqrt(c^4 + 4 l^4) >= c^2``. Takes ``l^2`` (any shape) and returns
    the two sides' squared norms, computed without cancellation or overflow.
    """
    half = 0.5 * edge_scale**2
    incoming = torch.hypot(size_squared, torch.full_like(size_squared, half)).add_(half)
    return incoming, size_squared.square() / incoming


def _like(params: Params, name: str) -> dict:
    p = params[name]
    return {"dtype": p.dtype, "device": p.device}


def _log_uniform(n: int, spread: float, generator: torch.Generator | None, **like) -> torch.Tensor:
    """Positive scales exp(u), u ~ U(-spread, spread)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1
    return torch.exp(spread * u).to(**like)


@dataclass(frozen=True)
class AxisRef:
    """The slices of parameter ``name`` along ``axis``: slice i belongs to unit i.

    With ``inner > 1`` unit ``i`` owns the ``inner`` consecutive indices ``i * inner ... (i + 1) *
    inner - 1`` of the axis: the block of columns a channel of a ``(N, C, *spatial)`` feature map
    occupies in a Linear after ``flatten(1)`` (``inner = prod(spatial)``). The axis then has
    ``units * inner`` entries and the slice of unit ``i`` is that block.
    """

    name: str
    axis: int
    inner: int = 1

    def __post_init__(self):
        if self.inner < 1:
            raise ValueError(f"AxisRef({self.name!r}, {self.axis}): inner must be >= 1, got {self.inner}")

    def units(self, shape: tuple[int, ...] | torch.Size) -> int:
        """The number of units along the axis of a tensor of ``shape``."""
        return shape[self.axis] // self.inner

    def unit_view(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` with the axis split into ``(units, inner)`` (``t`` itself when ``inner`` is 1); the
        units run along ``axis`` of the view."""
        return t if self.inner == 1 else t.unflatten(self.axis, (-1, self.inner))

    def slices(self, params: Params) -> torch.Tensor:
        """The parameter with the unit axis moved first and the rest flattened: (units, -1)."""
        p = self.unit_view(params[self.name])
        return p.movedim(self.axis, 0).reshape(p.shape[self.axis], -1)

    def slice(self, t: torch.Tensor, i: int) -> torch.Tensor:
        """Unit ``i``'s slice of ``t`` (a view, the axis kept with ``inner`` entries)."""
        return t.narrow(self.axis, i * self.inner, self.inner)

    def scale_(self, params: Params, factors: torch.Tensor) -> None:
        """Multiply unit i's slice by ``factors[i]``, in place."""
        p = params[self.name]
        shape = [1] * p.dim()
        shape[self.axis] = -1
        p.mul_(factors.repeat_interleave(self.inner).reshape(shape))


class GaugeFamily:
    """Base class: a named group action on some parameters."""

    kind: ClassVar[str]
    name: str

    @property
    def parameters(self) -> tuple[str, ...]:
        raise NotImplementedError

    @property
    def dim(self) -> int:
        """Dimension of the (identity component of the) group."""
        raise NotImplementedError

    def sample(self, params: Params, generator: torch.Generator | None = None, spread: float = 0.5) -> Element:
        raise NotImplementedError

    def identity(self, params: Params) -> Element:
        raise NotImplementedError

    def apply(self, params: Params, element: Element) -> None:
        raise NotImplementedError

    def inverse(self, element: Element) -> Element:
        raise NotImplementedError

    def tangents(self, params: Params) -> Iterator[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def pairings(self, params: Params, grads: Params) -> torch.Tensor:
        raise NotImplementedError

    def orbit_coordinates(self, params: Params) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        """Short human description of how the group acts (for summaries)."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------
# Translations
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitShift(GaugeFamily):
    """W -> W + 1 a^T, b -> b + c 1: every output logit moves by the same a.x + c, which a softmax over
    the outputs does not see. Group R^(in) (x R with a bias)."""

    name: str
    weight: str
    features: int  # in_features of the weight: the shift vector's length
    bias: str | None = None
    softmax_site: str = "model output"
    kind: str = "logit_shift"  # or "router_shift" for a softmax inside the model

    @property
    def parameters(self) -> tuple[str, ...]:
        return (self.weight,) if self.bias is None else (self.weight, self.bias)

    @property
    def dim(self) -> int:
        return self.features + (self.bias is not None)

    def identity(self, params: Params) -> Element:
        e = {"row": torch.zeros(self.features, **_like(params, self.weight))}
        if self.bias is not None:
            e["bias"] = torch.zeros((), **_like(params, self.weight))
        return e

    def sample(self, params: Params, generator=None, spread: float = 0.5) -> Element:
        w = params[self.weight]
        scale = spread * w.detach().abs().mean().clamp_min(1e-3).item()
        e = {"row": (torch.randn(w.shape[1], generator=generator, dtype=torch.float64) * scale).to(**_like(params, self.weight))}
        if self.bias is not None:
            e["bias"] = (torch.randn((), generator=generator, dtype=torch.float64) * scale).to(**_like(params, self.weight))
        return e

    def inverse(self, element: Element) -> Element:
        return {k: -v for k, v in element.items()}

    @torch.no_grad()
    def apply(self, params: Params, element: Element) -> None:
        params[self.weight].add_(element["row"].unsqueeze(0))
        if self.bias is not None:
            params[self.bias].add_(element["bias"])

    def tangents(self, params: Params) -> Iterator[dict[str, torch.Tensor]]:
        w = params[self.weight]
        for k in range(w.shape[1]):
            t = torch.zeros_like(w)
            t[:, k] = 1
            yield {self.weight: t}
        if self.bias is not None:
            yield {self.bias: torch.ones_like(params[self.bias])}

    def pairings(self, params: Params, grads: Params) -> torch.Tensor:
        out = [grads[self.weight].sum(0)]
        if self.bias is not None:
            out.append(grads[self.bias].sum().reshape(1))
        return torch.cat(out)

    def orbit_coordinates(self, params: Params) -> torch.Tensor:
        """The mean row of W (and the mean bias): exactly what the shift moves."""
        out = [params[self.weight].mean(0)]
        if self.bias is not None:
            out.append(params[self.bias].mean().reshape(1))
        return torch.cat(out)

    def describe(self) -> str:
        return f"rows of {self.weight} shifted by a shared vector (softmax at {self.softmax_site})"


# --------------------------------------------------------------------------------------------------
# Positive diagonal rescalings
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DiagonalScaling(GaugeFamily):
    """Slices in ``multiplied`` times a_i, slices in ``divided`` divided by a_i, a in R_+^units."""

    name: str
    units: int
    multiplied: tuple[AxisRef, ...]
    divided: tuple[AxisRef, ...]

    @property
    def parameters(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.name for r in (*self.multiplied, *self.divided)))

    @property
    def dim(self) -> int:
        return self.units

    def identity(self, params: Params) -> Element:
        return {"scale": torch.ones(self.units, **_like(params, self.multiplied[0].name))}

    def sample(self, params: Params, generator=None, spread: float = 0.5) -> Element:
        return {"scale": _log_uniform(self.units, spread, generator, **_like(params, self.multiplied[0].name))}

    def inverse(self, element: Element) -> Element:
        return {"scale": 1 / element["scale"]}

    @torch.no_grad()
    def apply(self, params: Params, element: Element) -> None:
        a = element["scale"]
        for ref in self.multiplied:
            ref.scale_(params, a)
        for ref in self.divided:
            ref.scale_(params, 1 / a)

    def tangents(self, params: Params) -> Iterator[dict[str, torch.Tensor]]:
        """d/dt at a = exp(t e_i): +slice on the multiplied side, -slice on the divided side."""
        for i in range(self.units):
            t: dict[str, torch.Tensor] = {}
            for sign, refs in ((1.0, self.multiplied), (-1.0, self.divided)):
                for ref in refs:
                    p = params[ref.name]
                    d = t.setdefault(ref.name, torch.zeros_like(p))
                    ref.slice(d, i).add_(sign * ref.slice(p.detach(), i))
            yield t

    def pairings(self, params: Params, grads: Params) -> torch.Tensor:
        total = 0
        for sign, refs in ((1.0, self.multiplied), (-1.0, self.divided)):
            for ref in refs:
                total = total + sign * (ref.slices(grads) * ref.slices(params)).sum(1)
        return total

    @staticmethod
    def side_norms(params: Params, refs: tuple[AxisRef, ...]) -> torch.Tensor:
        """Per-unit Euclidean norm of all slices of one side taken together."""
        return torch.sqrt(sum(ref.slices(params).pow(2).sum(1) for ref in refs))

    def orbit_coordinates(self, params: Params, edge_scale: float = EDGE_SCALE) -> torch.Tensor:
        """``log(|multiplied side_i| / |w~_in|)``, ``w~_in`` the incoming side at the orbit's section
        point (:func:`unit_section`): moves by ``log a_i`` under the action, finite wherever the
        multiplied side is not zero (also where the divided side is), and exactly what a DDC
        optimizer's step holds for an isolated unit (docs/ddc.md)."""
        incoming, outgoing = self.side_norms(params, self.multiplied), self.side_norms(params, self.divided)
        section, _ = unit_section(incoming * outgoing, edge_scale)
        return torch.log(incoming) - 0.5 * torch.log(section)


@dataclass(frozen=True)
class NeuronScaling(_DiagonalScaling):
    """Units of a positively homogeneous layer: the producing Linear's rows (and bias) times a_i, the
    consuming Linears' columns divided by a_i."""

    producer: str = ""
    kind: str = "neuron_scale"

    def describe(self) -> str:
        mult = ", ".join(f"{r.name}[{'rows' if r.axis == 0 else f'axis {r.axis}'}]" for r in self.multiplied)
        div = ", ".join(f"{r.name}[cols]" for r in self.divided)
        return f"{self.units} units: {mult} x a, {div} / a"


@dataclass(frozen=True)
class NormScaling(_DiagonalScaling):
    """Channels of an affine norm whose output feeds Linear layers only: gain (and bias) times s_j,
    consumer columns divided by s_j."""

    gain: str = ""
    bias: str | None = None
    consumers: tuple[str, ...] = ()
    kind: str = "norm_scale"

    def orbit_coordinates(self, params: Params) -> torch.Tensor:
        """log|g_j|: the gain is the gauge-fixed frame of the channel (ddc.md section 4)."""
        return torch.log(params[self.gain].abs())

    def describe(self) -> str:
        extra = f" and {self.bias}" if self.bias else ""
        return f"{self.units} channels: {self.gain}{extra} x s, columns of {', '.join(self.consumers)} / s"


def norm_scaling(name: str, gain: str, bias: str | None, consumers: tuple[str, ...], channels: int) -> NormScaling:
    multiplied = (AxisRef(gain, 0),) + ((AxisRef(bias, 0),) if bias else ())
    divided = tuple(AxisRef(c, 1) for c in consumers)
    return NormScaling(name, channels, multiplied, divided, gain=gain, bias=bias, consumers=consumers)


# --------------------------------------------------------------------------------------------------
# Per-head rotations
# --------------------------------------------------------------------------------------------------


def rotation_blocks(algebra: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    """Partition of the head dimensions into the blocks that the Lie algebra couples."""
    d = algebra.shape[-1]
    parent = list(range(d))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    coupled = (algebra.abs().sum(0) > 1e-9).nonzero().tolist() if algebra.numel() else []
    for i, j in coupled:
        parent[find(i)] = find(j)
    blocks: dict[int, list[int]] = {}
    for i in range(d):
        blocks.setdefault(find(i), []).append(i)
    return tuple(tuple(b) for b in blocks.values())


def full_rotation_algebra(d: int) -> torch.Tensor:
    """Basis E_ij - E_ji (i < j) of so(d), shape (d(d-1)/2, d, d), float64."""
    i, j = torch.triu_indices(d, d, offset=1)
    basis = torch.zeros(len(i), d, d, dtype=torch.float64)
    k = torch.arange(len(i))
    basis[k, i, j], basis[k, j, i] = 1.0, -1.0
    return basis


@dataclass(frozen=True, eq=False)
class HeadRotation(GaugeFamily):
    """Per key/value head g an orthogonal matrix R_g = exp(sum_k c_k X_k) with X_k in ``algebra``.

    ``row_index[h, i]`` is the row of the left-side weights holding dimension i of head h (the same
    indexing applies to its bias); ``query_group[h]`` is the key/value head that query head h reads.

    kind "qk_rotation": left side = query rows (indexed by query head, rotated by R_{group[h]}) and key
    rows (indexed by kv head); no right side. The algebra is the commutant of the positional map's
    relative rotations inside so(head_dim): all of so(head_dim) without RoPE, one plane generator per
    distinct RoPE frequency with it.
    kind "vo_rotation": left side = value rows (by kv head); right side = output-projection columns
    ``col_index[h, i]`` for query head h, multiplied by R_{group[h]}^T.
    """

    name: str
    kind: str
    algebra: torch.Tensor  # (k, head_dim, head_dim) skew-symmetric basis, float64
    query_group: tuple[int, ...]  # kv head of each query head
    left: tuple[tuple[str, str | None, torch.Tensor, bool], ...]  # (weight, bias, row_index (heads, d), by_query_head)
    right: tuple[tuple[str, torch.Tensor], ...] = ()  # (weight, col_index (query heads, d))

    @property
    def head_dim(self) -> int:
        return self.algebra.shape[-1]

    @property
    def n_kv_heads(self) -> int:
        return max(self.query_group) + 1

    @property
    def parameters(self) -> tuple[str, ...]:
        names = []
        for w, b, _, _ in self.left:
            names += [w] + ([b] if b else [])
        names += [w for w, _ in self.right]
        return tuple(dict.fromkeys(names))

    @property
    def blocks(self) -> tuple[tuple[int, ...], ...]:
        """Blocks of head dimensions mixed by the group (RoPE planes; the non-rotary rest)."""
        return rotation_blocks(self.algebra)

    @property
    def dim(self) -> int:
        return self.n_kv_heads * self.algebra.shape[0]

    def _like(self, params: Params) -> dict:
        return _like(params, self.left[0][0])

    def identity(self, params: Params) -> Element:
        eye = torch.eye(self.head_dim, **self._like(params))
        return {"rotation": eye.expand(self.n_kv_heads, -1, -1).clone()}

    def sample(self, params: Params, generator=None, spread: float = 0.5) -> Element:
        coeffs = torch.randn(self.n_kv_heads, self.algebra.shape[0], generator=generator, dtype=torch.float64)
        generators = torch.einsum("gk,kij->gij", coeffs * spread * math.pi, self.algebra)
        return {"rotation": torch.linalg.matrix_exp(generators).to(**self._like(params))}

    def inverse(self, element: Element) -> Element:
        return {"rotation": element["rotation"].transpose(-1, -2).contiguous()}

    def _left_heads(self, by_query_head: bool) -> list[tuple[int, int]]:
        """(row-block index, kv head) pairs for one left-side weight."""
        if by_query_head:
            return list(enumerate(self.query_group))
        return [(g, g) for g in range(self.n_kv_heads)]

    @torch.no_grad()
    def apply(self, params: Params, element: Element) -> None:
        rot = element["rotation"]
        for weight, bias, rows, by_query in self.left:
            for tensor_name in (weight, bias):
                if tensor_name is None:
                    continue
                p = params[tensor_name]
                for block, g in self._left_heads(by_query):
                    idx = rows[block].to(p.device)
                    p[idx] = torch.tensordot(rot[g], p[idx], dims=1)
        for weight, cols in self.right:
            p = params[weight]
            for h, g in enumerate(self.query_group):
                idx = cols[h].to(p.device)
                p[:, idx] = p[:, idx] @ rot[g].T

    def _generator_tangent(self, params: Params, g: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
        t: dict[str, torch.Tensor] = {}
        for weight, bias, rows, by_query in self.left:
            for tensor_name in (weight, bias):
                if tensor_name is None:
                    continue
                p = params[tensor_name].detach()
                d = t.setdefault(tensor_name, torch.zeros_like(p))
                for block, head_g in self._left_heads(by_query):
                    if head_g == g:
                        idx = rows[block].to(p.device)
                        d[idx] += torch.tensordot(x, p[idx], dims=1)
        for weight, cols in self.right:
            p = params[weight].detach()
            d = t.setdefault(weight, torch.zeros_like(p))
            for h, head_g in enumerate(self.query_group):
                if head_g == g:
                    idx = cols[h].to(p.device)
                    d[:, idx] -= p[:, idx] @ x
        return t

    def tangents(self, params: Params) -> Iterator[dict[str, torch.Tensor]]:
        like = self._like(params)
        for g in range(self.n_kv_heads):
            for x in self.algebra:
                yield self._generator_tangent(params, g, x.to(**like))

    def pairings(self, params: Params, grads: Params) -> torch.Tensor:
        out = []
        for t in self.tangents(params):
            out.append(sum((grads[n] * v).sum() for n, v in t.items()))
        return torch.stack(out) if out else torch.zeros(0)

    def orbit_coordinates(self, params: Params) -> torch.Tensor:
        """Rotations have no gauge-fixed coordinate here: returns an empty tensor."""
        return torch.zeros(0, **self._like(params))

    def describe(self) -> str:
        sizes = sorted({len(b) for b in self.blocks})
        what = "query/key rows" if self.kind == "qk_rotation" else "value rows, output columns"
        return (f"{self.n_kv_heads} kv heads x {self.algebra.shape[0]} generators on {what} "
                f"(head_dim {self.head_dim}, blocks of size {sizes})")
