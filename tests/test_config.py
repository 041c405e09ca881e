import pytest

from paft.config import load_config
from paft.errors import ConfigError


def test_default_and_tiny_presets_validate():
    assert load_config().model.name == "smollm2-135m"
    tiny = load_config(preset="tiny")
    assert tiny.model.name == "tiny" and tiny.sft.lora.r == 4


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("sft:\n  learning_rate: 0.001\n  lora: {r: 8}\npreference: {beta: 0.5}\n")
    cfg = load_config(p, ["sft.lora.r=32", "merge.weights=[0.7, 0.3]", "run.parallel=false"])
    assert cfg.sft.learning_rate == 0.001 and cfg.sft.lora.r == 32
    assert cfg.preference.beta == 0.5 and cfg.merge.weights == [0.7, 0.3] and cfg.run.parallel is False


def test_unknown_key_names_it_and_suggests(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("sft:\n  learnin_rate: 0.001\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "'sft.learnin_rate'" in msg and "did you mean 'learning_rate'" in msg


@pytest.mark.parametrize("override, key", [
    ("sft.lora.r=0", "sft.lora.r"),
    ("preference.beta=-1", "preference.beta"),
    ("merge.density=1.5", "merge.density"),
    ("preference.method=dpoo", "preference.method"),
    ("merge.method=slerpy", "merge.method"),
    ("merge.weights=[1]", "merge.weights"),
    ("sft.max_steps=0", "sft.max_steps"),
    ("data.max_prompt_length=999", "data"),
    ("sft.learning_rate=inf", "sft.learning_rate"),  # issue 16 class 5: inf gave an all-NaN adapter, exit 0
    ("sft.learning_rate=nan", "sft.learning_rate"),
    ("preference.learning_rate=-inf", "preference.learning_rate"),
    ("sft.learning_rate=0", "sft.learning_rate"),
    ("preference.beta=nan", "preference.beta"),
    ("sft.max_grad_norm=inf", "sft.max_grad_norm"),
])
def test_impossible_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert f"'{key}'" in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_method_suggests_close_name():
    with pytest.raises(ConfigError, match="did you mean 'dpo'"):
        load_config(overrides=["preference.method=dpoo"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["sft.learning_rate"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_example_configs_validate():
    from pathlib import Path

    root = Path(__file__).parent.parent / "examples"
    from paft.merge.mergekit_config import is_mergekit_yaml

    for path in sorted(root.glob("*.yaml")):
        # merge-*.yaml are `paft merge` inputs (test_merge_standalone), sweep-*.yaml `paft sweep` files (test_sweep)
        if not is_mergekit_yaml(path) and not path.name.startswith("sweep-"):
            load_config(path)
    assert load_config(root / "tiny.yaml") == load_config(preset="tiny")


def test_set_merges_a_mapping_and_identity_leaves_out_execution_keys():
    from paft.config import config_digest, config_identity

    cfg = load_config(preset="tiny", overrides=["data.demo={sft_train: 8}"])
    assert cfg.data.demo.sft_train == 8 and cfg.data.demo.sft_eval == 16  # the preset's other sizes stay
    moved = load_config(preset="tiny", overrides=["data.demo.sft_train=8", "run.output_dir=elsewhere",
                                                  "run.threads=3", "run.parallel=false"])
    assert config_identity(moved) == config_identity(cfg) and "output_dir" not in config_identity(cfg)["run"]
    assert config_digest(moved) == config_digest(cfg) != config_digest(load_config(preset="tiny"))
