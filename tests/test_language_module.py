import math

import lightning
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM

from lexi_models.language import load_causal_lm, load_model, looks_like_local_path
from lexi_models.language.tiny import build_tiny, tiny_config
from lexi_pl.data.text import TokenBlocks
from lexi_pl.modules.language import IGNORE_INDEX, MoECausalLM, export_pretrained, next_token_targets
from tests.test_text_data import shared_tokenizer_dir

TINY_OLMOE = {
    "model_type": "olmoe",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 1,
}


@pytest.fixture
def module():
    torch.manual_seed(0)
    return MoECausalLM(model_config=TINY_OLMOE).eval()


def hand_nll(module: MoECausalLM, ids: list[int]) -> float:
    """Summed NLL of tokens 1.. of an unpadded sequence, one log-softmax per position, in float64."""
    with torch.no_grad():
        logits = module.model(input_ids=torch.tensor([ids])).logits[0].double()
    return sum(-torch.log_softmax(logits[t], dim=-1)[ids[t + 1]].item() for t in range(len(ids) - 1))


def evaluate(module: MoECausalLM, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    for metric in module.val_metrics.values():
        metric.reset()
    with torch.no_grad():
        module.update_metrics(module.val_metrics, batch)
    return {name: float(metric.compute()) for name, metric in module.val_metrics.items()}


# label shift and padding


def test_five_tokens_score_four_targets(module):
    ids = [5, 0, 7, 9, 3]
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}

    assert next_token_targets(batch).tolist() == [[0, 7, 9, 3]]
    sums = evaluate(module, batch)
    assert sums["tokens"] == 4
    assert sums["nll_sum"] == pytest.approx(hand_nll(module, ids), rel=1e-5)


def test_padded_batch_scores_seven_plus_two(module):
    long_ids = [3, 4, 0, 6, 7, 8, 9, 10]
    short_ids = [11, 12, 13]
    # Padding uses id 0, which is also a real token elsewhere; only the attention mask marks it.
    batch = {
        "input_ids": torch.tensor([long_ids, short_ids + [0] * 5]),
        "attention_mask": torch.tensor([[1] * 8, [1, 1, 1, 0, 0, 0, 0, 0]]),
    }

    targets = next_token_targets(batch)
    assert targets[1].tolist() == [12, 13] + [IGNORE_INDEX] * 5
    sums = evaluate(module, batch)
    assert sums["tokens"] == 7 + 2
    expected = hand_nll(module, long_ids) + hand_nll(module, short_ids)
    assert sums["nll_sum"] == pytest.approx(expected, rel=1e-5)


def test_token_id_zero_is_scored(module):
    ids = [4, 0, 0, 6]
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}

    assert next_token_targets(batch).tolist() == [[0, 0, 6]]
    assert evaluate(module, batch)["tokens"] == 3


def test_labels_override_targets(module):
    batch = {
        "input_ids": torch.tensor([[4, 5, 6, 7]]),
        "attention_mask": torch.ones(1, 4, dtype=torch.long),
        "labels": torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 6, 7]]),
    }
    assert next_token_targets(batch).tolist() == [[IGNORE_INDEX, 6, 7]]
    assert evaluate(module, batch)["tokens"] == 2


def test_accuracy_counts_argmax_hits(module):
    ids = [5, 6, 7, 8, 9, 10]
    with torch.no_grad():
        predictions = module.model(input_ids=torch.tensor([ids])).logits[0, :-1].argmax(-1).tolist()
    hits = sum(prediction == target for prediction, target in zip(predictions, ids[1:]))
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    assert evaluate(module, batch)["correct"] == hits


# epoch metrics


def test_epoch_perplexity_is_corpus_level(module):
    sequences = [[3, 4, 5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18], [19, 20, 21, 22, 23, 24]]
    input_ids = torch.zeros(5, 6, dtype=torch.long)
    attention_mask = torch.zeros(5, 6, dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    # Batches of 2, 2 and 1 sequences with 7, 5 and 5 scored targets.
    loader = DataLoader(TokenBlocks(input_ids, attention_mask), batch_size=2)
    trainer = lightning.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                                enable_model_summary=False, enable_checkpointing=False)
    (results,) = trainer.validate(module, loader, verbose=False)

    nll_per_sequence = [hand_nll(module, ids) for ids in sequences]
    total_tokens = sum(len(ids) - 1 for ids in sequences)
    expected_nll = sum(nll_per_sequence) / total_tokens
    assert results["val/scored_tokens"] == total_tokens == 17
    assert results["val/nll"] == pytest.approx(expected_nll, rel=1e-5)
    assert results["val/ppl"] == pytest.approx(math.exp(expected_nll), rel=1e-5)
    batch_ppls = [
        math.exp((nll_per_sequence[0] + nll_per_sequence[1]) / 7),
        math.exp((nll_per_sequence[2] + nll_per_sequence[3]) / 5),
        math.exp(nll_per_sequence[4] / 5),
    ]
    assert abs(sum(batch_ppls) / 3 - results["val/ppl"]) > 1e-3 * results["val/ppl"]


def test_aux_loss_only_in_training(module):
    batch = {"input_ids": torch.tensor([[3, 4, 5, 6, 7, 8]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    plain = evaluate(module, batch)["nll_sum"]
    module.model.config.output_router_logits = True
    module.model.config.router_aux_loss_coef = 100.0
    assert evaluate(module, batch)["nll_sum"] == pytest.approx(plain, rel=1e-6)

    module.train()
    with torch.no_grad():
        aux_loss = module.model(**batch, output_router_logits=True).aux_loss
        loss = module.training_step(batch, 0)
    assert aux_loss > 0
    assert loss.item() == pytest.approx(plain / 5 + 100.0 * aux_loss.item(), rel=1e-4)


def test_fit_one_step_then_export(tmp_path, tmp_path_factory):
    tokenizer_dir = shared_tokenizer_dir(tmp_path_factory)
    torch.manual_seed(0)
    module = MoECausalLM(model_config={**TINY_OLMOE, "vocab_size": 512}, lr=1e-2)
    blocks = TokenBlocks(torch.randint(2, 512, (4, 16)), torch.ones(4, 16, dtype=torch.long))
    trainer = lightning.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                                enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(module, DataLoader(blocks, batch_size=2))
    ckpt = tmp_path / "one_step.ckpt"
    trainer.save_checkpoint(ckpt)
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["datamodule_hyper_parameters"] = {"source": "pydoc", "tokenizer_path": str(tokenizer_dir)}
    torch.save(checkpoint, ckpt)

    record = export_pretrained(ckpt, tmp_path / "export", evaluate=False, metadata={"seed": 0})
    model, tokenizer = load_causal_lm(str(tmp_path / "export"))
    assert record["seed"] == 0
    assert record["global_step"] == 1
    assert len(tokenizer) == 512
    with torch.no_grad():
        expected = module.model.eval()(input_ids=blocks.input_ids).logits
        assert torch.allclose(model(input_ids=blocks.input_ids).logits, expected, atol=1e-5)


# construction and loading errors


def test_needs_exactly_one_model_source():
    with pytest.raises(ValueError, match="exactly one"):
        MoECausalLM()
    with pytest.raises(ValueError, match="exactly one"):
        MoECausalLM(model_name_or_path="a", model_config=TINY_OLMOE)


def test_dense_model_rejected(tmp_path):
    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no MoE layer found in LlamaForCausalLM"):
        MoECausalLM(model_name_or_path=str(tmp_path))


def test_fixed_k_family_rejected(tmp_path):
    tiny_config("phimoe").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'phimoe'"):
        load_model(str(tmp_path))


def test_missing_local_folder_named(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_model(missing)


def test_folder_without_tokenizer_rejected(tmp_path):
    build_tiny("olmoe").save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_causal_lm(str(tmp_path))


def test_hub_id_offline_explained():
    with pytest.raises(OSError, match="HF_HUB_OFFLINE=0"):
        load_model("allenai/OLMoE-1B-7B-0924")


@pytest.mark.parametrize(
    ("name", "is_path"),
    [("./model", True), ("/abs/model", True), ("~/model", True), ("a/b/c", True), ("owner/name", False),
     ("gpt2", False)],
)
def test_local_path_detection(name, is_path):
    assert looks_like_local_path(name) == is_path


def test_load_round_trip_and_dtype(tmp_path, tmp_path_factory):
    model = build_tiny("qwen2_moe", vocab_size=512)
    model.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(shared_tokenizer_dir(tmp_path_factory)).save_pretrained(tmp_path)
    loaded, tokenizer = load_causal_lm(str(tmp_path), dtype="bfloat16")

    assert not loaded.training
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert tokenizer.eos_token_id == 0
    module = MoECausalLM(model_name_or_path=str(tmp_path), dtype="float32")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(module.model(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
