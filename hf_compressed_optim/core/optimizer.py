"""The step template and the state contract every optimizer of this package shares.

* :meth:`CompressedOptimizer.step` is the one step loop: gradient collection, one finite check
  for all gradients, lazy state creation, then the subclass's :meth:`~CompressedOptimizer._update`
  hook with the parameters to update. Subclasses write only the math.
* ``load_state_dict`` keeps integer, packed and bf16 state exactly: torch's loader casts every
  state tensor to the parameter's dtype, which corrupts int16 indices and inflates uint8 codes
  (and turns string entries into the text of a generator).
* Non-finite gradients never reach the state: the parameter is skipped (counted, warned) or an
  error is raised; optimizers with one global preconditioner (``GLOBAL_STEP``) skip the step.
* The engine that distributes the parameters (:mod:`hf_compressed_optim.engines`) is consulted
  here only: DTensor (FSDP2) state is packed for distributed checkpoints, global sums run over
  the engine's reduce group, flat partitions are refused where matrix shapes are needed.
* ``gradient_release=True`` (:mod:`.release`) runs the same step template per parameter inside
  backward and frees each gradient; ``step()`` then finishes the step.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from dataclasses import dataclass
from itertools import chain
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from ..engines import Engine, engine_of
from ..engines.collectives import all_reduce
from ..engines.fsdp2 import is_sharded, local_view, pack, possible_local_shapes
from .config import OptimizerConfig
from .release import GradientRelease, distributed_world_size, refusal_of_distributed


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def as_float(value: Any) -> float:
    """A group's ``lr``/``weight_decay`` as a Python float (tensors allowed)."""
    return float(value.item()) if torch.is_tensor(value) else float(value)


@dataclass
class Job:
    """One parameter to update in this step."""

    index: int              # position among all parameters (seeds per-parameter randomness)
    group: dict
    param: torch.Tensor     # as the optimizer holds it (DTensor under FSDP2)
    grad: torch.Tensor      # local tensor
    state: dict             # this rank's view of the state (packed entries unpacked)
    fresh: bool             # state created in this step

    @property
    def local(self) -> torch.Tensor:
        return local_tensor(self.param)


class CompressedOptimizer(torch.optim.Optimizer):
    """Base class: the step template, lazy state, dtype-preserving checkpoints, the non-finite
    policy. Subclasses set ``Config`` and implement :meth:`_init_state` and :meth:`_update`."""

    #: the typed options (constructor keywords, ``optim_args``, README table)
    Config: ClassVar[type[OptimizerConfig]] = OptimizerConfig
    #: maps a state key to the category the memory report shows it under
    STATE_CATEGORIES: ClassVar[dict[str, str]] = {}
    #: one preconditioner over all parameters: a non-finite gradient skips the whole step
    GLOBAL_STEP: ClassVar[bool] = False
    #: needs each parameter's matrix shape (refuses the flat partitions of FSDP1 / DeepSpeed)
    NEEDS_MATRIX_SHAPES: ClassVar[bool] = False
    #: the hooks of ``gradient_release=True`` (None without, or after ``remove_hooks()``)
    _release: GradientRelease | None = None
    #: the L2 norm of the gradients released in the last step (Trainer logs it as grad_norm)
    released_grad_norm: torch.Tensor | None = None

    def __init__(self, params, config: OptimizerConfig | None = None, **options: Any):
        if config is None:
            config = self.Config.from_options(options)
        elif options:
            config = self.Config.from_options({**config.__dict__, **options})
        if not isinstance(config, self.Config):
            raise TypeError(f"config must be a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config
        super().__init__(params, config.group_defaults())
        if config.gradient_release:
            self._check_release_supported()
            self._release = GradientRelease(self)

    # -------------------------------------------------------------- gradient release
    @property
    def gradient_release(self) -> bool:
        """Whether parameters are stepped inside backward (hooks attached)."""
        return self._release is not None

    def remove_hooks(self) -> None:
        """Detach the gradient-release hooks: from now on ``step()`` is the ordinary step."""
        if self._release is not None:
            self._release.remove()
            self._release = None

    def __del__(self):
        release = self.__dict__.get("_release")
        if release is not None:
            release.remove()

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if self._release is not None:
            self._release.attach(self)

    def _check_release_supported(self) -> None:
        name = type(self).__name__
        world = distributed_world_size()
        engine = self.engine
        if world > 1 or engine.sharded_params or engine.flat_partitions:
            raise ValueError(refusal_of_distributed(name, world, None if world > 1 else
                                                    engine.name))

    def _release_param(self, p: torch.Tensor) -> None:
        """The hook's work: step ``p`` alone through the step template, then free its grad."""
        release = self._release
        release.check_once(p, type(self).__name__)
        index, group = release.positions[id(p)]
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients; "
                               "use dense gradients (e.g. nn.Embedding(sparse=False))")
        with torch.no_grad():
            grad = local_tensor(grad)
            release.add_norm(grad)
            self._release_one(index, group, p, grad)
        release.released.add(id(p))
        p.grad = None

    def _release_one(self, index: int, group: dict, p: torch.Tensor, grad: torch.Tensor) -> None:
        """Step one parameter inside backward (optimizers with ``GLOBAL_STEP`` override this and
        finish in ``_step_work``)."""
        self._release.skipped += self._step_work([(index, group, p, grad)])

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """``inspect.signature`` / ``help()`` / IDEs show the config's options as keywords."""
        super().__init_subclass__(**kwargs)
        p = inspect.Parameter
        cls.__signature__ = inspect.Signature(
            [p("params", p.POSITIONAL_OR_KEYWORD),
             p("config", p.POSITIONAL_OR_KEYWORD, default=None, annotation=cls.Config.__name__)]
            + [p(f.name, p.KEYWORD_ONLY, default=f.default, annotation=f.type)
               for f in dataclasses.fields(cls.Config)])

    @property
    def nonfinite(self) -> str:
        return self.config.nonfinite

    @property
    def engine(self) -> Engine:
        return engine_of(self)

    # -------------------------------------------------------------- state creation
    def _init_state(self, state: dict, p: torch.Tensor, group: dict, index: int = 0) -> None:
        """Fill ``state`` for the (local) tensor ``p`` (``index``: its position among all
        parameters). Must also work on a meta tensor."""
        raise NotImplementedError

    def _create_state(self, state: dict, p: torch.Tensor, group: dict, index: int = 0) -> None:
        """``_init_state`` on p's local tensor; for a sharded DTensor p (FSDP2) every state tensor
        with dimensions is then packed as a DTensor (see :mod:`hf_compressed_optim.engines.fsdp2`)
        so distributed checkpoints see each rank's state."""
        local = local_tensor(p)
        self._init_state(state, local, group, index)
        if not is_sharded(p):
            return
        capacity: dict[str, tuple[int, torch.dtype]] = {}
        for shape in possible_local_shapes(p):
            probe: dict = {}
            self._init_state(probe, torch.empty(shape, dtype=local.dtype, device="meta"), group,
                             index)
            for key, value in probe.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    nbytes = max(capacity.get(key, (0,))[0], value.numel() * value.itemsize)
                    capacity[key] = (nbytes, value.dtype)
        for key, (_, dtype) in capacity.items():
            # keys only other shards have (e.g. preconditioners of a non-empty block): empty here
            state.setdefault(key, torch.empty(0, dtype=dtype, device=local.device))
        self._local_layouts[(id(p), tuple(local.shape))] = {
            key: (tuple(state[key].shape), state[key].dtype) for key in capacity}
        for key, (nbytes, _) in capacity.items():
            state[key] = pack(state[key], nbytes, p)

    def _local_state(self, p: torch.Tensor, state: dict) -> dict:
        """``state`` with packed DTensor entries replaced by views of this rank's part (the dict
        itself when nothing is packed). Updates through the views change the state in place."""
        if not any(isinstance(v, torch.Tensor) and hasattr(v, "to_local") for v in state.values()):
            return state
        local = local_tensor(p)
        key = (id(p), tuple(local.shape))
        layout = self._local_layouts.get(key)
        if layout is None:  # e.g. after loading a checkpoint into a fresh optimizer
            probe: dict = {}
            group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
            self._init_state(probe, torch.empty(local.shape, dtype=local.dtype, device="meta"),
                             group)
            # keys this shard lacks (only other shards' blocks have them) are empty here
            layout = {k: (tuple(probe[k].shape), probe[k].dtype) if k in probe else
                      ((0,), torch.uint8) for k, v in state.items() if hasattr(v, "to_local")}
            self._local_layouts[key] = layout
        out = dict(state)
        for name, (shape, dtype) in layout.items():
            out[name] = local_view(state[name], shape, dtype)
        return out

    @property
    def _local_layouts(self) -> dict:
        cache = self.__dict__.get("_local_layout_cache")
        if cache is None:
            cache = self.__dict__["_local_layout_cache"] = {}
        return cache

    # -------------------------------------------------------------- checkpoints
    def load_state_dict(self, state_dict: dict) -> None:
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        if self._release is not None:
            self._release.attach(self)  # the hooks must read the new groups' lr
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in self.param_groups)))
        for key, incoming_state in saved_state.items():
            param = id_map.get(key)
            if param is None or param not in self.state:
                continue
            loaded = self.state[param]
            for name, incoming in incoming_state.items():
                if isinstance(incoming, str):  # torch's loader rebuilds strings char by char
                    loaded[name] = incoming
                    continue
                current = loaded.get(name)
                if torch.is_tensor(incoming) and torch.is_tensor(current) and \
                        current.dtype != incoming.dtype:
                    loaded[name] = incoming.to(device=current.device)

    # -------------------------------------------------------------- the step template
    @torch.no_grad()
    def step(self, closure=None):
        """Collect gradients, check them once, create state lazily, then :meth:`_update`.

        With ``gradient_release`` most parameters were stepped in backward already (their grad
        is None); this steps the rest and reports non-finite gradients of the whole step once."""
        loss = self._run_closure(closure)
        self._check_engine()
        skipped = self._step_work(self._grad_work())
        if self._release is not None:
            released_skips, self.released_grad_norm = self._release.end_step()
            skipped = released_skips + skipped
            self._release.attach(self)  # load_state_dict replaces the group dicts
        if skipped:
            self._on_nonfinite(skipped)
        return loss

    def _step_work(self, work: list[tuple[int, dict, torch.Tensor, torch.Tensor]]) -> list[str]:
        """The step of the parameters in ``work``; returns those skipped (non-finite)."""
        flags = self._finite_flags([w[3] for w in work], [w[2] for w in work])
        if self.GLOBAL_STEP and not self._accept_step(work, flags):
            return []
        jobs, skipped = [], []
        for (index, group, p, grad), finite in zip(work, flags):
            state = self.state[p]
            fresh = "step" not in state
            if fresh:
                self._create_state(state, p, group, index)
            if not finite:
                state["nonfinite_skips"] += 1
                skipped.append(f"param {index} {tuple(p.shape)}")
                continue
            if self.config.per_param_max_grad_norm > 0:
                self._clip_(p, grad, self.config.per_param_max_grad_norm)
            if fresh and not self.GLOBAL_STEP and self._is_template_step([(group, grad)]):
                continue
            jobs.append(Job(index, group, p, grad, self._local_state(p, state), fresh))
        self._update(jobs)
        return skipped

    def _clip_(self, p: torch.Tensor, grad: torch.Tensor, max_norm: float) -> None:
        """``grad *= min(1, max_norm / (norm + 1e-6))`` (``clip_grad_norm_``'s rule, per
        parameter; the norm of a sharded parameter is summed over its shards)."""
        sq = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
        if is_sharded(p) and dist.is_initialized():
            all_reduce(sq, group=self.engine.reduce_group)
        grad.mul_(torch.clamp(max_norm / (sq.sqrt() + 1e-6), max=1.0))

    def _update(self, jobs: list[Job]) -> None:
        """The optimizer's math for this step's parameters (finite gradients, state created)."""
        raise NotImplementedError

    def _accept_step(self, work: list, flags: list[bool]) -> bool:
        """``GLOBAL_STEP`` optimizers: whether this step runs at all (all gradients finite)."""
        raise NotImplementedError

    def _check_engine(self) -> None:
        engine = self.engine
        if self.NEEDS_MATRIX_SHAPES and engine.flat_partitions:
            raise RuntimeError(
                f"{type(self).__name__} cannot precondition the flat 1-D parameter partitions "
                f"that {engine.name} hands the optimizer: the matrix structure its Kronecker "
                "factors need is gone, so it would silently degrade to its first-order "
                "optimizer. Use FSDP2 (fully_shard / accelerate fsdp_version: 2, which keeps "
                "parameter shapes and shards rows), DDP (optionally with optim_args "
                "shard_state=true), or a vector method (microadam, efcp_mfac) with FSDP1 / "
                "DeepSpeed.")

    def _all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        """``tensor`` summed (or ``op``) over the ranks holding the other parts of the
        parameters (ZeRO-1 partitions, FSDP2 shards); unchanged in a single process or DDP."""
        group = self.engine.reduce_group
        if group is not None:
            all_reduce(tensor, op=op, group=group)
        return tensor

    # -------------------------------------------------------------- step helpers
    @staticmethod
    def _run_closure(closure):
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _grad_work(self) -> list[tuple[int, dict, torch.Tensor, torch.Tensor]]:
        """``(index, group, param, local grad)`` for every parameter with a gradient, in group
        order; ``index`` counts all parameters (it seeds per-parameter randomness)."""
        work = []
        index = -1
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients; "
                                       "use dense gradients (e.g. nn.Embedding(sparse=False))")
                work.append((index, group, p, local_tensor(p.grad)))
        return work

    @staticmethod
    def _is_template_step(pairs) -> bool:
        """True for the step ``torch.distributed.checkpoint`` runs to materialise state (lr=0 and
        zero gradients for every ``(group, grad)`` pair): it must create state and change nothing
        else. The lr test comes first, so ordinary steps cost no host sync."""
        pairs = list(pairs)
        return bool(pairs) and all(as_float(g["lr"]) == 0.0 for g, _ in pairs) and \
            not any(bool(grad.any()) for _, grad in pairs)

    # -------------------------------------------------------------- non-finite gradients
    def _finite_flags(self, grads: list[torch.Tensor], params: list[torch.Tensor] | None = None
                      ) -> list[bool]:
        """One bool per gradient: all entries finite. A single host sync for the whole step.

        With ``params`` given and some of them sharded DTensors (FSDP2), the flags are combined
        over all ranks (one small all-reduce), so a non-finite entry in any shard skips the
        parameter on every rank: the shards never disagree on whether a step happened.
        """
        if not grads:
            return []
        device = grads[0].device
        by_device: dict[torch.device, list[int]] = {}
        for i, g in enumerate(grads):
            by_device.setdefault(g.device, []).append(i)
        ok = torch.empty(len(grads), dtype=torch.int32, device=device)
        for dev, idx in by_device.items():
            # min and max propagate NaN and expose inf: one cheap reduction, no temporary
            stats = torch.stack([torch.stack(torch.aminmax(grads[i])).float() if grads[i].numel()
                                 else torch.zeros(2, device=dev) for i in idx])
            ok[torch.tensor(idx, device=device)] = \
                torch.isfinite(stats).all(dim=1).to(device=device, dtype=torch.int32)
        if params is not None and any(is_sharded(p) for p in params) and dist.is_available() \
                and dist.is_initialized():
            all_reduce(ok, op=dist.ReduceOp.MIN)
        return [bool(v) for v in ok.tolist()]

    def _on_nonfinite(self, names: list[str]) -> None:
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"{type(self).__name__}: non-finite gradient (inf/NaN) for {', '.join(names)}; "
                "the optimizer state was left unchanged (pass nonfinite='skip' to skip instead)")
        warnings.warn(
            f"{type(self).__name__}: skipped the update of {len(names)} parameter(s) with "
            f"non-finite gradients ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}); "
            "their state is unchanged. Total skips so far: "
            f"{self.nonfinite_skips}", RuntimeWarning, stacklevel=3)

    @property
    def nonfinite_skips(self) -> int:
        """How many parameter updates were skipped because of non-finite gradients."""
        return sum(int(s.get("nonfinite_skips", 0)) for s in self.state.values())
