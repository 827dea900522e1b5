"""Configuration: dataclasses mirroring the TOML tables
``[data] [likelihood] [network] [model] [prior] [train] [eval]``.

A config file is read with :func:`load_config`; ``--set section.key=value`` overrides are applied
with :func:`apply_overrides` (the value is read as a TOML value, a bare word as a string).
Unknown tables and keys are rejected by name, with the list of valid ones.

The plug-in tables ``[data]``, ``[likelihood]``, ``[network]`` and ``[prior]`` share one shape
(:class:`PluginConfig`): ``name`` (a registered name, or a ``file.py:Class`` / ``module:Class``
spec) plus the plug-in's own keyword arguments, which that kind's registry validates against
the class's ``__init__`` (an unknown name gets close matches, an unknown argument the list of
accepted ones). ``[model]`` keeps what every network family shares (``latent_dim``, the
encoder's log-variance bounds).

``[data]`` also has the keys every data set shares: ``root`` and ``download``.
Files written before the plug-in tables existed still open: their ``[model] family / hidden /
activation / channels`` move to ``[network]`` when read (:func:`migrate`).
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

from .errors import ConfigError, PluginError

__all__ = [
    "PluginConfig",
    "DataConfig",
    "LikelihoodConfig",
    "NetworkConfig",
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
    "PLUGIN_TABLES",
    "migrate",
    "comparable",
    "plugin_tables",
    "pin_plugins",
    "resolve_plugins",
]

# Tables that belong to other commands; `train` keeps them but does not interpret them.
PASSIVE_TABLES = ("compare",)
# keys of a plug-in table that priorvae owns; every other key is an argument of the plug-in
PLUGIN_RESERVED = ("name", "file_sha256")
PRIOR_RESERVED = PLUGIN_RESERVED


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
class PluginConfig:
    """A table that names a plug-in: ``name`` (registered, or a ``file.py:Class`` /
    ``module:Class`` spec) and the plug-in's own keyword arguments."""

    name: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    file_sha256: str | None = None  # a spec's file: its hash when the user chose it


@dataclass
class DataConfig(PluginConfig):
    """``[data]``: the data set (``priorvae.datasets``), the keys every data set shares (where
    its files are, whether they may be downloaded) and the data set's own arguments."""

    name: str = "mnist"
    root: str | None = option(None, doc="else $PRIORVAE_DATA, else the user cache folder")
    download: bool = option(True)


@dataclass
class LikelihoodConfig(PluginConfig):
    """``[likelihood]``: p(x|z) (``priorvae.likelihoods``) and its arguments."""

    name: str = "bernoulli"


@dataclass
class NetworkConfig(PluginConfig):
    """``[network]``: the encoder/decoder family (``priorvae.networks``) and its arguments."""

    name: str = "mlp"


@dataclass
class PriorConfig(PluginConfig):
    """``[prior]``: the prior (``priorvae.priors``) and its arguments."""

    name: str = "standard_normal"


@dataclass
class ModelConfig:
    latent_dim: int = option(40, low=1, high=4096)
    # encoder log-variance bounds (Hardtanh), as in the VampPrior code
    logvar_min: float = option(-6.0, low=-30.0, high=30.0)
    logvar_max: float = option(2.0, low=-30.0, high=30.0)


@dataclass
class LegacyModelKeys:
    """``[model]`` keys of configs written before ``[network]`` existed, with their domains;
    :func:`migrate` checks them and moves them to ``[network]``."""

    family: str = option("mlp", choices=("mlp", "conv"))
    hidden: list[int] = option([300, 300], item_low=1, nonempty=True)
    activation: str = option("gated", choices=("gated", "relu"))
    channels: list[int] = option([32, 64], item_low=1, nonempty=True, doc="conv family only")


# before the likelihood / network / data-set registries exist: today's built-ins
_MLP = {"hidden": [300, 300], "activation": "gated"}
_BUILTIN_ARGS = {  # name -> arguments with their defaults
    "data": {"mnist": {}, "fashion_mnist": {}, "digits": {}},
    "likelihood": {"bernoulli": {}},
    "network": {"mlp": _MLP, "conv": {**_MLP, "channels": [32, 64]}},
}


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
    likelihood: LikelihoodConfig = field(default_factory=LikelihoodConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    extra: dict[str, Any] = field(default_factory=dict)  # passive tables, e.g. [compare]

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict in TOML shape (a plug-in's arguments flattened into its table)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = dataclasses.asdict(getattr(self, f.name))
            if f.name in PLUGIN_TABLES:  # name, shared keys, the plug-in's own, hash
                own, sha = value.pop("kwargs"), value.pop("file_sha256")
                value = {**value, **own, "file_sha256": sha}
            out[f.name] = {k: v for k, v in value.items() if v is not None}
        out.update(self.extra)
        return out


TABLES = {"model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}
PLUGIN_TABLES = {"data": DataConfig, "likelihood": LikelihoodConfig, "network": NetworkConfig,
                 "prior": PriorConfig}


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


def _toml_ready(value: Any) -> Any:
    """A default argument as TOML would give it back (tuples as lists), or None if TOML
    cannot hold it."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_toml_ready(v) for v in value]
        return None if any(v is None for v in items) else items
    return None


def _check_plugin(table: str, body: PluginConfig) -> None:
    """``[table] name`` and arguments: a registered name's arguments checked against its
    class's ``__init__`` (a spec's when it is built, through the gate: no code runs here)."""
    from .registry import kind_registry
    from .trust import is_spec

    if not isinstance(body.name, str) or not body.name.strip():
        raise ConfigError(f"[{table}] name must be a registered name or 'file.py:Class', "
                          f"got {body.name!r}")
    sha = body.file_sha256
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise ConfigError(f"[{table}] file_sha256 must be 64 hexadecimal digits, got {sha!r}")
    if not isinstance(body.kwargs, dict):
        raise ConfigError(f"[{table}] arguments must be a table, got {body.kwargs!r}")
    for key, value in body.kwargs.items():
        if _holds_nan(value):  # a NaN never equals itself: the run could not be reopened
            raise ConfigError(f"[{table}] {key} must not be nan, got {value!r}")
    for f in _shared_fields(type(body)):  # keys every plug-in of the kind has: declared
        setattr(body, f.name, validate_value(table, f, getattr(body, f.name)))
    if is_spec(body.name):
        return
    registry = kind_registry(table)
    if registry is None:  # the kind's package is not there yet: today's built-ins
        known = _BUILTIN_ARGS[table]
        if body.name not in known:
            raise ConfigError(f"[{table}] name must be one of {', '.join(map(repr, known))} or "
                              f"a 'file.py:Class' / 'module:Class' spec, got {body.name!r}"
                              f"{_suggest(body.name, list(known))}")
        accepted = known[body.name]
        unknown = [k for k in body.kwargs if k not in accepted]
        if unknown:
            raise ConfigError(f"[{table}] {body.name!r} got unknown argument(s) "
                              f"{', '.join(map(repr, unknown))}; it accepts: "
                              f"{', '.join(accepted) or '(none)'}")
        return
    try:
        cls = registry.get(body.name)
    except PluginError as exc:
        raise ConfigError(f"[{table}] name must be a registered {registry.kind} or a "
                          f"'file.py:Class' / 'module:Class' spec: {exc}") from None
    try:
        registry.check_arguments(body.name, cls, body.kwargs)
    except PluginError as exc:
        raise ConfigError(f"[{table}] {exc}") from None


def _holds_nan(value) -> bool:
    """Whether a TOML value (a number, or a list or table of them) is or holds a NaN."""
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, (list, tuple)):
        return any(_holds_nan(v) for v in value)
    return isinstance(value, dict) and any(_holds_nan(v) for v in value.values())


def _shared_fields(cls: type) -> list[dataclasses.Field]:
    """The declared keys of a plug-in table besides name, arguments and hash (``[data] root``,
    ``download``)."""
    return [f for f in dataclasses.fields(cls) if f.name not in ("name", "kwargs", "file_sha256")]


def validate(cfg: Config) -> Config:
    """Every field of every table in its declared domain, every plug-in's name and arguments
    (:func:`_check_plugin`), and the rules that tie fields together; raises a one-line
    :class:`ConfigError` for the first violation."""
    for table, cls in TABLES.items():
        body = getattr(cfg, table)
        for f in dataclasses.fields(cls):  # values come back normalised (int -> float)
            setattr(body, f.name, validate_value(table, f, getattr(body, f.name)))
    if cfg.model.logvar_min >= cfg.model.logvar_max:
        raise ConfigError(f"[model] logvar_min ({cfg.model.logvar_min:g}) must be below "
                          f"logvar_max ({cfg.model.logvar_max:g})")
    for table in PLUGIN_TABLES:
        _check_plugin(table, getattr(cfg, table))
    return cfg


def migrate(raw: dict[str, Any]) -> dict[str, Any]:
    """A config dict of any priorvae version in today's shape: ``[model] family / hidden /
    activation / channels`` (checked against their old domains) move to ``[network]``
    (``family`` becomes its ``name``; ``channels``, which old files wrote for every family,
    only for ``conv``). A key given in both places with different values is an error."""
    model = raw.get("model")
    if not isinstance(model, dict):
        return raw
    fields = {f.name: f for f in dataclasses.fields(LegacyModelKeys)}
    old = {k: validate_value("model", fields[k], v) for k, v in model.items() if k in fields}
    if not old:
        return raw
    network = raw.get("network", {})
    if not isinstance(network, dict):
        raise ConfigError(f"[network] must be a table, got {network!r}")
    network = dict(network)
    if "family" in old:
        old["name"] = old.pop("family")
    if old.get("name", network.get("name", "mlp")) != "conv":
        old.pop("channels", None)
    for key, value in old.items():
        if key in network and network[key] != value:
            where = "[model] family" if key == "name" else f"[model] {key}"
            raise ConfigError(f"{where} = {value!r} and [network] {key} = {network[key]!r} "
                              f"disagree; give it once, in [network]")
        network[key] = value
    rest = {k: v for k, v in model.items() if k not in fields}
    return {**raw, "model": rest, "network": network}


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a validated :class:`Config` from a nested dict (any version's shape: see
    :func:`migrate`), rejecting unknown tables and keys by name and every value outside its
    field's declared domain."""
    valid_tables = [*PLUGIN_TABLES, *TABLES, *PASSIVE_TABLES]
    for table in raw:
        if table not in valid_tables:
            raise ConfigError(
                f"unknown table [{table}]{_suggest(table, valid_tables)}; "
                f"valid tables: {', '.join('[' + t + ']' for t in valid_tables)}"
            )
    cfg = Config()
    for table, body in migrate(raw).items():
        if not isinstance(body, dict):
            raise ConfigError(f"[{table}] must be a table, got {body!r}")
        if table in PASSIVE_TABLES:
            cfg.extra[table] = dict(body)
            continue
        if table in PLUGIN_TABLES:
            body = dict(body)
            cls = PLUGIN_TABLES[table]
            name = body.pop("name", cls().name)
            sha = body.pop("file_sha256", None)
            if not isinstance(name, str):
                raise ConfigError(f"[{table}] name must be a string, got {name!r}")
            shared = {f.name: body.pop(f.name) for f in _shared_fields(cls) if f.name in body}
            setattr(cfg, table, cls(name=name, kwargs=body, file_sha256=sha, **shared))
            continue
        cls = TABLES[table]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in body:
            if key not in fields:
                names = list(fields)
                raise ConfigError(
                    f"unknown key '{key}' in [{table}]{_suggest(key, names)}; "
                    f"valid keys: {', '.join(names)}"
                )
        setattr(cfg, table, dataclasses.replace(cls(), **body))
    return validate(cfg)


def comparable(cfg: Config) -> dict[str, Any]:
    """``cfg`` as a dict in which two configs describing the same run are equal: passive tables
    left out, and each plug-in's arguments completed with its class's defaults (registered
    names; tuples as lists), so that a default given explicitly or not makes no difference."""
    from .registry import kind_registry
    from .trust import is_spec

    out = {k: v for k, v in cfg.to_dict().items() if k not in cfg.extra}
    for table in PLUGIN_TABLES:
        body = getattr(cfg, table)
        if is_spec(body.name):
            continue
        registry = kind_registry(table)
        try:
            defaults = (_BUILTIN_ARGS[table].get(body.name, {}) if registry is None
                        else registry.arguments(registry.get(body.name)))
        except PluginError:
            continue
        for key, value in defaults.items():
            ready = _toml_ready(value)
            if key not in out[table] and ready is not None:
                out[table][key] = ready
    return out


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
    check_depth(value, f"--set {path.strip()}")
    return parts[0], parts[1], value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the nested dict ``raw`` with ``--set`` overrides applied."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for text in overrides:
        table, key, value = parse_override(text)
        out.setdefault(table, {})[key] = value
    return out


MAX_DEPTH = 32  # no priorvae config nests deeper; a crafted file that does is refused


def check_depth(value: Any, where: str) -> Any:
    """Refuse a value nested more than ``MAX_DEPTH`` levels deep (iteratively, so a crafted file
    fails with one line whatever the parser's or the interpreter's recursion limit)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ConfigError(f"{where} is nested too deeply (more than {MAX_DEPTH} levels) to be "
                              f"a priorvae config (a crafted file?)")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML config file (or the defaults when ``path`` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = check_depth(tomllib.loads(path.read_bytes().decode("utf-8")), str(path))
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
    if isinstance(value, dict):  # an inline table, e.g. resampled's base_args
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()
                                if v is not None) + " }"
    raise ConfigError(f"cannot write {value!r} as TOML")


def _toml_key(key: Any) -> str:
    key = str(key)
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def dump_toml(data: dict[str, Any]) -> str:
    """Write a nested dict of tables (one level, scalar or list values) as TOML text."""
    lines = []
    for table, body in data.items():
        lines.append(f"[{table}]")
        for key, value in body.items():
            if value is None:
                continue
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def plugin_tables(cfg: Config) -> dict[str, PluginConfig]:
    """The tables that name a plug-in (``name`` + its arguments), by table name."""
    return {table: getattr(cfg, table) for table in PLUGIN_TABLES}


def pin_plugins(cfg: Config, tables: tuple[str, ...] = tuple(PLUGIN_TABLES)) -> Config:
    """The user chose ``cfg``: every spec in its plug-in tables (names, and arguments that name
    classes) made absolute, hashed and recorded in the user's trust record
    (:meth:`priorvae.registry.Registry.pin`). Changes ``cfg`` in place and returns it."""
    from .registry import kind_registry

    for table in tables:
        body, registry = getattr(cfg, table), kind_registry(table)
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
