"""Tests for MoEImageClassifier, its metrics, the weight export and the shipped mnist5k checkpoint."""

import json
import math
from pathlib import Path

import lightning
import pytest
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from lexi_pl.adapter import MoEAdapter
from lexi_pl.cli import main as cli_main
from lexi_pl.data import ImageClassificationData
from lexi_pl.modules import MoEImageClassifier, export_timm_weights
from lexi_pl.modules.image import _no_weight_decay_names, warmup_cosine_factor

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_WEIGHTS = REPO_ROOT / "checkpoints" / "vmoe_mnist" / "model.safetensors"
VALIDATE_CONFIG = REPO_ROOT / "configs" / "vision" / "vmoe_mnist.yaml"


def _quiet_trainer(**kwargs) -> lightning.Trainer:
    return lightning.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_validate_logs_metrics():
    torch.manual_seed(0)
    module = MoEImageClassifier()
    data = ImageClassificationData(batch_size=16, val_subset=32)
    (results,) = _quiet_trainer(limit_val_batches=2).validate(module, datamodule=data, verbose=False)

    assert set(results) == {"val/top1", "val/top5", "val/nll"}
    assert 0.0 <= results["val/top1"] <= results["val/top5"] <= 1.0
    # An untrained 10-class model is close to uniform, so its NLL is near ln(10) = 2.30.
    assert 1.5 < results["val/nll"] < 3.5
    # The data module took its transforms from the model.
    assert data.resolve_data_config() == module.data_config


def test_test_step_logs_test_metrics():
    module = MoEImageClassifier()
    data = ImageClassificationData(batch_size=16, val_subset=16)
    (results,) = _quiet_trainer(limit_test_batches=1).test(module, datamodule=data, verbose=False)

    assert set(results) == {"test/top1", "test/top5", "test/nll"}


def test_nll_is_mean_over_samples():
    module = MoEImageClassifier()
    metrics = module.val_metrics
    # A uniform row has NLL ln(10). A row with logit ln(9) on the label and 0 elsewhere gives the
    # label probability 9 / (9 + 9) = 0.5, so NLL ln(2).
    uniform = torch.zeros(1, 10)
    confident = torch.zeros(3, 10)
    confident[torch.arange(3), torch.tensor([1, 2, 3])] = math.log(9.0)
    module.update_metrics(metrics, uniform, torch.tensor([0]))
    module.update_metrics(metrics, confident, torch.tensor([1, 2, 3]))

    expected = (math.log(10.0) + 3 * math.log(2.0)) / 4
    mean_of_batch_means = (math.log(10.0) + math.log(2.0)) / 2
    assert metrics["nll"].compute().item() == pytest.approx(expected, rel=1e-6)
    assert abs(expected - mean_of_batch_means) > 0.1


def test_top1_is_micro_average():
    module = MoEImageClassifier()
    metrics = module.val_metrics
    # Three class-0 images predicted correctly, one class-1 image predicted as class 0. Micro
    # accuracy is 3/4, while the macro mean over the two classes present would be (1 + 0) / 2.
    logits = torch.zeros(4, 10)
    logits[:, 0] = 5.0
    logits[3, 1] = 1.0
    module.update_metrics(metrics, logits, torch.tensor([0, 0, 0, 1]))

    assert metrics["top1"].compute().item() == pytest.approx(0.75)
    assert metrics["top5"].compute().item() == pytest.approx(1.0)


def test_training_loss_includes_aux_loss():
    module = MoEImageClassifier()
    module.train()
    images = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(8) % 10

    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="self.log"):
        loss = module.training_step((images, labels), 0)
    # Same seed, so the router noise and thus the routing match the training step.
    torch.manual_seed(0)
    logits = module.model(images)
    classification_loss = F.cross_entropy(logits, labels)
    aux_loss = module.model.aux_loss()

    assert aux_loss.item() > 0
    torch.testing.assert_close(loss, classification_loss + aux_loss)


def test_eval_aux_loss_is_zero():
    module = MoEImageClassifier().eval()
    module.model(torch.randn(2, 1, 28, 28))

    assert module._aux_loss().item() == 0.0


def test_missing_checkpoint_path_raises():
    with pytest.raises(FileNotFoundError, match="does_not_exist.safetensors"):
        MoEImageClassifier(checkpoint_path="does_not_exist.safetensors")


def test_model_kwargs_reach_timm():
    module = MoEImageClassifier(model_kwargs={"top_k": 1, "num_experts": 4}, num_classes=7)

    assert MoEAdapter(module.model).native_top_k == [1, 1, 1, 1]
    assert MoEAdapter(module.model).num_experts == [4, 4, 4, 4]
    assert module.num_classes == 7
    assert "top5" in module.val_metrics


def test_weight_decay_excludes_biases_and_tokens():
    model = MoEImageClassifier().model
    excluded = _no_weight_decay_names(model)

    assert "blocks.1.mlp.experts.fc1_bias" in excluded
    assert "blocks.0.attn.qkv.bias" in excluded
    assert "blocks.0.norm1.weight" in excluded
    assert "pos_embed" in excluded
    assert "cls_token" in excluded
    assert "blocks.1.mlp.experts.fc1_weight" not in excluded
    assert "blocks.1.mlp.router.weight" not in excluded
    assert "head.weight" not in excluded


@pytest.mark.parametrize(
    ("step", "cosine", "expected"),
    [
        (0, True, 0.25),  # warmup: (0 + 1) / 4
        (3, True, 1.0),  # last warmup step
        (4, True, 1.0),  # cosine start
        (8, True, 0.5),  # halfway through the 8 cosine steps
        (12, True, 0.0),  # end of training
        (20, True, 0.0),  # past the end stays at 0
        (8, False, 1.0),  # constant after warmup
    ],
)
def test_warmup_cosine_factor(step, cosine, expected):
    assert warmup_cosine_factor(step, warmup_steps=4, total_steps=12, cosine=cosine) == pytest.approx(expected)


def test_fit_then_export_roundtrip(tmp_path):
    torch.manual_seed(0)
    module = MoEImageClassifier(lr=0.01, weight_decay=0.1, warmup_epochs=1)
    data = ImageClassificationData(batch_size=16, val_subset=16)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/top1", mode="max")
    trainer = lightning.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        callbacks=[checkpoint],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    param_groups = trainer.optimizers[0].param_groups

    assert [group["weight_decay"] for group in param_groups] == [0.1, 0.0]
    assert [group["initial_lr"] for group in param_groups] == [0.01, 0.01]
    assert trainer.lr_scheduler_configs[0].interval == "step"

    config = export_timm_weights(checkpoint.best_model_path, tmp_path / "export", evaluate=False, metadata={"seed": 0})
    weights = load_file(tmp_path / "export" / "model.safetensors")
    written = json.loads((tmp_path / "export" / "config.json").read_text())
    restored = timm.create_model("vmoe_tiny_mnist", checkpoint_path=str(tmp_path / "export" / "model.safetensors"))

    assert set(weights) == set(module.model.state_dict())
    assert written == config
    assert written["model_name"] == "vmoe_tiny_mnist"
    assert written["data"]["source"] == "mnist5k"
    assert written["training"]["seed"] == 0
    assert written["training"]["global_step"] == 2
    images = torch.randn(4, 1, 28, 28)
    module.eval()
    restored.eval()
    torch.testing.assert_close(restored(images), module.model(images))


def test_shipped_checkpoint_top1():
    exported = json.loads((SHIPPED_WEIGHTS.parent / "config.json").read_text())
    module = MoEImageClassifier(
        model_name=exported["model_name"],
        checkpoint_path=str(SHIPPED_WEIGHTS),
        model_kwargs=exported["model_kwargs"],
    )
    data = ImageClassificationData(batch_size=100, val_subset=200)
    (results,) = _quiet_trainer().validate(module, datamodule=data, verbose=False)

    assert MoEAdapter(module.model).native_top_k == [2, 2, 2, 2]
    assert results["val/top1"] >= 0.95


def test_validate_config_runs(monkeypatch, tmp_path):
    # The config names the checkpoint relative to the repository root, where `lightning validate` runs.
    monkeypatch.chdir(REPO_ROOT)
    cli_main([
        "validate",
        "--config", str(VALIDATE_CONFIG),
        "--data.init_args.val_subset", "100",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
    ])

    metrics_files = list(tmp_path.rglob("metrics.csv"))
    assert len(metrics_files) == 1
    header = metrics_files[0].read_text().splitlines()[0].split(",")
    assert {"val/top1", "val/top5", "val/nll"} <= set(header)
