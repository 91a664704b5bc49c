"""Incremental detokenizer: characters split across tokens, stop strings across token
boundaries, held-back prefixes, flushing; with a byte-level test tokenizer and with Ferry's
real Tokenizer (tokenizers backends built in memory)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers

from workers.engine.detokenizer import DetokenizedDelta, IncrementalDetokenizer
from workers.tokenizer import Tokenizer

EOS = 300
WORDS = {256: b"Hello", 257: b" world", 258: b"o wo", 259: b"!\n"}


class ByteTokenizer:
    """Ids 0-255 are bytes, 256+ multi-byte pieces, 300 a special EOS; decodes like
    byte-level BPE (an incomplete UTF-8 sequence becomes U+FFFD)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        self.calls.append(len(ids))
        out = b""
        for i in ids:
            if i == EOS:
                if not skip_special_tokens:
                    out += b"<eos>"
            elif i < 256:
                out += bytes([i])
            else:
                out += WORDS[i]
        return out.decode("utf-8", errors="replace")


def ids_of(text: str) -> list[int]:
    return list(text.encode())


def feed(detok: IncrementalDetokenizer, ids, final_last: bool = False) -> list[str]:
    out = []
    for k, i in enumerate(ids):
        out.append(detok.add_tokens([i], final=final_last and k == len(ids) - 1).text)
    return out


def test_utf8_split_across_tokens_is_held_back():
    d = IncrementalDetokenizer(ByteTokenizer())
    euro = ids_of("€")  # 3 bytes
    smile = ids_of("😀")  # 4 bytes
    assert feed(d, euro) == ["", "", "€"]
    assert feed(d, ids_of("a")) == ["a"]
    assert feed(d, smile) == ["", "", "", "😀"]
    assert d.text == "€a😀"


def test_incomplete_tail_is_flushed_at_the_end():
    d = IncrementalDetokenizer(ByteTokenizer())
    assert feed(d, ids_of("ok") + ids_of("€")[:2]) == ["o", "k", "", ""]
    assert d.flush() == DetokenizedDelta("\ufffd", None)
    assert d.text == "ok\ufffd"


def test_window_stays_short():
    tok = ByteTokenizer()
    d = IncrementalDetokenizer(tok, prompt_token_ids=ids_of("a long prompt here"))
    feed(d, ids_of("x" * 200))
    assert max(tok.calls) <= 6  # the last few tokens, never the whole output


def test_special_tokens_are_skipped():
    d = IncrementalDetokenizer(ByteTokenizer())
    assert feed(d, [256, EOS]) == ["Hello", ""]
    d = IncrementalDetokenizer(ByteTokenizer(), skip_special_tokens=False)
    assert feed(d, [256, EOS]) == ["Hello", "<eos>"]


def test_stop_string_across_token_boundary():
    # "Hello" ends with "o", a prefix of the stop string "o wor": held back
    d = IncrementalDetokenizer(ByteTokenizer(), stop=["o wor"])
    assert d.add_tokens([256]) == DetokenizedDelta("Hell", None)
    assert d.add_tokens([257]) == DetokenizedDelta("", "o wor")
    assert d.text == "Hell" and d.stopped == "o wor"
    assert d.add_tokens([256]) == DetokenizedDelta("", None)  # stopped: nothing more


def test_stop_string_inside_one_token_cuts_the_rest():
    d = IncrementalDetokenizer(ByteTokenizer(), stop=["wo"])
    assert d.add_tokens(ids_of("ab")) == DetokenizedDelta("ab", None)
    assert d.add_tokens([258]) == DetokenizedDelta("o ", "wo")  # "o wo": cut at "wo"
    assert d.text == "abo "


def test_held_back_prefix_released_when_it_diverges():
    d = IncrementalDetokenizer(ByteTokenizer(), stop=["STOP"])
    assert feed(d, ids_of("xSTa")) == ["x", "", "", "STa"]
    assert feed(d, ids_of("STO")) == ["", "", ""]
    assert d.add_tokens(ids_of("!")) == DetokenizedDelta("STO!", None)
    assert feed(d, ids_of("ST")) == ["", ""]
    assert d.flush() == DetokenizedDelta("ST", None)  # ended without a match: flushed
    assert d.text == "xSTaSTO!ST"


def test_earliest_of_several_stop_strings_wins():
    d = IncrementalDetokenizer(ByteTokenizer(), stop=["world", "lo w", "zzz"])
    assert d.add_tokens([256]) == DetokenizedDelta("Hel", None)  # "lo" could start "lo w"
    assert d.add_tokens([257]) == DetokenizedDelta("", "lo w")
    assert d.text == "Hel"


def test_stop_string_matched_with_final_tokens():
    d = IncrementalDetokenizer(ByteTokenizer(), stop=["!\n"])
    assert d.add_tokens([256]) == DetokenizedDelta("Hello", None)
    assert d.add_tokens([259], final=True) == DetokenizedDelta("", "!\n")


def test_multibyte_stop_string_split_across_byte_tokens():
    d = IncrementalDetokenizer(ByteTokenizer(), stop=["€!"])
    assert feed(d, ids_of("a€")) == ["a", "", "", ""]  # "€" completes but may start "€!"
    assert d.stopped is None
    assert d.add_tokens(ids_of("!")) == DetokenizedDelta("", "€!")
    assert d.text == "a"


def test_invalid_stop_strings_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(ByteTokenizer(), stop=[""])


# ---------------------------------------------------------------- the real Tokenizer


def byte_level_tokenizer() -> Tokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Backend(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend)


def test_real_byte_level_tokenizer_streams_exact_text():
    tok = byte_level_tokenizer()
    text = "héllo € 😀 wörld"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode())  # one token per byte: characters split
    prompt = tok.encode("Say: ")
    d = IncrementalDetokenizer(tok, prompt_token_ids=prompt, stop=["wör"])
    pieces = feed(d, ids)
    assert "".join(pieces) == "héllo € 😀 "
    assert all("\ufffd" not in p for p in pieces)
    assert d.stopped == "wör"


def test_real_sentencepiece_style_tokenizer_keeps_leading_space_from_prompt_context():
    backend = Backend(
        models.WordLevel({"▁Hello": 0, "▁world": 1, "!": 2, "<unk>": 3}, unk_token="<unk>")
    )
    backend.decoder = decoders.Metaspace()
    tok = Tokenizer(backend)
    assert tok.decode([1]) == "world"  # alone, the leading space is dropped
    d = IncrementalDetokenizer(tok, prompt_token_ids=[0])
    assert feed(d, [1, 2, 1]) == [" world", "!", " world"]
