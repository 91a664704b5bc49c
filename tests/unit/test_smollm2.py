"""The embedded SmolLM2-135M-Instruct (GGUF Q4_1) against transformers loading the same file:
chat-template tokens and the first 32 greedy tokens of two chat prompts."""

from __future__ import annotations

import pytest
import torch

from workers.embedded import resolve_model
from workers.engine.config import EngineConfig
from workers.engine.factory import build_torch_engine
from workers.engine.types import EngineRequest, SamplingParams

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Write a haiku about the sea, then explain it."}],
]


@pytest.fixture(scope="module")
def ferry_engine():
    return build_torch_engine("smollm2", EngineConfig(num_blocks=256))


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model("smollm2")
    kw = {"gguf_file": path.name}
    tok = AutoTokenizer.from_pretrained(str(path.parent), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kw)
    return tok, model.eval()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Plain greedy decoding with transformers' own KV cache, EOS not special."""
    out, past, ids = [], None, torch.tensor([prompt])
    with torch.inference_mode():
        for _ in range(n):
            res = model(ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.tensor([[nxt]])
    return out


@pytest.mark.parametrize("chat", CHATS)
def test_first_32_greedy_tokens_equal_transformers(ferry_engine, hf, chat):
    tok, model = hf
    ours = ferry_engine.loaded.tokenizer
    text = ours.apply_chat_template(chat)
    assert text == tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    prompt = ours.encode(text, add_special_tokens=False)
    ref_ids = tok(text, add_special_tokens=False)["input_ids"]
    assert prompt == list(ref_ids)

    expected = hf_greedy(model, prompt, 32)
    sp = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    (out,) = ferry_engine.engine.generate([EngineRequest(f"c{len(text)}", tuple(prompt), sp)])
    assert list(out.token_ids) == expected
