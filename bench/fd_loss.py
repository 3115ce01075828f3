"""Peak memory and time of the FD loss: chunked (ours) vs materialised full-vocabulary logits.

    python bench/fd_loss.py [--tokens 8192] [--vocab 151936] [--hidden 4096] [--device cuda]

Both compute the same loss and gradient for one sequence: the student's LM head applied
to N hidden states, teacher top-K = 25. "naive" builds the [N, V] fp32 logits at once,
as a straightforward implementation would; "chunked" is `trainer.losses.fd_loss`.
Prints peak extra memory (CUDA allocator on GPU; not measured on CPU) and wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.losses import fd_loss, teacher_topk  # noqa: E402


def naive(hidden, weight, ids, probs):
    logp = torch.log_softmax((hidden @ weight.T).float(), -1)
    return -(probs * logp.gather(1, ids)).sum()


def measure(fn, device) -> tuple[float, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    loss = fn()
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter() - start, (torch.cuda.max_memory_allocated() - base) / 2**30
    return time.perf_counter() - start, float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    weight = (torch.randn(args.vocab, args.hidden, device=device) * 0.02).to(dtype).requires_grad_()
    hidden = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype).requires_grad_()
    ids, probs = teacher_topk(hidden.detach() + 0.1, weight.detach(), k=25, chunk=args.chunk)
    mask = torch.ones(args.tokens, device=device)
    rows = {}
    for name, fn in [("chunked", lambda: fd_loss(hidden, weight, ids, probs, mask, chunk=args.chunk)[0]),
                     ("naive", lambda: naive(hidden, weight, ids, probs))]:
        times, peaks = [], []
        for _ in range(args.repeats):
            hidden.grad = weight.grad = None
            try:
                t, peak = measure(fn, device)
            except torch.OutOfMemoryError:
                t, peak = float("nan"), float("inf")
            times.append(t)
            peaks.append(peak)
        rows[name] = (min(times), max(peaks))
        print(f"{name:8s} time {rows[name][0]:.3f} s  peak extra memory {rows[name][1]:.2f} GiB")
    print(f"device={device} tokens={args.tokens} vocab={args.vocab} hidden={args.hidden} chunk={args.chunk}")
    print(f"naive/chunked: time {rows['naive'][0] / rows['chunked'][0]:.2f}, "
          f"memory {rows['naive'][1] / rows['chunked'][1]:.2f}")


if __name__ == "__main__":
    main()
