"""Time Stage 1 profiling of one OLMoE-shaped MoE layer against a native forward and print markdown tables.

The model is a one-decoder-layer transformers OLMoE with random weights, built once per experts implementation
("eager" and "grouped_mm"). The default layer shape is that of OLMoE-1B-7B (hidden size 2048, 64 experts of
intermediate size 1024, native top-8). On the same batch of random tokens, the script times in interleaved
rounds: one native-k forward of the MoE block, profiling every k with ``method="fast"`` and with
``method="naive"`` (one iteration each), and the two ways of computing the per-slot expert outputs that the fast
path stores. It then measures the peak memory of the native, fast and naive calls, each in a fresh subprocess,
and runs benchmarks/bench_allocation.py for the Stage 2 table. Examples::

    python benchmarks/bench_profiling.py            # OLMoE-1B-7B layer shape, a few minutes on 2 CPU cores
    python benchmarks/bench_profiling.py --quick    # smaller layer and fewer tokens, for CI
    python benchmarks/bench_profiling.py --write    # also replace this script's section of BENCHMARKS.md

Absolute seconds depend on the machine and its load, so compare only the ratios within one run.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import transformers
from transformers import AutoModelForCausalLM

from lexi_models.language.tiny import tiny_config
from lexi_pl.adapter import MoEAdapter, MoELayer
from lexi_pl.profiling import profile_sensitivity
from record import replace_section

IMPLEMENTATIONS = ("eager", "grouped_mm")
MEMORY_CALLS = ("native", "fast", "naive")
# The fast path's cost target, as a multiple of one native-k forward of the same layer on the same tokens.
FAST_TARGET_RATIO = 1.5
SECTION_NAME = "bench_profiling"
MIB = 2**20

# Layer shape and sizes of the default run, and of --quick. An option given on the command line wins over both.
FULL_SETTINGS = dict(
    hidden_size=2048, num_experts=64, expert_size=1024, top_k=8, batch_size=4, seq_len=128, repeats=3
)
QUICK_SETTINGS = dict(hidden_size=512, num_experts=16, expert_size=256, top_k=8, batch_size=2, seq_len=32, repeats=1)

@dataclass
class LayerResults:
    """Medians in seconds and peak memory in bytes for one experts implementation."""

    implementation: str
    seconds: dict[str, float] = field(default_factory=dict)
    peak_bytes: dict[str, int | None] = field(default_factory=dict)
    experts_used: int = 0
    max_load_ratio: float = 0.0
    max_relative_difference: float = 0.0


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    full = FULL_SETTINGS
    quick = QUICK_SETTINGS
    parser.add_argument(
        "--quick", action="store_true",
        help=f"CI-sized run: hidden size {quick['hidden_size']}, {quick['num_experts']} experts of intermediate "
        f"size {quick['expert_size']}, {quick['batch_size']} x {quick['seq_len']} tokens, {quick['repeats']} timed "
        "round, no memory measurement",
    )
    parser.add_argument("--hidden-size", type=int, help=f"hidden size of the model (default: {full['hidden_size']})")
    parser.add_argument(
        "--num-experts", type=int, help=f"routed experts per MoE layer (default: {full['num_experts']})"
    )
    parser.add_argument(
        "--expert-size", type=int, help=f"intermediate size of each expert's FFN (default: {full['expert_size']})"
    )
    parser.add_argument("--top-k", type=int, help=f"native top-k of the layer (default: {full['top_k']})")
    parser.add_argument("--batch-size", type=int, help=f"sequences per batch (default: {full['batch_size']})")
    parser.add_argument("--seq-len", type=int, help=f"tokens per sequence (default: {full['seq_len']})")
    parser.add_argument(
        "--repeats", type=int,
        help=f"timed rounds after one warm-up round, whose medians are printed (default: {full['repeats']})",
    )
    parser.add_argument(
        "--std", type=float, default=0.02,
        help="standard deviation of the random weights (default: 0.02, which gives router logits of standard "
        "deviation 0.02 * sqrt(hidden size) on unit Gaussian inputs)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the weights and of the profiling inputs (default: 0)"
    )
    parser.add_argument(
        "--implementations", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS),
        help="transformers experts implementations to measure (default: all)",
    )
    parser.add_argument(
        "--threads", type=int,
        help="torch intra-op threads (default: torch's default). Use fewer threads than cores when other jobs "
        "share the machine: on a 2-core machine with one core busy, 2 threads made these calls about 10x slower",
    )
    parser.add_argument(
        "--memory", action=argparse.BooleanOptionalAction,
        help="measure the peak memory of each call in a fresh subprocess, which adds one model build per call "
        "(default: on, off with --quick)",
    )
    # Internal: run one call in this process and print its peak memory as JSON (see measure_peak_in_subprocess).
    parser.add_argument(
        "--memory-of", choices=[f"{i}:{c}" for i in IMPLEMENTATIONS for c in MEMORY_CALLS], help=argparse.SUPPRESS
    )
    parser.add_argument("--skip-allocation", action="store_true", help="do not run benchmarks/bench_allocation.py")
    parser.add_argument(
        "--write", action="store_true", help="replace this script's section of the benchmarks file with the results"
    )
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).resolve().parent.parent / "BENCHMARKS.md",
        help="benchmarks file that --write updates (default: BENCHMARKS.md at the repository root)",
    )
    arguments = parser.parse_args()

    defaults = QUICK_SETTINGS if arguments.quick else FULL_SETTINGS
    for name, value in defaults.items():
        if getattr(arguments, name) is None:
            setattr(arguments, name, value)
    for name in defaults:
        if getattr(arguments, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(arguments, name)}")
    if arguments.memory is None:
        arguments.memory = not arguments.quick
    if arguments.threads is not None and arguments.threads < 1:
        parser.error(f"--threads must be at least 1, got {arguments.threads}")
    if arguments.top_k > arguments.num_experts:
        parser.error(f"--top-k ({arguments.top_k}) must not exceed --num-experts ({arguments.num_experts})")
    return arguments


# model


def build_layer_model(implementation: str, arguments: argparse.Namespace) -> tuple[torch.nn.Module, MoEAdapter]:
    """Build a one-decoder-layer OLMoE with the requested experts implementation and N(0, std^2) weights.

    The same seed gives the same weights for every implementation, so all of them profile the same layer.
    """
    config = tiny_config(
        "olmoe",
        hidden_size=arguments.hidden_size,
        intermediate_size=arguments.expert_size,
        num_experts=arguments.num_experts,
        num_experts_per_tok=arguments.top_k,
        num_hidden_layers=1,
        vocab_size=256,
        num_attention_heads=16,
        num_key_value_heads=16,
    )
    model = AutoModelForCausalLM.from_config(config, experts_implementation=implementation)
    # In-place draws avoid a temporary copy of each weight (1 GiB for the stacked gate and up projections at the
    # default shape).
    torch.manual_seed(arguments.seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, arguments.std)
    model.eval()
    return model, MoEAdapter(model)


def profiling_inputs(layer: MoELayer, arguments: argparse.Namespace) -> torch.Tensor:
    """Return the batch that profiling draws in its first iteration, so every timed call gets the same tokens.

    This mirrors ``lexi_pl.profiling._random_inputs`` with ``input_mode="gaussian"``.
    """
    generator = torch.Generator().manual_seed(arguments.seed)
    return torch.randn((arguments.batch_size, arguments.seq_len, layer.hidden_size), generator=generator)


def routing_statistics(layer: MoELayer, inputs: torch.Tensor) -> tuple[int, float]:
    """Return (experts selected by at least one token, largest expert load / mean load) at the native k."""
    with torch.no_grad():
        _, _, index = layer.router(inputs.reshape(-1, layer.hidden_size))[:3]
    loads = torch.bincount(index.flatten(), minlength=layer.num_experts).float()
    return int((loads > 0).sum()), float(loads.max() / loads.mean())


# timed calls


def time_native_forward(layer: MoELayer, inputs: torch.Tensor) -> float:
    with torch.no_grad():
        started = time.perf_counter()
        layer.forward_block(inputs)
        return time.perf_counter() - started


def time_profile(adapter: MoEAdapter, arguments: argparse.Namespace, method: str) -> tuple[float, list[float]]:
    """Profile every k of the single MoE layer with one iteration and return (layer seconds, deltas)."""
    profile = profile_sensitivity(
        adapter,
        batch_size=arguments.batch_size,
        seq_len=arguments.seq_len,
        iterations=1,
        seed=arguments.seed,
        method=method,
        progress=False,
    )
    return profile.timing["layer_seconds"][0], profile.deltas[0]


def expert_calls(
    layer: MoELayer, inputs: torch.Tensor
) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """Return two functions that compute each token's native-k expert outputs, unweighted, as (k, tokens, hidden).

    The first calls the experts once per slot, as the fast profiling path does. The second makes one call on
    tokens x k rows, each row a copy of its token routed to one expert, so each expert runs once on all its rows.
    """
    experts = layer.block.experts
    hidden = inputs.reshape(-1, layer.hidden_size)
    with torch.no_grad():
        _, weights, index = layer.router(hidden)[:3]
    num_tokens, top_k = index.shape
    ones = torch.ones(num_tokens, 1, dtype=weights.dtype)
    repeated_hidden = hidden.repeat_interleave(top_k, dim=0)
    repeated_ones = torch.ones(num_tokens * top_k, 1, dtype=weights.dtype)

    def per_slot() -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([experts(hidden, index[:, slot : slot + 1], ones) for slot in range(top_k)])

    def one_call() -> torch.Tensor:
        with torch.no_grad():
            outputs = experts(repeated_hidden, index.reshape(-1, 1), repeated_ones)
        return outputs.view(num_tokens, top_k, -1).transpose(0, 1)

    return per_slot, one_call


def timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


# memory


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(f"{key} is missing from /proc/self/status")


def peak_memory_bytes(run: Callable[[], object]) -> int | None:
    """Return how far the resident set size rose above its level before `run`, at its peak during `run`.

    Linux only: it frees cached heap memory (glibc ``malloc_trim``) and resets the kernel's peak RSS (``VmHWM``,
    by writing 5 to /proc/self/clear_refs) before the call. Returns None where either is unavailable. Memory
    that the allocator kept from earlier calls is reused without raising the RSS, which is why
    measure_peak_in_subprocess runs each call in a fresh process.
    """
    try:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        before = _proc_status_kib("VmRSS")
    except (OSError, KeyError, AttributeError):
        return None
    run()
    return max(0, _proc_status_kib("VmHWM") - before) * 1024


def run_memory_child(arguments: argparse.Namespace) -> None:
    """Build the model, run the call named by ``--memory-of`` once and print its peak memory as JSON."""
    implementation, call = arguments.memory_of.split(":")
    _, adapter = build_layer_model(implementation, arguments)
    layer = adapter.layers[0]
    inputs = profiling_inputs(layer, arguments)
    runs: dict[str, Callable[[], object]] = {
        "native": lambda: time_native_forward(layer, inputs),
        "fast": lambda: time_profile(adapter, arguments, "fast"),
        "naive": lambda: time_profile(adapter, arguments, "naive"),
    }
    print(json.dumps({"peak_bytes": peak_memory_bytes(runs[call])}))


def measure_peak_in_subprocess(arguments: argparse.Namespace, implementation: str, call: str) -> int | None:
    """Return the peak memory of one first `call` in a fresh process, above its RSS after building the model."""
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-of", f"{implementation}:{call}"]
    names = ("hidden_size", "num_experts", "expert_size", "top_k", "batch_size", "seq_len", "std", "seed", "threads")
    for name in names:
        value = getattr(arguments, name)
        if value is not None:
            command += [f"--{name.replace('_', '-')}", str(value)]
    print(f"{implementation}: measuring the peak memory of the {call} call", file=sys.stderr, flush=True)
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(
            f"the memory measurement {shlex.join(command)} failed with exit status {completed.returncode}:\n"
            f"{completed.stderr}"
        )
    return json.loads(completed.stdout.strip().splitlines()[-1])["peak_bytes"]


# measurement


def measure_implementation(implementation: str, arguments: argparse.Namespace) -> LayerResults:
    print(f"building the {implementation} model ...", file=sys.stderr, flush=True)
    model, adapter = build_layer_model(implementation, arguments)
    layer = adapter.layers[0]
    inputs = profiling_inputs(layer, arguments)
    per_slot, one_call = expert_calls(layer, inputs)
    results = LayerResults(implementation)
    results.experts_used, results.max_load_ratio = routing_statistics(layer, inputs)

    stacked_per_slot = per_slot()
    stacked_one_call = one_call()
    if not torch.allclose(stacked_per_slot, stacked_one_call, rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"{implementation}: the one-call expert outputs differ from the per-slot ones")
    del stacked_per_slot, stacked_one_call

    deltas: dict[str, list[float]] = {}

    def profile_seconds(method: str) -> float:
        seconds, deltas[method] = time_profile(adapter, arguments, method)
        return seconds

    calls: dict[str, Callable[[], float]] = {
        "native": lambda: time_native_forward(layer, inputs),
        "fast": lambda: profile_seconds("fast"),
        "naive": lambda: profile_seconds("naive"),
        "per_slot": lambda: timed(per_slot),
        "one_call": lambda: timed(one_call),
    }
    timings: dict[str, list[float]] = {name: [] for name in calls}
    # Round 0 warms up caches and one-time costs. Interleaving the calls in each round exposes all of them to
    # the same background load.
    for round_index in range(arguments.repeats + 1):
        print(f"{implementation}: round {round_index} of {arguments.repeats}", file=sys.stderr, flush=True)
        for name, call in calls.items():
            seconds = call()
            if round_index > 0:
                timings[name].append(seconds)
    results.seconds = {name: statistics.median(values) for name, values in timings.items()}

    scale = max(max(abs(value) for value in deltas["naive"]), 1e-12)
    results.max_relative_difference = max(abs(f - n) for f, n in zip(deltas["fast"], deltas["naive"])) / scale

    del model, adapter, layer, per_slot, one_call, calls
    gc.collect()
    return results


def run_allocation_benchmark(quick: bool) -> str:
    """Run benchmarks/bench_allocation.py and return its output (a summary line and a markdown table)."""
    script = Path(__file__).resolve().parent / "bench_allocation.py"
    command = [sys.executable, str(script)]
    if quick:
        command += ["--repeats", "5", "--ga-repeats", "1"]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(command)} failed with exit status {completed.returncode}:\n{completed.stderr}"
        )
    return completed.stdout.strip()


# report


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    return (
        f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch threads: {torch.get_num_threads()}, "
        f"{platform.system()} {platform.release()}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )


def format_mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.0f}"


def stored_outputs_bytes(arguments: argparse.Namespace) -> int:
    """Bytes of the float32 (k, tokens, hidden) tensor of expert outputs that the fast path keeps per batch."""
    return arguments.top_k * arguments.batch_size * arguments.seq_len * arguments.hidden_size * 4


def expert_weight_bytes(arguments: argparse.Namespace) -> int:
    """Bytes of one layer's float32 expert weights: gate, up and down projections of every expert."""
    return arguments.num_experts * 3 * arguments.hidden_size * arguments.expert_size * 4


def format_report(arguments: argparse.Namespace, all_results: list[LayerResults], allocation_output: str | None) -> str:
    k = arguments.top_k
    tokens = arguments.batch_size * arguments.seq_len
    lines = [
        f"MoE layer: hidden size {arguments.hidden_size}, {arguments.num_experts} experts of intermediate size "
        f"{arguments.expert_size}, native top-{k}, float32 weights N(0, {arguments.std}^2) "
        f"({expert_weight_bytes(arguments) / MIB:.0f} MiB of expert weights), run on the CPU. Every call gets the "
        f"same {arguments.batch_size} x {arguments.seq_len} = {tokens} unit Gaussian tokens. Times are medians of "
        f"{arguments.repeats} interleaved round{'s' if arguments.repeats != 1 else ''} after one warm-up round.",
        "",
        "Seconds per MoE layer. Native is one native-k forward of the block. Fast and naive profile every k from "
        f"1 to {k} with one iteration (`profile.timing['layer_seconds']`). The max relative difference is "
        "max over k of |D_fast(k) - D_naive(k)| / max over k of D_naive(k).",
        "",
        "| experts implementation | native s | fast s | naive s | fast / native | naive / native | fast / naive "
        "| fast vs naive max rel. difference | experts used | max load / mean load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for results in all_results:
        seconds = results.seconds
        lines.append(
            f"| {results.implementation} | {seconds['native']:.3f} | {seconds['fast']:.3f} | {seconds['naive']:.3f} "
            f"| {seconds['fast'] / seconds['native']:.2f} | {seconds['naive'] / seconds['native']:.2f} "
            f"| {seconds['fast'] / seconds['naive']:.2f} | {results.max_relative_difference:.1e} "
            f"| {results.experts_used} of {arguments.num_experts} | {results.max_load_ratio:.2f} |"
        )

    lines += ["", *memory_lines(arguments, all_results)]

    lines += [
        "",
        f"Expert outputs that the fast path stores, computed two ways on the same tokens (seconds). One call is "
        f"what `lexi_pl.profiling` does: it passes {tokens} x {k} rows, so each expert runs once on all the rows "
        f"routed to it. Per slot, the earlier design kept for comparison, makes {k} calls of the experts module, "
        "each on all tokens with one expert per token, and reads each expert's weights up to k times.",
        "",
        f"| experts implementation | native s | {k} per-slot calls s | one call s | per slot / one call "
        "| per slot / native | one call / native |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for results in all_results:
        seconds = results.seconds
        lines.append(
            f"| {results.implementation} | {seconds['native']:.3f} | {seconds['per_slot']:.3f} "
            f"| {seconds['one_call']:.3f} | {seconds['per_slot'] / seconds['one_call']:.2f} "
            f"| {seconds['per_slot'] / seconds['native']:.2f} | {seconds['one_call'] / seconds['native']:.2f} |"
        )

    lines += ["", *verdict_lines(arguments, all_results)]
    if allocation_output is not None:
        lines += [
            "",
            "Stage 2 allocation on a random profile, from `python benchmarks/bench_allocation.py"
            + (" --repeats 5 --ga-repeats 1" if arguments.quick else "")
            + "`:",
            "",
            allocation_output,
        ]
    return "\n".join(lines)


def memory_lines(arguments: argparse.Namespace, all_results: list[LayerResults]) -> list[str]:
    stored_mib = stored_outputs_bytes(arguments) / MIB
    if not arguments.memory:
        return [
            f"Peak memory: not measured (--no-memory). The fast path keeps {stored_mib:.0f} MiB of float32 expert "
            "outputs per batch."
        ]
    lines = [
        "Peak memory in MiB of one native, fast or naive call, each the first call in a fresh process that has "
        "built the model: how far the process's resident set size rose above its level before the call (Linux `VmHWM`, reset through "
        "/proc/self/clear_refs). The last column is the size of the float32 (k, tokens, hidden) expert outputs "
        f"that the fast path keeps, computed as {arguments.top_k} x {arguments.batch_size * arguments.seq_len} x "
        f"{arguments.hidden_size} x 4 bytes.",
        "",
        "| experts implementation | native MiB | fast MiB | naive MiB | fast path's stored expert outputs MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for results in all_results:
        peaks = results.peak_bytes
        lines.append(
            f"| {results.implementation} | {format_mib(peaks['native'])} | {format_mib(peaks['fast'])} "
            f"| {format_mib(peaks['naive'])} | {stored_mib:.0f} |"
        )
    return lines


def verdict_lines(arguments: argparse.Namespace, all_results: list[LayerResults]) -> list[str]:
    """Return one line per implementation: whether the fast path meets the target, and how its time splits up."""
    lines = []
    k = arguments.top_k
    for results in all_results:
        seconds = results.seconds
        ratio = seconds["fast"] / seconds["native"]
        if ratio <= FAST_TARGET_RATIO:
            lines.append(
                f"- {results.implementation}: the fast path costs {ratio:.2f} native forwards, within the "
                f"{FAST_TARGET_RATIO}x target."
            )
            continue
        lines.append(
            f"- {results.implementation}: the fast path costs {ratio:.2f} native forwards and misses the "
            f"{FAST_TARGET_RATIO}x target. Its one expert call on all {k} slots' rows takes "
            f"{seconds['one_call']:.3f} s ({seconds['one_call'] / seconds['native']:.2f} native forwards); the "
            "router calls at each smaller k, the combinations and input sampling take the rest."
        )
    return lines


def command_line() -> str:
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


def section_text(arguments: argparse.Namespace, report: str) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return "\n".join(
        [
            "## Stage 1 profiling cost (`bench_profiling`)",
            "",
            f"Command: `{command_line()}` ({date}).",
            "",
            f"Machine: {machine_line()}. Absolute seconds hold for this machine and its load during the run only; "
            "compare the ratios, which come from interleaved calls in one run.",
            "",
            report,
        ]
    )


def main() -> None:
    arguments = parse_arguments()
    if arguments.threads is not None:
        torch.set_num_threads(arguments.threads)
    if arguments.memory_of is not None:
        run_memory_child(arguments)
        return
    started = time.perf_counter()
    all_results = [measure_implementation(name, arguments) for name in arguments.implementations]
    # After the timings, so that no subprocess competes with them for the CPUs.
    if arguments.memory:
        for results in all_results:
            results.peak_bytes = {
                call: measure_peak_in_subprocess(arguments, results.implementation, call) for call in MEMORY_CALLS
            }
    allocation_output = None if arguments.skip_allocation else run_allocation_benchmark(arguments.quick)
    report = format_report(arguments, all_results, allocation_output)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(report)
    print(f"\n{machine_line()}; process peak RSS {peak_rss_mib:.0f} MiB; {time.perf_counter() - started:.0f} s in all")
    if arguments.write:
        replace_section(arguments.output, SECTION_NAME, section_text(arguments, report))
        print(f"wrote the {SECTION_NAME} section of {arguments.output}")


if __name__ == "__main__":
    main()
