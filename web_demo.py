"""A chat in the browser (Gradio) with a ChatGLM model: a base + LoRA adapter, or a merged (and quantized) folder.

    python web_demo.py --model_dir=model_hub/chatglm2-6b --lora_path=checkpoint/msra/train_trainer/adapter_model
    python web_demo.py --model_dir=model_hub/chatglm2-6b-msra-int4 --port=7860

then open http://127.0.0.1:7860. The conversation so far is the next question's history (its oldest turns left out
past --max_input_tokens). Several tabs chat at once: up to --max_batch answers are generated together (one decode step
for all, the servers' shared path), more questions wait in Gradio's queue (at most --max_waiting). Binds 127.0.0.1
unless --host says otherwise; like api_server.py, it answers 403 to other hosts and web pages (--allowed_hosts,
--allowed_origins).
"""
from pathlib import Path

from utils.adapters import load_run, uses_adapter
from utils.config_utils import ConfigError, parse_config
from utils.prompts import chat_messages  # chat_messages(turns): the chatbot's value
from utils.scheduler import Sampling
from utils.serving import (GENERATION_DEFAULTS, SERVER_DEFAULTS, BatchedChat, HostAndOriginCheck, chat_prompt,
                           check_serving_options, warn_if_open)

DEFAULTS = {
    **SERVER_DEFAULTS,  # the page has no password: --host=0.0.0.0 opens it to the network
    "port": 7860,
    **GENERATION_DEFAULTS,  # max_new_tokens and the sampling options: the start values of the page's controls
    "max_new_tokens_limit": 4096,  # the slider's maximum
}


class WebChat:
    """The page's actions on one model. History is a list of [user, assistant] turns (the page keeps it in a State)."""

    def __init__(self, model, tokenizer, config=None, warn=print):
        config = {**DEFAULTS, **(config or {})}
        self.model, self.warn, self.top_k, self.max_input_tokens = model, warn, config["top_k"], config["max_input_tokens"]
        self.chat = BatchedChat(model, tokenizer, config, config["max_new_tokens_limit"])
        self.prompt_format = self.chat.prompt_format

    async def answer(self, message, history, max_new_tokens, top_p, temperature, do_sample):
        """Yields (chatbot value, history) as the answer grows; the history holds the partial turn, so that an answer
        stopped early stays in the conversation. Async generators, as the page's actions: Gradio runs them on its event
        loop, where the answer's tokens arrive (no thread per tab)."""
        history = [list(turn) for turn in history or []]
        yield chat_messages(history + [[message, ""]]), history + [[message, ""]]
        prompt_ids, budget, notes = chat_prompt(self.model, self.prompt_format, message, history,
                                                self.max_input_tokens, max_new_tokens)
        for note in notes:
            self.warn(note)
        if prompt_ids is None:
            yield chat_messages(history), history
            return
        sampling = Sampling(do_sample=bool(do_sample), temperature=float(temperature), top_p=float(top_p), top_k=self.top_k)
        request, replies = self.chat.start(prompt_ids, budget, sampling)
        try:
            async for reply in replies:
                turns = history + [[message, reply.text]]
                yield chat_messages(turns), turns
        finally:  # Stop, Clear or a closed tab: the answer's place in the batch is free at the next token
            await replies.aclose()
            request.cancel()

    async def submit(self, message, history, *sampling):
        """Send: yields (chatbot value, history, text box value)."""
        if not message or not message.strip():
            yield chat_messages(history or []), history or [], ""
            return
        async for chat, turns in self.answer(message, history, *sampling):
            yield chat, turns, ""

    async def regenerate(self, history, *sampling):
        """Answer the last question again: yields (chatbot value, history)."""
        if not history:
            yield [], []
            return
        *earlier, (question, _) = history
        async for chat, turns in self.answer(question, earlier, *sampling):
            yield chat, turns


def build_demo(web_chat: WebChat, config, title):
    import gradio as gr

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"### {title}")
        chatbot = gr.Chatbot(label="Chat", elem_id="chat", height=480, buttons=["copy"])
        history = gr.State([])
        with gr.Row():
            question = gr.Textbox(show_label=False, placeholder="Type a question, Enter sends it", elem_id="question", scale=6)
            send = gr.Button("Send", variant="primary", elem_id="send", scale=1)
        with gr.Row():
            regenerate = gr.Button("Regenerate", elem_id="regenerate")
            stop = gr.Button("Stop", variant="stop", elem_id="stop")
            clear = gr.Button("Clear", elem_id="clear")
        with gr.Accordion("Generation", open=False):
            max_new_tokens = gr.Slider(1, config["max_new_tokens_limit"], value=config["max_new_tokens"], step=1,
                                       label="Max new tokens", elem_id="max_new_tokens")
            top_p = gr.Slider(0.01, 1.0, value=config["top_p"], step=0.01, label="Top p", elem_id="top_p")
            temperature = gr.Slider(0.0, 2.0, value=config["temperature"], step=0.01, label="Temperature (0: greedy)",
                                    elem_id="temperature")
            do_sample = gr.Checkbox(value=config["do_sample"], label="Sample (off: greedy, the same answer every time)",
                                    elem_id="do_sample")
        sampling = [max_new_tokens, top_p, temperature, do_sample]
        # One concurrency group for every event that generates: at most max_batch answers at once (the batch's rows).
        common = dict(concurrency_limit=config["max_batch"], concurrency_id="generate", show_progress="hidden")
        answering = [
            question.submit(web_chat.submit, [question, history, *sampling], [chatbot, history, question], **common),
            send.click(web_chat.submit, [question, history, *sampling], [chatbot, history, question], **common),
            regenerate.click(web_chat.regenerate, [history, *sampling], [chatbot, history], **common),
        ]
        stop.click(None, cancels=answering)
        clear.click(lambda: ([], [], ""), None, [chatbot, history, question], cancels=answering)
        chatbot.clear(list, None, history, cancels=answering)  # the chat's own trash button
    return demo


def main(config):
    check_serving_options(config, at_least_one=("max_new_tokens_limit", "max_batch"), at_least_zero=("max_waiting",))
    if config["max_new_tokens"] > config["max_new_tokens_limit"]:
        raise ConfigError(f"--max_new_tokens: {config['max_new_tokens']} is above --max_new_tokens_limit="
                          f"{config['max_new_tokens_limit']} (the slider's maximum); raise the limit or ask for fewer")
    warn_if_open(config["host"], "the chat page", "It has no password; serve it on 127.0.0.1 (the default) unless "
                 "everyone on the network may use it.")
    model, tokenizer = load_run(config)  # an adapter brings its run's base unless --model_dir is given
    import gradio as gr
    from starlette.middleware import Middleware

    name = Path(config["model_dir"]).name
    title = ((name if name == model.model_version else f"{name} ({model.model_version})")
             + (f" + {config['lora_path']}" if uses_adapter(config["lora_path"]) else ""))
    web_chat = WebChat(model, tokenizer, config, warn=gr.Warning)
    demo = build_demo(web_chat, config, title)
    demo.queue(default_concurrency_limit=1, max_size=config["max_waiting"])
    # Gradio builds its FastAPI app inside launch(); app_kwargs reach that app's constructor, middleware included.
    demo.launch(server_name=config["host"], server_port=config["port"], show_error=True, footer_links=[],
                app_kwargs={"middleware": [Middleware(HostAndOriginCheck, config=config)]})


if __name__ == "__main__":
    main(parse_config(DEFAULTS, description=__doc__))
