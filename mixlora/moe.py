"""The MixLoRA sparse MoE that replaces a decoder layer's FFN: E LoRA experts on the shared frozen FFN weights."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mixlora.lora import adapter_dtype, dora_row_norm, init_lora_A
from mixlora.routing import SWITCH, TOP_K, TOP_P, Routing, switch_selection, top_p_selection
from mixlora.rows import AdapterRows
from mixlora_kernels import ops
from mixlora_kernels.activations import activation

# FFN layouts, detected from the FFN module's children; first match wins. in-projections read x, the last one is
# the down projection. `fused` is Phi-3's gate_up_proj (gate rows first, then up rows).
FFN_KINDS = {
    "gated": ("gate_proj", "up_proj", "down_proj"),  # llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3
    "fused": ("gate_up_proj", "down_proj"),  # phi3
    "ungated": ("fc1", "fc2"),  # phi
}
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3 (text)", "phi", "phi3")

# Hugging Face activation names -> the activations the kernels implement (gelu_fast is the tanh formula too).
ACTIVATION_ALIASES = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                      "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}


def ffn_kind(mlp: nn.Module) -> str | None:
    for kind, names in FFN_KINDS.items():
        if all(isinstance(getattr(mlp, n, None), nn.Linear) for n in names):
            return kind
    return None


def require_ffn_kind(mlp: nn.Module) -> str:
    """`ffn_kind(mlp)`, or a ValueError naming the module, the layouts we know and the supported architectures."""
    kind = ffn_kind(mlp)
    if kind is None:
        raise ValueError(f"unsupported FFN module {type(mlp).__name__}: expected children "
                         f"{' or '.join('/'.join(n) for n in FFN_KINDS.values())} (nn.Linear); "
                         f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return kind


def kernel_activation(name: str) -> str:
    if name not in ACTIVATION_ALIASES:
        raise ValueError(f"activation {name!r} is not supported by the MixLoRA kernels; "
                         f"supported: {sorted(ACTIVATION_ALIASES)}")
    return ACTIVATION_ALIASES[name]


def _router_dtype(dtype: torch.dtype) -> torch.dtype:
    """The router runs in fp32, or fp64 in a fp64 model."""
    return torch.promote_types(dtype, torch.float32)


class ExpertLoRA(nn.Module):
    """E LoRA adapters of one FFN projection, stacked: `lora_A` (E, R, in), `lora_B` (E, out, R), zero-initialised B;
    DoRA adds `lora_magnitude_vector` (E, out) initialised to the base weight's row norms. In `adapter_dtype` of the
    base (fp32 over a bf16 base)."""

    def __init__(self, base: nn.Linear, num_experts: int, settings) -> None:
        super().__init__()
        factory = {"device": base.weight.device, "dtype": adapter_dtype(base.weight.dtype)}
        self.lora_A = nn.Parameter(torch.empty(num_experts, settings.r, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, base.out_features, settings.r, **factory))
        init_lora_A(self.lora_A.data, settings.lora_init)
        self.lora_magnitude_vector = None
        if settings.use_dora:
            norm = dora_row_norm(base.weight, self.lora_A, self.lora_B, settings.scaling)
            self.lora_magnitude_vector = nn.Parameter(norm.to(**factory))


def dense_in(ffn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The frozen in-projections of an FFN with projection children (`ffn.kind`, `FFN_KINDS`), once per token.

    x (T, H) -> (G, U), each (T, I) contiguous: W1 x and W3 x (U None for an ungated FFN; Phi-3's fused gate_up_proj
    is split into its gate and up halves).
    """
    if ffn.kind == "fused":
        G, U = ffn.gate_up_proj(x).chunk(2, dim=-1)
    elif ffn.kind == "gated":
        G, U = ffn.gate_proj(x), ffn.up_proj(x)
    else:
        G, U = ffn.fc1(x), None
    return G.contiguous(), None if U is None else U.contiguous()


class MoeExperts(nn.Module):
    """One MixLoRA adapter's part of an FFN: the router `moe_gate` (E, H) fp32 and `experts[<projection>]`, over
    frozen projections owned by `MixLoraSparseMoe` (`ffn`, passed to every method), which holds one of these per
    adapter name.

    Routing per `routing_strategy` (docs/algorithm.md §1): top-k ("mixlora", K slots per token), top-p
    ("mixlora-dynamic", E slots per token, zero weights past the threshold) or switch ("mixlora-switch", 1 slot per
    token, zero weight for tokens over the expert capacity, which pass their input through instead). Every strategy
    runs the same kernels (or, for DoRA, the same per-expert loop).

    The router logits of the last forward are kept in `router_logits` (T, E) fp32 for the aux loss; `expert_load`
    (E,) counts the slots each expert received that carry a token (zero-weight padding slots of top-p and dropped
    switch tokens are not counted; padding tokens are; this process only: under DDP's default
    `broadcast_buffers=True` other ranks see rank 0's counts).
    """

    def __init__(self, ffn: nn.Module, config, activation_name: str) -> None:
        super().__init__()
        kind = require_ffn_kind(ffn)
        self.kind, self.projections = kind, FFN_KINDS[kind]
        down = getattr(ffn, self.projections[-1])
        hidden, self.num_experts, self.top_k = down.out_features, config.num_experts, config.top_k
        self.routing_strategy = config.routing_strategy
        self.top_p, self.temperature = config.top_p, config.temperature
        self.expert_capacity = config.expert_capacity
        self.ffn_dropout = config.ffn_dropout if self.routing_strategy == SWITCH else 0.0
        settings = config.expert_config()
        self.scaling, self.lora_dropout = settings.scaling, settings.lora_dropout
        self.use_dora = settings.use_dora
        self.activation = kernel_activation(activation_name)
        self.jitter_noise = config.jitter_noise
        self.moe_gate = nn.Linear(hidden, self.num_experts, bias=False, device=down.weight.device,
                                  dtype=_router_dtype(down.weight.dtype))
        nn.init.normal_(self.moe_gate.weight, std=config.router_init_range)
        self.experts = nn.ModuleDict({name: ExpertLoRA(getattr(ffn, name), self.num_experts, settings)
                                      for name in self.projections if name in config.target_modules})
        self.register_buffer("expert_load", torch.zeros(self.num_experts, dtype=torch.int64), persistent=False)
        self.router_logits: torch.Tensor | None = None

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` must not lower the router below fp32 (the published models keep it in fp32).
        super()._apply(fn, recurse)
        gate = self.moe_gate.weight
        if gate.dtype != _router_dtype(gate.dtype):
            gate.data = gate.data.to(_router_dtype(gate.dtype))
        return self

    def jitter(self, x: torch.Tensor) -> torch.Tensor:
        """x ⊙ U(1−ε, 1+ε) in training with jitter_noise ε > 0, else x itself."""
        if self.training and self.jitter_noise > 0:
            return x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        return x

    @property
    def jitters_input(self) -> bool:
        """Whether the jitter applies to the FFN input (router and experts): in training, except for switch routing,
        whose jitter reaches the router only (`route`)."""
        return self.training and self.jitter_noise > 0 and self.routing_strategy != SWITCH

    def input_jitter(self, x: torch.Tensor) -> torch.Tensor:
        """`jitter(x)` when it applies to the FFN input (`jitters_input`), else x."""
        return self.jitter(x) if self.jitters_input else x

    def select(self, logits: torch.Tensor, seq_len: int | None = None):
        """This adapter's strategy on router logits (T, E): (weights (T, K'), experts (T, K') int64, kept (T, K')
        bool: the slot carries a token, passthrough (T,) or None: see `Routing`). `seq_len`: tokens per sequence
        (switch capacity; None: T is one sequence)."""
        if self.routing_strategy == TOP_K:
            weights, experts = ops.route(logits, self.top_k)
            return weights, experts, torch.ones_like(experts, dtype=torch.bool), None
        probs = torch.softmax(logits, dim=-1)
        if self.routing_strategy == TOP_P:
            return (*top_p_selection(probs, self.top_p, self.temperature), None)
        p_max, experts, routed = switch_selection(probs, self.expert_capacity, seq_len)
        zero = torch.zeros_like(p_max)
        return (torch.where(routed, p_max, zero).unsqueeze(-1), experts, routed.unsqueeze(-1),
                torch.where(routed, zero, p_max))

    def route(self, x: torch.Tensor, seq_len: int | None = None) -> Routing:
        """x (T, H) -> its `Routing`; keeps the logits, counts load. `seq_len`: tokens per sequence of x (x holds
        whole sequences, row-major), for the switch capacity; None: x is one sequence. Switch routing jitters the
        router's input here (training only)."""
        router_in = self.jitter(x) if self.routing_strategy == SWITCH else x
        logits = ops.router_logits(router_in, self.moe_gate.weight)
        self.router_logits = logits
        weights, experts, kept, passthrough = self.select(logits, seq_len)
        order, offsets = ops.sort_slots(experts, self.num_experts)
        with torch.no_grad():
            if self.routing_strategy == TOP_K:
                self.expert_load += offsets.diff()
            else:  # a scatter, not a boolean index: no host synchronisation
                self.expert_load.scatter_add_(0, experts.reshape(-1), kept.reshape(-1).long())
        return Routing(weights, experts, order, offsets, passthrough)

    def finish(self, y: torch.Tensor, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The layer output of this adapter's rows from the routed experts' sum y (T, H): switch adds the dropped
        tokens' passthrough p_max · x and applies `ffn_dropout` in training; the other strategies return y."""
        if routing.passthrough is not None:
            y = y + (routing.passthrough.unsqueeze(-1) * x.to(routing.passthrough.dtype)).to(y.dtype)
        if self.training and self.ffn_dropout > 0:
            y = F.dropout(y, self.ffn_dropout, training=True)
        return y

    def _lora(self, ffn: nn.Module, name: str | None, in_features: int, out_features: int, dtype: torch.dtype):
        """(A (E, R, in), B (E, out, R)) of projection `name` in the activations' `dtype`, or rank-0 stand-ins when it
        has no expert LoRA. fp32 adapters over a 16-bit base are cast (autograd carries the gradient back to the fp32
        parameters): every kernel sees one dtype, so 16-bit models get 16-bit tensor-core operands."""
        if name in self.experts:
            return self.experts[name].lora_A.to(dtype), self.experts[name].lora_B.to(dtype)
        w = getattr(ffn, self.projections[-1]).weight
        return (w.new_zeros(self.num_experts, 0, in_features, dtype=dtype),
                w.new_zeros(self.num_experts, out_features, 0, dtype=dtype))

    def _dropout_seeds(self) -> tuple[float, int, int]:
        """(LoRA dropout p, seed of the in-projection masks, seed of the down-projection masks)."""
        p = self.lora_dropout if self.training else 0.0
        # Dropout masks are hashed from these seeds (drawn from torch's CPU generator: no device sync; checkpointing
        # replays them); without dropout the global RNG is left alone.
        seed_in, seed_down = torch.randint(0, 2**31 - 1, (2,)).tolist() if p else (0, 0)
        return p, seed_in, seed_down

    def expert_in(self, ffn: nn.Module, x, G, U, routing: Routing):
        """docs/algorithm.md §2 between the dense GEMMs, for this adapter's experts on the projections of `ffn`.

        Args:
            x: (T, H) the tokens (after jitter); G, U: (T, I) contiguous, from `dense_in(ffn, x)` (U None ungated).
            routing: the routing of x, from `route` (slots of zero weight contribute nothing).
        Returns:
            (h̄ (T, I) in G's dtype, down delta (T, H) = s Σ_j w_j B2_e A2_e drop(h_j) in the accumulation dtype, or
            None when the down projection has no expert LoRA). The caller runs the frozen down GEMM on h̄ and adds
            the delta: splitting here lets several adapters share the three dense GEMMs.
        """
        weights, experts, order, offsets = routing.weights, routing.experts, routing.order, routing.offsets
        H, I = x.shape[1], G.shape[1]
        p, seed_in, seed_down = self._dropout_seeds()
        if self.kind == "fused":
            A, B = self._lora(ffn, "gate_up_proj", H, 2 * I, x.dtype)
            zg = zu = ops.lora_shrink(x, A, experts, order, offsets, p, seed_in)
            Bg, Bu = B[:, :I], B[:, I:]
        else:
            gate_name, up_name = ("gate_proj", "up_proj") if self.kind == "gated" else ("fc1", None)
            Ag, Bg = self._lora(ffn, gate_name, H, I, x.dtype)
            Au, Bu = self._lora(ffn, up_name, H, I, x.dtype)
            z = ops.lora_shrink(x, torch.cat([Ag, Au], dim=1), experts, order, offsets, p, seed_in)
            zg, zu = z.split([Ag.shape[1], Au.shape[1]], dim=1)
        down_name = self.projections[-1]
        Ad, Bd = self._lora(ffn, down_name, I, H, x.dtype)
        hbar, zd = ops.expand_act_combine(G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad, self.scaling,
                                          self.activation, p, seed_down)
        if down_name not in self.experts:
            return hbar, None
        return hbar, ops.lora_expand_combine(zd, Bd, weights, experts, order, offsets, self.scaling)

    def _expert_projection(self, ffn: nn.Module, name: str, e: int, rows: torch.Tensor) -> torch.Tensor:
        """Projection `name` of expert e on its rows: base + LoRA (DoRA-rescaled when configured)."""
        base = getattr(ffn, name)
        out = F.linear(rows, base.weight)
        if name in self.experts:
            lora = self.experts[name]
            A, B = lora.lora_A[e], lora.lora_B[e]
            dropped = F.dropout(rows, self.lora_dropout, self.training).to(A.dtype)
            delta = self.scaling * ((dropped @ A.T) @ B.T)
            if lora.lora_magnitude_vector is None:
                out = out + delta
            else:
                norm = dora_row_norm(base.weight, A, B, self.scaling)
                out = (lora.lora_magnitude_vector[e] / norm.to(delta.dtype)) * (out + delta)
            out = out.to(rows.dtype)
        return out if base.bias is None else out + base.bias

    def per_expert_forward(self, ffn: nn.Module, x, routing: Routing):
        """The routed experts' sum (T, H) for x (T, H) as a loop over experts, each running the base FFN with its own
        LoRA: DoRA rescales each expert's base projection, so the shared-base algorithm does not apply. Slots of
        zero weight are computed and weighted by 0 (as in the kernels). Synchronises on `offsets`."""
        weights, experts, order, offsets = routing.weights, routing.experts, routing.order, routing.offsets
        K = experts.shape[1]
        y = torch.zeros_like(x)
        bounds = offsets.tolist()
        for e in range(self.num_experts):
            slots = order[bounds[e]:bounds[e + 1]]
            if slots.numel() == 0:
                continue
            tokens = slots // K
            rows = x[tokens]
            if self.kind == "fused":
                g, u = self._expert_projection(ffn, "gate_up_proj", e, rows).chunk(2, dim=-1)
                h = activation(self.activation, g) * u
            elif self.kind == "gated":
                h = activation(self.activation, self._expert_projection(ffn, "gate_proj", e, rows)) \
                    * self._expert_projection(ffn, "up_proj", e, rows)
            else:
                h = activation(self.activation, self._expert_projection(ffn, "fc1", e, rows))
            out = self._expert_projection(ffn, self.projections[-1], e, h)
            y = y.index_add(0, tokens, (weights.reshape(-1)[slots].unsqueeze(-1) * out).to(y.dtype))
        return y


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class MixLoraSparseMoe(nn.Module):
    """Drop-in replacement of a decoder FFN, shared by one or more named MixLoRA adapters.

    Keeps the FFN's own projections as children under their own names (so the base state-dict keys do not change);
    `adapters[name]` is that adapter's `MoeExperts` (its router `moe_gate` and `experts[<projection>]`). Forward:
    (..., H) -> (..., H), the rows split among adapters by `rows` (`mixlora.rows.AdapterRows`): the three dense
    GEMMs run once over the rows of every LoRA/rsLoRA adapter, each adapter routes its own tokens among its own
    experts by its own routing strategy (the switch capacity counts per sequence: the input's second-last
    dimension, or one sequence for a 2-D input); a DoRA adapter's rows run `MoeExperts.per_expert_forward`.
    `activation` is the FFN's (an adapter's `act_fn` overrides it). `unwrap()` gives the replaced FFN back (to
    `mixlora.unload_mixlora`); it also runs while the adapters are disabled.
    """

    def __init__(self, mlp: nn.Module, configs: Mapping[str, object], activation: str,
                 rows: AdapterRows | None = None) -> None:
        super().__init__()
        self.kind = require_ffn_kind(mlp)
        self.projections = FFN_KINDS[self.kind]
        for name in self.projections:
            setattr(self, name, getattr(mlp, name))
        self.adapters = nn.ModuleDict({name: MoeExperts(self, config, config.act_fn or activation)
                                       for name, config in configs.items()})
        self._rows = rows if rows is not None else AdapterRows(list(configs))
        self._base_layer = (mlp,)  # outside the module tree: its projections are this module's children

    def unwrap(self) -> nn.Module:
        """The replaced FFN module (it shares its projections with this module)."""
        return self._base_layer[0]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._rows.disabled:
            return self._base_layer[0](hidden_states)
        shape = hidden_states.shape
        # Tokens per sequence, for the switch capacity: (batch, seq, H) has sequences of seq tokens; a 2-D (T, H)
        # input is one sequence (of each adapter's rows).
        seq_len = shape[-2] if hidden_states.dim() >= 3 else None
        x = hidden_states.reshape(-1, shape[-1])
        parts = [(self.adapters[name], start, end)
                 for name, start, end in self._rows.slices(x.shape[0], "MixLoraSparseMoe")]
        if any(a.jitters_input for a, _, _ in parts):
            # Jitter scales the FFN input too, so it has to happen before the shared GEMMs.
            x = _cat([a.input_jitter(x[start:end]) for a, start, end in parts])
        shared = [part for part in parts if not part[0].use_dora]
        shared_outs = iter(self._shared_base_forward(x, shared, seq_len, whole=len(shared) == len(parts))
                           if shared else ())
        outs = []
        for a, start, end in parts:
            if a.use_dora:
                xs = x[start:end]
                routing = a.route(xs, seq_len)
                outs.append(a.finish(a.per_expert_forward(self, xs, routing), xs, routing))
            else:
                outs.append(next(shared_outs))
        return _cat(outs).reshape(shape)

    def _shared_base_forward(self, x, parts, seq_len, whole: bool) -> list[torch.Tensor]:
        """docs/algorithm.md §2 for the rows of `parts` (all rows of x when `whole`): the three dense FFN GEMMs once
        over them, everything per expert at rank R; each part's output (rows, H)."""
        xs = x if whole else _cat([x[start:end] for _, start, end in parts])
        G, U = dense_in(self, xs)
        bounds, hbars, deltas, routings, at = [], [], [], [], 0
        for a, start, end in parts:
            n = end - start
            rows = slice(at, at + n)
            bounds.append(rows)
            at += n
            routing = a.route(xs[rows], seq_len)
            hbar, delta = a.expert_in(self, xs[rows], G[rows], None if U is None else U[rows], routing)
            hbars.append(hbar)
            deltas.append(delta)
            routings.append(routing)
        y = getattr(self, self.projections[-1])(_cat(hbars))
        return [a.finish(y[rows] if delta is None else y[rows] + delta.to(y.dtype), xs[rows], routing)
                for (a, _, _), rows, delta, routing in zip(parts, bounds, deltas, routings, strict=True)]
