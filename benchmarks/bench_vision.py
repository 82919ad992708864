"""Native k against LExI on the shipped V-MoE MNIST checkpoint, measured side by side in one process.

Each round validates the same model on the same mnist5k validation images once per setting, in turn (native,
LExI, native, LExI, ...), so machine load affects both alike. Top-1 and NLL do not change between rounds; the
table gives the median samples/s over rounds and its ratio to native.

    python benchmarks/bench_vision.py            # full validation split, 5 rounds
    python benchmarks/bench_vision.py --quick    # 200 images, 2 rounds
    python benchmarks/bench_vision.py --write    # also replace this script's section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import tempfile
import warnings
from pathlib import Path

import lightning
import timm
import torch
from lightning.pytorch import Trainer

from lexi_pl.callbacks import LExI, MoEThroughput
from lexi_pl.data import ImageClassificationData
from lexi_pl.modules import MoEImageClassifier
from record import replace_section

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "checkpoints" / "vmoe_mnist" / "model.safetensors"


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 validation images and 2 rounds")
    parser.add_argument("--rounds", type=int, default=5, help="validation passes per setting (default 5)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.75], help="LExI budgets (default 0.75)")
    parser.add_argument("--batch-size", type=int, default=250, help="validation batch size (default 250)")
    parser.add_argument("--write", action="store_true", help="replace this script's section of BENCHMARKS.md")
    return parser.parse_args()


def validate(module, data, callbacks) -> dict[str, float]:
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


def main() -> None:
    arguments = parse_arguments()
    if arguments.quick:
        arguments.rounds = 2
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.manual_seed(0)

    module = MoEImageClassifier(model_name="vmoe_tiny_mnist", checkpoint_path=str(CHECKPOINT))
    data = ImageClassificationData(
        source="mnist5k", batch_size=arguments.batch_size, val_subset=200 if arguments.quick else None
    )
    settings = {"native k": None}
    with tempfile.TemporaryDirectory() as folder:
        for fraction in arguments.fractions:
            settings[f"LExI {fraction:.1%}"] = LExI(fraction=fraction, output_dir=folder)

        rows: dict[str, list[dict[str, float]]] = {name: [] for name in settings}
        for _ in range(arguments.rounds):
            for name, lexi in settings.items():
                callbacks = [MoEThroughput(warmup_batches=1)] + ([lexi] if lexi is not None else [])
                rows[name].append(validate(module, data, callbacks))

    native_speed = statistics.median(result["val/samples_per_sec"] for result in rows["native k"])
    lines = [
        "| setting | active experts | top-1 | NLL | samples/s (median) | speed vs native | expert GFLOPs/sample |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, results in rows.items():
        speed = statistics.median(result["val/samples_per_sec"] for result in results)
        first = results[0]
        lines.append(
            f"| {name} | {first['val/active_experts_total']:.0f} | {first['val/top1']:.4f} | {first['val/nll']:.4f} "
            f"| {speed:.0f} | {speed / native_speed:.2f}x | {first['val/expert_gflops_per_sample']:.5f} |"
        )
    plans = [
        f"- {name}: per-layer k {list(lexi.plan.top_k.values())}"
        for name, lexi in settings.items()
        if lexi is not None and lexi.plan is not None
    ]
    command = "python benchmarks/bench_vision.py" + (" --quick" if arguments.quick else "")
    images = int(rows["native k"][0]["val/samples"])
    report = "\n".join(
        [
            "## V-MoE on MNIST: native k against LExI",
            "",
            f"Command: `{command}`. Shipped checkpoint `checkpoints/vmoe_mnist`, {images} mnist5k validation images, "
            f"batch {arguments.batch_size}, {arguments.rounds} alternating rounds, CPU "
            f"({platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}, "
            f"timm {timm.__version__}, lightning {lightning.__version__}. Absolute samples/s are for this machine only;"
            " compare the ratios.",
            "",
            *lines,
            "",
            *plans,
        ]
    )
    print(report)
    if arguments.write:
        replace_section(REPO / "BENCHMARKS.md", "bench_vision", report)


if __name__ == "__main__":
    main()
