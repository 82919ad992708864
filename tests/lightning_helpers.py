"""A minimal LightningModule around a tiny transformers MoE, and a data module of fixed random tokens.

They live in an importable module so that LightningCLI configs in the tests can name them with class_path.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from torch.utils.data import DataLoader, Dataset

from lexi_models.language.tiny import build_tiny
from lexi_pl.adapter import MoEAdapter


def current_top_k(model: torch.nn.Module) -> list[int]:
    """Return the current k of each router of a tiny model."""
    return [int(module.top_k) for name, module in model.named_modules() if name.endswith("mlp.gate")]


class TinyMoELM(LightningModule):
    """A tiny Mixtral-style LM; every step records the k its routers hold, to check what the callback applied."""

    def __init__(self, model_type: str = "mixtral", fail_at_validation_step: int | None = None, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.model = build_tiny(model_type, seed=seed, num_hidden_layers=3, num_experts_per_tok=4).train()
        self.fail_at_validation_step = fail_at_validation_step
        self.seen_k: dict[str, list[list[int]]] = {"train": [], "val": [], "test": [], "predict": []}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self(batch["input_ids"])
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())

    def training_step(self, batch, batch_idx):
        self.seen_k["train"].append(current_top_k(self.model))
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.seen_k["val"].append(current_top_k(self.model))
        if self.fail_at_validation_step == batch_idx:
            raise RuntimeError("validation step failed on purpose")
        self.log("val/loss", self._loss(batch), batch_size=batch["input_ids"].shape[0])

    def test_step(self, batch, batch_idx):
        self.seen_k["test"].append(current_top_k(self.model))
        self.log("test/loss", self._loss(batch), batch_size=batch["input_ids"].shape[0])

    def predict_step(self, batch, batch_idx):
        self.seen_k["predict"].append(current_top_k(self.model))
        return self(batch["input_ids"]).argmax(-1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _Tokens(Dataset):
    def __init__(self, count: int, length: int) -> None:
        self.tokens = torch.randint(0, 128, (count, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "attention_mask": torch.ones_like(self.tokens[index])}


class RandomTokens(LightningDataModule):
    def __init__(self, count: int = 10, length: int = 8, batch_size: int = 4) -> None:
        super().__init__()
        self.count, self.length, self.batch_size = count, length, batch_size

    def _loader(self) -> DataLoader:
        return DataLoader(_Tokens(self.count, self.length), batch_size=self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()


class RecordTopK(Callback):
    """Write, per process, the k of every MoE layer during the first validation batch, and the samples seen."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.samples = 0
        self.top_k: list[int] = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0:
            self.top_k = MoEAdapter(pl_module.model).top_k

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.samples += int(batch[0].shape[0]) if isinstance(batch, (tuple, list)) else int(batch["input_ids"].shape[0])

    def on_validation_end(self, trainer, pl_module) -> None:
        record = {"rank": trainer.global_rank, "top_k": self.top_k, "samples": self.samples}
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class _Indexed(Dataset):
    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor(index), "label": torch.tensor(index % 3)}


class IndexedSamples(LightningDataModule):
    """Samples that carry their own index, served by the exact evaluation loader of lexi_pl.data."""

    def __init__(self, count: int = 10, batch_size: int = 2) -> None:
        super().__init__()
        self.count, self.batch_size = count, batch_size

    def val_dataloader(self) -> DataLoader:
        from lexi_pl.data.distributed import evaluation_dataloader

        return evaluation_dataloader(_Indexed(self.count), self.trainer, batch_size=self.batch_size)


class FirstTwoCorrect(LightningModule):
    """Classify samples 0 and 1 correctly and every other sample wrongly, with the image module's metrics."""

    def __init__(self) -> None:
        super().__init__()
        from lexi_pl.modules.image import _make_eval_metrics

        self.metrics = _make_eval_metrics(3)
        self.index_squared = torchmetrics.MeanMetric()
        self.constant = torchmetrics.MeanMetric()

    def validation_step(self, batch, batch_idx):
        index, label = batch["index"], batch["label"]
        predicted = torch.where(index < 2, label, (label + 1) % 3)
        logits = F.one_hot(predicted, 3).float() * 5.0
        self.metrics["top1"].update(logits, label)
        self.index_squared.update(index.float() ** 2)
        self.log("val/top1", self.metrics["top1"], on_epoch=True)
        self.log("val/index_squared_mean", self.index_squared, on_epoch=True)
        # A plain `self.log(name, 1.0, sync_dist=True)` came out as 1.25 here with Lightning 2.6.6 (3, 3, 2 and 2
        # samples per process), so epoch means are logged through torchmetrics, which sums values and counts.
        self.constant.update(torch.ones(len(index)))
        self.log("val/constant", self.constant, on_epoch=True)
