import json
import logging

import pytest
import torch
from lightning.pytorch import Trainer

from lexi_pl.adapter import MoEAdapter
from lexi_pl.callbacks import LExI, MoEThroughput
from lexi_pl.plan import TopKPlan
from tests.lightning_helpers import RandomTokens, TinyMoELM

NATIVE = [4, 4, 4]
# 3 layers with native k 4: 9 of 12 experts at 75 %.
PROFILE = dict(profile_batch_size=2, profile_seq_len=8, profile_iterations=1)


def make_trainer(tmp_path, callbacks, **kwargs) -> Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    options.update(kwargs)
    return Trainer(callbacks=callbacks, **options)


def test_plan_applied_during_validation_and_restored(tmp_path):
    module = TinyMoELM()
    lexi = LExI(fraction=0.75, output_dir=str(tmp_path), **PROFILE)
    make_trainer(tmp_path, [lexi]).validate(module, datamodule=RandomTokens())
    plan_k = list(lexi.plan.top_k.values())
    assert sum(plan_k) == 9
    assert module.seen_k["val"] == [plan_k] * 3
    assert MoEAdapter(module.model).top_k == NATIVE
    saved = TopKPlan.load(tmp_path / "lexi_plan.json")
    assert saved.top_k == lexi.plan.top_k
    assert (tmp_path / "lexi_profile.json").is_file()


def test_native_k_restored_after_failing_step(tmp_path):
    module = TinyMoELM(fail_at_validation_step=1)
    lexi = LExI(average_k=2, output_dir=str(tmp_path), **PROFILE)
    with pytest.raises(RuntimeError, match="failed on purpose"):
        make_trainer(tmp_path, [lexi]).validate(module, datamodule=RandomTokens())
    assert module.seen_k["val"][0] == [2, 2, 2]
    assert MoEAdapter(module.model).top_k == NATIVE
    assert MoEAdapter(module.model).routing_weights == "native"


def test_fit_trains_at_native_k_validates_at_plan(tmp_path):
    module = TinyMoELM()
    lexi = LExI(budget=6, output_dir=str(tmp_path), routing_weights="renormalize", **PROFILE)
    trainer = make_trainer(tmp_path, [lexi], max_epochs=2, limit_train_batches=2, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=RandomTokens())
    plan_k = list(lexi.plan.top_k.values())
    assert sum(plan_k) == 6
    assert module.seen_k["train"] == [NATIVE] * 4
    assert module.seen_k["val"] == [plan_k] * 6
    assert MoEAdapter(module.model).top_k == NATIVE


def test_test_and_predict_stages(tmp_path):
    module = TinyMoELM()
    lexi = LExI(average_k=1, output_dir=str(tmp_path), stages=["test"], **PROFILE)
    trainer = make_trainer(tmp_path, [lexi])
    trainer.test(module, datamodule=RandomTokens())
    trainer.predict(module, datamodule=RandomTokens())
    assert module.seen_k["test"] == [[1, 1, 1]] * 3
    assert module.seen_k["predict"] == [NATIVE] * 3


def test_saved_plan_reloaded(tmp_path):
    module = TinyMoELM()
    first = LExI(fraction=0.5, output_dir=str(tmp_path / "first"), **PROFILE)
    make_trainer(tmp_path, [first]).validate(module, datamodule=RandomTokens())
    second = LExI(plan_path=str(tmp_path / "first" / "lexi_plan.json"), output_dir=str(tmp_path / "second"))
    make_trainer(tmp_path, [second]).validate(module, datamodule=RandomTokens())
    assert second.plan.top_k == first.plan.top_k
    assert module.seen_k["val"][3:] == module.seen_k["val"][:3]


def test_plan_for_other_model_fails_before_first_batch(tmp_path):
    other = LExI(fraction=0.5, output_dir=str(tmp_path / "other"), **PROFILE)
    make_trainer(tmp_path, [other]).validate(TinyMoELM(seed=1), datamodule=RandomTokens())

    module = TinyMoELM(seed=0)
    lexi = LExI(plan_path=str(tmp_path / "other" / "lexi_plan.json"), output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="plan was made for another model"):
        make_trainer(tmp_path, [lexi]).validate(module, datamodule=RandomTokens())
    assert module.seen_k["val"] == []
    assert MoEAdapter(module.model).top_k == NATIVE


def test_infeasible_budget_fails_before_first_batch(tmp_path):
    module = TinyMoELM()
    lexi = LExI(budget=13, output_dir=str(tmp_path), **PROFILE)
    with pytest.raises(ValueError, match=r"budget 13.*\[3, 12\]"):
        make_trainer(tmp_path, [lexi]).validate(module, datamodule=RandomTokens())
    assert module.seen_k["val"] == []


def test_missing_model_attribute_rejected(tmp_path):
    lexi = LExI(fraction=0.5, model_attribute="network", **PROFILE)
    with pytest.raises(ValueError, match=r"TinyMoELM\.network, which is missing"):
        make_trainer(tmp_path, [lexi]).validate(TinyMoELM(), datamodule=RandomTokens())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "needs a plan_path or exactly one of budget, average_k, fraction; got none"),
        ({"budget": 4, "fraction": 0.5}, r"exactly one of .*\['budget', 'fraction'\]"),
        ({"plan_path": "p.json", "budget": 4}, "either plan_path or a budget, not both"),
        ({"budget": 4, "stages": ["fit"]}, r"stages must be among .*\['fit'\]"),
    ],
)
def test_lexi_arguments_validated(arguments, message):
    with pytest.raises(ValueError, match=message):
        LExI(**arguments)


def test_plan_table_logged(tmp_path, caplog):
    module = TinyMoELM()
    with caplog.at_level(logging.INFO):
        make_trainer(tmp_path, [LExI(average_k=2, output_dir=str(tmp_path), **PROFILE)]).validate(
            module, datamodule=RandomTokens()
        )
    assert "model.layers.0.mlp" in caplog.text
    assert "6 of 12" in caplog.text


def test_throughput_in_validate_results(tmp_path):
    module = TinyMoELM()
    throughput = MoEThroughput(warmup_batches=1)
    lexi = LExI(average_k=2, output_dir=str(tmp_path), **PROFILE)
    (results,) = make_trainer(tmp_path, [lexi, throughput]).validate(module, datamodule=RandomTokens(count=10))
    assert results["val/samples"] == 10
    assert results["val/tokens"] == 80
    assert results["val/samples_per_sec"] > 0
    assert results["val/tokens_per_sec"] == pytest.approx(8 * results["val/samples_per_sec"], rel=1e-6)
    assert results["val/active_experts_total"] == 6
    assert results["val/active_experts_per_token"] == 2
    # 3 layers x 2 experts x 2 FLOPs x 3 matrices of 64 x 32 weights per expert, for 8 tokens a sample.
    expected_gflops_per_token = 3 * 2 * 2 * (3 * 64 * 32) / 1e9
    assert results["val/expert_gflops_per_token"] == pytest.approx(expected_gflops_per_token)
    assert results["val/expert_gflops_per_sample"] == pytest.approx(8 * expected_gflops_per_token)


def test_throughput_test_stage_without_lexi(tmp_path):
    module = TinyMoELM()
    (results,) = make_trainer(tmp_path, [MoEThroughput(warmup_batches=0)]).test(
        module, datamodule=RandomTokens(count=7, batch_size=3)
    )
    assert results["test/samples"] == 7
    assert results["test/active_experts_per_token"] == 4


def test_throughput_warns_when_all_batches_are_warmup(tmp_path):
    module = TinyMoELM()
    with pytest.warns(UserWarning, match="not more than warmup_batches=5"):
        (results,) = make_trainer(tmp_path, [MoEThroughput(warmup_batches=5)]).validate(
            module, datamodule=RandomTokens(count=8)
        )
    assert results["val/samples"] == 8


def test_throughput_predict_results(tmp_path):
    throughput = MoEThroughput(warmup_batches=0)
    make_trainer(tmp_path, [throughput]).predict(TinyMoELM(), datamodule=RandomTokens(count=5, batch_size=2))
    assert throughput.results["predict"]["predict/samples"] == 5


def test_profile_cache_reused_between_runs(tmp_path, caplog):
    module = TinyMoELM()
    make_trainer(tmp_path, [LExI(fraction=0.5, output_dir=str(tmp_path), **PROFILE)]).validate(
        module, datamodule=RandomTokens()
    )
    with caplog.at_level(logging.INFO, logger="lexi_pl.profiling"):
        make_trainer(tmp_path, [LExI(fraction=0.75, output_dir=str(tmp_path), **PROFILE)]).validate(
            module, datamodule=RandomTokens()
        )
    assert "reusing the cached sensitivity profile" in caplog.text
    plan = json.loads((tmp_path / "lexi_plan.json").read_text())
    assert plan["budget"] == 9
    assert torch.equal(torch.tensor(MoEAdapter(module.model).top_k), torch.tensor(NATIVE))


def test_missing_plan_file_rejected_when_built(tmp_path):
    with pytest.raises(ValueError, match=r"plan_path '.*missing\.json' is not a file.*or a budget"):
        LExI(plan_path=str(tmp_path / "missing.json"))


def test_infeasible_budget_rejected_before_profiling(tmp_path):
    module = TinyMoELM()
    lexi = LExI(fraction=0.1, output_dir=str(tmp_path), **PROFILE)
    with pytest.raises(ValueError, match=r"fraction in \[0\.25, 1\]"):
        make_trainer(tmp_path, [lexi]).validate(module, datamodule=RandomTokens())
    assert not (tmp_path / "lexi_profile.json").exists()


def test_plan_file_readable_by_others(tmp_path):
    module = TinyMoELM()
    make_trainer(tmp_path, [LExI(average_k=2, output_dir=str(tmp_path), **PROFILE)]).validate(
        module, datamodule=RandomTokens()
    )
    assert (tmp_path / "lexi_plan.json").stat().st_mode & 0o044 == 0o044
