"""One round of exact low-rank aggregation from two secure sums: what each side computes.

Sum ``"range"``: every client's ``w P Omega`` per adapted layer (with the probe columns).
Sum ``"corange"``: every client's ``w P^T Q`` per layer, its weight, its weight in the slot
of its rank (the server adds the tails of lower-rank clients itself, from the per-rank
totals), its group counts (grouped adapters) and ``w a`` for every other array. Weights
enter as ``w / weight_bound`` (at most 1), so every value is bounded by ``value_bound``;
what exceeds its bound is clipped and counted (:func:`fedlowrank.secure.secagg.quantise`).

The server then holds ``sum_k w_k P_k`` factored (:func:`fedlowrank.aggregation.sketch.recover`)
and hands it to :meth:`fedlowrank.aggregation.round.ServerRound.add_sum`: the rule, the
server learning rate, momentum and the tails act on it as on the replies one by one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from .ranks import Factors
from .round import ServerRound, factor_modules
from .validate import MAX_ABS_VALUE
from .sketch import PROBES, corange_sketch, range_basis, range_sketch, recover, sketch_matrix

RANGE, CORANGE = "range", "corange"
CLIP_COUNT_BOUND = 2**40
"""Values one client may report clipped (its count is summed like the rest)."""
LABELS = (RANGE, CORANGE)


@dataclass
class SketchPlan:
    """What the server tells every client about this round's two sums (the same for all).

    Parameters
    ----------
    seed : int
        Draws each layer's ``Omega`` (:func:`~fedlowrank.aggregation.sketch.sketch_matrix`).
    widths : dict
        Sketch width per adapted layer: exact when at least the rank of the sum.
    ranks : list of int
        The client ranks of the round, in slot order.
    groups : int
        Rows of ``s`` (1, or FairLoRA's groups).
    shapes : dict
        ``(d_out, d_in)`` per adapted layer, and the shape of every other array (``plain``).
    plain : list of str
        The arrays that are not adapter factors (heads, biases), summed as ``w a``.
    weight_bound : float
        A weight above it is clipped to it (and counted).
    value_bound : float
        Every sketched or summed value is clipped to ``+-value_bound`` (and counted).
    """

    seed: int
    widths: dict[str, int]
    ranks: list[int]
    groups: int
    shapes: dict[str, tuple[int, ...]]
    plain: list[str]
    weight_bound: float
    value_bound: float = MAX_ABS_VALUE
    extras: tuple[str, ...] = ()
    """Per-client metrics summed as ``w x value`` (their weighted means reported), e.g. ``train-loss``."""

    @property
    def modules(self) -> list[str]:
        return list(self.widths)

    def omega(self, module: str) -> np.ndarray:
        return sketch_matrix(self.seed, module, self.shapes[module][1], self.widths[module])

    def range_shapes(self) -> list[tuple[int, ...]]:
        """The shapes of a client's ``"range"`` vectors: ``G x d_out x (width + probes)`` per layer."""
        return [(self.groups, self.shapes[m][0], self.widths[m] + PROBES) for m in self.modules]

    def corange_shapes(self) -> list[tuple[int, ...]]:
        """The shapes of a client's ``"corange"`` vectors, in :func:`corange_contribution`'s order."""
        slots = (1 + len(self.ranks)) * self.groups + (self.groups if self.groups > 1 else 0)
        return ([(self.groups, self.shapes[m][1], self.widths[m]) for m in self.modules]
                + [(self.groups, self.shapes[m][0], PROBES) for m in self.modules]
                + [(slots,), (len(self.extras),), (1,)] + [tuple(self.shapes[k]) for k in self.plain])

    def range_bounds(self) -> list[float]:
        return [self.value_bound] * len(self.widths)

    def corange_bounds(self) -> list[float]:
        # layers' sketches, layers' probes, [weight, per-rank weights, group counts], weighted extras,
        # [values clipped so far], plain arrays
        layers = [self.value_bound] * (2 * len(self.widths))
        return layers + [1.0, self.value_bound, float(CLIP_COUNT_BOUND)] + [self.value_bound] * len(self.plain)


def plan_round(
    global_arrays: Mapping[str, np.ndarray], client_ranks: Iterable[int], seed: int, weight_bound: float,
    width: int | None = None, value_bound: float = MAX_ABS_VALUE, extras: Iterable[str] = (),
) -> SketchPlan:
    """The round's plan: sketch widths exact for these client ranks unless ``width`` is given."""
    ranks = sorted(set(int(r) for r in client_ranks))
    counts = list(client_ranks)
    if not counts or min(counts) < 1:
        raise ValueError(f"client ranks must be positive integers, got {counts}")
    widths, shapes = {}, {}
    groups = 1
    for module in factor_modules(global_arrays):
        u, s, v = (np.asarray(global_arrays[f"{module}.lora_{x}"]) for x in "USV")
        d_out, d_in = u.shape[0], v.shape[0]
        groups = int(np.atleast_2d(s).shape[0])
        exact = sum(min(r, d_out, d_in) for r in counts)  # the rank of each group's sum is at most this
        widths[module] = min(int(width), d_out, d_in) if width else min(exact, d_out, d_in)
        shapes[module] = (d_out, d_in)
    plain = [k for k in global_arrays if not any(k.startswith(f"{m}.lora_") for m in widths) and ".fold_" not in k]
    shapes.update({k: tuple(np.asarray(global_arrays[k]).shape) for k in plain})
    if not weight_bound > 0:
        raise ValueError(f"weight_bound must be positive, got {weight_bound}")
    return SketchPlan(int(seed), widths, ranks, groups, shapes, plain, float(weight_bound), float(value_bound), tuple(extras))


def _scaled_weights(plan: SketchPlan, weight: float, group_counts: np.ndarray | None) -> tuple[float, np.ndarray, int]:
    """``w / weight_bound`` (clipped to 1), the per-group product weights, and 1 if the weight was clipped."""
    clipped = int(weight > plan.weight_bound)
    scaled = min(float(weight), plan.weight_bound) / plan.weight_bound
    if plan.groups > 1:
        counts = np.asarray(group_counts, dtype=np.float64)
        if counts.shape != (plan.groups,):
            raise ValueError(f"{plan.groups} group counts needed, got shape {counts.shape}")
        clipped += int(np.count_nonzero(counts > plan.weight_bound))
        return scaled, np.minimum(counts, plan.weight_bound) / plan.weight_bound, clipped
    return scaled, np.array([scaled]), clipped


def _bounded(values: np.ndarray, bound: float) -> tuple[np.ndarray, int]:
    """``values`` clipped to ``+-bound`` (before weighting: the server then checks every sum against
    its total weight times the bound), and how many were clipped."""
    return np.clip(values, -bound, bound), int(np.count_nonzero(np.abs(values) > bound))


def _weighted_sketch(plan: SketchPlan, sketch: np.ndarray, product_weights: np.ndarray) -> tuple[np.ndarray, int]:
    bounded, clipped = _bounded(sketch, plan.value_bound)
    return bounded * product_weights[:, None, None], clipped


def range_contribution(plan: SketchPlan, arrays: Mapping[str, np.ndarray], weight: float,
                       group_counts: np.ndarray | None = None) -> tuple[list[np.ndarray], int]:
    """A client's vectors for the ``"range"`` sum, and how many weights and values it clipped."""
    _, product_weights, clipped = _scaled_weights(plan, weight, group_counts)
    ones = np.ones(plan.groups)
    out = []
    for module in plan.modules:
        u, s, v = (np.asarray(arrays[f"{module}.lora_{x}"]) for x in "USV")
        sketch, more = _weighted_sketch(plan, range_sketch(u, s, v, plan.omega(module), ones), product_weights)
        out.append(sketch)
        clipped += more
    return out, clipped


def corange_contribution(plan: SketchPlan, arrays: Mapping[str, np.ndarray], weight: float, bases: Mapping[str, np.ndarray],
                         group_counts: np.ndarray | None = None, extras: Mapping[str, float] | None = None,
                         clipped_before: int = 0) -> tuple[list[np.ndarray], int]:
    """A client's vectors for the ``"corange"`` sum (its rank read off its factors), and how many weights and values it clipped.

    ``extras`` gives the values of ``plan.extras``; ``clipped_before`` what the client clipped
    in the first sum (the count is summed, so the server learns only the total).
    """
    scaled, product_weights, clipped = _scaled_weights(plan, weight, group_counts)
    ones = np.ones(plan.groups)
    out = []
    rank = None
    for module in plan.modules:
        u, s, v = (np.asarray(arrays[f"{module}.lora_{x}"]) for x in "USV")
        rank = u.shape[1] if rank is None else rank
        basis = np.asarray(bases[module], dtype=np.float64)
        if basis.shape != (plan.groups, plan.shapes[module][0], plan.widths[module]):
            raise ValueError(f"'{module}': basis of shape {basis.shape}, expected {(plan.groups, plan.shapes[module][0], plan.widths[module])}")
        sketch, more = _weighted_sketch(plan, corange_sketch(u, s, v, basis, ones), product_weights)
        out.append(sketch)
        clipped += more
    for module in plan.modules:
        # The probes again, over the clients of this sum: the error estimate is of the sum that is recovered.
        u, s, v = (np.asarray(arrays[f"{module}.lora_{x}"]) for x in "USV")
        probes, more = _weighted_sketch(plan, range_sketch(u, s, v, plan.omega(module)[:, plan.widths[module]:], ones), product_weights)
        out.append(probes)
        clipped += more
    if rank is not None and rank not in plan.ranks:
        raise ValueError(f"this client's rank {rank} is not one the server assigned ({plan.ranks})")
    # [weight, weight per rank slot (per group: group counts per rank slot), group counts]
    slots = np.zeros((1 + len(plan.ranks)) * plan.groups + (plan.groups if plan.groups > 1 else 0))
    slots[0] = scaled
    if rank is not None:
        start = 1 + plan.ranks.index(rank) * plan.groups
        slots[start:start + plan.groups] = product_weights
    if plan.groups > 1:
        slots[-plan.groups:] = product_weights
    out.append(slots)
    extras = extras or {}
    missing = [name for name in plan.extras if name not in extras]
    if missing:
        raise ValueError(f"the secure round sums {missing}, which this client did not report")
    values, more = _bounded(np.array([float(extras[name]) for name in plan.extras]), plan.value_bound)
    out.append(scaled * values)
    clipped += more
    plain = []
    for key in plan.plain:
        values, more = _bounded(np.asarray(arrays[key], dtype=np.float64), plan.value_bound)
        plain.append(scaled * values)
        clipped += more
    out.append(np.array([float(clipped_before + clipped)]))
    out.extend(plain)
    return out, clipped


def check_sums(plan: SketchPlan, range_sum: list[np.ndarray], corange_sum: list[np.ndarray], clients: int) -> None:
    """Refuse sums that no ``clients`` honest clients could give (``ValueError`` naming which).

    A masked vector cannot be checked alone, but every honest value is clipped to the bound
    before its weight (at most 1) multiplies it: each summed array is within its total
    weight times the bound, rank slots add up to the weight, and the weight is positive. A
    sum that passes keeps every mean the round computes within the bound, so no client moves
    the global without bound (and none divides by a forged weight near zero).
    """
    layers, groups = len(plan.modules), plan.groups
    slots = corange_sum[2 * layers]
    weight = float(slots[0])
    slack = clients * 2.0**-40  # quantisation, generously: its error is below 2^-50 of each bound per client
    if not weight > slack:
        raise ValueError(f"the summed weight {weight * plan.weight_bound:g} is not positive")
    totals = slots[-groups:] if groups > 1 else np.array([weight])
    per_rank = slots[1:1 + len(plan.ranks) * groups].reshape(len(plan.ranks), groups)
    if np.any(totals < -slack) or np.any(totals > clients + slack):
        raise ValueError("summed group counts out of range")
    if np.any(per_rank < -slack) or np.any(per_rank > totals + slack) or np.any(np.abs(per_rank.sum(0) - totals) > slack * (1 + len(plan.ranks))):
        raise ValueError("the per-rank weights do not add up to the summed weight")
    limit = totals * plan.value_bound * (1 + 1e-9) + slack * plan.value_bound
    for name, arrays in (("range sketch", range_sum[:layers]), ("corange sketch", corange_sum[:layers]), ("probes", corange_sum[layers:2 * layers])):
        for module, values in zip(plan.modules, arrays, strict=True):
            if np.any(np.abs(values).reshape(groups, -1).max(1) > limit):
                raise ValueError(f"'{module}': the summed {name} exceeds the total weight x the value bound")
    weighted = [corange_sum[2 * layers + 1], *corange_sum[2 * layers + 3:]]
    if any(values.size and float(np.max(np.abs(values))) > weight * plan.value_bound * (1 + 1e-9) + slack * plan.value_bound for values in weighted):
        raise ValueError("a summed metric or array exceeds the total weight x the value bound")


def bases_from_range(plan: SketchPlan, range_sum: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Each layer's orthonormal ``Q`` (``G x d_out x width``) from the summed range sketches."""
    return {m: range_basis(y, plan.widths[m]) for m, y in zip(plan.modules, range_sum, strict=True)}


def add_to_round(server_round: ServerRound, plan: SketchPlan, range_sum: list[np.ndarray], bases: Mapping[str, np.ndarray],
                 corange_sum: list[np.ndarray], clients: int) -> dict[str, float]:
    """Recover ``sum_k w_k P_k`` per layer and add it to the round; the sketch's metrics.

    ``agg-sketch-error-rel``: the largest estimated ``||M - Q Q^T M|| / ||M||`` over layers,
    ``M`` the sum over the clients of the second sum (quantisation noise when the width is
    exact; more when a client dropped between the sums and the clients' ranks add up to
    more than a layer's smaller side).
    """
    check_sums(plan, range_sum, corange_sum, clients)
    modules = plan.modules
    layers = len(modules)
    products, errors = {}, []
    for index, module in enumerate(modules):
        basis = np.asarray(bases[module])
        found = recover(basis, corange_sum[index], np.concatenate([range_sum[index][:, :, : plan.widths[module]], corange_sum[layers + index]], 2))
        products[module] = Factors(*(t * plan.weight_bound if i == 1 else t for i, t in enumerate(found.factors)))
        errors.append(found.error)
    slots = corange_sum[2 * layers] * plan.weight_bound
    weight = float(slots[0])
    groups = plan.groups
    per_rank = {r: slots[1 + i * groups:1 + (i + 1) * groups] for i, r in enumerate(plan.ranks)}
    group_counts = slots[-groups:] if groups > 1 else None
    rank_weights = {r: (w if groups > 1 else float(w[0])) for r, w in per_rank.items()}
    weighted_extras, clipped = corange_sum[2 * layers + 1] * plan.weight_bound, corange_sum[2 * layers + 2]
    plain = {k: s * plan.weight_bound for k, s in zip(plan.plain, corange_sum[2 * layers + 3:], strict=True)}
    server_round.add_sum(products, weight, rank_weights, plain, clients, group_counts)
    metrics = {"agg-sketch-error-rel": max(errors, default=0.0), "secure-clipped": float(np.rint(clipped[0]))}
    if weight > 0:
        metrics.update({name: float(value / weight) for name, value in zip(plan.extras, weighted_extras)})
    return metrics

