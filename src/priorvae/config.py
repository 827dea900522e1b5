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
import math
import re
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
    "validate",
    "validate_value",
    "describe",
    "TABLES",
    "plugin_tables",
    "pin_plugins",
    "resolve_plugins",
]

# Tables that belong to other commands; `train` keeps them but does not interpret them.
PASSIVE_TABLES = ("compare",)
# [prior] keys that priorvae owns; every other key is an argument of the prior
PRIOR_RESERVED = ("name", "file_sha256")


def option(default: Any, *, choices: tuple | None = None, low: float | None = None,
           high: float | None = None, low_open: bool = False, pattern: str | None = None,
           item_low: int | None = None, nonempty: bool = False, doc: str = ""):
    """A config field with its declared domain: ``choices`` (allowed values), ``low``/``high``
    (bounds; ``low_open`` excludes ``low``), ``pattern`` (regular expression for strings),
    ``item_low`` and ``nonempty`` (lists). :func:`validate_value` enforces them."""
    meta = {"choices": choices, "low": low, "high": high, "low_open": low_open,
            "pattern": pattern, "item_low": item_low, "nonempty": nonempty, "doc": doc}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    """``[data]``: the data set's name, the keys every data set shares, and (``kwargs``) the
    data set's own keys, which :func:`priorvae.datasets.build_dataset` checks."""

    name: str = option("mnist", pattern=r"[A-Za-z_][\w.\-/\\:]*",
                       doc="a registered data set (priorvae.datasets.list_datasets())")
    root: str | None = option(None, doc="else $PRIORVAE_DATA, else the user cache folder")
    download: bool = option(True)
    # a file.py:Class data set: the file's hash when it was chosen
    file_sha256: str | None = option(None, pattern=r"[0-9a-f]{64}", doc="64 hex digits")
    kwargs: dict[str, Any] = field(default_factory=dict)  # the data set's own keys


@dataclass
class ModelConfig:
    family: str = option("mlp", choices=("mlp", "conv"))
    hidden: list[int] = option([300, 300], item_low=1, nonempty=True)
    latent_dim: int = option(40, low=1, high=4096)
    activation: str = option("gated", choices=("gated", "relu"))
    # encoder log-variance bounds (Hardtanh), as in the VampPrior code
    logvar_min: float = option(-6.0, low=-30.0, high=30.0)
    logvar_max: float = option(2.0, low=-30.0, high=30.0)
    channels: list[int] = option([32, 64], item_low=1, nonempty=True, doc="conv family only")


@dataclass
class PriorConfig:
    name: str = "standard_normal"
    kwargs: dict[str, Any] = field(default_factory=dict)
    file_sha256: str | None = None  # a file.py:Class prior: the file's hash when it was chosen


@dataclass
class TrainConfig:
    epochs: int = option(100, low=1)
    batch_size: int = option(100, low=1)
    lr: float = option(5e-4, low=0.0, low_open=True, high=10.0)
    warmup_epochs: int = option(0, low=0)
    patience: int = option(50, low=0, doc="0: no early stopping")
    seed: int = option(0, low=0, high=2**63 - 1)
    device: str = option("auto", pattern=r"auto|cpu|cuda(:\d+)?|mps",
                         doc="auto | cpu | cuda | cuda:N | mps")
    val_batch_size: int = option(1000, low=1)
    image_every: int = option(5, low=0, doc="epochs between image grids (0: never)")
    diagnostics_every: int = option(10, low=0, doc="epochs between diagnostics (0: never)")
    # unit: each parameter's gradient scaled to unit L2 norm before Adam ("AdamNormGrad")
    grad_norm: str = option("none", choices=("none", "unit"))
    # bf16: autocast for training; evaluation is float32
    precision: str = option("float32", choices=("float32", "bf16"))
    compile: bool = option(False, doc="torch.compile the forward/backward (CUDA: CUDA graphs)")


@dataclass
class EvalConfig:
    iw_samples: int = option(5000, low=1)
    batch_size: int = option(100, low=1)


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
                value = {"name": value["name"], **value["kwargs"],
                         "file_sha256": value["file_sha256"]}
            elif f.name == "data":
                value = {**{k: v for k, v in value.items() if k != "kwargs"}, **value["kwargs"]}
            out[f.name] = {k: v for k, v in value.items() if v is not None}
        out.update(self.extra)
        return out


TABLES = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=3, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def describe(f: dataclasses.Field) -> str:
    """What a field accepts, in words (for error messages and ``--help``)."""
    m, kind = f.metadata, str(f.type)
    if m.get("choices"):
        return "one of " + ", ".join(repr(c) for c in m["choices"])
    if "list[int]" in kind:
        low = m.get("item_low")
        return ("a non-empty " if m.get("nonempty") else "a ") + "list of integers" + (
            f" >= {low}" if low is not None else "")
    if kind == "bool":
        return "true or false"
    if m.get("pattern"):
        return m.get("doc") or f"a string matching {m['pattern']}"
    base = {"int": "an integer", "float": "a finite number"}.get(kind, "a string")
    low, high = m.get("low"), m.get("high")
    if low is not None and high is not None:
        return f"{base} in {'(' if m.get('low_open') else '['}{low:g}, {high:g}]" \
            if kind == "float" else f"{base} in [{low}, {high}]"
    if low is not None:
        return f"{base} {'>' if m.get('low_open') else '>='} {low:g}"
    return base


def validate_value(table: str, f: dataclasses.Field, value: Any) -> Any:
    """``value`` for field ``f`` of ``[table]`` if it lies in the declared domain, else a
    :class:`ConfigError` of one line naming ``[table] key`` and what is accepted."""
    m, kind = f.metadata, str(f.type)

    def bad() -> ConfigError:
        return ConfigError(f"[{table}] {f.name} must be {describe(f)}, got {value!r}")

    if value is None and "None" in kind:
        return None
    if "list[int]" in kind:
        if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise bad()
        if (m.get("nonempty") and not value) or (
                m.get("item_low") is not None and any(v < m["item_low"] for v in value)):
            raise bad()
        return list(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad()
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise bad()
        value = float(value)
    elif not isinstance(value, str):
        raise bad()
    if m.get("choices") and value not in m["choices"]:
        raise ConfigError(f"[{table}] {f.name} must be {describe(f)}, got {value!r}"
                          f"{_suggest(str(value), [str(c) for c in m['choices']])}")
    if m.get("pattern") and not re.fullmatch(m["pattern"], value):
        raise bad()
    low, high = m.get("low"), m.get("high")
    if low is not None and (value < low or (m.get("low_open") and value == low)):
        raise bad()
    if high is not None and value > high:
        raise bad()
    return value


def validate(cfg: Config) -> Config:
    """Every field of every table in its declared domain, and the rules that tie fields
    together; raises a one-line :class:`ConfigError` for the first violation."""
    for table, cls in TABLES.items():
        body = getattr(cfg, table)
        for f in dataclasses.fields(cls):  # values come back normalised (int -> float)
            if f.name != "kwargs":  # a plug-in's own keys: the plug-in checks them
                setattr(body, f.name, validate_value(table, f, getattr(body, f.name)))
    if ":" not in cfg.data.name:  # a file.py:Class / module:Class spec is imported later
        from .datasets import list_datasets

        known = list_datasets()
        if cfg.data.name not in known:
            raise ConfigError(f"[data] name must be one of {', '.join(map(repr, known))}, got "
                              f"{cfg.data.name!r}{_suggest(cfg.data.name, known)}")
    if cfg.model.logvar_min >= cfg.model.logvar_max:
        raise ConfigError(f"[model] logvar_min ({cfg.model.logvar_min:g}) must be below "
                          f"logvar_max ({cfg.model.logvar_max:g})")
    if not isinstance(cfg.prior.name, str) or not cfg.prior.name.strip():
        raise ConfigError(f"[prior] name must be a prior's name, got {cfg.prior.name!r}")
    sha = cfg.prior.file_sha256
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise ConfigError(f"[prior] file_sha256 must be 64 hexadecimal digits, got {sha!r}")
    return cfg


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a validated :class:`Config` from a nested dict, rejecting unknown tables and keys
    by name and every value outside its field's declared domain."""
    valid_tables = [*TABLES, "prior", *PASSIVE_TABLES]
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
            sha = body.pop("file_sha256", None)
            if not isinstance(name, str):
                raise ConfigError(f"[prior] name must be a string, got {name!r}")
            cfg.prior = PriorConfig(name=name, kwargs=body, file_sha256=sha)
            continue
        cls = TABLES[table]
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "kwargs"}
        if table == "data":  # keys beyond the shared ones belong to the data set
            own = {k: v for k, v in body.items() if k not in fields}
            body = {**{k: v for k, v in body.items() if k in fields}, "kwargs": own}
        for key in body:
            if key not in fields and not (table == "data" and key == "kwargs"):
                names = list(fields)
                raise ConfigError(
                    f"unknown key '{key}' in [{table}]{_suggest(key, names)}; "
                    f"valid keys: {', '.join(names)}"
                )
        setattr(cfg, table, dataclasses.replace(cls(), **body))
    return validate(cfg)


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
            raw = tomllib.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}); save it as "
                              f"UTF-8") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
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


def plugin_tables(cfg: Config) -> dict[str, PriorConfig]:
    """The tables that name a plug-in (``name`` + its arguments), by table name."""
    return {"prior": cfg.prior}


def pin_plugins(cfg: Config) -> Config:
    """The user chose ``cfg``: every spec in its plug-in tables (names, and arguments that name
    classes) made absolute, hashed and recorded in the user's trust record
    (:meth:`priorvae.registry.Registry.pin`). Changes ``cfg`` in place and returns it."""
    from .registry import kind_registry

    for table, body in plugin_tables(cfg).items():
        registry = kind_registry(table)
        if registry is not None:
            body.name, body.file_sha256, body.kwargs = registry.pin(body.name, body.kwargs)
    return cfg


def resolve_plugins(cfg: Config) -> None:
    """Look up every class ``cfg`` names (:meth:`priorvae.registry.Registry.resolve`); inside
    :func:`priorvae.trust.reading_folder` this is the gate's decision on every spec a run
    folder's config names, before any of its code runs."""
    from .registry import kind_registry

    for table, body in plugin_tables(cfg).items():
        registry = kind_registry(table)
        if registry is not None:
            registry.resolve(body.name, body.file_sha256, body.kwargs)
