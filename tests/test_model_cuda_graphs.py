"""``--cuda-graph-impl local`` as far as a CPU can check it: which layers megatron-core's graph
manager takes (the language decoder layers, not the vision tower, whose shapes follow the
images), and the fixed segment count the model gives every packed micro-batch, which must not
change a single value; and the sync-free image merge, without which the host would wait for
the device at every micro-batch's start however fast it launches the rest. Capturing and
replaying needs CUDA: tests/test_training_gpu.py."""
from __future__ import annotations

import re

import pytest
import torch
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer import cuda_graphs

from megatron_patch.model import build_model, get_config
from megatron_patch.model.attention import covering_packed_seq_params
from test_model_reference import image_batch, init_parallel


class RecordingGraphManager(torch.nn.Module):
    """Stands in for megatron's CudaGraphManager, whose constructor needs a GPU; it only
    records which configs asked for one."""

    built = []

    def __init__(self, config):
        super().__init__()
        RecordingGraphManager.built.append(config)


def test_only_the_language_layers_get_graph_managers(monkeypatch):
    init_parallel(1, 1)
    monkeypatch.setattr(cuda_graphs, "CudaGraphManager", RecordingGraphManager)
    RecordingGraphManager.built = []
    cfg = get_config("tiny")
    model = build_model(cfg, attention_backend="local", cuda_graph_segments=6)
    language_layers = model.language_model.decoder.layers
    assert all(isinstance(layer.cudagraph_manager, RecordingGraphManager)
               for layer in language_layers)
    # and the decoder block's, which megatron uses for whole-model inference graphs only
    assert isinstance(model.language_model.decoder.cudagraph_manager, RecordingGraphManager)
    assert len(RecordingGraphManager.built) == cfg.language.num_layers + 1
    assert not any(hasattr(module, "cudagraph_manager")
                   for module in model.vision_model.modules())
    assert model.language_model.config.cuda_graph_impl == "local"
    assert model.vision_model.config.cuda_graph_impl == "none"
    assert model.graph_segments == 6
    plain = build_model(cfg, attention_backend="local")
    assert plain.graph_segments is None and plain.language_model.config.cuda_graph_impl == "none"


def _packed_batch(cfg, lengths, rows):
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(16, cfg.language.vocab_size, (1, rows), generator=generator)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    params = covering_packed_seq_params(cu, rows, max(lengths), torch.device("cpu"))
    labels = torch.roll(ids, -1, dims=1)
    return dict(input_ids=ids, position_ids=positions, labels=labels, packed_seq_params=params)


@pytest.mark.parametrize("fixed", [True, False], ids=["fixed-segments", "as-packed"])
def test_the_first_iteration_records_one_graph_per_layer(monkeypatch, fixed):
    """megatron's graph manager in its first iteration (eager, recording; the capture at its
    end needs CUDA): micro-batches whose packs hold 1, 3 and 4 segments of other lengths must
    all match the first one's arguments, or a layer gets a graph per shape and, once captured,
    asserts on any shape it has not seen. With the model's fixed segment count every language
    layer records one runner, a forward and a backward; as packed, one per pack."""
    init_parallel(1, 1)
    for name, stand_in in (("get_device_capability", lambda *args: (9, 0)),
                           ("graph_pool_handle", lambda: None), ("Stream", lambda: None),
                           ("set_stream", lambda stream: None)):
        monkeypatch.setattr(torch.cuda, name, stand_in)  # the manager's constructor's calls
    monkeypatch.setattr(get_cuda_rng_tracker(), "use_cudagraphable_rng", True, raising=False)
    monkeypatch.setattr(cuda_graphs.CudaGraphManager, "global_mempool", None)
    monkeypatch.setattr(cuda_graphs._CudagraphGlobalRecord, "cudagraph_record", [])
    cfg = get_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg, attention_backend="local", cuda_graph_segments=6)
    model.graph_segments = 6 if fixed else None
    for lengths in ([32], [7, 12, 13], [5, 5, 5, 17]):
        model(**_packed_batch(cfg, lengths, 32)).sum().backward()
    runners = [len(layer.cudagraph_manager.cudagraph_runners)
               for layer in model.language_model.decoder.layers]
    record = [kind for _, kind, *_ in cuda_graphs._CudagraphGlobalRecord.cudagraph_record]
    layers = cfg.language.num_layers
    if fixed:
        assert runners == [1] * layers and record == ["fwd"] * layers + ["bwd"] * layers
    else:
        assert runners == [3] * layers and len(record) == 3 * 2 * layers


def test_fixed_segment_counts_give_the_same_losses_and_gradients():
    """The model pads every pack's segments to ``graph_segments`` (the shapes its CUDA graphs
    were captured with): the same per-token losses and gradients, bit for bit."""
    init_parallel(1, 1)
    cfg = get_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg, attention_backend="local")
    batch = _packed_batch(cfg, [7, 12, 5, 8], 32)
    results = []
    for segments in (None, 9):
        model.graph_segments = segments
        model.zero_grad()
        losses = model(**batch)
        losses.sum().backward()
        results.append((losses.detach(), {name: param.grad.clone()
                                          for name, param in model.named_parameters()
                                          if param.grad is not None}))
    (losses, grads), (fixed_losses, fixed_grads) = results
    assert torch.equal(fixed_losses, losses)
    assert fixed_grads.keys() == grads.keys() and len(grads) > 10
    for name in grads:
        assert torch.equal(fixed_grads[name], grads[name]), name

    model.graph_segments = 3  # the pack has 4 segments
    with pytest.raises(ValueError, match="has 4 segments .* more than the 3"):
        model(**batch)


def test_image_tokens_that_disagree_with_the_images_are_refused():
    init_parallel(1, 1)
    cfg = get_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg, attention_backend="local")
    ids, pixels, grid = image_batch(cfg, [(1, 4, 4)], 32, [0])
    ids[0, -1] = cfg.image_token_id  # one <|image_pad|> more than the image's 4 tokens
    with pytest.raises(ValueError, match=re.escape("5 <|image_pad|> tokens, but the images "
                                                   "(image_grid_thw) give 4")):
        model.embed(ids, pixels, grid)
    with pytest.raises(ValueError, match=re.escape("1 <|image_pad|> tokens, but the images "
                                                   "(image_grid_thw) give 0")):
        model.embed(ids[:, -2:], None, None)
