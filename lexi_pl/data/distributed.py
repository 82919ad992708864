"""Evaluation data loaders that score every sample exactly once across processes.

Lightning's default distributed sampler pads the evaluation set by repeating samples until every process has the
same number, which skews accuracy and perplexity. These loaders give each process a disjoint share instead (sample
i goes to process i mod world size), so processes may run one batch more or less than each other. That is safe for
strategies that do not wrap the model in evaluation (DDP does not); strategies that wrap it in every stage (FSDP,
DeepSpeed, model parallel) run collective operations on every batch, would wait forever for the process with
fewer batches, and are rejected.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset

# Strategy classes that wrap the model in every stage, by class name (so none of them has to be importable).
_WRAPPING_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def evaluation_dataloader(dataset: Dataset, trainer: Trainer | None, **loader_options: Any) -> DataLoader:
    """Build an evaluation loader over `dataset` that, with several processes, gives each its own samples.

    Raises:
        ValueError: with several processes, the strategy wraps the model in every stage, or the dataset has fewer
            samples than there are processes.
    """
    world_size = trainer.world_size if trainer is not None else 1
    if world_size <= 1:
        return DataLoader(dataset, shuffle=False, **loader_options)

    strategy = type(trainer.strategy).__name__
    if strategy in _WRAPPING_STRATEGIES:
        raise ValueError(
            f"exact multi-process evaluation does not support {strategy}: it wraps the model in every stage, so "
            "processes with different batch counts would wait for each other forever. Evaluate with "
            "--trainer.strategy=ddp (or on one device)"
        )
    if len(dataset) < world_size:
        raise ValueError(
            f"the evaluation set has {len(dataset)} samples for {world_size} processes; every process needs at "
            f"least one sample, so use at most {len(dataset)} devices"
        )
    sampler = UnrepeatedDistributedSampler(
        dataset, num_replicas=world_size, rank=trainer.global_rank, shuffle=False
    )
    return DataLoader(dataset, sampler=sampler, **loader_options)
