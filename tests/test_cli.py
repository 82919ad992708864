import subprocess
import sys

import pytest
import yaml

from lexi_pl.cli import main


def write_config(tmp_path, **lexi_arguments):
    config = {
        "seed_everything": 0,
        "model": {"class_path": "tests.lightning_helpers.TinyMoELM"},
        "data": {"class_path": "tests.lightning_helpers.RandomTokens", "init_args": {"count": 6}},
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path / "logs"), "name": "run", "version": 0},
            },
            "callbacks": [
                {"class_path": "lexi_pl.callbacks.MoEThroughput", "init_args": {"warmup_batches": 0}},
                {
                    "class_path": "lexi_pl.callbacks.LExI",
                    "init_args": {"profile_batch_size": 2, "profile_seq_len": 8, **lexi_arguments},
                },
            ],
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_validate_twice_into_same_log_folder(tmp_path):
    config = write_config(tmp_path, fraction=0.75)
    main(["validate", "--config", str(config)])
    main(["validate", "--config", str(config)])
    run_folder = tmp_path / "logs" / "run" / "version_0"
    assert (run_folder / "config.yaml").is_file()
    assert (run_folder / "lexi_plan.json").is_file()
    metrics = (run_folder / "metrics.csv").read_text()
    assert "val/samples_per_sec" in metrics
    assert "val/loss" in metrics


def test_print_config_shows_callback(tmp_path, capsys):
    config = write_config(tmp_path, average_k=2)
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    lexi = printed["trainer"]["callbacks"][1]
    assert lexi["class_path"] == "lexi_pl.callbacks.LExI"
    assert lexi["init_args"]["average_k"] == 2
    assert lexi["init_args"]["method"] == "dp"


def test_config_before_subcommand_explained(tmp_path, capsys):
    config = write_config(tmp_path, average_k=2)
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "validate"])
    assert exit_info.value.code == 2
    assert "Put it after the subcommand" in capsys.readouterr().err


def test_module_entry_point_help():
    result = subprocess.run(
        [sys.executable, "-m", "lexi_pl", "validate", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    assert "--trainer.callbacks" in result.stdout


def test_callback_error_printed_without_traceback(tmp_path, capsys):
    config = write_config(tmp_path, fraction=0.75)
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", str(config), "--trainer.callbacks.init_args.budget", "5"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "error: LExI needs a plan_path or exactly one of budget, average_k, fraction" in error
    assert "Traceback" not in error


def test_infeasible_budget_printed(tmp_path, capsys):
    config = write_config(tmp_path, fraction=1.5)
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", str(config)])
    assert exit_info.value.code == 2
    assert "feasible range [3, 12]" in capsys.readouterr().err
