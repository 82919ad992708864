"""The language configs under configs/language: they parse, and they run end to end on small local stand-ins.

The real-checkpoint configs name Hub models that tests cannot download. Each of them runs against a tiny
random-weight model of the same transformers family instead, saved with save_pretrained and passed with a
command-line override, and on the local pydoc corpus instead of wikitext.
"""

import csv
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from lexi_models.language.tiny import build_tiny
from lexi_pl.cli import main
from tests.test_text_data import TEST_VOCAB_SIZE, shared_cache_dir, shared_tokenizer_dir

REPOSITORY = Path(__file__).resolve().parents[1]
CONFIGS = REPOSITORY / "configs" / "language"

# config name: (Hub id, LExI budget argument, tiny model family, tiny overrides that keep the budget feasible)
REAL_CHECKPOINTS = {
    "olmoe_1b_7b": ("allenai/OLMoE-1B-7B-0924", {"budget": 100}, "olmoe",
                    {"num_hidden_layers": 16, "num_experts": 16, "num_experts_per_tok": 8}),
    "qwen1_5_moe_a2_7b": ("Qwen/Qwen1.5-MoE-A2.7B", {"fraction": 0.75}, "qwen2_moe", {}),
    "mixtral_8x7b": ("mistralai/Mixtral-8x7B-v0.1", {"fraction": 0.75}, "mixtral", {}),
    "deepseek_v2_lite": ("deepseek-ai/DeepSeek-V2-Lite", {"fraction": 0.75}, "deepseek_v2", {}),
    "qwen3_30b_a3b": ("Qwen/Qwen3-30B-A3B", {"fraction": 0.75}, "qwen3_moe", {}),
    "gpt_oss_20b": ("openai/gpt-oss-20b", {"fraction": 0.75}, "gpt_oss", {}),
}


@pytest.fixture(autouse=True)
def run_from_repository(monkeypatch):
    # The shipped configs use paths relative to the repository root.
    monkeypatch.chdir(REPOSITORY)


def read_metrics(log_dir: Path) -> dict[str, float]:
    """Return the last logged value of every column of the run's metrics.csv."""
    (metrics_file,) = log_dir.rglob("metrics.csv")
    values: dict[str, float] = {}
    with metrics_file.open() as file:
        for row in csv.DictReader(file):
            values.update({key: float(value) for key, value in row.items() if value not in ("", None)})
    return values


def print_config(config: Path, capsys, *overrides: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", str(config), *overrides, "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def local_overrides(tmp_path: Path, tmp_path_factory) -> list[str]:
    return [
        "--data.init_args.source", "pydoc",
        "--data.init_args.val_split", "validation",
        "--data.init_args.cache_dir", str(shared_cache_dir(tmp_path_factory)),
        "--data.init_args.block_size", "32",
        "--data.init_args.batch_size", "2",
        "--trainer.limit_val_batches", "2",
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
    ]


@pytest.mark.parametrize("name", sorted(REAL_CHECKPOINTS))
def test_real_checkpoint_config_parses(name, capsys):
    hub_id, budget, _, _ = REAL_CHECKPOINTS[name]
    printed = print_config(CONFIGS / f"{name}_lexi.yaml", capsys)

    assert printed["model"]["init_args"]["model_name_or_path"] == hub_id
    assert printed["model"]["init_args"]["dtype"] == "bfloat16"
    assert printed["data"]["init_args"]["source"] == "wikitext"
    assert printed["data"]["init_args"]["config_name"] == "wikitext-2-raw-v1"
    assert printed["data"]["init_args"]["val_split"] == "test"
    (lexi,) = [callback for callback in printed["trainer"]["callbacks"] if callback["class_path"].endswith(".LExI")]
    assert lexi["class_path"] == "lexi_pl.callbacks.LExI"
    for key, value in budget.items():
        assert lexi["init_args"][key] == value


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL_CHECKPOINTS))
def test_real_checkpoint_config_runs_on_tiny_model(name, tmp_path, tmp_path_factory):
    _, _, family, overrides = REAL_CHECKPOINTS[name]
    model_dir = tmp_path / f"tiny_{family}"
    build_tiny(family, vocab_size=TEST_VOCAB_SIZE, **overrides).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(shared_tokenizer_dir(tmp_path_factory)).save_pretrained(model_dir)

    main([
        "validate", "--config", str(CONFIGS / f"{name}_lexi.yaml"),
        "--model.init_args.model_name_or_path", str(model_dir),
        *local_overrides(tmp_path, tmp_path_factory),
    ])

    metrics = read_metrics(tmp_path / "logs")
    # Two batches of two 32-token blocks score 2 * 2 * 31 targets; MoEThroughput counts all 128 input tokens.
    assert metrics["val/scored_tokens"] == 124
    assert metrics["val/tokens"] == 128
    assert metrics["val/ppl"] > 1
    assert metrics["val/tokens_per_sec"] > 0
    (plan,) = (tmp_path / "logs").rglob("lexi_plan.json")
    assert plan.is_file()


@pytest.mark.parametrize("name", ["moe_lm_pydoc", "moe_lm_pydoc_lexi"])
def test_shipped_model_configs_run(name, tmp_path, tmp_path_factory):
    main(["validate", "--config", str(CONFIGS / f"{name}.yaml"), *local_overrides(tmp_path, tmp_path_factory),
          "--data.init_args.block_size", "256"])

    metrics = read_metrics(tmp_path / "logs")
    assert metrics["val/scored_tokens"] == 2 * 2 * 255
    # The trained model is far better than uniform guessing over its 4096 tokens.
    assert metrics["val/ppl"] < 200
    assert metrics["val/active_experts_total"] == (18 if name.endswith("lexi") else 24)


def test_fit_config_trains_from_scratch(tmp_path, tmp_path_factory, capsys):
    config = CONFIGS / "moe_lm_pydoc_fit.yaml"
    printed = print_config(config, capsys)
    model_config = printed["model"]["init_args"]["model_config"]
    assert model_config["model_type"] == "olmoe"
    assert model_config["num_experts"] >= 16
    assert model_config["num_experts_per_tok"] >= 4
    assert model_config["num_hidden_layers"] >= 6

    main([
        "fit", "--config", str(config),
        "--trainer.max_steps", "1",
        "--trainer.val_check_interval", "1",
        "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
        "--data.init_args.cache_dir", str(shared_cache_dir(tmp_path_factory)),
        "--data.init_args.block_size", "32",
        "--data.init_args.batch_size", "2",
    ])

    metrics = read_metrics(tmp_path / "logs")
    assert metrics["val/scored_tokens"] == 2 * 31
    (checkpoint,) = (tmp_path / "logs").rglob("*.ckpt")
    assert checkpoint.stat().st_size > 0
