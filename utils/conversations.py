"""Multi-turn conversations with tool calls, in ChatGLM3's fine-tuning format, and their conversion from ShareGPT and
OpenAI chat data.

A conversation record is one JSON object a line, the format of ChatGLM3's finetune_demo:

    {"conversations": [
        {"role": "system", "content": "你是天气助手。", "tools": [{"name": "get_weather", "parameters": {...}}]},
        {"role": "user", "content": "北京天气怎么样？"},
        {"role": "assistant", "metadata": "get_weather", "content": "```python\\ntool_call(city='北京')\\n```"},
        {"role": "observation", "content": "{\\"temperature\\": 22}"},
        {"role": "assistant", "content": "北京现在 22 度。"}]}

- system: optional, first only. `tools` (a JSON array) goes only here; ChatGLM3 reads it as JSON after the content.
- Then a user message. An assistant message follows a user message, an observation or another assistant message
  (ChatGLM3 writes <|assistant|> between the parts of one answer, e.g. a thought and then a tool call).
- A tool call is an assistant message whose `metadata` is the tool's name and whose content is a python code block
  holding `tool_call(name=value, ...)` with the values as Python literals: what ChatGLM3 writes and its chat() reads
  back. Its observation (the tool's result) comes next.
- Every assistant message is learnt unless it says `"loss": false`; system, user and observation messages never are.
- The last message is an assistant message.

process.py converts (input format `conversation`): ShareGPT `{"conversations": [{"from": "system"|"human"|"gpt"|
"function_call"|"observation", "value"}], "system"?, "tools"?}` (LLaMA-Factory's layout: a function_call's value is
the JSON text of {"name", "arguments"}, tools a JSON array or its text), OpenAI `{"messages": [{"role", "content",
"tool_calls"?: [{"type": "function", "function": {"name", "arguments"}}]}, {"role": "tool", "content"}], "tools"?:
[{"type": "function", "function": {...}}]}` and this format itself. Plain user/assistant turns stay an instruction
record with `history`, as before; a conversation with tool calls, observations, consecutive assistant messages or
`"loss": false` becomes a conversation record.
"""
import ast
import json
import keyword

from utils.data_io import DataError, excerpt, json_shape, parse_json, require_str, require_str_at, require_type

ROLES = ("system", "user", "assistant", "observation")
# The role names of ShareGPT and OpenAI data -> ChatGLM3's. A ShareGPT function_call is an assistant's tool call.
SOURCE_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "function_call": "assistant", "observation": "observation", "tool": "observation"}
# The system message that ChatGLM3's own tool demos put before the tools; used when the data has none of its own.
TOOL_SYSTEM_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"


def json_field(text, path, line, field):
    """A JSON value given as text inside a record (a function_call's value, arguments, tools)."""
    try:
        return parse_json(text, path, line)
    except DataError as err:
        raise DataError(path, line, err.problem, field, "not valid JSON") from None


def tool_call_content(arguments, path, line, field) -> str:
    """The content of ChatGLM3's tool-call message for `arguments` (a dict): `tool_call(k=v, ...)` in a python code
    block, each value a Python literal, so that ChatGLM3's chat() reads back the same dict."""
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


def tool_call_message(call, path, line, field):
    """The assistant message of one tool call {"name", "arguments"} (arguments an object, or its JSON text)."""
    require_type(call, dict, path, line, field)
    name = require_str_at(call, "name", path, line, field)
    if "\n" in name:
        raise DataError(path, line, "a line break in the tool name (ChatGLM3 puts it on the role line)", f"{field}.name")
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


def read_tools(value, path, line, field):
    """The tools as ChatGLM3 lists them: a JSON array (or its text) of function descriptions. OpenAI's
    {"type": "function", "function": {...}} wrapper is taken off, as ChatGLM3's own tool lists have none."""
    if isinstance(value, str):
        value = json_field(value, path, line, field) if value.strip() else []
    require_type(value, list, path, line, field)
    tools = []
    for k, tool in enumerate(value):
        require_type(tool, dict, path, line, f"{field}[{k}]")
        if tool.get("type") == "function" and isinstance(tool.get("function"), dict):
            tool = tool["function"]
        tools.append(tool)
    return tools


def turn_messages(turn, name, role, text_key, path, line, field):
    """The ChatGLM3 messages of one input message (two for an OpenAI message with content and a tool call)."""
    if name == "function_call":  # ShareGPT: the value is the call as JSON
        value = require_str_at(turn, text_key, path, line, field)
        call = json_field(value, path, line, f"{field}.{text_key}")
        if isinstance(call, list):
            call = one_call(call, path, line, f"{field}.{text_key}")
        return [tool_call_message(call, path, line, f"{field}.{text_key}")]
    if role == "assistant" and turn.get("tool_calls"):  # OpenAI
        calls = require_type(turn["tool_calls"], list, path, line, f"{field}.tool_calls")
        call = require_type(one_call(calls, path, line, f"{field}.tool_calls"), dict, path, line, f"{field}.tool_calls[0]")
        if "function" not in call:
            raise DataError(path, line, "missing", f"{field}.tool_calls[0].function")
        messages = []
        if turn.get(text_key) is not None and require_str_at(turn, text_key, path, line, field, allow_empty=True).strip():
            messages.append({"role": "assistant", "content": turn[text_key]})  # what it says before calling
        return messages + [tool_call_message(call["function"], path, line, f"{field}.tool_calls[0].function")]
    if role == "observation" and text_key in turn and not isinstance(turn[text_key], str):
        # A tool's result given as JSON data rather than text: ChatGLM3 reads it as JSON text.
        return [{"role": role, "content": json.dumps(turn[text_key], ensure_ascii=False)}]
    message = {"role": role, "content": require_str_at(turn, text_key, path, line, field, allow_empty=role == "observation")}
    if turn.get("metadata"):
        metadata = require_str_at(turn, "metadata", path, line, field)
        if role != "assistant":
            raise DataError(path, line, "only assistant messages have metadata (a tool's name)", f"{field}.metadata")
        if "\n" in metadata:
            raise DataError(path, line, "a line break in the metadata (ChatGLM3 puts it on the role line)", f"{field}.metadata")
        message["metadata"] = metadata
    if "loss" in turn:
        if not isinstance(turn["loss"], bool):
            raise DataError(path, line, f"expected true or false, got {json_shape(turn['loss'])}", f"{field}.loss")
        if turn["loss"] and role != "assistant":
            raise DataError(path, line, "only assistant messages are learnt", f"{field}.loss")
        if not turn["loss"] and role == "assistant":
            message["loss"] = False
    if turn.get("tools") is not None:
        if role != "system":
            raise DataError(path, line, "only the system message has tools", f"{field}.tools")
        message["tools"] = read_tools(turn["tools"], path, line, f"{field}.tools")
    return [message]


def expected_roles(previous):
    """(roles that may follow `previous`, where that is) in a ChatGLM3 conversation."""
    if previous is None:
        return ("system", "user"), "first"
    if previous["role"] == "system":
        return ("user",), "after the system message"
    if previous["role"] in ("user", "observation"):
        return ("assistant",), f"after {'a user message' if previous['role'] == 'user' else 'an observation'}"
    if previous.get("metadata"):
        return ("observation",), "after a tool call"
    return ("user", "assistant"), "after an assistant message"


def check_order(messages, places, key, path, line):
    """The ChatGLM3 order rules (module docstring); `places`: (field, role as the input names it) of each message."""
    previous = None
    for message, (field, name) in zip(messages, places):
        expected, where = expected_roles(previous)
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


def conversation_messages(record, path, line, chatglm3_only=False):
    """The checked ChatGLM3 messages of a ShareGPT, OpenAI or ChatGLM3 conversation record (see the module's rules);
    a bad record raises DataError naming the field. chatglm3_only: accept only the ChatGLM3 format (training data)."""
    require_type(record, dict, path, line, None)
    key = "messages" if "messages" in record and "conversations" not in record and not chatglm3_only else "conversations"
    if key not in record:
        raise DataError(path, line, "missing", key)
    turns = require_type(record[key], list, path, line, key)
    messages, places = [], []
    for k, turn in enumerate(turns):
        field = f"{key}[{k}]"
        require_type(turn, dict, path, line, field)
        if chatglm3_only:
            role_key, text_key = "role", "content"
            if "role" not in turn and "from" in turn:
                raise DataError(path, line, "missing (ShareGPT's from/value: convert the file with process.py)",
                                f"{field}.role", "missing (ShareGPT's from/value)")
        else:
            role_key = "from" if "from" in turn else "role"
            text_key = "value" if "value" in turn else "content"
        name = require_str_at(turn, role_key, path, line, field)
        known = ROLES if chatglm3_only else SOURCE_ROLES
        if name not in known:
            raise DataError(path, line, f"expected one of {list(known)}, got {excerpt(name)}", f"{field}.{role_key}",
                            f"expected one of {list(known)}")
        for message in turn_messages(turn, name, SOURCE_ROLES[name], text_key, path, line, field):
            messages.append(message)
            places.append((f"{field}.{role_key}", name))

    # ShareGPT and OpenAI keep the system prompt (LLaMA-Factory) and the tools beside the messages.
    system = require_str(record, "system", path, line, allow_empty=True) if "system" in record else ""
    tools = read_tools(record["tools"], path, line, "tools") if record.get("tools") is not None else []
    has_system = bool(messages) and messages[0]["role"] == "system"
    if not has_system and (system.strip() or tools):
        messages.insert(0, {"role": "system", "content": system if system.strip() else TOOL_SYSTEM_PROMPT})
        places.insert(0, ("system", "system"))
    if tools:
        if "tools" in messages[0]:
            raise DataError(path, line, "tools given both beside the messages and in the system message", "tools")
        messages[0]["tools"] = tools
    check_order(messages, places, key, path, line)
    return messages


def plain_turns(messages):
    """(system text, [(user, assistant, learnt)]) of a conversation of alternating user and assistant messages (after
    an optional system message without tools), or None when it has tool calls, observations or consecutive assistant
    messages: what ChatGLM-6B, ChatGLM2-6B and chat-template models can be trained on."""
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
    """process.py's record for a conversation: an instruction record {instruct (the system text), query, answer,
    history?} when the turns are plain and all learnt, as before; else a conversation record {"conversations"}."""
    messages = conversation_messages(record, path, line)
    turns = plain_turns(messages)
    if turns is None or not all(learnt for _, _, learnt in turns[1]):
        return {"conversations": messages}
    system, pairs = turns
    result = {"instruct": system, "query": pairs[-1][0], "answer": pairs[-1][1]}
    if len(pairs) > 1:
        result["history"] = [[user, assistant] for user, assistant, _ in pairs[:-1]]
    return result
