"""Chat with a base model + LoRA adapter: type a sentence, get its entities, token by token.

    python chat_ner.py                                         # the demo adapter of train_trainer.py
    python chat_ner.py --model_dir=model_hub/chatglm2-6b --lora_path=checkpoint/msra/train_trainer/adapter_model
    printf '张三在北京工作。\\n他去了上海。\\nexit\\n' | python chat_ner.py    # stdin may be piped

Each line you type is wrapped the way the adapter was trained: the task instruction, then `文本：` + your text
(--raw sends it as it is). The conversation history is kept; `clear` forgets it, `exit` (or end of input) quits.
"""
import sys
from pathlib import Path

from peft import PeftModel

from utils.config_utils import parse_config
from utils.data_io import iter_json_lines
from utils.dataset import get_prompt_format, user_message
from utils.model_utils import load_model_and_tokenizer
from utils.ner_data import MSRA_INSTRUCT, QUERY_PREFIX

DEFAULTS = {
    "model_dir": "model_hub/chatglm2-6b",
    "lora_path": "",  # default: checkpoint/<data_name>/train_trainer/adapter_model; "none" for the model alone
    "data_name": "demo_ner",
    "instruct": "",  # default: the instruction of data/<data_name>/instruct_data/train.txt (else the MSRA one)
    "raw": False,  # send typed text as it is, without instruction and 文本： prefix
    "max_length": 2048,
    "do_sample": False,
    "temperature": 0.8,
    "top_p": 0.8,
    "dtype": "auto",
    "device": "auto",
    "decode": "auto",  # auto (compiled CUDA-graph steps on CUDA: the first answer waits for the compilation), plain
}


def training_instruct(data_name):
    """The instruction the adapter was trained with: the first record of the data's train file."""
    train_file = Path("data") / data_name / "instruct_data" / "train.txt"
    if train_file.is_file():
        for _, record in iter_json_lines(train_file):
            return record["instruct"]
    return MSRA_INSTRUCT


def main(config):
    lora_path = config["lora_path"] or str(Path("checkpoint") / config["data_name"] / "train_trainer" / "adapter_model")
    model, tokenizer = load_model_and_tokenizer(config["model_dir"], dtype=config["dtype"], device=config["device"])
    version = model.model_version
    if lora_path.lower() != "none":
        if not (Path(lora_path) / "adapter_config.json").is_file():
            raise SystemExit(f"{lora_path}: no adapter_config.json. Train one first (python train_trainer.py) or pass --lora_path=none.")
        model = PeftModel.from_pretrained(model, lora_path)
    model.eval()
    instruct = "" if config["raw"] else config["instruct"] or training_instruct(config["data_name"])

    def message(text):
        return text if config["raw"] else user_message({"instruct": instruct, "query": QUERY_PREFIX + text})

    example = tokenizer.decode(get_prompt_format(tokenizer, version).prompt_ids(message("<你的句子>"), []))
    interactive = sys.stdin.isatty()
    print(f"{version} + {lora_path}. The prompt of a first turn looks like:\n---\n{example}\n---\n"
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
        shown, response, new_history = "", "", history
        for response, new_history in model.stream_chat(tokenizer, message(text), history, max_length=config["max_length"],
                                                       do_sample=config["do_sample"], temperature=config["temperature"],
                                                       top_p=config["top_p"], decode=config["decode"]):
            # Hold back the last character: ChatGLM-6B's post-processing rewrites punctuation once the next
            # character arrives.
            if response[:-1].startswith(shown):
                print(response[len(shown):-1], end="", flush=True)
                shown = response[:-1]
        print(response[len(shown):] if response.startswith(shown) else "\n" + response, flush=True)
        history = new_history


if __name__ == "__main__":
    main(parse_config(DEFAULTS, description=__doc__))
