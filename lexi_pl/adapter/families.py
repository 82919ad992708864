"""Family table of MoE routers: where k lives and how routing weights are formed.

The adapter reads this table instead of branching on model types. Routers are matched by class name, so nothing
here imports transformers or the V-MoE code. Facts below were read from the transformers 5.25 modeling files
(`transformers/models/<model_type>/modeling_<model_type>.py`) and checked by the tests in `tests/test_adapter.py`.

Routing-weight policies (what a layer does with the scores of its selected experts when k changes):

- ``"native"``: the family's own behaviour, whatever it is.
- ``"renormalize"``: the selected experts' probabilities are rescaled to sum to 1 (then times the family's fixed
  routing scale, such as DeepSeek's ``routed_scaling_factor``).
- ``"none"``: the raw probabilities of the selected experts (softmax or sigmoid over all experts, as the family
  scores them), not rescaled; the total routed mass falls as k falls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

RoutingWeights = Literal["native", "renormalize", "none"]
ROUTING_WEIGHTS: tuple[str, ...] = ("native", "renormalize", "none")


def _group_limit(router: Any) -> int:
    """Return the largest k that group-limited routing can fill with experts of the selected groups."""
    return router.topk_group * router.num_experts // router.num_group


def _deepseek_v2_limit(router: Any) -> int:
    if router.topk_method == "group_limited_greedy":
        return _group_limit(router)
    return router.num_experts


@dataclass(frozen=True)
class RouterFamily:
    """How one router class routes, and how the adapter changes its k and its routing weights.

    Attributes:
        name: family name used in messages (usually the transformers ``model_type``).
        router_classes: class names of the router modules of this family.
        k_owner: ``"router"`` when the forward pass reads k from the router, ``"block"`` when it reads it from
            the router's parent MoE block (DBRX).
        num_experts: reads the number of routed experts from the router module.
        output: layout of the router's return value. ``"standard"`` is ``(logits, weights[T, k], index[T, k])``;
            ``"dense_scores"`` is ``(scores[T, E], logits)`` with zeros for unselected experts (Llama 4);
            ``"other"`` is anything else.
        score: function that turns the router logits into per-expert probabilities.
        scale_attribute: router attribute holding a constant factor applied to every routing weight.
        renormalize_flag: (owner, attribute, value for "renormalize", value for "none") when the family has a
            switch for renormalisation that its forward pass reads; the adapter then flips that switch instead of
            rewriting weights.
        native_weights: the policy the family follows natively when it has no renormalize_flag (with a flag,
            the flag's current value decides): "renormalize", "none" or "other".
        max_top_k: reads the family's largest usable k (group-limited routing); default num_experts.
        dense_experts: the experts run on every token whatever k is, so lowering k saves no compute.
        skip_parents: parent block class names whose routers are left alone, with the reason.
    """

    name: str
    router_classes: tuple[str, ...]
    k_owner: Literal["router", "block"] = "router"
    num_experts: Callable[[Any], int] = lambda router: int(router.num_experts)
    output: Literal["standard", "dense_scores", "other"] = "standard"
    score: Literal["softmax", "sigmoid"] = "softmax"
    scale_attribute: str | None = None
    renormalize_flag: tuple[str, str, Any, Any] | None = None
    native_weights: Literal["renormalize", "none", "other"] = "renormalize"
    max_top_k: Callable[[Any], int] | None = None
    dense_experts: bool = False
    skip_parents: dict[str, str] = field(default_factory=dict)


# Families whose routers switch renormalisation with `norm_topk_prob`, read on every forward pass.
_NORM_TOPK_FLAG = ("router", "norm_topk_prob", True, False)

FAMILIES: tuple[RouterFamily, ...] = (
    # softmax -> top-k -> always renormalised
    RouterFamily("mixtral", ("MixtralTopKRouter",)),
    RouterFamily("minimax", ("MiniMaxTopKRouter",)),
    RouterFamily("hunyuan_v1_moe", ("HunYuanMoEV1Gate",)),
    RouterFamily("qwen3_vl_moe", ("Qwen3VLMoeTextTopKRouter",)),
    # softmax over (probability + score-correction bias) for selection, unbiased probabilities renormalised
    RouterFamily("ernie4_5_moe", ("Ernie4_5_MoeTopKRouter",)),
    # softmax -> top-k, renormalised only when norm_topk_prob is set (off by default in these configs)
    RouterFamily(
        "qwen2_moe", ("Qwen2MoeTopKRouter",), renormalize_flag=_NORM_TOPK_FLAG
    ),
    RouterFamily(
        "qwen3_moe", ("Qwen3MoeTopKRouter",), renormalize_flag=_NORM_TOPK_FLAG
    ),
    RouterFamily("olmoe", ("OlmoeTopKRouter",), renormalize_flag=_NORM_TOPK_FLAG),
    RouterFamily(
        "flex_olmo", ("FlexOlmoTopKRouter",), renormalize_flag=_NORM_TOPK_FLAG
    ),
    # softmax -> top-k, never renormalised
    RouterFamily("jamba", ("JambaTopKRouter",), native_weights="none"),
    RouterFamily(
        "deepseek_v2",
        ("DeepseekV2TopkRouter",),
        scale_attribute="routed_scaling_factor",
        native_weights="none",
        max_top_k=_deepseek_v2_limit,
    ),
    # sigmoid, selection with a score-correction bias inside the best groups, optional renormalisation, scaled
    RouterFamily(
        "deepseek_v3",
        ("DeepseekV3TopkRouter",),
        score="sigmoid",
        scale_attribute="routed_scaling_factor",
        renormalize_flag=_NORM_TOPK_FLAG,
        max_top_k=_group_limit,
    ),
    RouterFamily(
        "glm4_moe",
        ("Glm4MoeTopkRouter",),
        score="sigmoid",
        scale_attribute="routed_scaling_factor",
        renormalize_flag=_NORM_TOPK_FLAG,
        max_top_k=_group_limit,
    ),
    RouterFamily(
        "lfm2_moe",
        ("Lfm2MoeTopKRouter",),
        score="sigmoid",
        scale_attribute="routed_scaling_factor",
        renormalize_flag=_NORM_TOPK_FLAG,
    ),
    # top-k on the logits, softmax over the selected logits only: renormalised by construction
    RouterFamily("gpt_oss", ("GptOssTopKRouter",)),
    RouterFamily("granitemoe", ("GraniteMoeTopKRouter",)),
    RouterFamily(
        "jetmoe",
        ("JetMoeTopKGating",),
        output="other",
        skip_parents={
            "JetMoeMoA": "its mixture-of-attention heads tie k to the attention width "
            "(num_attention_heads = num_key_value_heads * k), so only the MLP router's k can change"
        },
    ),
    # DBRX: the router returns logits only; the FFN block holds k and renormalises with a p-norm
    RouterFamily(
        "dbrx",
        ("DbrxRouter",),
        k_owner="block",
        num_experts=lambda router: int(router.layer.out_features),
        output="other",
        renormalize_flag=("block", "moe_normalize_expert_weights", 1.0, None),
    ),
    # Llama 4: sigmoid of the selected logits, no renormalisation; every expert runs on every token
    RouterFamily(
        "llama4",
        ("Llama4Router",),
        output="dense_scores",
        score="sigmoid",
        native_weights="none",
        dense_experts=True,
    ),
    # The V-MoE router of lexi_models.vision (matched by name, not imported): softmax, top-k, not renormalised
    RouterFamily("vmoe", ("VMoERouter",), native_weights="none"),
)

# Routers whose number of active experts is fixed by their routing code.
FIXED_K_ROUTERS: dict[str, str] = {
    "PhimoeTopKRouter": "phimoe routes with a hard-wired top-2 sparsemixer that ignores the router's top_k",
    "SwitchTransformersTop1Router": "switch_transformers routes every token to exactly one expert (argmax)",
    "NllbMoeTop2Router": "nllb_moe routes with a hard-wired top-2 rule (first and second argmax)",
}

# Names, relative to the decoder layer that holds an MoE block, of the normalisation layer that feeds the block.
INPUT_NORM_NAMES: tuple[str, ...] = (
    "post_attention_layernorm",
    "pre_ff_layernorm",
    "ffn_norm",
    "norm_attn_norm.norm_2",
    "norm2",
)

FAMILY_BY_ROUTER_CLASS: dict[str, RouterFamily] = {
    class_name: family for family in FAMILIES for class_name in family.router_classes
}


def generic_family(class_name: str) -> RouterFamily:
    """Describe a router that the table does not list: its own ``top_k`` and ``num_experts``, native weights only."""
    return RouterFamily(name=f"unlisted ({class_name})", router_classes=(class_name,), native_weights="other")
