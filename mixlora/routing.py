"""The routing strategies of a MixLoRA adapter (docs/algorithm.md §1): which experts each token's slots go to and
with what weight, in the form the kernels take (`Routing`). Top-k is the `mixlora::route` op; top-p and switch are
torch on the router's probabilities."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

TOP_K, TOP_P, SWITCH = "mixlora", "mixlora-dynamic", "mixlora-switch"


def top_p_selection(probs: torch.Tensor, top_p: float, temperature: float = 0.0):
    """Top-p ("mixlora-dynamic") selection of each token's experts (docs/algorithm.md §1).

    probs (T, E) softmax probabilities -> (weights (T, E), experts (T, E) int64, kept (T, E) bool): with p = probs,
    or p / temperature when temperature > 0 (MoE-PEFT divides the probabilities, not the logits), the experts in
    descending p (ties: lower id first; NaN first, as `mixlora::route` does), `kept` true up to and including the
    first position at which the cumulative sum of p exceeds `top_p` (every position when none does), and weights
    p where kept, else 0 (not renormalised). Differentiable in probs through the weights.
    """
    if temperature > 0:
        probs = probs / temperature
    experts = torch.sort(probs.detach().nan_to_num(nan=float("inf")), dim=-1, descending=True, stable=True).indices
    values = probs.gather(1, experts)
    over = (values.detach().cumsum(-1) > top_p).long()
    kept = (over.cumsum(-1) - over) == 0  # no earlier position exceeded top_p
    return torch.where(kept, values, torch.zeros_like(values)), experts, kept


def switch_selection(probs: torch.Tensor, capacity: int, seq_len: int | None = None):
    """Top-1 with expert capacity ("mixlora-switch") of each token (docs/algorithm.md §1).

    probs (T, E), T = sequences × seq_len in row-major order (seq_len None: one sequence of T tokens) ->
    (p_max (T,), experts (T, 1) int64: the argmax (first on ties), routed (T,) bool: the token is among the first
    `capacity` tokens of its sequence, in sequence order, whose argmax is its expert; later ones are dropped).
    """
    T, E = probs.shape
    p_max, experts = probs.max(dim=-1)
    L = T if seq_len is None else seq_len
    if T and (L <= 0 or T % L):
        raise ValueError(f"mixlora-switch: {T} tokens are not a whole number of sequences of {L}")
    one_hot = F.one_hot(experts, E)
    priority = one_hot.view(T // max(L, 1), max(L, 1), E).cumsum(1).view(T, E) if T else one_hot
    routed = priority.gather(1, experts.unsqueeze(-1)).squeeze(-1) <= capacity
    return p_max, experts.unsqueeze(-1), routed


class Routing(NamedTuple):
    """The routing of T tokens onto K' slots each (`MoeExperts.route`), in the form the kernels take.

    weights (T, K') fp32/fp64: a slot's routing weight, 0 for a slot that carries no expert output (top-p: past the
    threshold; switch: a dropped token); experts (T, K') int64; order (S,), offsets (E+1,) from `sort_slots`;
    passthrough (T,) or None: switch only, the weight of the token's own input in the output (p_max for a dropped
    token, 0 for a routed one).
    """

    weights: torch.Tensor
    experts: torch.Tensor
    order: torch.Tensor
    offsets: torch.Tensor
    passthrough: torch.Tensor | None = None
