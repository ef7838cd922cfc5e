"""Hugging Face ``transformers`` integration: ``optim="microadam"`` and the patch-free routes.

Three ways to use the optimizers of this package with ``Trainer``:

1. **Registered names** (:func:`register`, run automatically by ``import hf_compressed_optim``):
   ``TrainingArguments(optim="microadam", optim_args="window_size=20,density=0.02")`` and the
   ``--optim microadam`` CLI. This adds genuine members to transformers' closed
   ``OptimizerNames`` enum and a handler to ``transformers.trainer_optimizer._OPTIMIZER_HANDLERS``
   (transformers >= 5.2) or wraps ``Trainer.get_optimizer_cls_and_kwargs`` once (older versions).
   Both are private APIs; they are found by feature detection, never by version checks.
2. **Patch-free** ``Trainer(optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("microadam", args))``
   (transformers >= 4.47). ``args.optim`` stays an ``adamw_*`` value.
3. **Subclass** ``class MyTrainer(CompressedTrainerMixin, Trainer)`` (also ``SFTTrainer``), whose
   ``get_optimizer_cls_and_kwargs`` handles our names and defers to the next class otherwise.

In every route ``learning_rate`` becomes ``lr``, ``adam_beta1``/``adam_beta2``/``adam_epsilon``
become ``betas``/``eps`` and ``optim_args`` is parsed into real Python types
(each optimizer's typed ``Config``, :mod:`hf_compressed_optim.core.config`). Weight decay is
left to Trainer's decay/no-decay
parameter groups, which carry ``args.weight_decay`` and ``0.0``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..core.config import parse_bool, split_optim_args
from ..core.registry import OPTIMIZERS

__all__ = [
    "HANDLERS", "CompressedTrainerMixin", "OptimizerContext", "RegistrationError",
    "add_optimizer", "config_handler", "is_registered", "optimizer_cls_and_kwargs", "register",
]

#: marks our dispatch wrapper of ``Trainer.get_optimizer_cls_and_kwargs`` (transformers < 5.2)
WRAPPER_MARK = "_hf_compressed_optim_dispatch"
#: marks our check of ``optim_args`` in ``TrainingArguments.__post_init__``
ARGS_CHECK_MARK = "_hf_compressed_optim_args_check"

PATCH_FREE_HINT = (
    "Use the patch-free route instead: "
    "Trainer(..., optimizer_cls_and_kwargs=hf_compressed_optim.optimizer_cls_and_kwargs("
    "'microadam', training_args)), or subclass "
    "hf_compressed_optim.CompressedTrainerMixin, or pass a built optimizer with "
    "Trainer(optimizers=(hf_compressed_optim.MicroAdam(model.parameters(), ...), None)).")


class RegistrationError(RuntimeError):
    """The installed transformers does not have the structures the registration shim needs."""


@dataclass
class OptimizerContext:
    """What a handler receives; the same fields as transformers' own ``OptimizerContext``.

    Used on transformers < 5.2 and by the patch-free routes; on >= 5.2 Trainer passes its own.
    """

    args: Any
    model: Any
    optimizer_kwargs: dict[str, Any]
    adam_kwargs: dict[str, Any]
    optim_args: dict[str, str]


Handler = Callable[[Any], tuple[Any, dict[str, Any]]]


def optim_name(value) -> str:
    """``OptimizerNames.MICROADAM`` / ``"MicroAdam"`` -> ``"microadam"``."""
    return str(getattr(value, "value", value)).strip().lower()


def _optim_args_dict(optim_args) -> dict[str, str]:
    """transformers' parsing of the ``optim_args`` string, but strict about duplicates."""
    if optim_args is None or isinstance(optim_args, Mapping):
        return dict(optim_args or {})
    out: dict[str, str] = {}
    for key, value in split_optim_args(optim_args):
        if key in out:
            raise ValueError(f"optim_args key {key!r} given twice")
        out[key] = value
    return out


def make_context(args, model=None) -> OptimizerContext:
    """The handler context transformers builds in ``get_optimizer_cls_and_kwargs``."""
    return OptimizerContext(
        args=args,
        model=model,
        optimizer_kwargs={"lr": args.learning_rate},
        adam_kwargs={"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon},
        optim_args=_optim_args_dict(getattr(args, "optim_args", None)),
    )


#: the optim_args key, common to every optimizer, that shards the state over DDP ranks (ZeRO-1)
SHARD_STATE_KEY = "shard_state"


def pop_shard_state(optim_args) -> tuple[Any, bool]:
    """``optim_args`` without ``shard_state``, and its boolean value (default False)."""
    if not optim_args:
        return optim_args, False
    if isinstance(optim_args, str):
        optim_args = _optim_args_dict(optim_args)
    rest = dict(optim_args)
    value = rest.pop(SHARD_STATE_KEY, False)
    return rest, parse_bool(SHARD_STATE_KEY, value)


def sharded_if_distributed(cls):
    """``cls`` with ZeRO-1 state sharding when torch.distributed runs with several ranks."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        warnings.warn(f"optim_args {SHARD_STATE_KEY}=true has no effect in a single process; "
                      f"using plain {cls.__name__}", UserWarning, stacklevel=3)
        return cls
    from ..engines.zero import sharded

    return sharded(cls)


def run_length(args) -> dict[str, int]:
    """``{"total_steps": max_steps}`` when the run's length is known (``max_steps > 0``): the
    optimizers that schedule work by step (Shampoo's automatic T1 / T2) fit it into the run."""
    steps = getattr(args, "max_steps", -1)
    return {"total_steps": int(steps)} if isinstance(steps, int) and steps > 0 else {}


def _config_kwargs(name: str, ctx) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """(constructor kwargs, the parsed optim_args, shard_state) of a registered name, checked."""
    config = OPTIMIZERS[name].Config
    adam = {k: v for k, v in dict(ctx.adam_kwargs).items() if k in config.TRAINER_ADAM_ARGS}
    optim_args, shard = pop_shard_state(ctx.optim_args)
    kwargs = config.trainer_kwargs(name, optim_args, {**dict(ctx.optimizer_kwargs), **adam,
                                                      **run_length(ctx.args)})
    return kwargs, optim_args, shard


def config_handler(name: str) -> Handler:
    """The handler of a registered name: Trainer's ``lr`` and the Adam arguments the optimizer's
    ``Config`` takes (``TRAINER_ADAM_ARGS``), then the typed ``optim_args`` on top
    (``beta1=...`` overrides ``adam_beta1``), all checked before Trainer uses them."""
    cls = OPTIMIZERS[name]

    def handler(ctx) -> tuple[type, dict[str, Any]]:
        kwargs, optim_args, shard = _config_kwargs(name, ctx)
        if optim_args and "weight_decay" in optim_args:
            warnings.warn(
                f"optim_args weight_decay for {name!r} only sets the default of "
                "parameter groups without their own weight_decay; Trainer's groups carry "
                "args.weight_decay (decay group) and 0.0 (no-decay group). Set "
                "--weight_decay / TrainingArguments(weight_decay=...) instead.", UserWarning,
                stacklevel=2)
        return (sharded_if_distributed(cls) if shard else cls), kwargs

    handler.__name__ = handler.__qualname__ = f"_get_{name}"
    handler._hco_default = True
    return handler


def check_training_args(args) -> None:
    """``ValueError`` now, naming the key, if ``args.optim`` is one of our names and
    ``args.optim_args`` (or lr, betas) is not valid for it: run when ``TrainingArguments`` is
    created, before any model or data work (the Trainer builds the optimizer only in
    ``train()``). Names with a custom handler are left to it."""
    name = optim_name(getattr(args, "optim", ""))
    if name in OPTIMIZERS and getattr(HANDLERS.get(name), "_hco_default", False):
        _config_kwargs(name, make_context(args))


def install_args_check(args_cls) -> bool:
    """Make ``args_cls.__post_init__`` (``TrainingArguments``; subclasses such as TRL's configs
    call it) run :func:`check_training_args` (once). Returns True if it was installed now."""
    original = args_cls.__dict__.get("__post_init__")
    if original is None or getattr(original, ARGS_CHECK_MARK, False):
        return False

    @functools.wraps(original)
    def __post_init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        check_training_args(self)

    setattr(__post_init__, ARGS_CHECK_MARK, True)
    type.__setattr__(args_cls, "__post_init__", __post_init__)
    return True


_LOCK = threading.RLock()
_REGISTERED: set[str] = set()  # names registered with transformers by register()
_DISPATCHERS: dict[str, Handler] = {}

#: optimizer name -> handler(ctx) -> (optimizer class or factory, kwargs)
HANDLERS: dict[str, Handler] = {}


def add_optimizer(name: str, handler: Handler | None = None) -> None:
    """Declare an ``optim`` name with its handler (default: :func:`config_handler` of the class
    registered with :func:`hf_compressed_optim.core.registry.register_optimizer`).

    If registration with transformers already happened, the new name is registered at once.
    """
    key = optim_name(name)
    if handler is None:
        if key not in OPTIMIZERS:
            raise ValueError(f"no optimizer registered as {key!r}; pass a handler or call "
                             "hf_compressed_optim.core.registry.register_optimizer first")
        handler = config_handler(key)
    HANDLERS[key] = handler
    if _REGISTERED:
        register([key])


def on_new_optimizer(name: str) -> None:
    """Called by ``register_optimizer``: the name gets the default handler."""
    add_optimizer(name)


# ---------------------------------------------------------------------- registration shim
def _dispatcher(name: str) -> Handler:
    """A stable function that forwards to ``HANDLERS[name]`` at call time (one per name)."""
    fn = _DISPATCHERS.get(name)
    if fn is None:
        def fn(ctx, _name=name):
            return HANDLERS[_name](ctx)

        fn.__name__ = fn.__qualname__ = f"_hco_get_{name}"
        _DISPATCHERS[name] = fn
    return fn


def _check_enum(enum_cls) -> None:
    missing = [a for a in ("_member_map_", "_value2member_map_", "_member_names_")
               if not hasattr(enum_cls, a)]
    if missing:
        raise RegistrationError(
            f"transformers' OptimizerNames does not look like a standard Enum (missing "
            f"{missing}); cannot add optimizer names. " + PATCH_FREE_HINT)


def ensure_member(enum_cls, value: str):
    """A genuine member of ``enum_cls`` with ``value`` (created once, then reused)."""
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        return existing
    name = value.upper()
    if name in enum_cls._member_map_:
        raise RegistrationError(
            f"{enum_cls.__name__}.{name} already exists with value "
            f"{enum_cls._member_map_[name]._value_!r}, not {value!r}. " + PATCH_FREE_HINT)
    member_type = getattr(enum_cls, "_member_type_", str)
    if not issubclass(enum_cls, member_type) or member_type is object:
        raise RegistrationError(f"{enum_cls.__name__} is not a str-valued Enum. " + PATCH_FREE_HINT)
    member = member_type.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    # Enum's metaclass refuses to rebind members; the type-level setattr does not
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    return member


def _handlers_dict():
    """``transformers.trainer_optimizer._OPTIMIZER_HANDLERS`` or None (transformers < 5.2)."""
    try:
        import transformers.trainer_optimizer as trainer_optimizer
    except ImportError:
        return None
    handlers = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
    if handlers is None:
        return None
    if not isinstance(handlers, dict):
        raise RegistrationError("transformers.trainer_optimizer._OPTIMIZER_HANDLERS is not a "
                                "dict. " + PATCH_FREE_HINT)
    return handlers


def install_dispatch_wrapper(trainer_cls) -> bool:
    """Wrap ``trainer_cls.get_optimizer_cls_and_kwargs`` so it handles our names (once).

    Returns True if a wrapper was installed, False if ``trainer_cls`` already had one.
    """
    static = inspect.getattr_static(trainer_cls, "get_optimizer_cls_and_kwargs", None)
    if static is None:
        raise RegistrationError(f"{trainer_cls.__name__} has no get_optimizer_cls_and_kwargs. "
                                + PATCH_FREE_HINT)
    original = static.__func__ if isinstance(static, (staticmethod, classmethod)) else static
    if isinstance(static, classmethod) or not callable(original):
        raise RegistrationError(f"{trainer_cls.__name__}.get_optimizer_cls_and_kwargs is not a "
                                "staticmethod. " + PATCH_FREE_HINT)
    if getattr(original, WRAPPER_MARK, False):
        return False

    @functools.wraps(original)
    def get_optimizer_cls_and_kwargs(args, model=None):
        name = optim_name(args.optim)
        if name in HANDLERS:
            return HANDLERS[name](make_context(args, model))
        return original(args, model)

    setattr(get_optimizer_cls_and_kwargs, WRAPPER_MARK, True)
    get_optimizer_cls_and_kwargs.__wrapped_original__ = original
    type.__setattr__(trainer_cls, "get_optimizer_cls_and_kwargs",
                     staticmethod(get_optimizer_cls_and_kwargs))
    return True


def register_into(enum_cls, handlers_dict: dict | None, trainer_cls=None,
                  names=None) -> list:
    """Registration against explicit targets (what :func:`register` does after detection).

    ``handlers_dict`` is transformers' handler table, or None to wrap ``trainer_cls`` instead.
    """
    _check_enum(enum_cls)
    names = [optim_name(n) for n in (HANDLERS if names is None else names)]
    unknown = [n for n in names if n not in HANDLERS]
    if unknown:
        raise ValueError(f"no handler for {unknown}; known: {sorted(HANDLERS)}")
    if handlers_dict is None and trainer_cls is None:
        raise RegistrationError("neither transformers.trainer_optimizer._OPTIMIZER_HANDLERS nor "
                                "Trainer.get_optimizer_cls_and_kwargs was found. "
                                + PATCH_FREE_HINT)
    with _LOCK:
        members = [ensure_member(enum_cls, n) for n in names]
        if handlers_dict is not None:
            for name, member in zip(names, members):
                handlers_dict[member] = _dispatcher(name)
        else:
            install_dispatch_wrapper(trainer_cls)
    return members


def register(names=None) -> list:
    """Make ``optim="<name>"`` work in ``TrainingArguments``, the CLI and ``Trainer``.

    Idempotent: members are created once and reused, the dispatch wrapper is installed once.
    Must run before ``HfArgumentParser(...)`` is constructed (argparse choices are fixed then) and
    in every process (``torchrun``/``accelerate launch`` re-run the script per rank);
    ``import hf_compressed_optim`` does it.

    Args:
        names: optimizer names to register (default: every name in :data:`HANDLERS`).

    Returns:
        the ``OptimizerNames`` members.

    Raises:
        RegistrationError: the installed transformers lacks what the shim needs; the message
            points to the patch-free route.
    """
    try:
        from transformers import training_args
    except ImportError as err:  # pragma: no cover - transformers is a dependency
        raise RegistrationError(f"cannot import transformers.training_args ({err}). "
                                + PATCH_FREE_HINT) from err
    enum_cls = getattr(training_args, "OptimizerNames", None)
    if enum_cls is None:
        raise RegistrationError("transformers.training_args.OptimizerNames not found. "
                                + PATCH_FREE_HINT)
    handlers_dict = _handlers_dict()
    trainer_cls = None
    if handlers_dict is None:
        try:
            from transformers.trainer import Trainer as trainer_cls
        except ImportError as err:  # pragma: no cover
            raise RegistrationError(f"cannot import transformers.Trainer ({err}). "
                                    + PATCH_FREE_HINT) from err
    members = register_into(enum_cls, handlers_dict, trainer_cls, names)
    _REGISTERED.update(m._value_ for m in members)
    install_args_check(training_args.TrainingArguments)  # optim_args checked at creation
    from ..engines.zero import install_default_callback
    from .release import install_release_callback

    install_default_callback()  # consolidates sharded state before Trainer checkpoints
    install_release_callback()  # gradient release: Trainer argument checks, grad_norm
    return members


def is_registered(name: str) -> bool:
    """Whether ``optim=name`` currently validates in ``TrainingArguments``."""
    try:
        from transformers.training_args import OptimizerNames
    except ImportError:  # pragma: no cover
        return False
    return optim_name(name) in OptimizerNames._value2member_map_


# ---------------------------------------------------------------------- patch-free routes
def optimizer_cls_and_kwargs(name, training_args, **overrides) -> tuple[type, dict[str, Any]]:
    """``(cls, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``; no patching involved.

    Reads ``learning_rate``, ``weight_decay``, ``adam_beta1``, ``adam_beta2``, ``adam_epsilon`` and
    ``optim_args`` (parsed for ``name``, whatever ``training_args.optim`` is) from
    ``training_args``. ``overrides`` win over both: optim_args-style keys (``window_size=8``,
    ``beta1=0.8``, strings or typed values) and constructor keywords (``lr=1e-3``,
    ``betas=(0.9, 0.99)``). ``weight_decay`` is the default of groups without their own; with
    Trainer the decay/no-decay groups carry ``args.weight_decay`` and 0.0.
    """
    key = optim_name(name)
    handler = HANDLERS.get(key)
    if handler is None:
        raise ValueError(f"unknown optimizer {key!r}; known: {sorted(HANDLERS)}")
    cls, kwargs = handler(make_context(training_args))
    config = getattr(OPTIMIZERS.get(key), "Config", None)
    if config is None:  # a custom handler: its kwargs, the overrides on top
        return cls, {**kwargs, **overrides}
    names = {f.name for f in dataclasses.fields(config)}
    if "weight_decay" not in kwargs and "weight_decay" in names:
        kwargs = {**kwargs, "weight_decay": training_args.weight_decay}
    bad = sorted(k for k in overrides if k not in config.spellings())
    if bad:
        raise ValueError(f"unknown argument(s) {bad} for optimizer {key!r}; valid keys: "
                         f"{config.describe_keys()}")
    return cls, config.trainer_kwargs(key, overrides, kwargs)


class _CooperativeStaticMethod:
    """Behaves like ``staticmethod`` for callers, but knows the class it was looked up on.

    This lets a mixin's static ``get_optimizer_cls_and_kwargs`` defer to the *next* class in
    the MRO (``SFTTrainer``, a user's subclass, ``Trainer``) for names it does not handle.
    """

    def __init__(self, func):
        self.__func__ = func
        self.__doc__ = func.__doc__

    def __set_name__(self, owner, name):
        self._owner = owner
        self._name = name

    def __get__(self, obj, objtype=None):
        cls = objtype if objtype is not None else type(obj)
        owner, name, func = self._owner, self._name, self.__func__

        def next_impl():
            impl = getattr(super(owner, cls), name, None)
            if impl is None:
                from transformers import Trainer

                impl = Trainer.get_optimizer_cls_and_kwargs
            return impl

        def bound(args, model=None):
            return func(next_impl, args, model)

        bound.__name__ = func.__name__
        bound.__qualname__ = f"{cls.__qualname__}.{name}"
        bound.__doc__ = func.__doc__
        return bound


class CompressedTrainerMixin:
    """Mix into ``Trainer`` (or ``SFTTrainer`` ...) before it: ``class T(CompressedTrainerMixin,
    Trainer)``.

    * ``get_optimizer_cls_and_kwargs`` (static for callers) builds our optimizers for our names
      and defers to the next class otherwise;
    * the :class:`~hf_compressed_optim.callbacks.OptimizerMemoryCallback` is inserted at the
      front of the callbacks (set ``memory_callback = False`` on a subclass to skip it).

    ``args.optim`` must still validate as an ``OptimizerNames`` member, i.e. the names must be
    registered (``import hf_compressed_optim`` does it); without registration use
    :func:`optimizer_cls_and_kwargs`.
    """

    memory_callback: bool = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from ..engines.zero import ConsolidateOnSaveCallback

        from .release import GradientReleaseCallback

        for callback in (ConsolidateOnSaveCallback, GradientReleaseCallback):
            if not any(isinstance(cb, callback) for cb in self.callback_handler.callbacks):
                self.add_callback(callback)
        if self.memory_callback:
            from .callbacks import add_memory_callback

            add_memory_callback(self)

    @_CooperativeStaticMethod
    def get_optimizer_cls_and_kwargs(next_impl, args, model=None):
        """``(cls, kwargs)`` for ``args.optim``: ours for our names, else the next class's."""
        name = optim_name(args.optim)
        if name in HANDLERS:
            return HANDLERS[name](make_context(args, model))
        return next_impl()(args, model)
