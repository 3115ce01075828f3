"""A random-weight Qwen3 model directory of a published shape, for scaling runs where no hub is reachable.

    python bench/random_model.py --shape 8b --out /tmp/qwen3-8b-shape
    torchrun --nproc_per_node 2 -m trainer.run configs/paper_fd_claude.yaml model=/tmp/qwen3-8b-shape ...

The layers are Qwen3's (`bench/train_step.py`'s SHAPES); the vocabulary is SmolLM2's tokenizer,
saved beside the weights with the project's tool-call chat template (the one the tiny models
use), so the trainer, the rollout and vLLM all load the directory as is. The LM head is sized
to that tokenizer (49,152 tokens rather than Qwen3's 151,936): every token a random model
samples can be decoded. Weights are bfloat16, made on the GPU when there is one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from train_step import SHAPES  # noqa: E402

from agent.models import load_tokenizer  # noqa: E402


def write(shape: str, out: Path, *, seed: int = 0) -> int:
    """Write the model and its tokenizer to `out`; returns the parameter count."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    tokenizer = load_tokenizer("tiny-qwen3")  # SmolLM2's tokenizer with the tool-call chat template
    config = Qwen3Config(**{**SHAPES[shape], "vocab_size": len(tokenizer)}, max_position_embeddings=40960,
                         rms_norm_eps=1e-6, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    params = write(args.shape, args.out, seed=args.seed)
    print(f"{args.out}: random Qwen3 {args.shape} shape, {params / 1e9:.2f}B parameters, bfloat16")


if __name__ == "__main__":
    main()
