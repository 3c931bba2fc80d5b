"""How many GPU kernels a piece of code would launch, counted on any device from its operators.

On the 2026-12-04 H200 run the training step was host-bound: the host took ~60 us per kernel
it launched and the GPU idled for more than half the step (docs/BENCHMARKS.md). There the
number of launches per micro-batch is the figure that matters, and it depends on the code, not
on the device. This module counts it from ``torch.profiler``'s operator tree, so it runs on the
CPU, where every change to the model's code can be checked for what it adds or removes.

What counts as one launch:

* the outermost ``aten::`` operator of a call, unless it and everything it calls only change a
  tensor's metadata or allocate (views, ``empty``: no kernel on a GPU);
* a call of a ``torch.compile`` graph (``## Call CompiledFxGraph``), plus each ``aten::``
  operator it calls outside its generated code (inductor's extern kernels: the GEMMs). A
  compiled graph of elementwise work is one or a few fused kernels on a GPU;
* a region marked with :func:`one_launch` (``launch_count::`` names): a stand-in for a single
  GPU kernel, its inner operators not counted. A region marked with :func:`on_host` counts
  nothing: work on tensors that stay on the host on a GPU too.

An approximation of the GPU's count, not a trace of it: a few operators launch two kernels
there (a two-pass reduction, a copy between devices), and where the CPU decomposes an operator
the GPU runs as one kernel (torch's RMSNorm backward) it counts the pieces. What it is for is
the difference between two versions of the code, which these errors barely touch. Checked
against the one GPU profile there is (docs/BENCHMARKS.md, "Kernel launches per micro-batch").
"""
from __future__ import annotations

import collections
from typing import Callable, Iterable, Tuple

from torch.profiler import ProfilerActivity, profile, record_function

STAND_IN_PREFIX = "launch_count::"
HOST_PREFIX = "launch_count_host::"
COMPILED_GRAPH_PREFIX = "## Call CompiledFxGraph"

# aten operators that launch no kernel of their own: views, metadata, allocation, host-side
# scalars, and composites whose work (if any) is done by the operators they call (``dropout``
# with p=0 returns its input; ``contiguous``, ``reshape`` and ``to`` copy only when they must)
NO_KERNEL = frozenset("aten::" + name for name in """
    alias as_strided chunk contiguous detach detach_ diagonal dropout empty empty_like
    empty_strided expand expand_as flatten _has_compatible_shallow_copy_type is_nonzero item
    lift lift_fresh _local_scalar_dense movedim narrow
    new_empty new_empty_strided numpy_T permute _reshape_alias reshape resize_ resolve_conj
    resolve_neg result_type select set_ size slice split split_with_sizes squeeze stride t
    transpose unbind unflatten unfold unsqueeze _unsafe_view view view_as to
""".split())


def one_launch(name: str):
    """Marks a region that stands in for a single GPU kernel (e.g. a CPU computation of what a
    fused GPU kernel does): counted once, its inner operators not at all."""
    return record_function(STAND_IN_PREFIX + name)


def on_host(name: str):
    """Marks a region whose tensors are on the host in a GPU run as well: no launches."""
    return record_function(HOST_PREFIX + name)


def _launches_a_kernel(event) -> bool:
    """Whether this operator, or any ``aten::`` operator it calls, does work on the device
    (other events inside, such as autograd's records, are looked through)."""
    if event.name.startswith("aten::") and event.name not in NO_KERNEL:
        return True
    return any(_launches_a_kernel(child) for child in event.cpu_children)


def _count(event, counter: collections.Counter) -> None:
    """Adds the launches in ``event``'s subtree to ``counter`` (by operator name)."""
    name = event.name
    if name.startswith(HOST_PREFIX):
        return
    if name.startswith(STAND_IN_PREFIX):
        counter[name] += 1
        return
    if name.startswith(COMPILED_GRAPH_PREFIX):
        counter["compiled graph"] += 1
        for child in event.cpu_children:  # extern kernels (GEMMs) outside the generated code
            if child.name.startswith("aten::") and _launches_a_kernel(child):
                counter[child.name] += 1
        return
    if name.startswith("aten::"):
        if _launches_a_kernel(event):
            counter[name] += 1
        return
    for child in event.cpu_children:
        _count(child, counter)


def launches(events: Iterable) -> collections.Counter:
    """Launches by operator name in a profiler's ``events()`` (every tree, from its roots)."""
    counter: collections.Counter = collections.Counter()
    for event in events:
        if event.cpu_parent is None:
            _count(event, counter)
    return counter


def count_launches(function: Callable[[], object]) -> Tuple[collections.Counter, object]:
    """Runs ``function`` once under the profiler: (launches by operator name, its result)."""
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        result = function()
    return launches(profiler.events()), result
