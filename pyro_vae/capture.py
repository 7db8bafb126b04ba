"""Record a Pyro loss once as a graph of tensor operations, then replay the graph.

Running a Pyro ELBO costs Python at every step: the guide is traced, the model is
replayed against that trace, every ``pyro.param`` and ``pyro.sample`` message passes the
effect-handler stack, and every site's log-density is scaled and summed. For a fixed
model and guide all of that decides the same thing at every step: which tensor
operations to run. :class:`CapturedLoss` runs the loss once under
:func:`torch.fx.experimental.proxy_tensor.make_fx` with fake tensors, which records
exactly those operations (aten ops, the random draws included), and replays the
recording at later steps. Autograd sees the replayed operations as it would see the
eager ones, so the backward pass and the optimiser are unchanged.

What a replay does is what the eager loss does: the same operations in the same order
on the same inputs, drawing from the same global random generator, so a seeded run
takes bit-identical steps either way (``tests/test_capture.py``). One recording is kept
per shape, dtype and device of the batch's tensors and per value of the other keyword
arguments; the arguments named in ``tensor_kwargs`` (the KL weight, which a warm-up
changes at every step) travel into the graph as 0-dim tensors instead.

The recording holds for programs whose operations do not depend on the data's values.
The VAE's are fixed. A program that branches on a tensor's value (``if x.sum() > 0``,
``.item()``) cannot be recorded: fake tensors have no values, so the recording fails,
and :class:`CapturedLoss` then warns once and runs the loss eagerly from then on. It
does the same when a network has forward or backward hooks, which a replay would not
call; hooks are looked for when a recording is made, so a hook added after that is not
seen (run such a program with engine ``module``). Other Python side effects (a counter, a print, randomness from ``random`` rather
than torch) happen once, while recording; Pyro programs draw through torch.
"""

from __future__ import annotations

import warnings

from pyro.infer.util import is_validation_enabled
import torch
from torch.fx.experimental.proxy_tensor import make_fx


class CaptureError(RuntimeError):
    """The loss could not be recorded as a fixed sequence of tensor operations."""


class CapturedLoss:
    """``loss_fn(**batch, **options)``, recorded per input signature and replayed.

    :param loss_fn: a callable ``(**kwargs) -> scalar tensor`` that reads the parameters
        and buffers of ``module`` (e.g. ``Trace_ELBO()(program.model, program.guide)``).
        Its tensor arguments (the batch: ``x``, and ``y`` when labels come along) are inputs
        of the recording; the others are fixed in it.
    :param module: the ``torch.nn.Module`` holding every parameter and buffer the loss reads.
    :param tensor_kwargs: names of float keyword arguments passed into the graph as
        0-dim tensors, except at the values 0 and 1, which the program may treat as
        special cases (no handler at KL weight 1, a mask at 0): those get recordings of
        their own.
    :param strict: raise :class:`CaptureError` instead of warning and running eagerly.
    :param warmed_up: the caller has run ``loss_fn`` eagerly already (so Pyro's param
        store holds the module's parameters), and the first call may record; else the
        first call runs eagerly.
    :param reuse_batch_part: compute the operations that depend on nothing but the
        module's tensors and the batch (no random draw, no other argument) once, and
        reuse their values while the same batch tensors come back with the same
        parameters: e.g. the encoder's output in importance sampling, which scores one
        batch chunk after chunk. Only without autograd (under ``torch.no_grad``); with
        gradients every call computes everything, as a backward pass needs its own graph.

    A recording is keyed by the batch tensors' names, shapes, dtypes and devices and by
    the other arguments' values: never by a tensor's identity, so every batch of the same
    shape replays the same recording.
    """

    def __init__(self, loss_fn, module: torch.nn.Module, tensor_kwargs=("kl_weight",), strict: bool = False,
                 warmed_up: bool = False, reuse_batch_part: bool = False):
        self.loss_fn = loss_fn
        self.reuse_batch_part = reuse_batch_part
        self.module = module
        self.tensor_kwargs = tuple(tensor_kwargs)
        self.strict = strict
        self.graphs: dict = {}
        self.eager_reason: str | None = None  # set when recording failed: run eagerly
        self._warmed_up = warmed_up

    def __call__(self, **kwargs) -> torch.Tensor:
        if self.eager_reason is not None or is_validation_enabled() or not self._warmed_up:
            # The first call runs eagerly: it registers the networks with Pyro's param
            # store (pyro.module), which must hold real tensors, not fake ones.
            # Validation checks values, which a recording cannot do.
            self._warmed_up = True
            return self.loss_fn(**kwargs)
        batch, static, dynamic = self._split(kwargs)
        key = (tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in batch.items()), static)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._record(key, batch, static, dynamic)
            if graph is None:
                return self.loss_fn(**kwargs)
        return graph(*self._module_tensors, *batch.values(), *dynamic.values())

    def _split(self, kwargs):
        batch, static, dynamic = {}, [], {}
        for name, value in sorted(kwargs.items()):
            if isinstance(value, torch.Tensor):
                batch[name] = value
            elif name in self.tensor_kwargs and value not in (0, 1):
                static.append((name, "tensor"))
                # float64, as the Python float it stands for: the products Pyro forms with
                # it (KL weight times N / B) then round as they do eagerly. On the CPU even
                # for CUDA runs: a 0-dim CPU tensor enters CUDA kernels as a scalar, with
                # no copy to the device to wait for.
                dynamic[name] = torch.tensor(float(value), dtype=torch.float64)
            else:
                static.append((name, value))
        return batch, tuple(static), dynamic

    def _run_eagerly(self, reason: str, err: Exception | None = None):
        self.eager_reason = reason
        if self.strict:
            raise CaptureError(f"could not record the loss as a graph ({reason})") from err
        warnings.warn(
            f"pyro_vae: the model and guide could not be recorded as a fixed graph ({reason}); "
            "running them eagerly at every step (engine 'module' does this always)",
            RuntimeWarning,
            stacklevel=4,
        )
        return None

    def _tensors(self):
        return list(self.module.parameters()), list(self.module.buffers())

    def _record(self, key, batch, static, dynamic):
        params, buffers = self._tensors()
        # every path to each tensor: a module reachable by two attribute paths (tied
        # weights, an autoguide's wrapper) is substituted under all of them
        paths: dict[int, list[str]] = {}
        for name, t in [*self.module.named_parameters(remove_duplicate=False),
                        *self.module.named_buffers(remove_duplicate=False)]:
            paths.setdefault(id(t), []).append(f"module.{name}")
        names = [paths[id(t)] for t in [*params, *buffers]]
        fixed = {name: value for name, value in static if value != "tensor"}
        program = _Program(self.module, self.loss_fn)
        batch_names, dynamic_names = list(batch), list(dynamic)

        def loss_of(*flat):
            # the recording sees the module's parameters and buffers as inputs, not constants
            tensors = {name: value for aliases, value in zip(names, flat[: len(names)]) for name in aliases}
            rest = dict(zip(batch_names + dynamic_names, flat[len(names):]))
            return torch.func.functional_call(program, tensors, (), {**rest, **fixed})

        hooked = _hooked_modules(self.module)
        if hooked:
            return self._run_eagerly(f"module(s) {', '.join(hooked)} have hooks, which a recording would not call")
        pyro_modules = _pyro_modules(self.module)
        if pyro_modules:
            return self._run_eagerly(
                f"{', '.join(pyro_modules)} {'is a' if len(pyro_modules) == 1 else 'are'} PyroModule(s) (as Pyro's "
                "autoguides are), whose parameters are read through Pyro's param store, where a recording cannot "
                "substitute them")
        saved = _module_state(self.module)
        try:
            # An empty decomposition table keeps every op as it ran; the default one writes
            # ``detach`` as ``alias``, and a replay would then differentiate through the
            # stop-gradients of a score-function surrogate.
            graph = make_fx(loss_of, decomposition_table={}, tracing_mode="fake")(
                *params, *buffers, *batch.values(), *dynamic.values())
        except Exception as err:  # noqa: BLE001 - any failure means: run this program eagerly
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            return self._run_eagerly(reason, err)
        finally:  # never leave a fake tensor in the module, whatever the recording did
            _restore_module_state(self.module, saved)
        _drop_identity_views(graph.graph)
        _write_linear_layers(graph.graph)
        graph.graph.eliminate_dead_code()
        # flat positional inputs: no pytree flattening of the arguments at every replay
        graph.graph._codegen = torch.fx.graph.CodeGen()
        graph.recompile()
        # The module's tensors, listed once: walking the module tree costs tens of
        # microseconds a step. Moving the module (.to) and loading a state keep the same
        # Parameter objects; a program that replaces one gets a new recording via reset().
        self._module_tensors = [*params, *buffers]
        if self.reuse_batch_part:
            graph = _BatchPartReused.split(graph, len(names) + len(batch_names)) or graph
        self.graphs[key] = graph
        return graph

    def reset(self) -> None:
        """Forget every recording (after replacing a parameter or buffer object of the module)."""
        self.graphs.clear()


class _BatchPartReused:
    """A recording cut in two: ``prefix`` computes, from the module's tensors and the
    batch alone, every value that needs no random draw and no other argument; ``rest``
    computes the loss from all the inputs and those values. Called as the whole
    recording is, with the module's tensors, the batch, then the other arguments.

    The prefix's values are kept and reused while the same tensor objects come back
    unchanged (same ``_version``: an in-place update such as an optimiser step counts
    as a change) and autograd is off. The same operations run on the same inputs, in
    the order the prefix computed them once, so the values are those of the whole
    recording, bit for bit."""

    def __init__(self, prefix: torch.fx.GraphModule, rest: torch.fx.GraphModule, num_fixed: int):
        self.prefix, self.rest, self.num_fixed = prefix, rest, num_fixed
        self._inputs: list | None = None
        self._versions: tuple = ()
        self._part: tuple = ()

    @classmethod
    def split(cls, graph: torch.fx.GraphModule, num_fixed: int) -> "_BatchPartReused | None":
        """Cut ``graph``, whose first ``num_fixed`` inputs are the module's tensors and the
        batch, or None when no operation depends on those alone."""
        g = graph.graph
        placeholders = [n for n in g.nodes if n.op == "placeholder"]
        fixed = placeholders[:num_fixed]
        written = _written_nodes(g)
        hoisted: list[torch.fx.Node] = []
        known = set(fixed)
        for node in g.nodes:
            if node.op == "get_attr" or (node.op == "call_function" and _is_pure(node.target)):
                if node not in written and all(arg in known for arg in node.all_input_nodes):
                    hoisted.append(node)
                    known.add(node)
        in_prefix = set(hoisted)
        frontier = [n for n in hoisted if any(user not in in_prefix for user in n.users)]
        if not frontier:
            return None
        prefix_graph = torch.fx.Graph()
        env = {node: prefix_graph.placeholder(node.name) for node in fixed}
        for node in hoisted:
            env[node] = prefix_graph.node_copy(node, env.__getitem__)
        prefix_graph.output(tuple(env[node] for node in frontier))
        prefix = torch.fx.GraphModule(graph, prefix_graph)
        last = placeholders[-1]
        for i, node in enumerate(frontier):
            with g.inserting_after(last):
                last = g.placeholder(f"batch_part_{i}")
            last.meta = dict(node.meta)
            node.replace_all_uses_with(last, delete_user_cb=lambda user: user not in in_prefix)
        for node in reversed(hoisted):
            g.erase_node(node)
        graph.recompile()
        return cls(prefix, graph, num_fixed)

    def __call__(self, *flat):
        fixed = flat[: self.num_fixed]
        if torch.is_grad_enabled():
            return self.rest(*flat, *self.prefix(*fixed))
        versions = tuple(t._version for t in fixed)
        if self._inputs is None or versions != self._versions or \
                any(a is not b for a, b in zip(fixed, self._inputs)):
            self._part = self.prefix(*fixed)
            self._inputs, self._versions = list(fixed), versions
        return self.rest(*flat, *self._part)


def _is_pure(target) -> bool:
    """An aten op that writes no input and draws no random number."""
    schema = getattr(target, "_schema", None)
    return schema is not None and not schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags


def _written_nodes(graph: torch.fx.Graph) -> set:
    """Nodes whose tensor an op writes in place, directly or through a view, with the
    views' bases: their values change after they are made, so they cannot be kept."""
    written = set()
    for node in graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or not schema.is_mutable:
            continue
        for i, argument in enumerate(schema.arguments):
            value = node.args[i] if i < len(node.args) else node.kwargs.get(argument.name)
            if argument.alias_info is not None and argument.alias_info.is_write and isinstance(value, torch.fx.Node):
                while isinstance(value, torch.fx.Node) and value not in written:
                    written.add(value)
                    is_view = getattr(value.target, "is_view", False)
                    value = value.args[0] if is_view and value.args else None
    return written


def _pyro_modules(module: torch.nn.Module) -> list[str]:
    """Names of submodules that are Pyro ``PyroModule``s holding parameters of their own."""
    from pyro.nn import PyroModule

    return [name or type(sub).__name__ for name, sub in module.named_modules()
            if isinstance(sub, PyroModule) and (sub._pyro_params or any(True for _ in sub.parameters(recurse=False)))]


def _module_state(module: torch.nn.Module) -> list:
    """Every submodule's own tables of parameters and buffers, copied (the tensors are not)."""
    return [(sub, dict(sub._parameters), dict(sub._buffers)) for sub in module.modules()]


def _restore_module_state(module: torch.nn.Module, saved: list) -> None:
    for sub, params, buffers in saved:
        sub._parameters.clear()
        sub._parameters.update(params)
        sub._buffers.clear()
        sub._buffers.update(buffers)


def _hooked_modules(module: torch.nn.Module) -> list[str]:
    """Names of submodules with forward or backward hooks (``"*"``: a global hook).

    Hooks are Python run around a module's forward; a replay calls no module, so it
    would silently skip them."""
    from torch.nn.modules import module as torch_module

    names = []
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks or \
            torch_module._global_backward_hooks:
        names.append("*")
    for name, sub in module.named_modules():
        if sub._forward_hooks or sub._forward_pre_hooks or sub._backward_hooks or \
                getattr(sub, "_backward_pre_hooks", None):
            names.append(name or type(sub).__name__)
    return names


class _Program(torch.nn.Module):
    """``loss_fn`` as the forward of a module that holds ``module``, so that
    :func:`torch.func.functional_call` can substitute its tensors."""

    def __init__(self, module: torch.nn.Module, loss_fn):
        super().__init__()
        self.module = module
        object.__setattr__(self, "loss_fn", loss_fn)  # not a submodule: it holds no tensors of its own

    def forward(self, **kwargs):
        return self.loss_fn(**kwargs)


_VIEWS = {torch.ops.aten.expand.default, torch.ops.aten.view.default, torch.ops.aten.alias.default,
          torch.ops.aten._unsafe_view.default, torch.ops.aten.reshape.default}


def _drop_identity_views(graph: torch.fx.Graph) -> None:
    """Bypass views whose result has the input's shape and strides (``expand`` to the
    same shape, ``view`` as the same shape, ``alias``): Pyro's broadcasting emits a few
    at every site, each a Python call and an autograd node at every step. The values
    are unchanged, so the replay stays bit-identical. Views that an in-place op writes
    through are kept."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _VIEWS or not node.args:
            continue
        source = node.args[0]
        if not isinstance(source, torch.fx.Node):
            continue
        out, inp = node.meta.get("val"), source.meta.get("val")
        if not isinstance(out, torch.Tensor) or not isinstance(inp, torch.Tensor):
            continue
        if out.shape != inp.shape or out.stride() != inp.stride() or out.dtype != inp.dtype:
            continue
        if any(getattr(user.target, "_schema", None) is not None and user.target._schema.is_mutable
               for user in node.users):
            continue
        node.replace_all_uses_with(source)


def _write_linear_layers(graph: torch.fx.Graph) -> None:
    """Write ``addmm(bias, x, t(weight))`` back as ``linear(x, weight, bias)``, which is
    how ``nn.Linear`` ran before the recording decomposed it: for a 2-D input ``linear``
    calls exactly that ``addmm`` (the same kernel, the same values and the same autograd
    nodes), in one Python call instead of two."""
    aten = torch.ops.aten
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.addmm.default or node.kwargs:
            continue
        if len(node.args) != 3:
            continue
        bias, x, transposed = node.args
        if not (isinstance(transposed, torch.fx.Node) and transposed.target is aten.t.default
                and len(transposed.users) == 1 and isinstance(x, torch.fx.Node)):
            continue
        weight = transposed.args[0]
        x_val, w_val = x.meta.get("val"), getattr(weight, "meta", {}).get("val")
        if not isinstance(x_val, torch.Tensor) or x_val.dim() != 2 or not isinstance(w_val, torch.Tensor) \
                or w_val.dim() != 2:
            continue
        with graph.inserting_before(node):
            linear = graph.call_function(aten.linear.default, (x, weight, bias))
        linear.meta = dict(node.meta)
        node.replace_all_uses_with(linear)
        graph.erase_node(node)
        graph.erase_node(transposed)
