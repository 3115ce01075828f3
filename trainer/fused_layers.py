"""Fused elementwise layers of Llama-family decoders (Llama, Mistral, Qwen2, Qwen3), for CUDA.

A profile of `fd_backward` on an H200 (Qwen3-1.7B shape, 16,384 tokens, `bench/train_step.py
--profile`) puts nearly half of the GPU's kernel time outside the matmuls and attention, in
elementwise kernels that each read and write whole activations: an RMSNorm runs as seven of
them (float32 upcast, square, mean, rsqrt, scale, downcast, weight) and its backward as more,
the rotary embedding as six per tensor (two slices, a negation, a concatenation, two products
and a sum), SwiGLU as two. A Qwen3 layer has four norms, and with activation checkpointing
every forward kernel runs twice.

`fuse_layers(model)` runs the same math through `torch.compile`, which writes one Triton
kernel for each of these forwards and one for each backward. The functions below are the
modules' own code, op for op and cast for cast (tests compare them with each supported
class), so the fused model computes what the model computes, to rounding inside a kernel.
Off CUDA the modules run their own code. The norms and MLPs are changed on the model's own
instances (copies made later keep the change); the rotary embedding is a function of the
modeling module, so that module's function is replaced, for every model of the family in the
process (the replacement runs the original off CUDA).
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}
_SILU = {"SiLU", "SiLUActivation"}

compile_off_cuda = False  # tests set it to compile on CPU too (C++ kernels there), to check what CUDA runs


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """transformers' LlamaRMSNorm/Qwen3RMSNorm forward."""
    dtype = x.dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """The gated MLP's elementwise part: act_fn(gate_proj(x)) * up_proj(x) with SiLU."""
    return F.silu(gate) * up


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """transformers' apply_rotary_pos_emb of the four families."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


_compiled: dict[str, Callable] = {}

# Dynamic shapes give one graph for every length, but torch.compile keeps the shapes of
# parameters static and compiles again for each grad mode, inputs with or without
# requires_grad and inference tensors: a Qwen3 norm sees two weight shapes (the hidden
# size and q/k's head dim) in the policy's training passes, the teacher's and reference's
# no-grad passes, evaluation and generation. Past torch's default of 8 graphs per function
# it would run the function uncompiled for every new case, with only a warning.
RECOMPILE_LIMIT = 64


def _fused(fn: Callable, x: Tensor) -> Callable | None:
    """`fn` compiled (dynamic shapes: one graph for every length) where `x` lives on CUDA, else None."""
    if not (x.is_cuda or compile_off_cuda):
        return None
    if fn.__name__ not in _compiled:
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
        _compiled[fn.__name__] = torch.compile(fn, dynamic=True)
    return _compiled[fn.__name__]


def _norm_forward(self: torch.nn.Module, hidden_states: Tensor) -> Tensor:
    fused = _fused(rms_norm, hidden_states)
    if fused is None:
        return type(self).forward(self, hidden_states)
    return fused(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self: torch.nn.Module, x: Tensor) -> Tensor:
    fused = _fused(swiglu, x)
    if fused is None:
        return type(self).forward(self, x)
    return self.down_proj(fused(self.gate_proj(x), self.up_proj(x)))


def _fused_rotary(original: Callable) -> Callable:
    def apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> Any:
        fused = _fused(rotary, q)
        if fused is None:
            return original(q, k, cos, sin, unsqueeze_dim)
        return fused(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.original = original  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


def _family_module(module: torch.nn.Module) -> types.ModuleType | None:
    name = type(module).__module__
    if not any(name == f"transformers.models.{f}.modeling_{f}" for f in FAMILIES):
        return None
    return sys.modules[name]


def fuse_layers(model: torch.nn.Module) -> int:
    """Fuse the norms, gated MLPs and rotary embedding of `model` (idempotent); returns how many modules
    were changed. Models of other families are left as they are (0)."""
    changed, families = 0, set()
    for module in model.modules():
        modeling = _family_module(module)
        if modeling is None:
            continue
        families.add(modeling)
        cls = type(module).__name__
        if "forward" in vars(module):
            continue
        if cls in _NORMS:
            module.forward = types.MethodType(_norm_forward, module)
        elif cls in _MLPS and type(module.act_fn).__name__ in _SILU:
            module.forward = types.MethodType(_mlp_forward, module)
        else:
            continue
        changed += 1
    for modeling in families:
        rope = getattr(modeling, "apply_rotary_pos_emb", None)
        # Another signature is another function: left as it is.
        if rope is not None and not hasattr(rope, "original") and \
                list(inspect.signature(rope).parameters) == ["q", "k", "cos", "sin", "unsqueeze_dim"]:
            modeling.apply_rotary_pos_emb = _fused_rotary(rope)
    return changed
