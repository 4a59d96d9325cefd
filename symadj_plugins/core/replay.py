"""What the backward pass's replay of the vector field must see again, and must not leave behind.

The symplectic adjoint evaluates ``f`` a second (and third) time in the backward pass. Like
``torch.utils.checkpoint``, it promises that each replayed evaluation sees what the forward evaluation saw and
that the replay has no side effects the forward pass did not have. This module is that promise, in one place:

- **Random numbers**: :class:`RandomnessWatch` notes, for each forward evaluation that drew random numbers
  (Dropout, ``torch.randn``), the generator state it started from (:class:`RngState`); the replay of that
  evaluation restores it and then puts the generator back. Evaluations that draw nothing cost no memory.
- **Autocast**: :class:`AutocastState` is captured when the forward pass starts and re-entered around every
  replayed evaluation (and only there: the sweep's own arithmetic stays in the state's dtype).
- **Hooks on parameters**: the per-stage vector–Jacobian products run with the parameters' tensor hooks
  suspended (:func:`hooks_suspended`), so a hook fires once, on the total gradient, as with backprop.
- **Module buffers**: :class:`BufferGuard` restores, after the backward pass, every buffer the forward pass
  updated in place (BatchNorm's running statistics...), so buffers end as backprop leaves them. A module that
  changes the function itself per call (``spectral_norm`` in training mode) cannot be replayed: refused.
- **A check that the replay reproduced the forward pass**: :class:`ReplayCheck` recomputes each step's end
  state from the replayed stage values and compares it with the stored one; a field that is not the same
  function in the backward pass (state mutated per call, attributes changed between forward and backward)
  fails loudly instead of giving a silently wrong gradient.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

__all__ = ["AutocastState", "BufferGuard", "RandomnessWatch", "ReplayCheck", "RngState", "generators_kept",
           "hooks_suspended"]


# --------------------------------------------------------------------------------------------------------
# Random numbers

@dataclass(frozen=True)
class RngState:
    """The state of the CPU generator and, for a CUDA state, of that device's generator.

    Attributes:
        cpu: ``torch.get_rng_state()`` (a ``uint8`` tensor of 5056 bytes).
        cuda: ``torch.cuda.get_rng_state(device)`` for the state's CUDA device, or ``None``.
        cuda_device: that device's index, or ``None``.
        draws: for an evaluation whose draws went through torch's random functions (:data:`RANDOM_FUNCTIONS`), per
            such call that drew (its index among the evaluation's calls of those functions), the state it drew from.
            Then the replay restores the state around each of those calls only, and draws by other threads between
            them do not matter; ``()``: the whole evaluation is replayed from this state.
    """

    cpu: torch.Tensor
    cuda: torch.Tensor | None = None
    cuda_device: int | None = None
    draws: tuple[tuple[int, RngState], ...] = ()

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        if device.type == "cuda":
            return cls(torch.get_rng_state(), torch.cuda.get_rng_state(device), device.index)
        return cls(torch.get_rng_state())

    def same_as(self, other: RngState) -> bool:
        if not torch.equal(self.cpu, other.cpu):
            return False
        return self.cuda is None or torch.equal(self.cuda, other.cuda)

    def tensors(self) -> list[torch.Tensor]:
        return [self.cpu] if self.cuda is None else [self.cpu, self.cuda]

    @classmethod
    def from_tensors(cls, tensors: Sequence[torch.Tensor], cuda_device: int | None) -> RngState:
        return cls(tensors[0], tensors[1] if len(tensors) > 1 else None, cuda_device)

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """Runs the block (one replayed evaluation) with the random numbers the forward evaluation drew, then puts the
        generators back where they were."""
        if self.draws:
            with _DrawSpy(self.cuda_device_or_cpu(), replay=dict(self.draws)):
                yield
            return
        with _RNG_LOCK, self._restored():
            yield

    def cuda_device_or_cpu(self) -> torch.device:
        return torch.device("cuda", self.cuda_device) if self.cuda is not None else torch.device("cpu")

    @contextlib.contextmanager
    def _restored(self) -> Iterator[None]:
        before = RngState.capture(self.cuda_device_or_cpu())
        self._set()
        try:
            yield
        finally:
            before._set()

    def _set(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, torch.device("cuda", self.cuda_device))


# Held while one of this package's evaluations draws from (or replays) the generators, so that solves in other
# threads, which take it too, do not draw in between. Re-entrant: a vector field may itself run a solve.
_RNG_LOCK = threading.RLock()


def _random_functions() -> frozenset:
    """torch's functions and tensor methods that draw from the default generators (unless given ``generator=``)."""
    F, T = torch.nn.functional, torch.Tensor
    names = [
        (torch, ("rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "bernoulli",
                 "normal", "poisson", "multinomial", "binomial", "dropout", "alpha_dropout", "feature_dropout",
                 "feature_alpha_dropout", "rrelu", "rrelu_", "_standard_gamma", "_sample_dirichlet")),
        (F, ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "rrelu",
             "gumbel_softmax")),
        (T, ("bernoulli", "bernoulli_", "normal_", "uniform_", "random_", "exponential_", "geometric_", "cauchy_",
             "log_normal_", "multinomial")),
        (torch.nn.init, ("uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "xavier_normal_",
                         "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")),
    ]
    return frozenset(getattr(owner, name) for owner, group in names for name in group if hasattr(owner, name))


RANDOM_FUNCTIONS = _random_functions()


class _DrawSpy(torch.overrides.TorchFunctionMode):
    """Sees, in this thread only (torch function modes are per thread), each call of a function of
    :data:`RANDOM_FUNCTIONS` during one evaluation of ``f``.

    Recording (``replay=None``): notes in ``draws`` the generator state each such call drew from. Replaying: restores
    the recorded state around the call of the same index, and puts the generators back after it. Both hold
    ``_RNG_LOCK`` around the call, so that another thread's evaluation does not draw in between.
    """

    def __init__(self, device: torch.device, replay: dict[int, RngState] | None = None, put_back: bool = False):
        super().__init__()
        self.device, self.replay, self.put_back = device, replay, put_back
        self.draws: list[tuple[int, RngState]] = []
        self._count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _is_random(func) or kwargs.get("generator") is not None:
            return func(*args, **kwargs)
        if self.put_back:
            with _RNG_LOCK, RngState.capture(self.device)._restored():
                return func(*args, **kwargs)
        index, self._count = self._count, self._count + 1
        if self.replay is not None:
            state = self.replay.get(index)
            if state is None:  # the forward evaluation's call drew nothing
                return func(*args, **kwargs)
            with _RNG_LOCK, state._restored():
                return func(*args, **kwargs)
        with _RNG_LOCK:
            before = RngState.capture(self.device)
            out = func(*args, **kwargs)
            if not before.same_as(RngState.capture(self.device)):
                self.draws.append((index, before))
        return out


def _is_random(func) -> bool:
    try:
        return func in RANDOM_FUNCTIONS
    except TypeError:  # not hashable: not one of them
        return False


class RandomnessWatch:
    """Runs forward evaluations of ``f`` and tells which ones drew random numbers, in this thread.

    ``call`` returns ``f``'s value and, if the evaluation drew random numbers, the :class:`RngState` its replay needs
    (``None`` otherwise: a deterministic field holds nothing). torch has one generator per device for all threads, so
    an evaluation is watched in two ways: its calls of torch's random functions are seen in this thread only
    (:class:`_DrawSpy`), each noted with the state it drew from; and the generators are compared before and after,
    which also catches draws by other means (a C++ extension) but cannot tell them from another thread's. Such a
    change is counted as this evaluation's only while no other Python thread runs.

    Watching costs as much as a small network's evaluation, so once a whole step has drawn nothing (:meth:`settle`),
    the evaluations are no longer watched one by one; :meth:`verify` then checks, after the solve, that the generators
    have not moved since, and refuses the solve if they have (again only while no other Python thread runs: a solve
    is not refused for another thread's draws).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.drew = False
        self._unwatched_since: RngState | None = None

    def call(self, fn: Callable[..., torch.Tensor], *args, **kwargs) -> tuple[torch.Tensor, RngState | None]:
        if self._unwatched_since is not None:
            return fn(*args, **kwargs), None
        spy = _DrawSpy(self.device)
        before = RngState.capture(self.device)
        with spy:
            out = fn(*args, **kwargs)
        if spy.draws:
            self.drew = True  # the first draw's state stands for the evaluation's (no third state kept)
            return out, dataclasses.replace(spy.draws[0][1], draws=tuple(spy.draws))
        if before.same_as(RngState.capture(self.device)) or _other_threads_run():
            return out, None
        self.drew = True  # drawn by other means than torch's random functions: replayed from the state before
        return out, before

    def settle(self) -> None:
        """A whole step was evaluated: if nothing drew random numbers, stop watching each evaluation."""
        if not self.drew and self._unwatched_since is None:
            self._unwatched_since = RngState.capture(self.device)

    def verify(self) -> None:
        """After the solve: raises if random numbers were drawn while evaluations were not watched."""
        if self._unwatched_since is not None and not self._unwatched_since.same_as(RngState.capture(self.device)) \
                and not _other_threads_run():
            raise ValueError(
                "random numbers were drawn during the solve after a first step that drew none (by the vector field, "
                "or by a callback): the symplectic adjoint replays each evaluation of f with the random numbers it "
                "drew, and could not record these. Draw them in every evaluation (as Dropout does), draw them outside "
                "the solve, or use backprop (torchdiffeq.odeint / sensitivity='autograd').")


@contextlib.contextmanager
def generators_kept(device: torch.device) -> Iterator[None]:
    """Runs the block (evaluations of ``f`` that are no replay, like the t-gradient's) without moving the generators:
    each call of torch's random functions draws, and the generators are put back after it. Draws by other means are
    undone at the end while no other Python thread runs (which another thread's draws would be)."""
    whole = None if _other_threads_run() else RngState.capture(device)
    try:
        with _DrawSpy(device, put_back=True):
            yield
    finally:
        if whole is not None:
            whole._set()


def _other_threads_run() -> bool:
    """Whether another Python thread is alive (then a change of the shared generators may be its draw)."""
    return threading.active_count() > 1


# --------------------------------------------------------------------------------------------------------
# Autocast

_DEVICE_TYPES = ("cpu", "cuda")


@dataclass(frozen=True)
class AutocastState:
    """Which autocast contexts were active (device type -> dtype), and the autocast cache flag."""

    enabled: tuple[tuple[str, torch.dtype], ...]
    cache: bool

    @classmethod
    def capture(cls) -> AutocastState:
        enabled = tuple((device, _autocast_dtype(device)) for device in _DEVICE_TYPES if _autocast_enabled(device))
        return cls(enabled, torch.is_autocast_cache_enabled())

    def needs_entering(self) -> bool:
        """Whether a replay must change the autocast state it finds (captured on, or some autocast on now)."""
        return bool(self.enabled) or any(_autocast_enabled(device) for device in _DEVICE_TYPES)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Re-enters exactly the captured autocast state (and leaves any other autocast of the caller off)."""
        with contextlib.ExitStack() as stack:
            active = dict(self.enabled)
            for device in _DEVICE_TYPES:
                if device in active:
                    stack.enter_context(torch.autocast(device, dtype=active[device], cache_enabled=self.cache))
                elif _autocast_enabled(device):
                    stack.enter_context(torch.autocast(device, enabled=False))
            yield


def _autocast_enabled(device: str) -> bool:
    try:
        return torch.is_autocast_enabled(device)
    except TypeError:  # torch < 2.4: one function per device type
        return torch.is_autocast_cpu_enabled() if device == "cpu" else torch.is_autocast_enabled()


def _autocast_dtype(device: str) -> torch.dtype:
    try:
        return torch.get_autocast_dtype(device)
    except AttributeError:  # torch < 2.4
        return torch.get_autocast_cpu_dtype() if device == "cpu" else torch.get_autocast_gpu_dtype()


# --------------------------------------------------------------------------------------------------------
# Hooks on parameters

@contextlib.contextmanager
def hooks_suspended(tensors: Iterable[torch.Tensor]) -> Iterator[None]:
    """Suspends the tensor hooks (``register_hook``) of leaf tensors for the block.

    The sweep takes one vector–Jacobian product per stage with respect to the parameters and returns their sum;
    autograd then runs the parameters' hooks on that sum. Without this, a hook would also run on every per-stage
    product (``p.register_hook(lambda g: 2 * g)`` would double each term and then the total). Only parameters that
    have hooks are touched. Another thread differentiating the same parameter during the block would not see its
    hooks either: the same caveat as any code that swaps hooks.
    """
    hooked = [(p, p._backward_hooks) for p in tensors if p._backward_hooks]
    for p, _ in hooked:
        p._backward_hooks = None
    try:
        yield
    finally:
        for p, hooks in hooked:
            p._backward_hooks = hooks


# --------------------------------------------------------------------------------------------------------
# Module buffers

_RUNNING_STATISTICS = (torch.nn.modules.batchnorm._NormBase,)  # BatchNorm*, InstanceNorm*, SyncBatchNorm


def _changes_function(module: torch.nn.Module, buffer_name: str) -> bool:
    """Whether an in-place update of this buffer during a solve changes what the module computes."""
    if isinstance(module, _RUNNING_STATISTICS):
        # In training mode normalisation uses the batch's statistics; the running ones are only written.
        return False
    spectral = buffer_name.endswith("_u") or buffer_name.endswith("_v")
    return spectral and (any(type(h).__name__ == "SpectralNorm" for h in module._forward_pre_hooks.values())
                         or type(module).__name__ == "_SpectralNorm")


class BufferGuard:
    """Notices which module buffers the forward solve updates in place, and undoes the replay's updates.

    The modules are those the field is declared to be made of (``modules``) and every module it calls while the
    forward solve runs (found by a module forward pre-hook active only in the solving thread, during
    :meth:`watching`), so a function or lambda closing over modules is guarded like an ``nn.Module`` field. A module
    reached for the first time has its buffers' versions noted then, before it runs.

    Usage: ``guard = BufferGuard(modules, params)`` before the forward solve, ``with guard.watching(): <solve>``,
    ``guard.after_forward()`` after it (raises if a module changes its own function per call), then
    ``with guard.restoring(): <backward sweep>``.

    Args:
        modules: the modules the field is declared to be made of.
        params: the parameters the solve differentiates.
        params_inferred: whether the adapter found ``params`` itself (the field module's ``parameters()``) rather
            than the caller listing them: then a module the field calls whose parameters require grad and are not
            among them is refused (they would silently get no gradient, where backprop gives them one).

    Raises:
        ValueError: (at construction, or at the module's first call in the solve) a module of the field is sharded
            by FSDP, whose hooks swap its parameters on every call (see :func:`_check_not_sharded`); or, with
            ``params_inferred``, it has parameters the solve does not differentiate.
    """

    def __init__(self, modules: Iterable[torch.nn.Module], params: Sequence[torch.Tensor] = (),
                 params_inferred: bool = False):
        self._param_ids = {id(p) for p in params}
        self._params_inferred = params_inferred
        self._seen: set[int] = set()
        self._buffers: list[tuple[str, torch.nn.Module, str, torch.Tensor]] = []
        self._versions: list[int] = []
        for m in _unique_modules(modules):
            self._reach(m)
        self.updated: list[torch.Tensor] = []
        self.suspects: list[str] = []

    def _reach(self, module: torch.nn.Module) -> None:
        """Notes ``module``'s own buffers and their versions, once."""
        if id(module) in self._seen:
            return
        _check_not_sharded(module, self._param_ids)
        if self._params_inferred:
            _check_parameters_found(module, self._param_ids)
        self._seen.add(id(module))
        for name, b in module.named_buffers(recurse=False):
            self._buffers.append((f"{type(module).__name__}.{name}", module, name, b))
            self._versions.append(b._version)

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Runs the forward solve, noting every module the field calls in this thread (other threads' calls are
        theirs: a global hook sees them too)."""
        thread = threading.get_ident()

        def reached(module: torch.nn.Module, args) -> None:
            if threading.get_ident() == thread and id(module) not in self._seen:
                self._reach(module)

        handle = torch.nn.modules.module.register_module_forward_pre_hook(reached)
        try:
            yield
        finally:
            handle.remove()

    def after_forward(self) -> None:
        changed = [(label, m, name, b) for (label, m, name, b), v in zip(self._buffers, self._versions)
                   if b._version != v]
        function_changing = [label for label, m, name, _ in changed if _changes_function(m, name)]
        if function_changing:
            raise ValueError(
                f"the vector field changes its own function on every call ({', '.join(function_changing)} was updated "
                "in place during the solve: spectral_norm's power iteration in training mode). The symplectic adjoint "
                "evaluates f again in the backward pass and would differentiate different weights than the forward "
                "pass used. Put those modules in eval mode for the solve (module.eval()), or use backprop "
                "(torchdiffeq.odeint / sensitivity='autograd').")
        # Normalisation layers update their running statistics inside the kernel, without bumping the version
        # counter: in training mode they are updated on every call, so they count as updated whatever it says.
        running = [b for _, m, name, b in self._buffers
                   if isinstance(m, _RUNNING_STATISTICS) and m.training and m.track_running_stats]
        self.updated = list({id(b): b for b in [*(b for *_, b in changed), *running]}.values())
        self.suspects = [label for label, m, name, _ in changed if not isinstance(m, _RUNNING_STATISTICS)]
        self._buffers, self._versions = [], []

    @contextlib.contextmanager
    def restoring(self) -> Iterator[None]:
        """Runs the block and then puts the updated buffers back to their values at its start."""
        saved = [b.detach().clone() for b in self.updated]
        try:
            yield
        finally:
            with torch.no_grad():
                for b, value in zip(self.updated, saved):
                    b.copy_(value)


_FSDP_ADVICE = (
    "Shard a module that calls the solver in its forward and contains the vector field (the ODE block, or the whole "
    "model), and not the vector field or its submodules: torch.distributed.fsdp.fully_shard(model) (FSDP2), or "
    "FullyShardedDataParallel(model, use_orig_params=True) (FSDP1) without an auto_wrap_policy that wraps modules "
    "inside the field. Or use backprop (torchdiffeq.odeint / sensitivity='autograd').")


def _check_parameters_found(module: torch.nn.Module, param_ids: set[int]) -> None:
    """Refuses a module the field calls whose own parameters require grad but are not differentiated."""
    missing = [name for name, p in module.named_parameters(recurse=False) if p.requires_grad and id(p) not in param_ids]
    if missing:
        raise ValueError(
            f"the vector field calls a {type(module).__name__} whose parameters ({', '.join(missing)}) require grad "
            "but are not among the parameters of the vector field module, which are the ones the symplectic adjoint "
            "differentiates: they would get no gradient. Make that module a submodule of the vector field (an "
            "attribute of the nn.Module you pass), or with torchdiffeq pass the parameters as adjoint_params; or use "
            "backprop (torchdiffeq.odeint / sensitivity='autograd').")


def _fsdp_module_types() -> tuple[type, ...]:
    """FSDP2's ``FSDPModule`` and FSDP1's ``FullyShardedDataParallel``, those that this torch has."""
    if not torch.distributed.is_available():
        return ()
    types: list[type] = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        types.append(FullyShardedDataParallel)
        from torch.distributed.fsdp import FSDPModule
        types.append(FSDPModule)
    except ImportError:  # an older torch: no FSDP2
        pass
    return tuple(types)


def _check_not_sharded(module: torch.nn.Module, param_ids: set[int]) -> None:
    """Refuses a module whose parameters FSDP swaps per call, so that the parameters the symplectic adjoint
    differentiates (read before the solve) are not those ``f`` uses.

    - FSDP around the field or a module inside it (FSDP2 ``fully_shard``, FSDP1 ``FullyShardedDataParallel``): its
      pre-forward hook all-gathers and installs unsharded parameters on each call and its post-forward hook puts the
      shards back; the gradient of the unsharded ones is reduce-scattered by hooks that the backward pass's replay
      does not run. The parameters the solve received get no gradient (FSDP2: ``None`` or zero; FSDP1: zero).
    - FSDP1 with ``use_orig_params=False`` around a module that contains the field: during the forward pass the
      field's modules hold plain views of a flat parameter instead of their parameters, so the field has no
      parameters to differentiate.
    """
    if isinstance(module, _fsdp_module_types()):
        raise ValueError(
            f"the vector field's module {type(module).__name__} is sharded by FSDP: FSDP swaps its parameters for "
            "unsharded ones on every call, so the symplectic adjoint, which evaluates f again in the backward pass, "
            f"would differentiate parameters f does not use (they would get no gradient). {_FSDP_ADVICE}")
    for name, value in vars(module).items():
        replaced = (isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter)
                    and value.requires_grad and isinstance(value._base, torch.nn.Parameter)
                    and id(value._base) not in param_ids and name not in module._parameters)
        if replaced:
            raise ValueError(
                f"the vector field's module {type(module).__name__} holds {name!r} as a view of a parameter that is "
                "not among the parameters differentiated (FullyShardedDataParallel with use_orig_params=False replaces "
                "parameters by views of its flat parameter during the forward pass): the field's parameters would get "
                "no gradient. Use FullyShardedDataParallel(model, use_orig_params=True), or pass the parameter in "
                f"adjoint_params. {_FSDP_ADVICE}")


def _unique_modules(modules: Iterable[torch.nn.Module]) -> list[torch.nn.Module]:
    seen: dict[int, torch.nn.Module] = {}
    for root in modules:
        for m in root.modules():
            seen.setdefault(id(m), m)
    return list(seen.values())


# --------------------------------------------------------------------------------------------------------
# Did the replay reproduce the forward pass?

class ReplayCheck:
    """Compares each replayed step's end state ``y_n + Σ h b_i k_i`` with the stored ``y_{n+1}``.

    The forward pass formed the same sum from the same stage values, in its own order of operations, so the
    two agree to a few units of rounding per term: the tolerance is ``64·s·eps·(max|y_n| + Σ |h b_i| max|k_i|)``.
    A larger difference means the field was not the same function in the replay. The sum is accumulated as the stage
    values come (one state of memory, no stage value held), and so is the worst step so far (a few scalars, not a
    figure per step: the check's memory does not grow with the number of steps); they stay on the device and are read
    once, after the sweep (no host synchronisation per step).
    """

    def __init__(self, like: torch.Tensor, num_stages: int):
        dtype = like.abs().dtype  # the figures are real for a complex state
        device = like.device
        self._empty = like.numel() == 0  # nothing to compare
        self.rounding = 64 * num_stages * torch.finfo(dtype).eps
        self._sum = torch.empty_like(like)  # y_n + Σ h b_i k_i of the step under way
        self._scale = torch.zeros((), dtype=dtype, device=device)  # max|y_n| of the step under way
        self._norms = torch.zeros(num_stages, dtype=dtype, device=device)  # max|k_i| of its stages (0: not replayed)
        self._norm_slots = self._norms.unbind(0)
        self._hb_abs = self._norms  # |h b_i| of the step under way, set by begin_step
        # The step whose deviation exceeds its tolerance the most so far: excess, deviation, step index.
        self._worst = torch.full((), -math.inf, dtype=dtype, device=device)
        self._worst_deviation = torch.zeros((), dtype=dtype, device=device)
        self._worst_step = torch.zeros((), dtype=torch.long, device=device)

    def begin_step(self, n: int, y0: torch.Tensor, hb: torch.Tensor, sums: bool = True) -> None:
        """A replayed step starts from ``y0`` (flat); ``hb``: its weights ``h b_i`` (``(s,)``). ``sums=False``: the
        caller forms the step's end state itself (:meth:`end_step`'s ``replayed``), so no sum is started."""
        if self._empty:
            return
        self._hb_abs = hb.abs()  # once per step, not per stage
        if sums:
            self._sum.copy_(y0)
        self._norms.zero_()
        torch.linalg.vector_norm(y0, math.inf, out=self._scale)

    def add_stage(self, i: int, k: torch.Tensor, hb_i: torch.Tensor) -> None:
        """Stage ``i``'s replayed value ``k`` (flat) and its weight ``h b_i``."""
        if self._empty:
            return
        self._sum.addcmul_(k, hb_i)
        self.note_stage(i, k)

    def note_stage(self, i: int, k: torch.Tensor) -> None:
        """Stage ``i``'s replayed value ``k`` (flat), for the tolerance only: the caller forms the end state itself
        (:meth:`end_step`'s ``replayed``)."""
        if self._empty:
            return
        torch.linalg.vector_norm(k, math.inf, out=self._norm_slots[i])

    def end_step(self, n: int, y1: torch.Tensor, replayed: torch.Tensor | None = None) -> None:
        """The stored end state ``y1`` (flat) of the step; ``replayed``: the replay's own ``y_n + Σ h b_i k_i`` (flat,
        overwritten), when the caller formed it instead of :meth:`add_stage`."""
        if self._empty:
            return
        replayed = self._sum if replayed is None else replayed
        deviation = torch.linalg.vector_norm(replayed.sub_(y1), math.inf)
        excess = deviation - self.rounding * (self._scale + torch.dot(self._hb_abs, self._norms))
        worse = excess > self._worst
        self._worst = torch.where(worse, excess, self._worst)
        self._worst_deviation = torch.where(worse, deviation, self._worst_deviation)
        self._worst_step = torch.where(worse, n, self._worst_step)

    def raise_if_failed(self, suspects: Sequence[str] = ()) -> None:
        if not bool(self._worst > 0):
            return
        hint = f" Buffers updated in place during the solve: {', '.join(suspects)}." if suspects else ""
        raise RuntimeError(
            f"the backward pass's replay of step {int(self._worst_step)} did not reproduce the forward pass (its end "
            f"state differs by {float(self._worst_deviation):.3g}, more than rounding): the vector field was not the "
            "same function in the backward pass, and the gradient would be wrong. Causes: a module that changes its "
            "state on every call, attributes or parameters changed between the forward pass and backward(), or "
            f"nondeterministic operations.{hint} Use backprop (torchdiffeq.odeint / sensitivity='autograd') for such a "
            "field, or make it a pure function of (t, y) and its parameters during the solve.")
