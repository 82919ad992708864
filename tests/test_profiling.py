import json

import pytest
import torch
from torch import nn

from lexi_pl.adapter import MoEAdapter
from lexi_pl.profiling import profile_sensitivity

SMALL = dict(batch_size=2, seq_len=8, iterations=2, progress=False)


class ConstantRouter(nn.Module):
    """A router with fixed logits, found by the adapter through its `top_k` and `num_experts` attributes."""

    def __init__(self, logits: list[float], top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.num_experts = len(logits)
        self.register_buffer("logits", torch.tensor(logits))
        self.weight = nn.Parameter(torch.zeros(len(logits), 4))

    def forward(self, hidden: torch.Tensor):
        logits = self.logits.expand(hidden.shape[0], -1) + hidden @ self.weight.T
        probabilities = logits.softmax(dim=-1)
        weights, index = probabilities.topk(self.top_k, dim=-1)
        return logits, weights, index


class ScalingExperts(nn.Module):
    """Expert e multiplies its input by scales[e]."""

    def __init__(self, scales: list[float]) -> None:
        super().__init__()
        self.register_buffer("scales", torch.tensor(scales))

    def forward(self, hidden, top_k_index, top_k_weights):
        factor = (top_k_weights * self.scales[top_k_index]).sum(dim=-1, keepdim=True)
        return hidden * factor


class ToyMoE(nn.Module):
    def __init__(self, logits, scales, top_k) -> None:
        super().__init__()
        self.gate = ConstantRouter(logits, top_k)
        self.experts = ScalingExperts(scales)

    def forward(self, hidden):
        shape = hidden.shape
        flat = hidden.reshape(-1, shape[-1])
        _, weights, index = self.gate(flat)
        return self.experts(flat, index, weights).reshape(shape)


def toy_model() -> nn.Module:
    return nn.Sequential(ToyMoE([3.0, 2.0, 1.0, 0.0], [1.0, -1.0, 2.0, 0.5], top_k=3))


def test_toy_profile_matches_hand_worked_ratio():
    # Y_k = a_k * X with a_k = sum_{i<k} p_i * s_i, so D(k) / ||Y_3|| = |a_k - a_3| / |a_3| for any X.
    probabilities = torch.tensor([3.0, 2.0, 1.0, 0.0]).softmax(dim=0).tolist()
    scales = [1.0, -1.0, 2.0]
    a = [sum(p * s for p, s in zip(probabilities[:k], scales[:k])) for k in (1, 2, 3)]
    profile = profile_sensitivity(MoEAdapter(toy_model()), **SMALL)
    assert profile.layer_names == ["0"]
    assert profile.native_top_k == [3]
    ratios = [delta / profile.base_norms[0] for delta in profile.deltas[0]]
    assert ratios == pytest.approx([abs(a[0] - a[2]) / abs(a[2]), abs(a[1] - a[2]) / abs(a[2]), 0.0], rel=1e-5)


def test_toy_profile_renormalized_ratio():
    # With renormalisation a_1 = s_0 = 1 and a_2 = (p0 - p1) / (p0 + p1).
    p = torch.tensor([3.0, 2.0, 1.0, 0.0]).softmax(dim=0).tolist()
    a3 = (p[0] - p[1] + 2 * p[2]) / (p[0] + p[1] + p[2])
    a = [1.0, (p[0] - p[1]) / (p[0] + p[1]), a3]
    adapter = MoEAdapter(toy_model())
    profile = profile_sensitivity(adapter, routing_weights="renormalize", **SMALL)
    ratios = [delta / profile.base_norms[0] for delta in profile.deltas[0]]
    assert ratios == pytest.approx([abs(a[0] - a3) / abs(a3), abs(a[1] - a3) / abs(a3), 0.0], rel=1e-5)
    assert profile.settings["routing_weights"] == "renormalize"


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "lfm2_moe"])
@pytest.mark.parametrize("routing_weights", ["native", "renormalize", "none"])
def test_fast_path_equals_naive_loop(tiny_model, model_type, routing_weights):
    from lexi_models.language.tiny import build_tiny

    model = build_tiny(model_type, num_experts_per_tok=4)
    adapter = MoEAdapter(model)
    fast = profile_sensitivity(adapter, method="fast", routing_weights=routing_weights, **SMALL)
    naive = profile_sensitivity(adapter, method="naive", routing_weights=routing_weights, **SMALL)
    assert fast.timing["paths"] == ["fast", "fast"]
    assert naive.timing["paths"] == ["naive", "naive"]
    for fast_row, naive_row in zip(fast.deltas, naive.deltas):
        assert fast_row == pytest.approx(naive_row, rel=1e-4, abs=1e-5)
        assert fast_row[-1] == 0.0
        assert fast_row[0] > 0.0
    assert fast.base_norms == pytest.approx(naive.base_norms, rel=1e-5)


def test_fast_path_rejected_where_it_cannot_apply(tiny_model):
    adapter = MoEAdapter(tiny_model("dbrx"))
    with pytest.raises(ValueError, match=r"fast profiling path does not apply.*dbrx"):
        profile_sensitivity(adapter, method="fast", **SMALL)


def test_profile_is_deterministic(tiny_model):
    adapter = MoEAdapter(tiny_model("olmoe"))
    first = profile_sensitivity(adapter, seed=3, **SMALL)
    second = profile_sensitivity(adapter, seed=3, **SMALL)
    other_seed = profile_sensitivity(adapter, seed=4, **SMALL)
    assert first.deltas == second.deltas
    assert first.deltas != other_seed.deltas


def test_profiling_leaves_model_unchanged(tiny_model):
    model = tiny_model("deepseek_v3")
    adapter = MoEAdapter(model)
    adapter.set_top_k([1, 3])
    model.train()
    profile_sensitivity(adapter, routing_weights="none", **SMALL)
    assert adapter.top_k == [1, 3]
    assert model.training
    assert all(module.training for module in model.modules())
    assert adapter.routing_weights == "native"
    assert adapter.layers[0].router.norm_topk_prob is True


def test_profiling_restores_model_after_error(tiny_model):
    model = tiny_model("mixtral")
    adapter = MoEAdapter(model)
    adapter.set_top_k([3, 1])

    def fail(module, args):
        raise RuntimeError("expert failure")

    handle = adapter.layers[1].block.experts.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="expert failure"):
        profile_sensitivity(adapter, routing_weights="none", **SMALL)
    handle.remove()
    assert adapter.top_k == [3, 1]
    assert adapter.routing_weights == "native"


def test_profile_records_settings_and_timing(tiny_model):
    adapter = MoEAdapter(tiny_model("qwen3_moe"))
    profile = profile_sensitivity(adapter, **SMALL)
    assert profile.fingerprint == adapter.fingerprint()
    assert profile.settings == {
        "batch_size": 2,
        "seq_len": 8,
        "iterations": 2,
        "seed": 0,
        "routing_weights": "native",
        "input_mode": "gaussian",
        "dtype": "float32",
        "device": "cpu",
    }
    assert len(profile.timing["layer_seconds"]) == 2
    assert profile.timing["total_seconds"] >= sum(profile.timing["layer_seconds"])


def test_cached_profile_reused(tiny_model, tmp_path):
    adapter = MoEAdapter(tiny_model("olmoe"))
    first = profile_sensitivity(adapter, cache_dir=tmp_path, **SMALL)
    (cache_file,) = tmp_path.glob("lexi-profile-*.json")
    data = json.loads(cache_file.read_text())
    data["deltas"][0][0] = 123.0
    cache_file.write_text(json.dumps(data))

    reused = profile_sensitivity(adapter, cache_dir=tmp_path, **SMALL)
    assert reused.deltas[0][0] == 123.0
    recomputed = profile_sensitivity(adapter, cache_dir=tmp_path, **{**SMALL, "iterations": 3})
    assert recomputed.deltas[0][0] != 123.0
    assert len(list(tmp_path.glob("lexi-profile-*.json"))) == 2
    assert first.deltas[0][0] != 123.0


def test_norm_scaled_inputs_use_norm_weight(tiny_model):
    model = tiny_model("olmoe")
    adapter = MoEAdapter(model)
    gaussian = profile_sensitivity(adapter, **SMALL)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight.fill_(1.0)
    unit_scaled = profile_sensitivity(adapter, input_mode="norm_scaled", **SMALL)
    for unit_row, gaussian_row in zip(unit_scaled.deltas, gaussian.deltas):
        assert unit_row == pytest.approx(gaussian_row, rel=1e-6)
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight.fill_(3.0)
    scaled = profile_sensitivity(adapter, input_mode="norm_scaled", **SMALL)
    assert scaled.deltas[0] != pytest.approx(gaussian.deltas[0], rel=1e-3)
    assert scaled.deltas[1] == pytest.approx(gaussian.deltas[1], rel=1e-6)


def test_norm_scaled_without_norm_rejected():
    with pytest.raises(ValueError, match="found no normalisation layer.*use input_mode='gaussian'"):
        profile_sensitivity(MoEAdapter(toy_model()), input_mode="norm_scaled", **SMALL)


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("batch_size", 0, "batch_size must be a positive integer, got 0"),
        ("iterations", 1.5, "iterations must be a positive integer, got 1.5"),
        ("input_mode", "uniform", "input_mode must be one of"),
        ("routing_weights", "sum", "routing_weights must be one of"),
        ("method", "exact", "method must be 'auto', 'fast' or 'naive'"),
    ],
)
def test_invalid_settings_rejected(setting, value, message):
    with pytest.raises(ValueError, match=message):
        profile_sensitivity(MoEAdapter(toy_model()), **{**SMALL, setting: value})
