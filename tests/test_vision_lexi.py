"""LExI on the shipped V-MoE MNIST checkpoint, through the config users run and through the Python API."""

import csv
import json
from pathlib import Path

import pytest
from lightning.pytorch import Trainer

from lexi_pl.adapter import MoEAdapter
from lexi_pl.callbacks import LExI, MoEThroughput
from lexi_pl.cli import main as cli_main
from lexi_pl.data import ImageClassificationData
from lexi_pl.modules import MoEImageClassifier
from lexi_pl.plan import TopKPlan

REPO_ROOT = Path(__file__).resolve().parents[1]
LEXI_CONFIG = REPO_ROOT / "configs" / "vision" / "vmoe_mnist_lexi.yaml"
SHIPPED = REPO_ROOT / "checkpoints" / "vmoe_mnist"


def shipped_module() -> MoEImageClassifier:
    exported = json.loads((SHIPPED / "config.json").read_text())
    return MoEImageClassifier(
        model_name=exported["model_name"],
        checkpoint_path=str(SHIPPED / "model.safetensors"),
        model_kwargs=exported["model_kwargs"],
    )


def test_lexi_config_validates_shipped_checkpoint(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO_ROOT)
    cli_main([
        "validate",
        "--config", str(LEXI_CONFIG),
        "--data.init_args.val_subset", "200",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
    ])
    (run_folder,) = [path.parent for path in tmp_path.rglob("metrics.csv")]
    plan = TopKPlan.load(run_folder / "lexi_plan.json")
    assert plan.total == 6
    assert plan.native_total == 8
    assert all(k in (1, 2) for k in plan.top_k.values())
    assert (run_folder / "lexi_profile.json").is_file()

    (row,) = [row for row in csv.DictReader((run_folder / "metrics.csv").open()) if row.get("val/top1")]
    assert float(row["val/samples"]) == 200
    assert float(row["val/active_experts_total"]) == 6
    assert float(row["val/top1"]) >= 0.9
    assert float(row["val/samples_per_sec"]) > 0


@pytest.mark.slow
def test_lexi_75_percent_on_shipped_checkpoint(tmp_path):
    module = shipped_module()
    data = ImageClassificationData(batch_size=100, val_subset=300)
    trainer_options = dict(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path
    )
    (native,) = Trainer(callbacks=[MoEThroughput()], **trainer_options).validate(module, data, verbose=False)
    lexi = LExI(fraction=0.75, output_dir=str(tmp_path))
    (reduced,) = Trainer(callbacks=[lexi, MoEThroughput()], **trainer_options).validate(module, data, verbose=False)

    assert native["val/active_experts_total"] == 8
    assert reduced["val/active_experts_total"] == 6
    assert reduced["val/expert_gflops_per_sample"] == pytest.approx(0.75 * native["val/expert_gflops_per_sample"])
    assert reduced["val/top1"] >= native["val/top1"] - 0.05
    assert reduced["val/nll"] > native["val/nll"]
    assert MoEAdapter(module.model).top_k == [2, 2, 2, 2]
