"""Chat with a base model + LoRA adapter: type a sentence, get its entities, token by token.

    python chat_ner.py                                         # the demo adapter of train_trainer.py
    python chat_ner.py --model_dir=model_hub/chatglm2-6b --lora_path=checkpoint/msra/train_trainer/adapter_model
    printf '张三在北京工作。\\n他去了上海。\\nexit\\n' | python chat_ner.py    # stdin may be piped

Each line you type is wrapped the way the adapter was trained: the task instruction, then `文本：` + your text
(--raw sends it as it is). The conversation history is kept; `clear` forgets it, `exit` (or end of input) quits.
"""
import sys

from utils.adapters import choose_lora_path, load_run, run_instruction, scored_run, uses_adapter
from utils.config_utils import parse_config
from utils.generation import StableText, stream_chat_reply
from utils.ner_data import MSRA_INSTRUCT, QUERY_PREFIX
from utils.prompts import get_prompt_format, user_message
from utils.serving import check_serving_options

DEFAULTS = {
    "model_dir": "model_hub/chatglm2-small",
    # default: "none" where --model_dir is a run's model folder, else the newest run's checkpoint/<data_name>/*/
    # adapter_model (or prefix_model); "none" for the model alone. The run's train_args.json gives model_dir unless
    # set here.
    "lora_path": "",
    "data_name": "demo_ner",
    "instruct": "",  # default: the instruction of the run's training data (else the MSRA one)
    "raw": False,  # send typed text as it is, without instruction and 文本： prefix
    "max_length": 2048,
    "do_sample": False,
    "temperature": 0.8,
    "top_p": 0.8,
    "dtype": "auto",
    "device": "auto",
    "decode": "auto",  # auto (CUDA-graph steps on CUDA, plain on CPU), plain, static, graph, compiled
}


def main(config):
    check_serving_options(config, at_least_one=("max_length",))
    lora_path = choose_lora_path(config)
    model, tokenizer = load_run(config)
    version = model.model_version
    instruct = "" if config["raw"] else config["instruct"] or run_instruction(scored_run(config)) or MSRA_INSTRUCT

    def message(text):
        return text if config["raw"] else user_message({"instruct": instruct, "query": QUERY_PREFIX + text})

    prompt_format = get_prompt_format(tokenizer, version)
    example = tokenizer.decode(prompt_format.prompt_ids(message("<你的句子>"), []))
    interactive = sys.stdin.isatty()
    served = f"{config['model_dir']} + {lora_path}" if uses_adapter(lora_path) else f"{config['model_dir']} alone"
    print(f"{version or model.config.model_type}: {served}. The prompt of a first turn looks like:\n---\n{example}\n---\n"
          "Type a sentence; 'clear' forgets the history, 'exit' quits.", flush=True)
    history = []
    while True:
        if interactive:
            print("\n用户：", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if text == "exit":
            break
        if text == "clear":
            history = []
            print("(history cleared)", flush=True)
            continue
        if not text:
            continue
        if not interactive:
            print(f"\n用户：{text}", flush=True)
        print("ChatGLM：", end="", flush=True)
        prompt_ids = prompt_format.prompt_ids(message(text), history)
        if len(prompt_ids) >= config["max_length"]:
            print(f"(the prompt has {len(prompt_ids)} tokens, no room under --max_length={config['max_length']}; type 'clear')", flush=True)
            continue
        stable = StableText()
        for reply in stream_chat_reply(model, tokenizer, prompt_ids, config["max_length"] - len(prompt_ids),
                                       do_sample=config["do_sample"], temperature=config["temperature"],
                                       top_p=config["top_p"], decode=config["decode"]):
            piece = stable.update(reply.text, final=reply.finish_reason is not None)
            print("\n" + reply.text if piece is None else piece, end="", flush=True)
        print(flush=True)
        history = history + [(message(text), reply.text)]


if __name__ == "__main__":
    main(parse_config(DEFAULTS, description=__doc__))
