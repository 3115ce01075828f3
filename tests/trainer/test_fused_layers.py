"""The fused layers compute what transformers' modules compute, and the trainer uses them.

The functions are compared op for op with each supported family's own modules (bitwise, in
eager mode: a change on transformers' side fails here); the compiled path, which CUDA runs
(Triton there, C++ kernels here), is compared on a whole model, forward and backward, with
activation checkpointing, and through a training step.
"""

import copy
import importlib

import pytest
import torch
from torch.testing import assert_close

from trainer import fused_layers
from trainer.fused_layers import FAMILIES, fuse_layers, rms_norm, rotary, swiglu


def modeling(family):
    return importlib.import_module(f"transformers.models.{family}.modeling_{family}")


def original_rotary(family):
    rope = modeling(family).apply_rotary_pos_emb
    return getattr(rope, "original", rope)


@pytest.fixture(autouse=True)
def unfused_families(monkeypatch):
    """Each test starts with transformers' own rotary embedding (fusing replaces it for the process) and
    leaves it so."""
    for family in FAMILIES:
        monkeypatch.setattr(modeling(family), "apply_rotary_pos_emb", original_rotary(family))


@pytest.fixture
def compiled_off_cuda(monkeypatch):
    """Run the compiled path on this CPU, as CUDA would."""
    monkeypatch.setattr(fused_layers, "compile_off_cuda", True)


def run_compiled(compiled, monkeypatch):
    """Compiled (as on CUDA) or not at all: the rotary embedding is replaced for the whole family, so an
    eager model must run with compilation off to run its own code."""
    monkeypatch.setattr(fused_layers, "compile_off_cuda", compiled)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_functions_are_the_families_own_math_bit_for_bit(family, dtype):
    g = torch.Generator().manual_seed(0)
    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family]
    norm = getattr(modeling(family), f"{prefix}RMSNorm")(24, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24, generator=g))
    x = (3 * torch.randn(2, 5, 24, generator=g)).to(dtype)
    assert torch.equal(rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))

    q, k = torch.randn(1, 4, 7, 8, generator=g).to(dtype), torch.randn(1, 2, 7, 8, generator=g).to(dtype)
    angles = torch.randn(1, 7, 8, generator=g)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    for got, want in zip(rotary(q, k, cos, sin), original_rotary(family)(q, k, cos, sin), strict=True):
        assert torch.equal(got, want)

    from transformers import AutoConfig

    config = AutoConfig.for_model(family, hidden_size=24, intermediate_size=40, num_attention_heads=4,
                                  num_key_value_heads=2, hidden_act="silu")
    mlp = getattr(modeling(family), f"{prefix}MLP")(config).to(dtype)
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    assert torch.equal(mlp.down_proj(swiglu(gate, up)), mlp(x))


def test_fusing_changes_the_norms_and_mlps_and_the_rotary_embedding(tiny_model):
    model = copy.deepcopy(tiny_model)
    layers = model.config.num_hidden_layers
    assert fuse_layers(model) == layers * 5 + 1  # 4 norms (input, post-attention, q, k) and the MLP; final norm
    assert fuse_layers(model) == 0  # idempotent
    assert hasattr(modeling("qwen3").apply_rotary_pos_emb, "original")
    fused = [m for m in model.modules() if "forward" in vars(m)]
    assert {type(m).__name__ for m in fused} == {"Qwen3RMSNorm", "Qwen3MLP"}


def test_other_families_and_activations_are_left_alone():
    from transformers import AutoConfig, AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2,
                                                                 vocab_size=50))
    assert fuse_layers(gpt2) == 0 and not any("forward" in vars(m) for m in gpt2.modules())
    gelu = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=50, hidden_act="gelu"))
    assert fuse_layers(gelu) == 3  # the norms only: a GELU MLP is not SwiGLU
    assert not any("forward" in vars(m) for m in gelu.modules() if type(m).__name__ == "LlamaMLP")


def test_off_cuda_the_modules_run_their_own_code(tiny_model, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    model = copy.deepcopy(tiny_model).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    want = model(input_ids=ids).logits
    fuse_layers(model)
    assert torch.equal(model(input_ids=ids).logits, want) and compiled == []


def test_where_it_compiles_every_layer_runs_the_compiled_functions(tiny_model, compiled_off_cuda, monkeypatch):
    """Each norm, rotary embedding and MLP of a forward pass goes through its compiled function (counted
    here in place of compiling: the compiled code is checked in the tests below)."""
    calls = {}

    def counting(fn, **kwargs):
        def run(*args):
            calls[fn.__name__] = calls.get(fn.__name__, 0) + 1
            return fn(*args)
        return run

    monkeypatch.setattr(fused_layers, "_compiled", {})
    monkeypatch.setattr(torch, "compile", counting)
    model = copy.deepcopy(tiny_model).eval()
    fuse_layers(model)
    model(input_ids=torch.tensor([[5, 6, 7]]))
    layers = model.config.num_hidden_layers
    assert calls == {"rms_norm": 4 * layers + 1, "rotary": layers, "swiglu": layers}


def test_a_copy_of_a_fused_model_is_fused_with_its_own_weights(tiny_model, compiled_off_cuda):
    model = copy.deepcopy(tiny_model).eval()
    fuse_layers(model)
    twin = copy.deepcopy(model)
    norm, twin_norm = model.model.norm, twin.model.norm
    assert "forward" in vars(twin_norm) and twin_norm.forward.__self__ is twin_norm
    with torch.no_grad():
        twin_norm.weight.mul_(2)
    x = torch.randn(1, 3, model.config.hidden_size)
    assert_close(twin_norm(x), 2 * norm(x))


@pytest.mark.parametrize("checkpointing", [None, "full", "selective"])
def test_compiled_model_matches_eager_forward_and_backward(tiny_model, monkeypatch, checkpointing):
    from trainer.algorithms import checkpoint_activations

    eager = copy.deepcopy(tiny_model).train()
    if checkpointing:
        checkpoint_activations(eager, checkpointing)
    fused = copy.deepcopy(eager)
    fuse_layers(fused)
    g = torch.Generator().manual_seed(2)
    graphs = []
    for length in (13, 29):
        ids = torch.randint(0, eager.config.vocab_size, (1, length), generator=g)
        losses = []
        for model in (eager, fused):
            run_compiled(model is fused, monkeypatch)
            model.zero_grad()
            logits = model(input_ids=ids, use_cache=False).logits
            loss = logits.float().pow(2).mean()
            loss.backward()
            losses.append(logits)
        assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
        for (name, a), b in zip(eager.named_parameters(), fused.parameters(), strict=True):
            assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert set(fused_layers._compiled) == {"rms_norm", "rotary", "swiglu"}
    assert graphs[1] == graphs[0]  # another length compiled nothing new (dynamic shapes)


@pytest.mark.parametrize("algorithm", ["fd", "grpo"])
def test_a_training_step_with_fused_layers_matches_eager(tiny_model, monkeypatch, algorithm):
    from tests.trainer.test_batches import backward, grads, random_sequences, student_and_teacher

    student, teacher = student_and_teacher(tiny_model)
    student, teacher = student.float(), teacher.float()
    sequences = random_sequences(student.config.vocab_size)
    run_compiled(False, monkeypatch)
    want = backward(algorithm, student, teacher, sequences, token_budget=40, chunk=7)
    want_grads = grads(student)
    student.zero_grad()
    fuse_layers(student)
    fuse_layers(teacher)
    run_compiled(True, monkeypatch)
    got = backward(algorithm, student, teacher, sequences, token_budget=40, chunk=7)
    assert got["loss_sum"] == pytest.approx(want["loss_sum"], rel=1e-5)
    for a, b in zip(grads(student), want_grads, strict=True):
        assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_the_trainer_fuses_its_models_when_configured(tmp_path, fused):
    from tests.trainer.test_run import TINY
    from trainer.config import load_config
    from trainer.run import Trainer

    cfg = load_config(None, [*TINY, "algorithm=fd", f"fused_layers={str(fused).lower()}", f"out_dir={tmp_path}"])
    trainer = Trainer(cfg)
    try:
        for model in (trainer.policy, trainer.teacher.model):
            norms = [m for m in model.modules() if type(m).__name__ == "Qwen3RMSNorm"]
            assert norms and all(("forward" in vars(m)) == fused for m in norms)
    finally:
        trainer.close()


def test_every_pass_of_a_run_stays_compiled(tiny_model, compiled_off_cuda, monkeypatch):
    """The policy's checkpointed FD and GRPO passes, the teacher's no-grad passes, an evaluation under no_grad
    and generation under inference_mode each need their own graphs (and the norms one per weight shape):
    more than torch's default of 8 per function, past which it runs the function uncompiled."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from tests.trainer.test_batches import random_sequences, student_and_teacher
    from trainer.algorithms import checkpoint_activations, fd_backward, grpo_backward

    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)  # torch's default
    monkeypatch.setattr(fused_layers, "_compiled", {})
    student, teacher = (m.float() for m in student_and_teacher(tiny_model))
    teacher.requires_grad_(False)  # as the trainer holds its teacher and reference
    fuse_layers(student)
    fuse_layers(teacher)
    checkpoint_activations(student, "full")
    sequences = random_sequences(student.config.vocab_size)
    common = dict(token_budget=40, chunk=7, pad_id=0)
    fd_backward(student, teacher, sequences, top_k=4, renormalize=False, **common)
    grpo_backward(student, teacher, sequences, clip_eps=0.2, kl_coef=0.01, **common)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        student.eval()(input_ids=ids)
    with torch.inference_mode():
        student(input_ids=ids)
    graphs = {fn.__name__: len(_debug_get_cache_entry_list(fn.__code__)) for fn in (rms_norm, rotary, swiglu)}
    assert graphs["rms_norm"] > 8 and all(1 <= n < torch._dynamo.config.recompile_limit for n in graphs.values())
