"""Chat with a base model + LoRA adapter: type a sentence, get its entities, token by token.

    python chat_ner.py                                         # the demo adapter of train_trainer.py
    python chat_ner.py --model_dir=model_hub/chatglm2-6b --lora_path=checkpoint/msra/train_trainer/adapter_model
    printf '张三在北京工作。\\n他去了上海。\\nexit\\n' | python chat_ner.py    # stdin may be piped

Each line you type is wrapped the way the adapter was trained: the task instruction, then `文本：` + your text
(--raw sends it as it is). The conversation history is kept (its oldest turns left out of a prompt longer than
--max_input_tokens); `clear` forgets it, `exit` (or end of input) quits.
"""
import sys

from utils.adapters import (check_lora_on_base, choose_lora_path, load_run, run_instruction, take_run_settings,
                            uses_adapter)
from utils.config_utils import parse_config
from utils.generation import StableText, stream_chat_reply
from utils.ner_data import MSRA_INSTRUCT, QUERY_PREFIX
from utils.prompts import get_prompt_format, user_message
from utils.serving import GENERATION_DEFAULTS, RUN_CHOICE_DEFAULTS, chat_prompt, check_serving_options

DEFAULTS = {
    **RUN_CHOICE_DEFAULTS,
    "instruct": "",  # default: the instruction of the run's training data (else the MSRA one)
    "raw": False,  # send typed text as it is, without instruction and 文本： prefix
    **GENERATION_DEFAULTS,
}
RENAMED = {"max_length": "max_input_tokens"}  # the old name works until the next release, with a note


def typed_lines(interactive):
    """The non-empty lines typed (or piped) until `exit` or the end of input, each echoed after its prompt."""
    while True:
        if interactive:
            print("\n用户：", end="", flush=True)
        line = sys.stdin.readline()
        text = line.strip()
        if not line or text == "exit":
            return
        if text and not interactive:
            print(f"\n用户：{text}", flush=True)
        if text:
            yield text


def print_reply(model, tokenizer, prompt_ids, budget, config):
    """Streams the answer to stdout as it grows; returns its text."""
    print("ChatGLM：", end="", flush=True)
    stable = StableText()
    for reply in stream_chat_reply(model, tokenizer, prompt_ids, budget, do_sample=config["do_sample"],
                                   temperature=config["temperature"], top_p=config["top_p"], top_k=config["top_k"],
                                   decode=config["decode"]):
        piece = stable.update(reply.text, final=reply.finish_reason is not None)
        print("\n" + reply.text if piece is None else piece, end="", flush=True)
    print(flush=True)
    return reply.text


def main(config):
    check_serving_options(config)
    lora_path = choose_lora_path(config)
    trained = take_run_settings(config)  # read once: the run's base and its instruction
    check_lora_on_base(trained, config["model_dir"])
    model, tokenizer = load_run(config, trained=trained)
    version = model.model_version
    record = trained.record
    instruct = "" if config["raw"] else config["instruct"] or run_instruction(record) or MSRA_INSTRUCT

    def message(text):
        return text if config["raw"] else user_message({"instruct": instruct, "query": QUERY_PREFIX + text})

    prompt_format = get_prompt_format(tokenizer, version)
    example = tokenizer.decode(prompt_format.prompt_ids(message("<你的句子>"), []))
    served = f"{config['model_dir']} + {lora_path}" if uses_adapter(lora_path) else f"{config['model_dir']} alone"
    print(f"{version or model.config.model_type}: {served}. The prompt of a first turn looks like:\n---\n{example}\n---\n"
          "Type a sentence; 'clear' forgets the history, 'exit' quits.", flush=True)
    history = []
    for text in typed_lines(sys.stdin.isatty()):
        if text == "clear":
            history = []
            print("(history cleared)", flush=True)
            continue
        prompt_ids, budget, notes = chat_prompt(model, prompt_format, message(text), history,
                                                config["max_input_tokens"], config["max_new_tokens"])
        for note in notes:
            print(f"({note})", flush=True)
        if prompt_ids is not None:
            history = history + [(message(text), print_reply(model, tokenizer, prompt_ids, budget, config))]


if __name__ == "__main__":
    main(parse_config(DEFAULTS, description=__doc__, renamed=RENAMED))
