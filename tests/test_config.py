import pytest

from lorakit import ConfigError, LoraConfig


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0, alpha=1), "rank must be an integer >= 1"),
    (dict(rank=2.5, alpha=1), "rank must be an integer >= 1"),
    (dict(rank=4, alpha=0), "alpha must be a number > 0"),
    (dict(rank=4, alpha=8, dropout=1.0), "dropout must be in [0, 1)"),
    (dict(rank=4, alpha=8, dropout=-0.1), "dropout must be in [0, 1)"),
    (dict(rank=4, alpha=8, init="loftq"), "init must be one of"),
    (dict(rank=4, alpha=8, init="pissa_niter_0"), "init must be one of"),
    (dict(rank=4, alpha=8, init="pissa", variant="dora"), "with DoRA is not supported"),
    (dict(rank=4, alpha=8, targets=[]), "targets must be"),
    (dict(rank=4, alpha=8, targets="q_proj("), "not a valid regular expression"),
    (dict(rank=4, alpha=8, rank_pattern={"q_proj": 0}), "rank_pattern['q_proj'] must be an integer >= 1"),
    (dict(rank=4, alpha=8, alpha_pattern={"v_proj": -1}), "alpha_pattern['v_proj'] must be a number > 0"),
    (dict(rank=4, alpha=8, layers=[-1]), "layers must be non-negative"),
])
def test_invalid_values_raise_clear_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        LoraConfig(**kwargs)


def test_names_match_whole_path_or_suffix():
    config = LoraConfig(rank=4, alpha=8, targets=["q_proj", "mlp.up_proj"])
    assert config.is_target("model.layers.0.self_attn.q_proj")
    assert config.is_target("q_proj")
    assert config.is_target("model.layers.3.mlp.up_proj")
    assert not config.is_target("model.layers.0.self_attn.xq_proj")
    assert not config.is_target("model.layers.0.other.up_proj")


def test_regex_targets_match_the_whole_path():
    config = LoraConfig(rank=4, alpha=8, targets=r".*\.(q|v)_proj")
    assert config.is_target("model.layers.1.self_attn.v_proj")
    assert not config.is_target("model.layers.1.self_attn.v_proj.extra")


def test_exclude_layers_and_modules_to_save():
    config = LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"], exclude=["v_proj"], layers=[1],
                        modules_to_save=["lm_head"])
    assert config.is_target("model.layers.1.self_attn.q_proj")
    assert not config.is_target("model.layers.0.self_attn.q_proj")
    assert not config.is_target("model.layers.1.self_attn.v_proj")
    assert config.saves("lm_head") and not config.is_target("lm_head")


def test_rank_and_alpha_patterns_take_first_matching_key():
    config = LoraConfig(rank=4, alpha=8, rank_pattern={r"layers\.0\.self_attn\.q_proj": 2, "v_proj": 6},
                        alpha_pattern={"q_proj": 3})
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 2
    assert config.rank_for("model.layers.10.self_attn.q_proj") == 4
    assert config.rank_for("model.layers.1.self_attn.v_proj") == 6
    assert config.alpha_for("model.layers.1.self_attn.q_proj") == 3
    assert config.alpha_for("model.layers.1.self_attn.k_proj") == 8


def test_lists_are_stored_as_tuples():
    config = LoraConfig(rank=4, alpha=8, targets=["q_proj"], layers=[0, 1])
    assert config.targets == ("q_proj",) and config.layers == (0, 1)


def test_a_training_run_takes_every_init_a_lora_config_takes():
    from lorakit.training import TrainConfig

    assert TrainConfig(init="pissa_niter_4").lora().init == "pissa_niter_4"
    with pytest.raises(ConfigError, match="init must be one of"):
        TrainConfig(init="pissa_niter_0")
