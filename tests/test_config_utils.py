import pytest

from conftest import run_script
from utils.config_utils import ConfigError, apply_overrides

DEFAULTS = {"learning_rate": 2e-4, "max_steps": -1, "gradient_checkpointing": False, "model_dir": "model_hub/x",
            "lora": {"r": 8, "alpha": 32, "target_modules": "query_key_value"}, "report_to": None, "devices": [0]}


def test_both_spellings_types_from_defaults_and_nested_keys():
    config = apply_overrides(DEFAULTS, ["--learning_rate=3e-4", "--max_steps", "20", "--lora_r=16", "--gradient_checkpointing",
                                        "--lora-alpha", "64", "--report_to=none", "--devices=[0, 1]"])
    assert config["learning_rate"] == 3e-4 and config["max_steps"] == 20 and config["gradient_checkpointing"] is True
    assert config["lora"] == {"r": 16, "alpha": 64, "target_modules": "query_key_value"}
    assert config["report_to"] is None and config["devices"] == [0, 1]
    assert DEFAULTS["lora"]["r"] == 8  # the defaults are not modified


def test_unknown_key_names_the_closest_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown option --learning_rat; did you mean --learning_rate\?"):
        apply_overrides(DEFAULTS, ["--learning_rat=1"])
    with pytest.raises(ConfigError, match="--lora_rank.*did you mean --lora_r"):
        apply_overrides(DEFAULTS, ["--lora_rank=4"])


def test_values_that_do_not_fit_the_default_type_are_errors():
    with pytest.raises(ConfigError, match=r"--max_steps: cannot read 'ten' as int"):
        apply_overrides(DEFAULTS, ["--max_steps=ten"])
    with pytest.raises(ConfigError, match="--gradient_checkpointing: cannot read 'maybe' as bool"):
        apply_overrides(DEFAULTS, ["--gradient_checkpointing=maybe"])
    with pytest.raises(ConfigError, match="--model_dir needs a value"):
        apply_overrides(DEFAULTS, ["--model_dir"])
    with pytest.raises(ConfigError, match="unexpected argument 'extra'"):
        apply_overrides(DEFAULTS, ["extra"])


def test_scripts_exit_with_the_message_and_list_their_options():
    bad = run_script("train_trainer.py", "--learning_rat=1", check=False)
    assert bad.returncode != 0 and "did you mean --learning_rate" in bad.stderr
    shown = run_script("train_trainer.py", "--help", check=False)
    assert shown.returncode == 0 and "--lora_target_modules=\"all\"" in shown.stdout
