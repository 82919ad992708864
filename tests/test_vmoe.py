"""Tests for the timm V-MoE in lexi_models.vision (router, experts, capacity, losses, upcycling)."""
import math

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import Mlp

from lexi_models.vision import (
    VMoEExperts,
    VMoEMlp,
    VMoERouter,
    VMoEVisionTransformer,
    compute_capacity_mask,
    compute_expert_capacity,
    importance_loss,
    load_loss,
    resolve_moe_layers,
    upcycle_from_dense,
)

NUM_TOKENS_MNIST = 50  # 7 x 7 patches of 4 x 4 pixels plus the class token


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _images(batch_size: int = 2) -> torch.Tensor:
    return torch.randn(batch_size, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def _record_router_outputs(model: VMoEVisionTransformer) -> dict[int, tuple]:
    """Register hooks that store each MoE block's last router output under its block index."""
    outputs = {}
    for index in model.moe_layer_indices:
        def hook(module, args, output, index=index):
            outputs[index] = output
        model.blocks[index].mlp.router.register_forward_hook(hook)
    return outputs


# Construction and placement


def test_create_model_output_shape():
    model = timm.create_model("vmoe_tiny_mnist").eval()
    assert isinstance(model, VMoEVisionTransformer)
    with torch.no_grad():
        logits = model(_images())
    assert logits.shape == (2, 10)


def test_default_placement_odd_blocks():
    model = timm.create_model("vmoe_tiny_mnist")
    assert model.moe_layer_indices == (1, 3, 5, 7)
    for index, block in enumerate(model.blocks):
        expected = VMoEMlp if index % 2 == 1 else Mlp
        assert type(block.mlp) is expected, f"blocks[{index}].mlp is {type(block.mlp).__name__}"
    assert "blocks.1.mlp.router.weight" in model.state_dict()
    assert model.state_dict()["blocks.1.mlp.experts.fc1_weight"].shape == (8, 128, 64)


def test_last_n_and_explicit_placement():
    last_two = timm.create_model("vmoe_tiny_mnist", moe_layers="last_2")
    assert last_two.moe_layer_indices == (5, 7)
    assert [type(b.mlp) is VMoEMlp for b in last_two.blocks] == [False] * 5 + [True, False, True]

    explicit = timm.create_model("vmoe_tiny_mnist", moe_layers=[0, 2, -1])
    assert explicit.moe_layer_indices == (0, 2, 7)
    assert [type(b.mlp) is VMoEMlp for b in explicit.blocks] == [True, False, True] + [False] * 4 + [True]


@pytest.mark.parametrize("spec", ["last_5", "every_third", [8], [1, 1], [1.0]])
def test_invalid_placement_raises(spec):
    with pytest.raises(ValueError, match="moe_layers"):
        resolve_moe_layers(8, spec)


def test_kwargs_pass_through_create_model():
    model = timm.create_model(
        "vmoe_tiny_mnist", num_experts=4, top_k=3, capacity_factor=1.5, batch_priority=True,
    )
    layer = model.blocks[1].mlp
    assert layer.router.num_experts == 4
    assert layer.router.top_k == 3
    assert layer.capacity_factor == 1.5
    assert layer.batch_priority is True


def test_data_config_mnist():
    model = timm.create_model("vmoe_tiny_mnist")
    config = timm.data.resolve_data_config({}, model=model)
    assert config["input_size"] == (1, 28, 28)
    assert config["mean"] == (0.1307,)
    assert config["std"] == (0.3081,)
    assert config["crop_pct"] == 1.0
    assert config["interpolation"] == "bilinear"


def test_only_router_has_top_k_protocol():
    model = timm.create_model("vmoe_tiny_mnist")
    with_protocol = [
        name for name, module in model.named_modules()
        if hasattr(module, "top_k") and hasattr(module, "num_experts")
    ]
    assert with_protocol == [f"blocks.{i}.mlp.router" for i in (1, 3, 5, 7)]
    router = model.blocks[1].mlp.router
    assert type(router.top_k) is int
    assert type(router.num_experts) is int


# Upcycling


def _dense_and_upcycled():
    dense = timm.create_model("vit_tiny_mnist").eval()
    moe = timm.create_model("vmoe_tiny_mnist").eval()
    upcycle_from_dense(moe, dense.state_dict())
    return dense, moe


def test_upcycled_full_k_equals_dense():
    dense, moe = _dense_and_upcycled()
    for _, layer in moe.named_moe_layers():
        layer.router.top_k = layer.router.num_experts
    images = _images()
    with torch.no_grad():
        torch.testing.assert_close(moe(images), dense(images), atol=1e-5, rtol=1e-5)


def test_upcycled_smaller_k_differs_from_dense():
    dense, moe = _dense_and_upcycled()
    images = _images()
    with torch.no_grad():
        difference = (moe(images) - dense(images)).abs().max().item()
    assert difference > 1e-3


def test_upcycle_copies_dense_mlp_into_every_expert():
    dense, moe = _dense_and_upcycled()
    experts = moe.blocks[3].mlp.experts
    for expert in range(8):
        torch.testing.assert_close(experts.fc1_weight[expert], dense.blocks[3].mlp.fc1.weight)
        torch.testing.assert_close(experts.fc2_bias[expert], dense.blocks[3].mlp.fc2.bias)
    torch.testing.assert_close(moe.blocks[2].mlp.fc1.weight, dense.blocks[2].mlp.fc1.weight)


def test_upcycle_from_files_is_seeded(tmp_path):
    dense = timm.create_model("vit_tiny_mnist")
    torch_path = tmp_path / "dense.pth"
    safetensors_path = tmp_path / "dense.safetensors"
    torch.save(dense.state_dict(), torch_path)
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(safetensors_path))

    from_torch = timm.create_model("vmoe_tiny_mnist", upcycle_from=str(torch_path))
    from_safetensors = upcycle_from_dense(timm.create_model("vmoe_tiny_mnist"), safetensors_path)
    for key, value in from_torch.state_dict().items():
        torch.testing.assert_close(from_safetensors.state_dict()[key], value, msg=key)


def test_upcycle_missing_file_raises(tmp_path):
    model = timm.create_model("vmoe_tiny_mnist")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        upcycle_from_dense(model, tmp_path / "missing.pth")


# Routing


def test_eval_routing_ignores_global_seed():
    model = timm.create_model("vmoe_tiny_mnist").eval()
    outputs = _record_router_outputs(model)
    images = _images()
    selections = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            model(images)
        selections.append({index: (out[1].clone(), out[2].clone()) for index, out in outputs.items()})
    for index in model.moe_layer_indices:
        assert torch.equal(selections[0][index][1], selections[1][index][1]), f"block {index} index"
        assert torch.equal(selections[0][index][0], selections[1][index][0]), f"block {index} weights"


def test_train_routing_adds_noise():
    model = timm.create_model("vmoe_tiny_mnist").train()
    outputs = _record_router_outputs(model)
    images = _images()
    weights = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            model(images)
        weights.append(outputs[1][1].clone())
    assert not torch.equal(weights[0], weights[1])


def test_combine_weights_are_selected_softmax():
    router = VMoERouter(in_features=2, num_experts=4, top_k=2).eval()
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]]))
    tokens = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    logits, weights, index = router(tokens)

    # Token 0 has logits (2, 1, 0, -1) and token 1 has (-2, -1, 0, 1).
    denominator = math.exp(2) + math.exp(1) + 1 + math.exp(-1)
    torch.testing.assert_close(logits, torch.tensor([[2.0, 1.0, 0.0, -1.0], [-2.0, -1.0, 0.0, 1.0]]))
    assert index.tolist() == [[0, 1], [3, 2]]
    expected = torch.tensor([math.exp(2), math.exp(1)]) / denominator
    torch.testing.assert_close(weights[0], expected)
    torch.testing.assert_close(weights[1], expected)
    assert weights.sum(dim=-1).max().item() < 0.9  # not renormalised over the top-k


def test_router_output_shapes():
    router = VMoERouter(in_features=6, num_experts=5, top_k=3)
    logits, weights, index = router(torch.randn(2, 7, 6))
    assert logits.shape == (14, 5)
    assert weights.shape == (14, 3)
    assert index.shape == (14, 3)


def test_setting_top_k_changes_one_layer():
    model = timm.create_model("vmoe_tiny_mnist").eval()
    outputs = _record_router_outputs(model)
    model.blocks[3].mlp.router.top_k = 5
    with torch.no_grad():
        model(_images())
    selected = {index: out[2].shape[1] for index, out in outputs.items()}
    assert selected == {1: 2, 3: 5, 5: 2, 7: 2}
    assert model.blocks[3].mlp.experts.last_num_pairs == 2 * NUM_TOKENS_MNIST * 5


def test_expert_pairs_scale_with_k():
    layer = VMoEMlp(in_features=8, hidden_features=16, num_experts=4, top_k=1).eval()
    tokens = torch.randn(3, 10, 8)
    for top_k in range(1, 5):
        layer.router.top_k = top_k
        layer(tokens)
        assert layer.experts.last_num_pairs == 30 * top_k, f"top_k={top_k}"


@pytest.mark.parametrize("top_k", [0, 9])
def test_invalid_top_k_raises(top_k):
    model = timm.create_model("vmoe_tiny_mnist").eval()
    model.blocks[5].mlp.router.top_k = top_k
    with pytest.raises(ValueError, match=rf"top_k={top_k} .*1 <= top_k <= 8"):
        model(_images())


def test_invalid_top_k_at_construction_raises():
    with pytest.raises(ValueError, match=r"top_k=3 .*1 <= top_k <= 2"):
        VMoERouter(in_features=4, num_experts=2, top_k=3)


def test_experts_match_per_token_reference():
    experts = VMoEExperts(num_experts=3, in_features=4, hidden_features=6)
    with torch.no_grad():
        for parameter in experts.parameters():
            parameter.normal_()
    hidden = torch.randn(5, 4)
    index = torch.tensor([[0, 2], [1, 0], [2, 1], [2, 0], [1, 2]])
    weights = torch.rand(5, 2)

    output = experts(hidden, index, weights)

    expected = torch.zeros(5, 4)
    for token in range(5):
        for choice in range(2):
            e = index[token, choice]
            inner = torch.nn.functional.gelu(experts.fc1_weight[e] @ hidden[token] + experts.fc1_bias[e])
            expected[token] += weights[token, choice] * (experts.fc2_weight[e] @ inner + experts.fc2_bias[e])
    torch.testing.assert_close(output, expected)
    assert experts.last_num_pairs == 10


def test_experts_skip_dropped_pairs():
    experts = VMoEExperts(num_experts=3, in_features=4, hidden_features=6)
    hidden = torch.randn(2, 4)
    index = torch.tensor([[0, 3], [3, 3]])  # 3 == num_experts marks a dropped pair
    output = experts(hidden, index, torch.ones(2, 2))
    assert experts.last_num_pairs == 1
    assert torch.count_nonzero(output[1]) == 0


# Capacity


@pytest.mark.parametrize(
    ("num_tokens", "top_k", "num_experts", "capacity_factor", "expected"),
    [
        (50, 2, 8, 1.0, 16),  # ceil(12.5) = 13, rounded up to 16
        (10, 1, 4, 1.5, 4),  # ceil(3.75) = 4
        (10, 2, 4, 1.5, 8),  # ceil(7.5) = 8
        (10, 3, 4, 1.5, 12),  # ceil(11.25) = 12
        (10, 4, 4, 1.5, 16),  # 15, rounded up to 16
        (100, 2, 8, 0.0, 0),
    ],
)
def test_expert_capacity_values(num_tokens, top_k, num_experts, capacity_factor, expected):
    assert compute_expert_capacity(num_tokens, top_k, num_experts, capacity_factor) == expected


def test_capacity_follows_current_k():
    layer = VMoEMlp(in_features=8, hidden_features=16, num_experts=4, top_k=1, capacity_factor=1.5).eval()
    tokens = torch.randn(2, 5, 8)
    for top_k, expected in [(1, 4), (2, 8), (3, 12), (4, 16)]:
        layer.router.top_k = top_k
        layer(tokens)
        assert layer.last_capacity == expected, f"top_k={top_k}"


def test_no_capacity_by_default():
    layer = VMoEMlp(in_features=8, hidden_features=16, num_experts=4, top_k=2).eval()
    layer(torch.randn(10, 8))
    assert layer.last_capacity is None
    assert layer.experts.last_num_pairs == 20


def test_capacity_factor_zero_outputs_zero():
    model = timm.create_model("vmoe_tiny_mnist", capacity_factor=0.0).eval()
    layer_outputs = {}
    for index in model.moe_layer_indices:
        def hook(module, args, output, index=index):
            layer_outputs[index] = output
        model.blocks[index].mlp.register_forward_hook(hook)
    with torch.no_grad():
        model(_images())
    for index, output in layer_outputs.items():
        assert model.blocks[index].mlp.last_capacity == 0
        assert torch.count_nonzero(output) == 0, f"block {index}"
        assert model.blocks[index].mlp.experts.last_num_pairs == 0


def test_capacity_mask_by_choice_rank():
    # Expert 0 receives t0 and t1 (first choices) before t2 (second choice), so it drops t2.
    # Expert 1 receives t2 (first choice) before t0 and t1 (second choices), so it drops t1.
    index = torch.tensor([[0, 1], [0, 1], [1, 0]])
    weights = torch.tensor([[0.5, 0.1], [0.6, 0.1], [0.9, 0.05]])
    keep = compute_capacity_mask(index, weights, num_experts=2, capacity=2)
    assert keep.tolist() == [[True, True], [True, False], [True, False]]


def test_capacity_mask_batch_priority():
    # Priority by max weight is t2 > t1 > t0. Expert 0 takes t1 and t0 (first choices) and drops
    # t2's second choice. Expert 1 takes t2 (first choice) and t1, and drops t0's second choice.
    index = torch.tensor([[0, 1], [0, 1], [1, 0]])
    weights = torch.tensor([[0.5, 0.1], [0.6, 0.1], [0.9, 0.05]])
    keep = compute_capacity_mask(index, weights, num_experts=2, capacity=2, batch_priority=True)
    assert keep.tolist() == [[True, False], [True, True], [True, False]]


def _single_expert_layer(batch_priority: bool) -> VMoEMlp:
    """Build an eval-mode layer whose router sends every token of the form (a, 0) with a > 0 to expert 0.

    Expert 0's gate probability exp(a) / (exp(a) + 3) grows with a. With 8 tokens, E=4, k=1 and
    C=1 the capacity is ceil(8 / 4) = 2, rounded up to 4, so expert 0 keeps 4 of the 8 tokens.
    """
    layer = VMoEMlp(
        in_features=2, hidden_features=8, num_experts=4, top_k=1,
        capacity_factor=1.0, batch_priority=batch_priority,
    ).eval()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 1.0
        layer.experts.fc1_bias.fill_(0.1)
        layer.experts.fc2_bias.fill_(0.1)
    return layer


def test_batch_priority_drops_lowest_gates():
    scores = torch.tensor([0.5, 8.0, 1.0, 7.0, 2.0, 6.0, 3.0, 5.0])
    tokens = torch.stack([scores, torch.zeros(8)], dim=-1)

    in_order = _single_expert_layer(batch_priority=False)
    output = in_order(tokens)
    assert in_order.last_capacity == 4
    routed_tokens = [bool(torch.count_nonzero(row)) for row in output]
    assert routed_tokens == [True, True, True, True, False, False, False, False]

    by_priority = _single_expert_layer(batch_priority=True)
    output = by_priority(tokens)
    routed_tokens = [bool(torch.count_nonzero(row)) for row in output]
    assert routed_tokens == [False, True, False, True, False, True, False, True]  # scores 8, 7, 6, 5


def test_negative_capacity_factor_raises():
    with pytest.raises(ValueError, match="capacity_factor=-1"):
        VMoEMlp(in_features=4, capacity_factor=-1.0)


# Auxiliary losses


def test_aux_losses_in_training():
    model = timm.create_model("vmoe_tiny_mnist").train()
    model(_images())
    total = 0.0
    for name, layer in model.named_moe_layers():
        assert layer.router.importance_loss.item() > 0, name
        assert layer.router.load_loss.item() > 0, name
        assert torch.isfinite(layer.aux_loss), name
        expected = 0.005 * layer.router.importance_loss + 0.005 * layer.router.load_loss
        torch.testing.assert_close(layer.aux_loss, expected)
        total = total + layer.aux_loss
    aux_loss = model.aux_loss()
    torch.testing.assert_close(aux_loss, total)

    aux_loss.backward()
    assert model.blocks[1].mlp.router.weight.grad.abs().sum() > 0


def test_importance_loss_uses_noise_free_logits():
    model = timm.create_model("vmoe_tiny_mnist").train()
    outputs = _record_router_outputs(model)
    model(_images())
    logits = outputs[3][0]
    expected = importance_loss(logits.float().softmax(dim=-1))
    torch.testing.assert_close(model.blocks[3].mlp.router.importance_loss, expected)


def test_aux_losses_absent_in_eval():
    model = timm.create_model("vmoe_tiny_mnist").train()
    model(_images())
    model.eval()
    assert model.aux_loss().item() == 0.0
    with torch.no_grad():
        model(_images())
    for name, layer in model.named_moe_layers():
        assert layer.aux_loss is None, name
        assert layer.router.importance_loss is None, name
        assert layer.router.load_loss is None, name


def test_importance_loss_hand_values():
    balanced = torch.tensor([
        [0.7, 0.1, 0.1, 0.1],
        [0.1, 0.7, 0.1, 0.1],
        [0.1, 0.1, 0.7, 0.1],
        [0.1, 0.1, 0.1, 0.7],
    ])
    assert importance_loss(balanced).item() == pytest.approx(0.0, abs=1e-9)

    # Importances (2, 0): mean 1, population variance 1.
    skewed = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert importance_loss(skewed).item() == pytest.approx(1.0)


def test_load_loss_hand_value():
    # One token, k=1, noise std 1: the threshold is the top noisy logit 1, so expert 0 stays
    # selected with probability Phi(0) = 0.5 and expert 1 with Phi(-1).
    logits = torch.tensor([[1.0, 0.0]])
    p0 = 0.5
    p1 = 0.5 * (1 + math.erf(-1 / math.sqrt(2)))
    mean = (p0 + p1) / 2
    variance = ((p0 - mean) ** 2 + (p1 - mean) ** 2) / 2
    expected = variance / mean**2
    assert load_loss(logits, logits, noise_std=1.0, top_k=1).item() == pytest.approx(expected, rel=1e-5)

    equal = torch.zeros(3, 4)
    assert load_loss(equal, equal + 0.1, noise_std=0.25, top_k=2).item() == pytest.approx(0.0, abs=1e-9)
