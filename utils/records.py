"""Checking the records of a training or test file: instruction records `{"instruct", "query", "answer", "history"?}`
as process.py writes them, ChatGLM3 conversation records `{"conversations"}` (utils/chat_data.py) and plain text
`{"text"}`. A bad line raises DataError (file, line, field) or, with `bad_lines.skip`, is counted and left out."""
from utils.chat_data import conversation_messages
from utils.data_io import BadLines, DataError, iter_json_lines, require_str


def read_records(path, bad_lines, check) -> list:
    """check(line, record) of every line of a JSON-lines file; an error on there being none."""
    bad_lines = bad_lines or BadLines()
    records = [record for _, record in bad_lines.kept(iter_json_lines(path, bad_lines), check)]
    if not records:
        raise DataError(path, None, "no usable records")
    return records


def instruction_record(record, path, line, conversations):
    if isinstance(record, dict) and "messages" in record and "conversations" not in record:
        raise DataError(path, line, "an OpenAI messages record; the training scripts read ChatGLM3 conversation "
                        "records: convert the file with process.py (--input_format=conversation)", "messages",
                        "an OpenAI messages record (convert it with process.py)")
    if isinstance(record, dict) and "conversations" in record:
        if not conversations:
            raise DataError(path, line, "a conversation record; this reads instruction records {instruct, "
                            "query, answer}", "conversations", "a conversation record")
        return {"conversations": conversation_messages(record, path, line, chatglm3_only=True)[0], "line": line}
    instruct = require_str(record, "instruct", path, line, allow_empty=True)
    query = require_str(record, "query", path, line, allow_empty=True)
    if not (instruct.strip() or query.strip()):
        raise DataError(path, line, "instruct and query are both empty", "query")
    answer = require_str(record, "answer", path, line)
    history = record.get("history", [])
    if not (isinstance(history, list) and all(isinstance(turn, (list, tuple)) and len(turn) == 2
                                              and all(isinstance(t, str) for t in turn) for turn in history)):
        raise DataError(path, line, "expected a list of [user, assistant] string pairs", "history")
    return {"instruct": instruct, "query": query, "answer": answer, "history": [list(t) for t in history], "line": line}


def read_instruction_records(path, bad_lines: BadLines = None, conversations=False) -> list:
    """The checked records of an instruction file. conversations: ChatGLM3 conversation records are read too, as
    {"conversations": messages, "line"} (training)."""
    return read_records(path, bad_lines, lambda line, record: instruction_record(record, path, line, conversations))


def read_text_records(path, bad_lines: BadLines = None) -> list:
    return read_records(path, bad_lines, lambda line, record: require_str(record, "text", path, line))
