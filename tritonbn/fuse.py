"""``tritonbn.fuse(model)``: a model's BN -> ReLU and BN -> add -> ReLU chains as fused layers.

The model is traced with ``torch.fx`` (batch norms are leaves), and in its graph

- ``relu(bn(x))`` becomes ``BatchNormReLU{1,2,3}d(x)`` (``SyncBatchNormReLU``), and
- ``relu(bn(x) + identity)`` becomes ``BatchNormAddReLU{1,2,3}d(x, identity)``,

where the ReLU is ``nn.ReLU`` (``inplace`` or not), ``F.relu`` / ``torch.relu`` / ``relu_`` or the
``relu`` / ``relu_`` method, and the add is ``+``, ``+=``, ``torch.add`` or the ``add`` / ``add_``
method without ``alpha`` (torchvision's BasicBlock and Bottleneck: ``out = self.bn2(...);
out += identity; out = self.relu(out)``).  A chain fuses only where nothing else reads the batch
norm's output (or the sum), and an ``add_`` only where it writes the batch norm's output, so the
fused model computes what the model did and mutates nothing the model did not (``a += b`` is
``a + b`` to torch.fx, in its own traced graphs too).  Of ``bn_a(x) + bn_b(y)`` (a downsampled
identity) the first fuses.  A
fused layer replaces the batch norm at its own path, holding the same parameter and buffer
objects: ``state_dict`` keys, optimizers and checkpoints carry over.  A batch norm module
called at more than one place is left alone.

A module that ``torch.fx`` cannot trace (data-dependent control flow, say) is left as it is,
with a warning naming it, and its children are fused where they trace.
"""

from __future__ import annotations

import operator
import warnings
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from .nn import BatchNorm as GluonBatchNorm, convert, fused_layer

__all__ = ["fuse"]

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
_RELU_METHODS = ("relu", "relu_")
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
_IN_PLACE_ADDS = (operator.iadd, "add_")  # they write their first operand
_BATCH_NORMS = (_TorchBatchNorm, GluonBatchNorm)  # the modules traced as leaves and fused


def fuse(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its BN -> ReLU and BN -> add -> ReLU chains fused (module docstring).

    Torch's batch norms are first converted in place (``tritonbn.convert``), and the fused
    layers replace them in place.  Returns, where the model's forward traced and something fused,
    a ``torch.fx.GraphModule`` (named as the model's class) running the fused graph on the
    model's own children, parameters and buffers (same objects, order, state_dict keys, modes;
    ``model.layer1[0]`` still indexes); keep using the returned model.  Else ``model`` itself,
    its traceable children fused the same way.  Fusing a fused model changes nothing.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return _fuse(convert(model), type(model).__name__)


class _Tracer(fx.Tracer):
    """torch.fx's tracer with every batch norm (torch's, tritonbn's, Gluon-style) and the fused
    add's call (a fused model traces again) leaves."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=(_bn_add_relu,))

    def is_leaf_module(self, module: torch.nn.Module, qualified_name: str) -> bool:
        return isinstance(module, _BATCH_NORMS) or super().is_leaf_module(module, qualified_name)


def _fuse(module: torch.nn.Module, name: str) -> torch.nn.Module:
    """``module`` fused as a whole where it traces, else its children (warning when the
    untraceable module itself holds batch norms that could not be fused)."""
    if isinstance(module, _BATCH_NORMS) or not _has_batch_norm(module):
        return module
    try:
        graph = _Tracer().trace(module)
    except Exception as error:  # torch.fx raises many types (TraceError, TypeError, ...)
        if any(isinstance(child, _BATCH_NORMS) for child in module.children()):
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            warnings.warn(f"tritonbn.fuse: {name} ({type(module).__name__}) is not traceable by torch.fx "
                          f"({reason}); its own chains are left unfused", stacklevel=3)
        for child_name, child in list(module.named_children()):
            fused = _fuse(child, f"{name}.{child_name}")
            if fused is not child:
                setattr(module, child_name, fused)
        return module
    if not _rewrite(module, graph):
        return module
    return _graph_module(module, graph)


def _has_batch_norm(module: torch.nn.Module) -> bool:
    return any(isinstance(m, _BATCH_NORMS) for m in module.modules())


def _rewrite(root: torch.nn.Module, graph: fx.Graph) -> bool:
    """Fuse the chains of ``graph`` (traced from ``root``) in place; whether any fused."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    fused_any = False
    for node in list(graph.nodes):
        if node.op != "call_module" or calls[node.target] != 1 or len(node.args) != 1 or node.kwargs:
            continue
        chain = _chain(root, node)
        if chain is None:
            continue
        identity, nodes = chain
        relu_node = nodes[-1]
        layer = fused_layer(root.get_submodule(node.target), addend=identity is not None)
        if layer is None:
            continue
        _set_submodule(root, node.target, layer)
        with graph.inserting_before(relu_node):
            if identity is None:
                replacement = graph.call_module(node.target, (node.args[0],))
            else:
                replacement = graph.call_function(_bn_add_relu, (graph.get_attr(node.target), node.args[0], identity))
        relu_node.replace_all_uses_with(replacement)
        for dead in reversed(nodes):
            graph.erase_node(dead)
        fused_any = True
    graph.lint()
    return fused_any


def _chain(root: torch.nn.Module, bn_node: fx.Node) -> Optional[tuple[Optional[fx.Node], list[fx.Node]]]:
    """(identity or None, the chain's nodes: batch norm, add if any, ReLU) starting at
    ``bn_node``, or None."""
    user = _only_user(bn_node)
    if user is None:
        return None
    if _is_relu(root, user, bn_node):
        return None, [bn_node, user]
    identity = _added(root, user, bn_node)
    relu_node = _only_user(user) if identity is not None else None
    if relu_node is None or not _is_relu(root, relu_node, user):
        return None
    return identity, [bn_node, user, relu_node]


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_relu(root: torch.nn.Module, node: fx.Node, source: fx.Node) -> bool:
    """Whether ``node`` is a ReLU of ``source`` (``F.relu(x, inplace)`` included)."""
    if not node.args or node.args[0] is not source:
        return False
    if node.op == "call_module":
        return isinstance(root.get_submodule(node.target), torch.nn.ReLU) and len(node.args) == 1
    if node.op == "call_function":
        return (node.target in _RELU_FUNCTIONS and set(node.kwargs) <= {"inplace"}
                and len(node.args) <= (2 if node.target is F.relu else 1))
    return node.op == "call_method" and node.target in _RELU_METHODS and len(node.args) == 1 and not node.kwargs


def _added(root: torch.nn.Module, node: fx.Node, source: fx.Node) -> Optional[fx.Node]:
    """The other operand of ``node`` when it is ``source + other`` (a tensor node; an in-place
    add only if it writes ``source``; of two batch norms' outputs, the first's), else None."""
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS)
    if not is_add or len(node.args) != 2 or node.kwargs:
        return None
    first, second = node.args
    other = second if first is source else first if second is source else None
    if not isinstance(other, fx.Node) or other is source:
        return None
    if node.target in _IN_PLACE_ADDS and first is not source:
        return None
    if first is other and other.op == "call_module" and isinstance(
            root.get_submodule(other.target), _BATCH_NORMS):
        return None  # bn_a(x) + bn_b(y) fuses bn_a, the main path of ``out += identity``
    return other


def _bn_add_relu(bn: torch.nn.Module, x: torch.Tensor, identity) -> torch.Tensor:
    """``relu(bn(x) + identity)``: the fused layer where identity is a tensor of x's shape, dtype
    and device (a residual), else the unfused chain (a broadcast or promoting add stays torch's)."""
    if (isinstance(identity, torch.Tensor) and identity.shape == x.shape and identity.dtype == x.dtype
            and identity.device == x.device):
        return bn(x, identity)
    return torch.relu(bn._normalize(x) + identity)


def _set_submodule(root: torch.nn.Module, target: str, module: torch.nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _graph_module(root: torch.nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule of ``graph`` holding ``root``'s own children (the fused layers already in
    them), parameters and buffers: the same objects in the same order, so the state_dict, the
    modes and indexing such as ``model.layer1[0]`` stay as they were, and modules the graph no
    longer calls (the fused ReLUs) stay in place."""
    module = fx.GraphModule(root, graph, class_name=type(root).__name__)
    module._modules = dict(root._modules)
    module._parameters = dict(root._parameters)
    module._buffers = dict(root._buffers)
    module._non_persistent_buffers_set = set(root._non_persistent_buffers_set)
    module.training = root.training
    return module
