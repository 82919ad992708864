"""Lightning module for image classification with a timm Mixture-of-Experts model (V-MoE).

``MoEImageClassifier`` trains and evaluates any timm model, and adds the router auxiliary loss when
the model has an ``aux_loss()`` method like the V-MoE models in ``lexi_models.vision``. The network
is ``self.model``, where the LExI callbacks look for the MoE layers.

``export_timm_weights`` turns a Lightning checkpoint into a plain timm ``model.safetensors`` plus a
``config.json`` that records how it was made and its validation metrics. From the command line::

    python -m lexi_pl.modules.image export CKPT OUT_DIR --seed 0 --command "..." --train-wall-time-s 300
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning
import timm
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch import LightningModule
from timm.data import resolve_model_data_config
from torch import nn

import lexi_models.vision  # noqa: F401  (registers the V-MoE architectures with timm)

EXPORTED_WEIGHTS_NAME = "model.safetensors"
EXPORTED_CONFIG_NAME = "config.json"


def _make_eval_metrics(num_classes: int) -> nn.ModuleDict:
    """Build the evaluation metrics: micro top-1, micro top-5 (when there are at least 5 classes) and mean NLL.

    "nll" is a ``MeanMetric`` fed one value per sample, so its epoch value is the NLL summed over all
    samples divided by their count, whatever the batch sizes.
    """
    metrics = {
        "top1": torchmetrics.Accuracy(task="multiclass", num_classes=num_classes, top_k=1, average="micro"),
        "nll": torchmetrics.MeanMetric(),
    }
    if num_classes >= 5:
        metrics["top5"] = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes, top_k=5, average="micro")
    return nn.ModuleDict(metrics)


def _no_weight_decay_names(model: nn.Module) -> set[str]:
    """Return the parameter names to exclude from weight decay: 1-d tensors, biases and the model's own list."""
    listed = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    names = set()
    for name, parameter in model.named_parameters():
        # V-MoE stores expert biases as 2-d tensors named "...fc1_bias", so match the suffix, not ".bias".
        if parameter.ndim <= 1 or name.endswith("bias") or name in listed:
            names.add(name)
    return names


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, cosine: bool = True) -> float:
    """Return the learning-rate multiplier for optimizer step ``step`` (0-based).

    It rises linearly to 1 over ``warmup_steps`` (reaching 1 at step ``warmup_steps - 1``), then
    follows a half cosine from 1 at step ``warmup_steps`` to 0 at step ``total_steps``, or stays at
    1 when ``cosine`` is False.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not cosine:
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class MoEImageClassifier(LightningModule):
    """Image classifier around a timm model, trained with cross-entropy plus the model's router auxiliary loss.

    Batches are ``(images, labels)`` tuples. Validation and test log ``{stage}/top1``, ``{stage}/top5``
    (micro accuracies) and ``{stage}/nll`` (mean negative log-likelihood per sample) per epoch.
    """

    def __init__(
        self,
        model_name: str = "vmoe_tiny_mnist",
        checkpoint_path: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        num_classes: int | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_epochs: float = 0.0,
        scheduler: Literal["cosine", "constant"] = "cosine",
        label_smoothing: float = 0.0,
    ) -> None:
        """
        Args:
            model_name: timm architecture name, for example "vmoe_tiny_mnist".
            checkpoint_path: Local ``.safetensors`` or ``.pth`` state dict of the timm model, loaded
                strictly by ``timm.create_model(..., checkpoint_path=...)``. None keeps random weights.
            model_kwargs: Extra ``timm.create_model`` arguments, for example ``{"top_k": 1}``.
            num_classes: Output classes. None keeps the architecture's default.
            lr: Peak AdamW learning rate.
            weight_decay: AdamW weight decay, not applied to biases, norms, tokens and position embeddings.
            warmup_epochs: Epochs (may be fractional) of linear learning-rate warmup from 0, counted in steps.
            scheduler: "cosine" decays the rate to 0 over the training steps after warmup, and
                "constant" keeps it at ``lr``.
            label_smoothing: Label smoothing of the training cross-entropy (evaluation NLL uses none).
        """
        super().__init__()
        self.save_hyperparameters()

        create_kwargs = dict(model_kwargs or {})
        if num_classes is not None:
            create_kwargs["num_classes"] = num_classes
        if checkpoint_path is not None and not Path(checkpoint_path).is_file():
            raise FileNotFoundError(
                f"checkpoint_path={checkpoint_path!r} not found (relative paths are resolved from the current "
                f"directory {Path.cwd()})"
            )
        self.model = timm.create_model(model_name, checkpoint_path=checkpoint_path, **create_kwargs)
        self.num_classes = self.model.num_classes

        self.train_top1 = torchmetrics.Accuracy(task="multiclass", num_classes=self.num_classes, average="micro")
        self.val_metrics = _make_eval_metrics(self.num_classes)
        self.test_metrics = _make_eval_metrics(self.num_classes)

    @property
    def data_config(self) -> dict[str, Any]:
        """timm data config of the model (input_size, interpolation, mean, std, crop_pct, crop_mode)."""
        return resolve_model_data_config(self.model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def _aux_loss(self) -> torch.Tensor:
        aux_loss = getattr(self.model, "aux_loss", None)
        if aux_loss is None:
            return torch.zeros((), device=self.device)
        return aux_loss()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self.model(images)
        classification_loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        aux_loss = self._aux_loss()
        loss = classification_loss + aux_loss

        self.train_top1(logits, labels)
        batch_size = labels.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/aux_loss", aux_loss, batch_size=batch_size)
        self.log("train/acc", self.train_top1, on_step=True, on_epoch=True, batch_size=batch_size)
        return loss

    def update_metrics(self, metrics: nn.ModuleDict, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch of ``logits`` (N, C) and integer ``labels`` (N,) to the evaluation ``metrics``."""
        for name, metric in metrics.items():
            if name == "nll":
                metric.update(F.cross_entropy(logits.float(), labels, reduction="none"))
            else:
                metric.update(logits, labels)

    def _evaluation_step(self, stage: str, metrics: nn.ModuleDict, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        images, labels = batch
        logits = self.model(images)
        self.update_metrics(metrics, logits, labels)
        for name, metric in metrics.items():
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, batch_size=labels.shape[0])

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluation_step("val", self.val_metrics, batch)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluation_step("test", self.test_metrics, batch)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Return the logits of the batch's images."""
        images, _ = batch
        return self.model(images)

    def configure_optimizers(self) -> dict[str, Any]:
        no_decay = _no_weight_decay_names(self.model)
        decay_params = [p for n, p in self.model.named_parameters() if p.requires_grad and n not in no_decay]
        other_params = [p for n, p in self.model.named_parameters() if p.requires_grad and n in no_decay]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay_params, "weight_decay": self.hparams.weight_decay},
                {"params": other_params, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
        )

        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        max_epochs = self.trainer.max_epochs
        warmup_steps = 0
        if self.hparams.warmup_epochs > 0 and max_epochs is not None and max_epochs > 0:
            warmup_steps = min(total_steps, round(total_steps * self.hparams.warmup_epochs / max_epochs))
        lr_factor = partial(
            warmup_cosine_factor,
            warmup_steps=warmup_steps,
            total_steps=total_steps,
            cosine=self.hparams.scheduler == "cosine",
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# Export


def _json_ready(value: Any) -> Any:
    """Convert tuples and tensors in ``value`` to JSON lists and numbers."""
    if isinstance(value, Mapping):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


def _constructor_arguments(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the keys that LightningCLI adds to saved hyperparameters ("_instantiator", "_class_path")."""
    return {key: value for key, value in hparams.items() if not key.startswith("_")}


def _validate_exported(
    weights_path: Path, hparams: Mapping[str, Any], data_hparams: Mapping[str, Any]
) -> dict[str, float]:
    """Load the exported weights into a fresh module and run one validation epoch on the full validation split."""
    from lexi_pl.data.images import ImageClassificationData

    module = MoEImageClassifier(**{**hparams, "checkpoint_path": str(weights_path)})
    data_kwargs = _constructor_arguments(data_hparams)
    data = ImageClassificationData(**{**data_kwargs, "val_subset": None, "train_augment": False})
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    (results,) = trainer.validate(module, datamodule=data, verbose=False)
    results = {key: float(value) for key, value in results.items()}
    results["num_samples"] = len(data.val_dataset)
    return results


def export_timm_weights(
    ckpt_path: str | Path,
    out_dir: str | Path,
    *,
    evaluate: bool = True,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the timm model of a ``MoEImageClassifier`` Lightning checkpoint as ``model.safetensors`` plus ``config.json``.

    The safetensors file is the state dict of ``module.model`` only (keys without the "model."
    prefix), so ``timm.create_model(name, checkpoint_path=...)`` loads it. ``config.json`` records the
    model name, kwargs, class count, timm data config, the data module's arguments (when the
    checkpoint has them), epoch and step, library versions and ``metadata`` (for example the
    training command, seed and wall time). With ``evaluate``, the exported file is loaded back and
    validated on the full validation split of the checkpoint's data module, and the metrics go into
    ``config.json`` under "validation".

    Returns:
        The dict written to ``config.json``.

    Raises:
        FileNotFoundError: ``ckpt_path`` does not exist.
        ValueError: ``evaluate`` is set but the checkpoint has no data module arguments.
    """
    from safetensors.torch import save_file

    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"Lightning checkpoint not found: {ckpt_path}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # A Lightning checkpoint of this module contains only tensors, numbers, strings and containers of them,
    # so it loads with weights_only=True.
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hparams = _constructor_arguments(checkpoint["hyper_parameters"])
    data_hparams = checkpoint.get("datamodule_hyper_parameters")
    if data_hparams is not None:
        data_hparams = _constructor_arguments(data_hparams)

    module = MoEImageClassifier(**{**hparams, "checkpoint_path": None})
    module.load_state_dict(checkpoint["state_dict"])
    state_dict = {name: tensor.detach().contiguous() for name, tensor in module.model.state_dict().items()}
    weights_path = out_dir / EXPORTED_WEIGHTS_NAME
    save_file(state_dict, str(weights_path), metadata={"format": "pt"})

    config: dict[str, Any] = {
        "model_name": hparams["model_name"],
        "model_kwargs": hparams.get("model_kwargs") or {},
        "num_classes": module.num_classes,
        "data_config": module.data_config,
        "data": data_hparams,
        "training": {
            "source_checkpoint": ckpt_path.name,
            "epoch": checkpoint.get("epoch"),
            "global_step": checkpoint.get("global_step"),
            "hyper_parameters": hparams,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "lightning": lightning.__version__,
        },
        "num_parameters": sum(tensor.numel() for tensor in state_dict.values()),
    }
    if metadata:
        config["training"].update(metadata)
    if evaluate:
        if data_hparams is None:
            raise ValueError(
                f"{ckpt_path} has no datamodule_hyper_parameters, so the validation data is unknown; "
                "pass evaluate=False (or --no-evaluate)"
            )
        started = time.perf_counter()
        config["validation"] = _validate_exported(weights_path, hparams, data_hparams)
        config["validation"]["wall_time_s"] = round(time.perf_counter() - started, 2)

    config = _json_ready(config)
    (out_dir / EXPORTED_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return config


def main(argv: list[str] | None = None) -> None:
    """Run ``python -m lexi_pl.modules.image export CKPT OUT_DIR [options]``."""
    parser = argparse.ArgumentParser(prog="python -m lexi_pl.modules.image")
    subcommands = parser.add_subparsers(dest="subcommand", required=True)
    export = subcommands.add_parser("export", help="export a Lightning checkpoint's timm weights as safetensors")
    export.add_argument("ckpt", help="Lightning checkpoint (.ckpt) of a MoEImageClassifier")
    export.add_argument("out_dir", help="folder for model.safetensors and config.json")
    export.add_argument("--command", help="training command to record in config.json")
    export.add_argument("--seed", type=int, help="seed_everything value of the training run")
    export.add_argument("--train-wall-time-s", type=float, help="training wall time in seconds")
    export.add_argument("--hardware", help="hardware of the training run, for example '2 CPU cores'")
    export.add_argument("--no-evaluate", action="store_true", help="skip validating the exported weights")
    args = parser.parse_args(argv)

    metadata = {
        key: value
        for key, value in (
            ("command", args.command),
            ("seed", args.seed),
            ("wall_time_s", args.train_wall_time_s),
            ("hardware", args.hardware),
        )
        if value is not None
    }
    config = export_timm_weights(args.ckpt, args.out_dir, evaluate=not args.no_evaluate, metadata=metadata)
    print(json.dumps(config.get("validation", {}), indent=2))


if __name__ == "__main__":
    main()
