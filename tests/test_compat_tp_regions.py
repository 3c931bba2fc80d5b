"""megatron's tensor-parallel regions skipped at TP 1 (megatron_patch/compat/tp_regions.py): the
same values and gradients bit for bit, without the regions' autograd nodes or the per-call
deprecation warning; megatron's own functions for a group of several ranks."""
import warnings
from unittest import mock

import torch
from megatron.core.tensor_parallel import layers

from megatron_patch.compat import apply_single_rank_tp_shortcuts, tp_regions
from megatron_patch.model import build_model, get_config
from test_model_parallel import _micro_batches
from test_model_reference import init_parallel

REGION_NODES = {"_CopyToModelParallelRegionBackward", "_ReduceFromModelParallelRegionBackward"}


def megatrons_regions():
    """megatron's own three functions back in its linears' module, for the reference run."""
    return mock.patch.multiple(
        layers, copy_to_tensor_model_parallel_region=tp_regions.MEGATRON_COPY_TO,
        reduce_from_tensor_model_parallel_region=tp_regions.MEGATRON_REDUCE_FROM,
        get_tensor_model_parallel_group_if_none=tp_regions.MEGATRON_GROUP_IF_NONE)


def graph_node_names(output: torch.Tensor) -> set:
    names, seen, stack = set(), set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def loss_and_gradients(model, batch):
    """One micro-batch's summed loss, the autograd node types behind it, the DeprecationWarnings
    raised, and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    batch = dict(batch)
    mask = batch.pop("loss_mask")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = (model(**batch) * mask).sum()
    nodes = graph_node_names(loss)
    loss.backward()
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning)
                    and "tp_group is None" in str(w.message)]
    return loss.detach(), nodes, deprecations, {
        name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_tp1_skips_the_regions_with_megatrons_values_bit_for_bit():
    """The tiny model at TP 1: megatron's regions are autograd nodes and its row-parallel linears
    warn on every call; with the shortcuts neither, and the loss and every gradient are equal."""
    apply_single_rank_tp_shortcuts()
    init_parallel(1, 1, seed=5)
    cfg = get_config("tiny")
    model = build_model(cfg, attention_backend="local")
    batch = _micro_batches(cfg)[0]
    with megatrons_regions():
        theirs = loss_and_gradients(model, batch)
    ours = loss_and_gradients(model, batch)
    assert theirs[1] & REGION_NODES == REGION_NODES and theirs[2]  # what is skipped
    assert not ours[1] & REGION_NODES and not ours[2]
    assert torch.equal(ours[0], theirs[0])
    assert ours[3].keys() == theirs[3].keys() and len(ours[3]) > 10
    for name, gradient in theirs[3].items():
        assert torch.equal(ours[3][name], gradient), name


class _Group:
    """A process group as the region functions see it: its size."""

    def __init__(self, size: int):
        self._size = size

    def size(self) -> int:
        return self._size


def test_a_group_of_several_ranks_takes_megatrons_functions():
    x = torch.ones(3)
    with mock.patch.object(tp_regions, "MEGATRON_COPY_TO") as copy_to, \
            mock.patch.object(tp_regions, "MEGATRON_REDUCE_FROM") as reduce_from:
        assert tp_regions.copy_to_tensor_model_parallel_region(x, _Group(1)) is x
        assert tp_regions.reduce_from_tensor_model_parallel_region(x, _Group(1)) is x
        copy_to.assert_not_called()
        reduce_from.assert_not_called()
        two = _Group(2)
        assert tp_regions.copy_to_tensor_model_parallel_region(x, two) is copy_to.return_value
        assert (tp_regions.reduce_from_tensor_model_parallel_region(x, two)
                is reduce_from.return_value)
        copy_to.assert_called_once_with(x, two)
        reduce_from.assert_called_once_with(x, two)
