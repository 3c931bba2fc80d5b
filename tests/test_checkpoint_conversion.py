"""HF <-> megatron checkpoint conversion, end to end on a tiny random checkpoint written here with
the published key names and config.json fields:

* HF -> mcore -> HF is bit-identical for every tensor, also after a TP=2 x PP=2 job re-saved it;
* the converted model (TP=1 and TP=2) gives the independent reference's logits, text and image;
* training 2 steps on it and exporting changes exactly the trained tensors (the frozen vision
  tower comes back bit-identical);
* wrong inputs fail with every offending name, both shapes, or the mismatched config field.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_patch.checkpoint_conversion import ConversionError, convert_hf_to_mcore, convert_mcore_to_hf
from megatron_patch.data.tokenizer import SFTTokenizer
from megatron_patch.model import get_config
from megatron_patch.model import hf_mapping
from test_model_reference import RefRiceVisual, free_port, hf_qwen3, image_batch, init_parallel
from trainer_runs import run_trainer

REPO = Path(__file__).resolve().parents[1]
GRIDS = [(1, 4, 4), (1, 2, 6)]


# ------------------------------------------------------------------ a tiny published-style checkpoint
def published_config(cfg, image_token_id: int, dtype: str = "float32", tied: bool = False) -> dict:
    """config.json as the released checkpoints spell it (Llavaonevision1_5Config)."""
    v, l = cfg.vision, cfg.language
    return {
        "architectures": ["LLaVAOneVision1_5_ForConditionalGeneration"],
        "model_type": "llavaonevision1_5", "image_token_id": image_token_id,
        "video_token_id": image_token_id + 1, "vocab_size": l.vocab_size, "torch_dtype": dtype,
        "vision_config": {"model_type": "rice_vit", "depth": v.num_layers, "embed_dim": v.hidden_size,
                          "hidden_size": v.hidden_size, "hidden_act": "gelu",
                          "intermediate_size": v.ffn_hidden_size, "num_heads": v.num_attention_heads,
                          "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 1, "layer_norm_eps": 1e-5,
                          "text_hidden_size": l.hidden_size},
        "text_config": {"model_type": "LLaVAOneVision1_5_text", "vocab_size": l.vocab_size,
                        "hidden_size": l.hidden_size, "intermediate_size": l.ffn_hidden_size,
                        "num_hidden_layers": l.num_layers, "num_attention_heads": l.num_attention_heads,
                        "num_key_value_heads": l.num_query_groups, "head_dim": l.head_dim,
                        "hidden_act": "silu", "max_position_embeddings": l.max_position_embeddings,
                        "rms_norm_eps": l.rms_norm_eps, "rope_theta": l.rope_theta,
                        "tie_word_embeddings": tied, "attention_bias": False},
    }


def write_hf_checkpoint(directory: Path, tokenizer_dir, seed: int = 0, dtype=torch.float32,
                        nested: bool = False, tied: bool = False, shards: int = 3) -> dict:
    """Reference vision tower + transformers Qwen3 weights as a sharded safetensors checkpoint.
    Tensors go round-robin over the shards, so q/k/v and gate/up of a layer are split across
    files. Returns the tensors by their on-disk names."""
    cfg = get_config("tiny")
    torch.manual_seed(seed)
    tensors = {**{"visual." + k: v for k, v in RefRiceVisual(cfg).state_dict().items()},
               **hf_qwen3(cfg).state_dict()}
    if tied:
        del tensors["lm_head.weight"]
    if nested:
        tensors = {hf_mapping.hf_name_in_layout(k, "nested"): v for k, v in tensors.items()}
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}
    directory.mkdir(parents=True)
    weight_map = {}
    for index in range(shards):
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in sorted(tensors)[index::shards]}
        save_file(part, str(directory / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    from megatron_patch.data.tokenizer import SFTTokenizer
    image_id = SFTTokenizer(str(tokenizer_dir)).image_pad_id
    config = published_config(cfg, image_id, str(dtype).replace("torch.", ""), tied)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), directory / name)
    return tensors


def read_hf(directory) -> dict:
    index = json.loads((Path(directory) / "model.safetensors.index.json").read_text())
    out = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(Path(directory) / file), framework="pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    assert set(out) == set(index["weight_map"])
    return out


def reference_models(hf_dir):
    """The independent references, loaded strictly from HF files by their published names."""
    cfg = get_config("tiny")
    tensors = {hf_mapping.normalize_hf_name(k): v for k, v in read_hf(hf_dir).items()}
    visual, lm = RefRiceVisual(cfg).eval(), hf_qwen3(cfg)
    visual.load_state_dict({k[len("visual."):]: v for k, v in tensors.items() if k.startswith("visual.")})
    lm.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("visual.")})
    return visual, lm


@pytest.fixture(scope="module")
def hf_dir(demo_tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "tiny-hf"
    write_hf_checkpoint(directory, demo_tokenizer)
    return directory


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mcore") / "base"
    convert_hf_to_mcore(str(hf_dir), str(out), model="tiny", tp=2, pp=2, progress=False)
    return out


# ------------------------------------------------------------------ layout and round trip
def test_converted_directory_is_a_base_checkpoint_with_tokenizer(converted):
    assert (converted / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    base = converted / "iter_0000000"
    assert (base / "COMPLETE").is_file() and not (base / "run_state.json").exists()
    record = json.loads((base / "hf_conversion.json").read_text())
    assert record["hf_key_layout"] == "flat" and record["dtype"] == "float32"
    assert (converted / "tokenizer.json").is_file()  # --tokenizer-path OUT works
    assert record["tokenizer"] == SFTTokenizer(str(converted)).fingerprint()  # checked at --load


def test_round_trip_is_bit_identical(hf_dir, converted, tmp_path):
    out = Path(convert_mcore_to_hf(str(converted), str(tmp_path / "hf"), progress=False))
    original, back = read_hf(hf_dir), read_hf(out)
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    config, source = (json.loads((d / "config.json").read_text()) for d in (out, hf_dir))
    for section in ("text_config", "vision_config"):
        assert config[section] == source[section]
    assert (out / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()


def test_export_keeps_the_sources_informational_fields():
    """max_position_embeddings and the image token id differ between releases (the 8B's context
    is not the 4B's): an export writes the source's own values, the architecture from the model."""
    from megatron_patch.checkpoint_conversion.hf_config import hf_config_for
    cfg = get_config("tiny")
    source = published_config(cfg, image_token_id=7)
    source["text_config"]["max_position_embeddings"] = 40960
    source["text_config"]["num_hidden_layers"] = 99  # architecture: the model's value wins
    exported = hf_config_for(cfg, "bfloat16", source)
    assert exported["text_config"]["max_position_embeddings"] == 40960
    assert exported["image_token_id"] == 7
    assert exported["text_config"]["num_hidden_layers"] == cfg.language.num_layers


def test_nested_bf16_checkpoint_keeps_its_layout_and_dtype(demo_tokenizer, tmp_path):
    original = write_hf_checkpoint(tmp_path / "hf", demo_tokenizer, seed=1, dtype=torch.bfloat16, nested=True)
    convert_hf_to_mcore(str(tmp_path / "hf"), str(tmp_path / "mcore"), progress=False)  # preset inferred
    back = read_hf(convert_mcore_to_hf(str(tmp_path / "mcore"), str(tmp_path / "back"),
                                       max_shard_size="200KB", progress=False))
    assert set(back) == set(original) and any(k.startswith("model.language_model.") for k in back)
    assert all(torch.equal(back[k], v) and v.dtype == torch.bfloat16 for k, v in original.items())
    assert len(set(json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
                   ["weight_map"].values())) > 1


def test_tied_checkpoint_gets_the_embedding_as_output_layer(demo_tokenizer, tmp_path):
    original = write_hf_checkpoint(tmp_path / "hf", demo_tokenizer, seed=2, tied=True)
    convert_hf_to_mcore(str(tmp_path / "hf"), str(tmp_path / "mcore"), progress=False)
    back = read_hf(convert_mcore_to_hf(str(tmp_path / "mcore"), str(tmp_path / "back"), progress=False))
    assert torch.equal(back["lm_head.weight"], original["model.embed_tokens.weight"])


def test_table_covers_every_parameter_once():
    init_parallel(1, 1)
    from megatron_patch.checkpoint_conversion.runtime import build_unsharded_model
    cfg = get_config("tiny")
    names = [n for n, _ in build_unsharded_model(cfg, torch.float32, meta=True).named_parameters()]
    table = [item.mcore for item in hf_mapping.items(cfg)]
    assert sorted(table) == sorted(names) and len(set(table)) == len(table)


# ------------------------------------------------------------------ logits vs the references
def _reference_logits(hf_dir, cfg, batches):
    visual, lm = reference_models(hf_dir)
    out = []
    with torch.no_grad():
        for ids, pix, grid in batches:
            emb = lm.get_input_embeddings()(ids)
            if pix is not None:
                mask = (ids == cfg.image_token_id)[..., None].expand_as(emb)
                emb = emb.masked_scatter(mask, visual(pix, grid))
            out.append(lm(inputs_embeds=emb).logits)
    return out


def _batches(cfg):
    ids, pix, grid = image_batch(cfg, GRIDS, 40, [0, 1], seed=3)
    text = torch.randint(16, cfg.language.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4))
    return [(text, None, None), (ids, pix, grid)]


def _converted_logits(checkpoint, cfg, batches):
    """Builds the model at the current parallel state, loads the checkpoint as the trainer does
    (dist-checkpoint resharding), returns full-vocab logits per batch."""
    from megatron.core import dist_checkpointing
    from megatron_patch.model import build_model
    model = build_model(cfg, attention_backend="local").eval()
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(checkpoint))
    model.load_state_dict(loaded["model"], strict=True)
    with torch.no_grad():
        return [model(ids, torch.arange(ids.shape[1]).expand(ids.shape[0], -1), pixel_values=pix,
                      image_grid_thw=grid) for ids, pix, grid in batches]


def test_converted_model_logits_match_reference_tp1(hf_dir, converted):
    init_parallel(1, 1)
    cfg = get_config("tiny")
    batches = _batches(cfg)
    ours = _converted_logits(converted / "iter_0000000", cfg, batches)
    for got, want in zip(ours, _reference_logits(hf_dir, cfg, batches)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _parallel_worker(rank, world, port, converted, resharded, out_dir):
    """TP=2 x PP=2: load the converted checkpoint and save it again as a TP2/PP2 run would; then
    TP=2: the logits of the converted model, and each parameter's TP split dim."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import dist_checkpointing
    from megatron_patch.model import build_model
    from megatron_patch.training import checkpoint_paths
    cfg = get_config("tiny")

    init_parallel(2, 2)
    model = build_model(cfg, attention_backend="local")
    sharded = {"model": model.sharded_state_dict()}
    model.load_state_dict(dist_checkpointing.load(sharded, converted)["model"], strict=True)
    partial = checkpoint_paths.partial_dir(resharded, 0, "tp2pp2")
    if rank == 0:
        os.makedirs(partial)
    dist.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict()}, partial)
    dist.barrier()
    if rank == 0:
        checkpoint_paths.publish(resharded, partial, 0)

    init_parallel(2, 1)
    batches = _batches(cfg)
    logits = _converted_logits(converted, cfg, batches)
    model = build_model(cfg, attention_backend="local")
    if rank == 0:
        torch.save(logits, os.path.join(out_dir, "logits_tp2.pt"))
        splits = {n: (p.partition_dim if getattr(p, "tensor_model_parallel", False) else None)
                  for n, p in model.named_parameters()}
        with open(os.path.join(out_dir, "splits.json"), "w") as handle:
            json.dump(splits, handle)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def parallel_job(converted, tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    resharded = out / "tp2pp2"
    mp.start_processes(_parallel_worker, args=(4, free_port(), str(converted / "iter_0000000"),
                                               str(resharded), str(out)),
                       nprocs=4, join=True, start_method="spawn")
    return out, resharded


@pytest.mark.slow
def test_round_trip_through_a_tp2_pp2_save_is_bit_identical(hf_dir, parallel_job, tmp_path):
    _, resharded = parallel_job
    back = read_hf(convert_mcore_to_hf(str(resharded), str(tmp_path / "hf"), model="tiny", progress=False))
    original = read_hf(hf_dir)
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name


@pytest.mark.slow
def test_converted_model_logits_match_reference_tp2(hf_dir, parallel_job):
    out, _ = parallel_job
    cfg = get_config("tiny")
    batches = _batches(cfg)
    for got, want in zip(torch.load(out / "logits_tp2.pt"), _reference_logits(hf_dir, cfg, batches)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_table_tp_dims_are_megatrons(parallel_job):
    out, _ = parallel_job
    splits = json.loads((out / "splits.json").read_text())
    table = {item.mcore: item.tp_dim for item in hf_mapping.items(get_config("tiny"))}
    assert splits == table


# ------------------------------------------------------------------ train, then export
def test_train_two_steps_then_export_changes_only_trained_tensors(hf_dir, converted, converted_demo,
                                                                  tmp_path):
    run = tmp_path / "run"
    result = run_trainer(converted_demo, converted, run, "--load", converted, "--train-iters", 2,
                         "--lr-warmup-iters", 0, "--trainable-modules", "adapter", "language_model")
    assert "a base model; starting at iteration 0" in result.stdout
    exported = tmp_path / "exported"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, str(REPO / "tools" / "convert_mcore_to_hf.py"), "--load", str(run),
                           "--out", str(exported), "--no-progress"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    original, back = read_hf(hf_dir), read_hf(exported)
    assert set(back) == set(original)
    vision = [k for k in original if k.startswith("visual.") and not k.startswith("visual.merger.")]
    adapter = [k for k in original if k.startswith("visual.merger.")]
    language = [k for k in original if not k.startswith("visual.")]
    assert all(torch.equal(back[k], original[k]) for k in vision)  # frozen: bit-identical
    assert all(not torch.equal(back[k], original[k]) for k in adapter)
    changed = [k for k in language if not torch.equal(back[k], original[k])]
    assert all(k in changed for k in language if ".layers." in k or k == "lm_head.weight"), \
        sorted(set(language) - set(changed))
    # what changed is what the trainer saved, mapped back exactly
    from trainer_runs import model_tensors
    trained = model_tensors(run / "iter_0000002")
    fc1 = trained["language_model.decoder.layers.mlp.linear_fc1.weight"][1]
    gate, up = fc1.chunk(2)
    assert torch.equal(back["model.layers.1.mlp.gate_proj.weight"], gate)
    assert torch.equal(back["model.layers.1.mlp.up_proj.weight"], up)
    assert json.loads((exported / "config.json").read_text())["text_config"]["rope_theta"] == 1e6
    reference_models(exported)  # loads strictly by the published names


# ------------------------------------------------------------------ clear errors
@pytest.fixture
def hf_copy(hf_dir, tmp_path):
    return Path(shutil.copytree(hf_dir, tmp_path / "hf"))


def _edit_config(directory, **text_fields):
    config = json.loads((directory / "config.json").read_text())
    config["text_config"].update(text_fields)
    (directory / "config.json").write_text(json.dumps(config))


def test_config_mismatch_is_named(hf_copy, tmp_path):
    _edit_config(hf_copy, rope_theta=5e6)
    with pytest.raises(ConversionError) as err:
        convert_hf_to_mcore(str(hf_copy), str(tmp_path / "a"), model="tiny", progress=False)
    assert "language.rope_theta" in str(err.value) and "1000000.0" in str(err.value) \
        and "5000000.0" in str(err.value)
    with pytest.raises(ConversionError, match="matches no model preset.*closest is 'tiny'"):
        convert_hf_to_mcore(str(hf_copy), str(tmp_path / "b"), progress=False)
    _edit_config(hf_copy, rope_theta=1e6, hidden_act="gelu")
    with pytest.raises(ConversionError, match="text_config.hidden_act = 'gelu'"):
        convert_hf_to_mcore(str(hf_copy), str(tmp_path / "c"), progress=False)


def _rewrite_shard(directory, edit):
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    file = sorted(set(index["weight_map"].values()))[0]
    with safe_open(str(directory / file), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    edit(tensors)
    save_file(tensors, str(directory / file), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != file}
    index["weight_map"].update({k: file for k in tensors})
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return tensors


def test_missing_unexpected_and_misshaped_tensors_are_listed(hf_copy, tmp_path):
    edits = {}

    def edit(tensors):
        edits["missing"] = next(k for k in tensors if "q_proj" in k)
        del tensors[edits["missing"]]
        tensors["visual.extra_head.weight"] = torch.zeros(3)
        edits["resized"] = name = next(k for k in tensors if tensors[k].dim() == 2 and "proj" not in k)
        edits["shape"] = tuple(tensors[name].shape)
        tensors[name] = torch.zeros(edits["shape"][0] + 1, edits["shape"][1])

    _rewrite_shard(hf_copy, edit)
    with pytest.raises(ConversionError) as err:
        convert_hf_to_mcore(str(hf_copy), str(tmp_path / "out"), model="tiny", progress=False)
    text = str(err.value)
    assert f"missing tensors (1):\n  {edits['missing']}" in text
    assert "unexpected tensors (1):\n  visual.extra_head.weight" in text
    rows, cols = edits["shape"]
    assert f"{edits['resized']}: checkpoint ({rows + 1}, {cols}), model tiny expects ({rows}, {cols})" in text
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_impossible_parallel_layout_is_refused(hf_dir, tmp_path):
    with pytest.raises(ConversionError, match=r"query groups \(KV heads\) \(2\) not divisible by TP=4"):
        convert_hf_to_mcore(str(hf_dir), str(tmp_path / "out"), tp=4, progress=False)


def test_export_with_the_wrong_model_names_the_shapes(converted, tmp_path):
    with pytest.raises(ConversionError) as err:
        convert_mcore_to_hf(str(converted), str(tmp_path / "hf"), model="llava-ov-1.5-4b", progress=False)
    assert "language_model.embedding.word_embeddings.weight: checkpoint (512, 64), model " \
           "llava-ov-1.5-4b expects (151936, 2560)" in str(err.value)
    assert str(err.value).endswith("the checkpoint records --model tiny: pass that, or leave "
                                   "--model out")


def test_a_conversion_into_another_outputs_folder_is_refused(converted, hf_dir, converted_demo,
                                                             tmp_path):
    """An export into a run or dataset folder (or an import into a dataset) would mix its files
    into theirs; nothing is written."""
    for folder, what in ((converted, "megatron checkpoints"), (converted_demo, "a converted dataset")):
        before = sorted(os.listdir(folder))
        with pytest.raises(ConversionError, match=f"--out {folder} holds {what}"):
            convert_mcore_to_hf(str(converted), str(folder), progress=False)
        assert sorted(os.listdir(folder)) == before
    before = sorted(os.listdir(converted_demo))
    with pytest.raises(ConversionError, match=f"--out {converted_demo} holds a converted dataset"):
        convert_hf_to_mcore(str(hf_dir), str(converted_demo), model="tiny", progress=False)
    assert sorted(os.listdir(converted_demo)) == before


def test_export_from_where_there_is_no_checkpoint_says_why(tmp_path):
    with pytest.raises(ConversionError, match="does not exist"):
        convert_mcore_to_hf(str(tmp_path / "nope"), str(tmp_path / "hf"), progress=False)
    with pytest.raises(ConversionError, match="holds no iter_\\* checkpoint folder: give a run "
                       "folder"):
        convert_mcore_to_hf(str(tmp_path), str(tmp_path / "hf"), progress=False)


def test_cli_reports_errors_without_a_traceback(hf_dir, tmp_path, capsys):
    from megatron_patch.checkpoint_conversion.cli import hf_to_mcore_main
    code = hf_to_mcore_main(["--hf-dir", str(hf_dir), "--out", str(tmp_path / "o"), "--tp", "3",
                             "--no-progress"])
    assert code == 2 and "error: model tiny cannot be split at TP=3" in capsys.readouterr().err


def test_an_export_with_another_tokenizer_is_refused(converted, tmp_path):
    """The exporter ships the tokenizer beside the weights: another one of the same size went
    through, and every later check (the import's record, evaluate_vqa) then agreed with it."""
    from megatron_patch.data.tokenizer import SFTTokenizer, build_tiny_tokenizer
    size = SFTTokenizer(str(converted)).vocab_size
    other = build_tiny_tokenizer(str(tmp_path / "other"), ["Trains cross rivers at dawn."] * 50,
                                 vocab_size=size)
    with pytest.raises(ConversionError, match=f"--tokenizer-path {other} is not the tokenizer "):
        convert_mcore_to_hf(str(converted), str(tmp_path / "hf"), tokenizer_path=other,
                            progress=False)
    assert not (tmp_path / "hf").exists()


def test_an_import_into_its_own_source_folder_is_refused(hf_copy):
    """It converted everything, then failed copying the tokenizer onto itself (SameFileError)."""
    with pytest.raises(ConversionError, match="is the --hf-dir itself"):
        convert_hf_to_mcore(str(hf_copy), str(hf_copy), progress=False)


@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device"),
    RuntimeError("Worker failure: [enforce fail at inline_container.cc:672] . unexpected pos 704 "
                 "vs 598"),                                  # torch's writer on a full disk
    OSError(30, "Read-only file system")])
def test_a_disk_that_cannot_take_the_output_is_one_line(error, tmp_path, monkeypatch, capsys):
    from megatron_patch.checkpoint_conversion import cli, to_hf

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(to_hf, "convert_mcore_to_hf", failing)
    out = tmp_path / "hf"
    assert cli.mcore_to_hf_main(["--load", str(tmp_path), "--out", str(out)]) == 1
    message = capsys.readouterr().err
    assert message.startswith(f"error: cannot write --out {out}: the disk is ")
    assert "then rerun with --overwrite" in message
