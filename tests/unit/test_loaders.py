"""Loaders: HF folders (single and sharded safetensors), GGUF files in F32/F16/BF16/Q8_0/Q4_0/Q4_1
(our dequantizer vs gguf's, our model vs transformers loading the same GGUF), and bad paths."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch

from tests.helpers.tiny_model import (
    gguf_roundtrip,
    hf_reference,
    make_tiny_llama,
    write_gguf,
    write_hf_folder,
)
from workers.loader import LoadedModel, ModelLoadError, load_model
from workers.loader.gguf import GGUFFile
from workers.loader.gguf_quants import dequantize
from workers.model.attention_metadata import AttentionMetadata

QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_llama(num_heads=4, num_kv_heads=2, seed=7)


@pytest.fixture(scope="module")
def folder(tiny, tmp_path_factory):
    return write_hf_folder(tiny, tmp_path_factory.mktemp("hf"))


def all_logits(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    model, bs, n = loaded.model, 4, len(ids)
    caches = model.make_kv_caches(num_blocks=8, block_size=bs)
    table = torch.tensor([[3, 0, 6, 1, 7]])
    pos = torch.arange(n)
    meta = AttentionMetadata([n], [n], table, table[0, pos // bs] * bs + pos % bs, bs)
    return model.compute_logits(model(torch.tensor(ids), pos, meta, caches))


IDS = [5, 77, 300, 12, 9, 150, 42, 42, 3, 260, 18, 99, 7, 201]


def test_hf_folder(folder, tiny):
    loaded = load_model(folder)
    assert loaded.name == folder.name and loaded.source == folder
    assert loaded.config.vocab_size == tiny.config["vocab_size"] == loaded.tokenizer.vocab_size
    assert loaded.config.eos_token_ids == (2, 0)  # config.json, then generation_config.json
    assert loaded.tokenizer.eos_token_ids[0] == 2
    assert loaded.tokenizer.bos_token_id == 1
    with torch.no_grad():
        expected = hf_reference(folder)(torch.tensor([IDS])).logits[0]
    assert (all_logits(loaded, IDS) - expected).abs().max().item() <= TOL


def test_sharded_folder_equals_single_file(folder, tiny, tmp_path):
    sharded = write_hf_folder(tiny, tmp_path / "sharded", shards=3)
    assert len(list(sharded.glob("*.safetensors"))) == 3
    assert torch.equal(all_logits(load_model(sharded), IDS), all_logits(load_model(folder), IDS))


@pytest.mark.parametrize("qtype", QTYPES)
def test_gguf_dequantization_equals_gguf_package(tiny, tmp_path, qtype):
    path = write_gguf(tiny, tmp_path / f"tiny-{qtype}.gguf", qtype)
    reader = gguf.GGUFReader(str(path))
    with GGUFFile(path) as f:
        assert {t.name for t in reader.tensors} == set(f.tensors)
        for t in reader.tensors:
            ours = f.tensors[t.name]
            assert ours.type_name == t.tensor_type.name
            assert ours.shape == tuple(int(d) for d in reversed(t.shape))
            raw = f.raw(t.name)
            assert np.array_equal(raw, np.asarray(t.data).reshape(-1).view(np.uint8))
            theirs = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(ours.shape)
            assert np.array_equal(f.tensor(t.name), theirs.astype(np.float32))
            assert np.array_equal(
                dequantize(raw, ours.ggml_type, theirs.size).reshape(ours.shape), theirs
            )


@pytest.mark.parametrize("qtype", QTYPES)
def test_gguf_model_matches_transformers_and_dequantized_folder(tiny, folder, tmp_path, qtype):
    path = write_gguf(tiny, folder / f"tiny-{qtype}.gguf", qtype)
    try:
        loaded = load_model(path)
        assert loaded.name == f"tiny-{qtype}"
        assert loaded.config.tie_word_embeddings is False
        got = all_logits(loaded, IDS)
        if qtype != "BF16":  # transformers' GGUF loader has no BF16 dequantizer
            with torch.no_grad():
                expected = hf_reference(folder, gguf_file=path.name)(torch.tensor([IDS])).logits[0]
            assert (got - expected).abs().max().item() <= TOL
        same_weights = write_hf_folder(tiny, tmp_path / "rt", weights=gguf_roundtrip(tiny, qtype))
        assert (got - all_logits(load_model(same_weights), IDS)).abs().max().item() <= TOL
    finally:
        path.unlink()


def test_gguf_tied_embeddings_and_metadata(tmp_path):
    tiny = make_tiny_llama(num_heads=4, num_kv_heads=1, tie_word_embeddings=True, seed=3)
    path = write_gguf(tiny, tmp_path / "tied.gguf", "Q8_0")
    loaded = load_model(path)
    c = loaded.config
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.num_layers) == (4, 1, 16, 2)
    assert c.tie_word_embeddings and c.eos_token_ids == (2,) and c.bos_token_id == 1
    assert c.max_position_embeddings == 256 and c.rope_theta == 10000.0
    folder = write_hf_folder(tiny, tmp_path / "rt", weights=gguf_roundtrip(tiny, "Q8_0"))
    assert (all_logits(loaded, IDS) - all_logits(load_model(folder), IDS)).abs().max().item() <= TOL


# where each format keeps its float16 scales (random bytes there could be inf/nan)
SCALE_BYTES = {"Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


@pytest.mark.parametrize("qtype", sorted(SCALE_BYTES))
def test_more_quant_types_equal_gguf_package_on_random_blocks(qtype):
    """Formats gguf's Python writer cannot produce: random blocks, dequantized both ways."""
    kind = gguf.GGMLQuantizationType[qtype]
    values, nbytes = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=(40, nbytes), dtype=np.uint8)
    for offset in SCALE_BYTES[qtype]:
        raw[:, offset : offset + 2] = rng.standard_normal((40, 1)).astype(np.float16).view(np.uint8)
    theirs = gguf.quants.dequantize(raw, kind).reshape(-1)
    assert np.array_equal(dequantize(raw.reshape(-1), int(kind), 40 * values), theirs)


def test_unsupported_quant_type_names_itself(tiny, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    path = write_gguf(tiny, tmp_path / "odd.gguf", "Q8_0", zero_blocks={name: "IQ4_NL"})
    with GGUFFile(path) as f:
        assert f.tensors["blk.1.ffn_up.weight"].type_name == "IQ4_NL"
        with pytest.raises(ValueError, match="blk.1.ffn_up.weight is stored as IQ4_NL"):
            f.tensor("blk.1.ffn_up.weight")
    with pytest.raises(ModelLoadError, match="IQ4_NL.*Q4_1"):  # names itself and what works
        load_model(path)


def test_bad_paths(tmp_path, folder):
    with pytest.raises(ModelLoadError, match="does not exist.*Hugging Face model folder"):
        load_model(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json.*\\.gguf file"):
        load_model(empty)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 64)
    with pytest.raises(ModelLoadError, match="neither a folder nor a .gguf file"):
        load_model(other)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + b"\0" * 60)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(fake)
    truncated = tmp_path / "short.gguf"
    truncated.write_bytes(b"GGUF\x03\0\0\0\x05")
    with pytest.raises(ModelLoadError, match="ends in the middle"):
        load_model(truncated)
    assert issubclass(ModelLoadError, ValueError)


def test_folder_problems_are_named(tmp_path, folder):
    no_weights = tmp_path / "no_weights"
    shutil.copytree(folder, no_weights, ignore=shutil.ignore_patterns("*.safetensors", "*.gguf"))
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_model(no_weights)
    wrong_arch = tmp_path / "wrong_arch"
    shutil.copytree(folder, wrong_arch, ignore=shutil.ignore_patterns("*.gguf"))
    cfg = json.loads((wrong_arch / "config.json").read_text())
    (wrong_arch / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="model_type 'bert'"):
        load_model(wrong_arch)
    wrong_shape = tmp_path / "wrong_shape"
    shutil.copytree(folder, wrong_shape, ignore=shutil.ignore_patterns("*.gguf"))
    (wrong_shape / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(
        ModelLoadError, match=r"mlp\.\w+_proj\.weight: shape \(\d+, \d+\) but the config implies"
    ):
        load_model(wrong_shape)
