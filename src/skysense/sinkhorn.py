"""Sinkhorn-Knopp: a balanced soft assignment of samples to clusters or prototypes.

Used twice in SkySense pretraining: to cluster pixel features into objects (multi-granularity
contrast) and to assign fused features to their region's prototypes (geo-context learning).
Follows SwAV (Caron et al., 2020), computed in the log domain so small ``epsilon`` is stable.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def sinkhorn_knopp(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    iterations: int = 100,
    row_sums: torch.Tensor | None = None,
    col_sums: torch.Tensor | None = None,
    tolerance: float = 1e-4,
) -> torch.Tensor:
    """Transport plan ``Q`` (N, K) proportional to ``exp(scores / epsilon)`` with set marginals.

    Batched: ``scores`` of shape (..., N, K) solves one independent problem per leading index
    (e.g. one clustering per image) in the same tensor operations, which on a CPU is many times
    faster than a Python loop over small problems. The loop stops once every problem meets the
    tolerance; a problem that converged earlier keeps being rescaled, which only moves it
    further inside its tolerance.

    Args:
        scores: (..., N, K) similarities of N samples to K clusters.
        epsilon: entropic regularisation; smaller is closer to a hard assignment.
        iterations: maximum number of row/column scaling rounds.
        row_sums: (N,) target sum of each row; default 1 (each sample is one distribution).
        col_sums: (K,) target sum of each column; default N / K (equal cluster sizes).
        tolerance: stop once every column sum is within this of its target.

    Returns:
        ``Q`` with rows summing exactly to ``row_sums`` and columns to ``col_sums`` within
        ``tolerance`` (or the best reached in ``iterations`` rounds).
    """
    if scores.ndim < 2:
        raise ValueError(f"sinkhorn_knopp: scores must be (N, K) or (..., N, K), got shape {tuple(scores.shape)}")
    n, k = scores.shape[-2:]
    scores = scores.float()
    rows = torch.ones(n, device=scores.device) if row_sums is None else row_sums.float()
    cols = torch.full((k,), n / k, device=scores.device) if col_sums is None else col_sums.float()
    if not torch.isclose(rows.sum(), cols.sum(), rtol=1e-4):
        raise ValueError(
            f"sinkhorn_knopp: row sums total {rows.sum().item():.6g} but column sums total "
            f"{cols.sum().item():.6g}; they must be equal"
        )
    log_q = scores / epsilon
    log_rows, log_cols = rows.log()[:, None], cols.log()[None, :]
    for _ in range(iterations):
        log_q = log_q + (log_cols - torch.logsumexp(log_q, dim=-2, keepdim=True))
        log_q = log_q + (log_rows - torch.logsumexp(log_q, dim=-1, keepdim=True))
        if (log_q.exp().sum(-2) - cols).abs().max() < tolerance:
            break
    return log_q.exp()
