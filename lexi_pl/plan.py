"""Top-k plan: the number of experts each MoE layer runs, as chosen by Stage 2.

A plan is stored as JSON, never pickled. Checking that a plan fits a model (fingerprint and
layer names) and applying it is the adapter's job, not this module's.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from numbers import Real
from pathlib import Path
from typing import Any

from lexi_pl.profile_table import is_integer_value, read_json_object, write_json_atomic

SUPPORTED_PLAN_FORMAT_VERSIONS = (1,)


def installed_package_version() -> str:
    """Return the installed version of lexi-pl, or "unknown" when it is not installed."""
    try:
        return version("lexi-pl")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class TopKPlan:
    """Per-layer top-k for an MoE model, with what is needed to reproduce and check it.

    ``top_k`` and ``native_top_k`` map the MoE layer module paths to k, in depth order. Both
    must have the same keys in the same order. Construction raises ValueError when a field is
    invalid.
    """

    top_k: dict[str, int]
    """Number of experts each layer runs under the plan."""
    native_top_k: dict[str, int]
    """Number of experts each layer runs in the unmodified model."""
    budget: int
    """Total active experts over all MoE layers, equal to the sum of ``top_k``."""
    method: str
    """Allocation method that produced the plan, for example "dp", "evolutionary" or "uniform"."""
    routing_weights: str = "native"
    """Routing-weight mode of the kept experts, copied from the profiling settings."""
    objective: float | None = None
    """Sum of the (possibly normalised) per-layer deviations at the planned k, if known."""
    normalize: str = "none"
    """Normalisation of the deviations used during allocation: "none" or "base_norm"."""
    profile_settings: dict[str, Any] = field(default_factory=dict)
    """Settings of the profiling run that the plan was computed from."""
    fingerprint: str | None = None
    """Fingerprint of the profiled model."""
    package_version: str = field(default_factory=installed_package_version)
    """Version of lexi-pl that created the plan."""
    format_version: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    """Method details, for example the evolutionary search settings and its gap to the exact optimum."""

    def __post_init__(self) -> None:
        self.validate()

        # Store plain Python numbers, so that NumPy scalars never reach save().
        self.top_k = {name: int(k) for name, k in self.top_k.items()}
        self.native_top_k = {name: int(k) for name, k in self.native_top_k.items()}
        self.budget = int(self.budget)
        if self.objective is not None:
            self.objective = float(self.objective)

    @property
    def total(self) -> int:
        """Total active experts under the plan."""
        return sum(self.top_k.values())

    @property
    def native_total(self) -> int:
        """Total active experts at the native top-k."""
        return sum(self.native_top_k.values())

    @property
    def fraction(self) -> float:
        """Ratio of the plan's total active experts to the native total."""
        return self.total / self.native_total

    def validate(self) -> None:
        """Raise ValueError unless the fields are consistent and every k is a positive integer."""
        if self.format_version not in SUPPORTED_PLAN_FORMAT_VERSIONS:
            raise ValueError(
                f"unsupported top-k plan format_version {self.format_version!r}; this version of lexi-pl reads "
                f"format_version {', '.join(map(str, SUPPORTED_PLAN_FORMAT_VERSIONS))}. "
                "Re-create the plan with lexi_pl.allocation.allocate."
            )
        for field_name in ("top_k", "native_top_k"):
            mapping = getattr(self, field_name)
            if not isinstance(mapping, dict) or not mapping:
                raise ValueError(f"{field_name} must be a non-empty dict from layer name to k")
            for name, k in mapping.items():
                if not isinstance(name, str) or not name:
                    raise ValueError(f"{field_name} keys must be non-empty layer names, found {name!r}")
                if not is_integer_value(k) or k < 1:
                    raise ValueError(f"{field_name}[{name!r}] must be a positive integer, found {k!r}")
        if list(self.top_k) != list(self.native_top_k):
            raise ValueError(
                "top_k and native_top_k must list the same layers in the same order, found "
                f"{list(self.top_k)} and {list(self.native_top_k)}"
            )
        if not is_integer_value(self.budget) or self.budget != self.total:
            raise ValueError(f"budget must equal the sum of top_k ({self.total}), found {self.budget!r}")
        for field_name in ("method", "routing_weights", "normalize", "package_version"):
            if not isinstance(getattr(self, field_name), str):
                raise ValueError(f"{field_name} must be a string, found {getattr(self, field_name)!r}")
        if self.objective is not None and (not isinstance(self.objective, Real) or isinstance(self.objective, bool)):
            raise ValueError(f"objective must be a number or None, found {self.objective!r}")
        if self.fingerprint is not None and not isinstance(self.fingerprint, str):
            raise ValueError(f"fingerprint must be a string or None, found {self.fingerprint!r}")
        for field_name in ("profile_settings", "extra"):
            if not isinstance(getattr(self, field_name), dict):
                raise ValueError(f"{field_name} must be a dict, found {type(getattr(self, field_name)).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """Return the plan as a JSON-compatible dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TopKPlan:
        """Build a plan from ``to_dict`` output, raising ValueError on a missing, unknown or invalid field."""
        if not isinstance(data, dict):
            raise ValueError(f"a top-k plan must be a dict, found {type(data).__name__}")
        if "format_version" not in data:
            raise ValueError("top-k plan is missing the field 'format_version'")
        version_found = data["format_version"]
        if version_found not in SUPPORTED_PLAN_FORMAT_VERSIONS:
            raise ValueError(
                f"unsupported top-k plan format_version {version_found!r}; this version of lexi-pl reads "
                f"format_version {', '.join(map(str, SUPPORTED_PLAN_FORMAT_VERSIONS))}. "
                "Re-create the plan with lexi_pl.allocation.allocate."
            )

        missing = [name for name in ("top_k", "native_top_k", "budget", "method") if name not in data]
        if missing:
            raise ValueError(f"top-k plan is missing the fields {missing}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"top-k plan has unknown fields {unknown}. Known fields are {sorted(known)}.")
        return cls(**data)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan as JSON to ``path`` atomically, creating parent directories, and return the path."""
        self.validate()
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TopKPlan:
        """Read a plan written by ``save``, raising ValueError that names the file if it is invalid."""
        data = read_json_object(path, "top-k plan")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"invalid top-k plan file {path}: {error}") from error

    def table(self) -> str:
        """Return a text table of layer, native k and plan k, ending with the total active experts."""
        header = ("layer", "native k", "plan k")
        rows = [(name, str(self.native_top_k[name]), str(k)) for name, k in self.top_k.items()]
        name_width = max(len(header[0]), *(len(row[0]) for row in rows))
        native_width = max(len(header[1]), *(len(row[1]) for row in rows))
        plan_width = max(len(header[2]), *(len(row[2]) for row in rows))

        lines = [f"{header[0]:<{name_width}}  {header[1]:>{native_width}}  {header[2]:>{plan_width}}"]
        lines.append(f"{'-' * name_width}  {'-' * native_width}  {'-' * plan_width}")
        for name, native, planned in rows:
            lines.append(f"{name:<{name_width}}  {native:>{native_width}}  {planned:>{plan_width}}")
        lines.append(
            f"total active experts: {self.total} of {self.native_total} ({100 * self.fraction:.1f} %)"
        )
        return "\n".join(lines)
