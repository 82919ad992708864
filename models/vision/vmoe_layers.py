"""V-MoE building blocks: router, batched experts and the MoE layer that replaces a ViT block's MLP.

The routing follows V-MoE ("Scaling Vision with Sparse Mixture of Experts", arXiv 2106.05974, and
its code in github.com/google-research/vmoe). A bias-free linear router computes logits, adds
Gaussian noise with std 1/E in training, takes the softmax over experts and selects the top k.
The combine weights are the selected softmax probabilities, not renormalised. Training also
computes V-MoE's importance and load auxiliary losses. Expert capacity with Batch Priority
Routing is optional.

The router returns ``(logits, top_k_weights, top_k_index)`` like the routers of Hugging Face
transformers 5.x. An index equal to the number of experts marks a dropped token-expert pair, as
in the experts modules of transformers 5.x.
"""
from __future__ import annotations

import math
from typing import Optional, Type

import torch
import torch.nn.functional as F
from torch import nn

CAPACITY_MULTIPLE = 4
"""Expert capacity is rounded up to a multiple of this, as in V-MoE's ``vmoe.moe.compute_capacity``."""

_CV_EPS = 1e-10


def squared_coefficient_of_variation(values: torch.Tensor) -> torch.Tensor:
    """Compute ``var(values) / mean(values)**2`` over the last dimension (population variance)."""
    mean = values.mean(dim=-1)
    variance = values.var(dim=-1, unbiased=False)
    return variance / (mean * mean + _CV_EPS)


def importance_loss(gates: torch.Tensor) -> torch.Tensor:
    """Compute V-MoE's importance loss from router probabilities ``gates`` of shape (T, E).

    V-MoE passes the softmax of the logits without noise.

    The importance of an expert is the sum of its gate probability over all tokens, and the loss
    is the squared coefficient of variation of the importances, so it is 0 when every expert gets
    the same total probability.
    """
    return squared_coefficient_of_variation(gates.sum(dim=0))


def load_loss(logits: torch.Tensor, noisy_logits: torch.Tensor, noise_std: float, top_k: int) -> torch.Tensor:
    """Compute V-MoE's load loss, a smooth estimate of how evenly tokens are assigned to experts.

    For each token, the threshold is its k-th largest noisy logit. Expert e keeps a place in the
    top-k under freshly sampled noise with probability ``P(logits[t, e] + n >= threshold)`` for
    ``n ~ N(0, noise_std**2)``, which is the normal CDF of ``(logits - threshold) / noise_std``.
    The load of an expert is that probability averaged over tokens, and the loss is the squared
    coefficient of variation of the loads.

    Args:
        logits: Router logits without noise, shape (T, E).
        noisy_logits: The same logits with the training noise added, shape (T, E).
        noise_std: Standard deviation of the noise; must be positive.
        top_k: Number of experts selected per token.
    """
    threshold = noisy_logits.topk(top_k, dim=-1).values[:, -1:]
    selection_probability = torch.special.ndtr((logits - threshold) / noise_std)
    return squared_coefficient_of_variation(selection_probability.mean(dim=0))


def compute_expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Return the number of token-expert pairs each expert accepts.

    The capacity is ``ceil(num_tokens * top_k * capacity_factor / num_experts)`` rounded up to a
    multiple of ``CAPACITY_MULTIPLE`` (4). A capacity factor of 0 gives capacity 0, where V-MoE
    raises an error instead.
    """
    capacity = math.ceil(num_tokens * top_k * capacity_factor / num_experts)
    remainder = capacity % CAPACITY_MULTIPLE
    if remainder:
        capacity += CAPACITY_MULTIPLE - remainder
    return capacity


def compute_capacity_mask(
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        num_experts: int,
        capacity: int,
        batch_priority: bool = False,
) -> torch.Tensor:
    """Return a bool mask of shape (T, k) that is True for the token-expert pairs within capacity.

    Pairs fill each expert's buffer in priority order: every token's first choice comes before
    any token's second choice, and so on by choice rank. Within a rank, tokens go in token order,
    or with ``batch_priority`` by their largest combine weight, highest first (V-MoE's Batch
    Priority Routing). An expert keeps its first ``capacity`` pairs and drops the rest.
    """
    num_tokens, top_k = top_k_index.shape
    device = top_k_index.device
    if batch_priority:
        token_order = torch.argsort(top_k_weights.amax(dim=-1), descending=True, stable=True)
    else:
        token_order = torch.arange(num_tokens, device=device)

    # Expert ids in priority order: rank 0 for all tokens, then rank 1, and so on.
    experts_in_priority_order = top_k_index[token_order].t().reshape(-1)

    # A stable sort by expert keeps the priority order inside each expert's group, so a pair's
    # position within its group is its place in that expert's buffer.
    sorted_experts, sort_order = torch.sort(experts_in_priority_order, stable=True)
    counts = torch.bincount(sorted_experts, minlength=num_experts)
    group_starts = torch.cumsum(counts, dim=0) - counts
    position_sorted = torch.arange(sorted_experts.numel(), device=device) - group_starts[sorted_experts]
    position = torch.empty_like(position_sorted)
    position[sort_order] = position_sorted

    keep_in_priority_order = (position < capacity).view(top_k, num_tokens).t()
    keep = torch.empty_like(keep_in_priority_order)
    keep[token_order] = keep_in_priority_order
    return keep


class VMoERouter(nn.Module):
    """Noisy top-k softmax router of V-MoE.

    ``top_k`` and ``num_experts`` are plain ints, and ``forward`` reads ``self.top_k`` on every
    call, so assigning ``router.top_k = k`` changes the number of experts per token of this layer
    from the next forward on. In training mode the router stores its ``importance_loss`` and
    ``load_loss`` (scalar tensors); in eval mode both are None.
    """

    def __init__(
            self,
            in_features: int,
            num_experts: int,
            top_k: int,
            noise_std: Optional[float] = None,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            in_features: Token embedding size D.
            num_experts: Number of experts E.
            top_k: Number of experts selected per token, 1 <= top_k <= num_experts.
            noise_std: Std of the Gaussian noise added to the logits in training; None means 1/E.
        """
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts} is invalid; expected at least 1")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} is out of range; expected 1 <= top_k <= {num_experts}")
        self.in_features = in_features
        self.num_experts = int(num_experts)
        self.top_k = int(top_k)
        self.noise_std = 1.0 / num_experts if noise_std is None else float(noise_std)
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, device=device, dtype=dtype))
        self.importance_loss: Optional[torch.Tensor] = None
        self.load_loss: Optional[torch.Tensor] = None
        self.init_weights()

    def init_weights(self) -> None:
        """Initialise the weight like timm's ViT linear layers (truncated normal, std 0.02)."""
        nn.init.trunc_normal_(self.weight, std=0.02)

    def reset_parameters(self) -> None:
        self.init_weights()

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route the tokens in ``hidden_states`` (any shape ending in D, flattened to T tokens).

        Returns:
            ``(logits, top_k_weights, top_k_index)`` with shapes (T, E), (T, k) and (T, k). The
            logits exclude the training noise. The weights are the softmax probabilities of the
            selected experts (computed from the noisy logits in training), in descending order.
        """
        top_k = self.top_k
        if not 1 <= top_k <= self.num_experts:
            raise ValueError(f"top_k={top_k} is out of range; expected 1 <= top_k <= {self.num_experts}")

        hidden_states = hidden_states.reshape(-1, self.in_features)
        logits = F.linear(hidden_states, self.weight)
        logits_fp32 = logits.float()
        add_noise = self.training and self.noise_std > 0
        if add_noise:
            noisy_logits = logits_fp32 + torch.randn_like(logits_fp32) * self.noise_std
        else:
            noisy_logits = logits_fp32
        gates = noisy_logits.softmax(dim=-1)
        top_k_weights, top_k_index = gates.topk(top_k, dim=-1)

        if self.training:
            self.importance_loss = importance_loss(logits_fp32.softmax(dim=-1))
            if add_noise:
                self.load_loss = load_loss(logits_fp32, noisy_logits, self.noise_std, top_k)
            else:
                # NOTE: without noise the selection is a step function of the logits and the load
                # loss has no gradient, so it is reported as 0.
                self.load_loss = gates.new_zeros(())
        else:
            self.importance_loss = None
            self.load_loss = None
        return logits, top_k_weights.to(hidden_states.dtype), top_k_index

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"noise_std={self.noise_std:g}"
        )


class VMoEExperts(nn.Module):
    """E two-layer MLP experts (fc1, activation, fc2) stored as stacked 3-D weight tensors.

    ``forward`` computes only the selected token-expert pairs, so the expert compute grows
    linearly with k. ``last_num_pairs`` is the number of pairs computed in the last forward.
    """

    def __init__(
            self,
            num_experts: int,
            in_features: int,
            hidden_features: int,
            act_layer: Type[nn.Module] = nn.GELU,
            bias: bool = True,
            drop: float = 0.0,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, hidden_features, in_features, **factory))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, in_features, hidden_features, **factory))
        if bias:
            self.fc1_bias = nn.Parameter(torch.empty(num_experts, hidden_features, **factory))
            self.fc2_bias = nn.Parameter(torch.empty(num_experts, in_features, **factory))
        else:
            self.register_parameter("fc1_bias", None)
            self.register_parameter("fc2_bias", None)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.drop2 = nn.Dropout(drop)
        self.last_num_pairs = 0
        self.init_weights()

    def init_weights(self) -> None:
        """Initialise each expert like timm's ViT ``Mlp``: truncated normal weights (std 0.02), zero biases."""
        nn.init.trunc_normal_(self.fc1_weight, std=0.02)
        nn.init.trunc_normal_(self.fc2_weight, std=0.02)
        if self.fc1_bias is not None:
            nn.init.zeros_(self.fc1_bias)
            nn.init.zeros_(self.fc2_bias)

    def reset_parameters(self) -> None:
        self.init_weights()

    def forward(
            self,
            hidden_states: torch.Tensor,
            top_k_index: torch.Tensor,
            top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        """Return the weighted sum of the selected experts' outputs for each token.

        Args:
            hidden_states: Tokens, shape (T, D).
            top_k_index: Selected expert per token and choice, shape (T, k). The value E marks a
                dropped pair, which is not computed and contributes zero.
            top_k_weights: Combine weight per token and choice, shape (T, k).

        Returns:
            Tensor of shape (T, D).
        """
        num_experts = self.fc1_weight.shape[0]
        num_tokens, top_k = top_k_index.shape
        expert_ids = top_k_index.reshape(-1)
        token_ids = torch.arange(num_tokens, device=hidden_states.device).repeat_interleave(top_k)
        weights = top_k_weights.reshape(-1)

        # Group the pairs by expert. Dropped pairs (id E) sort to the end and are never visited.
        sorted_expert_ids, order = torch.sort(expert_ids, stable=True)
        counts = torch.bincount(sorted_expert_ids, minlength=num_experts + 1)[:num_experts].tolist()

        output = torch.zeros_like(hidden_states)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            pairs = order[start:start + count]
            start += count
            tokens = token_ids[pairs]
            fc1_bias = None if self.fc1_bias is None else self.fc1_bias[expert]
            fc2_bias = None if self.fc2_bias is None else self.fc2_bias[expert]
            hidden = F.linear(hidden_states[tokens], self.fc1_weight[expert], fc1_bias)
            hidden = self.drop1(self.act(hidden))
            expert_output = self.drop2(F.linear(hidden, self.fc2_weight[expert], fc2_bias))
            expert_output = expert_output * weights[pairs, None].to(expert_output.dtype)
            output.index_add_(0, tokens, expert_output.to(output.dtype))

        self.last_num_pairs = sum(counts)
        return output

    def extra_repr(self) -> str:
        num_experts, hidden_features, in_features = self.fc1_weight.shape
        return (
            f"experts={num_experts}, in_features={in_features}, hidden_features={hidden_features}, "
            f"bias={self.fc1_bias is not None}"
        )


class VMoEMlp(nn.Module):
    """Mixture-of-Experts layer that takes the place of ``Block.mlp`` in a timm ViT.

    The number of experts and k live only on ``self.router`` (as ``num_experts`` and ``top_k``).
    With ``capacity_factor`` set, each expert accepts ``compute_expert_capacity(T, k, E, C)``
    token-expert pairs, recomputed from the current k on every forward over all T tokens of the
    batch (V-MoE instead routes within groups of tokens). Dropped pairs contribute zero, so a
    token whose pairs are all dropped keeps only its residual ``x`` in ``x + mlp(norm(x))``.

    Attributes set by ``forward``:
        aux_loss: ``importance_loss_weight * importance + load_loss_weight * load`` in training,
            None in eval.
        last_capacity: Capacity per expert in the last forward, None without a capacity factor.
    """

    def __init__(
            self,
            in_features: int,
            hidden_features: Optional[int] = None,
            out_features: Optional[int] = None,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Optional[Type[nn.Module]] = None,
            bias: bool = True,
            drop: float = 0.0,
            num_experts: int = 8,
            top_k: int = 2,
            capacity_factor: Optional[float] = None,
            batch_priority: bool = False,
            router_noise_std: Optional[float] = None,
            importance_loss_weight: float = 0.005,
            load_loss_weight: float = 0.005,
            device=None,
            dtype=None,
    ) -> None:
        """Build the router and experts. The first arguments match timm's ``Mlp``, so a ViT ``Block``
        can build this layer through its ``mlp_layer`` argument.

        Args:
            in_features: Token embedding size D.
            hidden_features: Hidden size of each expert; None means D.
            out_features: Must be None or D, because the experts map D to D.
            act_layer: Expert activation.
            norm_layer: Must be None; a norm between fc1 and fc2 (timm's ``scale_mlp_norm``) is
                not supported.
            bias: Whether the experts have biases.
            drop: Dropout after the activation and after fc2, as in timm's ``Mlp``.
            num_experts: Number of experts E.
            top_k: Experts per token k.
            capacity_factor: Capacity factor C >= 0, or None for no token dropping.
            batch_priority: Fill expert buffers by descending token priority (Batch Priority Routing).
            router_noise_std: Std of the training noise on the router logits; None means 1/E.
            importance_loss_weight: Weight of the importance loss in ``aux_loss``.
            load_loss_weight: Weight of the load loss in ``aux_loss``.
        """
        super().__init__()
        if out_features is not None and out_features != in_features:
            raise ValueError(
                f"out_features={out_features} is not supported; MoE experts map in_features={in_features} "
                "to the same size"
            )
        if norm_layer is not None:
            raise ValueError("norm_layer is not supported in VMoEMlp; build the model with scale_mlp_norm=False")
        _validate_capacity_factor(capacity_factor)
        hidden_features = hidden_features or in_features
        self.router = VMoERouter(in_features, num_experts, top_k, router_noise_std, device=device, dtype=dtype)
        self.experts = VMoEExperts(
            num_experts, in_features, hidden_features,
            act_layer=act_layer, bias=bias, drop=drop, device=device, dtype=dtype,
        )
        self.capacity_factor = capacity_factor
        self.batch_priority = batch_priority
        self.importance_loss_weight = importance_loss_weight
        self.load_loss_weight = load_loss_weight
        self.aux_loss: Optional[torch.Tensor] = None
        self.last_capacity: Optional[int] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_shape = x.shape
        hidden_states = x.reshape(-1, input_shape[-1])
        _, top_k_weights, top_k_index = self.router(hidden_states)
        num_experts = self.router.num_experts

        if self.capacity_factor is None:
            self.last_capacity = None
        else:
            _validate_capacity_factor(self.capacity_factor)
            num_tokens, top_k = top_k_index.shape
            capacity = compute_expert_capacity(num_tokens, top_k, num_experts, self.capacity_factor)
            keep = compute_capacity_mask(top_k_index, top_k_weights, num_experts, capacity, self.batch_priority)
            top_k_index = top_k_index.masked_fill(~keep, num_experts)
            self.last_capacity = capacity

        output = self.experts(hidden_states, top_k_index, top_k_weights)

        if self.router.importance_loss is not None:
            self.aux_loss = (
                self.importance_loss_weight * self.router.importance_loss
                + self.load_loss_weight * self.router.load_loss
            )
        else:
            self.aux_loss = None
        return output.reshape(input_shape)

    def extra_repr(self) -> str:
        return f"capacity_factor={self.capacity_factor}, batch_priority={self.batch_priority}"


def _validate_capacity_factor(capacity_factor: Optional[float]) -> None:
    if capacity_factor is not None and not capacity_factor >= 0:
        raise ValueError(f"capacity_factor={capacity_factor} is invalid; expected None or a number >= 0")
