"""Sensitivity profile: the per-layer output deviations that Stage 1 measures and Stage 2 allocates from.

For each MoE layer j and each k in 1..native_top_k[j], ``deltas[j][k - 1]`` is the mean Frobenius
norm ||Y_k - Y_native|| of the MoE block output when the router keeps k experts instead of its
native k. The profile is stored as JSON so that it can be inspected and diffed, and never pickled.

This module also contains the JSON file helpers that ``lexi_pl.plan`` uses.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any

SUPPORTED_PROFILE_FORMAT_VERSIONS = (1,)


def write_json_atomic(path: str | os.PathLike[str], data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON to ``path`` and return the path.

    Missing parent directories are created. The text goes to a temporary file in the same
    directory, which ``os.replace`` then moves over ``path``, so a failed write leaves any
    previous file intact and never leaves a partial one. NaN and infinity are rejected because
    they are not valid JSON.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"cannot write {path}: the data is not JSON-serialisable ({error}). "
            "Settings, timing and extra entries must be str, int, float, bool, None, list or dict."
        ) from error

    descriptor, temporary_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file readable by its owner only; give it the permissions of an ordinary file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary_name, 0o666 & ~umask)
        os.replace(temporary_name, path)
    except BaseException:
        Path(temporary_name).unlink(missing_ok=True)
        raise
    return path


def read_json_object(path: str | os.PathLike[str], kind: str) -> dict[str, Any]:
    """Read a JSON object from ``path``, raising ValueError that names the file if it is not one.

    ``kind`` names the kind of file in the message, for example "top-k plan".
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"invalid {kind} file {path}: not UTF-8 text ({error})") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"invalid {kind} file {path}: not valid JSON ({error}). The file may be truncated or corrupt, "
            "so re-create it."
        ) from error
    if not isinstance(data, dict):
        raise ValueError(f"invalid {kind} file {path}: expected a JSON object, found {type(data).__name__}")
    return data


def is_integer_value(value: Any) -> bool:
    """Return whether ``value`` is an integer and not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SensitivityProfile:
    """Per-layer sensitivity of an MoE model to running fewer experts than its native top-k.

    All per-layer lists are in depth order and have one entry per MoE layer. Construction
    validates the shapes and values and raises ValueError on the first problem found.
    """

    layer_names: list[str]
    """Module paths of the MoE layers, in depth order."""
    native_top_k: list[int]
    """Number of experts each layer's router selects in the unmodified model."""
    max_top_k: list[int]
    """Largest k the model family allows per layer, usually at least the native k."""
    num_experts: list[int]
    """Number of routed experts per layer."""
    deltas: list[list[float]]
    """Mean ||Y_k - Y_native||_F of layer j at ``deltas[j][k - 1]``, for k = 1..native_top_k[j].

    The last entry of each row is 0 because it compares the native output with itself.
    """
    base_norms: list[float]
    """Mean ||Y_native||_F per layer, used to normalise the deltas on request."""
    fingerprint: str
    """Fingerprint of the profiled model, checked when a plan is applied."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Profiling settings (batch, seq, iterations, seed, dtype, device, routing_weights, input_mode, ...)."""
    timing: dict[str, Any] = field(default_factory=dict)
    """Profiling run times, for example seconds per layer."""
    format_version: int = 1

    def __post_init__(self) -> None:
        for field_name in ("layer_names", "native_top_k", "max_top_k", "num_experts", "deltas", "base_norms"):
            if isinstance(getattr(self, field_name), tuple):
                setattr(self, field_name, list(getattr(self, field_name)))
        if isinstance(self.deltas, list):
            self.deltas = [list(row) if isinstance(row, tuple) else row for row in self.deltas]
        self.validate()

        # Store plain Python numbers, so that NumPy scalars (float32 has no JSON form) never reach save().
        for field_name in ("native_top_k", "max_top_k", "num_experts"):
            setattr(self, field_name, [int(value) for value in getattr(self, field_name)])
        self.deltas = [[float(delta) for delta in row] for row in self.deltas]
        self.base_norms = [float(norm) for norm in self.base_norms]

    @property
    def num_layers(self) -> int:
        """Number of MoE layers."""
        return len(self.layer_names)

    @property
    def native_total(self) -> int:
        """Total active experts over all MoE layers at the native top-k."""
        return sum(self.native_top_k)

    def validate(self) -> None:
        """Raise ValueError unless the fields have consistent shapes and valid values."""
        if self.format_version not in SUPPORTED_PROFILE_FORMAT_VERSIONS:
            raise ValueError(
                f"unsupported sensitivity profile format_version {self.format_version!r}; this version of "
                f"lexi-pl reads format_version {_format_versions(SUPPORTED_PROFILE_FORMAT_VERSIONS)}. "
                "Re-run the profiling to create a profile in a supported format."
            )

        if not isinstance(self.layer_names, list) or not self.layer_names:
            raise ValueError("layer_names must be a non-empty list of MoE layer module paths")
        for name in self.layer_names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"layer_names must contain non-empty strings, found {name!r}")
        if len(set(self.layer_names)) != len(self.layer_names):
            duplicates = sorted({name for name in self.layer_names if self.layer_names.count(name) > 1})
            raise ValueError(f"layer_names must be unique, found duplicates {duplicates}")

        layer_count = len(self.layer_names)
        for field_name in ("native_top_k", "max_top_k", "num_experts", "deltas", "base_norms"):
            values = getattr(self, field_name)
            if not isinstance(values, list) or len(values) != layer_count:
                found = len(values) if isinstance(values, list) else type(values).__name__
                raise ValueError(
                    f"{field_name} must be a list with one entry per MoE layer ({layer_count}), found {found}"
                )

        for index, name in enumerate(self.layer_names):
            self._validate_layer(index, name)

        if not isinstance(self.fingerprint, str):
            raise ValueError(f"fingerprint must be a string, found {type(self.fingerprint).__name__}")
        for field_name in ("settings", "timing"):
            if not isinstance(getattr(self, field_name), dict):
                raise ValueError(f"{field_name} must be a dict, found {type(getattr(self, field_name)).__name__}")

    def _validate_layer(self, index: int, name: str) -> None:
        native = self.native_top_k[index]
        family_max = self.max_top_k[index]
        experts = self.num_experts[index]
        for field_name, value in (("num_experts", experts), ("native_top_k", native), ("max_top_k", family_max)):
            if not is_integer_value(value) or value < 1:
                raise ValueError(f"{field_name} of layer {name!r} must be a positive integer, found {value!r}")
        if native > experts:
            raise ValueError(f"native_top_k {native} of layer {name!r} exceeds its num_experts {experts}")
        if family_max > experts:
            raise ValueError(f"max_top_k {family_max} of layer {name!r} exceeds its num_experts {experts}")

        layer_deltas = self.deltas[index]
        if not isinstance(layer_deltas, list) or len(layer_deltas) != native:
            found = len(layer_deltas) if isinstance(layer_deltas, list) else type(layer_deltas).__name__
            raise ValueError(
                f"deltas of layer {name!r} must list one value per k = 1..{native} (its native top-k), found {found}"
            )
        for k, delta in enumerate(layer_deltas, start=1):
            if not _is_finite_number(delta) or delta < 0:
                raise ValueError(f"deltas of layer {name!r} at k={k} must be a finite number >= 0, found {delta!r}")
        if layer_deltas[-1] != 0:
            raise ValueError(
                f"deltas of layer {name!r} at its native k={native} must be 0 because the output is compared "
                f"with itself, found {layer_deltas[-1]!r}"
            )

        base_norm = self.base_norms[index]
        if not _is_finite_number(base_norm) or base_norm < 0:
            raise ValueError(f"base_norms of layer {name!r} must be a finite number >= 0, found {base_norm!r}")

    def to_dict(self) -> dict[str, Any]:
        """Return the profile as a JSON-compatible dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SensitivityProfile:
        """Build a profile from ``to_dict`` output, raising ValueError on a missing, unknown or invalid field."""
        if not isinstance(data, dict):
            raise ValueError(f"a sensitivity profile must be a dict, found {type(data).__name__}")
        version = data.get("format_version")
        if version not in SUPPORTED_PROFILE_FORMAT_VERSIONS:
            raise ValueError(
                f"unsupported sensitivity profile format_version {version!r}; this version of lexi-pl reads "
                f"format_version {_format_versions(SUPPORTED_PROFILE_FORMAT_VERSIONS)}. "
                "Re-run the profiling to create a profile in a supported format."
            )

        required = ("layer_names", "native_top_k", "max_top_k", "num_experts", "deltas", "base_norms", "fingerprint")
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"sensitivity profile is missing the fields {missing}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"sensitivity profile has unknown fields {unknown}. Known fields are {sorted(known)}.")
        return cls(**data)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the profile as JSON to ``path`` atomically and return the path."""
        self.validate()
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SensitivityProfile:
        """Read a profile written by ``save``, raising ValueError that names the file if it is invalid."""
        data = read_json_object(path, "sensitivity profile")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"invalid sensitivity profile file {path}: {error}") from error


def _format_versions(versions: tuple[int, ...]) -> str:
    return ", ".join(str(version) for version in versions)
