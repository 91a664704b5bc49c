"""Text <-> token ids, and chat templates, over the ``tokenizers`` library.

Built from a Hugging Face folder (``tokenizer.json`` + ``tokenizer_config.json``, or a
``chat_template.jinja`` file) or from GGUF metadata (``tokenizer.ggml.*``): byte-level BPE
(``model = gpt2``, pre-tokenizer picked by ``tokenizer.ggml.pre``) and SentencePiece-style BPE
(``model = llama``). Token ids equal those of ``transformers``' tokenizer for the same files.

Chat templates render in a sandboxed jinja2 environment, like ``transformers``
(``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, ``raise_exception``, ``tojson``,
``strftime_now``, and the ``bos_token``/``eos_token`` strings). A template that raises, or bad
messages, is the caller's error: :class:`InvalidRequestError`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from workers.engine.types import InvalidRequestError


class TokenizerError(ValueError):
    """Tokenizer files or metadata Ferry cannot use; the message says what is missing."""


# tokenizer.ggml.pre -> how text is split before byte-level BPE (llama.cpp's llama-vocab.cpp)
_GPT2_PRE = ("default", "gpt2", "gpt-2", "olmo", "jais", "poro-chat", "viking")
_DIGIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_PRE = {
    "llama3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_IGNORE_MERGES_PRE = {"llama3", "llama-bpe", "llama-v3", "smaug-bpe", "falcon3"}
_CONTROL, _USER_DEFINED = 3, 4


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (assistant-mask markers): renders its body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser):  # type: ignore[no-untyped-def]
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _template_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class Tokenizer:
    def __init__(
        self,
        backend: _Backend,
        *,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str | None] | None = None,
        eos_token_ids: Sequence[int] = (),
        name: str = "model",
    ) -> None:
        self._backend = backend
        self._chat_template = chat_template
        self._special = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.name = name
        eos: list[int] = []
        for token_id in (*eos_token_ids, self._token_id(self._special.get("eos_token"))):
            if token_id is not None and token_id not in eos:
                eos.append(token_id)
        self.eos_token_ids: tuple[int, ...] = tuple(eos)
        self.bos_token_id: int | None = self._token_id(self._special.get("bos_token"))
        self._special_ids = frozenset(
            i for i, t in backend.get_added_tokens_decoder().items() if t.special
        )

    # ------------------------------------------------------------------ builders

    @classmethod
    def from_hf_folder(cls, folder: str | Path, eos_token_ids: Sequence[int] = ()) -> Tokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(
                f"{folder} has no tokenizer.json (Ferry reads the fast-tokenizer file; "
                "save it with tokenizer.save_pretrained)"
            )
        backend = _Backend.from_file(str(path))
        config: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text())
        template = _pick_template(config.get("chat_template"))
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        special = {
            key: _token_content(config.get(key))
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        return cls(
            backend,
            chat_template=template,
            special_tokens=special,
            eos_token_ids=eos_token_ids,
            name=folder.name,
        )

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], name: str = "model") -> Tokenizer:
        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise TokenizerError("GGUF file has no tokenizer.ggml.tokens: it carries no tokenizer")
        if kind == "gpt2":
            backend = _gguf_byte_level(meta)
        elif kind == "llama":
            backend = _gguf_sentencepiece(meta)
        else:
            raise TokenizerError(
                f"GGUF tokenizer model {kind!r} is not supported (Ferry reads 'gpt2' "
                "byte-level BPE and 'llama' SentencePiece BPE)"
            )
        _add_gguf_special_tokens(backend, tokens, meta.get("tokenizer.ggml.token_type"))
        special = {}
        for key, meta_key in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"),
        ):
            token_id = meta.get(f"tokenizer.ggml.{meta_key}")
            special[key] = (
                tokens[token_id] if token_id is not None and token_id < len(tokens) else None
            )
        add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
        if add_bos and special["bos_token"] is not None:
            bos = special["bos_token"]
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A",
                pair=f"{bos} $A {bos} $B",
                special_tokens=[(bos, meta["tokenizer.ggml.bos_token_id"])],
            )
        eot = meta.get("tokenizer.ggml.eot_token_id")
        return cls(
            backend,
            chat_template=meta.get("tokenizer.chat_template"),
            special_tokens=special,
            eos_token_ids=() if eot is None else (eot,),
            name=name,
        )

    # ------------------------------------------------------------------ API

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        if self._chat_template is None:
            raise InvalidRequestError(
                f"model {self.name!r} has no chat template; "
                "send a raw prompt (/v1/completions) instead"
            )
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise InvalidRequestError(
                "messages must be a list of objects with 'role' and 'content'"
            )
        try:
            return self._compiled_template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                **self._special,
                **extra,
            )
        except jinja2.exceptions.TemplateError as e:
            raise InvalidRequestError(f"chat template rejected the messages: {e}") from None

    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        try:
            return _template_env().from_string(self._chat_template or "")
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise TokenizerError(
                f"model {self.name!r} has a chat template jinja2 cannot parse: {e}"
            ) from None

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)


def _pick_template(value: Any) -> str | None:
    """``chat_template`` is a string, or a list of ``{name, template}`` (take ``default``)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    raise TokenizerError(
        f"chat_template must be a string or a list of named templates, got {type(value)}"
    )


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


# ---------------------------------------------------------------------- GGUF builders


def _gguf_byte_level(meta: Mapping[str, Any]) -> _Backend:
    tokens = meta["tokenizer.ggml.tokens"]
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise TokenizerError("GGUF gpt2 tokenizer has no tokenizer.ggml.merges")
    pre = meta.get("tokenizer.ggml.pre", "default")
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = _Backend(
        models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in _IGNORE_MERGES_PRE)
    )
    if pre in _GPT2_PRE:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre in _DIGIT_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif pre in _SPLIT_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_PRE[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        known = sorted({*_GPT2_PRE, *_DIGIT_PRE, *_SPLIT_PRE})
        raise TokenizerError(f"GGUF pre-tokenizer {pre!r} is not supported; Ferry knows {known}")
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def _gguf_sentencepiece(meta: Mapping[str, Any]) -> _Backend:
    """llama.cpp's SPM vocabulary as a byte-fallback BPE whose merges follow the token scores."""
    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
        raise TokenizerError("GGUF llama tokenizer has no tokenizer.ggml.scores")
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = meta.get("tokenizer.ggml.merges")
    pairs = (
        [tuple(m.split(" ", 1)) for m in merges]
        if merges
        else _merges_from_scores(vocab, dict(zip(tokens, scores)))
    )
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
    backend = _Backend(
        models.BPE(
            vocab=vocab, merges=pairs, unk_token=tokens[unk_id], fuse_unk=True, byte_fallback=True
        )
    )
    steps = [normalizers.Replace(" ", "\u2581")]
    add_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    if add_prefix:
        steps.insert(0, normalizers.Prepend("\u2581"))
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = None
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(dec)
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best-scored merged token first."""
    found: list[tuple[float, int, int, str, str]] = []
    for token, score in scores.items():
        local = []
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in vocab and right in vocab:
                local.append((vocab[left], vocab[right], left, right))
        local.sort()
        found.extend((score, len(left), len(right), left, right) for _, _, left, right in local)
    found.sort(key=lambda m: (m[0], m[1], m[2]), reverse=True)
    return [(left, right) for _, _, _, left, right in found]


def _add_gguf_special_tokens(
    backend: _Backend, tokens: Sequence[str], types: Sequence[int] | None
) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens, so the
    text ``<|im_start|>`` maps to its one id instead of being cut into pieces."""
    if not types:
        return
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, types)
        if kind == _CONTROL
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, kind in zip(tokens, types)
        if kind == _USER_DEFINED
    ]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)
