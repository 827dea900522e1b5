"""Configuration: dataclasses mirroring the TOML tables ``[data] [model] [prior] [train] [eval]``.

A config file is read with :func:`load_config`; ``--set section.key=value`` overrides are applied
with :func:`apply_overrides` (the value is read as a TOML value, a bare word as a string).
Unknown tables and keys are rejected by name, with the list of valid ones. The ``[prior]`` table
holds ``name`` plus the prior's own keyword arguments, which the prior registry validates.
Tables that other commands own (``[compare]``) are kept aside and ignored by ``train``.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import ConfigError

__all__ = [
    "DataConfig",
    "ModelConfig",
    "PriorConfig",
    "TrainConfig",
    "EvalConfig",
    "Config",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "parse_override",
    "dump_toml",
]

# Tables that belong to other commands; `train` keeps them but does not interpret them.
PASSIVE_TABLES = ("compare",)


@dataclass
class DataConfig:
    name: str = "mnist"  # mnist | fashion_mnist | digits
    root: str | None = None  # else $PRIORVAE_DATA, else the user cache folder
    download: bool = True


@dataclass
class ModelConfig:
    family: str = "mlp"  # mlp | conv
    hidden: list[int] = field(default_factory=lambda: [300, 300])
    latent_dim: int = 40
    activation: str = "gated"  # gated | relu
    logvar_min: float = -6.0  # encoder log-variance bounds (Hardtanh), as in the VampPrior code
    logvar_max: float = 2.0
    channels: list[int] = field(default_factory=lambda: [32, 64])  # conv family only


@dataclass
class PriorConfig:
    name: str = "standard_normal"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 100
    lr: float = 5e-4
    warmup_epochs: int = 0
    patience: int = 50
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    val_batch_size: int = 1000
    image_every: int = 5  # epochs between image grids in TensorBoard
    diagnostics_every: int = 10  # epochs between prior-vs-aggregate diagnostics (0: never)
    grad_norm: str = "none"  # none | unit: each parameter's gradient scaled to unit L2 norm
    #                          before Adam ("AdamNormGrad" of the VampPrior code)
    precision: str = "float32"  # float32 | bf16 (autocast for training; evaluation is float32)
    compile: bool = False  # torch.compile the forward/backward (CUDA: with CUDA graphs)


@dataclass
class EvalConfig:
    iw_samples: int = 5000
    batch_size: int = 100


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    extra: dict[str, Any] = field(default_factory=dict)  # passive tables, e.g. [compare]

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict in TOML shape (prior kwargs flattened into ``[prior]``)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = dataclasses.asdict(getattr(self, f.name))
            if f.name == "prior":
                value = {"name": value["name"], **value["kwargs"]}
            out[f.name] = {k: v for k, v in value.items() if v is not None}
        out.update(self.extra)
        return out


_TABLES = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=3, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _check_type(table: str, key: str, value: Any, default: Any, annotation: str) -> Any:
    where = f"[{table}] {key}"
    if "list[int]" in annotation:
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{where} must be a list of integers, got {value!r}")
        return value
    if isinstance(default, bool) or annotation == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if "str" in annotation:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a :class:`Config` from a nested dict, rejecting unknown tables and keys by name."""
    valid_tables = [*_TABLES, "prior", *PASSIVE_TABLES]
    cfg = Config()
    for table, body in raw.items():
        if table not in valid_tables:
            raise ConfigError(
                f"unknown table [{table}]{_suggest(table, valid_tables)}; "
                f"valid tables: {', '.join('[' + t + ']' for t in valid_tables)}"
            )
        if not isinstance(body, dict):
            raise ConfigError(f"[{table}] must be a table, got {body!r}")
        if table in PASSIVE_TABLES:
            cfg.extra[table] = dict(body)
            continue
        if table == "prior":
            body = dict(body)
            name = body.pop("name", "standard_normal")
            if not isinstance(name, str):
                raise ConfigError(f"[prior] name must be a string, got {name!r}")
            cfg.prior = PriorConfig(name=name, kwargs=body)
            continue
        cls = _TABLES[table]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        defaults = cls()
        values = {}
        for key, value in body.items():
            if key not in fields:
                names = list(fields)
                raise ConfigError(
                    f"unknown key '{key}' in [{table}]{_suggest(key, names)}; "
                    f"valid keys: {', '.join(names)}"
                )
            values[key] = _check_type(
                table, key, value, getattr(defaults, key), str(fields[key].type)
            )
        setattr(cfg, table, dataclasses.replace(defaults, **values))
    return cfg


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parse ``section.key=value``; the value is a TOML value, or a bare word as a string."""
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    path, value_text = text.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {value_text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text.strip()
    return parts[0], parts[1], value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the nested dict ``raw`` with ``--set`` overrides applied."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for text in overrides:
        table, key, value = parse_override(text)
        out.setdefault(table, {})[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML config file (or the defaults when ``path`` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return config_from_dict(apply_overrides(raw, overrides or []))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} as TOML")


def dump_toml(data: dict[str, Any]) -> str:
    """Write a nested dict of tables (one level, scalar or list values) as TOML text."""
    lines = []
    for table, body in data.items():
        lines.append(f"[{table}]")
        for key, value in body.items():
            if value is None:
                continue
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
