"""Throughput and active-expert cost of evaluation stages, reported in the results that ``trainer.validate`` returns.

Lightning's `ThroughputMonitor` writes only to loggers and only after ``window_size`` batches. This callback times
the whole stage instead (after warm-up batches) with Lightning's `Throughput` accumulator and logs the figures at
epoch end, so they appear in the dict that ``trainer.validate()`` / ``trainer.test()`` return and in the table
they print.

Expert FLOPs are computed analytically: for every MoE layer, tokens routed x experts computed per token x FLOPs of
one expert on one token (2 per weight of the expert's matrices). transformers' default ``grouped_mm`` expert
backend is invisible to torch's FLOP counter, so nothing here relies on it. Routed tokens are counted with a hook
on each router, so padding tokens that the model routes are counted too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lexi_pl.adapter import MoEAdapter

log = logging.getLogger(__name__)

_PREFIX = {"validate": "val", "test": "test", "predict": "predict"}


def default_batch_counts(batch: Any) -> tuple[int, int | None]:
    """Return (samples, tokens) of a batch: tokens from an attention mask or ``input_ids``, else None.

    Handles a mapping with ``input_ids`` (and optionally ``attention_mask``), a tuple or list whose first item is a
    tensor, and a bare tensor.
    """
    if isinstance(batch, Mapping) and "input_ids" in batch:
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        tokens = int(mask.sum()) if isinstance(mask, torch.Tensor) else input_ids.numel()
        return int(input_ids.shape[0]), tokens
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return int(batch[0].shape[0]), None
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]), None
    raise ValueError(
        f"cannot count the samples of a batch of type {type(batch).__name__}; pass batch_counts_fn to "
        "MoEThroughput, returning (samples, tokens or None)"
    )


class MoEThroughput(Callback):
    """Log samples/s, tokens/s, mean active experts per token and expert FLOPs for validate, test and predict.

    Logged keys, with prefix ``val``, ``test`` or ``predict``: ``<prefix>/samples_per_sec``,
    ``<prefix>/tokens_per_sec`` (when batches carry tokens; both over the timed batches),
    ``<prefix>/samples`` and ``<prefix>/tokens`` (every batch, warm-up included),
    ``<prefix>/active_experts_per_token`` (the mean k over MoE layers), ``<prefix>/active_experts_total`` (the sum
    of k), ``<prefix>/expert_gflops_per_sample`` and, with tokens, ``<prefix>/expert_gflops_per_token``. Predict
    logs nothing (Lightning has no logging there); its figures are in ``self.results["predict"]`` and printed.

    With several processes, counts are summed over ranks and divided by the slowest rank's time.

    Args:
        warmup_batches: batches at the start of each stage left out of the timing. When a stage has no more
            batches than this, all of them are timed and a warning says so.
        batch_counts_fn: function of a batch returning (samples, tokens or None); default `default_batch_counts`.
        model_attribute: attribute of the LightningModule that holds the MoE model.
    """

    def __init__(
        self,
        warmup_batches: int = 1,
        batch_counts_fn: Callable[[Any], tuple[int, int | None]] | None = None,
        model_attribute: str = "model",
    ) -> None:
        if warmup_batches < 0:
            raise ValueError(f"warmup_batches must be >= 0, got {warmup_batches}")
        self.warmup_batches = warmup_batches
        self.batch_counts_fn = batch_counts_fn or default_batch_counts
        self.model_attribute = model_attribute
        self.results: dict[str, dict[str, float]] = {}
        self._adapter: MoEAdapter | None = None
        self._handles: list[Any] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        model = getattr(pl_module, self.model_attribute, None)
        self._adapter = MoEAdapter(model) if isinstance(model, nn.Module) else None

    # per-stage accounting

    def _start(self, trainer: Trainer) -> None:
        self._batches = 0
        self._timed = {"samples": 0, "tokens": 0, "routed": 0.0, "flops": 0.0}
        self._all = {"samples": 0, "tokens": 0, "routed": 0.0, "flops": 0.0}
        self._has_tokens = False
        self._clock_start: float | None = None
        self._clock_all_start = self._now(trainer)
        self._layer_tokens: dict[int, int] = {}
        self._remove_hooks()
        if self._adapter is not None:
            for layer in self._adapter.layers:
                self._handles.append(layer.router.register_forward_pre_hook(self._counter(layer.index)))

    def _counter(self, index: int):
        def count(module: nn.Module, args: tuple) -> None:
            hidden = args[0] if args else None
            if isinstance(hidden, torch.Tensor):
                self._layer_tokens[index] = self._layer_tokens.get(index, 0) + hidden.numel() // hidden.shape[-1]

        return count

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _now(self, trainer: Trainer) -> float:
        # CUDA work is asynchronous: wait for it, or the clock reads the time the kernels were queued.
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    def _batch_end(self, trainer: Trainer, batch: Any) -> None:
        samples, tokens = self.batch_counts_fn(batch)
        flops = 0.0
        routed = 0
        if self._adapter is not None:
            for layer in self._adapter.layers:
                layer_tokens = self._layer_tokens.get(layer.index, 0)
                flops += layer_tokens * layer.computed_experts * layer.expert_flops_per_token
                routed = max(routed, layer_tokens)
        self._layer_tokens = {}
        self._batches += 1
        for totals in ([self._all] if self._clock_start is None else [self._all, self._timed]):
            totals["samples"] += samples
            totals["tokens"] += tokens or 0
            totals["flops"] += flops
            totals["routed"] += routed
        if tokens is not None:
            self._has_tokens = True
        if self._batches == self.warmup_batches:
            self._clock_start = self._now(trainer)

    def _finish(self, trainer: Trainer, stage: str) -> dict[str, float]:
        self._remove_hooks()
        end = self._now(trainer)
        if self._clock_start is not None and self._timed["samples"] > 0:
            totals, elapsed = self._timed, end - self._clock_start
        else:
            if self._batches > 0 and self.warmup_batches > 0:
                rank_zero_warn(
                    f"MoEThroughput: the {stage} stage ran {self._batches} batches, not more than warmup_batches="
                    f"{self.warmup_batches}, so warm-up batches are included in the timing"
                )
            totals, elapsed = self._all, end - self._clock_all_start

        # Sum counts over ranks and take the slowest rank's time.
        device = trainer.strategy.root_device
        counts = torch.tensor(
            [totals["samples"], totals["tokens"], totals["flops"], self._all["samples"], self._all["tokens"]],
            dtype=torch.float64,
            device=device,
        )
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        elapsed = float(trainer.strategy.all_gather(torch.tensor(elapsed, device=device)).max())
        samples, tokens, flops, all_samples, all_tokens = (float(value) for value in counts.cpu())

        throughput = Throughput(window_size=2)
        throughput.update(time=0.0, batches=0, samples=0, lengths=0 if self._has_tokens else None)
        throughput.update(
            time=max(elapsed, 1e-12),
            batches=self._batches,
            samples=int(samples),
            lengths=int(tokens) if self._has_tokens else None,
        )
        rates = throughput.compute()
        prefix = _PREFIX[stage]
        figures = {
            f"{prefix}/samples": all_samples,
            f"{prefix}/samples_per_sec": float(rates["device/samples_per_sec"]),
        }
        if self._has_tokens:
            figures[f"{prefix}/tokens"] = all_tokens
            figures[f"{prefix}/tokens_per_sec"] = float(rates["device/items_per_sec"])
        if self._adapter is not None:
            ks = self._adapter.top_k
            figures[f"{prefix}/active_experts_total"] = float(sum(ks))
            figures[f"{prefix}/active_experts_per_token"] = sum(ks) / len(ks)
            if samples > 0:
                figures[f"{prefix}/expert_gflops_per_sample"] = flops / samples / 1e9
            if self._has_tokens and tokens > 0:
                figures[f"{prefix}/expert_gflops_per_token"] = flops / tokens / 1e9
        self.results[stage] = figures
        return figures

    # hooks

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._start(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._batch_end(trainer, batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for name, value in self._finish(trainer, "validate").items():
            pl_module.log(name, value, on_epoch=True, on_step=False, sync_dist=False)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch_end(trainer, batch)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for name, value in self._finish(trainer, "test").items():
            pl_module.log(name, value, on_epoch=True, on_step=False, sync_dist=False)

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch_end(trainer, batch)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        figures = self._finish(trainer, "predict")
        rank_zero_info("predict throughput: " + ", ".join(f"{name}={value:.4g}" for name, value in figures.items()))

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._remove_hooks()
