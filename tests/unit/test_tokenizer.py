"""Tokenizer: ids and text equal transformers' for the same HF folder and GGUF file (byte-level
BPE), SentencePiece-style GGUF vocabularies equal sentencepiece itself, chat templates render
exactly like transformers' apply_chat_template, and template errors are request errors."""

from __future__ import annotations

import io

import gguf
import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from tests.helpers.tiny_model import _CORPUS, make_tiny_llama, write_gguf, write_hf_folder
from workers.engine.types import InvalidRequestError
from workers.loader.gguf import GGUFFile
from workers.tokenizer import Tokenizer, TokenizerError

TEXTS = [
    "Hello world, hello there!",
    "Numbers 12345 and 3.14159",
    "Caf\u00e9 cr\u00e8me na\u00efve, \u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "emoji \U0001f600\U0001f680 and \u2603 \u2713 \U0001d518 unseen",
    "  leading spaces\tand tabs\nnew lines\n\n",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "",
]
MESSAGES = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4 \U0001f600"},
    {"role": "user", "content": "And 3 + 3?"},
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = write_hf_folder(make_tiny_llama(), tmp_path_factory.mktemp("tok"))
    write_gguf(make_tiny_llama(), folder / "tiny.gguf", "Q8_0")
    return folder


@pytest.fixture(scope="module")
def hf_tok(folder):
    return Tokenizer.from_hf_folder(folder)


@pytest.fixture(scope="module")
def gguf_tok(folder):
    with GGUFFile(folder / "tiny.gguf") as f:
        return Tokenizer.from_gguf_metadata(f.metadata, name="tiny")


@pytest.fixture(scope="module")
def reference(folder):
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_equal_transformers(hf_tok, gguf_tok, reference, folder, text):
    expected = reference.encode(text, add_special_tokens=False)
    assert hf_tok.encode(text) == expected
    assert gguf_tok.encode(text) == expected
    assert hf_tok.encode(text, add_special_tokens=True) == reference.encode(text)
    for skip in (True, False):
        want = reference.decode(expected, skip_special_tokens=skip)
        assert hf_tok.decode(expected, skip_special_tokens=skip) == want
        assert gguf_tok.decode(expected, skip_special_tokens=skip) == want
    assert hf_tok.decode(expected, skip_special_tokens=False) == text


def test_gguf_tokenizer_equals_transformers_gguf_loading(folder, gguf_tok):
    reference = AutoTokenizer.from_pretrained(str(folder), gguf_file="tiny.gguf")
    for text in TEXTS:
        assert gguf_tok.encode(text) == reference.encode(text, add_special_tokens=False)


def test_special_tokens(hf_tok, gguf_tok, reference):
    for tok in (hf_tok, gguf_tok):
        assert tok.vocab_size == len(reference) == 384
        assert tok.bos_token_id == 1 and tok.eos_token_ids[0] == 2
        assert [i for i in range(tok.vocab_size) if tok.is_special(i)] == [0, 1, 2]
        assert tok.encode("<|im_end|>") == [2]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_transformers(hf_tok, gguf_tok, reference, add_generation_prompt):
    for messages in (MESSAGES, [{"role": "system", "content": "Be brief."}] + MESSAGES[:1]):
        expected = reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert hf_tok.apply_chat_template(messages, add_generation_prompt) == expected
        assert gguf_tok.apply_chat_template(messages, add_generation_prompt) == expected
    prompt = hf_tok.apply_chat_template(MESSAGES[:1])
    assert hf_tok.encode(prompt)[:1] == [1]  # <|im_start|> parsed as its special id


def test_chat_template_errors_are_request_errors(hf_tok, folder, tmp_path):
    with pytest.raises(InvalidRequestError, match="Unknown role: robot"):
        hf_tok.apply_chat_template([{"role": "robot", "content": "beep"}])
    with pytest.raises(InvalidRequestError, match="list of objects"):
        hf_tok.apply_chat_template("hello")  # type: ignore[arg-type]
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "tokenizer.json").write_text((folder / "tokenizer.json").read_text())
    no_template = Tokenizer.from_hf_folder(plain)
    assert not no_template.has_chat_template
    with pytest.raises(InvalidRequestError, match="no chat template.*raw prompt"):
        no_template.apply_chat_template(MESSAGES)
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_hf_folder(tmp_path)


def test_chat_template_jinja_file_and_sandbox(folder, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer.json").write_text((folder / "tokenizer.json").read_text())
    (other / "tokenizer_config.json").write_text('{"eos_token": {"content": "<|im_end|>"}}')
    (other / "chat_template.jinja").write_text(
        "{{ messages | map(attribute='content') | join('|') }}{{ eos_token }}"
        "{{ messages[0] | tojson }}"
    )
    tok = Tokenizer.from_hf_folder(other)
    assert tok.apply_chat_template(MESSAGES[:2]) == (
        'What is 2 + 2?|4 \U0001f600<|im_end|>{"role": "user", "content": "What is 2 + 2?"}'
    )
    (other / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}")
    with pytest.raises(InvalidRequestError):  # the sandbox refuses attribute escapes
        Tokenizer.from_hf_folder(other).apply_chat_template(MESSAGES)


def _sentencepiece_gguf(path):
    """A tiny SentencePiece BPE model, written as llama.cpp writes a 'llama' vocabulary."""
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 4),
        model_writer=proto,
        vocab_size=420,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        minloglevel=2,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
    )
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    n = sp.get_piece_size()
    kinds = [
        2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
        for i in range(n)
    ]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types(kinds)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sp


def test_sentencepiece_gguf_vocabulary_equals_sentencepiece(tmp_path):
    sp = _sentencepiece_gguf(tmp_path / "spm.gguf")
    with GGUFFile(tmp_path / "spm.gguf") as f:
        tok = Tokenizer.from_gguf_metadata(f.metadata)
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    for text in TEXTS[:4] + ["  two  spaces\tand\nnl", "zzqx 987"]:
        ids = tok.encode(text)
        assert ids == sp.encode(text)
        assert tok.decode(ids) == sp.decode(ids)
        if not text.startswith(" "):  # transformers drops SentencePiece's prefix space there
            assert ids == reference.encode(text, add_special_tokens=False)
    assert tok.encode("hi", add_special_tokens=True)[0] == sp.bos_id()
    assert tok.eos_token_ids == (sp.eos_id(),)


def test_unknown_gguf_tokenizers_are_named():
    with pytest.raises(TokenizerError, match="pre-tokenizer 'mystery'"):
        Tokenizer.from_gguf_metadata(
            {
                "tokenizer.ggml.model": "gpt2",
                "tokenizer.ggml.tokens": ["a"],
                "tokenizer.ggml.merges": [],
                "tokenizer.ggml.pre": "mystery",
            }
        )
    with pytest.raises(TokenizerError, match="tokenizer model 'bert'"):
        Tokenizer.from_gguf_metadata(
            {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}
        )
    with pytest.raises(TokenizerError, match="no tokenizer.ggml.tokens"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2"})
