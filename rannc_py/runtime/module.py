"""``RaNNCModule``: wrap an unmodified model and train it across MPI ranks.

Semantics are DDP's: every rank calls the module with its local batch; the
global batch is the ranks' local batches concatenated in rank order; the
returned loss is the same on every rank and is the mean of the model's
per-microbatch losses (each replica's share of a microbatch weighted by its
rows, which is the plain mean when microbatches hold equal token counts).

How ``loss.backward()`` works: the whole schedule (every microbatch's forward
and backward, in 1F1B, GPipe, ZB-H1, interleaved 1F1B or ZB-V order, so 1F1B keeps its
memory advantage)
runs inside the forward call, and the gradient allreduce ends it. The
gradients are held aside; the returned loss is attached to a tiny autograd
function whose backward adds ``incoming gradient x held gradients`` to
``.grad``. So ``loss.backward()`` sets eager's gradients, ``(loss / k)
.backward()`` over k calls accumulates like eager, and ``optimizer.step()``
needs no hook. Only the loss carries a gradient; other outputs (logits, ...)
are returned detached, for this rank's local rows (``return_outputs=False``
skips moving them).

A plan with several model chunks per rank (interleaved 1F1B, ZB-V: ``plan=dict(stages=4,
schedule="interleaved", chunks=2, ...)``) gives a rank several stages: it holds the union of
their parameters (one tensor for a parameter two of them read), runs one program and executor
per stage, and walks its one action list over them (:func:`~rannc_py.runtime.executor.run_actions`).

A plan whose stages have a tensor degree t > 1 (``plan=dict(..., tensor=2)``)
runs each stage replica as a tensor group of t ranks
(:mod:`rannc_py.runtime.tensor_stages`): each rank holds its shards of the
split parameters, so the optimizer steps shards; ``state_dict()`` joins them
into full tensors and ``load_state_dict`` keeps each rank's shard of a full
one. Checkpoints refuse tensor > 1 (ConfigError); ``optimizer_state_dict`` joins the shards.

The data-parallel (and tied-weight) gradient sums are bucketed allreduces on
their own communicators; each bucket starts during the step's last backward
as soon as its gradients are final, and forward waits for all of them before
it returns.

The first call traces the model (in training mode, whatever the call's mode),
plans on rank 0 and broadcasts the plan (or uses ``plan=``), builds this rank's stage,
keeps only its parameters (materialising them from ``meta`` when needed),
copies their values from rank 0 (as DDP does; from each tensor's first holder
when rank 0's model is on ``meta``) and rebinds the optimizer to them. A later call of another input structure or
mode gets a program of its own on the same layout (:mod:`signatures`).
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import os
import weakref
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any

import torch
import torch.utils._pytree as pytree
from mpi4py import MPI
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys
from typing_extensions import Self  # Python 3.10 has no typing.Self; torch depends on typing_extensions

from rannc_py.comm import dedicate_cores
from rannc_py.comm.work import in_flight
from rannc_py.errors import ConfigError, RaNNCError
from rannc_py.planner.options import PlanOptions
from rannc_py.planner.plan import Plan
from rannc_py.runtime import params as P
from rannc_py.runtime.executor import StepInputs, run_actions
from rannc_py.runtime.failure import Watchdog, abort_on_error, agreed, install_excepthook
from rannc_py.runtime.grads import GradSync, HeldGrads, clip_grad_norm_
from rannc_py.runtime.io import gather_inputs, return_outputs
from rannc_py.runtime.layout import RUN_SCHEDULES, PlanArg, check_chunked, check_plan_arg, load_plan
from rannc_py.runtime.optim_state import OptimizerState, original_groups
from rannc_py.runtime.placement import place
from rannc_py.runtime.sharding import ShardedStep, stage_levels
from rannc_py.runtime.signatures import (
    CallProgram,
    Layout,
    agree,
    agree_outcome,
    build_program,
    call_key,
    describe_sizes,
    difference,
    make_executors,
    trace_call,
)
from rannc_py.runtime.tensor_stages import position_ranks
from rannc_py.runtime.trace import check_trace_arg, clock_ns
from rannc_py.schedule import by_name
from rannc_py.schedule.generators import forward_only_on

OptimizerArg = torch.optim.Optimizer | Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None


class _ApplyHeld(torch.autograd.Function):
    """Identity on the loss value whose backward applies the held gradients.

    A second backward through the same loss raises RuntimeError, as in eager
    PyTorch: without ``retain_graph=True`` autograd's own error (the anchor is
    saved for backward, so the freed graph is noticed); with it, ours, because
    the gradients were computed once in the forward call and are applied
    once (adding them again would need a copy of every gradient kept for as
    long as the graph lives).
    """

    @staticmethod
    def forward(ctx: Any, anchor: Tensor, loss: Tensor, apply: Callable[[Tensor], None]) -> Tensor:
        ctx.save_for_backward(anchor)
        ctx.apply_held = apply
        ctx.applied = False
        return loss.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None, None]:
        _ = ctx.saved_tensors  # raises autograd's "backward through the graph a second time" once freed
        if ctx.applied:
            raise RuntimeError(
                "backward() ran a second time through a RaNNCModule loss (retain_graph=True): its gradients "
                "were computed in the forward call and are applied once; call the module again instead"
            )
        ctx.applied = True
        ctx.apply_held(grad)
        return None, None, None


class RaNNCModule(nn.Module):
    """Train ``model`` with automatic pipeline + data parallelism over the MPI ranks.

    Args:
        model: an unmodified ``nn.Module`` that returns its loss (a 0-dim
            tensor, e.g. a Hugging Face model given ``labels``). May live on
            the ``meta`` device; then only this rank's parameters are allocated.
        optimizer: the user's optimizer built on ``model.parameters()`` (it is
            rebound to this rank's parameters, keeping groups and
            hyperparameters), or a factory ``params -> optimizer`` (needed for
            meta models), or None. Default None.
        plan: a :class:`rannc_py.Plan`, a path to a saved plan, or a layout
            dict ``dict(stages=2, replicas=[2, 1], microbatches=4,
            schedule="1f1b", recompute=False)`` (schedule "1f1b", "gpipe",
            "zb-h1", or with several stages per rank "interleaved" (``chunks=``,
            default 2) and "zb-v", replicas then per pipeline position; ``tensor=2`` splits every stage over tensor groups of 2
            ranks, each replica one group: see :mod:`rannc_py.runtime.layout`). Default None: the planner
            searches on rank 0 on the first call, with ``options``.
            A layout dict's keys and values and a plan file are checked here;
            the fit to the world size and to the traced model (ops, graph
            fingerprint) on the first call.
        save_plan: write the plan used to this JSON path (rank 0). Default None.
        param_init: ``callable(module)`` that initialises a module materialised
            from ``meta``. Default None (``module.reset_parameters()``).
        bucket_bytes: size of a gradient allreduce bucket. Default 25 MiB.
        timeout: seconds one call of a step (and of ``state_dict``,
            ``load_state_dict``, ``clip_grad_norm_``) may take on a rank before
            the job is ended with a message naming the rank, the call and the
            schedule action it waits on (a rank that stopped or failed, a
            collective called on only some ranks). The first call's tracing,
            profiling and planning are not timed. Default None (no limit).
        trace: record a measured timeline of ``trace_steps`` training steps
            (after the first, which traces and plans) and write it here as a
            trace-event JSON for Perfetto / ``chrome://tracing``, with a PNG
            beside it drawing it above the predicted timeline
            (:mod:`rannc_py.runtime.trace`). Written by rank 0 at the forward
            call after the last recorded step, or by :meth:`write_trace` /
            :meth:`close` before that. Default None (off; no cost).
        trace_steps: training steps to record with ``trace``. Default 3.
        **options: the planning options of :class:`rannc_py.PlanOptions`, each
            with the default documented there: ``cluster`` (default
            ``"local:ranks=<ranks>"``, this machine, measured once and
            cached), ``memory_limit``, ``memory_margin``, ``microbatches``,
            ``schedules``, ``recompute``, ``max_stages``, ``num_stages``,
            ``replicas``, and ``return_outputs`` (also read by the runtime:
            True returns outputs other than scalars, e.g. logits, on every
            rank for its local rows; False returns None for them and saves
            moving them), ``update_cost`` (measured from the user's
            optimizer when not given; its state buffers are always counted
            from it), and ``shard_optimizer`` (the sharding level per stage:
            gradients reduce-scattered, each replica stepping its shard of
            the optimizer state, parameters allgathered after
            ``optimizer.step()``; see :mod:`rannc_py.runtime.sharding`).

    Raises:
        ConfigError: an argument or option cannot be used (checked here, on
            every rank: each raises the lowest failing rank's error).
        PlanError: ``plan`` is a path to a missing or malformed plan file.
    """

    _model: nn.Module  # held outside the module tree (see __init__)
    _closed = False  # set by close()

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerArg = None,
        *,
        plan: Plan | str | os.PathLike[str] | Mapping[str, Any] | None = None,
        save_plan: str | os.PathLike[str] | None = None,
        param_init: Callable[[nn.Module], None] | None = None,
        bucket_bytes: int = 25 * 2**20,
        timeout: float | None = None,
        trace: str | os.PathLike[str] | None = None,
        trace_steps: int = 3,
        **options: Any,
    ) -> None:
        super().__init__()
        self._comm = MPI.COMM_WORLD.Dup()
        install_excepthook()  # from now on an uncaught exception on any rank ends every rank
        try:
            self._options, self._plan_arg, self._tracer = agreed(
                self._comm, "RaNNCModule()", lambda: _check_args(model, plan, bucket_bytes, timeout, options)
                + (check_trace_arg(trace, trace_steps),))
        except RaNNCError:
            self._comm.Free()
            raise
        # Kept outside the module tree: after setup it holds only meta placeholders.
        object.__setattr__(self, "_model", model)
        self._optimizer = optimizer
        self._save_plan = save_plan
        self._param_init = param_init
        self._bucket_bytes = bucket_bytes
        self._watchdog = Watchdog(timeout, self._comm)
        _open_modules.add(self)  # freed at exit unless closed before
        self._ready = False
        self.training = model.training

    # ------------------------------------------------------------- setup
    @property
    def plan(self) -> Plan | None:
        """The plan in use (None before the first call)."""
        return self._plan if self._ready else None

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer over this rank's parameters (None before the first call when given as a factory)."""
        opt = self._optimizer
        return opt if isinstance(opt, torch.optim.Optimizer) else None

    def _setup(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        model, comm = self._model, self._comm
        rank = comm.Get_rank()
        self._dedicated = dedicate_cores(comm)  # collective: how the engine waits, before the link is measured
        self._names = P.canonical_names(model)
        # Planned from a training-mode trace whatever the first call's mode: the layout is for training.
        graph = trace_call(model, args, kwargs, True, self._names)
        with torch.enable_grad():  # profiling runs backward, also under a caller's no_grad()
            self._plan = self._make_plan(graph, graph.batch_size * comm.Get_size(),
                                         graph.flatten_inputs(args, kwargs))
        check_chunked(self._plan)  # the same plan on every rank: each raises alike
        if self._save_plan is not None and rank == 0:
            self._plan.save(self._save_plan)
        placement = place(model, graph, self._plan, self._names, comm, self._param_init)
        self._local, self._params, self._owned = placement.local, placement.params, placement.owned
        self._tensor = placement.tensor
        groups = original_groups(self._optimizer, model)  # before rebinding: torch's numbering of the params
        self._bind_optimizer()  # before release(): the optimizer is matched to the model's parameters
        self._trace_optimizer()
        split = {} if self._tensor is None else self._tensor.shards
        P.release(model, keep=set(self._local) - set(split))  # a split parameter: only the rank's shard stays
        # a stage's replicas (at each tensor position): the planned algorithm
        algorithms = {st.replica_ranks(p): st.allreduce for st in self._plan.stages for p in range(st.tensor)}
        # sharded over a stage's replicas at each tensor position (each position's shards its own)
        levels = stage_levels([(st.replica_ranks(p), st.shard_level) for st in self._plan.stages
                               for p in range(st.tensor)], self.optimizer, self._params, comm)
        self._sync = GradSync(self._params, placement.grad_holders or placement.holders, placement.grad_order, comm,
                              self._bucket_bytes, algorithms, levels, sets=placement.grad_sets)
        self._shards = ShardedStep(self._sync.sharded)
        if self.optimizer is not None and self._sync.sharded:
            self._shards.attach(self.optimizer)
        self._opt_state = None if self.optimizer is None else OptimizerState(
            self.optimizer, groups, {id(p): f for f, p in self._params.items()},
            [pc for pcs in self._shards.pieces.values() for pc in pcs], lambda f: P.get_tensor(model, f).shape,
            self._owned, [f for f in dict.fromkeys(self._names.values()) if f in placement.holders], comm,
            None if self._tensor is None else P.SplitAt(self._tensor.shards, self._tensor.position,
                                                        self._tensor.degree))
        self._held = HeldGrads([*self._params.values(), *self._shards.shard_params()])
        position = 0 if self._tensor is None else self._tensor.position
        positions = position_ranks(self._plan)
        self._out_ranks = [at[0] for at in positions]  # position 0 of the last stage returns the outputs
        self._layout = Layout(graph=graph, assignment=self._plan.assignment(), stages=placement.stages,
                              stage_ranks=[at[position] for at in positions], names=self._names, local=self._local,
                              recompute={s: self._plan.stages[s].recompute for s in placement.stages},
                              keep_outputs=self._options.return_outputs, positions=self._plan.num_positions,
                              tensor=self._tensor)
        for prog in placement.programs.values():
            prog.module.train(self.training)
        first = CallProgram(
            graph=graph, executors=make_executors(self._layout, placement.programs, comm),
            modules=[prog.module for prog in placement.programs.values()], training=True,
            input_dims=placement.input_dims, output_dims=placement.output_dims)
        describe_sizes(first)
        key, _ = call_key(args, kwargs, True)
        self._programs: dict[tuple[Any, ...], list[CallProgram]] = {key: [first]}
        # The first call's structure (shapes only), to say how a call that cannot be mapped differs.
        self._first = pytree.tree_map(lambda x: torch.empty(x.shape, device="meta") if isinstance(x, Tensor) else x,
                                      (tuple(args), dict(kwargs), self.training))
        self._graph = graph
        self._anchor = torch.zeros((), requires_grad=True)
        self._ready = True

    def _make_plan(self, graph: Any, batch: int, inputs: dict[str, Tensor]) -> Plan:
        comm, opts = self._comm, self._options
        given = None
        if self._plan_arg is not None:
            given = load_plan(self._plan_arg, graph, batch, comm.Get_size())
            if not isinstance(self._plan_arg, Mapping):
                return given  # a saved or made plan carries its own predictions
        from rannc_py.planner.api import plan_graph, predict_plan
        from rannc_py.runtime.autoplan import (
            job_cluster,
            job_contention,
            job_link,
            job_optimizer,
            job_profile,
            job_tensor_annotation,
            job_tensor_overhead,
            quiet_bcast,
            with_contention,
        )

        link = job_link(opts.cluster, comm)  # collective: the job's ranks measure the local link
        contention = job_contention(opts.cluster, comm, self._dedicated)  # collective too
        text = None
        if comm.Get_rank() == 0:
            cluster = with_contention(job_cluster(opts, comm.Get_size(), link), contention)
            per_tensor = job_tensor_overhead(self._optimizer, opts.cluster, comm.Get_size())
            if per_tensor is not None:  # the user's optimizer's own per-tensor work, measured
                cluster = dataclasses.replace(
                    cluster, device=dataclasses.replace(cluster.device, tensor_overhead=per_tensor))
            states, update_cost = job_optimizer(self._optimizer, opts.cluster, comm.Get_size())
            if opts.update_cost is not None:  # the user's figure wins over the measured one
                update_cost = opts.update_cost
            opts = dataclasses.replace(opts, optimizer=states, update_cost=update_cost)
            # a layout given by hand is profiled stage by stage and predicted as the search predicts
            blocks = None if given is None else [tuple(st.ops) for st in given.stages]
            profile = job_profile(graph, inputs, opts.cluster, comm.Get_size(),
                                  any(p.is_meta for p in self._model.parameters()), blocks)
            tensor = job_tensor_annotation(graph, opts, comm.Get_size(), given)
            if given is None:
                text = plan_graph(graph.data(), batch, opts, profile=profile, cluster=cluster,
                                  tensor=tensor).to_json()
            else:
                text = predict_plan(graph.data(), given, opts, profile=profile, cluster=cluster,
                                    tensor=tensor).to_json()
        return Plan.from_json(quiet_bcast(text, comm))

    def _trace_optimizer(self) -> None:
        """With ``trace=``: record the optimizer's step, which ends a recorded step."""
        opt, tracer = self.optimizer, self._tracer
        if tracer is None or opt is None:
            return
        started: list[int] = []
        opt.register_step_pre_hook(lambda *_: started.append(clock_ns()))

        def after(*_: Any) -> None:
            if started:
                tracer.phase("optimizer step", started.pop())
            tracer.close_step()

        opt.register_step_post_hook(after)

    def write_trace(self) -> str | None:
        """Write the measured timeline recorded so far (``trace=``) now; collective, call on every rank.

        Returns the JSON's path on rank 0, None elsewhere or when nothing is
        being traced or it was written already. Recording stops afterwards.
        """
        tracer = self._tracer
        if tracer is None or tracer.written:
            return None
        self._need_ready("write_trace")
        with abort_on_error(self._comm, "write_trace"), self._watchdog.watch("write_trace"):
            path = tracer.write(self._comm, self._plan)
        return None if path is None else str(path)

    def _bind_optimizer(self) -> None:
        opt = self._optimizer
        if opt is None:
            return
        if isinstance(opt, torch.optim.Optimizer):
            P.rebind_optimizer(opt, self._model, self._params)
        elif callable(opt):
            self._optimizer = opt(list(self._params.values()))
        else:
            raise ConfigError(f"optimizer must be a torch optimizer or a factory, got {type(opt).__name__}")

    # ----------------------------------------------------------- forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run one step of the schedule on this rank's local batch; return the model's output.

        In training mode with autograd enabled the full forward+backward
        schedule runs and the loss carries the gradients (see the module
        docstring); otherwise a forward-only pipeline runs.

        Raises:
            ConfigError: the inputs differ in structure or shape between ranks,
                or the global batch does not split into the plan's microbatches,
                or the module was closed.
        """
        if self._closed:
            raise ConfigError("this RaNNCModule was closed (close() or the end of its with block); "
                              "build a new RaNNCModule to run the model again")
        with abort_on_error(self._comm, "the forward call"):
            if not self._ready:
                self._setup(args, kwargs)
            if self._tracer is not None:
                if self._tracer.done and not self._tracer.written:
                    self.write_trace()
                self._tracer.begin_step(self.training and torch.is_grad_enabled())
            with self._watchdog.watch("the forward call"):  # the ranks' agreement on the call waits too
                program, error = self._program_for(args, kwargs)
        if error is not None:  # agreed by every rank: raised alike on each, so the caller can catch it
            raise ConfigError(error)
        assert program is not None
        with abort_on_error(self._comm, "the forward call"), self._watchdog.watch("the forward call"):
            return self._step(program, args, kwargs)

    def _program_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[CallProgram | None, str | None]:
        """The cached program of this call's signature, traced and mapped on a miss (collective);
        or the reason, the same on every rank, why the call cannot run."""
        comm, training = self._comm, self.training
        try:
            key, tensors = call_key(args, kwargs, training)
        except RaNNCError as e:  # an input that cannot be traced (a string...): every rank hears of it
            key, tensors = ("untraceable", str(e)), {}
        agree(key, tensors, comm)  # ranks that disagree end the job: no rank alone can fix that
        if key[0] == "untraceable":
            return None, str(key[1])
        for program in self._programs.get(key, []):
            if program.runs(tensors):
                return program, None
        found: CallProgram | None = None
        error = None
        try:
            graph = trace_call(self._model, args, kwargs, training, self._names)
            found = build_program(self._layout, graph, training, comm)
        except RaNNCError as e:
            error = (f"this call cannot run on the layout planned for the first call "
                     f"({difference(self._first, (args, kwargs, training))}): {e}")
        error = agree_outcome(error, comm)
        if error is not None or found is None:
            return None, error or "another rank could not map this call"
        if found.training:
            for module in found.modules:
                module.train(self.training)
        self._programs.setdefault(key, []).append(found)
        return found, None

    def _step(self, program: CallProgram, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        plan, comm = self._plan, self._comm
        graph = program.graph
        tracer = self._tracer
        start = clock_ns() if tracer is not None else 0  # tracing off: no clock readings
        local = graph.flatten_inputs(args, kwargs)
        inputs, batch = gather_inputs(local, program.input_dims, comm)
        if tracer is not None:
            tracer.phase("inputs", start)
        m = plan.microbatches
        rows = batch // m if batch % m == 0 else 0
        widest = max(st.replicas for st in plan.stages)
        if rows < widest:
            raise ConfigError(
                f"global batch {batch} does not split into {m} microbatches of at least {widest} rows "
                f"(the widest stage's replicas); use a global batch that is a multiple of {m * widest}"
            )
        training = program.training and self.training and torch.is_grad_enabled()
        signature = (batch, m, tuple((n, tuple(t.shape), t.dtype) for n, t in inputs.items()))
        step = StepInputs(batch=batch, microbatches=m, inputs=inputs, signature=signature, training=training)
        key = (training, m)
        if key not in program.schedules:
            # a rank's action list covers all its stages (one per model chunk); forward-only in stage order
            gen = (by_name if training else forward_only_on)(plan.schedule, plan.num_positions, m, plan.chunks)
            program.schedules[key] = gen.actions[plan.position_of_stage(self._layout.stages[0])]
        if training:
            self._held.begin()
            self._sync.prepare()
        result = run_actions(program.executors, program.schedules[key], step, self._sync.arm, self._sync.start,
                             tracer)
        apply = None
        start = clock_ns() if tracer is not None else 0
        if training:
            self._sync.finish()
            apply = self._held.end()
            if tracer is not None:
                tracer.phase("gradient sums", start)
                start = clock_ns()
        out = return_outputs(
            result, step, graph.output_names, program.output_dims, self._out_ranks, comm, program.out_meta,
            self._options.return_outputs,
        )
        if tracer is not None:
            tracer.phase("outputs", start)
        values = out.values
        if apply is not None and out.loss_name is not None:
            values[out.loss_name] = _ApplyHeld.apply(self._anchor, values[out.loss_name], apply)
        return graph.unflatten_outputs([values[n] for n in graph.output_names])

    # ------------------------------------------------------- lifetime
    def close(self) -> None:
        """Free this module's communicators; a forward call afterwards raises ConfigError.

        Frees the per-group sub-communicators of the gradient sums and the
        runtime's duplicate of ``MPI.COMM_WORLD``. Safe before the first call
        and idempotent. Call it on every rank between steps (as the end of a
        ``with RaNNCModule(...) as m:`` block does). This rank's parameters
        and the optimizer stay usable locally; ``state_dict()`` and
        ``clip_grad_norm_()`` need the freed communicator, so gather the
        state before closing.

        A module left open is closed at interpreter exit, before mpi4py
        finalises MPI, unless a communication is still in flight then.
        ``MPI_Comm_free`` is collective in the MPI standard, but MPICH and
        Open MPI free locally (no message, no waiting for other ranks), so
        neither call can hang on a rank that has already exited. The one step
        that could wait is the engine releasing its own duplicate of a
        communicator while that duplicate's ``MPI_Comm_idup`` is unfinished,
        which happens only while a collective on it is unfinished; so at exit,
        with anything in flight, nothing is freed and MPI_Finalize is left to
        clean up. Nothing here starts a collective, except that with
        ``trace=`` a measured timeline not written yet is written first
        (:meth:`write_trace`, collective); at exit it is dropped instead.
        """
        if self._closed:
            return
        if self._ready and self._tracer is not None and not self._tracer.written and not _exiting:
            self.write_trace()  # closed before the next call would have written it
        self._closed = True
        _open_modules.discard(self)
        if self._ready:
            self._shards.detach()
            self._sync.free()
            if self._tensor is not None:
                self._tensor.free()
        self._comm.Free()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------ parameters
    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
                         ) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters under their original names (all of the model's before the first call)."""
        if not self._ready:
            yield from self._model.named_parameters(prefix, recurse, remove_duplicate)
            return
        for f, p in self._params.items():
            yield (f"{prefix}.{f}" if prefix else f), p

    def train(self, mode: bool = True) -> RaNNCModule:
        """Switch training (full schedule, dropout on) / evaluation (forward-only, dropout off)."""
        self.training = mode
        self._model.train(mode)
        if self._ready:
            for programs in self._programs.values():  # eval programs were traced in eval mode and stay so
                for program in programs:
                    if program.training:
                        for module in program.modules:
                            module.train(mode)
        return self

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """Clip gradients by their global norm over all stages (replicas and tied copies once).

        Returns the total norm before clipping, the same on every rank.
        Raises ConfigError before the first call.
        """
        self._need_ready("clip_grad_norm_")
        with abort_on_error(self._comm, "clip_grad_norm_"), self._watchdog.watch("clip_grad_norm_"):
            return clip_grad_norm_(self._params, self._owned, self._comm, max_norm, norm_type,
                                   *self._counted_pieces())

    def _counted_pieces(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The sharded pieces this rank counts in a norm, and those it only scales: with tensor
        groups, every position holds pieces of the replicated parameters, counted at position 0."""
        pieces = [(pc.param, pc.shard) for pcs in self._shards.pieces.values() for pc in pcs]
        if self._tensor is None or self._tensor.position == 0:
            return [s for _, s in pieces], []
        split = {id(self._params[f]) for f in self._tensor.shards if f in self._params}
        return [s for p, s in pieces if id(p) in split], [s for p, s in pieces if id(p) not in split]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``nn.Module.zero_grad``, reaching the gradient shards of a sharded stage too."""
        super().zero_grad(set_to_none)
        if self._ready:
            self._shards.zero_grad(set_to_none)

    def state_dict(self, *args: Any, rank0_only: bool = True, **kwargs: Any) -> dict[str, Tensor]:  # type: ignore[override]
        """The full state with the original names; collective after the first call.

        After the first call every rank must call it (each contributes the
        tensors it holds; ``if rank == 0: model.state_dict()`` would wait
        forever, and with ``timeout=`` ends the job naming this call). Returns
        the state gathered on rank 0 and ``{}`` on other ranks, or, with
        ``rank0_only=False``, on every rank. Loadable into the unwrapped
        model. Before the first call: the model's own state dict, on every
        rank, without communication. ``torch``'s ``destination``, ``prefix``
        and ``keep_vars`` are not supported and are ignored.

        Raises:
            ConfigError: the ranks are in different collective calls, or
                disagree on ``rank0_only``.
        """
        if not self._ready:
            return self._model.state_dict()
        with self._watchdog.watch("state_dict"):
            agreed(self._comm, f"state_dict(rank0_only={bool(rank0_only)})", lambda: None)
            with abort_on_error(self._comm, "state_dict"):
                return P.gather_state_dict(self._model, self._names, self._local, self._owned, self._comm,
                                           rank0_only=bool(rank0_only), split=self._split())

    def optimizer_state_dict(self, rank0_only: bool = True) -> dict[str, Any]:
        """The optimizer's state in torch's format for the unwrapped model; collective after the first call.

        Loadable into the same optimizer class built on the unwrapped model's
        parameters as it was given here (e.g. ``torch.optim.AdamW(unwrapped
        .parameters())``) and into :meth:`load_optimizer_state_dict` on any
        layout. Every rank must call it; returns the state on rank 0 and
        ``{}`` elsewhere, or on every rank with ``rank0_only=False``. Before
        the first call: the optimizer's own ``state_dict()``.

        Raises:
            ConfigError: the module has no optimizer (none was given, or its
                factory has not run yet).
        """
        opt = self._need_optimizer("optimizer_state_dict")
        if not self._ready or self._opt_state is None:
            return opt.state_dict()
        state = self._opt_state
        with self._watchdog.watch("optimizer_state_dict"):
            agreed(self._comm, f"optimizer_state_dict(rank0_only={bool(rank0_only)})", lambda: None)
            with abort_on_error(self._comm, "optimizer_state_dict"):
                return state.gather(rank0_only=bool(rank0_only))

    def load_optimizer_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load an optimizer state dict of the unwrapped model (:meth:`optimizer_state_dict`'s, from
        any layout, or torch's); collective after the first call: every rank passes the same dict.

        Each rank keeps the state of the parameters it holds (of a sharded
        parameter, its piece's slice); hyperparameters come from the dict, as
        in ``Optimizer.load_state_dict``. Before the first call it is the
        optimizer's own ``load_state_dict``. The state is copied (torch's own
        load keeps the dict's tensors, which training would then change).

        Raises:
            ConfigError: the module has no optimizer, or the dict does not
                fit its param groups or the model's parameter shapes (raised on
                every rank, with the lowest failing rank's message).
        """
        opt = self._need_optimizer("load_optimizer_state_dict")
        if not self._ready or self._opt_state is None:
            opt.load_state_dict(copy.deepcopy(dict(state_dict)))
            return
        state = self._opt_state
        with self._watchdog.watch("load_optimizer_state_dict"):
            agreed(self._comm, "load_optimizer_state_dict", lambda: state.check(state_dict))
            with abort_on_error(self._comm, "load_optimizer_state_dict"):
                state.scatter(state_dict)

    def _split(self) -> P.SplitAt | None:
        """This rank's tensor split for state dicts (None: it holds parameters whole)."""
        t = self._tensor if self._ready else None
        return None if t is None else P.SplitAt(t.shards, t.position, t.degree)

    def _need_optimizer(self, what: str) -> torch.optim.Optimizer:
        opt = self.optimizer
        if opt is None:
            raise ConfigError(f"{what}() needs the optimizer: pass it to RaNNCModule (a factory's runs at the "
                              "first call)")
        return opt

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,  # type: ignore[override]
                        assign: bool = False) -> _IncompatibleKeys:
        """Load a full state dict (original names); collective: call it on every rank.

        Every rank checks every key and shape against the unwrapped model's
        before anything is copied, as ``nn.Module.load_state_dict`` does:
        shapes must be equal (nothing is broadcast), and with ``strict``
        missing and unexpected keys are errors. Before or after the first call.

        Returns:
            torch's ``(missing_keys, unexpected_keys)`` named tuple.

        Raises:
            ConfigError: the state dict does not fit (or, after the first
                call, ``assign=True``); raised on every rank with the message
                of the lowest rank whose state dict did not fit.
        """
        def check() -> tuple[list[str], list[str]]:
            if assign and self._ready:
                raise ConfigError("load_state_dict(assign=True) is not supported after the first call, "
                                  "which bound the optimizer to this rank's tensors; use assign=False")
            return P.check_state_dict(self._model, state_dict, strict)

        with self._watchdog.watch("load_state_dict"):
            missing, unexpected = agreed(self._comm, "load_state_dict", check)
        with abort_on_error(self._comm, "load_state_dict"):
            if not self._ready:
                self._model.load_state_dict(state_dict, strict=strict, assign=assign)
            else:
                P.load_local_state(self._local, self._names, state_dict, split=self._split())
        return _IncompatibleKeys(missing, unexpected)

    # ------------------------------------------------- the original model
    @property
    def module(self) -> nn.Module:
        """The wrapped model, as DDP's ``.module`` (after the first call it holds only this rank's tensors)."""
        return self._model

    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapper does not define resolve on the original model (``.config``, ``.dtype``)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_model")
            if model is None or name.startswith("__"):
                raise
            return getattr(model, name)

    def save_pretrained(self, path: str | os.PathLike[str], **kwargs: Any) -> None:
        """Write a Hugging Face model's full state and config to ``path`` on rank 0 (collective).

        Gathers :meth:`state_dict` and calls the original model's
        ``save_pretrained(path, state_dict=..., **kwargs)``; the result loads
        with ``from_pretrained``. Raises ConfigError when the model has no
        ``save_pretrained``.
        """
        save = getattr(self._model, "save_pretrained", None)
        if save is None:
            raise ConfigError(f"{type(self._model).__name__} has no save_pretrained (not a Hugging Face model); "
                              "save state_dict() instead")
        state = self.state_dict()
        if self._comm.Get_rank() == 0:
            save(path, state_dict=state, **kwargs)
        self._comm.Barrier()

    def _need_ready(self, what: str) -> None:
        if not self._ready:
            raise ConfigError(f"{what}() needs the first forward call, which partitions the model")


def _check_args(model: nn.Module, plan: PlanArg | None, bucket_bytes: int, timeout: float | None,
                options: dict[str, Any]) -> tuple[PlanOptions, Plan | Mapping[str, Any] | None]:
    """Check :class:`RaNNCModule`'s arguments; return its options and the checked ``plan=``."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"RaNNCModule wraps an nn.Module, got {type(model).__name__}")
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
        raise ConfigError(f"bucket_bytes must be a positive integer (bytes), got {bucket_bytes!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not timeout > 0):
        raise ConfigError(f"timeout must be a positive number of seconds or None (no limit), got {timeout!r}")
    opts = PlanOptions.from_kwargs(options)
    if untrained := [s for s in opts.schedules if s not in RUN_SCHEDULES]:
        raise ConfigError(f"schedules {untrained} can be planned (rannc_py.plan) but RaNNCModule does not run "
                          f"them yet; train with {list(RUN_SCHEDULES)}")
    return opts, check_plan_arg(plan)


_open_modules: weakref.WeakSet[RaNNCModule] = weakref.WeakSet()  # not closed yet
_exiting = False  # set at interpreter exit


def _close_at_exit() -> None:
    """Close the modules still open (see :meth:`RaNNCModule.close`).

    Registered after the communication engine's own exit hook, so it runs
    before it (atexit runs last-registered first), and before mpi4py
    finalises MPI (from Py_AtExit, after every atexit hook).
    """
    global _exiting
    _exiting = True  # no collectives now: a measured trace not yet written is dropped
    if not MPI.Is_initialized() or MPI.Is_finalized() or in_flight():
        return
    for module in list(_open_modules):
        module.close()


atexit.register(_close_at_exit)
