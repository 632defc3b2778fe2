"""CPU `mixlora::expand_act_combine` and its backward: per-slot gate/up LoRA expand on the shared base, activation,
routing-weighted combine h̄ and the down-LoRA shrink; the backward recomputes g, u, h instead of storing them.

Layout: slots in expert-sorted order, cut into tiles of at most `tile_rows(I)` rows of one expert. A tile gathers its
tokens' rows of G and U, adds its expert's rank-R expansion with one in-place addmm, and runs every elementwise step
on (rows, I) blocks that stay in the L2 cache; h̄, dG and dU are accumulated per token with index_add (serial, so
deterministic). Measured on this 2-core Sapphire Rapids (1 thread, ten elementwise passes over a (512, 1536) fp32
block): 10.7 ms on the whole block, 3.6 ms in tiles of 32-128 rows; the old layout, token-major with permutations
of whole (S, I) arrays, paid a DRAM round trip per pass.
"""

from __future__ import annotations

from typing import Optional

import torch

from mixlora_kernels.activations import activation
from mixlora_kernels.checks import check_expand_act_combine
from mixlora_kernels.cpu._common import DropoutMask, acc_dtype, activation_and_grad, bounds, no_autocast

# fp32 elements per (rows, I) tile: 64 Ki = 256 KiB, so the half-dozen live tiles of the backward fit a 2 MiB L2.
_TILE_ELEMS = 2**16


def tile_rows(I: int) -> int:
    return max(8, _TILE_ELEMS // max(I, 1))


class _Tiles:
    """The routing of one call in expert-sorted order: per-position tokens and weights, and the tiles
    (expert, start, end) covering every non-empty expert segment."""

    def __init__(self, weights: torch.Tensor, experts: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor,
                 I: int, acc: torch.dtype) -> None:
        self.T, self.K = experts.shape
        self.S = self.T * self.K
        self.order = order
        self.tokens = order // self.K
        self.weights = weights.reshape(-1).to(acc).index_select(0, order).unsqueeze(-1)
        seg, rows = bounds(offsets), tile_rows(I)
        self.tiles = [(e, start, min(start + rows, seg[e + 1]))
                      for e in range(len(seg) - 1) for start in range(seg[e], seg[e + 1], rows)]

    def mask(self, I: int, dropout_p: float, seed: int) -> DropoutMask | None:
        """The down-LoRA dropout mask of the sorted slots (tile rows), None without dropout."""
        return DropoutMask(self.order, I, dropout_p, seed) if dropout_p else None

    def sorted(self, slot_major: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
        return slot_major.index_select(0, self.order).to(acc)

    def unsorted(self, expert_major: torch.Tensor) -> torch.Tensor:
        """(S, n) in expert-sorted order -> (S, n) in slot order."""
        out = torch.empty_like(expert_major)
        out[self.order] = expert_major
        return out


def _pre_activation(base: torch.Tensor, z_scaled: torch.Tensor | None, BT: torch.Tensor | None, e: int,
                    tokens: torch.Tensor, start: int, end: int, acc: torch.dtype) -> torch.Tensor:
    """base_t + s B_e z_j for the tile's slots, (rows, I) acc; z_scaled = s·z in sorted order (None at rank 0)."""
    pre = base.index_select(0, tokens).to(acc)
    if z_scaled is not None:
        pre.addmm_(z_scaled[start:end], BT[e])
    return pre


def _rank_inputs(z: torch.Tensor, B: torch.Tensor, scale: float, tiles: _Tiles, acc: torch.dtype):
    """(s·z in sorted order (S, R), Bᵀ per expert (E, R, I)), or (None, None) at rank 0."""
    if z.shape[1] == 0:
        return None, None
    return tiles.sorted(z, acc).mul_(scale), B.to(acc).transpose(1, 2)


@no_autocast
def expand_act_combine_forward(G: torch.Tensor, U: Optional[torch.Tensor], zg: torch.Tensor, Bg: torch.Tensor,
                               zu: torch.Tensor, Bu: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                               order: torch.Tensor, offsets: torch.Tensor, Ad: torch.Tensor, scale: float,
                               activation_name: str, dropout_p: float,
                               seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`mixlora::expand_act_combine` on CPU tensors: (h̄ (T, I) in G's dtype, zd (S, Rd) fp32, fp64 for fp64 input).
    G, U are read in their own dtype (bf16 rows are widened per tile); everything is computed in fp32."""
    check_expand_act_combine(G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad, activation_name, dropout_p)
    acc = acc_dtype(G, zg, Bg)
    T, I = G.shape
    Rd = Ad.shape[1]
    tiles = _Tiles(weights, experts, order, offsets, I, acc)
    zg_s, BgT = _rank_inputs(zg, Bg, scale, tiles, acc)
    zu_s, BuT = _rank_inputs(zu, Bu, scale, tiles, acc)
    AdT = Ad.to(acc).transpose(1, 2)
    hbar = G.new_zeros(T, I, dtype=acc)
    zd_sorted = G.new_zeros(tiles.S, Rd, dtype=acc)
    mask = tiles.mask(I, dropout_p, seed) if Rd else None
    for e, start, end in tiles.tiles:
        tokens = tiles.tokens[start:end]
        h = activation(activation_name, _pre_activation(G, zg_s, BgT, e, tokens, start, end, acc))
        if U is not None:
            h.mul_(_pre_activation(U, zu_s, BuT, e, tokens, start, end, acc))
        if Rd:
            h_in = h * mask.rows(start, end) if mask is not None else h
            torch.mm(h_in, AdT[e], out=zd_sorted[start:end])
        hbar.index_add_(0, tokens, h.mul_(tiles.weights[start:end]))
    if dropout_p and Rd:
        zd_sorted.mul_(1.0 / (1.0 - dropout_p))
    return hbar.to(G.dtype), tiles.unsorted(zd_sorted)


@no_autocast
def expand_act_combine_backward(
        grad_hbar: torch.Tensor, grad_zd: torch.Tensor, G: torch.Tensor, U: Optional[torch.Tensor], zg: torch.Tensor,
        Bg: torch.Tensor, zu: torch.Tensor, Bu: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
        order: torch.Tensor, offsets: torch.Tensor, Ad: torch.Tensor, scale: float, activation_name: str,
        dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                              torch.Tensor, torch.Tensor, torch.Tensor]:
    """`mixlora::expand_act_combine_backward` on CPU tensors: (dG, dU, dzg, dBg, dzu, dBu, dweights, dAd), each like
    its input (dU empty when U is None). g, u, h are recomputed per tile:
        dh_j = w_j dH̄_t + drop_j(Ad_eᵀ dzd_j);  dw_j = ⟨dH̄_t, h_j⟩;  dg_j = dh_j ⊙ u_j ⊙ σ'(g_j);  du_j = dh_j ⊙ σ(g_j)
    Per-expert weight gradients are summed tile by tile in sorted order (in-place addmm, deterministic).
    """
    check_expand_act_combine(G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad, activation_name, dropout_p,
                             grad_hbar, grad_zd)
    acc = acc_dtype(G, zg, Bg)
    T, I = G.shape
    Rg, Ru, Rd = zg.shape[1], zu.shape[1], Ad.shape[1]
    tiles = _Tiles(weights, experts, order, offsets, I, acc)
    zg_s, BgT = _rank_inputs(zg, Bg, scale, tiles, acc)
    zu_s, BuT = _rank_inputs(zu, Bu, scale, tiles, acc)
    Bg_acc, Bu_acc, Ad_acc = Bg.to(acc), Bu.to(acc), Ad.to(acc)
    grad_zd_s = tiles.sorted(grad_zd, acc)
    if dropout_p:
        grad_zd_s.mul_(1.0 / (1.0 - dropout_p))  # the mask's 1/(1-p), applied on the rank-R side
    dG = G.new_zeros(T, I, dtype=acc)
    dU = None if U is None else G.new_zeros(T, I, dtype=acc)
    dzg_s, dzu_s = G.new_empty(tiles.S, Rg, dtype=acc), G.new_empty(tiles.S, Ru, dtype=acc)
    dBg, dBu, dAd = (torch.zeros_like(t, dtype=acc) for t in (Bg, Bu, Ad))
    dw_s = G.new_empty(tiles.S, dtype=acc)
    mask = tiles.mask(I, dropout_p, seed) if Rd else None

    for e, start, end in tiles.tiles:
        tokens = tiles.tokens[start:end]
        w = tiles.weights[start:end]
        a, da = activation_and_grad(activation_name, _pre_activation(G, zg_s, BgT, e, tokens, start, end, acc))
        u = None if U is None else _pre_activation(U, zu_s, BuT, e, tokens, start, end, acc)
        h = a if u is None else a * u
        gh = grad_hbar.index_select(0, tokens).to(acc)
        torch.sum(gh * h, dim=-1, out=dw_s[start:end])
        if Rd:
            gzd = grad_zd_s[start:end]
            dh = torch.mm(gzd, Ad_acc[e])
            if mask is not None:
                keep = mask.rows(start, end)
                dh.mul_(keep)
                h.mul_(keep)  # h is no longer needed unmasked (a is kept for du)
            dAd[e].addmm_(gzd.T, h)
            dh.addcmul_(gh, w)
        else:
            dh = gh.mul_(w)
        dg = da.mul_(dh)
        if u is not None:
            dg.mul_(u)
            du = dh.mul_(a)
            if Ru:
                torch.mm(du, Bu_acc[e], out=dzu_s[start:end])
                dBu[e].addmm_(du.T, zu_s[start:end])
            dU.index_add_(0, tokens, du)
        if Rg:
            torch.mm(dg, Bg_acc[e], out=dzg_s[start:end])
            dBg[e].addmm_(dg.T, zg_s[start:end])
        dG.index_add_(0, tokens, dg)

    # dz = s Bᵀ dg; dB = s Σ dg zᵀ (z_s above is already s·z).
    dzg = tiles.unsorted(dzg_s.mul_(scale)) if Rg else torch.zeros_like(zg, dtype=acc)
    dzu = tiles.unsorted(dzu_s.mul_(scale)) if Ru else torch.zeros_like(zu, dtype=acc)
    dweights = tiles.unsorted(dw_s.unsqueeze(-1)).view(weights.shape)
    dU = G.new_empty(0) if U is None else dU.to(U.dtype)
    return (dG.to(G.dtype), dU, dzg.to(zg.dtype), dBg.to(Bg.dtype), dzu.to(zu.dtype), dBu.to(Bu.dtype),
            dweights.to(weights.dtype), dAd.to(Ad.dtype))
