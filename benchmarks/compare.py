"""LExI against uniform k, random per-layer k and expert pruning on the shipped models, side by side in one process.

    python benchmarks/compare.py --write            # both models, 5 budgets, 3 rounds, BENCHMARKS.md and plots
    python benchmarks/compare.py --model language   # one model, report printed only
    python benchmarks/compare.py --quick            # 75 % budget, tiny subsets, 1 round (the CI smoke run)

Budgets are fractions of the native total of active experts (100, 87.5, 75, 62.5 and 50 %). At each budget the
script evaluates these per-layer k allocations:

- LExI with exact dynamic programming, on profiles from Gaussian and from norm-scaled inputs;
- LExI with the evolutionary search;
- LExI-DP with renormalised routing weights;
- uniform k, where the budget allows one k in every layer;
- random per-layer k (mean and spread over seeds).

Expert pruning keeps k and removes 12.5, 25 or 50 % of each layer's experts, chosen by router row norm (data-free)
or by selection frequency on a slice of the training split (uses data). All settings alternate within each round
(see benchmarks/side_by_side.py), so machine load affects them alike. The toolkit's validation loop is also timed
against a bare torch loop on the same model and data.

Torch runs one thread by default. With two threads on a shared 2-core machine, one thread waits for a core whenever
another process runs, and settings with the same per-layer k differed by up to 30 % in throughput in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import timm
import torch
import torch.nn.functional as F
import transformers
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, Subset

from lexi_pl.adapter import MoEAdapter
from lexi_pl.allocation import allocate
from lexi_pl.baselines import count_expert_selections, prune_experts, random_plan, select_pruned_experts
from lexi_pl.callbacks import LExI, MoEThroughput
from lexi_pl.data import ImageClassificationData, TextData
from lexi_pl.data.images import collate_image_label
from lexi_pl.modules import MoECausalLM, MoEImageClassifier
from lexi_pl.modules.language import next_token_targets, score_next_tokens
from lexi_pl.plan import TopKPlan
from lexi_pl.profile_table import SensitivityProfile
from lexi_pl.profiling import profile_sensitivity
from record import replace_section
from side_by_side import compare, validate

REPO = Path(__file__).resolve().parents[1]
PLOTS = REPO / "benchmarks" / "plots"

# Method labels, in the order of the tables and plot legends.
NATIVE = "native k"
DP = "LExI-DP"
DP_NORM_SCALED = "LExI-DP (norm-scaled inputs)"
EVOLUTIONARY = "LExI evolutionary"
DP_RENORMALIZE = "LExI-DP (renormalize)"
UNIFORM = "uniform k"
RANDOM = "random k"
PRUNE_NORM = "pruning, router norm"
PRUNE_FREQUENCY = "pruning, frequency (uses data)"
ALLOCATION_METHODS = (DP, DP_NORM_SCALED, EVOLUTIONARY, DP_RENORMALIZE, UNIFORM)


# models and data


@dataclass
class Benchmark:
    """One shipped model with its validation data, calibration batches and the metrics the tables show."""

    name: str
    title: str
    module: LightningModule
    data: LightningDataModule
    calibration: list[Any]
    calibration_text: str
    data_text: str
    speed_key: str
    speed_unit: str
    flops_key: str
    quality: list[tuple[str, str]]
    primary: tuple[str, str, str]
    """(column title, logged key, "max" or "min"): the metric that decides which setting is better."""
    bare_pass: Callable[[nn.Module, Any], tuple[int, float, float, int]]
    """Function that runs the model on one batch and returns (items counted for throughput, summed loss, correct
    predictions, scored items)."""


def load_vision(arguments: argparse.Namespace) -> Benchmark:
    checkpoint = REPO / "checkpoints" / "vmoe_mnist" / "model.safetensors"
    exported = json.loads((checkpoint.parent / "config.json").read_text())
    module = MoEImageClassifier(
        model_name=exported["model_name"], checkpoint_path=str(checkpoint), model_kwargs=exported["model_kwargs"]
    )
    data = ImageClassificationData(
        source="mnist5k", batch_size=arguments.vision_batch_size, val_subset=arguments.vision_images
    )
    # Calibration for the frequency criterion: the first images of the training split, without augmentation.
    calibration_data = ImageClassificationData(source="mnist5k", data_config=module.data_config)
    calibration_data.setup("fit")
    calibration_set = Subset(calibration_data.train_dataset, range(arguments.vision_calibration))
    loader = DataLoader(calibration_set, batch_size=arguments.vision_batch_size, collate_fn=collate_image_label)
    calibration = list(loader)

    def bare_pass(model: nn.Module, batch: Any) -> tuple[int, float, float, int]:
        images, labels = batch
        logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        return labels.shape[0], float(loss), float((logits.argmax(dim=-1) == labels).sum()), labels.shape[0]

    return Benchmark(
        name="vision",
        title="V-MoE on MNIST (`checkpoints/vmoe_mnist`: 4 MoE layers, 8 experts, native k 2)",
        module=module,
        data=data,
        calibration=calibration,
        calibration_text=f"the first {arguments.vision_calibration} mnist5k training images",
        data_text=f"the first {arguments.vision_images} mnist5k validation images, batch {arguments.vision_batch_size}",
        speed_key="val/samples_per_sec",
        speed_unit="images/s",
        flops_key="val/expert_gflops_per_sample",
        quality=[("top-1", "val/top1"), ("NLL", "val/nll")],
        primary=("top-1", "val/top1", "max"),
        bare_pass=bare_pass,
    )


def load_language(arguments: argparse.Namespace) -> Benchmark:
    checkpoint = REPO / "checkpoints" / "moe_lm_pydoc"
    module = MoECausalLM(model_name_or_path=str(checkpoint))
    data = TextData(
        source="pydoc",
        tokenizer_path=str(checkpoint),
        batch_size=arguments.lm_batch_size,
        val_subset=arguments.lm_blocks,
    )
    calibration_data = TextData(source="pydoc", tokenizer_path=str(checkpoint), batch_size=arguments.lm_batch_size)
    calibration_data.setup("fit")
    calibration_set = Subset(calibration_data.blocks["train"], range(arguments.lm_calibration))
    calibration = list(DataLoader(calibration_set, batch_size=arguments.lm_batch_size))

    def bare_pass(model: nn.Module, batch: Any) -> tuple[int, float, float, int]:
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        nll, correct, scored = score_next_tokens(outputs.logits[:, :-1], next_token_targets(batch))
        return int(batch["attention_mask"].sum()), float(nll), float(correct), int(scored)

    block_size = calibration_data.hparams.block_size
    return Benchmark(
        name="language",
        title="pydoc MoE LM (`checkpoints/moe_lm_pydoc`: OLMoE class, 6 MoE layers, 16 experts, native k 4)",
        module=module,
        data=data,
        calibration=calibration,
        calibration_text=f"the first {arguments.lm_calibration} training blocks of {block_size} tokens",
        data_text=(
            f"the first {arguments.lm_blocks} held-out pydoc blocks of {block_size} tokens, "
            f"batch {arguments.lm_batch_size}"
        ),
        speed_key="val/tokens_per_sec",
        speed_unit="tokens/s",
        flops_key="val/expert_gflops_per_token",
        quality=[("perplexity", "val/ppl"), ("next-token acc", "val/acc")],
        primary=("perplexity", "val/ppl", "min"),
        bare_pass=bare_pass,
    )


# settings


class PruneDuringValidation(Callback):
    """Prune experts with `prune_experts` for each validation run, and put them back when it ends or fails."""

    def __init__(self, fraction: float, criterion: str, selection_counts: list[torch.Tensor] | None) -> None:
        self.fraction = fraction
        self.criterion = criterion
        self.selection_counts = selection_counts
        self.pruned: dict[str, list[int]] = {}
        self._stack = contextlib.ExitStack()

    def on_validation_start(self, trainer, pl_module) -> None:
        adapter = MoEAdapter(pl_module.model)
        context = prune_experts(adapter, self.fraction, self.criterion, self.selection_counts)
        self.pruned = self._stack.enter_context(context)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._stack.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._stack.close()


@dataclass
class Setting:
    """One evaluated configuration: a per-layer k plan, a pruning, or the native model."""

    name: str
    method: str
    budget: float
    """Active experts as a fraction of the native total."""
    make_callbacks: Callable[[], list[Callback]]
    plan: TopKPlan | None = None
    pruned_fraction: float | None = None
    seed: int | None = None


@dataclass
class Plans:
    """Profiles and plans computed before any timed run."""

    profiles: dict[str, SensitivityProfile]
    settings: list[Setting] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    pruned: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    profile_seconds: float = 0.0
    counting_seconds: float = 0.0


def plan_callback(plan: TopKPlan, folder: Path, slug: str) -> Callable[[], list[Callback]]:
    """Save `plan` and return a factory of the LExI callback that applies it from that file."""
    setting_folder = folder / slug
    setting_folder.mkdir(parents=True, exist_ok=True)
    path = plan.save(setting_folder / "plan.json")
    return lambda: [LExI(plan_path=str(path), output_dir=str(setting_folder))]


def build_settings(bench: Benchmark, arguments: argparse.Namespace, folder: Path) -> Plans:
    """Profile the model, make every plan and pruning, and return the settings in table order."""
    adapter = MoEAdapter(bench.module.model)
    started = time.perf_counter()
    profile_options = dict(cache_dir=folder / "profiles", progress=False)
    profiles = {
        "gaussian": profile_sensitivity(adapter, input_mode="gaussian", **profile_options),
        "norm_scaled": profile_sensitivity(adapter, input_mode="norm_scaled", **profile_options),
        "renormalize": profile_sensitivity(adapter, routing_weights="renormalize", **profile_options),
    }
    plans = Plans(profiles=profiles, profile_seconds=time.perf_counter() - started)
    plans.settings.append(Setting(NATIVE, NATIVE, 1.0, list))

    for fraction in arguments.budgets:
        label = f"{100 * fraction:g} %"
        candidates: list[tuple[str, Callable[[], TopKPlan]]] = [
            (DP, lambda: allocate(profiles["gaussian"], fraction=fraction, method="dp")),
            (DP_NORM_SCALED, lambda: allocate(profiles["norm_scaled"], fraction=fraction, method="dp")),
            (EVOLUTIONARY, lambda: allocate(profiles["gaussian"], fraction=fraction, method="evolutionary", seed=0)),
            (DP_RENORMALIZE, lambda: allocate(profiles["renormalize"], fraction=fraction, method="dp")),
            (UNIFORM, lambda: allocate(profiles["gaussian"], fraction=fraction, method="uniform")),
        ]
        for method, make_plan in candidates:
            # At the full budget every allocation is the native k, which the native row already shows.
            if fraction == 1.0 and method != DP_RENORMALIZE:
                continue
            try:
                plan = make_plan()
            except ValueError as error:
                plans.skipped.append(f"{method} at {label}: {error}")
                continue
            slug = f"{method}-{fraction}".replace(" ", "_").replace("(", "").replace(")", "")
            make = plan_callback(plan, folder, slug)
            plans.settings.append(Setting(f"{method} {label}", method, fraction, make, plan))
        if fraction == 1.0:
            continue
        # The same rounding as LExI's (halves up), so random k has the budget of the LExI rows.
        budget = allocate(profiles["gaussian"], fraction=fraction, method="dp").budget
        for seed in range(arguments.seeds):
            plan = random_plan(adapter, budget, seed=seed)
            make = plan_callback(plan, folder, f"random-{fraction}-{seed}")
            plans.settings.append(Setting(f"{RANDOM} {label} seed {seed}", RANDOM, fraction, make, plan, seed=seed))

    started = time.perf_counter()
    counts = count_expert_selections(adapter, bench.calibration)
    plans.counting_seconds = time.perf_counter() - started
    prunings = ((PRUNE_NORM, "router_norm", None), (PRUNE_FREQUENCY, "frequency", counts))
    for method, criterion, selection_counts in prunings:
        for fraction in arguments.prune_fractions:

            def make(fraction=fraction, criterion=criterion, selection_counts=selection_counts) -> list[Callback]:
                return [PruneDuringValidation(fraction, criterion, selection_counts)]

            name = f"{method} {100 * fraction:g} %"
            plans.settings.append(Setting(name, method, 1.0, make, pruned_fraction=fraction))
            plans.pruned[name] = select_pruned_experts(adapter, fraction, criterion, selection_counts)
    return plans


# toolkit against a bare torch loop


@dataclass
class Overhead:
    toolkit_speed: list[float]
    bare_speed: list[float]
    toolkit_wall: list[float]
    bare_wall: list[float]
    toolkit_quality: float
    bare_quality: float
    expert_share: float
    """Share of the bare loop's forward time spent inside the experts modules, at native k."""


def bare_loop(bench: Benchmark, loader: DataLoader, time_experts: bool = False) -> tuple[float, float, float, float]:
    """Evaluate the model with plain torch; return (items/s after one warm-up batch, wall s, quality, expert share).

    Quality is top-1 for images and perplexity for text. With `time_experts`, hooks time every experts module and
    the expert share is their time over the timed batches' time.
    """
    model = bench.module.model
    expert_seconds = 0.0
    entered: list[float] = []

    def enter_experts(module: nn.Module, args: Any) -> None:
        entered.append(time.perf_counter())

    def leave_experts(module: nn.Module, args: Any, output: Any) -> None:
        nonlocal expert_seconds
        expert_seconds += time.perf_counter() - entered.pop()

    handles = []
    if time_experts:
        for layer in MoEAdapter(model).layers:
            handles.append(layer.block.experts.register_forward_pre_hook(enter_experts))
            handles.append(layer.block.experts.register_forward_hook(leave_experts))
    was_training = model.training
    model.eval()
    items = timed_items = scored = 0
    loss = correct = 0.0
    wall_start = time.perf_counter()
    timed_start = None
    try:
        with torch.inference_mode():
            for index, batch in enumerate(loader):
                if index == 1:
                    timed_start = time.perf_counter()
                    expert_seconds = 0.0
                batch_items, batch_loss, batch_correct, batch_scored = bench.bare_pass(model, batch)
                items += batch_items
                timed_items += batch_items if index >= 1 else 0
                loss += batch_loss
                correct += batch_correct
                scored += batch_scored
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    end = time.perf_counter()
    # With a single batch there is nothing after the warm-up, so that batch is timed.
    timed_seconds = end - (timed_start if timed_start is not None else wall_start)
    speed = (timed_items if timed_start is not None else items) / timed_seconds
    quality = math.exp(loss / scored) if bench.name == "language" else correct / scored
    return speed, end - wall_start, quality, expert_seconds / timed_seconds


def measure_overhead(bench: Benchmark, rounds: int) -> Overhead:
    """Alternate the toolkit's validation (Trainer.validate with MoEThroughput) and a bare torch loop at native k."""
    key = bench.primary[1]
    toolkit_speed, bare_speed, toolkit_wall, bare_wall = [], [], [], []
    toolkit_quality = bare_quality = float("nan")
    for _ in range(rounds):
        started = time.perf_counter()
        results = validate(bench.module, bench.data, [MoEThroughput(warmup_batches=1)])
        toolkit_wall.append(time.perf_counter() - started)
        toolkit_speed.append(results[bench.speed_key])
        toolkit_quality = results[key]
        # The data module's loader is the one the trainer just used, so both loops see the same batches.
        speed, wall, bare_quality, _ = bare_loop(bench, bench.data.val_dataloader())
        bare_speed.append(speed)
        bare_wall.append(wall)
    _, _, _, expert_share = bare_loop(bench, bench.data.val_dataloader(), time_experts=True)
    return Overhead(toolkit_speed, bare_speed, toolkit_wall, bare_wall, toolkit_quality, bare_quality, expert_share)


# summary rows


@dataclass
class Row:
    """Figures of one method at one budget (random k: averaged over seeds)."""

    method: str
    budget: float
    top_k: list[int] | None
    objective: float | None
    quality: dict[str, float]
    quality_spread: dict[str, float]
    speed: float
    speedup: float
    predicted: float
    seeds: int = 1
    pruned_fraction: float | None = None
    evolutionary_gap: float | None = None


def objective_of(profile: SensitivityProfile, top_k: Sequence[int]) -> float:
    """Return sum_j D_j(k_j) of `top_k` on `profile`."""
    return sum(profile.deltas[layer][k - 1] for layer, k in enumerate(top_k))


def summarize(bench: Benchmark, plans: Plans, results: dict[str, list[dict[str, float]]]) -> list[Row]:
    native_runs = results[plans.settings[0].name]
    native_speed = statistics.median(run[bench.speed_key] for run in native_runs)
    native_flops = native_runs[0][bench.flops_key]
    groups: dict[tuple[str, float, float | None], list[Setting]] = {}
    for setting in plans.settings:
        groups.setdefault((setting.method, setting.budget, setting.pruned_fraction), []).append(setting)

    rows = []
    for (method, budget, pruned_fraction), members in groups.items():
        speeds = [statistics.median(run[bench.speed_key] for run in results[member.name]) for member in members]
        first_runs = [results[member.name][0] for member in members]
        quality = {key: statistics.mean(run[key] for run in first_runs) for _, key in bench.quality}
        spread = {
            key: statistics.stdev([run[key] for run in first_runs]) if len(first_runs) > 1 else 0.0
            for _, key in bench.quality
        }
        plan = members[0].plan
        top_k = list(plan.top_k.values()) if plan is not None and len(members) == 1 else None
        if method == NATIVE:
            top_k = MoEAdapter(bench.module.model).native_top_k
        objectives = [objective_of(plans.profiles["gaussian"], list(m.plan.top_k.values())) for m in members if m.plan]
        gap = plan.extra.get("evolutionary", {}).get("relative_gap") if plan is not None else None
        speed = statistics.mean(speeds)
        if objectives:
            objective: float | None = statistics.mean(objectives)
        elif method == NATIVE:
            objective = 0.0
        else:
            objective = None
        rows.append(
            Row(
                method=method,
                budget=budget,
                top_k=top_k,
                objective=objective,
                quality=quality,
                quality_spread=spread,
                speed=speed,
                speedup=speed / native_speed,
                predicted=native_flops / statistics.mean(run[bench.flops_key] for run in first_runs),
                seeds=len(members),
                pruned_fraction=pruned_fraction,
                evolutionary_gap=gap,
            )
        )
    return rows


# report


def format_quality(bench: Benchmark, row: Row, key: str) -> str:
    value = row.quality[key]
    text = f"{value:.2f}" if key == "val/ppl" else f"{value:.4f}"
    if row.seeds > 1:
        spread = row.quality_spread[key]
        text += f" ± {spread:.2f}" if key == "val/ppl" else f" ± {spread:.4f}"
    return text


def is_better_or_equal(bench: Benchmark, first: float, second: float) -> bool:
    return first >= second if bench.primary[2] == "max" else first <= second


def row_at_budget(rows: list[Row], method: str, budget: float) -> Row | None:
    return next((row for row in rows if row.method == method and math.isclose(row.budget, budget)), None)


def same_k_spread(rows: list[Row]) -> float | None:
    """Return the largest relative throughput spread among rows that run the same per-layer k and routing weights.

    Those rows (LExI-DP, its norm-scaled and evolutionary variants and uniform k, where their k agree) do the same
    work, so their spread measures the timing noise of the run. Returns None when no two rows share a k.
    """
    groups: dict[tuple[float, tuple[int, ...]], list[float]] = {}
    for row in rows:
        if row.method in (DP, DP_NORM_SCALED, EVOLUTIONARY, UNIFORM) and row.top_k is not None:
            groups.setdefault((row.budget, tuple(row.top_k)), []).append(row.speed)
    spreads = [max(speeds) / min(speeds) - 1.0 for speeds in groups.values() if len(speeds) > 1]
    return max(spreads) if spreads else None


def allocation_table(bench: Benchmark, rows: list[Row], expert_share: float) -> list[str]:
    header = [
        "budget",
        "method",
        "per-layer k",
        "sum D (Gaussian profile)",
        *(title for title, _ in bench.quality),
        f"{bench.speed_unit} (median)",
        "measured speed-up",
        "expert-FLOP speed-up",
        "measured / FLOP",
        "time-share estimate",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---|" + "---:|" * (len(header) - 3)]
    for row in rows:
        if row.pruned_fraction is not None:
            continue
        method = row.method if row.seeds == 1 else f"{row.method} (mean ± sd of {row.seeds} seeds)"
        top_k = " ".join(str(k) for k in row.top_k) if row.top_k is not None else "random"
        objective = f"{row.objective:.3g}" if row.objective is not None else ""
        estimate = 1.0 / ((1.0 - expert_share) + expert_share / row.predicted)
        cells = [
            f"{100 * row.budget:g} %",
            method,
            top_k,
            objective,
            *(format_quality(bench, row, key) for _, key in bench.quality),
            f"{row.speed:.0f}",
            f"{row.speedup:.2f}x",
            f"{row.predicted:.2f}x",
            f"{row.speedup / row.predicted:.2f}",
            f"{estimate:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def pruning_table(bench: Benchmark, rows: list[Row], plans: Plans) -> list[str]:
    title, key, _ = bench.primary
    header = [
        "pruned",
        "criterion",
        "experts kept per layer",
        *(column for column, _ in bench.quality),
        "measured speed-up",
        f"LExI-DP {title} at the paired budget",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---:|---|---:|" + "---:|" * (len(header) - 3)]
    adapter = MoEAdapter(bench.module.model)
    for row in rows:
        if row.pruned_fraction is None:
            continue
        name = f"{row.method} {100 * row.pruned_fraction:g} %"
        kept = [layer.num_experts - len(plans.pruned[name][layer.name]) for layer in adapter.layers]
        paired = row_at_budget(rows, DP, 1.0 - row.pruned_fraction)
        paired_text = "not run"
        if paired is not None:
            paired_text = f"{format_quality(bench, paired, key)} at {100 * paired.budget:g} %"
        cells = [
            f"{100 * row.pruned_fraction:g} %",
            row.method.removeprefix("pruning, "),
            " ".join(str(count) for count in kept),
            *(format_quality(bench, row, quality_key) for _, quality_key in bench.quality),
            f"{row.speedup:.2f}x",
            paired_text,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def concave_layers(profile: SensitivityProfile) -> int:
    """Count the layers whose first expert removed costs at least as much D as the second one removed."""
    count = 0
    for deltas, native in zip(profile.deltas, profile.native_top_k):
        if native >= 3 and deltas[native - 2] - deltas[native - 1] >= deltas[native - 3] - deltas[native - 2]:
            count += 1
    return count


def uniform_target_lines(bench: Benchmark, rows: list[Row], profile: SensitivityProfile) -> list[str]:
    """Compare LExI-DP with uniform k at every budget that has a uniform k."""
    title, key, direction = bench.primary
    better = "higher" if direction == "max" else "lower"
    lines = []
    for row in rows:
        dp = row_at_budget(rows, DP, row.budget)
        if row.method != UNIFORM or dp is None:
            continue
        verdict = "met" if is_better_or_equal(bench, dp.quality[key], row.quality[key]) else "missed"
        same = " with the same per-layer k" if dp.top_k == row.top_k else ""
        line = (
            f"- LExI-DP at least as good as uniform k at {100 * row.budget:g} %: {verdict} ({title} "
            f"{dp.quality[key]:.4g} against {row.quality[key]:.4g}{same}; {better} is better)."
        )
        if verdict == "missed" and dp.objective is not None and row.objective is not None:
            line += (
                f" The DP plan has the lower profile objective (sum D {dp.objective:.3g} against "
                f"{row.objective:.3g}), so the solver did its job and the objective disagrees with {title}: in "
                f"{concave_layers(profile)} of {profile.num_layers} layers the first expert removed costs at "
                "least as much D as the second, so the objective prefers cutting few layers deeply."
            )
        lines.append(line)
    return lines


def pruning_target_lines(bench: Benchmark, rows: list[Row]) -> list[str]:
    """Compare each pruning of a fraction p with LExI-DP at the budget 1 - p."""
    key = bench.primary[1]
    lines = []
    for row in rows:
        if row.pruned_fraction is None:
            continue
        dp = row_at_budget(rows, DP, 1.0 - row.pruned_fraction)
        if dp is None:
            continue
        verdict = "met" if is_better_or_equal(bench, dp.quality[key], row.quality[key]) else "missed"
        figures = "; ".join(
            f"{column} {dp.quality[quality_key]:.4g} against {row.quality[quality_key]:.4g}"
            for column, quality_key in bench.quality
        )
        line = (
            f"- LExI-DP at {100 * dp.budget:g} % at least as good as {row.method} of "
            f"{100 * row.pruned_fraction:g} % of the experts: {verdict} ({figures})."
        )
        if verdict == "missed":
            line += (
                f" Pruning still runs the native k experts per token, {dp.predicted:.2f}x the expert FLOPs of "
                "LExI-DP at this budget."
            )
        lines.append(line)
    return lines


def random_comparison_lines(bench: Benchmark, rows: list[Row]) -> list[str]:
    """Compare LExI-DP with the mean of the random allocations at each budget (information, not a target)."""
    title, key, _ = bench.primary
    lines = []
    for row in rows:
        dp = row_at_budget(rows, DP, row.budget)
        if row.method != RANDOM or dp is None:
            continue
        if dp.quality[key] == row.quality[key]:
            relation = "equal to"
        elif is_better_or_equal(bench, dp.quality[key], row.quality[key]):
            relation = "better than"
        else:
            relation = "worse than"
        lines.append(
            f"- For comparison, not a target: LExI-DP at {100 * row.budget:g} % is {relation} the mean of "
            f"{row.seeds} random allocations ({title} {dp.quality[key]:.4g} against {row.quality[key]:.4g} "
            f"± {row.quality_spread[key]:.2g})."
        )
    return lines


def target_lines(bench: Benchmark, rows: list[Row], overhead: Overhead, profile: SensitivityProfile) -> list[str]:
    """Check the targets against the measured rows and return one verdict line each."""
    lines = [
        *uniform_target_lines(bench, rows, profile),
        *pruning_target_lines(bench, rows),
        *random_comparison_lines(bench, rows),
    ]

    gaps = [row.evolutionary_gap for row in rows if row.method == EVOLUTIONARY and row.evolutionary_gap is not None]
    if gaps:
        verdict = "met" if max(gaps) <= 0.01 else "missed"
        lines.append(
            f"- Evolutionary search within 1 % of the DP objective at every budget: {verdict} (largest gap "
            f"{100 * max(gaps):.2f} %)."
        )

    dp = row_at_budget(rows, DP, 0.75)
    if bench.name == "language" and dp is not None:
        ratio = dp.speedup / dp.predicted
        verdict = "met" if ratio >= 0.9 else "missed"
        estimate = 1.0 / ((1.0 - overhead.expert_share) + overhead.expert_share / dp.predicted)
        lines.append(
            f"- Measured speed-up at least 0.9x the expert-FLOP prediction at 75 %: {verdict} ({dp.speedup:.2f}x "
            f"measured against {dp.predicted:.2f}x predicted, ratio {ratio:.2f}). The experts modules take "
            f"{100 * overhead.expert_share:.0f} % of the forward time at native k (timed with hooks in the bare "
            f"loop), so cutting that time by 25 % gives an estimated whole-model speed-up of only {estimate:.2f}x."
        )
    return lines


def overhead_lines(bench: Benchmark, overhead: Overhead) -> list[str]:
    toolkit = statistics.median(overhead.toolkit_speed)
    bare = statistics.median(overhead.bare_speed)
    title = bench.primary[0]
    return [
        "| loop | " + f"{bench.speed_unit} (median, after 1 warm-up batch)" + " | wall s per pass (median) | "
        + f"{title} |",
        "|---|---:|---:|---:|",
        f"| toolkit (`Trainer.validate` + `MoEThroughput`) | {toolkit:.0f} | "
        f"{statistics.median(overhead.toolkit_wall):.2f} | {overhead.toolkit_quality:.4g} |",
        f"| bare torch loop | {bare:.0f} | {statistics.median(overhead.bare_wall):.2f} | {overhead.bare_quality:.4g} |",
        "",
        f"Overhead ratio (bare throughput / toolkit throughput): {bare / toolkit:.2f}. Wall-time ratio of a whole pass "
        f"(toolkit / bare, including Trainer construction and data setup): "
        f"{statistics.median(overhead.toolkit_wall) / statistics.median(overhead.bare_wall):.2f}.",
    ]


# plots


def pyplot() -> Any:
    """Import matplotlib's pyplot with the file-only Agg backend, or raise SystemExit naming the extra to install."""
    try:
        import matplotlib
    except ImportError as error:
        raise SystemExit(
            "plots need matplotlib, which is not installed; run `pip install -e .[bench]` or leave out --write and "
            "--plots-dir"
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def method_style(method: str) -> dict[str, Any]:
    styles = {
        NATIVE: dict(color="black", marker="*"),
        DP: dict(color="tab:blue", marker="o"),
        DP_NORM_SCALED: dict(color="tab:cyan", marker="s"),
        EVOLUTIONARY: dict(color="tab:purple", marker="^"),
        DP_RENORMALIZE: dict(color="tab:green", marker="D"),
        UNIFORM: dict(color="tab:orange", marker="v"),
        RANDOM: dict(color="tab:gray", marker="x"),
        PRUNE_NORM: dict(color="tab:red", marker="P"),
        PRUNE_FREQUENCY: dict(color="tab:brown", marker="X"),
    }
    return styles[method]


def plot_quality_speed(bench: Benchmark, rows: list[Row], path: Path) -> None:
    plt = pyplot()

    title, key, _ = bench.primary
    figure, axis = plt.subplots(figsize=(7, 4.5))
    methods = [NATIVE, *ALLOCATION_METHODS, RANDOM, PRUNE_NORM, PRUNE_FREQUENCY]
    for method in methods:
        # Budgets from large to small, pruned fractions from small to large.
        members = sorted(
            (row for row in rows if row.method == method),
            key=lambda row: (-row.budget, row.pruned_fraction or 0.0),
        )
        if not members:
            continue
        x = [row.speedup for row in members]
        y = [row.quality[key] for row in members]
        errors = [row.quality_spread[key] for row in members]
        style = method_style(method)
        if method == RANDOM:
            axis.errorbar(x, y, yerr=errors, linestyle="none", capsize=3, label=method, **style)
        else:
            axis.plot(x, y, linestyle="-" if len(members) > 1 else "none", label=method, **style)
        for row in members:
            label = f"{100 * row.budget:g}" if row.pruned_fraction is None else f"-{100 * row.pruned_fraction:g}"
            axis.annotate(label, (row.speedup, row.quality[key]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    axis.set_xlabel(f"measured speed-up over native k ({bench.speed_unit}, median of rounds)")
    axis.set_ylabel(title)
    axis.set_title(f"{bench.name}: {title} against measured speed-up (labels: budget %, or -pruned %)", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_top_k(bench: Benchmark, rows: list[Row], path: Path) -> None:
    plt = pyplot()

    budgets = sorted({row.budget for row in rows if row.method in ALLOCATION_METHODS}, reverse=True)
    layers = len(MoEAdapter(bench.module.model).layers)
    figure, axes = plt.subplots(1, len(budgets), figsize=(3.2 * len(budgets) + 1, 3.2), squeeze=False, sharey=True)
    width = 0.8 / len(ALLOCATION_METHODS)
    for axis, budget in zip(axes[0], budgets):
        for position, method in enumerate(ALLOCATION_METHODS):
            row = next((row for row in rows if row.method == method and row.budget == budget), None)
            if row is None or row.top_k is None:
                continue
            offsets = np.arange(layers) + (position - (len(ALLOCATION_METHODS) - 1) / 2) * width
            axis.bar(offsets, row.top_k, width=width, label=method, color=method_style(method)["color"])
        axis.set_title(f"budget {100 * budget:g} %", fontsize=9)
        axis.set_xticks(range(layers))
        axis.set_xlabel("MoE layer")
    axes[0][0].set_ylabel("k")
    axes[0][-1].legend(fontsize=6)
    figure.suptitle(f"{bench.name}: per-layer k of each allocation", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_sensitivity(bench: Benchmark, profiles: dict[str, SensitivityProfile], path: Path) -> None:
    plt = pyplot()

    shown = [("gaussian", "Gaussian inputs"), ("norm_scaled", "norm-scaled inputs")]
    figure, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 3.4), squeeze=False)
    for axis, (name, caption) in zip(axes[0], shown):
        deltas = np.array(profiles[name].deltas)
        image = axis.imshow(deltas, aspect="auto", cmap="viridis")
        axis.set_xticks(range(deltas.shape[1]), [str(k) for k in range(1, deltas.shape[1] + 1)])
        axis.set_yticks(range(deltas.shape[0]))
        axis.set_xlabel("k")
        axis.set_ylabel("MoE layer")
        axis.set_title(f"D_j(k), {caption}", fontsize=9)
        middle = (deltas.max() + deltas.min()) / 2
        for layer in range(deltas.shape[0]):
            for column in range(deltas.shape[1]):
                value = deltas[layer, column]
                color = "black" if value > middle else "white"
                axis.text(column, layer, f"{value:.3g}", ha="center", va="center", fontsize=6, color=color)
        figure.colorbar(image, ax=axis)
    figure.suptitle(f"{bench.name}: sensitivity profile ||Y_k - Y_native||", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# running


def run_benchmark(bench: Benchmark, arguments: argparse.Namespace, plots_dir: Path | None) -> list[str]:
    """Run every setting of one model and return its part of the report."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        plans = build_settings(bench, arguments, Path(folder))
        settings = {setting.name: setting.make_callbacks for setting in plans.settings}
        # One untimed pass first, so that the first setting of round 1 does not pay the process's warm-up.
        validate(bench.module, bench.data, [MoEThroughput(warmup_batches=1)])
        compare_started = time.perf_counter()
        _, results = compare(bench.module, bench.data, settings, arguments.rounds, bench.speed_key, bench.quality)
        compare_seconds = time.perf_counter() - compare_started
    overhead = measure_overhead(bench, arguments.overhead_rounds)
    rows = summarize(bench, plans, results)
    seconds = time.perf_counter() - started

    lines = [
        f"### {bench.title}",
        "",
        f"Validation data: {bench.data_text}. Frequency pruning counts expert selections on {bench.calibration_text} "
        "(training split, so that criterion uses data; every other method is data-free). "
        f"{len(plans.settings)} settings x {arguments.rounds} alternating rounds took {compare_seconds:.0f} s; the "
        f"three profiles took {plans.profile_seconds:.1f} s and the selection counting {plans.counting_seconds:.1f} s; "
        f"this model's whole run took {seconds:.0f} s.",
        "",
        "Per-layer k allocations (`sum D` is sum_j D_j(k_j) on the Gaussian-input, native-weight profile that LExI-DP "
        "minimises; the time-share estimate is 1 / ((1 - s) + s / expert-FLOP speed-up) with s, the experts' share "
        f"of the forward time at native k, measured as {100 * overhead.expert_share:.0f} %):",
        "",
        *allocation_table(bench, rows, overhead.expert_share),
        "",
    ]
    spread = same_k_spread(rows)
    if spread is not None:
        lines += [
            f"Rows with the same per-layer k and routing weights differ by up to {100 * spread:.0f} % in throughput in "
            "this run. They do the same work, so this is the timing noise, and smaller speed-up differences are not "
            "resolved.",
            "",
        ]
    if plans.skipped:
        lines += ["Not run:", "", *(f"- {reason}" for reason in plans.skipped), ""]
    lines += [
        "Expert pruning at the native k (expert FLOPs unchanged, so its FLOP speed-up is 1.00x). Pruning a fraction p "
        "of the experts is paired with LExI-DP at the budget 1 - p: both drop the same share of experts, pruning from "
        "memory, LExI from each token's computation.",
        "",
        *pruning_table(bench, rows, plans),
        "",
        f"Toolkit validation loop against a bare torch loop (`torch.inference_mode`, same model, same batches, "
        f"native k, {arguments.overhead_rounds} alternating rounds):",
        "",
        *overhead_lines(bench, overhead),
        "",
        "Targets:",
        "",
        *target_lines(bench, rows, overhead, plans.profiles["gaussian"]),
    ]
    if bench.primary[1] == "val/top1":
        images = results[NATIVE][0]["val/samples"]
        accuracy = results[NATIVE][0]["val/top1"]
        error = math.sqrt(accuracy * (1 - accuracy) / images)
        lines += [
            "",
            f"Top-1 on {images:.0f} images has a binomial standard error of about {error:.4f} at the native "
            f"{accuracy:.3f}, so top-1 differences below about {2 * error:.3f} are within sampling noise; NLL "
            "separates the settings more finely.",
        ]
    if plots_dir is not None:
        plots_dir.mkdir(parents=True, exist_ok=True)
        names = {
            "quality_speed": f"compare_{bench.name}_quality_speed.png",
            "top_k": f"compare_{bench.name}_top_k.png",
            "sensitivity": f"compare_{bench.name}_sensitivity.png",
        }
        plot_quality_speed(bench, rows, plots_dir / names["quality_speed"])
        plot_top_k(bench, rows, plots_dir / names["top_k"])
        plot_sensitivity(bench, plans.profiles, plots_dir / names["sensitivity"])
        shown = os.path.relpath(plots_dir, REPO) if plots_dir.is_relative_to(REPO) else str(plots_dir)
        lines += [
            "",
            f"Plots: [{bench.primary[0]} against speed-up]({shown}/{names['quality_speed']}), "
            f"[per-layer k per budget]({shown}/{names['top_k']}), "
            f"[sensitivity heatmap]({shown}/{names['sensitivity']}).",
        ]
    return lines


def machine_lines(arguments: argparse.Namespace, command: str, load_before: tuple, seconds: float) -> list[str]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load_after = os.getloadavg()
    return [
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}), {seconds / 60:.1f} min in all.",
        "",
        f"Machine: {cpu}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, "
        f"{platform.system()} {platform.release()}; 1-minute load average {load_before[0]:.2f} before and "
        f"{load_after[0]:.2f} after the run. Python {platform.python_version()}, torch {torch.__version__}, "
        f"lightning {lightning.__version__}, transformers {transformers.__version__}, timm {timm.__version__}, "
        f"numpy {np.__version__}. Throughputs hold for this machine and its load only; compare the ratios, which "
        "come from settings alternated within each round.",
    ]


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("vision", "language", "both"), default="both", help="model(s) to run")
    parser.add_argument(
        "--quick", action="store_true",
        help="CI-sized run: budget 75 %%, pruning 25 %%, 2 seeds, 100 images, 8 LM blocks, 1 round",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating validation rounds per setting (default 3)")
    parser.add_argument(
        "--overhead-rounds", type=int, default=3, help="rounds of the toolkit against the bare loop (default 3)"
    )

    parser.add_argument(
        "--budgets", type=float, nargs="+", default=[1.0, 0.875, 0.75, 0.625, 0.5],
        help="budgets as fractions of the native active experts (default 1 0.875 0.75 0.625 0.5)",
    )
    parser.add_argument("--seeds", type=int, default=5, help="random allocations per budget (default 5)")
    parser.add_argument(
        "--prune-fractions", type=float, nargs="+", default=[0.125, 0.25, 0.5],
        help="fractions of each layer's experts to prune (default 0.125 0.25 0.5)",
    )

    parser.add_argument("--vision-images", type=int, default=500, help="validation images (default 500)")
    parser.add_argument("--vision-batch-size", type=int, default=100, help="images per batch (default 100)")
    parser.add_argument(
        "--vision-calibration", type=int, default=256,
        help="training images whose expert selections rank experts for frequency pruning (default 256)",
    )
    parser.add_argument("--lm-blocks", type=int, default=96, help="held-out LM blocks of 256 tokens (default 96)")
    parser.add_argument("--lm-batch-size", type=int, default=16, help="LM blocks per batch (default 16)")
    parser.add_argument(
        "--lm-calibration", type=int, default=32,
        help="training blocks whose expert selections rank experts for frequency pruning (default 32)",
    )

    parser.add_argument("--report", type=Path, help="also write the report (markdown) to this file")
    parser.add_argument(
        "--plots-dir", type=Path, help="folder for the PNG plots (default with --write: benchmarks/plots)"
    )
    parser.add_argument("--write", action="store_true", help="replace the compare section of BENCHMARKS.md, save plots")
    arguments = parser.parse_args(argv)

    if arguments.quick:
        arguments.rounds, arguments.overhead_rounds = 1, 1
        arguments.budgets, arguments.seeds, arguments.prune_fractions = [0.75], 2, [0.25]
        arguments.vision_images, arguments.vision_batch_size, arguments.vision_calibration = 100, 25, 50
        arguments.lm_blocks, arguments.lm_batch_size, arguments.lm_calibration = 8, 4, 4
    positive = (
        "threads", "rounds", "overhead_rounds", "seeds", "vision_images", "vision_batch_size", "vision_calibration",
        "lm_blocks", "lm_batch_size", "lm_calibration",
    )
    for name in positive:
        if getattr(arguments, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(arguments, name)}")
    return arguments


def main(argv: Sequence[str] | None = None) -> str:
    arguments = parse_arguments(argv)
    load_before = os.getloadavg()
    started = time.perf_counter()
    torch.set_num_threads(arguments.threads)
    torch.manual_seed(0)
    plots_dir = arguments.plots_dir or (PLOTS if arguments.write else None)
    if plots_dir is not None:
        pyplot()  # fail before the run, not after it, when matplotlib is missing
    loaders = {"vision": load_vision, "language": load_language}
    names = ["vision", "language"] if arguments.model == "both" else [arguments.model]
    body: list[str] = []
    for name in names:
        body += [*run_benchmark(loaders[name](arguments), arguments, plots_dir), ""]

    command = "python benchmarks/compare.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = "\n".join(
        [
            "## LExI against uniform k, random k and expert pruning (`compare`)",
            "",
            *machine_lines(arguments, command.strip(), load_before, time.perf_counter() - started),
            "",
            "Methods: LExI-DP is the default LExI (exact DP on a profile from Gaussian inputs, native routing "
            "weights); the norm-scaled variant profiles with inputs scaled by the block's input normalisation; "
            "LExI evolutionary runs the genetic search (seed 0) on the Gaussian profile; LExI-DP (renormalize) "
            "profiles and evaluates with the selected experts' weights rescaled to sum to 1. Random k draws each "
            "per-layer k uniformly from all vectors with the budget's total and 1 <= k_j <= native k. Speed-ups are "
            "medians over rounds divided by the native row's median; the expert-FLOP speed-up is the native expert "
            "FLOPs per item divided by the setting's (`MoEThroughput`), which ignores attention, dense layers and "
            "data loading.",
            "",
            *body,
        ]
    ).rstrip() + "\n"
    print(report)
    if arguments.report is not None:
        arguments.report.write_text(report)
    if arguments.write:
        replace_section(REPO / "BENCHMARKS.md", "compare", report)
    return report


if __name__ == "__main__":
    main()
