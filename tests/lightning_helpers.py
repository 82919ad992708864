"""A minimal LightningModule around a tiny transformers MoE, and a data module of fixed random tokens.

They live in an importable module so that LightningCLI configs in the tests can name them with class_path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch.utils.data import DataLoader, Dataset

from lexi_models.language.tiny import build_tiny


def current_top_k(model: torch.nn.Module) -> list[int]:
    """Read the k that each router of a tiny model holds right now."""
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
