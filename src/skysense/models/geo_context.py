"""Geo-context prototypes: region-specific prototypes chosen by latitude/longitude.

The paper splits the globe into N_R regions with N_p prototypes each. Fused features attend to
their region's prototypes and the result is concatenated: ``concat(F, softmax(F P^T / sqrt(d)) P)``.
During pretraining the prototypes are not trained by gradients: features are assigned to them
by Sinkhorn-Knopp and they follow an exponential moving average of the assigned features.

Choices where the paper is silent:
* Region grid: equal-area cells, ``lat_bands`` bands equally spaced in sin(latitude) times
  ``lon_bins`` equal longitude bins (see :class:`skysense.config.GeoContextConfig`).
* Prototype width equals the fusion width, so the attention needs no extra projection. At the
  huge size this is 4096 x 100 x 1024 = 419M values, stored as a buffer (not a gradient-trained
  parameter). The paper lists 215M for this module without stating the width.
* EMA target: the assignment-weighted mean of the features assigned to each prototype,
  ``P <- m P + (1 - m) (S^T F) / colsum(S)``; prototypes receiving no mass are left unchanged.

Under data parallelism the pretraining calls :meth:`GeoContextPrototypes.assign` and
:meth:`GeoContextPrototypes.ema_update` with ``distributed=True``: the balance and the EMA
target are over the global batch, and every process applies the same update.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from skysense.config import GeoContextConfig
from skysense.distributed import all_reduce_
from skysense.models.attention import attention
from skysense.sinkhorn import sinkhorn_knopp

ASSIGN_TOLERANCE = 1e-4
"""Default Sinkhorn-Knopp tolerance of :meth:`GeoContextPrototypes.assign` (on column sums)."""


def region_index(lat: torch.Tensor, lon: torch.Tensor, lat_bands: int, lon_bins: int) -> torch.Tensor:
    """Index of the equal-area grid cell holding each (lat, lon), in degrees.

    Rows run from the south pole northwards, columns from 180 W eastwards:
    ``index = band * lon_bins + bin``.
    """
    sin_lat = torch.sin(torch.deg2rad(lat.double()))
    band = torch.floor((sin_lat + 1.0) / 2.0 * lat_bands).long().clamp_(0, lat_bands - 1)
    column = torch.floor((lon.double() + 180.0) / 360.0 * lon_bins).long().clamp_(0, lon_bins - 1)
    return band * lon_bins + column


class GeoContextPrototypes(nn.Module):
    """Prototype bank ``(regions, prototypes, dim)`` and attentional integration."""

    def __init__(self, config: GeoContextConfig, dim: int) -> None:
        super().__init__()
        self.config = config
        self.dim = dim
        prototypes = F.normalize(torch.randn(config.num_regions, config.num_prototypes, dim), dim=-1)
        self.register_buffer("prototypes", prototypes)
        self.sdpa_backends: tuple[str, ...] | None = None  # attention.set_attention_backends

    def regions(self, lat: torch.Tensor, lon: torch.Tensor) -> torch.Tensor:
        return region_index(lat, lon, self.config.lat_bands, self.config.lon_bins).to(self.prototypes.device)

    def forward(self, features: torch.Tensor, lat: torch.Tensor, lon: torch.Tensor) -> torch.Tensor:
        """``features``: (B, D, H, W); ``lat``, ``lon``: (B,) degrees -> (B, 2D, H, W)."""
        b, d, h, w = features.shape
        protos = self.prototypes[self.regions(lat, lon)].to(features.dtype)  # (B, P, D)
        # (B, 1, HW, D): one head. Contiguous, or CUDA's fused SDPA kernels refuse the queries.
        queries = features.flatten(2).transpose(1, 2).contiguous()[:, None]
        # softmax(F P^T / sqrt(d)) P is SDPA with the prototypes as keys and values.
        context = attention(queries, protos[:, None], protos[:, None], backends=self.sdpa_backends)
        context = context[:, 0].transpose(1, 2).reshape(b, d, h, w)
        return torch.cat([features, context], dim=1)

    def present_regions(self, regions: torch.Tensor, distributed: bool = False,
                        bound: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Regions holding at least one feature, ascending, and the index of each feature's region.

        ``regions``: (N,) -> ``(present (R,), group (N,))`` with ``present[group] == regions``.
        With ``distributed`` (under torch.distributed) ``present`` covers every process's
        features, so it is the same list on every process.

        ``bound``: None reads the number of present regions back to the host (a host sync: on a
        GPU the queue drains and the GPU idles until Python queues more work). An upper bound on
        it instead (e.g. the number of samples, over every process when ``distributed``: each
        sample lies in one region) reads nothing back: ``present`` then has
        ``min(bound, num_regions)`` entries, the present regions ascending followed by absent
        ones, which no feature's ``group`` points at. A bound below the number of present
        regions fails an assertion on the device (on a GPU it surfaces at the next read-back,
        as a device-side assertion; on the CPU at once).
        """
        # Not bincount: on a GPU it reads the largest index back to size its output.
        counts = torch.zeros(self.config.num_regions, dtype=torch.long, device=regions.device)
        counts.index_add_(0, regions, torch.ones_like(regions))
        if distributed:
            all_reduce_(counts, "sum")
        if bound is None:
            present = counts.nonzero().flatten()  # the one read-back (host sync) of each call
            return present, torch.searchsorted(present, regions)
        # Present regions first (a stable sort keeps both parts ascending), then absent ones.
        absent = counts == 0
        order = torch.sort(absent.to(torch.uint8), stable=True).indices
        present = order[: min(bound, self.config.num_regions)]
        torch._assert_async((~absent).sum() <= len(present),
                            f"GeoContextPrototypes.present_regions: more regions hold features than the bound {bound}")
        slot = torch.zeros_like(counts)
        slot[present] = torch.arange(len(present), device=regions.device)
        return present, slot[regions]

    @torch.no_grad()
    def assign(self, features: torch.Tensor, regions: torch.Tensor, epsilon: float = 0.05,
               distributed: bool = False, bound: int | None = None, iterations: int = 100,
               tolerance: float | None = ASSIGN_TOLERANCE) -> torch.Tensor:
        """Balanced soft assignment of features to their own region's prototypes.

        ``features``: (N, D); ``regions``: (N,) region index of each feature.
        Returns ``S`` (N, P): each row sums to 1, and within each region the prototypes get equal
        total mass (Sinkhorn-Knopp on cosine similarities, every region solved at once).
        With ``distributed`` (under torch.distributed) the features are this process's share
        and the balance holds over every process's features, as for one process holding all.
        ``bound``: see :meth:`present_regions`; ``iterations``, ``tolerance``: Sinkhorn-Knopp's
        (:func:`~skysense.sinkhorn.sinkhorn_knopp`). With a ``bound`` and ``tolerance`` None
        nothing is read back to the host.
        """
        feats = F.normalize(features.float(), dim=-1)
        present, group = self.present_regions(regions, distributed, bound)
        # Every feature against every present region's prototypes in one product, then each
        # feature's own region picked: no per-region loop, and no read-back of which rows are
        # whose. The (N, R, P) scores are small next to a step (R: regions in the global batch).
        bank = F.normalize(self.prototypes[present].float(), dim=-1)  # (R, P, D)
        every = (feats @ bank.flatten(0, 1).T).unflatten(1, bank.shape[:2])  # (N, R, P)
        scores = every[torch.arange(len(group), device=group.device), group]
        return sinkhorn_knopp(scores, epsilon=epsilon, iterations=iterations, tolerance=tolerance, groups=group,
                              num_groups=len(present), distributed=distributed,
                              score_bound=1.0)  # cosine similarities

    @torch.no_grad()
    def ema_update(
        self, features: torch.Tensor, regions: torch.Tensor, assignment: torch.Tensor, momentum: float,
        distributed: bool = False, bound: int | None = None,
    ) -> None:
        """``P_r <- m P_r + (1 - m) (S_r^T F_r) / colsum(S_r)`` for every region present.

        With ``distributed`` (under torch.distributed) ``S_r^T F_r`` and ``colsum(S_r)`` are
        summed over every process's features, so every process applies the same update, the
        one a single process holding all the features would apply. ``bound``: see
        :meth:`present_regions` (with it, nothing is read back to the host).
        """
        feats = features.float()
        present, group = self.present_regions(regions, distributed, bound)
        # (R, P, D + 1): S_r^T F_r and, in the last channel, colsum(S_r); one all-reduce for both.
        # One product for every region: each feature's assignment placed in its region's block of
        # an (N, R * P) matrix (zeros elsewhere; regions of other processes stay zero).
        n, p = assignment.shape
        blocks = feats.new_zeros(n, len(present), p)
        blocks[torch.arange(n, device=group.device), group] = assignment.float()
        weighted = torch.cat([feats, feats.new_ones(n, 1)], dim=1)  # (N, D + 1)
        totals = (blocks.flatten(1).T @ weighted).unflatten(0, (len(present), p))
        if distributed:
            all_reduce_(totals, "sum")
        sums, masses = totals[..., :-1], totals[..., -1]
        target = sums / masses.clamp_min(1e-12)[..., None]
        current = self.prototypes[present].float()
        updated = torch.where(masses[..., None] > 0, momentum * current + (1 - momentum) * target, current)
        self.prototypes[present] = updated.to(self.prototypes.dtype)
