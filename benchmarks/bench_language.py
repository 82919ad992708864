"""Native k against LExI and uniform k on the shipped pydoc MoE LM, measured side by side in one process.

    python benchmarks/bench_language.py            # the whole held-out split, 3 rounds
    python benchmarks/bench_language.py --quick    # 20 blocks, 2 rounds
    python benchmarks/bench_language.py --write    # also replace this script's section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
import transformers
from lightning.pytorch import Callback

from lexi_pl.adapter import MoEAdapter
from lexi_pl.callbacks import LExI
from lexi_pl.data import TextData
from lexi_pl.modules import MoECausalLM
from record import replace_section
from side_by_side import compare, machine_line

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "checkpoints" / "moe_lm_pydoc"


class UniformK(Callback):
    """Run validation with one k in every MoE layer, and restore the native k afterwards."""

    def __init__(self, k: int) -> None:
        self.k = k

    def on_validation_start(self, trainer, pl_module) -> None:
        adapter = MoEAdapter(pl_module.model)
        adapter.set_top_k([self.k] * len(adapter.layers))

    def on_validation_end(self, trainer, pl_module) -> None:
        MoEAdapter(pl_module.model).restore()


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 held-out blocks and 2 rounds")
    parser.add_argument("--rounds", type=int, default=3, help="validation passes per setting (default 3)")
    parser.add_argument("--batch-size", type=int, default=16, help="validation batch size in blocks (default 16)")
    parser.add_argument("--write", action="store_true", help="replace this script's section of BENCHMARKS.md")
    return parser.parse_args()


def main() -> None:
    arguments = parse_arguments()
    if arguments.quick:
        arguments.rounds = 2
    torch.manual_seed(0)
    module = MoECausalLM(model_name_or_path=str(CHECKPOINT))
    data = TextData(
        source="pydoc",
        tokenizer_path=str(CHECKPOINT),
        batch_size=arguments.batch_size,
        val_subset=20 if arguments.quick else None,
    )
    native = MoEAdapter(module.model).native_top_k
    with tempfile.TemporaryDirectory() as folder:
        settings = {
            "native k": list,
            "LExI 75 % (gaussian inputs)": lambda: [LExI(fraction=0.75, output_dir=folder)],
            "LExI 75 % (norm-scaled inputs)": lambda: [
                LExI(fraction=0.75, input_mode="norm_scaled", output_dir=folder)
            ],
            "uniform k = 3 (75 %)": lambda: [UniformK(3)],
            "uniform k = 1 (25 %)": lambda: [UniformK(1)],
        }
        quality = [("perplexity", "val/ppl"), ("next-token acc", "val/acc"), ("expert GFLOPs/token", "val/expert_gflops_per_token")]
        lines, results = compare(module, data, settings, arguments.rounds, "val/tokens_per_sec", quality)

    def median_speed(name: str) -> float:
        return statistics.median(run["val/tokens_per_sec"] for run in results[name])

    lexi, uniform = "LExI 75 % (gaussian inputs)", "uniform k = 3 (75 %)"
    lexi_ppl, uniform_ppl = results[lexi][0]["val/ppl"], results[uniform][0]["val/ppl"]
    verdict = (
        f"At 75 % of the active experts LExI's perplexity is {lexi_ppl:.2f} against {uniform_ppl:.2f} for uniform "
        f"k = 3, so the data-free plan is {'better' if lexi_ppl < uniform_ppl else 'worse'} than lowering k evenly "
        f"on this model, and runs at {median_speed(lexi) / median_speed(uniform):.2f}x the speed of uniform k = 3 "
        "with the same number of active experts."
    )

    command = "python benchmarks/bench_language.py" + (" --quick" if arguments.quick else "")
    tokens = int(results["native k"][0]["val/scored_tokens"])
    report = "\n".join(
        [
            "## pydoc MoE LM: native k against LExI and uniform k (`bench_language`)",
            "",
            f"Command: `{command}`. Shipped checkpoint `checkpoints/moe_lm_pydoc` (OLMoE class, {len(native)} MoE "
            f"layers, 16 experts, native k {native[0]}), {tokens} scored held-out tokens, batch {arguments.batch_size}"
            f" blocks, {arguments.rounds} alternating rounds, {machine_line()}, transformers {transformers.__version__}."
            " Absolute tokens/s hold for this machine only; compare the ratios.",
            "",
            *lines,
            "",
            verdict,
        ]
    )
    print(report)
    if arguments.write:
        replace_section(REPO / "BENCHMARKS.md", "bench_language", report)


if __name__ == "__main__":
    main()
