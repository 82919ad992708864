"""The LExI callback: apply a per-layer top-k plan while Lightning evaluates, and restore the native k after."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lexi_pl.adapter import MoEAdapter
from lexi_pl.allocation import allocate, check_budget
from lexi_pl.paths import default_cache_dir
from lexi_pl.plan import TopKPlan
from lexi_pl.profiling import profile_sensitivity

log = logging.getLogger(__name__)


def default_profile_cache() -> Path:
    """Return the folder of cached sensitivity profiles, ``profiles`` inside lexi-pl's cache folder."""
    return default_cache_dir() / "profiles"

Stage = Literal["validate", "test", "predict"]
PLAN_FILE = "lexi_plan.json"
PROFILE_FILE = "lexi_profile.json"


class LExI(Callback):
    r"""Evaluate an MoE model with a per-layer top-k chosen by LExI, and restore the native k afterwards.

    At setup the callback finds the MoE model at ``pl_module.<model_attribute>``, then either loads ``plan_path``
    or builds a plan: it profiles every MoE layer from random inputs (reusing a cached profile for the same model
    fingerprint and settings) and allocates the budget by exact dynamic programming (or the method given). At the
    start of each stage it acts in, it applies the plan and logs the per-layer k; at the end of the stage, and when
    the stage fails, it restores every layer's native k and routing weights. Inside ``fit``, validation loops run
    at the plan's k and training steps at the native k.

    Example::

        trainer = Trainer(callbacks=[LExI(fraction=0.75)])
        trainer.validate(model, datamodule=data)

    Args:
        plan_path: a plan file (JSON) to load instead of profiling. A plan made for another model is rejected.
        budget: total active experts over all MoE layers.
        average_k: budget as a mean k per MoE layer.
        fraction: budget as a fraction of the native total of active experts (0.75 keeps 75 %).
        method: allocation method: "dp" (exact), "evolutionary" (the LExI paper's genetic search) or "uniform".
        routing_weights: how the selected experts are weighted when k is below native: "native", "renormalize"
            or "none". The same policy is used while profiling and while evaluating.
        normalize: "none" or "base_norm" (divide each layer's sensitivity by its output norm before allocating).
        k_min: lowest k any layer may get.
        input_mode: profiling inputs: "gaussian" or "norm_scaled".
        profile_batch_size: sequences per random profiling batch.
        profile_seq_len: tokens per random profiling sequence.
        profile_iterations: random batches averaged per layer.
        seed: seed of the profiling inputs and of the evolutionary search.
        output_dir: folder for the plan and profile files; default the trainer's log folder.
        cache_dir: folder of cached profiles, reused across runs for the same model fingerprint and profiling
            settings; default ``$LEXI_PL_CACHE/profiles`` or ``~/.cache/lexi-pl/profiles``.
        stages: stages the plan is applied in.
        model_attribute: attribute of the LightningModule that holds the MoE model.

    Raises:
        ValueError: when built: none or several budgets with no plan file, or a plan_path that is not a file.
            At setup, before the first batch (and before profiling): an infeasible budget, a plan made for
            another model, or a model with no MoE layer.
    """

    def __init__(
        self,
        plan_path: str | None = None,
        budget: int | None = None,
        average_k: float | None = None,
        fraction: float | None = None,
        method: Literal["dp", "evolutionary", "uniform"] = "dp",
        routing_weights: Literal["native", "renormalize", "none"] = "native",
        normalize: Literal["none", "base_norm"] = "none",
        k_min: int = 1,
        input_mode: Literal["gaussian", "norm_scaled"] = "gaussian",
        profile_batch_size: int = 4,
        profile_seq_len: int = 128,
        profile_iterations: int = 4,
        seed: int = 0,
        output_dir: str | None = None,
        cache_dir: str | None = None,
        stages: list[Stage] | None = None,
        model_attribute: str = "model",
    ) -> None:
        budgets = {"budget": budget, "average_k": average_k, "fraction": fraction}
        given = [name for name, value in budgets.items() if value is not None]
        if plan_path is None and len(given) != 1:
            raise ValueError(
                f"LExI needs a plan_path or exactly one of budget, average_k, fraction; got {given or 'none'}"
            )
        if plan_path is not None and given:
            raise ValueError(f"LExI takes either plan_path or a budget, not both (got plan_path and {given})")
        if plan_path is not None and not Path(plan_path).is_file():
            raise ValueError(
                f"LExI plan_path {plan_path!r} is not a file; give the path of a plan JSON written by an earlier run "
                "(lexi_plan.json in its log folder), or a budget to make a new plan"
            )
        stages = ["validate", "test", "predict"] if stages is None else list(stages)
        unknown = [stage for stage in stages if stage not in ("validate", "test", "predict")]
        if unknown:
            raise ValueError(f"stages must be among 'validate', 'test', 'predict'; got {unknown}")
        self.plan_path = plan_path
        self.budgets = {name: value for name, value in budgets.items() if value is not None}
        self.method = method
        self.routing_weights = routing_weights
        self.normalize = normalize
        self.k_min = k_min
        self.profile_settings: dict[str, Any] = dict(
            input_mode=input_mode,
            batch_size=profile_batch_size,
            seq_len=profile_seq_len,
            iterations=profile_iterations,
            seed=seed,
            routing_weights=routing_weights,
        )
        self.seed = seed
        self.output_dir = output_dir
        self.cache_dir = cache_dir
        self.stages = stages
        self.model_attribute = model_attribute
        self.plan: TopKPlan | None = None
        self.adapter: MoEAdapter | None = None
        self._active = False
        self._warned_stale_plan = False

    # setup: everything that can fail does so here, before the first batch

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.adapter = MoEAdapter(self._moe_model(pl_module))
        # trainer.log_dir is a collective call with several processes, so every rank must call it here.
        output_dir = self._output_dir(trainer)
        self.plan = self._plan_on_every_rank(trainer, output_dir)
        self.adapter.check_plan(self.plan)
        if trainer.is_global_zero and output_dir is not None:
            self.plan.save(output_dir / PLAN_FILE)
            rank_zero_info(f"LExI plan written to {output_dir / PLAN_FILE}")

    def _plan_on_every_rank(self, trainer: Trainer, output_dir: Path | None) -> TopKPlan:
        """Make the plan on rank zero and send it to every other rank, so all ranks apply the same k.

        An error on rank zero (a bad plan file, an infeasible budget) is sent along too and raised on every rank,
        so no rank waits forever for a plan.
        """
        message: dict[str, Any] | None = None
        if trainer.is_global_zero:
            try:
                if self.plan_path is not None:
                    plan = TopKPlan.load(self.plan_path)
                else:
                    plan = self._build_plan(trainer, output_dir)
                self.adapter.check_plan(plan)
                message = {"plan": plan.to_dict()}
            except Exception as error:
                if trainer.world_size == 1:
                    raise
                message = {"error": f"{type(error).__name__} on rank 0: {error}"}
        if trainer.world_size > 1:
            message = trainer.strategy.broadcast(message, src=0)
        assert message is not None
        if "error" in message:
            raise ValueError(message["error"])
        return TopKPlan.from_dict(message["plan"])

    def _moe_model(self, pl_module: LightningModule) -> nn.Module:
        model = getattr(pl_module, self.model_attribute, None)
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"LExI looks for the MoE model at {type(pl_module).__name__}.{self.model_attribute}, which is "
                f"{'missing' if model is None else type(model).__name__}; store the model there or pass "
                "model_attribute='<attribute name>'"
            )
        return model

    def _output_dir(self, trainer: Trainer) -> Path | None:
        folder = self.output_dir or trainer.log_dir or trainer.default_root_dir
        return Path(folder) if folder else None

    def _build_plan(self, trainer: Trainer, output_dir: Path | None) -> TopKPlan:
        assert self.adapter is not None
        # Reject an infeasible budget before profiling, which can take minutes on a large model.
        check_budget(self.adapter.native_top_k, k_min=self.k_min, **self.budgets)
        cache_dir = self.cache_dir or default_profile_cache()
        profile = profile_sensitivity(
            self.adapter,
            cache_dir=cache_dir,
            progress=trainer.is_global_zero and trainer.progress_bar_callback is not None,
            **self.profile_settings,
        )
        if trainer.is_global_zero and output_dir is not None:
            profile.save(output_dir / PROFILE_FILE)
        options = {"seed": self.seed} if self.method == "evolutionary" else {}
        return allocate(
            profile, method=self.method, k_min=self.k_min, normalize=self.normalize, **self.budgets, **options
        )

    # apply at the start of a stage, restore at its end or when it fails

    def _apply(self, trainer: Trainer, stage: Stage) -> None:
        if stage not in self.stages or self.plan is None or self.adapter is None:
            return
        check_fingerprint = True
        if trainer.state.fn == "fit" and self.plan.fingerprint != self.adapter.fingerprint():
            # Training moved the router weights since the plan was made.
            if self.plan_path is None:
                rank_zero_info("LExI: the router weights changed since the plan was made; profiling again")
                self.plan = self._build_plan(trainer, self._output_dir(trainer))
            else:
                if not self._warned_stale_plan:
                    rank_zero_warn(
                        f"LExI: applying {self.plan_path} although training changed the router weights since it "
                        "was made; give a budget instead of a plan file to re-plan at each validation"
                    )
                    self._warned_stale_plan = True
                check_fingerprint = False
        self.adapter.apply(self.plan, check_fingerprint=check_fingerprint)
        self._active = True
        if not trainer.sanity_checking:
            rank_zero_info(f"LExI plan applied for {stage} ({self.plan.method}, {self.plan.routing_weights} "
                           f"routing weights):\n{self.plan.table()}")

    def _restore(self) -> None:
        if self._active and self.adapter is not None:
            self.adapter.restore()
            self._active = False

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply(trainer, "validate")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply(trainer, "test")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply(trainer, "predict")

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()
