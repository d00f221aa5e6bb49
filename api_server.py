"""An OpenAI-compatible HTTP API for a ChatGLM model: a base + LoRA adapter, or a merged (and quantized) folder.

    python api_server.py --model_dir=model_hub/chatglm2-6b --lora_path=checkpoint/msra/train_trainer/adapter_model
    python api_server.py --model_dir=model_hub/chatglm2-6b-msra-int4 --port=8000 --api_key=env:CHATGLM_API_KEY

Routes: GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions ("stream": true: server-sent events, closed
by `data: [DONE]`), for any OpenAI client (base_url="http://127.0.0.1:8000/v1"). Messages: optional system messages
(ChatGLM3's system turn; for ChatGLM-6B/2 they open the first user message), then user and assistant turns in
alternation, ending with a user turn. Requests are answered together (up to --max_batch at once, one decode step
for all; README "Serve"); the Host / Origin checks and the rest: README "Serve" too.
"""
import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from utils.adapters import load_run, uses_adapter
from utils.config_utils import ConfigError, parse_config
from utils.generation import StableText
from utils.scheduler import Sampling, ServerBusy
from utils.serving import (GENERATION_DEFAULTS, SERVER_DEFAULTS, BatchedChat, HostAndOriginCheck, check_serving_options,
                           model_context, warn_if_open)

DEFAULTS = {
    **SERVER_DEFAULTS,  # set an --api_key with --host=0.0.0.0
    "model_name": "",  # the id clients send as "model"; default: the folder name of model_dir
    "port": 8000,
    "api_key": "",  # require "Authorization: Bearer <key>"; "env:NAME" reads the key from environment variable NAME
    # max_input_tokens: longer prompts (all messages) are refused with 400 context_length_exceeded; max_new_tokens:
    # the largest max_tokens a request may ask for, and the default; the sampling options: for requests without them
    **GENERATION_DEFAULTS,
    "max_request_bytes": 1_000_000,  # larger request bodies are refused with 413
    "log_level": "info",
}


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's
logger = logging.getLogger("api_server")


class ApiError(Exception):  # an answer in the OpenAI error shape

    def __init__(self, status, message, code=None, param=None, error_type="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.error_type = status, message, code, param, error_type

    def body(self):
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


# ---- the request, as OpenAI documents it (the fields this server can honour; the rest are refused by name) ----

class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self):
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    messages: list[Message]
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-2**63, lt=2**63)  # 64-bit, as OpenAI documents it
    n: Literal[1] | None = None  # one answer per request
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None  # up to 4 texts that end the answer (not shown)
    frequency_penalty: float | None = None  # accepted only as 0
    presence_penalty: float | None = None  # accepted only as 0
    user: str | None = None  # ignored


def check_unsupported(request: ChatRequest):
    if any(not text for text in stop_texts(request)):
        raise ApiError(400, "'stop': an empty text would end every answer at once; leave it out", "invalid_value", "stop")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(request, name):
            raise ApiError(400, f"'{name}' is not supported by this server; leave it out or send 0", "unsupported_parameter", name)


def validation_error(err: ValidationError):
    errors = err.errors()
    first = max(errors, key=lambda e: len(e["loc"]))  # the deepest: for a union, the member that fits the input best
    # loc names fields and list indices, and for a union also the member type tried ("str", "list[TextPart]"): left out
    fields = {name for model in (ChatRequest, Message, TextPart, StreamOptions) for name in model.model_fields}
    unknown = list(first["loc"][-1:]) if first["type"] == "extra_forbidden" else []  # the unknown name itself ends loc
    loc = [part for part in first["loc"][:len(first["loc"]) - len(unknown)] if isinstance(part, int) or part in fields]
    param = ".".join(str(part) for part in loc + unknown) or None
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"unrecognized request argument supplied: {param}", "unsupported_parameter", param)
    if first["type"] == "missing":
        return ApiError(400, f"missing required parameter: '{param}'", "missing_required_parameter", param)
    given = f" (got {json.dumps(first.get('input'), ensure_ascii=False)[:80]})" if "input" in first else ""
    return ApiError(400, f"invalid value for '{param}': {first['msg']}{given}", "invalid_value", param)


def busy(err: ServerBusy):
    return ApiError(429, str(err), "server_busy", error_type="rate_limit_error")


def stop_texts(request: ChatRequest):
    return [request.stop] if isinstance(request.stop, str) else list(request.stop or [])


def split_messages(messages):
    """(system text, [[user, assistant], ...] history, last user message)."""
    if not messages:
        raise ApiError(400, "'messages' is empty: send at least one user message", "invalid_value", "messages")
    system, index = [], 0
    while index < len(messages) and messages[index].role in ("system", "developer"):
        system.append(messages[index].text())
        index += 1
    turns = messages[index:]
    for offset, message in enumerate(turns):
        expected = "user" if offset % 2 == 0 else "assistant"
        if message.role != expected:
            where = f"messages.{index + offset}.role"
            if message.role in ("system", "developer"):
                raise ApiError(400, f"'{where}': system messages must come before the conversation", "invalid_value", where)
            raise ApiError(400, f"'{where}' is {message.role!r} but {expected!r} was expected: after the system messages, "
                                "user and assistant messages alternate, starting with user", "invalid_value", where)
    if not turns or turns[-1].role != "user":
        raise ApiError(400, "the last message must be a user message (the one to answer)", "invalid_value", "messages")
    history = [[turns[i].text(), turns[i + 1].text()] for i in range(0, len(turns) - 1, 2)]
    return "\n".join(system), history, turns[-1].text()


async def client_left(request: Request):
    """Returns once the client has disconnected (after the body is read: receive() has nothing else to report)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def read_api_key(setting):
    """The key of --api_key: the text, or for "env:NAME" that (set) variable; visible ASCII, as headers carry."""
    if setting.startswith("env:"):
        name = setting[4:]
        if not os.environ.get(name):
            raise ConfigError(f"--api_key={setting}: the environment variable {name} is not set or empty")
        key, where = os.environ[name], f"the environment variable {name}"
    else:
        key, where = setting, "the key"
    wrong = next((char for char in key if not "!" <= char <= "~"), None)
    if wrong is not None:
        raise ConfigError(f"--api_key: {where} holds {wrong!r}; a key may only have visible ASCII characters "
                          "(letters, digits, punctuation; no spaces), the characters an Authorization header carries")
    return key


def served_name(config):
    """The id clients send as "model": --model_name, else the folder name of --model_dir."""
    return config["model_name"] or Path(config["model_dir"]).name


def sse(payload):
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def read_json_body(request: Request, max_bytes):
    """The request's JSON body, read up to max_bytes: ApiError for anything else."""
    # A web page may POST text/plain to any site without asking (no CORS preflight); JSON it may not.
    if request.headers.get("content-type", "").partition(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "send the request body as JSON, with the header 'Content-Type: application/json'",
                       "unsupported_media_type")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise ApiError(413, f"the request body is larger than {max_bytes} bytes", "request_too_large")
    try:
        payload = json.loads(body)
        # An escape of half a UTF-16 pair ("\ud800") decodes to a string that no tokenizer or answer can encode.
        json.dumps(payload, ensure_ascii=False).encode()
    except UnicodeEncodeError as err:
        raise ApiError(400, "the request body has a lone surrogate escape (\\ud800-\\udfff without its pair): "
                            "not a character", "invalid_json") from err
    except (ValueError, RecursionError) as err:  # ValueError: bad JSON or UTF-8, an integer of > 4300 digits
        reason = "nested too deeply" if isinstance(err, RecursionError) else err
        raise ApiError(400, f"the request body is not valid JSON: {reason}", "invalid_json") from err
    return payload


def parse_chat_request(payload) -> ChatRequest:
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_json")
    try:
        chat = ChatRequest.model_validate(payload)
    except ValidationError as err:
        raise validation_error(err) from err
    check_unsupported(chat)
    return chat


async def collect(replies):
    return [reply async for reply in replies]


def log_answer(job, running):
    """One line per answer (INFO): its latency as the server sees it, whatever its text (benchmarks/serve_load.py
    reads the first-token time from here: a client sees only text, which may start later than the first token)."""
    if running.first_token_after is not None:
        logger.info("%s: %d prompt tokens, %d new; first token after %.3f s, done after %.3f s", job["id"],
                    len(job["prompt_ids"]), len(running.ids), running.first_token_after,
                    time.perf_counter() - running.submitted)


def usage(reply):
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


async def api_error(request, error: ApiError):
    return JSONResponse(error.body(), status_code=error.status)


async def http_error(request, error):
    codes = {404: "not_found", 405: "method_not_allowed"}
    return await api_error(request, ApiError(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                                             codes.get(error.status_code)))


async def server_error(request, error):
    return await api_error(request, ApiError(500, f"internal error: {type(error).__name__}: {error}",
                                             error_type="server_error"))


class ChatApi:
    """The routes of one loaded model (config: DEFAULTS with the command line applied)."""

    def __init__(self, model, tokenizer, config):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.model_name, self.api_key = served_name(config), read_api_key(config["api_key"])
        self.chat = BatchedChat(model, tokenizer, config, config["max_new_tokens"])
        self.prompt_format, self.context = self.chat.prompt_format, model_context(model)
        self.created = int(time.time())

    async def check_key(self, request: Request):
        if not self.api_key:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           "invalid_api_key")

    async def list_models(self):
        return {"object": "list", "data": [await self.get_model(self.model_name)]}

    async def get_model(self, name: str):
        if name != self.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           "model_not_found", "model")
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "local"}

    def generation_job(self, chat: ChatRequest):
        """What to generate for a valid request: its prompt ids, budget, sampling and stop texts, and the answer's id."""
        system, history, message = split_messages(chat.messages)
        prompt_ids, limits = self.prompt_format.prompt_ids(message, history, system), self.config
        if len(prompt_ids) > limits["max_input_tokens"]:
            raise ApiError(400, f"the messages take {len(prompt_ids)} tokens; this server accepts at most "
                                f"{limits['max_input_tokens']}. Shorten the messages or leave out old turns.",
                           "context_length_exceeded", "messages")
        max_tokens = chat.max_completion_tokens or chat.max_tokens or limits["max_new_tokens"]
        if max_tokens > limits["max_new_tokens"]:
            param = "max_completion_tokens" if chat.max_completion_tokens else "max_tokens"
            raise ApiError(400, f"'{param}' is {max_tokens}; this server allows at most {limits['max_new_tokens']}",
                           "invalid_value", param)
        if self.context and len(prompt_ids) + max_tokens > self.context:
            raise ApiError(400, f"{len(prompt_ids)} prompt tokens + max_tokens {max_tokens} exceed the model's "
                                f"context of {self.context} tokens; ask for fewer tokens", "context_length_exceeded",
                           "max_tokens")
        temperature = limits["temperature"] if chat.temperature is None else chat.temperature
        do_sample = limits["do_sample"] if chat.temperature is None else temperature > 0
        sampling = Sampling(do_sample=do_sample and temperature > 0, temperature=temperature or 1.0,
                            top_p=limits["top_p"] if chat.top_p is None else chat.top_p, top_k=limits["top_k"],
                            seed=chat.seed)
        return {"prompt_ids": prompt_ids, "max_tokens": max_tokens, "sampling": sampling, "stop": stop_texts(chat),
                "created": int(time.time()), "id": f"chatcmpl-{uuid.uuid4().hex}",
                "usage": bool(chat.stream_options and chat.stream_options.include_usage)}

    def start(self, job):
        """(the request in the running batch, its ChatReplies); ApiError 429 if the batch and its line are full."""
        try:
            return self.chat.start(job["prompt_ids"], job["max_tokens"], job["sampling"], job["stop"])
        except ServerBusy as err:
            raise busy(err) from err

    def answer(self, job, kind, choice, **extra):
        return {"id": job["id"], "object": kind, "created": job["created"], "model": self.model_name,
                "choices": [{"index": 0, **choice}] if choice else [], **extra}

    async def complete(self, request: Request, job):
        running, replies = self.start(job)
        answer = asyncio.ensure_future(collect(replies))
        left = asyncio.ensure_future(client_left(request))
        await asyncio.wait((answer, left), return_when=asyncio.FIRST_COMPLETED)
        left.cancel()
        if not answer.done():  # the client went away: its row is freed at the next token
            running.cancel()  # also where the replies were never read
            answer.cancel()
            await asyncio.wait((answer,))
            raise ApiError(499, "the client closed the connection before the answer was ready", "client_closed_request")
        reply = answer.result()[-1]
        log_answer(job, running)
        message = {"role": "assistant", "content": reply.text}
        return self.answer(job, "chat.completion", {"message": message, "finish_reason": reply.finish_reason},
                           usage=usage(reply))

    def delta(self, job, delta, finish_reason=None):
        return sse(self.answer(job, "chat.completion.chunk", {"delta": delta, "finish_reason": finish_reason}))

    def reply_events(self, job, stable, reply):
        """The events of one step of the answer: its new text, and at the end its finish reason (and usage)."""
        piece = stable.update(reply.text, final=reply.finish_reason is not None)
        if piece:
            yield self.delta(job, {"content": piece})
        if reply.finish_reason:
            yield self.delta(job, {}, reply.finish_reason)
        if reply.finish_reason and job["usage"]:
            yield sse(self.answer(job, "chat.completion.chunk", None, usage=usage(reply)))

    async def events(self, job):
        try:
            running, replies = self.start(job)
        except ApiError as err:  # grew busy since the check before the stream started
            yield sse(err.body())
            return
        stable = StableText()
        try:
            yield self.delta(job, {"role": "assistant", "content": ""})
            async for reply in replies:
                for event in self.reply_events(job, stable, reply):
                    yield event
        except Exception as err:  # headers are out: report it as an event in the error shape
            yield sse(ApiError(500, f"generation failed: {type(err).__name__}: {err}", error_type="server_error").body())
        finally:  # a client gone, even before the first reply: the request's row is free at the next token
            await replies.aclose()
            running.cancel()
            log_answer(job, running)
        yield "data: [DONE]\n\n"

    async def chat_completions(self, request: Request):
        chat = parse_chat_request(await read_json_body(request, self.config["max_request_bytes"]))
        await self.get_model(chat.model)
        job = self.generation_job(chat)
        if not chat.stream:
            return await self.complete(request, job)
        try:  # refuse before the stream starts: a 429 answer rather than an error event
            self.chat.scheduler.check_room()
        except ServerBusy as err:
            raise busy(err) from err
        return StreamingResponse(self.events(job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})


def create_app(model, tokenizer, config) -> FastAPI:
    """The API of one loaded model (config: DEFAULTS with the command line applied)."""
    api = ChatApi(model, tokenizer, config)
    app = FastAPI(title="ChatGLM OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(HostAndOriginCheck, config=config)
    app.state.scheduler = api.chat.scheduler
    for error, handler in ((ApiError, api_error), (StarletteHTTPException, http_error), (Exception, server_error)):
        app.add_exception_handler(error, handler)
    guarded = [Depends(api.check_key)]
    app.get("/v1/models", dependencies=guarded)(api.list_models)
    app.get("/v1/models/{name:path}", dependencies=guarded)(api.get_model)
    app.post("/v1/chat/completions", dependencies=guarded)(api.chat_completions)
    return app


def main(config):
    import uvicorn

    check_serving_options(config, at_least_one=("max_request_bytes", "max_batch"), at_least_zero=("max_waiting",))
    if config["log_level"] not in LOG_LEVELS:
        raise ConfigError(f"--log_level: {config['log_level']!r}; use one of {', '.join(LOG_LEVELS)}")
    if not read_api_key(config["api_key"]):  # a missing variable is reported before minutes of loading
        warn_if_open(config["host"], "the API without an API key", "Set --api_key (e.g. --api_key=env:CHATGLM_API_KEY).")
    model, tokenizer = load_run(config)  # an adapter brings its run's base unless --model_dir is given
    app = create_app(model, tokenizer, config)
    adapter = f" + {config['lora_path']}" if uses_adapter(config["lora_path"]) else ""
    print(f"serving {config['model_dir']}{adapter} as model {served_name(config)!r}"
          + (", API key required" if config["api_key"] else ""), flush=True)
    handler = logging.StreamHandler()  # our lines beside uvicorn's, at the same level, in its format
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(5 if config["log_level"] == "trace" else config["log_level"].upper())
    uvicorn.run(app, host=config["host"], port=config["port"], log_level=config["log_level"])


if __name__ == "__main__":
    main(parse_config(DEFAULTS, description=__doc__))
