"""Configs as data: dataclasses filled from YAML files and dotted ``key=value`` overrides.

Every command builds its config with :func:`load_config` and writes the resolved result beside its
outputs with :func:`save_config`, so that a run can always be told apart and repeated.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fmct.errors import ConfigError

T = TypeVar("T")


# --------------------------------------------------------------------------------------------- ingest
@dataclass
class SelectionConfig:
    """Which DICOM series of a study count as the head CT to keep."""

    modality: str = "CT"
    min_slices: int = 20  # fewer slices is a scout, a single-slice export or a dose report
    # Slice thickness (mm) within which series are candidates; outside it they are skipped.
    thickness_range_mm: tuple[float, float] = (0.4, 6.0)
    # When a study holds several candidates: "preferred" keeps one by the rules below, "all" keeps all.
    series: str = "preferred"
    prefer_kernel: str = "soft"  # "soft" (brain/standard kernels), "bone" or "any"
    axial_only: bool = True  # a reformat more than 30 degrees from axial is not a candidate
    # A gap between slices above this multiple of the median spacing is a missing slice.
    max_gap_ratio: float = 1.5
    reject_gaps: bool = True  # False: keep the series and interpolate across the gap

    def __post_init__(self) -> None:
        _require_type(self, str, "modality", "series", "prefer_kernel")
        _require_type(self, bool, "axial_only", "reject_gaps")
        _require_type(self, int, "min_slices")
        _require_numbers(self, "thickness_range_mm", "max_gap_ratio")
        if not self.modality.strip():
            raise ValueError("modality must not be empty")
        if self.min_slices < 2:
            raise ValueError(f"min_slices must be at least 2 (a volume), got {self.min_slices}")
        low, high = self.thickness_range_mm
        if not 0 <= low <= high:
            raise ValueError(
                f"thickness_range_mm must be [low, high] mm with 0 <= low <= high, got {list(self.thickness_range_mm)}"
            )
        _require_choice(self, "series", ("preferred", "all"))
        _require_choice(self, "prefer_kernel", ("soft", "bone", "any"))
        if not self.max_gap_ratio > 1:
            raise ValueError(
                f"max_gap_ratio must be above 1 (a multiple of the median slice spacing), got {self.max_gap_ratio}"
            )


@dataclass
class CanonicalConfig:
    """The fixed grid every scan is resampled to: RAS, isotropic, centred on the head."""

    spacing_mm: float = 1.5
    shape: tuple[int, int, int] = (128, 128, 128)  # 192 mm cube at 1.5 mm
    interpolation: str = "linear"  # "linear" or "nearest"
    # Average neighbouring voxels before downsampling by 2x or more, so noise does not alias.
    antialias: bool = True
    air_hu: int = -1024  # value outside the source field of view and of padding voxels
    # Tissue denser than this (HU) is body; the largest 3D component of it after an opening is the head.
    head_threshold_hu: float = -300.0
    # The cube's top lies this far (mm) above the vertex, so the whole brain down to the skull base fits.
    vertex_margin_mm: float = 12.0

    def __post_init__(self) -> None:
        _require_type(self, str, "interpolation")
        _require_type(self, bool, "antialias")
        _require_type(self, int, "air_hu")
        _require_numbers(self, "spacing_mm", "shape", "head_threshold_hu", "vertex_margin_mm")
        if not 0 < self.spacing_mm <= 20:
            raise ValueError(f"spacing_mm must be in (0, 20] mm, got {self.spacing_mm}")
        if len(self.shape) != 3 or any(not isinstance(n, int) or isinstance(n, bool) or n < 8 for n in self.shape):
            raise ValueError(f"shape must be 3 whole numbers of voxels, each at least 8, got {list(self.shape)}")
        _require_choice(self, "interpolation", ("linear", "nearest"))
        if not -32768 <= self.air_hu <= 0:
            raise ValueError(f"air_hu must be an int16 HU value at or below 0, got {self.air_hu}")
        if not self.air_hu < self.head_threshold_hu < 3000:
            raise ValueError(
                f"head_threshold_hu must lie between air_hu ({self.air_hu}) and 3000 HU, got {self.head_threshold_hu}"
            )
        if not 0 <= self.vertex_margin_mm < self.spacing_mm * min(self.shape):
            raise ValueError(f"vertex_margin_mm must be at least 0 and inside the cube, got {self.vertex_margin_mm}")


@dataclass
class StoreConfig:
    """How the store's volume files are written (reading needs none of it: every file names its codec)."""

    # "lz4hc" (blosc2 LZ4-HC + shuffle: about 2.7x smaller, fast to decode), "zstd" (about 3.0x, half as
    # fast to decode), "lz4" (about 2.1x, the fastest to write) or "npy" (uncompressed); see fmct.codec
    # and BENCHMARKS.md. Lossless, all of them.
    codec: str = "lz4hc"

    def __post_init__(self) -> None:
        from fmct.codec import check_codec  # imported here: blosc2 loads only for a verb that writes volumes

        check_codec(self.codec)


@dataclass
class IngestConfig:
    """``fmct ingest``: which series to keep, the grid to resample them to, and the local source map.

    The pseudonym key is not part of it (``--key FILE`` or ``$FMCT_KEY_FILE``): the config is written
    into the store, the key never is.
    """

    selection: SelectionConfig = field(default_factory=SelectionConfig)
    canonical: CanonicalConfig = field(default_factory=CanonicalConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    # Keep the local map pseudonym -> real path beside the pseudonym key (never in the store): it lets
    # labels keyed by `source` find their scans, and a user find the file behind an errors.csv row.
    source_map: bool = True

    def __post_init__(self) -> None:
        if not all(
            isinstance(section, kind)
            for section, kind in (
                (self.selection, SelectionConfig),
                (self.canonical, CanonicalConfig),
                (self.store, StoreConfig),
            )
        ):
            raise ValueError("selection, canonical and store must be SelectionConfig, CanonicalConfig and StoreConfig")
        _require_type(self, bool, "source_map")


def _require_type(config: Any, kind: type, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{name} must be {kind.__name__}, got {value!r}")


def _require_numbers(config: Any, *names: str) -> None:
    """Finite real numbers (a tuple field: each of its elements)."""
    for name in names:
        value = getattr(config, name)
        for number in value if isinstance(value, (tuple, list)) else [value]:
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
                raise ValueError(f"{name} must hold finite numbers, got {value!r}")


def _require_choice(config: Any, name: str, choices: tuple[str, ...]) -> None:
    if getattr(config, name) not in choices:
        raise ValueError(f"{name} must be {' or '.join(repr(c) for c in choices)}, got {getattr(config, name)!r}")


# ---------------------------------------------------------------------------------------- machinery
def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """Build config ``cls`` from defaults, then the YAML file ``path``, then ``key=value`` overrides.

    ``path`` may also name a config shipped in ``fmct/configs`` (``pretrain_vitb``, ``pretrain_demo``).

    Overrides use dotted keys into nested configs (``canonical.spacing_mm=1.0``); values are parsed as
    YAML (``shape=[96,96,96]``, ``antialias=false``). Unknown keys raise :class:`ConfigError`.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"{path}: cannot read config: {error}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config file must hold a mapping of keys to values")
        values = loaded
    for override in overrides or []:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} is not key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        _set_dotted(values, key.strip(), value)
    return _build(cls, values, prefix="")


PACKAGED_CONFIGS = Path(__file__).parent / "configs"


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A config file: the path itself, else a config shipped with fmct by name (``pretrain_vitb``)."""
    given = Path(path)
    packaged = PACKAGED_CONFIGS / f"{given.name}.yaml"
    if not given.exists() and given.suffix == "" and packaged.exists():
        return packaged
    return given


def to_dict(config: Any) -> dict:
    """The config as plain YAML-friendly data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    from fmct.atomic import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(config), sort_keys=False))


def _set_dotted(values: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = values
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[leaf] = value


def _build(cls: type[T], values: dict, prefix: str) -> T:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(known))})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        default = _field_default(fields[name])
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            # A section's own defaults may differ from its class's (default_factory=lambda: Section(x=1)):
            # overriding one key keeps those. Only the differing keys are carried over, so values that the
            # class derives from others (a ViT's width from its size) are derived afresh.
            own, generic = to_dict(default), to_dict(type(default)())
            value = _merged({k: v for k, v in own.items() if v != generic[k]}, value)
        kwargs[name] = _coerce(hints[name], value, prefix + name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, ConfigError) as error:  # a config's own checks (__post_init__) speak for it
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {error}") from None


def _field_default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _merged(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = (
            _merged(base[key], value) if isinstance(base.get(key), dict) and isinstance(value, dict) else value
        )
    return merged


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(options[0], value, key)
    if origin is tuple:
        args = typing.get_args(hint)
        # A scalar stands for all elements of a tuple of one element type: patch_size=12 -> (12, 12, 12).
        if not isinstance(value, (list, tuple)) and len(set(args)) == 1 and Ellipsis not in args:
            value = [value] * len(args)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, key) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (arg,) = typing.get_args(hint) or (Any,)
        return [_coerce(arg, v, key) for v in value]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads exponents without a dot (1e-6) as strings
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected int, got {value!r}")
    return value
