"""The FD LM head alone: ours (fused) vs full fp32 logits vs liger-kernel, time and peak memory.

    python bench/fd_loss.py [--tokens 8192] [--vocab 151936] [--hidden 2048] [--chunk 1024 ...] [--device cuda]

Each variant does what one FD micro-batch does at the head: score the teacher's hidden
states (top 25 of the full softmax), then the student loss, forward and backward, for
`--tokens` positions of one sequence (bf16 on GPU, fp32 on CPU):
    ours    `trainer.losses.teacher_topk` + `fd_loss` (the fused head: 3 student head matmuls)
    naive   [N, V] fp32 logits at once for teacher and student, plain autograd
    liger   liger-kernel's fused linear JSD with beta = 0 (forward KL over the FULL vocabulary,
            teacher logits recomputed inside; same matmuls, not the same loss), when installed
Prints the best time over `--repeats` (after one warm-up run, which also compiles) and the
peak memory above the inputs (CUDA allocator; not measured on CPU), and ratios to ours;
once per `--chunk` (rows of logits at once: time against memory). `--profile DIR`: where
the time of one such step goes, kernel by kernel.

Then the head's work on one chunk of logits ([chunk, vocab]) besides its matmuls, kernel by
kernel, with the bandwidth each reaches (bytes read and written over time; an H200 moves
about 4.8 TB/s): torch's top-k against the head's (`trainer.lm_head.top_k`, the top k within
the k segments of the row with the largest maxima; exact, see there), the teacher's top k with
its log-sum-exp (one read gives the log-sum-exp and the segment maxima), and the row kernels
(log-sum-exp, softmax statistics, the scaled softmax): Triton on CUDA (`trainer.row_kernels`),
and beside them, on CUDA, the same eager functions torch.compile'd.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_step import profile_step, summarize_trace  # noqa: E402

from trainer import lm_head  # noqa: E402
from trainer.losses import fd_loss, teacher_topk  # noqa: E402

K = 25


def ours(hidden, weight, t_hidden, t_weight, chunk):
    ids, probs = teacher_topk(t_hidden, t_weight, k=K, chunk=chunk)
    return fd_loss(hidden, weight, ids, probs, None, chunk=chunk)[0]


def naive(hidden, weight, t_hidden, t_weight, chunk):
    with torch.no_grad():
        probs, ids = torch.softmax((t_hidden @ t_weight.T).float(), -1).topk(K, dim=-1)
    logq = torch.log_softmax((hidden @ weight.T).float(), -1).gather(1, ids)
    return -(probs * logq).sum()


def liger(hidden, weight, t_hidden, t_weight, chunk):
    from liger_kernel.transformers import LigerFusedLinearJSD

    return LigerFusedLinearJSD(jsd_beta=0.0)(hidden, weight, t_hidden, t_weight, None)


def variants() -> dict[str, Callable]:
    found = {"ours": ours, "naive": naive}
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return found
    return {**found, "liger": liger}


def measure(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, float]:
    """Seconds and peak GiB above what was allocated before, for fn() and its backward."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    fn().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter() - start, (torch.cuda.max_memory_allocated() - base) / 2**30
    return time.perf_counter() - start, float("nan")


def inputs(tokens: int, vocab: int, hidden_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Student hidden states and head (requiring gradients), and a nearby teacher's."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    weight = (0.02 * torch.randn(vocab, hidden_size, generator=g, device=device)).to(dtype).requires_grad_()
    t_weight = (weight.detach() + 0.01 * torch.randn(vocab, hidden_size, generator=g, device=device)).to(dtype)
    hidden = torch.randn(tokens, hidden_size, generator=g, device=device).to(dtype).requires_grad_()
    t_hidden = (hidden.detach() + 0.1 * torch.randn(tokens, hidden_size, generator=g, device=device)).to(dtype)
    return hidden, weight, t_hidden, t_weight


def head_rows(tokens: int, vocab: int, hidden_size: int, chunk: int, device: torch.device,
              repeats: int) -> dict[str, tuple[float, float]]:
    """{variant: (best seconds, peak GiB)} for one FD head step of `tokens` positions."""
    hidden, weight, t_hidden, t_weight = inputs(tokens, vocab, hidden_size, device)
    rows = {}
    for name, variant in variants().items():
        results = []
        for _ in range(repeats + 1):
            hidden.grad = weight.grad = None
            try:
                results.append(measure(lambda v=variant: v(hidden, weight, t_hidden, t_weight, chunk), device))
            except torch.OutOfMemoryError:
                results.append((float("nan"), float("inf")))
        hidden.grad = weight.grad = None
        timed = results[1:]  # the first run warms up (and compiles)
        rows[name] = (min(t for t, _ in timed), max(p for _, p in timed))
    return rows


def kernel_times(rows: int, vocab: int, device: torch.device, repeats: int) -> dict[str, tuple[float, float]]:
    """{kernel: (best seconds per call, bytes moved)} over one [rows, vocab] chunk of logits. Each
    timing covers 10 calls queued back to back, so the host's launch time overlaps the GPU's
    work, as it does inside the head. On CUDA the head's row functions run as Triton kernels;
    the same functions torch.compile'd (what the head ran before) are timed beside them."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    z = torch.randn(rows, vocab, generator=torch.Generator(device=device).manual_seed(0), device=device).to(dtype)
    lse, scale = lm_head.logsumexp(z), torch.ones(rows, device=device)
    size = z.numel() * z.element_size()
    kernels = {  # name: (call, bytes read and written)
        "top-k torch": (lambda: z.topk(K, dim=-1), size),
        "top-k segments": (lambda: lm_head.top_k(z, K), size),
        "top-k + lse": (lambda: lm_head.top_k_and_logsumexp(z, K), size),
        "log-sum-exp": (lambda: lm_head.logsumexp(z), size),
        "softmax stats": (lambda: lm_head.softmax_stats(z), size),
        "scaled softmax": (lambda: lm_head.scaled_softmax(z, lse, scale), 2 * size),
    }
    if device.type == "cuda":
        compiled = {fn: torch.compile(fn, dynamic=True)
                    for fn in (lm_head._logsumexp, lm_head._softmax_stats, lm_head._scaled_softmax)}
        kernels |= {
            "log-sum-exp compiled": (lambda: compiled[lm_head._logsumexp](z), size),
            "softmax stats compiled": (lambda: compiled[lm_head._softmax_stats](z), size),
            "scaled softmax compiled": (lambda: compiled[lm_head._scaled_softmax](z, lse, scale), 2 * size),
        }
    times = {}
    with torch.no_grad():
        for name, (fn, moved) in kernels.items():
            best = float("inf")
            for _ in range(repeats + 1):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(10):
                    fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                best = min(best, (time.perf_counter() - start) / 10)
            times[name] = (best, moved)
    return times


def print_rows(rows: dict[str, tuple[float, float]], label: str) -> None:
    base_t, base_m = rows["ours"]
    for name, (t, m) in rows.items():
        print(f"head {label} {name:6s} {1000 * t:9.1f} ms  peak {m:6.2f} GiB  "
              f"time/ours {t / base_t:5.2f}  memory/ours {m / base_m:5.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--chunk", type=int, nargs="+", default=[1024])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", metavar="DIR", help="then one step of ours per chunk under torch's profiler: "
                        "the kernels with the most GPU time (a Chrome trace each, gzipped, in DIR)")
    args = parser.parse_args()
    device = torch.device(args.device)
    for chunk in args.chunk:
        rows = head_rows(args.tokens, args.vocab, args.hidden, chunk, device, args.repeats)
        print_rows(rows, f"T={args.tokens} V={args.vocab} H={args.hidden} chunk={chunk} {device}")
    if args.profile:
        hidden, weight, t_hidden, t_weight = inputs(args.tokens, args.vocab, args.hidden, device)
        for chunk in args.chunk:
            step = lambda c=chunk: ours(hidden, weight, t_hidden, t_weight, c).backward()  # noqa: E731
            step()  # compiled before the profiled run
            path, trace = profile_step(step, device, Path(args.profile), f"head-H{args.hidden}-chunk{chunk}")
            print(f"head chunk={chunk} profile (trace {path}):\n{summarize_trace(trace, top=15)}", flush=True)
    for chunk in args.chunk:
        for name, (t, moved) in kernel_times(chunk, args.vocab, device, args.repeats).items():
            print(f"[{chunk}, {args.vocab}] logits: {name:23s} {1000 * t:7.3f} ms  {moved / t / 1e12:5.2f} TB/s",
                  flush=True)


if __name__ == "__main__":
    main()
