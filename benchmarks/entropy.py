"""Benchmark: what the per-token entropy costs in the chunked log-prob pass (logprobs.chunked_token_logprobs).

Run: `PYTHONPATH=src python -m benchmarks.entropy [--tokens 8192] [--hidden 1536] [--vocab 151936] [--chunk 1024]`
(defaults: DeepSeek-R1-Distill-Qwen-1.5B's lm_head, bf16 on CUDA, fp32 on CPU). Times forward + backward of the
pass with and without `with_entropy=True` (median of --repeats after a warm-up) and the peak memory on CUDA,
and checks that the log-probs are the same either way. Needs only torch and mathgrpo.loss.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mathgrpo.logprobs import chunked_token_logprobs


def _time(fn, repeats: int, cuda: bool) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(1, args.tokens, args.hidden, device=dev, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, device=dev, dtype=dtype, generator=g) * 0.02).requires_grad_()
    ids = torch.randint(0, args.vocab, (1, args.tokens), device=dev, generator=g)

    def run(with_entropy: bool):
        def step():
            out = chunked_token_logprobs(hidden, weight, ids, chunk_size=args.chunk, with_entropy=with_entropy)
            logp = out[0] if with_entropy else out
            logp.sum().backward()
            hidden.grad = weight.grad = None
            return out
        return step

    same = torch.equal(run(True)()[0], run(False)())
    rows = []
    for flag in (False, True):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sec = _time(run(flag), args.repeats, cuda)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        rows.append((flag, sec, peak))
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{name}, {dtype}, {args.tokens} tokens x H={args.hidden} x V={args.vocab}, chunk {args.chunk}; "
          f"log-probs identical with and without entropy: {same}")
    for flag, sec, peak in rows:
        print(f"  with_entropy={flag!s:<5}  forward+backward {sec * 1e3:8.2f} ms   peak {peak:6.2f} GiB")
    print(f"  entropy overhead: {100 * (rows[1][1] / rows[0][1] - 1):+.1f}%")


if __name__ == "__main__":
    main()
