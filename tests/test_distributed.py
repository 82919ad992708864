"""Evaluation on several processes (DDP, gloo, CPU) gives the metrics of one process and applies one plan."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_validate(config: str, tmp_path: Path, devices: int, *overrides: str) -> tuple[dict, list[dict]]:
    """Run `python -m lexi_pl validate` on `devices` CPU processes; return the logged metrics and per-rank records."""
    records = tmp_path / f"records{devices}"
    records.mkdir()
    command = [
        sys.executable, "-m", "lexi_pl", "validate",
        "--config", config,
        "--trainer.accelerator", "cpu",
        "--trainer.devices", str(devices),
        "--trainer.strategy", "ddp" if devices > 1 else "auto",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / f"logs{devices}"),
        "--trainer.callbacks+=tests.lightning_helpers.RecordTopK",
        f"--trainer.callbacks.init_args.folder={records}",
        *overrides,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (metrics_file,) = (tmp_path / f"logs{devices}").rglob("metrics.csv")
    rows = [row for row in csv.DictReader(metrics_file.open()) if any(key.endswith("/samples") and row[key] for key in row)]
    assert len(rows) == 1
    metrics = {key: float(value) for key, value in rows[0].items() if value}
    ranks = [json.loads(path.read_text()) for path in sorted(records.glob("rank*.json"))]
    assert len(ranks) == devices
    return metrics, ranks


@pytest.mark.slow
def test_vision_two_processes_match_one(tmp_path):
    # 11 images do not divide by 2 processes, so a padding sampler would score one image twice.
    overrides = ("--data.init_args.val_subset", "11", "--data.init_args.batch_size", "4")
    single, (single_rank,) = run_validate("configs/vision/vmoe_mnist_lexi.yaml", tmp_path, 1, *overrides)
    double, ranks = run_validate("configs/vision/vmoe_mnist_lexi.yaml", tmp_path, 2, *overrides)

    assert single["val/samples"] == 11
    assert double["val/samples"] == 11
    assert sorted(rank["samples"] for rank in ranks) == [5, 6]
    for key in ("val/top1", "val/top5", "val/nll", "val/active_experts_total"):
        assert double[key] == pytest.approx(single[key], rel=1e-5), key
    assert ranks[0]["top_k"] == ranks[1]["top_k"] == single_rank["top_k"]
    assert sum(ranks[0]["top_k"]) == 6


@pytest.mark.slow
def test_four_processes_score_each_sample_once(tmp_path):
    # 10 samples on 4 processes: 3, 3, 2 and 2. Samples 0 and 1 are right, so top-1 is 2 / 10 = 0.2; a padding
    # sampler would score samples 0 and 1 twice and report 4 / 12. The mean of index^2 over 0..9 is 28.5.
    config = tmp_path / "config.yaml"
    config.write_text(
        "model: {class_path: tests.lightning_helpers.FirstTwoCorrect}\n"
        "data: {class_path: tests.lightning_helpers.IndexedSamples, init_args: {count: 10, batch_size: 2}}\n"
        "trainer: {logger: {class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: logs}}}\n"
    )
    records = tmp_path / "records4"
    records.mkdir()
    command = [
        sys.executable, "-m", "lexi_pl", "validate", "--config", str(config),
        "--trainer.accelerator", "cpu", "--trainer.devices", "4", "--trainer.strategy", "ddp",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (metrics_file,) = (tmp_path / "logs").rglob("metrics.csv")
    (row,) = [row for row in csv.DictReader(metrics_file.open()) if row.get("val/top1")]
    assert float(row["val/top1"]) == pytest.approx(0.2)
    assert float(row["val/index_squared_mean"]) == pytest.approx(28.5)
    assert float(row["val/constant"]) == pytest.approx(1.0)


@pytest.mark.slow
def test_language_two_processes_match_one(tmp_path):
    overrides = ("--data.init_args.val_subset", "11", "--data.init_args.batch_size", "4")
    single, (single_rank,) = run_validate("configs/language/moe_lm_pydoc_lexi.yaml", tmp_path, 1, *overrides)
    double, ranks = run_validate("configs/language/moe_lm_pydoc_lexi.yaml", tmp_path, 2, *overrides)

    assert single["val/samples"] == double["val/samples"] == 11
    assert sorted(rank["samples"] for rank in ranks) == [5, 6]
    assert double["val/scored_tokens"] == single["val/scored_tokens"]
    assert double["val/tokens"] == single["val/tokens"]
    for key in ("val/ppl", "val/nll", "val/acc"):
        assert double[key] == pytest.approx(single[key], rel=1e-5), key
    assert ranks[0]["top_k"] == ranks[1]["top_k"] == single_rank["top_k"]
    assert sum(ranks[0]["top_k"]) == 18


class _Processes:
    """The trainer attributes that the evaluation loader reads: process count, rank and strategy."""

    def __init__(self, world_size: int, global_rank: int, strategy) -> None:
        self.world_size, self.global_rank, self.strategy = world_size, global_rank, strategy


def test_evaluation_loader_splits_without_repeats():
    from lightning.pytorch.strategies import DDPStrategy

    from lexi_pl.data.distributed import evaluation_dataloader

    seen = []
    for rank in range(4):
        loader = evaluation_dataloader(list(range(10)), _Processes(4, rank, DDPStrategy()), batch_size=2)
        seen.append([int(value) for batch in loader for value in batch])
    assert seen == [[0, 4, 8], [1, 5, 9], [2, 6], [3, 7]]


def test_evaluation_loader_rejects_fsdp():
    from lightning.pytorch.strategies import FSDPStrategy

    from lexi_pl.data.distributed import evaluation_dataloader

    with pytest.raises(ValueError, match="does not support FSDPStrategy.*--trainer.strategy=ddp"):
        evaluation_dataloader(list(range(10)), _Processes(2, 0, FSDPStrategy()), batch_size=2)


def test_evaluation_loader_rejects_more_processes_than_samples():
    from lightning.pytorch.strategies import DDPStrategy

    from lexi_pl.data.distributed import evaluation_dataloader

    with pytest.raises(ValueError, match="has 3 samples for 4 processes.*at most 3 devices"):
        evaluation_dataloader(list(range(3)), _Processes(4, 0, DDPStrategy()), batch_size=2)
