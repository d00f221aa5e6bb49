"""What the scripts print on a CPU is theirs: known-harmless library messages that buried it are gone (bitsandbytes'
kernel download at import, transformers' load report of a P-tuning prefix that is loaded right after, the deprecation
warning of our own model outputs in the middle of an answer), and real warnings of the same loggers still show."""
import logging
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from conftest import REPO_ROOT, SCRIPTS, VERSIONS
from utils.model_loading import load_model_and_tokenizer

BITSANDBYTES_NOISE = "Failed to load CPU gemm_4bit_forward"


def test_help_shows_no_bitsandbytes_noise_and_its_real_warnings_still_show(caplog):
    # A fresh interpreter: the message comes while peft imports bitsandbytes, once per process.
    result = subprocess.run([sys.executable, "inference_test.py", "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "Options (defaults shown)" in result.stdout, result.stderr[-2000:]
    assert BITSANDBYTES_NOISE not in result.stdout + result.stderr, result.stderr[-2000:]
    # The filter (in place here too: utils is imported) drops that message only: the same logger's other messages,
    # and the same text from another logger, still show.
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("%s from kernels-community: a test", BITSANDBYTES_NOISE)
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("a real bitsandbytes problem")
    logging.getLogger("bitsandbytes.other").warning("%s elsewhere", BITSANDBYTES_NOISE)
    assert [r.getMessage() for r in caplog.records] == ["a real bitsandbytes problem", f"{BITSANDBYTES_NOISE} elsewhere"]


def test_a_prefix_load_has_no_load_report_unless_something_else_is_missing(tiny_model_dirs, tmp_path, caplog):
    """Building a model for P-tuning (to train a prefix, or to load one right after) found the prefix encoder's keys
    missing from the base's weights, and transformers said so in a table ending "Consider training"."""
    base = tiny_model_dirs["chatglm2-6b"]
    reporter = logging.getLogger("transformers.modeling_utils")  # transformers' loggers do not propagate to the root
    reporter.addHandler(caplog.handler)
    try:
        model, _ = load_model_and_tokenizer(base, dtype="fp32", device="cpu", pre_seq_len=4)
        assert model.transformer.pre_seq_len == 4
        assert not [r for r in caplog.records if "LOAD REPORT" in r.getMessage()], caplog.text
        # A base that lacks a weight of its own: the report stays, naming it (and the prefix keys beside it).
        broken = tmp_path / "broken"
        broken.mkdir()
        for path in base.iterdir():
            if path.suffix != ".safetensors":
                (broken / path.name).symlink_to(path)
        [weights] = base.glob("*.safetensors")
        state = load_file(weights)
        state.pop("transformer.encoder.final_layernorm.weight")
        save_file(state, broken / weights.name, metadata={"format": "pt"})
        load_model_and_tokenizer(broken, dtype="fp32", device="cpu", pre_seq_len=4)
        # One report (a handler that an earlier test left on the root logger may show it twice: the same text).
        [report] = {r.getMessage() for r in caplog.records if "LOAD REPORT" in r.getMessage()}
        assert "final_layernorm.weight" in report and "prefix_encoder" in report and "Consider training" in report
    finally:
        reporter.removeHandler(caplog.handler)


@pytest.mark.parametrize("version", VERSIONS)
def test_chat_answers_carry_no_deprecation_warning(version, tiny_model_dirs):
    """transformers 5.2x renamed the outputs' past_key_values to cache: our model outputs used the old name, and the
    warning came out inside chat_ner's first answer."""
    result = SCRIPTS.run(["chat_ner.py", f"--model_dir={tiny_model_dirs[version]}", "--lora_path=none", "--raw",
                          "--max_input_tokens=48", "--max_new_tokens=16"], input="张三在北京工作。\nexit\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ChatGLM：" in result.stdout and "deprecated" not in result.stdout + result.stderr, result.stdout + result.stderr
