"""Typed parsing of Trainer ``optim_args`` strings (``"window_size=20,density=0.02"``).

transformers hands ``optim_args`` to optimizer handlers as a dict of *strings* (it strips all
spaces, splits on ``,`` and then on ``=``), so every value has to be cast explicitly. Each
optimizer of this package declares an :class:`OptimArgsSchema`: the keys it accepts, their type (int, float, bool,
str or a fixed set of choices) and aliases. Parsing

* casts every value (bools accept ``true/false/1/0/yes/no``, case-insensitive);
* raises ``ValueError`` naming the key on an unknown key, an unparsable value, a bad choice or two
  spellings of the same key (``m=4,window_size=8``);
* folds scalar keys into tuple arguments (``beta1``/``beta2`` into ``betas``), because values cannot
  contain commas;
* leaves range checking to the optimizer's constructor (:meth:`OptimArgsSchema.validate` builds the
  optimizer on a dummy parameter, which is cheap because state is created lazily) and reports its
  error under the ``optim_args`` key that caused it.

Adding an optimizer means declaring one schema and calling :func:`register_schema`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Option", "OptimArgsSchema", "SCHEMAS", "get_schema", "parse_bool", "parse_optim_args",
    "register_schema", "split_optim_args",
]

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")
_KINDS = ("int", "float", "bool", "str", "choice")


def parse_bool(key: str, value: Any) -> bool:
    """strtobool-style: true/false/1/0/yes/no (any case); real bools pass through."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"optim_args key {key!r} must be a boolean (one of true/false/1/0/yes/no), "
                     f"got {value!r}")


@dataclass(frozen=True)
class Option:
    """One ``optim_args`` key.

    Args:
        name: canonical key, also the constructor argument unless it is part of ``combine``.
        kind: ``"int"``, ``"float"``, ``"bool"``, ``"str"`` or ``"choice"``.
        choices: the allowed values of a ``"choice"`` option.
        aliases: other spellings accepted for the key.
        help: one line shown in error messages and docs (typically the valid range).
    """

    name: str
    kind: str
    choices: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    help: str = ""

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"Option.kind must be one of {_KINDS}, got {self.kind!r}")
        if self.kind == "choice" and not self.choices:
            raise ValueError(f"choice option {self.name!r} needs choices")

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.name} (one of {'|'.join(self.choices)})"
        return f"{self.name} ({self.kind}{', ' + self.help if self.help else ''})"

    def cast(self, key: str, value: Any) -> Any:
        """``value`` (a string from optim_args, or an already typed value) as this option's type."""
        if self.kind == "bool":
            return parse_bool(key, value)
        if self.kind == "int":
            if isinstance(value, bool):
                raise ValueError(f"optim_args key {key!r} must be an integer, got {value!r}")
            if isinstance(value, int):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            text = str(value).strip()
            if not re.fullmatch(r"[+-]?\d+", text):
                raise ValueError(f"optim_args key {key!r} must be an integer"
                                 f"{' (' + self.help + ')' if self.help else ''}, got {value!r}")
            return int(text)
        if self.kind == "float":
            if isinstance(value, bool):
                raise ValueError(f"optim_args key {key!r} must be a number, got {value!r}")
            if isinstance(value, (int, float)):
                return float(value)
            try:
                out = float(str(value).strip())
            except ValueError:
                out = None
            if out is None or not math.isfinite(out):
                raise ValueError(f"optim_args key {key!r} must be a finite number"
                                 f"{' (' + self.help + ')' if self.help else ''}, got {value!r}")
            return out
        text = str(value).strip()
        if self.kind == "choice":
            lowered = text.lower()
            for choice in self.choices:
                if choice.lower() == lowered:
                    return choice
            raise ValueError(f"optim_args key {key!r} must be one of {list(self.choices)}, "
                             f"got {value!r}")
        return text


def split_optim_args(optim_args: str | None) -> list[tuple[str, str]]:
    """``"a=1,b=2"`` -> ``[("a", "1"), ("b", "2")]`` with transformers' conventions.

    Spaces are removed everywhere (as transformers does); empty segments (a trailing comma) are
    ignored; a segment without exactly one ``=`` raises ``ValueError``. Values cannot contain
    commas: pass tuple arguments as separate scalar keys (``beta1=0.9,beta2=0.99``).
    """
    if not optim_args:
        return []
    pairs = []
    for segment in optim_args.replace(" ", "").split(","):
        if not segment:
            continue
        if segment.count("=") != 1 or segment.startswith("="):
            raise ValueError(f"optim_args entry {segment!r} is not of the form key=value "
                             "(entries are separated by commas; values cannot contain commas "
                             "or '=')")
        key, value = segment.split("=")
        pairs.append((key, value))
    return pairs


def _pairs(optim_args: str | Mapping[str, Any] | None) -> list[tuple[str, Any]]:
    if optim_args is None:
        return []
    if isinstance(optim_args, str):
        return split_optim_args(optim_args)
    return [(str(k).strip(), v) for k, v in optim_args.items()]


@dataclass
class OptimArgsSchema:
    """The ``optim_args`` an optimizer accepts.

    Args:
        optimizer: the ``optim`` name (``"microadam"``).
        options: the accepted keys.
        combine: constructor arguments built from several scalar keys, e.g.
            ``{"betas": ("beta1", "beta2")}``; missing components come from the base kwargs.
        optimizer_cls: a zero-argument callable returning the optimizer class (lazy, so schemas
            can be declared without importing heavy modules).
    """

    optimizer: str
    options: tuple[Option, ...]
    combine: dict[str, tuple[str, ...]] = field(default_factory=dict)
    optimizer_cls: Callable[[], type] | None = None

    def __post_init__(self):
        self._by_key: dict[str, Option] = {}
        for opt in self.options:
            for key in (opt.name, *opt.aliases):
                if key in self._by_key:
                    raise ValueError(f"duplicate optim_args key {key!r} in schema "
                                     f"{self.optimizer!r}")
                self._by_key[key] = opt

    # ------------------------------------------------------------------ parsing
    @property
    def keys(self) -> list[str]:
        """Every accepted spelling, canonical names first."""
        names = [o.name for o in self.options]
        return names + [a for o in self.options for a in o.aliases]

    def option(self, key: str) -> Option | None:
        return self._by_key.get(key)

    def _unknown(self, key: str) -> ValueError:
        valid = ", ".join(o.describe() + (f" [aliases: {', '.join(o.aliases)}]" if o.aliases
                                          else "") for o in self.options)
        return ValueError(f"unknown optim_args key {key!r} for optimizer {self.optimizer!r}; "
                          f"valid keys: {valid}")

    def parse(self, optim_args: str | Mapping[str, Any] | None) -> dict[str, Any]:
        """Typed values keyed by canonical option name.

        ``optim_args`` is the raw string, or a mapping (transformers' already split dict of
        strings, or typed Python values).
        """
        return self._parse(optim_args)[0]

    def _parse(self, optim_args) -> tuple[dict[str, Any], dict[str, str]]:
        """(typed values, spelling the user gave) keyed by canonical option name."""
        out: dict[str, Any] = {}
        given_as: dict[str, str] = {}
        for key, value in _pairs(optim_args):
            opt = self._by_key.get(key)
            if opt is None:
                raise self._unknown(key)
            if opt.name in out:
                first = given_as[opt.name]
                also = f" (also given as {first!r})" if first != key else ""
                raise ValueError(f"optim_args key {key!r} given twice{also} for optimizer "
                                 f"{self.optimizer!r}")
            out[opt.name] = opt.cast(key, value)
            given_as[opt.name] = key
        return out, given_as

    # ------------------------------------------------------------------ constructor kwargs
    def to_kwargs(self, parsed: Mapping[str, Any], base: Mapping[str, Any] | None = None
                  ) -> dict[str, Any]:
        """Merge parsed options over ``base`` constructor kwargs, folding ``combine`` keys."""
        kwargs = dict(base or {})
        parsed = dict(parsed)
        for target, parts in self.combine.items():
            if not any(p in parsed for p in parts):
                continue
            current = kwargs.get(target)
            values = []
            for i, part in enumerate(parts):
                if part in parsed:
                    values.append(parsed.pop(part))
                elif current is not None:
                    values.append(current[i])
                else:
                    values.append(None)
            if any(v is None for v in values):
                missing = [p for p, v in zip(parts, values) if v is None]
                raise ValueError(f"optim_args keys {missing} are needed together with "
                                 f"{[p for p in parts if p not in missing]} to build {target!r}")
            kwargs[target] = tuple(values)
        kwargs.update(parsed)
        return kwargs

    def source_key(self, argument: str, given: Mapping[str, str]) -> str | None:
        """The optim_args key (as the user spelled it) that set constructor ``argument``.

        ``argument`` is the name a constructor error message starts with (``window_size``,
        ``betas[0]``). ``given`` maps canonical name -> spelling.
        """
        m = re.fullmatch(r"(\w+)\[(\d+)\]", argument)
        if m and m.group(1) in self.combine:
            parts = self.combine[m.group(1)]
            idx = int(m.group(2))
            if idx < len(parts) and parts[idx] in given:
                return given[parts[idx]]
            return None
        if argument in given:
            return given[argument]
        opt = self._by_key.get(argument)
        if opt is not None and opt.name in given:
            return given[opt.name]
        return None

    def validate(self, kwargs: Mapping[str, Any], given: Mapping[str, str] | None = None,
                 optimizer_cls: type | None = None) -> None:
        """Let the optimizer's constructor range-check ``kwargs`` (on a dummy parameter).

        A ``ValueError`` is re-raised naming the ``optim_args`` key responsible when there is one.
        """
        cls = optimizer_cls or (self.optimizer_cls() if self.optimizer_cls else None)
        if cls is None:
            return
        import torch

        dummy = torch.nn.Parameter(torch.zeros(1))
        try:
            cls([dummy], **kwargs)
        except ValueError as err:
            msg = str(err)
            head = re.match(r"([\w\[\]]+)", msg)
            key = self.source_key(head.group(1), given or {}) if head else None
            if key is not None:
                raise ValueError(f"invalid optim_args key {key!r} for optimizer "
                                 f"{self.optimizer!r}: {msg}") from err
            raise ValueError(f"invalid arguments for optimizer {self.optimizer!r}: {msg}") from err
        except TypeError as err:
            raise ValueError(f"invalid arguments for optimizer {self.optimizer!r}: {err}") from err

    def build_kwargs(self, optim_args: str | Mapping[str, Any] | None,
                     base: Mapping[str, Any] | None = None, *, validate: bool = True
                     ) -> dict[str, Any]:
        """Parse ``optim_args``, merge it over ``base`` and (optionally) range-check the result."""
        parsed, given = self._parse(optim_args)
        kwargs = self.to_kwargs(parsed, base)
        if validate:
            self.validate(kwargs, given)
        return kwargs


# ---------------------------------------------------------------------- registry
SCHEMAS: dict[str, OptimArgsSchema] = {}


def register_schema(schema: OptimArgsSchema, *, replace: bool = False) -> OptimArgsSchema:
    """Make ``schema`` available under ``schema.optimizer`` (lower-case)."""
    name = schema.optimizer.lower()
    if name in SCHEMAS and not replace and SCHEMAS[name] is not schema:
        raise ValueError(f"an optim_args schema for {name!r} is already registered")
    SCHEMAS[name] = schema
    return schema


def get_schema(name: str) -> OptimArgsSchema:
    key = str(getattr(name, "value", name)).lower()
    try:
        return SCHEMAS[key]
    except KeyError:
        raise ValueError(f"unknown optimizer {key!r}; known: {sorted(SCHEMAS)}") from None


def parse_optim_args(name: str, optim_args: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Typed ``optim_args`` of optimizer ``name`` keyed by canonical option name."""
    return get_schema(name).parse(optim_args)


# ---------------------------------------------------------------------- schemas
#: keys shared by the Adam-like optimizers of this package
ADAM_OPTIONS = (
    Option("beta1", "float", help="in [0, 1)"),
    Option("beta2", "float", help="in [0, 1)"),
    Option("eps", "float", help="> 0"),
    Option("weight_decay", "float", help=">= 0"),
)


def _microadam_cls():
    from .microadam import MicroAdam

    return MicroAdam


MICROADAM_SCHEMA = register_schema(OptimArgsSchema(
    optimizer="microadam",
    options=(
        Option("window_size", "int", aliases=("m",), help="in [1, 4096]"),
        Option("density", "float", aliases=("k_init",), help="in (0, 1]"),
        Option("quant_block_size", "int", help="even, in [2, 1048576]"),
        Option("topk_block_size", "int", help="in [1, 32768]"),
        Option("alpha", "float", help="in [0, 1)"),
        Option("stochastic_rounding", "bool"),
        Option("seed", "int", help=">= 0"),
        Option("nonfinite", "choice", choices=("skip", "raise")),
        *ADAM_OPTIONS,
    ),
    combine={"betas": ("beta1", "beta2")},
    optimizer_cls=_microadam_cls,
))

# ---- shampoo schemas (issue #3) ----
def _shampoo_cls():
    from .shampoo import Shampoo

    return Shampoo


def _shampoo_32bit_cls():
    from .shampoo import Shampoo32bit

    return Shampoo32bit


#: keys of both Shampoo names (shampoo_4bit adds precond_bits; shampoo_32bit fixes it to 32)
SHAMPOO_OPTIONS = (
    Option("first_order", "choice", choices=("adamw", "sgd")),
    Option("momentum", "float", help="in [0, 1), first_order=sgd"),
    Option("nesterov", "bool"),
    Option("stat_update_interval", "int", aliases=("T1",), help=">= 1"),
    Option("root_update_interval", "int", aliases=("T2",), help=">= 1"),
    Option("stat_decay", "float", help="in [0, 1]"),
    Option("matrix_eps", "float", help="in (0, 1], relative to the largest eigenvalue"),
    Option("max_order", "int", help="in [1, 65536]"),
    Option("quant_block_size", "int", help="even, in [2, 65536]"),
    Option("min_quant_size", "int", help=">= 0"),
    Option("codebook", "choice", choices=("linear2", "dynamic_tree")),
    Option("rectify_t1", "int", help="in [0, 100], Bjorck steps before the statistics update"),
    Option("rectify_t2", "int", help="in [0, 100], Bjorck steps before the inverse root"),
    Option("inverse_root", "choice", choices=("eigen", "schur_newton")),
    Option("start_step", "int", help=">= 1"),
    Option("nonfinite", "choice", choices=("skip", "raise")),
    *ADAM_OPTIONS,
)
# rectify_t1 / rectify_t2 are keyword arguments of Shampoo (each overrides one component of
# rectify_iters), so either can be given alone
_SHAMPOO_COMBINE = {"betas": ("beta1", "beta2")}

SHAMPOO_4BIT_SCHEMA = register_schema(OptimArgsSchema(
    optimizer="shampoo_4bit",
    options=(Option("precond_bits", "int", help="4 or 32"), *SHAMPOO_OPTIONS),
    combine=_SHAMPOO_COMBINE,
    optimizer_cls=_shampoo_cls,
))

SHAMPOO_32BIT_SCHEMA = register_schema(OptimArgsSchema(
    optimizer="shampoo_32bit",
    options=SHAMPOO_OPTIONS,
    combine=_SHAMPOO_COMBINE,
    optimizer_cls=_shampoo_32bit_cls,
))
# ---- end shampoo schemas ----

# ---- efcp schemas (issue #4) ----
def _sparse_mfac_cls():
    from .sparse_mfac import SparseMFAC

    return SparseMFAC


def _sparse_ggt_cls():
    from .sparse_ggt import SparseGGT

    return SparseGGT


#: keys shared by SparseMFAC and SparseGGT (ranges are checked by the constructors)
EFCP_OPTIONS = (
    Option("window_size", "int", aliases=("m",), help="in [1, 8192]"),
    Option("density", "float", aliases=("k_init",), help="in (0, 1]"),
    Option("weight_decay", "float", help=">= 0"),
    Option("momentum", "float", help="in [0, 1)"),
    Option("compressor", "choice", choices=("topk", "lowrank")),
    Option("rank", "int", help="in [1, 1024]"),
    Option("ef_bits", "int", help="4, 16 or 32"),
    Option("value_dtype", "choice", choices=("bf16", "fp32")),
    Option("wd_mode", "choice", choices=("decoupled_lr_scaled", "decoupled_unscaled", "l2")),
    Option("topk_block_size", "int", help="in [1, 32768]"),
    Option("quant_block_size", "int", help="even, in [2, 1048576]"),
    Option("seed", "int", help=">= 0"),
    Option("nonfinite", "choice", choices=("skip", "raise")),
)
EFCP_MFAC_OPTIONS = (
    Option("damp", "float", aliases=("lambda",), help="> 0"),
    Option("fix_scaling", "bool"),
    *EFCP_OPTIONS,
)
EFCP_MFAC_SCHEMA = register_schema(OptimArgsSchema(
    optimizer="efcp_mfac", options=EFCP_MFAC_OPTIONS, optimizer_cls=_sparse_mfac_cls))
EFCP_SCHEMA = register_schema(OptimArgsSchema(  # alias of efcp_mfac
    optimizer="efcp", options=EFCP_MFAC_OPTIONS, optimizer_cls=_sparse_mfac_cls))
EFCP_GGT_SCHEMA = register_schema(OptimArgsSchema(
    optimizer="efcp_ggt", options=(Option("eps", "float", help="> 0"), *EFCP_OPTIONS),
    optimizer_cls=_sparse_ggt_cls))
# ---- end efcp schemas ----
