"""Invalid settings fail in argument validation, before any process group or model, with one
message that says what to change."""
import os

import pytest
import torch

from megatron_patch.model import get_config
from megatron_patch.training import arguments


@pytest.fixture
def paths(tmp_path):
    data = tmp_path / "data"
    (data / ".nv-meta").mkdir(parents=True)
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    return ["--data-path", str(data), "--tokenizer-path", str(tokenizer), "--train-iters", "10"]


def validate(argv, world_size=1, model=None):
    return arguments.validate_args(arguments.parse_args(argv), world_size, model)


def test_derived_values(paths):
    args = validate(paths + ["--micro-batch-size", "2", "--global-batch-size", "16",
                             "--lr-warmup-fraction", "0.2", "--save", "/tmp/run"], world_size=4)
    assert (args.data_parallel_size, args.num_microbatches, args.lr_warmup_iters) == (4, 2, 2)
    assert args.tensorboard_dir == "/tmp/run/tensorboard"
    assert args.dataloader_save == "/tmp/run/dataloader"


@pytest.mark.parametrize("extra, world, message", [
    (["--global-batch-size", "6", "--micro-batch-size", "4"], 1, "use a multiple of 4"),
    (["--tensor-model-parallel-size", "3"], 4, "not divisible by TP x PP"),
    (["--packing", "--micro-batch-size", "2"], 1, "use --micro-batch-size 1"),
    (["--dist-ckpt-optim-fully-reshardable"], 1, "add --use-distributed-optimizer"),
    (["--overlap-param-gather"], 1, "add --use-distributed-optimizer"),
    (["--save-interval", "5"], 1, "--save-interval needs --save"),
    (["--async-save"], 1, "--async-save needs --save"),
    (["--manual-gc", "--manual-gc-interval", "-1"], 1, "--manual-gc-interval -1 is negative"),
    (["--loss-chunk-tokens", "-1"], 1, "--loss-chunk-tokens -1 is negative"),
    (["--record-memory-history"], 1, "this machine has no GPU; drop the flag"),
    (["--cuda-graph-impl", "local"], 1, "captures CUDA graphs, and this machine has no GPU"),
    (["--max-samples-per-pack", "0"], 1, "--max-samples-per-pack 0 must be at least 1"),
    (["--log-interval", "0"], 1, "--log-interval must be at least 1, got 0"),
    (["--eval-iters", "0"], 1, "--eval-iters must be at least 1, got 0"),
    (["--keep-last", "0"], 1, "--keep-last 0 must be at least 1"),
    (["--lr-vision", "1e-6", "--trainable-modules", "adapter", "language_model"], 1,
     "--lr-vision sets the learning rate of the vision_model, which --trainable-modules leaves"),
    (["--lr-adapter", "1e-4", "--trainable-modules", "language_model"], 1,
     "add adapter to --trainable-modules or drop the flag"),
    (["--global-batch-size", "0"], 1, "--global-batch-size must be at least 1, got 0"),
    (["--lr-warmup-iters", "10"], 1, r"warmup \(10 iterations\) must be shorter than the decay"),
    (["--tensor-model-parallel-size", "4", "--sequence-parallel", "--seq-length", "1022"], 4,
     "--seq-length 1022 is not divisible by 4"),
])
def test_invalid_combinations(paths, extra, world, message):
    with pytest.raises(arguments.ArgumentError, match=message.replace("+", r"\+")):
        validate(paths + extra, world)


def test_sequence_parallel_is_on_only_with_tensor_parallelism(paths):
    """As in Megatron-LM: the flag is dropped at TP 1 (nothing to split over), so one script
    serves every TP size."""
    assert not validate(paths + ["--sequence-parallel"]).sequence_parallel
    assert validate(paths + ["--sequence-parallel", "--tensor-model-parallel-size", "2"],
                    2).sequence_parallel
    assert not validate(paths + ["--tensor-model-parallel-size", "2"], 2).sequence_parallel


def test_sequence_parallel_batches_pad_to_a_multiple_of_tp(paths):
    """Unpacked micro-batches are as long as their longest row; under sequence parallelism
    that length must split evenly over the TP ranks."""
    from megatron_patch.training.components import encoder_settings
    sp = encoder_settings(validate(paths + ["--sequence-parallel", "--tensor-model-parallel-size",
                                            "4"], 4))
    assert sp.pad_to_multiple_of == 4
    assert encoder_settings(validate(paths + ["--tensor-model-parallel-size", "4"],
                                     4)).pad_to_multiple_of == 1


def test_model_divisibility(paths):
    tiny = get_config("tiny")  # 4 heads, 2 KV heads, 4 layers
    with pytest.raises(arguments.ArgumentError, match=r"query groups \(KV heads\) \(2\) are not "
                                                      "divisible by TP=4"):
        validate(paths + ["--tensor-model-parallel-size", "4"], 4, tiny)
    with pytest.raises(arguments.ArgumentError, match=r"language layers \(4\) are not divisible by PP=3"):
        validate(paths + ["--pipeline-model-parallel-size", "3"], 3, tiny)
    validate(paths + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 4, tiny)


def test_missing_paths(tmp_path, paths):
    with pytest.raises(arguments.ArgumentError, match="has no .nv-meta index"):
        validate(["--data-path", str(tmp_path), *paths[2:]])
    with pytest.raises(arguments.ArgumentError, match="--tokenizer-path .* does not exist"):
        validate([*paths[:2], "--tokenizer-path", str(tmp_path / "nope"), *paths[4:]])


def test_model_config_takes_overrides_and_the_tokenizers_image_token(paths, demo_tokenizer):
    from megatron_patch.data.tokenizer import SFTTokenizer
    from megatron_patch.training.components import model_config
    tokenizer = SFTTokenizer(demo_tokenizer)
    args = arguments.parse_args(paths + ["--model", "tiny", "--rotary-base", "5e6",
                                         "--num-layers", "2"])
    cfg = model_config(args, tokenizer)
    assert cfg.language.rope_theta == 5e6 and cfg.language.num_layers == 2
    assert cfg.image_token_id == tokenizer.image_pad_id


def test_gradient_accumulation_fusion_is_on_with_cuda_and_runs_without_apex(paths, monkeypatch):
    """Default: on with CUDA, off on the CPU; either can be asked for. Without APEX megatron's
    linears get torch's kernels (compat/wgrad_accumulation.py) instead of refusing the flag."""
    from megatron.core.tensor_parallel import layers

    from megatron_patch.compat import wgrad_accumulation
    from megatron_patch.training.kernels import gradient_accumulation_fusion
    monkeypatch.setattr(layers, "_grad_accum_fusion_available", False)  # no APEX
    for cuda in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        assert gradient_accumulation_fusion(arguments.parse_args(paths)) is cuda
        off = arguments.parse_args(paths + ["--no-gradient-accumulation-fusion"])
        assert gradient_accumulation_fusion(off) is False
        on = arguments.parse_args(paths + ["--gradient-accumulation-fusion"])
        assert gradient_accumulation_fusion(on) is True
        assert layers._grad_accum_fusion_available and not wgrad_accumulation.uses_apex()


def test_kernel_summary_says_what_the_run_computes_with(paths, monkeypatch):
    from megatron_patch.training import kernels
    cpu = kernels.summary(arguments.parse_args(paths + ["--bf16"]))
    assert cpu["attention"] == "torch SDPA; packed sequences: one call per sample"
    assert not (cpu["fused_swiglu"] or cpu["fused_cross_entropy"] or cpu["fused_rope"]
                or cpu["fused_norms"] or cpu["gradient_accumulation_fusion"]
                or cpu["fused_qkv_preparation"])
    assert cpu["precision"].startswith("bf16") and cpu["recompute"] == "off"
    assert cpu["loss_chunk_tokens"] == 0  # the CPU keeps megatron's output layer + cross entropy
    assert not cpu["sequence_parallel"]
    assert cpu["adam"] == "torch AdamW"  # the CPU keeps torch's default kernel

    fused = kernels.summary(arguments.parse_args(paths + ["--bf16",
                                                          "--gradient-accumulation-fusion"]))
    assert "unfused arithmetic" in fused["gradient_accumulation_fusion"]  # no such GEMM on CPU
    fused = kernels.summary(arguments.parse_args(paths + ["--gradient-accumulation-fusion"]))
    assert fused["gradient_accumulation_fusion"] == "torch addmm into the fp32 buffer"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels.wgrad_accumulation, "fp32_output_gemm_works", lambda *a: True)
    monkeypatch.setattr(kernels, "flash_varlen_kernel", lambda: object())  # torch >= 2.10
    monkeypatch.setattr(kernels, "attention_backend", lambda args: "local")  # no TE here
    gpu = kernels.summary(arguments.parse_args(
        paths + ["--bf16", "--recompute-granularity", "full", "--no-bias-swiglu-fusion"]))
    assert gpu["attention"] == "torch SDPA; packed sequences: torch varlen flash kernel"
    cudnn = kernels.summary(arguments.parse_args(paths + ["--bf16", "--packed-attention-kernel",
                                                          "cudnn"]))
    assert cudnn["attention"] == "torch SDPA; packed sequences: torch cuDNN attention kernel"
    # the chunked loss replaces megatron's cross entropy, fused or not
    assert gpu["loss_chunk_tokens"] == 1024 and not gpu["fused_cross_entropy"]
    assert gpu["fused_rope"] and not gpu["fused_swiglu"]
    megatron_loss = kernels.summary(arguments.parse_args(paths + ["--bf16",
                                                                  "--loss-chunk-tokens", "0"]))
    assert megatron_loss["fused_cross_entropy"] and megatron_loss["loss_chunk_tokens"] == 0
    assert not kernels.summary(arguments.parse_args(paths + ["--no-rope-fusion"]))["fused_rope"]
    assert gpu["fused_norms"] and gpu["fused_qkv_preparation"] == "both towers"
    unfused_norms = kernels.summary(arguments.parse_args(paths + ["--no-norm-fusion"]))
    assert not unfused_norms["fused_norms"]
    # the language model's q/k norms are part of its preparation; the vision tower has none
    assert unfused_norms["fused_qkv_preparation"] == "the vision tower"
    assert not kernels.summary(arguments.parse_args(paths + ["--no-rope-fusion"]))[
        "fused_qkv_preparation"]
    assert gpu["recompute"] == "full" and gpu["adam"] == "torch AdamW, fused kernel"
    assert gpu["gradient_accumulation_fusion"] == ("torch addmm with fp32 output into the fp32 "
                                                   "buffer")
    monkeypatch.setattr(kernels, "attention_backend", lambda args: "te")
    te = kernels.summary(arguments.parse_args(paths))
    assert te["attention"].startswith("Transformer Engine") and not te["fused_qkv_preparation"]


def test_recompute_modules_belong_to_selective_recompute(paths):
    """--recompute-modules (Megatron-LM's flag) only means something for selective recompute:
    refused without it; the summary names what is recomputed, megatron's default included."""
    from megatron_patch.training import kernels
    with pytest.raises(arguments.ArgumentError, match="add --recompute-granularity selective"):
        validate(paths + ["--recompute-modules", "mlp"])
    with pytest.raises(arguments.ArgumentError, match="add --recompute-granularity selective"):
        validate(paths + ["--recompute-granularity", "full", "--recompute-modules", "mlp"])
    with pytest.raises(SystemExit):  # argparse: not one of megatron's modules for this model
        arguments.parse_args(paths + ["--recompute-granularity", "selective",
                                      "--recompute-modules", "moe"])
    args = validate(paths + ["--recompute-granularity", "selective",
                             "--recompute-modules", "layernorm", "mlp"])
    assert kernels.summary(args)["recompute"] == "selective (layernorm, mlp)"
    assert kernels.recomputed_flops(args) == "mlp"  # HFU counts the MLPs' forward again
    assert kernels.recompute_config(args) == dict(recompute_granularity="selective",
                                                  recompute_modules=["layernorm", "mlp"])
    args = validate(paths + ["--recompute-granularity", "selective"])
    assert kernels.summary(args)["recompute"] == "selective (core_attn)"
    assert kernels.recomputed_flops(args) is None
    assert kernels.recompute_config(args) == dict(recompute_granularity="selective")
    args = validate(paths + ["--recompute-granularity", "full", "--recompute-method", "block",
                             "--recompute-num-layers", "2"])
    assert kernels.recomputed_flops(args) == "full"
    assert kernels.recompute_config(args) == dict(recompute_granularity="full",
                                                  recompute_method="block", recompute_num_layers=2)
    assert kernels.recompute_config(validate(paths)) == {}


def test_cuda_graphs_need_packing_and_no_full_recompute(paths, monkeypatch):
    """--cuda-graph-impl local on a GPU: fixed shapes (packing), no full recompute (megatron
    refuses it); packs default to 63 samples (64 segments with the trailing padding), which the
    summary states; megatron's NCCL setting for expandable segments is made before NCCL starts."""
    from megatron_patch.training import kernels
    monkeypatch.setattr(arguments, "_cuda_available", lambda: True)
    graphs = paths + ["--cuda-graph-impl", "local"]
    with pytest.raises(arguments.ArgumentError, match="add --packing"):
        validate(graphs)
    with pytest.raises(arguments.ArgumentError, match="drop --recompute-granularity full"):
        validate(graphs + ["--packing", "--recompute-granularity", "full"])
    monkeypatch.delenv("NCCL_GRAPH_REGISTER", raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    args = validate(graphs + ["--packing", "--recompute-granularity", "selective"])
    assert args.max_samples_per_pack == 63 and kernels.cuda_graph_segments(args) == 64
    assert kernels.summary(args)["cuda_graphs"] == "language layers, packs of 64 segments"
    assert os.environ["NCCL_GRAPH_REGISTER"] == "0"
    args = validate(graphs + ["--packing", "--max-samples-per-pack", "8"])
    assert kernels.cuda_graph_segments(args) == 9
    eager = validate(paths + ["--packing", "--max-samples-per-pack", "8"])
    assert kernels.cuda_graph_segments(eager) is None and not kernels.summary(eager)["cuda_graphs"]
    assert eager.max_samples_per_pack == 8


def test_save_into_a_checkpoint_is_refused(paths, tmp_path):
    """A run saved into an iter_* folder (or below one) would nest its checkpoints in it."""
    checkpoint = tmp_path / "run" / "iter_0000015"
    for save in (checkpoint, checkpoint / "more"):
        with pytest.raises(arguments.ArgumentError, match="the checkpoint .*iter_0000015: give a "
                           "run folder"):
            validate(paths + ["--save", str(save)])
    assert not (checkpoint / "more").exists()
    validate(paths + ["--save", str(tmp_path / "run")])  # the run folder itself is fine
