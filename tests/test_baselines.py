"""Tests for the baselines: expert pruning at unchanged k and random per-layer k under a budget."""

import contextlib
import itertools
import math
from collections import Counter

import pytest
import torch
from torch import nn

from lexi_models.language.tiny import TINY_FAMILIES
from lexi_models.vision import VMoEMlp
from lexi_pl.adapter import MoEAdapter
from lexi_pl.baselines import (
    count_allocations,
    count_expert_selections,
    mask_experts,
    prune_experts,
    pruned_expert_count,
    random_plan,
    random_top_k,
    router_weight_norms,
    select_pruned_experts,
)

INPUT_IDS = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(1))

# Families whose routing pruning cannot reproduce from the returned logits (see lexi_pl/baselines/pruning.py).
REJECTED = {"deepseek_v2", "deepseek_v3", "glm4_moe", "ernie4_5_moe", "dbrx", "llama4_text", "jetmoe"}
SUPPORTED = [family for family in TINY_FAMILIES if family not in REJECTED]


class OneMoEBlock(nn.Module):
    """A model made of one V-MoE block with 4 experts over 4-dimensional tokens and top-2 routing."""

    def __init__(self, router_weight: list[list[float]], top_k: int = 2) -> None:
        super().__init__()
        self.moe = VMoEMlp(in_features=4, hidden_features=8, num_experts=4, top_k=top_k)
        with torch.no_grad():
            self.moe.router.weight.copy_(torch.tensor(router_weight))
        self.eval()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.moe(tokens)


# Row e is expert e's router weights. Token i (one-hot on dimension i) gets the logits of column i:
# token 0 -> [3, 2, 1, 0], token 1 -> [0, 1, 3, 2]. Row norms: 3, sqrt(5), sqrt(10), 2.
ROUTER_ROWS = [[3.0, 0.0, 0, 0], [2.0, 1.0, 0, 0], [1.0, 3.0, 0, 0], [0.0, 2.0, 0, 0]]
TOKENS = torch.eye(4)[:2]


def record_router_outputs(adapter: MoEAdapter) -> tuple[dict[str, tuple], list]:
    """Hook every router to record what its block receives: the output after the hooks registered before this one."""
    outputs: dict[str, tuple] = {}
    handles = []
    for layer in adapter.layers:

        def hook(module, args, output, name=layer.name):
            outputs[name] = output

        handles.append(layer.router.register_forward_hook(hook))
    return outputs, handles


def set_router_rows(layer, norms: list[float]) -> None:
    """Give `layer`'s router weight rows the L2 norms `norms` (random directions)."""
    weight = next(p for p in layer.router.parameters() if p.ndim == 2 and p.shape[0] == layer.num_experts)
    directions = torch.randn(weight.shape, generator=torch.Generator().manual_seed(3))
    directions = directions / directions.norm(dim=1, keepdim=True)
    with torch.no_grad():
        weight.copy_(directions * torch.tensor(norms)[:, None])


# pruning: hand-worked routing on one V-MoE block


def test_masked_routing_hand_worked():
    model = OneMoEBlock(ROUTER_ROWS)
    adapter = MoEAdapter(model)
    with mask_experts(adapter, {"moe": [0]}):
        outputs, handles = record_router_outputs(adapter)
        model(TOKENS)
    for handle in handles:
        handle.remove()
    logits, weights, index = outputs["moe"]

    # Token 0 loses expert 0 and takes experts 1 and 2; token 1 keeps experts 2 and 3.
    assert index.tolist() == [[1, 2], [2, 3]]
    assert logits[0, 0].item() == -math.inf
    # V-MoE weights are the softmax probabilities over the experts that remain, not renormalised over the k.
    token0_total = math.exp(2) + math.exp(1) + math.exp(0)
    token1_total = math.exp(3) + math.exp(2) + math.exp(1)
    token0 = [math.exp(2) / token0_total, math.exp(1) / token0_total]
    token1 = [math.exp(3) / token1_total, math.exp(2) / token1_total]
    assert weights[0].tolist() == pytest.approx(token0, rel=1e-6)
    assert weights[1].tolist() == pytest.approx(token1, rel=1e-6)


@pytest.mark.parametrize("policy_first", [False, True])
def test_masked_routing_follows_renormalize_policy(policy_first):
    model = OneMoEBlock(ROUTER_ROWS)
    adapter = MoEAdapter(model)
    # The adapter's weight hook runs after the mask hook in one order and before it in the other.
    with contextlib.ExitStack() as stack:
        contexts = [mask_experts(adapter, {"moe": [0]}), adapter.override(routing_weights="renormalize")]
        for context in reversed(contexts) if policy_first else contexts:
            stack.enter_context(context)
        outputs, handles = record_router_outputs(adapter)
        model(TOKENS)
    for handle in handles:
        handle.remove()
    _, weights, index = outputs["moe"]

    assert index.tolist() == [[1, 2], [2, 3]]
    expected = [math.exp(2) / (math.exp(2) + math.exp(1)), math.exp(1) / (math.exp(2) + math.exp(1))]
    assert weights[0].tolist() == pytest.approx(expected, rel=1e-6)


def test_router_norm_criterion_hand_worked():
    adapter = MoEAdapter(OneMoEBlock(ROUTER_ROWS))
    assert router_weight_norms(adapter.layers[0]).tolist() == pytest.approx([3.0, math.sqrt(5), math.sqrt(10), 2.0])
    # 25 % of 4 experts is 1, so expert 3 (norm 2, the smallest row) goes. 50 % adds expert 1 (norm sqrt(5)).
    assert select_pruned_experts(adapter, 0.25) == {"moe": [3]}
    assert select_pruned_experts(adapter, 0.5) == {"moe": [1, 3]}


def test_frequency_criterion_hand_worked():
    adapter = MoEAdapter(OneMoEBlock(ROUTER_ROWS))
    # Experts 0 and 3 tie at 1 selection. Expert 3 has the smaller router row (2 < 3), so it goes first.
    counts = [torch.tensor([1, 5, 2, 1])]
    assert select_pruned_experts(adapter, 0.25, "frequency", counts) == {"moe": [3]}
    assert select_pruned_experts(adapter, 0.5, "frequency", counts) == {"moe": [0, 3]}


def test_count_expert_selections_hand_worked():
    adapter = MoEAdapter(OneMoEBlock(ROUTER_ROWS))
    # Token 0 selects experts 0 and 1 and token 1 selects experts 2 and 3, so the two batches count [2, 2, 1, 1].
    batches = [TOKENS, TOKENS[:1]]
    counts = count_expert_selections(adapter, batches)
    assert len(counts) == 1
    assert counts[0].tolist() == [2, 2, 1, 1]


def test_count_expert_selections_leaves_no_hook():
    model = OneMoEBlock(ROUTER_ROWS)
    adapter = MoEAdapter(model)
    count_expert_selections(adapter, [TOKENS])
    assert len(model.moe.router._forward_hooks) == 0


def test_frequency_needs_counts():
    adapter = MoEAdapter(OneMoEBlock(ROUTER_ROWS))
    with pytest.raises(ValueError, match="selection_counts"):
        select_pruned_experts(adapter, 0.25, "frequency")
    with pytest.raises(ValueError, match="shape"):
        select_pruned_experts(adapter, 0.25, "frequency", [torch.tensor([1, 2, 3])])


def test_unknown_criterion_rejected():
    adapter = MoEAdapter(OneMoEBlock(ROUTER_ROWS))
    with pytest.raises(ValueError, match="unknown pruning criterion"):
        select_pruned_experts(adapter, 0.25, "magnitude")


def test_fraction_keeps_at_least_k_experts():
    adapter = MoEAdapter(OneMoEBlock(ROUTER_ROWS, top_k=2))
    layer = adapter.layers[0]
    assert pruned_expert_count(layer, 0.5) == 2
    # 0.625 of 4 experts is 2.5, rounded up to 3, which leaves 1 expert for k = 2.
    with pytest.raises(ValueError, match="at most 0.5"):
        pruned_expert_count(layer, 0.625)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        pruned_expert_count(layer, 1.0)
    with pytest.raises(ValueError, match="leaves fewer"):
        with mask_experts(adapter, {"moe": [0, 1, 2]}):
            pass


def test_fraction_rounds_half_up():
    adapter = MoEAdapter(OneMoEBlock(ROUTER_ROWS, top_k=1))
    layer = adapter.layers[0]
    assert pruned_expert_count(layer, 0.125) == 1  # 0.5 experts
    assert pruned_expert_count(layer, 0.1) == 0  # 0.4 experts
    assert pruned_expert_count(layer, 0.625) == 3  # 2.5 experts


def test_mask_rejects_bad_indices():
    adapter = MoEAdapter(OneMoEBlock(ROUTER_ROWS))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        with mask_experts(adapter, {"moe": [4]}):
            pass
    with pytest.raises(ValueError, match="unknown MoE layer"):
        with mask_experts(adapter, {"mlp": [0]}):
            pass


# pruning: real transformers families


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_mask_nothing_reproduces_router(tiny_model, model_type):
    model = tiny_model(model_type)
    if model_type == "lfm2_moe":
        # Give LFM2's selection bias values that change the selection, so the hook must apply it.
        for module in model.modules():
            if hasattr(module, "expert_bias"):
                module.expert_bias.copy_(torch.linspace(-0.3, 0.3, module.expert_bias.numel()))
    adapter = MoEAdapter(model)
    with torch.no_grad():
        native = model(input_ids=INPUT_IDS)[0]
        with mask_experts(adapter, {}):
            rerouted = model(input_ids=INPUT_IDS)[0]
    torch.testing.assert_close(rerouted, native, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", sorted(REJECTED))
def test_unsupported_families_rejected(tiny_model, model_type):
    adapter = MoEAdapter(tiny_model(model_type))
    with pytest.raises(ValueError, match="cannot prune experts"):
        with prune_experts(adapter, 0.25):
            pass


@pytest.mark.parametrize("model_type", SUPPORTED)
@pytest.mark.parametrize("criterion", ["router_norm", "frequency"])
def test_pruned_experts_never_selected(tiny_model, model_type, criterion):
    model = tiny_model(model_type)
    adapter = MoEAdapter(model)
    counts = count_expert_selections(adapter, [{"input_ids": INPUT_IDS}]) if criterion == "frequency" else None
    with prune_experts(adapter, 0.25, criterion, counts) as pruned:
        outputs, handles = record_router_outputs(adapter)
        with torch.no_grad():
            model(input_ids=INPUT_IDS)
        for handle in handles:
            handle.remove()
        assert adapter.top_k == adapter.native_top_k
    for layer in adapter.layers:
        index = outputs[layer.name][2]
        assert len(pruned[layer.name]) == 2
        assert index.shape[-1] == layer.native_top_k
        assert not set(index.flatten().tolist()) & set(pruned[layer.name])


def test_pruned_olmoe_renormalizes_when_asked(tiny_model):
    model = tiny_model("olmoe")
    adapter = MoEAdapter(model)
    with prune_experts(adapter, 0.5), adapter.override(routing_weights="renormalize"):
        outputs, handles = record_router_outputs(adapter)
        with torch.no_grad():
            model(input_ids=INPUT_IDS)
        for handle in handles:
            handle.remove()
    for layer in adapter.layers:
        weights = outputs[layer.name][1]
        torch.testing.assert_close(weights.sum(dim=-1), torch.ones(weights.shape[0]))


def test_pruning_restores_exactly(tiny_model):
    model = tiny_model("olmoe")
    adapter = MoEAdapter(model)
    with torch.no_grad():
        before = model(input_ids=INPUT_IDS)[0]
        with prune_experts(adapter, 0.5):
            during = model(input_ids=INPUT_IDS)[0]
        after = model(input_ids=INPUT_IDS)[0]
    assert not torch.equal(during, before)
    assert torch.equal(after, before)
    assert all(len(layer.router._forward_hooks) == 0 for layer in adapter.layers)


def test_pruning_restores_after_exception(tiny_model):
    model = tiny_model("mixtral")
    adapter = MoEAdapter(model)
    with torch.no_grad():
        before = model(input_ids=INPUT_IDS)[0]
    with pytest.raises(RuntimeError, match="body failed"):
        with prune_experts(adapter, 0.25):
            raise RuntimeError("body failed")
    with torch.no_grad():
        assert torch.equal(model(input_ids=INPUT_IDS)[0], before)


def test_router_norm_on_transformers_router(tiny_model):
    adapter = MoEAdapter(tiny_model("mixtral"))
    set_router_rows(adapter.layers[0], [5.0, 1.0, 4.0, 2.0, 8.0, 3.0, 7.0, 6.0])
    set_router_rows(adapter.layers[1], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 0.5])
    pruned = select_pruned_experts(adapter, 0.25)
    assert pruned == {adapter.names[0]: [1, 3], adapter.names[1]: [0, 7]}


# random allocation


def brute_force_allocations(upper: list[int], budget: int, lower: int = 1) -> list[tuple[int, ...]]:
    ranges = [range(lower, high + 1) for high in upper]
    return [ks for ks in itertools.product(*ranges) if sum(ks) == budget]


def test_count_allocations_hand_worked():
    # {1, 2}^3 with sum 4: exactly one layer at 2.
    assert count_allocations([2, 2, 2], 4) == 3
    # {1, 2, 3}^2 with sum 4: (1, 3), (2, 2), (3, 1).
    assert count_allocations([3, 3], 4) == 3
    assert count_allocations([4] * 6, 18) == len(brute_force_allocations([4] * 6, 18))
    assert count_allocations([3, 3], 7) == 0


def test_random_top_k_respects_budget_and_bounds():
    upper = [4, 4, 2, 4, 3, 4]
    for seed in range(200):
        ks = random_top_k(upper, 14, seed=seed)
        assert sum(ks) == 14
        assert all(1 <= k <= high for k, high in zip(ks, upper))


def test_random_top_k_respects_lower_bounds():
    for seed in range(50):
        ks = random_top_k([4, 4, 4], 9, seed=seed, lower=[2, 1, 3])
        assert sum(ks) == 9
        assert ks[0] >= 2
        assert ks[2] >= 3


def test_random_top_k_is_seeded():
    first = [random_top_k([4] * 6, 15, seed=seed) for seed in range(20)]
    again = [random_top_k([4] * 6, 15, seed=seed) for seed in range(20)]
    assert first == again
    assert len({tuple(ks) for ks in first}) > 5


def test_random_top_k_is_uniform():
    feasible = brute_force_allocations([3, 3, 3], 6)
    assert len(feasible) == 7
    draws = Counter(tuple(random_top_k([3, 3, 3], 6, seed=seed)) for seed in range(7000))
    assert set(draws) == set(feasible)
    # Each of the 7 vectors has probability 1/7: 1000 expected, standard deviation about 29.
    for ks in feasible:
        assert 850 <= draws[ks] <= 1150, (ks, draws[ks])


def test_random_top_k_rejects_infeasible_budget():
    with pytest.raises(ValueError, match=r"outside the feasible range \[3, 9\]"):
        random_top_k([3, 3, 3], 10)
    with pytest.raises(ValueError, match="lower <= upper"):
        random_top_k([3, 0], 2)


def test_random_plan_applies(tiny_model):
    model = tiny_model("qwen2_moe")
    adapter = MoEAdapter(model)
    plan = random_plan(adapter, budget=5, seed=3)
    assert plan.method == "random"
    assert plan.budget == 5
    assert plan.extra == {"seed": 3}
    assert list(plan.top_k.values()) == random_top_k(adapter.native_top_k, 5, seed=3)
    adapter.apply(plan)
    assert sum(adapter.top_k) == 5
    adapter.restore()
