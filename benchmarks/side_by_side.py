"""Validate one model under several settings in turn, in one process, and tabulate quality against speed.

Each round runs every setting once (A, B, C, A, B, C, ...), so machine load affects all settings alike; the table
gives each setting's metrics from its first round and the median throughput over rounds.
"""

from __future__ import annotations

import logging
import platform
import statistics
import warnings
from collections.abc import Callable, Sequence

import lightning
import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer

from lexi_pl.callbacks import LExI, MoEThroughput


def validate(module: LightningModule, data: LightningDataModule, callbacks: list[Callback]) -> dict[str, float]:
    """Run one quiet validation pass on the CPU and return its metrics."""
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    (results,) = trainer.validate(module, datamodule=data, verbose=False)
    return results


def compare(
    module: LightningModule,
    data: LightningDataModule,
    settings: dict[str, Callable[[], list[Callback]]],
    rounds: int,
    speed_key: str,
    quality: Sequence[tuple[str, str]],
) -> tuple[list[str], dict[str, list[dict[str, float]]]]:
    """Validate under every setting for `rounds` rounds; return markdown table lines and every result.

    Args:
        settings: setting name to a function building that setting's callbacks (MoEThroughput is added).
        speed_key: logged throughput key whose median is compared to the first setting's.
        quality: (column title, logged key) pairs taken from each setting's first round.
    """
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in settings}
    callbacks = {name: make() for name, make in settings.items()}
    for _ in range(rounds):
        for name in settings:
            results[name].append(validate(module, data, [MoEThroughput(warmup_batches=1), *callbacks[name]]))

    baseline = statistics.median(result[speed_key] for result in next(iter(results.values())))
    header = ["setting", "active experts", *(title for title, _ in quality), f"{speed_key} (median)", "speed vs first"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, runs in results.items():
        speed = statistics.median(run[speed_key] for run in runs)
        cells = [name, f"{runs[0]['val/active_experts_total']:.0f}"]
        cells += [f"{runs[0][key]:.4g}" for _, key in quality]
        cells += [f"{speed:.0f}", f"{speed / baseline:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    for name, setting_callbacks in callbacks.items():
        for callback in setting_callbacks:
            if isinstance(callback, LExI) and callback.plan is not None:
                lines.append("")
                lines.append(f"- {name}: per-layer k {list(callback.plan.top_k.values())}")
    return lines, results


def machine_line() -> str:
    return (
        f"CPU ({platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}, "
        f"lightning {lightning.__version__}"
    )
