"""What the chat scripts (api_server.py, web_demo.py, chat_ner.py; predict.py its generation options) share: options
and their check, a chat turn's prompt within its budgets, the warning for a server open to the network, and the Host /
Origin check. A browser reaches a server on 127.0.0.1 too, for any page it shows: by DNS rebinding (`Host:
evil.example`, now resolving to 127.0.0.1) or by cross-site requests (`Origin: <the page's site>`)."""
import ipaddress
import os
import re
import socket
import sys

import torch
from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from utils import decode_engine
from utils.config_utils import ConfigError
from utils.generation import AnswerReplies
from utils.model_loading import DTYPES
from utils.prompts import fit_prompt, get_prompt_format
from utils.scheduler import Sampling, Scheduler, kv_bytes_per_token

# How predict.py and chat_ner.py choose their model.
RUN_CHOICE_DEFAULTS = {
    "model_dir": "model_hub/chatglm2-small",
    # default: "none" where --model_dir is a run's model folder, else the newest run's checkpoint/<data_name>/*/
    # adapter_model (or prefix_model); "none" for the model alone. The run's train_args.json gives model_dir unless
    # set here (predict.py: data_name and max_input_tokens too).
    "lora_path": "",
    "data_name": "demo_ner",
}
# The options of both servers (web_demo.py, api_server.py) but their port.
SERVER_DEFAULTS = {
    "model_dir": "model_hub/chatglm2-small",
    "lora_path": "none",  # a PEFT adapter folder to put on model_dir; "none": model_dir alone (base, merged, quantized)
    "host": "127.0.0.1",  # 0.0.0.0 serves every network interface (with a warning)
    # Host header names answered besides loopback and the --host address (comma-separated, no port): the names
    # clients use to reach the server, e.g. through a reverse proxy; "*": any
    "allowed_hosts": "",
    "allowed_origins": "",  # web pages (e.g. https://chat.example.com) allowed besides loopback ones; comma-separated
    "max_batch": 16,  # requests answered at once: one decode step serves them all (their KV cache is kept from the start)
    "max_waiting": 8,  # requests that may wait for a place in the batch; more are refused (API: 429)
}
# The options of every script that generates (predict.py, chat_ner.py, web_demo.py, api_server.py): one name, one default.
GENERATION_DEFAULTS = {
    "max_input_tokens": 2048,  # prompt budget: the oldest turns (then the question's start) are left out to fit it
    "max_new_tokens": 512,  # answer budget
    "do_sample": False,  # false: greedy, the same answer every time
    "temperature": 0.8,
    "top_p": 0.8,
    "top_k": 0,  # 0: no top-k cut
    "dtype": "auto",
    "device": "auto",
    "decode": "auto",  # auto (CUDA-graph steps on CUDA, plain on CPU), plain, static, graph, compiled
}


def is_loopback(host):
    """Whether a host name or address (no port, no brackets) is this machine's loopback: localhost, 127.x.x.x, ::1."""
    try:
        return host.lower() == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def authority_host(authority):
    """The host of a Host header or URL authority ("name:port", "[::1]:port"), lowercased, without port or
    brackets; None for anything else (user info, paths...)."""
    match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^\[\]:@/\s]+)(:\d*)?", authority)
    return match and match.group(1).strip("[]").lower()


def comma_list(text):
    """The items of a comma-separated option, lowercased, without a trailing "/" (an origin has none)."""
    return {item.strip().lower().rstrip("/") for item in text.split(",") if item.strip()}


class HostAndOriginCheck:
    """ASGI middleware: 403 for HTTP and WebSocket requests meant for another host or sent by a web page of another
    site than loopback, the --host address, --allowed_hosts and --allowed_origins."""

    def __init__(self, app, config):
        self.app = app
        self.hosts = comma_list(config["allowed_hosts"])
        bound = config["host"].strip("[]").lower()
        if bound not in ("", "0.0.0.0", "::"):  # a specific address: clients may name it
            self.hosts.add(bound)
        self.origins = comma_list(config["allowed_origins"])

    def refusal(self, headers):
        """(code, message) of the refusal, or None for a request to answer."""
        host = authority_host(headers.get("host", ""))
        if "*" not in self.hosts and not (host and (is_loopback(host) or host in self.hosts)):
            return "host_not_allowed", (f"this server does not answer for the host {headers.get('host')!r} (Host "
                                        "header); allow it with --allowed_hosts")
        origin = headers.get("origin")
        if origin is not None and origin.lower().rstrip("/") not in self.origins:
            scheme, _, authority = origin.partition("://")
            page_host = authority_host(authority)
            if scheme.lower() not in ("http", "https") or not page_host or not is_loopback(page_host):
                return "origin_not_allowed", (f"requests from web pages of {origin!r} (Origin header) are not allowed; "
                                              "allow them with --allowed_origins")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            refusal = self.refusal(Headers(scope=scope))
            if refusal and scope["type"] == "http":  # in the API's error shape (the web demo's page never shows it)
                error = {"message": refusal[1], "type": "permission_error", "param": None, "code": refusal[0]}
                await JSONResponse({"error": error}, status_code=403)(scope, receive, send)
                return
            if refusal:
                await send({"type": "websocket.close", "code": 1008, "reason": refusal[1][:120]})  # 1008: policy
                return
        await self.app(scope, receive, send)


def warn_if_open(host, what, remedy):
    """The startup warning of a server bound to a non-loopback address: `what` is open to the network."""
    if not is_loopback(host.strip("[]")):
        print(f"WARNING: --host={host} opens {what} to the network: anyone who can reach this machine can use the "
              f"model. {remedy}", file=sys.stderr, flush=True)


def check_address(host, port):
    """ConfigError unless the server can listen on host:port, found now rather than after the model has loaded."""
    if not host.strip():
        raise ConfigError("--host: empty; use an address such as 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise ConfigError(f"--host: {host!r} is not an address or name of this machine ({err})") from err
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closed port in TIME_WAIT is free
        try:
            probe.bind(address)
        except OSError as err:
            raise ConfigError(f"--host={host} --port={port}: cannot listen there ({err.strerror}); another server may hold "
                              "the port (choose another --port), or the address is not one of this machine's") from err


def check_serving_options(config, at_least_one=(), at_least_zero=()):
    """The chat scripts' shared options and the counts named (at least 1 / 0), checked before the model loads."""
    if "port" in config and not 1 <= config["port"] <= 65535:
        raise ConfigError(f"--port: {config['port']} is not a TCP port; use 1 to 65535")
    if "host" in config:
        check_address(config["host"], config["port"])
    if config["dtype"] not in ("auto", *DTYPES):
        raise ConfigError(f"--dtype: {config['dtype']!r} is not a dtype; use one of auto, {', '.join(DTYPES)}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", config["device"]):
        raise ConfigError(f"--device: {config['device']!r} is not a device; use auto, cpu, cuda or cuda:N")
    if config["decode"] not in decode_engine.MODES:
        raise ConfigError(f"--decode: {config['decode']!r} is not a decoding mode; use one of "
                          f"{', '.join(decode_engine.MODES)}")
    if not 0 <= config["temperature"] <= 2:
        raise ConfigError(f"--temperature: {config['temperature']} is outside 0 to 2")
    if not 0 < config["top_p"] <= 1:
        raise ConfigError(f"--top_p: {config['top_p']} is outside (0, 1]")
    for key in ("max_input_tokens", "max_new_tokens", *at_least_one):
        if config[key] < 1:
            raise ConfigError(f"--{key}: {config[key]}; use 1 or more")
    for key in ("top_k", *at_least_zero):
        if config[key] < 0:
            raise ConfigError(f"--{key}: {config[key]}; use 0 or more")


def model_context(model):
    """The model's position limit (ChatGLM's max_sequence_length, else max_position_embeddings), or None."""
    return getattr(model, "max_sequence_length", None) or getattr(model.config, "max_position_embeddings", None)


def chat_prompt(model, prompt_format, message, history, max_input_tokens, max_new_tokens):
    """(prompt ids of one chat turn within max_input_tokens, its answer budget within the model's context, the notes
    for the user); ids None where no prompt fits (the notes say why)."""
    try:
        prompt_ids, truncated = fit_prompt(prompt_format, message, history, max_input_tokens)
    except ValueError as err:
        return None, 0, [f"cannot build a prompt within max_input_tokens={max_input_tokens}: {err}"]
    notes = [f"the conversation is longer than max_input_tokens={max_input_tokens}: its oldest turns (or the end of "
             "a very long question) were left out of the prompt"] if truncated else []
    context = model_context(model)
    budget = min(int(max_new_tokens), context - len(prompt_ids)) if context else int(max_new_tokens)
    if budget < 1:
        return None, 0, [f"the prompt ({len(prompt_ids)} tokens) fills the model's context of {context} tokens; "
                         "clear the conversation and ask again"]
    return prompt_ids, budget, notes


def free_memory(device):
    """Bytes free on a CUDA device, or in the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_kv_memory(model, max_batch, row_tokens):
    """ConfigError unless the KV cache of max_batch rows of row_tokens tokens fits in 90 % of the free memory."""
    per_row = kv_bytes_per_token(model) * row_tokens
    free = free_memory(model.device)
    fits = int(free * 0.9) // per_row
    if max_batch > fits:
        raise ConfigError(
            f"--max_batch={max_batch}: the KV cache of {max_batch} requests of {row_tokens} tokens (max_input_tokens + "
            f"max_new_tokens) takes {max_batch * per_row / 2**30:.2f} GiB, and {free / 2**30:.2f} GiB is free on "
            f"{model.device}; the largest batch that fits is {fits}"
            + ("" if fits else ": lower --max_input_tokens or --max_new_tokens"))


class BatchedChat:
    """How both servers answer: requests join the model's running batch (utils.scheduler) and their answers come back
    as ChatReplies. `max_new_tokens`: the most any request may ask for (a row holds max_input_tokens + that)."""

    def __init__(self, model, tokenizer, config, max_new_tokens):
        self.model, self.tokenizer = model, tokenizer
        self.prompt_format = get_prompt_format(tokenizer, getattr(model, "model_version", None))
        context = model_context(model)
        row_tokens = config["max_input_tokens"] + max_new_tokens
        row_tokens = min(row_tokens, context) if context else row_tokens
        check_kv_memory(model, config["max_batch"], row_tokens)
        self.scheduler = Scheduler(model, self.prompt_format.stop_token_ids, config["max_batch"], config["max_waiting"],
                                   row_tokens, config["decode"])
        self.scheduler.warm_up(self.prompt_format.prompt_ids("hi", []))

    def start(self, prompt_ids, max_new_tokens, sampling: Sampling, stop_texts=()):
        """(the request in the batch, its ChatReplies as an async generator, read on the server's event loop): closing
        the replies early, or cancelling their reader, cancels the request; a caller that may stop before it reads
        them cancels the request itself. ServerBusy at once if the batch and its line are full."""
        request = self.scheduler.submit(prompt_ids, max_new_tokens, sampling)

        async def replies():
            try:
                answer = AnswerReplies(self.model, self.tokenizer, len(prompt_ids), max_new_tokens, stop_texts)
                async for ids in request.new_ids_async():
                    if reply := answer.reply(ids):
                        yield reply
                        if reply.finish_reason:
                            return
            finally:
                request.cancel()  # a reader that stops early (its client gone, a stop text) frees the row at the next token

        return request, replies()
