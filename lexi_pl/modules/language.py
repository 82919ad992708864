"""Lightning module for training and evaluating transformers Mixture-of-Experts causal language models.

``MoECausalLM`` loads a model folder or Hub id (``model_name_or_path``) or builds a randomly initialised model
from a transformers config (``model_config``, for training from scratch). The network is ``self.model``, where
the LExI callbacks find the MoE layers. Validation and test report corpus-level perplexity: the NLL summed over
every scored token of the epoch divided by the number of those tokens, then exponentiated.

``export_pretrained`` turns a Lightning checkpoint into a transformers folder (``save_pretrained``) with the
tokenizer and a ``training.json`` record of how the model was trained and how well it does. From the command
line::

    python -m lexi_pl.modules.language export CKPT OUT_DIR --seed 0 --command "..." --train-wall-time-s 900
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
import torch
import torch.nn.functional as F
import torchmetrics
import transformers
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from lexi_models.language.loading import DType, check_dtype, check_supported_family, load_model
from lexi_pl.adapter import MoEAdapter
from lexi_pl.modules.image import warmup_cosine_factor

IGNORE_INDEX = -100
TRAINING_RECORD_NAME = "training.json"

# Logit elements upcast to float32 at a time when scoring (2**26 elements = 256 MiB), so a 150k-token vocabulary
# never needs a float32 copy of the logits of a whole batch.
_SCORE_CHUNK_ELEMENTS = 2**26


def next_token_targets(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Return the targets of next-token prediction, shape (B, T - 1): token t + 1 is the target at position t.

    The targets are ``batch["labels"]`` when present, else ``input_ids``, shifted left once. A target is set to
    -100 (ignored) where the attention mask of the target token is 0, so padding is excluded by the mask and
    never by token id (id 0 may be a real token).
    """
    input_ids = batch["input_ids"]
    targets = batch.get("labels", input_ids)[:, 1:].clone()
    attention_mask = batch.get("attention_mask")
    if attention_mask is not None:
        targets[attention_mask[:, 1:] == 0] = IGNORE_INDEX
    return targets


def score_next_tokens(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score next-token predictions of the positions whose target is not -100.

    Args:
        logits: (B, T - 1, V) logits of positions 0 to T - 2 (the last position has no target).
        targets: (B, T - 1) target ids, -100 where not scored.

    Returns:
        (summed NLL in float32, number of correct argmax predictions, number of scored targets). The NLL is
        differentiable. Logits are upcast to float32 a chunk of positions at a time.
    """
    vocab_size = logits.shape[-1]
    scored = targets != IGNORE_INDEX
    flat_logits = logits[scored]
    flat_targets = targets[scored]
    count = flat_targets.numel()
    nll = logits.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=logits.device)
    rows = max(1, _SCORE_CHUNK_ELEMENTS // vocab_size)
    for start in range(0, count, rows):
        chunk = flat_logits[start : start + rows].float()
        chunk_targets = flat_targets[start : start + rows]
        nll = nll + F.cross_entropy(chunk, chunk_targets, reduction="sum")
        correct = correct + (chunk.argmax(dim=-1) == chunk_targets).sum()
    return nll, correct, torch.tensor(count, device=logits.device)


def _make_eval_metrics() -> nn.ModuleDict:
    """Build float64 sums of NLL, correct predictions and scored tokens, accumulated over an epoch."""
    metrics = nn.ModuleDict({
        "nll_sum": torchmetrics.SumMetric(),
        "correct": torchmetrics.SumMetric(),
        "tokens": torchmetrics.SumMetric(),
    })
    for metric in metrics.values():
        metric.set_dtype(torch.float64)
    return metrics


def build_from_config(
    model_config: Mapping[str, Any], dtype: DType = "auto", experts_implementation: str | None = None
) -> PreTrainedModel:
    """Build a randomly initialised causal LM from ``AutoConfig.for_model(**model_config)``.

    ``model_config`` must contain "model_type" (for example "olmoe"); the other keys override the family's
    default config. Weights come from the model's own initialisation, drawn from torch's global RNG, so
    ``seed_everything`` before the call makes them reproducible.
    """
    fields = dict(model_config)
    if "model_type" not in fields:
        raise ValueError(f"model_config needs a 'model_type' (for example 'olmoe'); got keys {sorted(fields)}")
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    check_supported_family(config, f"model_config of type {config.model_type!r}")
    options: dict[str, Any] = {}
    torch_dtype = check_dtype(dtype)
    if torch_dtype != "auto":
        options["dtype"] = torch_dtype
    if experts_implementation is not None:
        options["experts_implementation"] = experts_implementation
    return AutoModelForCausalLM.from_config(config, **options)


class MoECausalLM(LightningModule):
    """Causal language model around a transformers MoE model, with corpus-level perplexity.

    Batches are dicts with ``input_ids`` and ``attention_mask`` of shape (B, T), and optionally ``labels``
    (see ``lexi_pl.data.TextData``). A block of T tokens scores T - 1 targets (logits at positions 0 to T - 2
    against tokens 1 to T - 1), minus targets whose attention mask is 0 or whose label is -100.

    Validation and test log, per epoch, ``{stage}/ppl`` (exp of the summed NLL over all scored tokens divided by
    their count, not a mean of batch perplexities), ``{stage}/nll`` (NLL per token), ``{stage}/acc`` (argmax
    next-token accuracy) and ``{stage}/scored_tokens`` (the perplexity's denominator). The name differs from the
    ``{stage}/tokens`` of ``lexi_pl.callbacks.MoEThroughput`` (input tokens, padding excluded), because Lightning
    would average two values logged under one name. The router auxiliary loss never enters these metrics.

    Training minimises the mean NLL per scored token plus the router load-balancing loss that transformers
    computes with ``output_router_logits=True``, weighted by ``config.router_aux_loss_coef``. The auxiliary term is
    left out when ``router_aux_loss`` is False, or when the model returns none or its config has no coefficient.
    The model is never given ``labels=``, because transformers would then shift the labels a second time and add
    the auxiliary loss to evaluation losses as well.

    Where the model comes from:

    - ``model_name_or_path``: a folder written by ``save_pretrained`` or a Hub id, loaded with its weights
      (evaluation, or fine-tuning with ``fit``);
    - ``model_config``: a transformers config as a dict with "model_type", built with random weights (training
      from scratch with ``fit``; seed with ``seed_everything``).

    Exactly one of the two must be given. Lightning checkpoints of either kind restore the weights.

    Args:
        model_name_or_path: model folder or Hub id.
        model_config: config fields for a model built from scratch, for example
            ``{"model_type": "olmoe", "hidden_size": 128, ...}``.
        dtype: parameter dtype: "auto" (the checkpoint's dtype; float32 for ``model_config``), "float32",
            "bfloat16" or "float16".
        experts_implementation: transformers expert kernel ("eager", "grouped_mm", "batched_mm"); None keeps
            transformers' default.
        trust_remote_code: allow code from the checkpoint's repository to run.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay of matrices; vectors (norms, biases) get none.
        betas: AdamW betas.
        warmup_steps: optimizer steps of linear warmup from 0 to ``lr``.
        scheduler: "cosine" decays the rate to 0 at the last training step; "constant" keeps ``lr``.
        router_aux_loss: add the router load-balancing loss to the training loss.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        model_config: dict[str, Any] | None = None,
        dtype: DType = "auto",
        experts_implementation: str | None = None,
        trust_remote_code: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        scheduler: Literal["cosine", "constant"] = "cosine",
        router_aux_loss: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if (model_name_or_path is None) == (model_config is None):
            raise ValueError(
                "MoECausalLM needs exactly one of model_name_or_path (load a model folder or Hub id) and "
                "model_config (build a new model with random weights); got "
                f"{'both' if model_config is not None else 'neither'}"
            )
        if model_name_or_path is not None:
            self.model = load_model(
                model_name_or_path,
                dtype=dtype,
                experts_implementation=experts_implementation,
                trust_remote_code=trust_remote_code,
            )
            description = repr(model_name_or_path)
        else:
            self.model = build_from_config(model_config, dtype=dtype, experts_implementation=experts_implementation)
            description = f"the model built from model_config ({model_config.get('model_type')!r})"
        try:
            MoEAdapter(self.model)
        except ValueError as error:
            raise ValueError(f"{description} cannot be used with lexi-pl: {error}") from error

        self.val_metrics = _make_eval_metrics()
        self.test_metrics = _make_eval_metrics()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)

    def _router_logits_option(self, enabled: bool) -> dict[str, bool]:
        # Only families whose config has output_router_logits accept the keyword.
        if hasattr(self.model.config, "output_router_logits"):
            return {"output_router_logits": enabled}
        return {}

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        with_aux = self.hparams.router_aux_loss
        outputs = self(batch["input_ids"], batch.get("attention_mask"), **self._router_logits_option(with_aux))
        targets = next_token_targets(batch)
        nll_sum, _, count = score_next_tokens(outputs.logits[:, :-1], targets)
        nll = nll_sum / count.clamp(min=1)
        loss = nll
        aux_loss = getattr(outputs, "aux_loss", None) if with_aux else None
        batch_size = batch["input_ids"].shape[0]
        # Families without router_aux_loss_coef (dbrx keeps its weight elsewhere) train on the NLL alone.
        coefficient = getattr(self.model.config, "router_aux_loss_coef", None)
        if aux_loss is not None and coefficient is not None:
            loss = nll + coefficient * aux_loss.to(nll.dtype)
            self.log("train/aux_loss", aux_loss, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/nll", nll, batch_size=batch_size)
        return loss

    def update_metrics(self, metrics: nn.ModuleDict, batch: Mapping[str, torch.Tensor]) -> None:
        """Run the model on ``batch`` and add its summed NLL, correct predictions and scored targets to ``metrics``."""
        outputs = self(batch["input_ids"], batch.get("attention_mask"), **self._router_logits_option(False))
        nll_sum, correct, count = score_next_tokens(outputs.logits[:, :-1], next_token_targets(batch))
        metrics["nll_sum"].update(nll_sum.detach().double())
        metrics["correct"].update(correct.double())
        metrics["tokens"].update(count.double())

    def compute_metrics(self, metrics: nn.ModuleDict) -> dict[str, float]:
        """Return ppl, nll (per token), acc and scored_tokens of the epoch so far; empty when nothing was scored."""
        tokens = float(metrics["tokens"].compute())
        if tokens == 0:
            return {}
        nll = float(metrics["nll_sum"].compute()) / tokens
        return {
            "ppl": math.exp(nll),
            "nll": nll,
            "acc": float(metrics["correct"].compute()) / tokens,
            "scored_tokens": tokens,
        }

    def _log_epoch(self, stage: str, metrics: nn.ModuleDict) -> None:
        values = self.compute_metrics(metrics)
        for metric in metrics.values():
            metric.reset()
        if not values:
            rank_zero_warn(f"{stage}: no token was scored (every target is padding or -100), so no perplexity")
            return
        for name, value in values.items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "ppl")

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self.update_metrics(self.val_metrics, batch)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val", self.val_metrics)

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self.update_metrics(self.test_metrics, batch)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self.test_metrics)

    def predict_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Return the summed NLL ("nll_sum") and scored targets ("tokens") of each sequence in the batch."""
        outputs = self(batch["input_ids"], batch.get("attention_mask"), **self._router_logits_option(False))
        targets = next_token_targets(batch)
        logits = outputs.logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
        return {"nll_sum": nll.sum(dim=1), "tokens": (targets != IGNORE_INDEX).sum(dim=1)}

    def configure_optimizers(self) -> dict[str, Any]:
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
        )
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        lr_factor = partial(
            warmup_cosine_factor,
            warmup_steps=min(self.hparams.warmup_steps, total_steps),
            total_steps=total_steps,
            cosine=self.hparams.scheduler == "cosine",
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# Export


def _constructor_arguments(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the keys that LightningCLI adds to saved hyperparameters ("_instantiator", "_class_path")."""
    return {key: value for key, value in hparams.items() if not key.startswith("_")}


def _evaluate(module: MoECausalLM, blocks: Any, batch_size: int) -> dict[str, float]:
    """Return ppl, nll, acc and scored_tokens of ``module`` over all ``blocks`` (a TokenBlocks dataset)."""
    from torch.utils.data import DataLoader

    metrics = _make_eval_metrics()
    module.eval()
    with torch.inference_mode():
        for batch in DataLoader(blocks, batch_size=batch_size):
            module.update_metrics(metrics, batch)
    return module.compute_metrics(metrics)


def evaluate_exported(
    out_dir: Path, data_hparams: Mapping[str, Any], batch_size: int = 16, train_every: int = 1
) -> dict[str, Any]:
    """Measure an exported model folder on its training data module's splits.

    Returns held-out metrics at the native k, and with every MoE layer at the same lower k under
    "validation_uniform_k<k>" for each k from 1 to the smallest native k minus 1. It adds training metrics at
    the native k on every ``train_every``-th training block (1: all of them), and the held-out perplexity of an
    add-one smoothed unigram model of all training tokens.
    """
    from lexi_pl.data.text import TextData, TokenBlocks, unigram_perplexity

    module = MoECausalLM(model_name_or_path=str(out_dir))
    data = TextData(**{**_constructor_arguments(data_hparams), "tokenizer_path": str(out_dir), "val_subset": None})
    data.setup("fit")
    adapter = MoEAdapter(module.model)
    results: dict[str, Any] = {"native_top_k": adapter.native_top_k}

    started = time.perf_counter()
    results["validation"] = _evaluate(module, data.blocks["validation"], batch_size)
    results["validation"]["wall_time_s"] = round(time.perf_counter() - started, 2)
    train = data.blocks["train"]
    train_sample = TokenBlocks(train.input_ids[::train_every], train.attention_mask[::train_every])
    results["train"] = _evaluate(module, train_sample, batch_size)
    results["train"]["blocks"] = len(train_sample)
    results["train"]["total_blocks"] = len(train)
    for k in range(1, min(adapter.native_top_k)):
        with adapter.override([k] * len(adapter.layers)):
            results[f"validation_uniform_k{k}"] = _evaluate(module, data.blocks["validation"], batch_size)
    results["validation_unigram_ppl"] = unigram_perplexity(
        data.token_streams["train"], data.blocks["validation"], module.model.config.vocab_size
    )
    return results


def export_pretrained(
    ckpt_path: str | Path,
    out_dir: str | Path,
    *,
    evaluate: bool = True,
    train_every: int = 1,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the model of a ``MoECausalLM`` Lightning checkpoint as a transformers folder, with its tokenizer.

    The folder gets ``model.safetensors`` and ``config.json`` (``save_pretrained``), the tokenizer files of the
    checkpoint's data module, and ``training.json`` with the source checkpoint, epoch and step, hyperparameters,
    library versions, ``metadata`` (command, seed, wall time) and, with ``evaluate``, the metrics of
    ``evaluate_exported``.

    Returns:
        The dict written to ``training.json``.

    Raises:
        FileNotFoundError: ``ckpt_path`` does not exist.
        ValueError: the checkpoint has no data module arguments (needed for the tokenizer).
    """
    from lexi_models.language.loading import load_tokenizer

    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"Lightning checkpoint not found: {ckpt_path}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hparams = _constructor_arguments(checkpoint["hyper_parameters"])
    data_hparams = checkpoint.get("datamodule_hyper_parameters")
    if data_hparams is None or not data_hparams.get("tokenizer_path"):
        raise ValueError(
            f"{ckpt_path} records no data module with a tokenizer_path, so the tokenizer to export is unknown"
        )
    data_hparams = _constructor_arguments(data_hparams)

    module = MoECausalLM(**hparams)
    module.load_state_dict(checkpoint["state_dict"])
    module.model.save_pretrained(str(out_dir))
    load_tokenizer(data_hparams["tokenizer_path"]).save_pretrained(str(out_dir))

    record: dict[str, Any] = {
        "source_checkpoint": ckpt_path.name,
        "epoch": checkpoint.get("epoch"),
        "global_step": checkpoint.get("global_step"),
        "hyper_parameters": hparams,
        "data": data_hparams,
        "num_parameters": sum(parameter.numel() for parameter in module.model.parameters()),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "lightning": lightning.__version__,
        },
    }
    record.update(metadata or {})
    if evaluate:
        started = time.perf_counter()
        record["evaluation"] = evaluate_exported(out_dir, data_hparams, train_every=train_every)
        record["evaluation"]["wall_time_s"] = round(time.perf_counter() - started, 2)
    (out_dir / TRAINING_RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    """Run ``python -m lexi_pl.modules.language export CKPT OUT_DIR [options]``."""
    parser = argparse.ArgumentParser(prog="python -m lexi_pl.modules.language")
    subcommands = parser.add_subparsers(dest="subcommand", required=True)
    export = subcommands.add_parser("export", help="export a Lightning checkpoint as a transformers model folder")
    export.add_argument("ckpt", help="Lightning checkpoint (.ckpt) of a MoECausalLM")
    export.add_argument("out_dir", help="folder for the model, its tokenizer and training.json")
    export.add_argument("--command", help="training command to record in training.json")
    export.add_argument("--seed", type=int, help="seed_everything value of the training run")
    export.add_argument("--train-wall-time-s", type=float, help="training wall time in seconds")
    export.add_argument("--hardware", help="hardware of the training run, for example '2 CPU cores'")
    export.add_argument("--no-evaluate", action="store_true", help="skip measuring the exported model")
    export.add_argument(
        "--train-every", type=int, default=1, help="measure training perplexity on every N-th training block"
    )
    args = parser.parse_args(argv)

    metadata = {
        key: value
        for key, value in (
            ("command", args.command),
            ("seed", args.seed),
            ("train_wall_time_s", args.train_wall_time_s),
            ("hardware", args.hardware),
        )
        if value is not None
    }
    record = export_pretrained(
        args.ckpt, args.out_dir, evaluate=not args.no_evaluate, train_every=args.train_every, metadata=metadata
    )
    print(json.dumps(record.get("evaluation", {}), indent=2))


if __name__ == "__main__":
    main()
