"""Sinkhorn-Knopp: a balanced soft assignment of samples to clusters or prototypes.

Used twice in SkySense pretraining: to cluster pixel features into objects (multi-granularity
contrast) and to assign fused features to their region's prototypes (geo-context learning).
Follows SwAV (Caron et al., 2020), computed in the log domain so small ``epsilon`` is stable.

Three shapes of problem, one iteration:

* dense: ``scores`` (N, K), or (..., N, K) for one independent problem per leading index;
* grouped: ``scores`` (N, K) with ``groups`` (N,): row ``i`` belongs to problem ``groups[i]``,
  and column ``k`` of problem ``g`` is a cluster of that problem only (e.g. prototype ``k`` of
  region ``g``), so problems of different sizes are solved together without padding;
* distributed (``distributed=True`` under torch.distributed with several processes): each
  process holds its own rows of the same problems; the column sums are all-reduced every
  iteration (SwAV's distributed Sinkhorn), so every row gets the value one process holding all
  rows would compute. Every process must call with the same leading shape, ``K``, number of
  groups and ``iterations``; with ``groups`` a process may hold no row of some groups.

Two domains, one sequence of iterates. The log domain (any scores) rescales ``log Q`` by
log-sum-exp reductions over rows and columns: about 18 operators per round for a dense problem
(22 grouped; counted without views by ``benchmarks/host_syncs.py``'s counter), each a kernel
launch on a GPU, and a max and a sum all-reduce per round when
distributed. When the caller bounds the scores (``score_bound``: cosine similarities are within
1) and ``2 * score_bound / epsilon <= SCALING_RANGE``, the rounds run on ``Q = diag(u) K
diag(v)`` with ``K = exp((scores - score_bound) / epsilon)`` fixed (SwAV's form): a product and
a division per side, about 5 operators per round (10 grouped) and one all-reduce. ``K`` is the
log domain's ``exp(scores / epsilon)`` times a constant, so the rounds produce the same plans up
to float32 rounding. The range limit keeps every entry of ``K`` (at least ``exp(-range)``) and
the scalings far from float32's underflow and overflow.
"""

from __future__ import annotations

import torch

from skysense.distributed import all_reduce_, is_distributed

SCALING_RANGE = 50.0
"""Largest ``2 * score_bound / epsilon`` run in the scaling domain (module docstring)."""


@torch.no_grad()
def sinkhorn_knopp(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    iterations: int = 100,
    row_sums: torch.Tensor | None = None,
    col_sums: torch.Tensor | None = None,
    tolerance: float | None = 1e-4,
    check_every: int = 10,
    groups: torch.Tensor | None = None,
    num_groups: int | None = None,
    distributed: bool = False,
    score_bound: float | None = None,
) -> torch.Tensor:
    """Transport plan ``Q`` (N, K) proportional to ``exp(scores / epsilon)`` with set marginals.

    Batched: ``scores`` of shape (..., N, K) solves one independent problem per leading index
    (e.g. one clustering per image) in the same tensor operations, which on a CPU is many times
    faster than a Python loop over small problems. The loop stops once every problem meets the
    tolerance; a problem that converged earlier keeps being rescaled, which only moves it
    further inside its tolerance.

    The tolerance is tested every ``check_every`` rounds only: each test reads a value back to
    the host, which on a GPU waits for all queued work and leaves the GPU idle until the next
    kernels are queued. Between tests the rounds queue without waiting; at most
    ``check_every - 1`` rounds run past convergence.

    Args:
        scores: (..., N, K) similarities of N samples to K clusters.
        epsilon: entropic regularisation; smaller is closer to a hard assignment.
        iterations: maximum number of row/column scaling rounds.
        row_sums: (N,) target sum of each row; default 1 (each sample is one distribution).
        col_sums: (K,) target sum of each column, or (G, K) per problem with ``groups``;
            default: the problem's total row sum / K (equal cluster sizes).
        tolerance: stop once every column sum is within this of its target; None: never
            test, run exactly ``iterations`` rounds. Without tests nothing is read back to the
            host, so on a GPU the rounds queue behind the rest of the step without idling it
            (SwAV runs a fixed 3 rounds).
        check_every: test the tolerance every this many rounds (1: every round).
        groups: (N,) problem index in ``[0, num_groups)`` of each row of 2-D ``scores``.
        num_groups: number of problems ``G``; default ``groups.max() + 1``; required when
            ``distributed`` (a process may hold no row of some groups, the last included).
        distributed: the rows are this process's share; sums run over every process.
        score_bound: a bound the caller guarantees on ``|scores|`` (1 for cosine similarities),
            or None; with ``2 * score_bound / epsilon <= SCALING_RANGE`` the rounds run in the
            scaling domain (the module docstring), with the same result and a quarter (dense)
            to under half (grouped) of the kernel launches per round.

    Computed in float32, also under autocast.

    Returns:
        ``Q`` with rows summing exactly to ``row_sums`` and columns to ``col_sums`` within
        ``tolerance`` (or the best reached in ``iterations`` rounds; with ``tolerance`` None,
        the plan after exactly ``iterations`` rounds).
    """
    if scores.ndim < 2:
        raise ValueError(f"sinkhorn_knopp: scores must be (N, K) or (..., N, K), got shape {tuple(scores.shape)}")
    if check_every < 1:
        raise ValueError(f"sinkhorn_knopp: check_every must be at least 1, got {check_every}")
    if tolerance is None:  # no test: a round number no round reaches
        check_every = iterations + 1
    distributed = distributed and is_distributed()
    n, k = scores.shape[-2:]
    scores = scores.float()
    rows = torch.ones(n, device=scores.device) if row_sums is None else row_sums.float()
    column = _ColumnReduction(scores, groups, num_groups, distributed)
    row_totals = column.sum(rows[:, None].expand(*scores.shape[:-1], 1))  # (..., 1, 1) or (G, 1)
    per_column = (*row_totals.shape[:-1], k)
    cols = (row_totals / k).expand(per_column) if col_sums is None else col_sums.float().expand(per_column)
    if row_sums is not None or col_sums is not None:  # else equal by construction: no check, no sync
        _check_totals(row_totals[..., 0], cols.sum(-1))
    if score_bound is not None and 2 * score_bound / epsilon <= SCALING_RANGE:
        kernel = ((scores - score_bound) / epsilon).exp()
        # In float32 under autocast too: the rounds' two products would otherwise run in bf16 in
        # mixed-precision training, leaving the plan's sums off by up to about 1%.
        with torch.autocast(scores.device.type, enabled=False):
            return _scaling_rounds(kernel, rows[:, None], cols, column, iterations, tolerance, check_every)
    log_q = scores / epsilon
    log_rows, log_cols = rows.log()[:, None], cols.log()
    for round_ in range(iterations):
        log_sums = column.logsumexp(log_q)  # (..., 1, K) or (G, K): the current column sums
        # Checked on the sums the column step needs anyway: no extra pass or collective per round.
        if round_ and round_ % check_every == 0 and (log_sums.exp() - cols).abs().max() < tolerance:
            break
        log_q = log_q + column.spread(log_cols - log_sums)
        log_q = log_q + (log_rows - torch.logsumexp(log_q, dim=-1, keepdim=True))
    return log_q.exp()


def _scaling_rounds(kernel: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, column: "_ColumnReduction",
                    iterations: int, tolerance: float, check_every: int) -> torch.Tensor:
    """The log domain's rounds on ``Q = diag(u) K diag(v)``: ``rows`` (N, 1), ``cols`` per problem."""
    # Whole, not an expanded view: a matmul would copy a broadcast operand
    # (tests/broadcast_matmuls.py finds such copies).
    u = rows.new_ones((*kernel.shape[:-1], 1))
    v = torch.ones_like(cols)
    for round_ in range(iterations):
        sums = column.weighted_sum(kernel, u)  # column sums of diag(u) K; Q's are v * sums
        if round_ and round_ % check_every == 0 and (v * sums - cols).abs().max() < tolerance:
            break
        v = cols / sums
        u = rows / column.row_products(kernel, v)
    return u * kernel * column.spread(v)


def _check_totals(row_totals: torch.Tensor, col_totals: torch.Tensor) -> None:
    unequal = ~torch.isclose(row_totals, col_totals, rtol=1e-4)
    if unequal.any():
        first = unequal.flatten().nonzero()[0, 0]
        raise ValueError(
            f"sinkhorn_knopp: row sums total {row_totals.flatten()[first].item():.6g} but column sums total "
            f"{col_totals.flatten()[first].item():.6g}; they must be equal"
        )


class _ColumnReduction:
    """Sums over the rows of each problem: over dim -2 (dense) or per group, then all processes."""

    def __init__(self, scores: torch.Tensor, groups: torch.Tensor | None, num_groups: int | None,
                 distributed: bool) -> None:
        if groups is not None:
            if scores.ndim != 2 or groups.shape != scores.shape[:1]:
                raise ValueError(f"sinkhorn_knopp: groups must be (N,) for scores (N, K), got groups "
                                 f"{tuple(groups.shape)} for scores {tuple(scores.shape)}")
            if num_groups is None and distributed:
                raise ValueError("sinkhorn_knopp: give num_groups with groups when distributed: "
                                 "every process must solve the same problems")
            if num_groups is None:
                num_groups = int(groups.max()) + 1 if groups.numel() else 0
        self.groups, self.num_groups, self.distributed = groups, num_groups, distributed

    def _reduce(self, values: torch.Tensor, reduce: str) -> torch.Tensor:
        if self.groups is None:
            return values.sum(-2, keepdim=True) if reduce == "sum" else values.amax(-2, keepdim=True)
        out = values.new_full((self.num_groups, values.shape[-1]), 0.0 if reduce == "sum" else -torch.inf)
        if reduce == "sum":
            return out.index_add_(0, self.groups, values)
        return out.scatter_reduce_(0, self.groups[:, None].expand_as(values), values, "amax")

    def spread(self, per_column: torch.Tensor) -> torch.Tensor:
        """(..., 1, K) or (G, K) per-problem values -> broadcastable to the rows."""
        return per_column if self.groups is None else per_column[self.groups]

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sums over each problem's rows, over all processes when distributed."""
        total = self._reduce(values, "sum")
        return all_reduce_(total, "sum") if self.distributed else total

    def weighted_sum(self, kernel: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
        """Column sums of ``row_weights * kernel`` ((..., N, 1) weights): ``u^T K`` per problem."""
        if self.groups is None:
            total = row_weights.transpose(-2, -1) @ kernel  # (..., 1, K): one product
            return all_reduce_(total, "sum") if self.distributed else total
        # A problem with no rows anywhere (target sums 0) gets scale 0 / tiny = 0, not 0 / 0.
        return self.sum(row_weights * kernel).clamp_min(torch.finfo(kernel.dtype).tiny)

    def row_products(self, kernel: torch.Tensor, per_column: torch.Tensor) -> torch.Tensor:
        """``K v`` for each row, with ``v`` per problem: (..., N, 1)."""
        if self.groups is None:
            return kernel @ per_column.transpose(-2, -1)
        return (kernel * per_column[self.groups]).sum(-1, keepdim=True)

    def logsumexp(self, log_q: torch.Tensor) -> torch.Tensor:
        """``log`` of every column sum of ``exp(log_q)``, over all processes when distributed."""
        peak = self._reduce(log_q, "max")
        if self.distributed:
            all_reduce_(peak, "max")
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        return peak + self.sum((log_q - self.spread(peak)).exp()).log()
