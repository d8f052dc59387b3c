"""The tiny preset is written in the published layout, and the loading code reads
that layout as published: legacy Qwen2-VL key names, slow or fast tokenizer files,
connector.pt with or without a DataParallel prefix."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open

from qwen2vl_flux.checkpoints import CheckpointError, CheckpointLayout
from qwen2vl_flux.checkpoints.projections import load_linear


def test_qwen_weights_use_the_legacy_names_and_load_without_missing_keys(tiny_checkpoints):
    from transformers import Qwen2VLModel

    layout = CheckpointLayout(tiny_checkpoints)
    with safe_open(str(layout.qwen / "model.safetensors"), "pt") as f:
        prefixes = {key.split(".")[0] for key in f.keys()}
    assert prefixes == {"visual", "model"}
    _, info = Qwen2VLModel.from_pretrained(layout.qwen, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]


@pytest.mark.parametrize("part,fast_file,slow_files", [
    ("qwen2-vl", "tokenizer.json", ["vocab.json", "merges.txt", "tokenizer_config.json"]),
    ("flux/tokenizer_2", "tokenizer.json", ["spiece.model", "tokenizer_config.json"]),
])
def test_slow_tokenizer_files_give_the_same_ids_as_fast_ones(tiny_checkpoints, tmp_path, part, fast_file,
                                                             slow_files):
    from transformers import AutoTokenizer

    source = tiny_checkpoints / part
    assert (source / fast_file).exists()
    for name in slow_files:
        shutil.copy(source / name, tmp_path / name)
    text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|image_pad|> a red circle"
    assert AutoTokenizer.from_pretrained(tmp_path)(text).input_ids == \
        AutoTokenizer.from_pretrained(source)(text).input_ids


def test_connector_loads_with_or_without_the_module_prefix(tiny_checkpoints, tmp_path):
    layout = CheckpointLayout(tiny_checkpoints)
    state = torch.load(layout.connector, weights_only=True)
    assert all(k.startswith("module.") for k in state)
    plain = tmp_path / "connector.pt"
    torch.save({k.removeprefix("module.linear."): v for k, v in state.items()}, plain)
    a, b = load_linear(layout.connector), load_linear(plain)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    with pytest.raises(CheckpointError, match="takes 64 features"):
        load_linear(layout.connector, expect_in=65)


def test_missing_parts_are_named(tmp_path):
    layout = CheckpointLayout(tmp_path)
    with pytest.raises(CheckpointError, match="qwen2-vl/connector.pt"):
        layout.require(layout.connector)
