"""Engine speed on this CPU: Ferry's torch engine against transformers, same model, same run.

Prints one table for the embedded SmolLM2-135M-Instruct (fp32):
- prefill tokens/s for one 512-token prompt;
- decode tokens/s at batch 1, 8 and 32 (prompts of --prompt-len tokens, --decode-tokens new
  tokens each, greedy, EOS ignored; the prefill time is subtracted);
- the same for transformers' ``generate`` on the same weights (the GGUF dequantized by
  transformers itself), and Ferry / transformers ratios;
- decode tokens/s as a share of the FLOP ceiling: this machine's fp32 matmul rate, measured
  now, over 2 x parameters per token.

Run: .venv/bin/python benchmarks/engine.py [--batches 1,8,32] [--decode-tokens 64]
"""

from __future__ import annotations

import argparse
import time

import torch

from workers.embedded import resolve_model
from workers.engine.config import EngineConfig
from workers.engine.factory import build_torch_engine
from workers.engine.types import EngineRequest, SamplingParams


def matmul_gflops(n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab - 100, (length,), generator=g).tolist() for _ in range(n)]


def ferry_prefill(engine, prompt: list[int]) -> float:
    req = EngineRequest("p", tuple(prompt), SamplingParams(max_tokens=1, temperature=0.0))
    t = time.perf_counter()
    engine.generate([req])
    return len(prompt) / (time.perf_counter() - t)


def ferry_decode(engine, batch: list[list[int]], new_tokens: int) -> float:
    """tokens/s of the decode steps only (steps that run no prefill)."""
    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    tag = f"d{len(batch)}-{time.monotonic_ns()}"
    for i, p in enumerate(batch):
        engine.add_request(EngineRequest(f"{tag}-{i}", tuple(p), sp))
    decode_time, decode_tokens = 0.0, 0
    while engine.has_unfinished():
        t = time.perf_counter()
        result = engine.step()
        dt = time.perf_counter() - t
        produced = sum(len(o.new_token_ids) for o in result.outputs)
        if result.num_scheduled_tokens == result.num_scheduled:  # one token each: decode
            decode_time += dt
            decode_tokens += produced
    return decode_tokens / decode_time


def hf_prefill(model, prompt: list[int]) -> float:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        t = time.perf_counter()
        model(ids)
        return len(prompt) / (time.perf_counter() - t)


def hf_decode(model, batch: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(batch)
    mask = torch.ones_like(ids)
    kw = {"attention_mask": mask, "do_sample": False, "pad_token_id": 0}
    with torch.inference_mode():
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kw)
        one = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_length=0,
                             eos_token_id=None, **kw)
        total = time.perf_counter() - t
    produced = (out.shape[1] - ids.shape[1]) * len(batch)
    return (produced - len(batch)) / (total - one)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--no-transformers", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]

    built = build_torch_engine(args.model, EngineConfig(max_num_batched_tokens=4096,
                                                        enable_prefix_caching=False))
    engine, cfg = built.engine, built.loaded.config
    params = sum(p.numel() for p in built.loaded.model.parameters())
    if cfg.tie_word_embeddings:  # the tied matrix is used twice: lookup (no FLOPs) and lm_head
        params_flops = params
    else:
        params_flops = params - cfg.vocab_size * cfg.hidden_size
    vocab = cfg.vocab_size

    hf = None
    if not args.no_transformers:
        from transformers import AutoModelForCausalLM

        path = resolve_model(args.model)
        kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
        folder = path.parent if path.suffix == ".gguf" else path
        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw).eval()

    # warm up both
    ferry_prefill(engine, prompts(1, 64, vocab, 99)[0])
    if hf is not None:
        hf_prefill(hf, prompts(1, 64, vocab, 99)[0])

    gflops = matmul_gflops()
    ceiling = gflops * 1e9 / (2 * params_flops)
    rows = []
    p512 = prompts(1, args.prefill_len, vocab, 1)[0]
    f = max(ferry_prefill(engine, p512) for _ in range(2))
    h = max(hf_prefill(hf, p512) for _ in range(2)) if hf is not None else float("nan")
    rows.append((f"prefill {args.prefill_len} tok", f, h))
    for b in batches:
        batch = prompts(b, args.prompt_len, vocab, 10 + b)
        f = ferry_decode(engine, batch, args.decode_tokens)
        h = hf_decode(hf, batch, args.decode_tokens) if hf is not None else float("nan")
        rows.append((f"decode batch {b}", f, h))

    print(f"model {built.loaded.name}: {params / 1e6:.1f} M parameters, "
          f"{params_flops / 1e6:.1f} M in matmuls per token; fp32 matmul {gflops:.1f} GFLOP/s "
          f"-> FLOP ceiling {ceiling:.0f} tokens/s")
    print(f"{'what':<22}{'ferry tok/s':>13}{'transformers':>14}{'ratio':>8}{'% ceiling':>11}")
    for name, f, h in rows:
        share = f"{100 * f / ceiling:.1f}" if name.startswith("decode") else "-"
        print(f"{name:<22}{f:>13.1f}{h:>14.1f}{f / h:>8.2f}{share:>11}")
    engine.check_integrity()


if __name__ == "__main__":
    main()
