"""megatron-core 0.16's distributed optimizer over torch's Adam (no Transformer Engine / Apex).

With neither TE nor Apex installed, megatron's DistributedOptimizer wraps ``torch.optim.Adam``
(every CPU run, and a GPU image without TE). Training works as is, but resuming from a
checkpoint goes wrong in three places that the TE path never reaches (found on CPU/gloo, 2 ranks):

1. Building the state dict to load into needs a ``step`` in the inner optimizer's per-parameter
   state (torch's Adam keeps it there; TE's FusedAdam keeps it in the param groups), and a fresh
   torch Adam has no state at all -> ``AssertionError`` in ``DistributedOptimizer.state_dict``.
   We call megatron's own ``init_state_fn`` (zero moments) and add ``step`` 0; the loaded
   values replace all of it.
2. Writing the loaded moments back copies every key of the live state, ``step`` included, from
   the loaded tensors, which do not carry ``step`` in the fully reshardable layout -> ``KeyError:
   'step'``. We hand the live ``step`` back for it (a self-copy). The same write copies into fp32
   main parameters, which for fp32 models are views of the model's leaf parameters -> "a view
   of a leaf Variable ... in-place"; it runs under no_grad.
3. After a load that "worked", every parameter's ``step`` was 0 (dp_reshardable layout) or one
   tensor shared by all parameters, which Adam then increments once per parameter: the bias
   correction of the first step after a resume was wrong and the losses parted from an
   uninterrupted run's. The step megatron saved in the param groups is the truth; we give each
   parameter its own tensor with that value after the load.

``apply()`` is idempotent and does nothing when megatron found TE or Apex.
"""
from __future__ import annotations

import importlib

import torch

_APPLIED = False


def _allocate_state(optimizer) -> None:
    """megatron's own ``init_state_fn`` (zero moments for parameters without state), plus the
    ``step`` torch's Adam keeps per parameter. Optimizers without that function (SGD) keep none."""
    if optimizer.init_state_fn is None:
        return
    optimizer.init_state_fn(optimizer.optimizer, optimizer.config)
    for state in optimizer.optimizer.state.values():
        state.setdefault("step", torch.tensor(0.0))


def _with_allocated_state(sharded_state_dict):
    def build(self, model_sharded_state_dict, is_loading=False, *args, **kwargs):
        if is_loading:
            _allocate_state(self)
        return sharded_state_dict(self, model_sharded_state_dict, is_loading, *args, **kwargs)

    return build


def _with_live_step(set_states):
    @torch.no_grad()
    def set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = {**tensors, "step": step}
        return set_states(self, model_param, tensors)

    return set_main_param_and_optimizer_states


def _with_steps_from_param_groups(load_state_dict):
    def load(self, state_dict):
        saved = {group.get("step") for group in state_dict["optimizer"]["param_groups"]}
        load_state_dict(self, state_dict)
        saved.discard(None)
        if len(saved) == 1:
            step = float(saved.pop())
            for state in self.optimizer.state.values():
                if "step" in state:
                    state["step"] = torch.tensor(step)

    return load


def apply() -> bool:
    """Install the fixes (once) when megatron's distributed optimizer uses torch's Adam.
    Returns True when they are active."""
    global _APPLIED
    distrib = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    if distrib.HAVE_APEX_OR_TE:
        return False
    if not _APPLIED:
        optimizer = distrib.DistributedOptimizer
        optimizer.sharded_state_dict = _with_allocated_state(optimizer.sharded_state_dict)
        optimizer._set_main_param_and_optimizer_states = _with_live_step(
            optimizer._set_main_param_and_optimizer_states)
        optimizer.load_state_dict = _with_steps_from_param_groups(optimizer.load_state_dict)
        _APPLIED = True
    return True
