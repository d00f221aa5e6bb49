"""Chat data sets -> records: ADGEN and Alpaca -> instruction records; ShareGPT, OpenAI and ChatGLM3 conversations ->
instruction records with `history`, or ChatGLM3 conversation records (README "Multi-turn conversations and tool
calls"; the order they keep: expected_roles). Readers take `(path, bad_lines)` and yield `(line, record)`.
"""
import ast
import json
import keyword
import re

from utils.data_io import (
    DataError, check_surrogates, excerpt, json_reader, json_shape, parse_json, require_key, require_str, require_type,
)

ADGEN_INSTRUCT = "请根据下面给出的商品属性，为这件商品写一段吸引人的广告文案。"
ADGEN_RE = re.compile(r"^[^#*]+#[^*]+(\*[^#*]+#[^*]+)*$")
ROLES = ("system", "user", "assistant", "observation")
# The role names of ShareGPT and OpenAI data -> ChatGLM3's. A ShareGPT function_call is an assistant's tool call.
SOURCE_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "function_call": "assistant", "observation": "observation", "tool": "observation"}
# OpenAI's roles: developer is the newer name of system; tool (and the older function) return a tool's result.
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                "tool": "observation", "function": "observation"}
# The system message that ChatGLM3's own tool demos put before the tools; used when the data has none of its own.
TOOL_SYSTEM_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"


def json_field(text, path, line, field):
    """A JSON value given as text in a record (a function_call, arguments, tools), checked for lone surrogates: an
    escape in the embedded text decodes to one only here."""
    try:
        value = parse_json(text, path, line)
    except DataError as err:
        raise DataError(path, line, err.problem, field, "not valid JSON") from None
    if "\\u" in text:
        check_surrogates(value, path, line, field)
    return value


def tool_call_content(arguments, path, line, field) -> str:
    """ChatGLM3's tool-call content: `tool_call(k=v, ...)` of Python literals, which its chat() reads back as is."""
    parts = []
    for name, value in arguments.items():
        if not name.isidentifier() or keyword.iskeyword(name):
            raise DataError(path, line, f"the argument name {excerpt(name)} is not a Python identifier, which "
                            "tool_call(name=value) needs", field, "argument name is not a Python identifier")
        literal = repr(value)
        try:
            readable = ast.literal_eval(literal) == value
        except (ValueError, SyntaxError):
            readable = False
        if not readable:  # NaN or an infinity, which JSON parsers let through
            raise DataError(path, line, f"the value of {name!r} is {excerpt(literal)}, which is no Python literal",
                            field, "argument value is no Python literal")
        parts.append(f"{name}={literal}")
    return "```python\ntool_call(" + ", ".join(parts) + ")\n```"


def role_line_text(record, key, what, path, line, field):
    """record[key], a string that ChatGLM3 writes on the role line (a tool's name, the metadata): no line break."""
    text = require_str(record, key, path, line, prefix=field)
    if "\n" in text:
        raise DataError(path, line, f"a line break in the {what} (ChatGLM3 puts it on the role line)", f"{field}.{key}")
    return text


def tool_call_message(call, path, line, field):
    """The assistant message of one tool call {"name", "arguments"} (arguments an object, or its JSON text)."""
    name = role_line_text(require_type(call, dict, path, line, field), "name", "tool name", path, line, field)
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        arguments = json_field(arguments, path, line, f"{field}.arguments") if arguments.strip() else {}
    require_type(arguments, dict, path, line, f"{field}.arguments")
    return {"role": "assistant", "metadata": name, "content": tool_call_content(arguments, path, line, f"{field}.arguments")}


def one_call(calls, path, line, field):
    """The single tool call of a list; ChatGLM3 makes one call and waits for its observation before the next."""
    if not calls:
        raise DataError(path, line, "an empty list of tool calls", field)
    if len(calls) > 1:
        raise DataError(path, line, f"{len(calls)} tool calls in one message: ChatGLM3 calls one tool at a time",
                        field, "parallel tool calls")
    return calls[0]


def read_tools(value, path, line, field, as_given=False):
    """The tools as ChatGLM3 lists them: function descriptions (OpenAI's wrapper taken off), or the array as_given."""
    if isinstance(value, str) and not as_given:
        value = json_field(value, path, line, field) if value.strip() else []
    require_type(value, list, path, line, field)
    if as_given:
        return value
    tools = [require_type(tool, dict, path, line, f"{field}[{k}]") for k, tool in enumerate(value)]
    return [tool["function"] if tool.get("type") == "function" and isinstance(tool.get("function"), dict) else tool
            for tool in tools]


def openai_content(turn, name, role, path, line, field):
    """The text of an OpenAI message's `content`: a string, or an array of parts whose texts are joined as api_server.py
    joins them (text parts; an assistant's refusal parts too). `null` is content only beside a tool call."""
    if "content" not in turn:
        raise DataError(path, line, "missing", f"{field}.content")
    value = turn["content"]
    if isinstance(value, str):
        return value
    if value is None:
        article = "an" if name[:1] in "aeiou" else "a"
        raise DataError(path, line, f"null; {article} {name} message needs content (a string or an array of text "
                        "parts)", f"{field}.content", "null content")
    if not isinstance(value, list):
        raise DataError(path, line, f"expected a string or an array of content parts, got {json_shape(value)}",
                        f"{field}.content")
    texts = []
    for k, part in enumerate(value):
        require_type(part, dict, path, line, f"{field}.content[{k}]")
        kind = part.get("type")
        key = kind if kind == "text" or (kind == "refusal" and role == "assistant") else None
        if key is None:
            allowed = "text or refusal" if role == "assistant" else "text"
            raise DataError(path, line, f"a content part of type {excerpt(str(kind))}; ChatGLM reads {allowed} parts "
                            "only", f"{field}.content[{k}].type", "a content part that is not text")
        texts.append(require_str(part, key, path, line, allow_empty=True, prefix=f"{field}.content[{k}]"))
    return "".join(texts)


def finetune_tool_messages(turn, path, line, field):
    """finetune_demo's tool message {"role": "tool", "name", "parameters", "observation", "loss"?} expanded as its
    preprocessing does: the tool call (learnt unless "loss" is false), then the observation (non-strings as JSON)."""
    for key in ("content", "metadata", "tool_calls"):
        if key in turn:
            raise DataError(path, line, f"a ChatGLM3 tool message has name, parameters and observation, not {key} (an "
                            "OpenAI tool result goes in a 'messages' record)", f"{field}.{key}",
                            "a ChatGLM3 tool message has name, parameters and observation")
    name = role_line_text(turn, "name", "tool name", path, line, field)
    for key in ("parameters", "observation"):
        if key not in turn:
            raise DataError(path, line, "missing", f"{field}.{key}")
    parameters = require_type(turn["parameters"], dict, path, line, f"{field}.parameters")
    call = {"role": "assistant", "metadata": name,
            "content": tool_call_content(parameters, path, line, f"{field}.parameters")}
    if learnt_flag(turn, "assistant", path, line, field) is False:
        call["loss"] = False
    observation = turn["observation"]
    text = observation if isinstance(observation, str) else json.dumps(observation, ensure_ascii=False)
    return [call, {"role": "observation", "content": text}]


def learnt_flag(turn, role, path, line, field):
    """A message's "loss" (None when absent); only assistant messages may be learnt."""
    if "loss" not in turn:
        return None
    if not isinstance(turn["loss"], bool):
        raise DataError(path, line, f"expected true or false, got {json_shape(turn['loss'])}", f"{field}.loss")
    if turn["loss"] and role != "assistant":
        raise DataError(path, line, "only assistant messages are learnt", f"{field}.loss")
    return turn["loss"]


def requested_call(turn, name, role, text_key, path, line, field):
    """(the message's tool call {"name", "arguments"}, its field) or (None, None); an error on a non-assistant."""
    if name == "function_call":  # ShareGPT: the value is the call as JSON
        value = require_str(turn, text_key, path, line, prefix=field)
        call = json_field(value, path, line, f"{field}.{text_key}")
        if isinstance(call, list):
            call = one_call(call, path, line, f"{field}.{text_key}")
        return call, f"{field}.{text_key}"
    # OpenAI's tool_calls, and its older single function_call
    given = [key for key in ("tool_calls", "function_call") if turn.get(key)]
    if not given:
        return None, None
    if role != "assistant":
        raise DataError(path, line, f"a {name} message with {given[0]}: only assistant messages call tools",
                        f"{field}.{given[0]}", f"{given[0]} on a message that is not an assistant's")
    if len(given) == 2:
        raise DataError(path, line, "both tool_calls and function_call: give the call once", f"{field}.function_call")
    if given[0] == "function_call":
        return turn["function_call"], f"{field}.function_call"
    calls = require_type(turn["tool_calls"], list, path, line, f"{field}.tool_calls")
    call = require_type(one_call(calls, path, line, f"{field}.tool_calls"), dict, path, line, f"{field}.tool_calls[0]")
    if "function" not in call:
        raise DataError(path, line, "missing", f"{field}.tool_calls[0].function")
    return call["function"], f"{field}.tool_calls[0].function"


def turn_messages(turn, name, role, text_key, style, path, line, field):
    """The ChatGLM3 messages of one input message: two for one that says something and calls a tool, or for a
    finetune_demo tool message (the call and its observation)."""
    if style == "chatglm3" and name == "tool":
        return finetune_tool_messages(turn, path, line, field)
    call, call_field = requested_call(turn, name, role, text_key, path, line, field)
    if call is not None:
        said = turn.get(text_key)
        if style == "openai" and said is not None:
            said = openai_content(turn, name, role, path, line, field)
        elif name == "function_call" or said is None:
            said = ""
        else:
            said = require_str(turn, text_key, path, line, allow_empty=True, prefix=field)
        messages = [{"role": "assistant", "content": said}] if said.strip() else []  # what it says before calling
        return messages + [tool_call_message(call, path, line, call_field)]
    if style == "openai":
        content = openai_content(turn, name, role, path, line, field)
        if role != "observation" and not content.strip():
            raise DataError(path, line, "empty", f"{field}.content")
    elif role == "observation" and text_key in turn and not isinstance(turn[text_key], str):
        # A tool's result given as JSON data rather than text: ChatGLM3 reads it as JSON text.
        if turn[text_key] is None:
            raise DataError(path, line, "null; give the tool's result as text or JSON data", f"{field}.{text_key}",
                            "null content")
        content = json.dumps(turn[text_key], ensure_ascii=False)
    else:
        content = require_str(turn, text_key, path, line, allow_empty=role == "observation", prefix=field)
    message = {"role": role, "content": content}
    if turn.get("metadata"):
        metadata = role_line_text(turn, "metadata", "metadata", path, line, field)
        if role != "assistant":
            raise DataError(path, line, "only assistant messages have metadata (a tool's name)", f"{field}.metadata")
        message["metadata"] = metadata
    if learnt_flag(turn, role, path, line, field) is False and role == "assistant":
        message["loss"] = False
    if turn.get("tools") is not None:
        if role != "system":
            raise DataError(path, line, "only the system message has tools", f"{field}.tools")
        message["tools"] = read_tools(turn["tools"], path, line, f"{field}.tools", as_given=style == "chatglm3")
    return [message]


def expected_roles(previous, index):
    """(roles that may follow `previous`, the message at `index` - 1, where that is) in a ChatGLM3 conversation."""
    if previous is None:
        return ("system", "user"), "first"
    if previous["role"] == "system":
        if index == 1 and "tools" in previous:  # the finetune_demo's tool prompt, then the data's own system message
            return ("system", "user"), "after the tools' system message"
        return ("user",), "after the system message"
    if previous["role"] in ("user", "observation"):
        return ("assistant",), f"after {'a user message' if previous['role'] == 'user' else 'an observation'}"
    if previous.get("metadata"):
        return ("observation",), "after a tool call"
    return ("user", "assistant"), "after an assistant message"


def check_order(messages, places, key, path, line):
    """The ChatGLM3 order (expected_roles) and a learnt end; `places`: (field, role as the input names it) of each."""
    previous = None
    for index, (message, (field, name)) in enumerate(zip(messages, places)):
        expected, where = expected_roles(previous, index)
        if message["role"] not in expected:
            shown = excerpt(name) + ("" if name == message["role"] else f" (ChatGLM3's {message['role']})")
            raise DataError(path, line, f"expected one of {list(expected)} {where}, got {shown}", field,
                            f"expected one of {list(expected)} {where}")
        previous = message
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(path, line, f"{len(messages)} messages, the last {messages[-1]['role'] if messages else 'none'}; "
                        "a conversation ends with an assistant message", key, "a conversation ends with an assistant message")
    if all(message.get("loss") is False for message in messages if message["role"] == "assistant"):
        raise DataError(path, line, 'every assistant message has "loss": false, so nothing is learnt', key)


def record_style(record, path, line, chatglm3_only):
    """(key, style: 'openai', 'sharegpt' or 'chatglm3', turns); a mixed record is an error, not a guess."""
    require_type(record, dict, path, line, None)
    if "conversations" in record and "messages" in record:
        raise DataError(path, line, "both conversations and messages: a record holds one conversation; keep one",
                        "messages", "both conversations and messages")
    key = "messages" if "messages" in record and not chatglm3_only else "conversations"
    turns = require_key(record, key, list, path, line)
    style = None
    for k, turn in enumerate(turns):
        field = f"{key}[{k}]"
        require_type(turn, dict, path, line, field)
        for sharegpt, other in (("from", "role"), ("value", "content")):
            if sharegpt in turn and other in turn:
                raise DataError(path, line, f"both {sharegpt!r} (ShareGPT) and {other!r}: a message is in one format; "
                                "keep one", field, f"both {sharegpt!r} and {other!r}")
        if key == "messages":
            if "from" in turn or "value" in turn:
                raise DataError(path, line, "ShareGPT's from/value in an OpenAI 'messages' record, whose messages have "
                                "role and content", f"{field}.{'from' if 'from' in turn else 'value'}",
                                "ShareGPT's from/value in an OpenAI record")
            continue
        if chatglm3_only and "role" not in turn and "from" in turn:
            raise DataError(path, line, "missing (ShareGPT's from/value: convert the file with process.py)",
                            f"{field}.role", "missing (ShareGPT's from/value)")
        turn_style = "sharegpt" if "from" in turn or "value" in turn else "chatglm3"
        if style and turn_style != style:
            raise DataError(path, line, "ShareGPT from/value messages and role/content messages mixed in one "
                            "conversation; use one format", field, "from/value and role/content mixed")
        style = turn_style
    return key, "openai" if key == "messages" else style or "chatglm3", turns


def conversation_messages(record, path, line, chatglm3_only=False):
    """(the checked ChatGLM3 messages of a conversation record, its style); chatglm3_only: training data."""
    key, style, turns = record_style(record, path, line, chatglm3_only)
    role_key, text_key = ("from", "value") if style == "sharegpt" else ("role", "content")
    known = {"openai": OPENAI_ROLES, "sharegpt": SOURCE_ROLES}.get(style) or (  # chatglm3: + finetune_demo's tool
        dict(zip(ROLES, ROLES), tool="tool") if chatglm3_only else {**SOURCE_ROLES, "tool": "tool"})
    messages, places = [], []
    for k, turn in enumerate(turns):
        field = f"{key}[{k}]"
        name = require_str(turn, role_key, path, line, prefix=field)
        if name not in known:
            raise DataError(path, line, f"expected one of {list(known)}, got {excerpt(name)}", f"{field}.{role_key}",
                            f"expected one of {list(known)}")
        for message in turn_messages(turn, name, known[name], text_key, style, path, line, field):
            messages.append(message)
            places.append((f"{field}.{role_key}", name))

    # ShareGPT and OpenAI keep the system prompt (LLaMA-Factory) and the tools beside the messages.
    system = require_str(record, "system", path, line, allow_empty=True) if "system" in record else ""
    has_system = bool(messages) and messages[0]["role"] == "system"
    if style == "chatglm3":
        # The finetune_demo's top-level tools: a system message of their own, first, before any of the data's (the
        # official preprocessing inserts it so), with ChatGLM3's tool prompt; the array as it is.
        tools = read_tools(record["tools"], path, line, "tools", as_given=True) if record.get("tools") is not None else None
        if not has_system and system.strip():
            messages.insert(0, {"role": "system", "content": system})
            places.insert(0, ("system", "system"))
        if tools is not None:
            if any("tools" in message for message in messages):
                raise DataError(path, line, "tools given both beside the messages and in a system message", "tools")
            messages.insert(0, {"role": "system", "content": TOOL_SYSTEM_PROMPT, "tools": tools})
            places.insert(0, ("tools", "system"))
    else:
        tools = read_tools(record["tools"], path, line, "tools") if record.get("tools") is not None else []
        if not has_system and (system.strip() or tools):
            messages.insert(0, {"role": "system", "content": system if system.strip() else TOOL_SYSTEM_PROMPT})
            places.insert(0, ("system", "system"))
        if tools:
            if "tools" in messages[0]:
                raise DataError(path, line, "tools given both beside the messages and in the system message", "tools")
            messages[0]["tools"] = tools
    check_order(messages, places, key, path, line)
    return messages, style


def plain_turns(messages):
    """(system text, [(user, assistant, learnt)]) of alternating user and assistant messages after an optional system
    message without tools, else None: what ChatGLM-6B, ChatGLM2-6B and chat-template models can be trained on."""
    system = ""
    if messages[0]["role"] == "system":
        if "tools" in messages[0]:
            return None
        system, messages = messages[0]["content"], messages[1:]
    roles = [message["role"] for message in messages]
    if roles != ["user", "assistant"] * (len(roles) // 2) or any("metadata" in message for message in messages):
        return None
    return system, [(user["content"], assistant["content"], assistant.get("loss", True))
                    for user, assistant in zip(messages[::2], messages[1::2])]


def conversation_record(record, path, line):
    """process.py's record: an instruction record {instruct, query, answer, history?} when the turns are plain and all
    learnt, else a conversation record. ChatGLM3's own format stays one unless it is a single question and answer: the
    training scripts encode it as finetune_demo does, unlike an instruction record (system role, learnt history)."""
    messages, style = conversation_messages(record, path, line)
    turns = plain_turns(messages)
    if turns is None or not all(learnt for _, _, learnt in turns[1]):
        return {"conversations": messages}
    if style == "chatglm3" and [m["role"] for m in messages] != ["user", "assistant"]:
        return {"conversations": messages}
    system, pairs = turns
    result = {"instruct": system, "query": pairs[-1][0], "answer": pairs[-1][1]}
    if len(pairs) > 1:
        result["history"] = [[user, assistant] for user, assistant, _ in pairs[:-1]]
    return result


def adgen_record(record, path, line):
    """ADGEN's `{"content", "summary"}`, or `{"instruction", "output"}` (its attributes), with a fixed instruction."""
    alpaca_style = isinstance(record, dict) and "content" not in record and "instruction" in record
    query_field, answer_field = ("instruction", "output") if alpaca_style else ("content", "summary")
    return {"instruct": ADGEN_INSTRUCT, "query": require_str(record, query_field, path, line),
            "answer": require_str(record, answer_field, path, line)}


def read_history(value, path, line, field):
    """[[user, assistant], ...] with every entry a non-empty string."""
    require_type(value, list, path, line, field)
    for k, pair in enumerate(value):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise DataError(path, line, f"expected [user, assistant], got {json_shape(pair)}", f"{field}[{k}]",
                            "expected [user, assistant]")
        for j, text in enumerate(pair):
            if not isinstance(text, str) or not text.strip():
                raise DataError(path, line, "expected a non-empty string", f"{field}[{k}][{j}]")
    return [list(pair) for pair in value]


def alpaca_record(record, path, line):
    instruction = require_str(record, "instruction", path, line)
    query = require_str(record, "input", path, line, allow_empty=True) if "input" in record else ""
    answer = require_str(record, "output", path, line)
    system = require_str(record, "system", path, line, allow_empty=True) if "system" in record else ""
    result = {"instruct": f"{system}\n{instruction}" if system.strip() else instruction, "query": query, "answer": answer}
    history = read_history(record["history"], path, line, "history") if record.get("history") is not None else []
    if history:
        result["history"] = history
    return result


read_adgen, read_alpaca = json_reader(adgen_record), json_reader(alpaca_record)
read_conversation = json_reader(conversation_record)
