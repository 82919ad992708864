import logging
import math

import pytest
import torch
from torch import nn

from lexi_models.language.tiny import FIXED_K_FAMILIES, TINY_FAMILIES, build_tiny, tiny_config
from lexi_pl.adapter import MoEAdapter

INPUT_IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
NUM_TOKENS = INPUT_IDS.numel()


def logits_of(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS)[0]


def count_selected_experts(layer) -> dict:
    """Hook the layer so that each forward pass records how many experts every token was routed to."""
    record: dict = {}
    family = layer.family.name
    if family == "dbrx":

        def pre_hook(module, args):
            record["per_token"] = args[1].shape[-1]

        return record, layer.block.experts.register_forward_pre_hook(pre_hook)

    def hook(module, args, output):
        if family == "llama4":
            per_token = (output[0] > 0).sum(dim=-1)
            assert bool((per_token == per_token[0]).all())
            record["per_token"] = int(per_token[0])
        elif family == "jetmoe":
            batch_index = output[1]
            record["per_token"] = batch_index.numel() // args[0].shape[0]
        else:
            record["per_token"] = output[2].shape[-1]

    return record, layer.router.register_forward_hook(hook)


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_adapter_finds_every_moe_layer(tiny_model, model_type):
    adapter = MoEAdapter(tiny_model(model_type))
    config = tiny_config(model_type)
    native = getattr(config, "num_experts_per_tok", None) or config.ffn_config.moe_top_k
    assert len(adapter.layers) == 2
    assert [layer.index for layer in adapter.layers] == [0, 1]
    assert adapter.native_top_k == [native, native]
    assert adapter.top_k == adapter.native_top_k
    assert adapter.num_experts == [8, 8]
    assert all(layer.hidden_size == 32 for layer in adapter.layers)


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_set_top_k_reaches_forward_pass(tiny_model, model_type):
    model = tiny_model(model_type)
    adapter = MoEAdapter(model)
    native = adapter.native_top_k[0]
    new_k = 1 if native > 1 else 2
    counters = [count_selected_experts(layer) for layer in adapter.layers]
    baseline = logits_of(model)
    assert [record["per_token"] for record, _ in counters] == [native, native]

    adapter.set_top_k({adapter.layers[0].name: new_k})
    changed = logits_of(model)
    assert [record["per_token"] for record, _ in counters] == [new_k, native]
    assert not torch.equal(changed, baseline)

    adapter.restore()
    assert adapter.top_k == [native, native]
    assert torch.equal(logits_of(model), baseline)
    for _, handle in counters:
        handle.remove()


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_extreme_and_mixed_k_run(tiny_model, model_type):
    model = tiny_model(model_type)
    adapter = MoEAdapter(model)
    for ks in ([1, 1], adapter.max_top_k, [1, adapter.max_top_k[1]]):
        adapter.set_top_k(ks)
        output = logits_of(model)
        assert adapter.top_k == list(ks)
        assert torch.isfinite(output).all()


@pytest.mark.parametrize("model_type", FIXED_K_FAMILIES)
def test_fixed_k_families_rejected(tiny_model, model_type):
    family = model_type.replace("-", "_")
    with pytest.raises(ValueError, match=f"k cannot change.*{family}"):
        MoEAdapter(tiny_model(model_type))


def test_no_moe_layer_rejected():
    with pytest.raises(ValueError, match="no MoE layer found in Sequential"):
        MoEAdapter(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


def test_dense_transformers_model_rejected():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    with pytest.raises(ValueError, match="no MoE layer found in LlamaForCausalLM"):
        MoEAdapter(LlamaForCausalLM(config))


def test_jetmoe_attention_routers_left_alone(tiny_model, caplog):
    with caplog.at_level(logging.INFO, logger="lexi_pl.adapter.core"):
        adapter = MoEAdapter(tiny_model("jetmoe"))
    assert adapter.names == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert "mixture-of-attention" in caplog.text


def test_llama4_warns_k_saves_no_compute(tiny_model, caplog):
    with caplog.at_level(logging.WARNING, logger="lexi_pl.adapter.core"):
        MoEAdapter(tiny_model("llama4_text"))
    assert caplog.text.count("saves no compute") == 1


class TestValidation:
    @pytest.fixture
    def adapter(self, tiny_model):
        return MoEAdapter(tiny_model("mixtral"))

    @pytest.mark.parametrize("bad_k", [0, -1, 9])
    def test_out_of_range(self, adapter, bad_k):
        with pytest.raises(ValueError, match=rf"model\.layers\.1\.mlp.*\[1, 8\], got {bad_k}"):
            adapter.set_top_k([2, bad_k])
        assert adapter.top_k == [2, 2]

    @pytest.mark.parametrize("bad_k", [2.0, "2", True, None])
    def test_non_integer(self, adapter, bad_k):
        with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp.*must be an integer in \[1, 8\]"):
            adapter.set_top_k([bad_k, 2])

    def test_numpy_integer_accepted(self, adapter):
        import numpy as np

        adapter.set_top_k([np.int64(3), 1])
        assert adapter.top_k == [3, 1]
        assert type(adapter.layers[0].router.top_k) is int

    def test_wrong_length(self, adapter):
        with pytest.raises(ValueError, match="got 3 top_k values for 2 MoE layers"):
            adapter.set_top_k([1, 1, 1])

    def test_unknown_layer_name(self, adapter):
        with pytest.raises(ValueError, match=r"unknown MoE layer name.*did you mean 'model\.layers\.0\.mlp'"):
            adapter.set_top_k({"model.layer.0.mlp": 1})

    def test_bad_request_changes_nothing(self, adapter):
        adapter.set_top_k([3, 3])
        with pytest.raises(ValueError):
            adapter.set_top_k([1, 0])
        assert adapter.top_k == [3, 3]

    def test_layer_setter_validates(self, adapter):
        with pytest.raises(ValueError, match=r"\[1, 8\], got 10"):
            adapter.layers[0].top_k = 10


@pytest.mark.parametrize(("model_type", "limit"), [("deepseek_v2", 4), ("deepseek_v3", 4), ("glm4_moe", 4)])
def test_group_limited_max_top_k(tiny_model, model_type, limit):
    adapter = MoEAdapter(tiny_model(model_type))
    assert adapter.max_top_k == [limit, limit]
    adapter.set_top_k([limit, limit])
    with pytest.raises(ValueError, match=rf"\[1, {limit}\], got {limit + 1}; .*group-limited"):
        adapter.set_top_k([limit + 1, 1])


def test_deepseek_v3_limit_keeps_weights_inside_selected_groups(tiny_model):
    # At the limit every selected expert comes from the selected groups, so none has a zero weight.
    model = tiny_model("deepseek_v3")
    adapter = MoEAdapter(model)
    adapter.set_top_k(adapter.max_top_k)
    router = adapter.layers[0].router
    hidden = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    _, weights, index = router(hidden)
    group_of = index // (8 // router.num_group)
    assert bool((group_of == group_of[:, :1]).all())
    assert bool((weights > 0).all())


def test_override_restores_after_exception(tiny_model):
    model = tiny_model("qwen2_moe")
    adapter = MoEAdapter(model)
    adapter.set_top_k([3, 2])
    with pytest.raises(RuntimeError, match="boom"):
        with adapter.override([1, 1], routing_weights="renormalize"):
            assert adapter.top_k == [1, 1]
            assert adapter.routing_weights == "renormalize"
            raise RuntimeError("boom")
    assert adapter.top_k == [3, 2]
    assert adapter.routing_weights == "native"


def test_second_adapter_restores_pretrained_k(tiny_model):
    model = tiny_model("olmoe")
    first = MoEAdapter(model)
    first.set_top_k([1, 1])
    second = MoEAdapter(model)
    assert second.native_top_k == [2, 2]
    second.restore()
    assert first.top_k == [2, 2]


def test_fingerprint_tracks_router_weights_not_k(tiny_model):
    model = tiny_model("mixtral")
    adapter = MoEAdapter(model)
    before = adapter.fingerprint()
    adapter.set_top_k([1, 3])
    assert adapter.fingerprint() == before
    assert MoEAdapter(tiny_model("mixtral")).fingerprint() == before
    with torch.no_grad():
        adapter.layers[1].router.weight[0, 0] += 1.0
    assert adapter.fingerprint() != before


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3", "dbrx", "qwen3_vl_moe_text"])
def test_from_pretrained_round_trip(tmp_path, model_type):
    from transformers import AutoModel, AutoModelForCausalLM

    model = build_tiny(model_type)
    model.save_pretrained(tmp_path)
    auto_class = AutoModel if model_type == "qwen3_vl_moe_text" else AutoModelForCausalLM
    reloaded = auto_class.from_pretrained(tmp_path, experts_implementation="eager").eval()
    original, loaded = MoEAdapter(model), MoEAdapter(reloaded)
    assert loaded.names == original.names
    assert loaded.native_top_k == original.native_top_k
    assert loaded.fingerprint() == original.fingerprint()
    original.set_top_k([1, 3])
    loaded.set_top_k([1, 3])
    assert torch.allclose(logits_of(loaded.model), logits_of(original.model), atol=1e-5)


class TestRoutingWeights:
    """Hand-worked routing weights for the logits [2, 1, 0.5, 0.1, -1, -1, -2, -3].

    softmax over all 8 experts: sum of exp = 13.782111, so p0 = 7.389056 / 13.782111 = 0.536134 and
    p1 = 2.718282 / 13.782111 = 0.197233. Renormalised over the top two: 0.731059 and 0.268941.
    """

    LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.1, -1.0, -1.0, -2.0, -3.0])
    P_ALL = (0.536134, 0.197233)
    P_TOP2 = (0.731059, 0.268941)

    def router_with_known_logits(self, model_type: str, tiny_model):
        adapter = MoEAdapter(tiny_model(model_type))
        router = adapter.layers[0].router
        with torch.no_grad():
            router.weight.zero_()
            router.weight[:, 0] = self.LOGITS
            if getattr(router, "bias", None) is not None:
                router.bias.zero_()
        hidden = torch.zeros(3, 32)
        hidden[:, 0] = 1.0
        return adapter, router, hidden

    def test_qwen2_moe_uses_probabilities_over_all_experts(self, tiny_model):
        adapter, router, hidden = self.router_with_known_logits("qwen2_moe", tiny_model)
        assert adapter.layers[0].native_routing_weights == "none"
        adapter.set_top_k([2, 4])
        _, weights, index = router(hidden)
        assert index[0].tolist() == [0, 1]
        assert weights[0].tolist() == pytest.approx(self.P_ALL, abs=1e-6)

        adapter.set_routing_weights("renormalize")
        _, weights, _ = router(hidden)
        assert weights[0].tolist() == pytest.approx(self.P_TOP2, abs=1e-6)

    def test_gpt_oss_softmax_over_selected_logits(self, tiny_model):
        adapter, router, hidden = self.router_with_known_logits("gpt_oss", tiny_model)
        _, weights, _ = router(hidden)
        assert weights[0].tolist() == pytest.approx(self.P_TOP2, abs=1e-3)
        assert round(weights[0, 0].item(), 3) == 0.731
        assert round(weights[0, 1].item(), 3) == 0.269

        adapter.set_routing_weights("none")
        _, weights, _ = router(hidden)
        assert weights[0].tolist() == pytest.approx(self.P_ALL, abs=1e-6)

    @pytest.mark.parametrize("model_type", ["gpt_oss", "qwen2_moe", "mixtral", "jamba", "deepseek_v2"])
    def test_renormalize_at_k1_gives_exact_ones(self, tiny_model, model_type):
        adapter, router, hidden = self.router_with_known_logits(model_type, tiny_model)
        adapter.set_top_k([1, 1])
        adapter.set_routing_weights("renormalize")
        _, weights, _ = router(hidden)
        scale = float(getattr(router, "routed_scaling_factor", 1.0))
        assert weights.shape == (3, 1)
        assert torch.equal(weights, torch.full((3, 1), scale, dtype=weights.dtype))

    def test_mixtral_none_gives_raw_probabilities(self, tiny_model):
        adapter, router, hidden = self.router_with_known_logits("mixtral", tiny_model)
        _, weights, _ = router(hidden)
        assert weights[0].tolist() == pytest.approx(self.P_TOP2, abs=1e-6)
        adapter.set_routing_weights("none")
        _, weights, _ = router(hidden)
        assert weights[0].tolist() == pytest.approx(self.P_ALL, abs=1e-6)
        adapter.restore()
        _, weights, _ = router(hidden)
        assert weights[0].tolist() == pytest.approx(self.P_TOP2, abs=1e-6)

    def test_deepseek_v3_renormalize_flag(self, tiny_model):
        adapter, router, hidden = self.router_with_known_logits("deepseek_v3", tiny_model)
        assert router.norm_topk_prob is True
        adapter.set_routing_weights("none")
        assert router.norm_topk_prob is False
        _, weights, index = router(hidden)
        expected = torch.sigmoid(self.LOGITS)[index[0]] * router.routed_scaling_factor
        assert weights[0].tolist() == pytest.approx(expected.tolist(), abs=1e-6)
        adapter.restore()
        assert router.norm_topk_prob is True

    def test_llama4_renormalize(self, tiny_model):
        adapter, router, hidden = self.router_with_known_logits("llama4_text", tiny_model)
        adapter.set_top_k([2, 1])
        scores, _ = router(hidden)
        assert scores[0, :2].tolist() == pytest.approx(torch.sigmoid(self.LOGITS[:2]).tolist(), abs=1e-6)
        adapter.set_routing_weights("renormalize")
        scores, _ = router(hidden)
        top = torch.sigmoid(self.LOGITS[:2])
        assert scores[0, :2].tolist() == pytest.approx((top / top.sum()).tolist(), abs=1e-6)
        assert scores[0, 2:].abs().sum().item() == 0.0

    def test_unsupported_policy_rejected(self, tiny_model):
        adapter = MoEAdapter(tiny_model("jetmoe"))
        with pytest.raises(ValueError, match="routing_weights='none' is not supported.*jetmoe"):
            adapter.set_routing_weights("none")
        assert adapter.routing_weights == "native"

    def test_unknown_policy_rejected(self, tiny_model):
        adapter = MoEAdapter(tiny_model("mixtral"))
        with pytest.raises(ValueError, match=r"routing_weights must be one of .*got 'softmax'"):
            adapter.set_routing_weights("softmax")

    def test_policy_changes_model_output(self, tiny_model):
        model = tiny_model("olmoe")
        adapter = MoEAdapter(model)
        adapter.set_top_k([1, 1])
        raw = logits_of(model)
        adapter.set_routing_weights("renormalize")
        renormalized = logits_of(model)
        assert not torch.allclose(raw, renormalized)
        assert math.isfinite(renormalized.abs().max().item())


def test_forward_block_rejects_wrong_shape(tiny_model):
    adapter = MoEAdapter(tiny_model("mixtral"))
    with pytest.raises(ValueError, match=r"\(batch, seq, 32\), got \(4, 32\)"):
        adapter.layers[0].forward_block(torch.zeros(4, 32))


def test_input_norm_found(tiny_model):
    adapter = MoEAdapter(tiny_model("olmoe"))
    norm = adapter.input_norm(adapter.layers[0])
    assert norm is adapter.model.model.layers[0].post_attention_layernorm


def test_wrong_argument_types_named(tiny_model):
    from lexi_pl.allocation import allocate
    from lexi_pl.profiling import profile_sensitivity

    model = tiny_model("mixtral")
    adapter = MoEAdapter(model)
    with pytest.raises(TypeError, match="takes a torch.nn.Module, got NoneType"):
        MoEAdapter(None)
    with pytest.raises(TypeError, match="expected a TopKPlan, got dict"):
        adapter.apply({"model.layers.0.mlp": 1})
    with pytest.raises(TypeError, match=r"takes an MoEAdapter, got MixtralForCausalLM.*MoEAdapter\(model\)"):
        profile_sensitivity(model)
    with pytest.raises(TypeError, match="takes a SensitivityProfile, got MoEAdapter"):
        allocate(adapter, fraction=0.5)
    assert adapter.top_k == [2, 2]
