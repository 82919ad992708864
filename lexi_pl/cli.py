"""The `lightning` command: a LightningCLI with the subcommands fit, validate, test and predict.

Lightning 2.6 installs no `lightning` console script, so lexi-pl provides one (and `python -m lexi_pl`). Configs pick
the model and data classes with ``class_path`` / ``init_args`` (subclass mode), for example::

    lightning validate --config configs/vision/vmoe_mnist_lexi.yaml
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

SUBCOMMANDS = ("fit", "validate", "test", "predict")


class LExICLI(LightningCLI):
    """LightningCLI in subclass mode that may reuse a log folder (the saved config is overwritten)."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        super().__init__(
            model_class=LightningModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )


def _config_before_subcommand(args: Sequence[str]) -> bool:
    for arg in args:
        if arg in SUBCOMMANDS:
            return False
        if arg in ("-c", "--config") or arg.startswith("--config="):
            return True
    return False


def main(args: Sequence[str] | None = None) -> None:
    """Run the command line with `args` (default: sys.argv[1:])."""
    given = list(sys.argv[1:] if args is None else args)
    if _config_before_subcommand(given):
        sys.stderr.write(
            "error: --config was given before the subcommand. Put it after the subcommand, for example:\n"
            "  lightning validate --config config.yaml\n"
        )
        raise SystemExit(2)
    # LightningCLI reads sys.argv itself when args is None; passing both makes it warn.
    try:
        LExICLI(args=None if args is None else given)
    except ValueError as error:
        if os.environ.get("LEXI_PL_TRACEBACK"):
            raise
        # jsonargparse wraps errors raised while it builds the callbacks in long messages; show the original one.
        sys.stderr.write(f"error: {_root_message(error)}\n(set LEXI_PL_TRACEBACK=1 to see the traceback)\n")
        raise SystemExit(2) from None


def _root_message(error: BaseException) -> str:
    """Return the message of the innermost ValueError that `error` was raised from."""
    innermost = error
    current: BaseException | None = error
    while current is not None:
        if isinstance(current, ValueError):
            innermost = current
        current = current.__cause__ or current.__context__
    return str(innermost)


if __name__ == "__main__":
    main()
