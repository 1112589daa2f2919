"""GaugeSet: the gauge families found on one model, bound to that model's parameters."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .families import EDGE_SCALE, Element, GaugeFamily, NeuronScaling, NormScaling

GroupElement = dict[str, Element]  # family name -> that family's element


def uncompiled(model: nn.Module) -> nn.Module:
    """The module that ``torch.compile(model)`` wraps (``OptimizedModule._orig_mod``), else ``model``.

    A compiled module holds the original's parameters under an ``_orig_mod.`` prefix; gauges name
    them as the original does, so a GaugeSet works with the compiled and the plain module alike.
    """
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):
        from torch._dynamo.eval_frame import OptimizedModule  # loaded already by whoever compiled

        while isinstance(model, OptimizedModule):
            model = model._orig_mod
    return model


@dataclass(frozen=True)
class Skipped:
    """A candidate that discovery looked at and left out."""

    site: str
    family: str
    reason: str


@dataclass(frozen=True)
class SummaryRow:
    family: str
    name: str
    parameters: tuple[str, ...]
    dimension: int
    action: str


class GaugeSummary(list):
    """Rows of :class:`SummaryRow`; ``str()`` renders an aligned table."""

    def __str__(self) -> str:
        header = ("family", "site", "group dim", "parameters")
        body = [(r.family, r.name.split(":", 1)[-1], str(r.dimension), ", ".join(r.parameters)) for r in self]
        widths = [max(len(x[i]) for x in [header, *body]) for i in range(3)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  " + header[3]]
        lines.append("-" * len(lines[0]))
        for row in body:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[3])
        lines.append(f"{len(self)} families, total group dimension {sum(r.dimension for r in self)}")
        return "\n".join(lines)


class GaugeSet:
    """The gauge families of a model.

    ``families`` are bound by parameter *name* to the model given at construction (the module
    inside a ``torch.compile`` wrapper, see :func:`uncompiled`); ``bind(other)`` re-targets them to a
    structurally identical model (e.g. a deep copy). ``skipped`` lists what discovery left out, with
    reasons; ``notes`` what the user should know about how it was found (printed by :meth:`summary`).
    """

    def __init__(self, families: Iterable[GaugeFamily], skipped: Iterable[Skipped], model: nn.Module,
                 notes: Iterable[str] = (), *, input_layers: Iterable[str] = (), output_layers: Iterable[str] = ()):
        self.families: tuple[GaugeFamily, ...] = tuple(families)
        self.skipped: tuple[Skipped, ...] = tuple(skipped)
        self.notes: tuple[str, ...] = tuple(notes)
        #: Weights of the linear layers that read the model's input, or write its output, directly (no
        #: other layer with parameters in between): the input projection or patch embedding and the
        #: output layer or LM head (what Muon recipes leave to AdamW). Found by ``find_gauges``.
        self.input_layers: tuple[str, ...] = tuple(input_layers)
        self.output_layers: tuple[str, ...] = tuple(output_layers)
        self.model = uncompiled(model)
        names = [f.name for f in self.families]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate gauge family names: {names}")
        params = self.params()
        missing = sorted({p for f in self.families for p in f.parameters if p not in params})
        if missing:
            raise ValueError(f"gauge families refer to parameters the model does not have: {missing}")

    # ----- access -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[GaugeFamily]:
        return iter(self.families)

    def __len__(self) -> int:
        return len(self.families)

    def __getitem__(self, name: str) -> GaugeFamily:
        for f in self.families:
            if f.name == name:
                return f
        raise KeyError(f"no gauge family {name!r}; have {[f.name for f in self.families]}")

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f.kind for f in self.families))

    def select(self, families: str | Iterable[str] | None) -> tuple[GaugeFamily, ...]:
        """Families whose kind or name is in ``families`` (all when None)."""
        if families is None:
            return self.families
        wanted = {families} if isinstance(families, str) else set(families)
        chosen = tuple(f for f in self.families if f.kind in wanted or f.name in wanted)
        unknown = wanted - {f.kind for f in chosen} - {f.name for f in chosen}
        if unknown:
            raise ValueError(f"unknown gauge families {sorted(unknown)}; this model has kinds {list(self.kinds)}")
        return chosen

    def params(self, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        return dict(uncompiled(self.model if model is None else model).named_parameters())

    def parameters_touched(self) -> set[str]:
        return {p for f in self.families for p in f.parameters}

    def bind(self, model: nn.Module) -> GaugeSet:
        """The same families bound to ``model``, which must have the same parameter names and shapes."""
        mine = {n: p.shape for n, p in self.params().items()}
        theirs = {n: p.shape for n, p in self.params(model).items()}
        if mine != theirs:
            diff = sorted(set(mine.items()) ^ set(theirs.items()))[:5]
            raise ValueError(f"cannot bind gauges to a model with different parameters: {diff}")
        return self.with_families(self.families, model)

    def with_families(self, families: Iterable[GaugeFamily], model: nn.Module | None = None) -> GaugeSet:
        """A GaugeSet of ``families`` with this one's skipped entries, notes and layer lists, bound to
        ``model`` (default: this one's)."""
        return GaugeSet(families, self.skipped, self.model if model is None else model, self.notes,
                        input_layers=self.input_layers, output_layers=self.output_layers)

    # ----- group operations ---------------------------------------------------------------------
    def sample(self, generator: torch.Generator | None = None, families: str | Iterable[str] | None = None,
               spread: float = 0.5) -> GroupElement:
        """A random element of the product of the selected families (all by default)."""
        params = self.params()
        return {f.name: f.sample(params, generator, spread) for f in self.select(families)}

    def identity(self) -> GroupElement:
        params = self.params()
        return {f.name: f.identity(params) for f in self.families}

    @torch.no_grad()
    def apply(self, model: nn.Module, element: GroupElement) -> None:
        """Apply ``element`` to ``model``'s parameters in place, family by family in its order.

        Families can share a matrix (a logit shift and the final norm's column scaling both act on
        the LM head), and not all such pairs commute: an element is the ordered product.
        """
        params = self.params(model)
        for name, e in element.items():
            self[name].apply(params, e)

    @torch.no_grad()
    def apply_inverse(self, model: nn.Module, element: GroupElement) -> None:
        """Undo :meth:`apply`: the inverse of each family's element, in reverse order."""
        params = self.params(model)
        for name, e in reversed(list(element.items())):
            family = self[name]
            family.apply(params, family.inverse(e))

    def merged_params(self, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Parameters with every norm gain folded into its consumers' columns (W~ = C diag(g)).

        The merged weights are invariant under the norm-scale gauges (ddc.md section 4), so
        coordinates read from them do not mix the norm gauge into the other families.
        """
        params = self.params(model)
        merged = dict(params)
        for f in self.families:
            if isinstance(f, NormScaling):
                gain = params[f.gain]
                for consumer in f.consumers:
                    merged[consumer] = merged[consumer] * gain
        return merged

    def orbit_coordinates(self, model: nn.Module | None = None, *, edge_scale: float = EDGE_SCALE
                          ) -> dict[str, torch.Tensor]:
        """Per family, coordinates that move along its own orbit and no other (detached copies).

        Norm scaling: log|g_j|. Neuron scaling: ``log(|in_i| / |w~_in|)`` with ``w~_in`` the incoming
        side at the section point of constant ``edge_scale`` (:func:`~gaugeopt.gauges.unit_section`,
        the frame of the DDC optimizers), and logit shift: the mean row, both read from the
        norm-merged weights (:meth:`merged_params`). Rotations: none (empty).
        """
        with torch.no_grad():
            merged = self.merged_params(model)
            raw = self.params(model)
            out = {}
            for f in self.families:
                if isinstance(f, NormScaling):
                    out[f.name] = f.orbit_coordinates(raw)
                elif isinstance(f, NeuronScaling):
                    out[f.name] = f.orbit_coordinates(merged, edge_scale)
                else:
                    out[f.name] = f.orbit_coordinates(merged)
            return {name: value.detach().clone() for name, value in out.items()}

    def pairings(self, grads: Mapping[str, torch.Tensor], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Per family, the inner products of ``grads`` with every vertical direction."""
        params = self.params(model)
        with torch.no_grad():
            return {f.name: f.pairings(params, grads) for f in self.families}

    # ----- reporting ----------------------------------------------------------------------------
    def summary(self, *, print_table: bool = True, show_skipped: bool = False) -> GaugeSummary:
        """Table of families: kind, site, group dimension, parameters. Printed unless told not to,
        followed by the notes and (with ``show_skipped``) the candidates left out."""
        rows = GaugeSummary(
            SummaryRow(f.kind, f.name, f.parameters, f.dim, f.describe()) for f in self.families
        )
        if print_table:
            print(rows)
            for note in self.notes:
                print(f"note: {note}")
            if show_skipped and self.skipped:
                print(f"\nleft out ({len(self.skipped)}):")
                for s in self.skipped:
                    print(f"  {s.family:<22} {s.site:<32} {s.reason}")
            elif self.skipped:
                print(f"({len(self.skipped)} candidates left out; summary(show_skipped=True) lists why)")
        return rows

    def __repr__(self) -> str:
        return f"GaugeSet({len(self.families)} families: {', '.join(self.kinds) or 'none'})"
