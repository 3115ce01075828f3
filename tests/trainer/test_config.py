import pytest

from trainer.config import ConfigError, TrainConfig, help_text, load_config
from trainer.run import main


def test_defaults_are_the_embedded_default():
    cfg = load_config()
    assert cfg == TrainConfig()
    assert (cfg.algorithm, cfg.model, cfg.backend, cfg.feedback) == ("fd", "smollm2", "transformers", "compiler")


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm: grpo\nlr: 1.0e-7\nsamples_per_prompt: 5\n")
    cfg = load_config(path, ["samples_per_prompt=3", "lr=2e-7", "out_dir=runs/x", "resume=true"])
    assert (cfg.algorithm, cfg.lr, cfg.samples_per_prompt, cfg.out_dir, cfg.resume) == ("grpo", 2e-7, 3, "runs/x",
                                                                                          True)


@pytest.mark.parametrize("overrides, message", [
    (["stepz=3"], "unknown config key 'stepz'"),
    (["steps=three"], "steps must be an integer"),
    (["steps=1.5"], "steps must be an integer"),
    (["lr=fast"], "lr must be a number"),
    (["algorithm=ppo"], r"algorithm must be one of \['fd', 'grpo'\]"),
    (["resume=maybe"], "resume must be true or false"),
    (["steps"], "not key=value"),
    (["max_concurrent_checks=0"], "max_concurrent_checks must be at least 1, not 0"),
    (["micro_batch_tokens=0"], "micro_batch_tokens must be at least 1"),
    (["samples_per_prompt=-1"], "samples_per_prompt must be at least 1"),
    (["steps=-2"], "steps must not be negative"),
    (["lr=-1e-5"], "lr must not be negative"),
    (["vllm_gpu_memory_utilization=1.5"], r"vllm_gpu_memory_utilization is a share of a GPU, in \(0, 1\]"),
    (["vllm_gpu_memory_utilization=0"], "vllm_gpu_memory_utilization is a share"),
    (["ema_alpha=1.1"], r"ema_alpha must lie in \[0, 1\]"),
    (["checkpoint_every=-1"], "checkpoint_every must not be negative"),
])
def test_bad_overrides_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_zero_is_allowed_where_it_means_never():
    cfg = load_config(None, ["checkpoint_every=0", "eval_every=0", "keep_checkpoints=0", "kl_coef=0", "steps=0"])
    assert (cfg.checkpoint_every, cfg.eval_every, cfg.steps) == (0, 0, 0)


def test_bad_yaml_files(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "typo.yaml").write_text("learning_rate: 1\n")
    with pytest.raises(ConfigError, match="typo.yaml: unknown config key 'learning_rate'"):
        load_config(tmp_path / "typo.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_every_field_has_help_and_the_shipped_configs_load():
    text = help_text()
    for name in TrainConfig.__dataclass_fields__:
        assert f"  {name} = " in text
    from tests.conftest import REPO

    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


def test_cli_reports_config_errors(capsys):
    assert main(["stepz=1"]) == 2
    assert "unknown config key 'stepz'" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "micro_batch_tokens" in capsys.readouterr().out
