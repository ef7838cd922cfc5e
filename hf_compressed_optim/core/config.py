"""One declaration per option: a typed, frozen dataclass per optimizer.

Each field is declared once with :func:`option` (default, one line of help, range or choices,
aliases). From that declaration come the constructor's keyword arguments and their checks
(``ValueError`` naming the argument and its range), the typed parsing of Trainer ``optim_args``
strings (transformers hands them over as strings: ``"window_size=20,density=0.02"``) with errors
that name the key as the user spelled it, and the option tables of the README
(:meth:`OptimizerConfig.markdown_table`).

A tuple field such as ``betas`` may declare ``parts`` (``beta1``, ``beta2``): scalar keys that set
one component each, because ``optim_args`` values cannot contain commas.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

__all__ = ["NONFINITE", "OptimizerConfig", "option", "parse_bool", "split_optim_args"]

#: what a gradient with inf/NaN does: skip the update (counted, warned) or raise
NONFINITE = ("skip", "raise")

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def option(default: Any, help: str, *, lo: float = -math.inf, hi: float = math.inf,
           lo_open: bool = False, hi_open: bool = False, choices: tuple = (), even: bool = False,
           aliases: tuple[str, ...] = (), parts: tuple[str, ...] = (), group: bool = True,
           tensor_ok: bool = False) -> Any:
    """A config field. ``group=False``: a property of the optimizer, not of parameter groups."""
    return dataclasses.field(default=default, metadata=dict(
        help=help, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, choices=tuple(choices),
        even=even, aliases=tuple(aliases), parts=tuple(parts), group=group, tensor_ok=tensor_ok))


def parse_bool(key: str, value: Any) -> bool:
    """strtobool-style: true/false/1/0/yes/no (any case); real bools pass through."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"optim_args key {key!r} must be a boolean (one of true/false/1/0/yes/no), "
                     f"got {value!r}")


def split_optim_args(optim_args: str | None) -> list[tuple[str, str]]:
    """``"a=1,b=2"`` -> ``[("a", "1"), ("b", "2")]`` with transformers' conventions: spaces
    removed, empty segments ignored, a segment without exactly one ``=`` is a ``ValueError``."""
    pairs = []
    for segment in (optim_args or "").replace(" ", "").split(","):
        if not segment:
            continue
        if segment.count("=") != 1 or segment.startswith("="):
            raise ValueError(f"optim_args entry {segment!r} is not of the form key=value "
                             "(entries are separated by commas; values cannot contain commas "
                             "or '=')")
        key, value = segment.split("=")
        pairs.append((key, value))
    return pairs


def _interval(meta: dict) -> str:
    return (f"{'(' if meta['lo_open'] else '['}{meta['lo']}, {meta['hi']}"
            f"{')' if meta['hi_open'] else ']'}")


def _kind(field: dataclasses.Field) -> str:
    """``int``/``float``/``bool``/``str`` (of a tuple's elements for ``tuple[...]`` fields)."""
    text = str(field.type)
    inner = re.fullmatch(r"tuple\[(\w+),.*\]", text)
    return inner.group(1) if inner else text.split(" ")[0]


def _check(name: str, value: Any, kind: str, meta: dict) -> Any:
    """``value`` checked against the field's declaration (ValueError naming ``name``)."""
    if meta["tensor_ok"] and torch.is_tensor(value):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a float or a one-element tensor, got shape "
                             f"{tuple(value.shape)}")
        _check(name, float(value), kind, meta)
        return value
    choices = meta["choices"]
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
        return value
    if choices and (isinstance(value, bool) or value not in choices):
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    if kind == "int":
        even = "an even integer" if meta["even"] else "an integer"
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or \
                not meta["lo"] <= value <= meta["hi"] or (meta["even"] and value % 2):
            raise ValueError(f"{name} must be {even} in [{meta['lo']}, {meta['hi']}], "
                             f"got {value!r}")
        return int(value)
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
                not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number in {_interval(meta)}, got {value!r}")
        v = float(value)
        lo, hi = meta["lo"], meta["hi"]
        if v < lo or v > hi or (meta["lo_open"] and v == lo) or (meta["hi_open"] and v == hi):
            raise ValueError(f"{name} must be in {_interval(meta)}, got {value!r}")
        return v
    return value


def _cast(key: str, value: Any, kind: str, meta: dict) -> Any:
    """An ``optim_args`` string (or an already typed value) as the field's type."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if kind == "bool":
        return parse_bool(key, text)
    if kind == "int" and re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if kind == "float":
        try:
            return float(text)
        except ValueError:
            pass
    if kind in ("int", "float"):
        raise ValueError(f"optim_args key {key!r} must be {'an integer' if kind == 'int' else 'a number'}"
                         f" ({_interval(meta)}), got {value!r}")
    for choice in meta["choices"]:  # choices are matched case-insensitively
        if str(choice).lower() == text.lower():
            return choice
    return text


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Base of the per-optimizer configs. Subclasses declare fields with :func:`option` and may
    add cross-field rules in :meth:`check`."""

    #: constructor arguments the Trainer supplies from TrainingArguments (adam_beta1/2, epsilon)
    TRAINER_ADAM_ARGS: ClassVar[tuple[str, ...]] = ("betas", "eps")

    # options every optimizer has (listed after the optimizer's own in the README tables)
    gradient_release: bool = option(
        False, "step each parameter inside backward and free its gradient at once (no "
        "gradient buffer; see the README's Gradient release section)", group=False)
    per_param_max_grad_norm: float = option(
        0.0, "clip each parameter's gradient to this L2 norm before its update (0: off); the "
        "per-parameter stand-in for Trainer's max_grad_norm, which cannot run before a released "
        "step", lo=0.0, group=False)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, meta, kind = getattr(self, f.name), f.metadata, _kind(f)
            if meta["parts"]:
                value = self._check_tuple(f.name, value, kind, meta)
            else:
                value = _check(f.name, value, kind, meta)
            object.__setattr__(self, f.name, value)
        self.check()

    @staticmethod
    def _check_tuple(name: str, value: Any, kind: str, meta: dict) -> tuple:
        parts = meta["parts"]
        if not isinstance(value, (tuple, list)) or len(value) != len(parts):
            raise ValueError(f"{name} must be a tuple ({', '.join(parts)}), each {kind} in "
                             f"{_interval(meta)}, got {value!r}")
        return tuple(_check(f"{name}[{i}]", v, kind, meta) for i, v in enumerate(value))

    def check(self) -> None:
        """Rules that involve several fields (raise ValueError)."""

    # ------------------------------------------------------------------ declarations
    @classmethod
    def spellings(cls) -> dict[str, tuple[str, int | None]]:
        """Every accepted key -> (field name, component index for tuple parts, else None)."""
        out: dict[str, tuple[str, int | None]] = {}
        for f in dataclasses.fields(cls):
            out[f.name] = (f.name, None)
            out.update({alias: (f.name, None) for alias in f.metadata["aliases"]})
            out.update({part: (f.name, i) for i, part in enumerate(f.metadata["parts"])})
        return out

    @classmethod
    def from_options(cls, options: Mapping[str, Any], *, optim: str | None = None
                     ) -> OptimizerConfig:
        """The config from keyword options in any accepted spelling (aliases, tuple parts).

        With ``optim`` (an ``optim=`` name) the values may be ``optim_args`` strings, and errors
        name the key as given; without it unknown keys raise ``TypeError`` like a constructor.
        """
        names = cls.spellings()
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        given: dict[str, str] = {}
        pending: list[tuple[str, str, int, Any]] = []
        for key, value in options.items():
            if key not in names:
                if optim is None:
                    raise TypeError(f"{cls.__name__[:-6]} got an unexpected keyword argument "
                                    f"{key!r}")
                raise ValueError(f"unknown optim_args key {key!r} for optimizer {optim!r}; "
                                 f"valid keys: {cls.describe_keys()}")
            name, part = names[key]
            spot = name if part is None else f"{name}[{part}]"
            if spot in given and optim is not None:
                also = f" (also given as {given[spot]!r})" if given[spot] != key else ""
                raise ValueError(f"optim_args key {key!r} given twice{also} for optimizer "
                                 f"{optim!r}")
            given[spot] = key
            f = fields[name]
            try:
                typed = _cast(key, value, _kind(f), f.metadata) if optim else value
                if part is None and optim is None:
                    values[name] = typed
                elif part is None:
                    values[name] = (cls._check_tuple if f.metadata["parts"] else _check)(
                        name, typed, _kind(f), f.metadata)
                else:
                    pending.append((key, name, part,
                                    _check(spot, typed, _kind(f), f.metadata) if optim else typed))
            except ValueError as err:
                if optim is None or str(err).startswith("optim_args key"):
                    raise
                raise ValueError(f"invalid optim_args key {key!r} for optimizer {optim!r}: "
                                 f"{err}") from None
        for key, name, part, value in pending:  # a part overrides one component
            current = list(values.get(name, fields[name].default))
            current[part] = value
            values[name] = tuple(current)
        if optim is None:
            return cls(**values)
        try:
            return cls(**values)
        except ValueError as err:
            raise ValueError(f"invalid arguments for optimizer {optim!r}: {err}") from None

    @classmethod
    def fields_in_order(cls) -> list[dataclasses.Field]:
        """The optimizer's own options first, then those every optimizer shares."""
        shared = {f.name for f in dataclasses.fields(OptimizerConfig)}
        return sorted(dataclasses.fields(cls), key=lambda f: f.name in shared)

    @classmethod
    def describe_keys(cls) -> str:
        out = []
        for f in cls.fields_in_order():
            meta = f.metadata
            kind = ("one of " + "|".join(map(str, meta["choices"])) if meta["choices"] else
                    _kind(f) + (f" in {_interval(meta)}" if _kind(f) in ("int", "float") else ""))
            keys = meta["parts"] or (f.name,)
            alias = f" [aliases: {', '.join(meta['aliases'])}]" if meta["aliases"] else ""
            out.extend(f"{k} ({kind}){alias}" for k in keys)
        return ", ".join(out)

    @classmethod
    def markdown_table(cls) -> str:
        """The README's option table: key (aliases), default, allowed values, meaning."""
        rows = ["| option | default | allowed | meaning |", "| --- | --- | --- | --- |"]
        for f in cls.fields_in_order():
            meta = f.metadata
            keys = ", ".join(f"`{k}`" for k in (f.name, *meta["aliases"], *meta["parts"]))
            if meta["choices"]:
                allowed = " / ".join(f"`{c}`" for c in meta["choices"])
            elif _kind(f) == "bool":
                allowed = "true / false"
            elif _kind(f) == "str":
                allowed = "text"
            else:
                allowed = (f"{'even ' if meta['even'] else ''}{_kind(f)} in {_interval(meta)}")
            rows.append(f"| {keys} | `{f.default}` | {allowed} | {meta['help']} |")
        return "\n".join(rows)

    # ------------------------------------------------------------------ use
    def group_defaults(self) -> dict[str, Any]:
        """The per-group hyperparameters (``torch.optim.Optimizer`` defaults)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata["group"]}

    @classmethod
    def trainer_kwargs(cls, optim: str, optim_args: Mapping[str, Any] | None,
                       base: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor kwargs for the Trainer: ``base`` (lr and the Adam arguments this config
        takes) under the typed ``optim_args``, checked now (before any model or data work)."""
        spellings, given = cls.spellings(), dict(optim_args or {})
        # what optim_args sets wins over base (a part such as beta1 replaces one component)
        whole = {spellings[k][0] for k in given if k in spellings and spellings[k][1] is None}
        merged = {k: v for k, v in base.items() if k in spellings and k not in whole}
        config = cls.from_options({**merged, **given}, optim=optim)
        keep = set(merged) | {spellings[k][0] for k in given if k in spellings}
        return {k: getattr(config, k) for k in sorted(keep)}
