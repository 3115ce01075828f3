"""One training step of the project's own code (`fd_backward`, `grpo_backward`) on random-init Qwen3 shapes:
time, tokens/s, MFU and peak memory; with `--nproc N`, the same under torchrun with FSDP2 and its scaling.

    python bench/train_step.py --shape 1.7b                      # FD and GRPO, 8 x 2,048 tokens, one GPU
    python bench/train_step.py --shape 8b --algorithm fd
    python bench/train_step.py --shape 1.7b --algorithm fd --nproc 2   # 1 GPU, then 2 (weak scaling)
    python bench/train_step.py --shape 1.7b --head               # also the LM head alone (bench/fd_loss.py)
    python bench/train_step.py --shape 1.7b --layers eager fused # fused layers against transformers' own
    python bench/train_step.py --shape tiny                      # a 2-layer model: runs on a CPU

Each step: `--seqs` sequences of `--seq-len` tokens per rank, the last `--trained` of them
generated (loss_mask 1); FD's teacher sees the prompt plus `--feedback` tokens and the same
response; GRPO has a reference model (kl_coef 0.001) and advantages of +-1. The step is
what `trainer.run` does between rollouts and the optimizer: the step function over
packed micro-batches of `--micro-batch-tokens`, then the all-reduce of the replicated
gradients (embeddings, LM head) under torchrun. The optimizer is not included.

MFU = (6 N x student tokens + 2 N x teacher or reference tokens) / time / peak, with N the
parameters and peak `--peak-tflops` per GPU (790: bf16 dense on an H200 as the project counts
it); recomputation (activation checkpointing) is not useful work. Tokens are all the packed
tokens, prompts included. Time: the median of `--steps` steps after `--warmup` (which compile).
Peak memory: the CUDA allocator's, the highest rank's.

`--profile DIR` runs one more step under torch's profiler after the measured ones and
prints where its time went: each phase of the step (`step.scoring`: the teacher's or
reference's forward and top K; `step.forward`: the student's layers; `step.head`: the
chunked LM head and loss; `step.backward`) with its host time and the span of its GPU
work, how busy the GPU was over the step (kernel time / wall time: far below 100% means
the step waits on the host), and the kernels that took the most GPU time. The Chrome trace
of each rank goes to DIR (open it in Perfetto or chrome://tracing).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import distributed  # noqa: E402
from trainer.algorithms import checkpoint_activations, fd_backward, grpo_backward  # noqa: E402
from trainer.batches import TrainSequence  # noqa: E402
from trainer.fused_layers import fuse_layers  # noqa: E402

SHAPES = {  # Qwen3's published configurations; tiny is a CPU-sized stand-in
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=4096, tie_word_embeddings=True),
    "1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
}


def build(shape: str, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(max_position_embeddings=40960, rms_norm_eps=1e-6, use_cache=False, **SHAPES[shape])
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def sequences(args: argparse.Namespace, vocab: int, seed: int, *, teacher: bool) -> list[TrainSequence]:
    g = torch.Generator().manual_seed(seed)
    prompt = args.seq_len - args.trained
    out = []
    for i in range(args.seqs):
        ids = torch.randint(3, vocab, (args.seq_len,), generator=g).tolist()
        teacher_ids = torch.randint(3, vocab, (prompt + args.feedback,), generator=g).tolist()
        out.append(TrainSequence(ids, prompt, [0] * prompt + [1] * args.trained, teacher_ids if teacher else None,
                                 1.0 if i % 2 else -1.0))
    return out


def step_fn(args: argparse.Namespace, algorithm: str, layers: str, device: torch.device, seed: int):
    """The models, this rank's sequences, and one step as a function returning (student, other) token counts."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    student = build(args.shape, device, dtype, seed=0)
    if layers == "fused":
        fuse_layers(student)  # as the trainer does (fused_layers=true)
    n_params = sum(p.numel() for p in student.parameters())
    other = copy.deepcopy(student).eval().requires_grad_(False)  # FD's teacher, GRPO's reference
    student.train()
    if args.checkpointing != "none":
        checkpoint_activations(student, args.checkpointing)
    distributed.shard(student)
    distributed.shard(other)
    seqs = sequences(args, student.config.vocab_size, seed, teacher=algorithm == "fd")  # GRPO's have no teacher
    student_tokens = sum(len(s.input_ids) for s in seqs)
    other_tokens = sum(len(s.teacher_prompt_ids) + len(s.response_ids) for s in seqs) if algorithm == "fd" \
        else student_tokens
    common = dict(token_budget=args.micro_batch_tokens, chunk=args.chunk, pad_id=0)

    def step() -> None:
        student.zero_grad(set_to_none=True)
        if algorithm == "fd":
            fd_backward(student, other, seqs, top_k=25, renormalize=False, **common)
        else:
            grpo_backward(student, other, seqs, clip_eps=0.2, kl_coef=0.001, **common)
        distributed.reduce_replicated_grads(student)

    return step, n_params, student_tokens, other_tokens


def measure(args: argparse.Namespace, algorithm: str, layers: str, device: torch.device) -> dict[str, float]:
    """One algorithm's row over all ranks, on rank 0 (elsewhere empty): the slowest rank's median step time,
    tokens, MFU, the highest peak memory."""
    step, n_params, student_tokens, other_tokens = step_fn(args, algorithm, layers, device,
                                                           seed=1 + distributed.rank())
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        distributed.barrier()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    if args.profile:
        distributed.barrier()
        path, trace = profile_step(step, device, Path(args.profile),
                                   f"{algorithm}-{args.shape}-{layers}-rank{distributed.rank()}")
        if distributed.is_main():
            print(f"{algorithm} profile (rank 0, trace {path}):\n{summarize_trace(trace)}", flush=True)
    world = distributed.world_size()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    parts = distributed.gather([statistics.median(times), peak])  # every rank's, on rank 0; elsewhere none
    if not parts:
        return {}
    seconds, peak = max(p[0] for p in parts), max(p[1] for p in parts)
    tokens = student_tokens * world
    flops = (6 * student_tokens + 2 * other_tokens) * n_params * world
    return {"algorithm": algorithm, "layers": layers, "ranks": world, "params": n_params, "tokens": tokens,
            "other_tokens": other_tokens * world, "seconds": seconds, "tokens_per_s_per_gpu": tokens / seconds / world,
            "mfu": flops / seconds / (world * args.peak_tflops * 1e12), "peak_gib": peak}


PHASES = ("step.scoring", "step.forward", "step.head", "step.backward")


def profile_step(step, device: torch.device, out: Path, label: str) -> tuple[Path, dict]:
    """One step under the profiler: where its Chrome trace went (gzipped, in `out`), and the trace."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    out.mkdir(parents=True, exist_ok=True)
    raw = out / f"{label}.json"
    prof.export_chrome_trace(str(raw))
    data = raw.read_bytes()
    raw.unlink()
    path = out / f"{label}.json.gz"
    path.write_bytes(gzip.compress(data))
    return path, json.loads(data)


def _union_us(spans: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) spans."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def summarize_trace(trace: dict, top: int = 12) -> str:
    """Where one profiled step's time went, from its Chrome trace: the phases' host time and GPU span,
    the GPU's busy share of the step, the kernels with the most GPU time."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    if not events:
        return "the trace holds no timed events"
    wall = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
    host = {p: 0.0 for p in PHASES}
    gpu: dict[str, list[tuple[float, float]]] = {p: [] for p in PHASES}
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    for e in events:
        if e["name"] in host and e.get("cat") == "user_annotation":
            host[e["name"]] += e["dur"]
        elif e["name"] in gpu and e.get("cat") == "gpu_user_annotation":
            gpu[e["name"]].append((e["ts"], e["ts"] + e["dur"]))
    lines = [f"profiled step: {wall / 1e3:,.1f} ms from first to last event"]
    for phase in (p for p in PHASES if host[p] or gpu[p]):  # a step with no such phases (the head alone) shows none
        span = f", GPU span {_union_us(gpu[phase]) / 1e3:,.1f} ms" if gpu[phase] else ""
        lines.append(f"  {phase:<14} host {host[phase] / 1e3:9,.1f} ms{span}")
    if kernels:
        busy = _union_us([(e["ts"], e["ts"] + e["dur"]) for e in kernels])
        lines.append(f"  GPU busy {busy / 1e3:,.1f} ms of {wall / 1e3:,.1f} ms ({100 * busy / wall:.0f}%)")
        comm = [(e["ts"], e["ts"] + e["dur"]) for e in kernels if "nccl" in e["name"].lower()]
        if comm:  # communication that no computation overlaps is time the step waits on it
            exposed = busy - _union_us([(e["ts"], e["ts"] + e["dur"]) for e in kernels
                                        if "nccl" not in e["name"].lower()])
            lines.append(f"  communication kernels {_union_us(comm) / 1e3:,.1f} ms, "
                         f"{exposed / 1e3:,.1f} ms of it with no other kernel running")
        by_name: dict[str, list[float]] = {}
        for e in kernels:
            by_name.setdefault(e["name"], []).append(e["dur"])
        summed = sum(e["dur"] for e in kernels)
        lines.append(f"  top kernels by GPU time (share of all {len(kernels)} launches' time):")
        for name, durs in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]:
            share = 100 * sum(durs) / summed
            lines.append(f"    {sum(durs) / 1e3:9,.1f} ms {share:5.1f}% x{len(durs):<5d} {name[:90]}")
    return "\n".join(lines)


def print_row(row: dict[str, float], args: argparse.Namespace) -> None:
    print(f"{row['algorithm']:4s} {args.shape} ranks={row['ranks']} N={row['params'] / 1e6:,.1f}M "
          f"tokens={row['tokens']} (+{row['other_tokens']} teacher/reference) "
          f"layers={row['layers']} checkpointing={args.checkpointing} micro_batch_tokens={args.micro_batch_tokens}: "
          f"{row['seconds']:.3f} s, {row['tokens_per_s_per_gpu']:,.0f} tok/s per GPU, "
          f"MFU {100 * row['mfu']:.1f}%, peak {row['peak_gib']:.2f} GiB", flush=True)


def print_speedups(rows: list[dict]) -> None:
    """fused / eager step time, per algorithm, where both ran."""
    by = {(row["algorithm"], row["layers"]): row for row in rows}
    for (algorithm, layers), row in by.items():
        if layers == "fused" and (algorithm, "eager") in by:
            eager = by[algorithm, "eager"]
            print(f"{algorithm:4s} fused layers: {eager['seconds'] / row['seconds']:.2f}x eager's speed, "
                  f"MFU {100 * eager['mfu']:.1f}% -> {100 * row['mfu']:.1f}%", flush=True)


def run_here(args: argparse.Namespace) -> None:
    """This process's measurement: one process, or one rank under torchrun (rank 0 prints and reports)."""
    device = distributed.setup(args.device)
    rows = []
    try:
        # eager first: fusing replaces the rotary embedding of the model family for the whole process
        for layers in sorted(set(args.layers)):
            for algorithm in args.algorithm:
                row = measure(args, algorithm, layers, device)
                if distributed.is_main():
                    rows.append(row)
                    print_row(row, args)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if distributed.is_main():
            print_speedups(rows)
        if args.report and distributed.is_main():
            Path(args.report).write_text(json.dumps(rows))
    finally:
        distributed.close()


def run_scaling(args: argparse.Namespace, argv: list[str]) -> None:
    """1 process, then `--nproc` under torchrun, each in its own process; per-GPU throughput ratio."""
    script = str(Path(__file__).resolve())
    i = argv.index("--nproc") if "--nproc" in argv else None  # torchrun would take --nproc for its own option
    rest = argv[:i] + argv[i + 2:] if i is not None else [a for a in argv if not a.startswith("--nproc=")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, args.nproc):
            report = Path(tmp) / f"{n}.json"
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                            script, *rest, "--report", str(report)], check=True)
            results[n] = {(row["algorithm"], row["layers"]): row for row in json.loads(report.read_text())}
    for key, one in results[1].items():
        many, (algorithm, layers) = results[args.nproc][key], key
        print(f"{algorithm:4s} layers={layers} weak scaling 1 -> {args.nproc}: {one['tokens_per_s_per_gpu']:,.0f} -> "
              f"{many['tokens_per_s_per_gpu']:,.0f} tok/s per GPU: "
              f"{100 * many['tokens_per_s_per_gpu'] / one['tokens_per_s_per_gpu']:.0f}%", flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.7b")
    parser.add_argument("--algorithm", nargs="+", choices=["fd", "grpo"], default=["fd", "grpo"])
    parser.add_argument("--seqs", type=int, default=8, help="sequences per rank")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--trained", type=int, default=1536, help="trained (generated) tokens per sequence")
    parser.add_argument("--feedback", type=int, default=64, help="FD: tokens the teacher's prompt adds")
    parser.add_argument("--micro-batch-tokens", type=int,
                        help="default: one micro-batch holds all of a rank's sequences (FD's teacher prompts included)")
    parser.add_argument("--chunk", type=int, default=1024, help="LM head rows per chunk")
    parser.add_argument("--checkpointing", choices=["full", "selective", "none"], default="full",
                        help="full: as the trainer does by default (measured faster than selective on an H200)")
    parser.add_argument("--layers", nargs="+", choices=["eager", "fused"], default=["fused"],
                        help="fused: norms, rotary embedding and SwiGLU compiled, as the trainer runs them on CUDA "
                        "(trainer/fused_layers.py); eager: transformers' modules; both: their speed ratio")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=790.0)
    parser.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    parser.add_argument("--nproc", type=int, default=1, help="also run under torchrun with this many processes")
    parser.add_argument("--head", action="store_true", help="also the LM head alone at 8,192 tokens")
    parser.add_argument("--profile", metavar="DIR", help="also profile one step: phases, GPU busy share, top "
                        "kernels; Chrome traces to DIR")
    parser.add_argument("--report", help=argparse.SUPPRESS)  # where a child run leaves its rows
    args = parser.parse_args(argv)
    if args.trained >= args.seq_len:
        parser.error("--trained must be below --seq-len (a prompt is needed)")
    if args.micro_batch_tokens is None:
        args.micro_batch_tokens = args.seqs * (args.seq_len + args.feedback)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:  # the two runs go to child processes
        run_scaling(args, argv)
        return
    run_here(args)
    if args.head and "WORLD_SIZE" not in os.environ:
        from fd_loss import head_rows, print_rows

        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              "cpu" if args.device == "auto" else args.device)
        hidden, vocab = SHAPES[args.shape]["hidden_size"], SHAPES[args.shape]["vocab_size"]
        tokens = 8192 if device.type == "cuda" else 1024
        print_rows(head_rows(tokens, vocab, hidden, args.chunk, device, repeats=3),
                   f"T={tokens} V={vocab} H={hidden} chunk={args.chunk} {device}")


if __name__ == "__main__":
    main()
