"""NER data sets -> instruction records `{"instruct", "query": "文本：" + text, "answer"}`, the answer `实体_类型` lines.

NER readers take `(path, bad_lines)` and yield `(line, text, entities)`, each entity `(entity, raw_type, begin)`
(`begin` a character offset). `READERS` holds them and chat_data's; `detect_format` picks one by name and content.

- bio: `char<TAB>tag` (or `char tag`) lines, a blank line between sentences; BIO, BIOES or BMES. In BIO an I- tag
  that continues no entity of its type opens one, as conlleval and seqeval read it (counted as repaired; an error with
  `BadLines(strict_tags=True)`). Weibo's `char+segment position` tokens (`口0`) lose the digits.
- bio_parallel: `*sentences*.txt` with the matching `*tags*.txt` beside it, space-separated, line by line.
- span_json: `{"text", "entity_list": [{"entity_index": {"begin", "end"}, "entity_type", "entity"}]}`, `end`
  EXCLUSIVE (MSRA's msra_1000.txt).
- cluener: `{"text", "label": {type: {entity: [[begin, end], ...]}}}`, `end` INCLUSIVE (CLUENER 2020).

Type names (the tables below): GPE stays apart from LOC as OntoNotes and Weibo keep it; Weibo's `X.NOM` (a nominal
mention such as 粉丝) gets a type of its own, so Weibo's 8 types stay 8. Any other type keeps its raw name.
"""
import itertools
import random
import re
from pathlib import Path

from utils.chat_data import ADGEN_RE, read_adgen, read_alpaca, read_conversation
from utils.data_io import (
    BadLines, DataError, excerpt, json_shape, json_reader, parse_json, read_text, require_key, require_str,
    require_type, text_lines,
)

QUERY_PREFIX = "文本："
NO_ENTITY = "没有"
NER_INSTRUCT_TEMPLATE = "请找出文本中的{types}，每行写一个'实体_类型'，如果没有就回答'没有'。"

MSRA_TYPES = ("人名", "地名", "机构名")
CLUENER_TYPE_NAMES = {
    "name": "人名", "address": "地址", "organization": "组织机构", "company": "公司", "government": "政府",
    "book": "书名", "game": "游戏", "movie": "电影", "position": "职位", "scene": "景点",
}
GENERIC_TYPE_NAMES = {
    "PER": "人名", "PERSON": "人名", "NAME": "人名", "NR": "人名",
    "LOC": "地名", "LOCATION": "地名", "NS": "地名", "GPE": "行政区名",
    "ORG": "机构名", "ORGANIZATION": "机构名", "NT": "机构名",
    # Resume NER (Zhang & Yang 2018): country, ethnicity, education, profession, job title
    "CONT": "国籍", "RACE": "民族", "EDU": "学历", "PRO": "专业", "TITLE": "职称",
}
NOMINAL_TYPE_NAMES = {"PER": "人物泛称", "PERSON": "人物泛称", "LOC": "地点泛称", "GPE": "地区泛称", "ORG": "机构泛称"}
# Order of the types in a generated instruct: these first, then the others as they first appear.
TYPE_ORDER = tuple(dict.fromkeys(MSRA_TYPES + ("行政区名",) + tuple(NOMINAL_TYPE_NAMES.values())
                                 + tuple(CLUENER_TYPE_NAMES.values())))


def ner_instruct(type_names) -> str:
    return NER_INSTRUCT_TEMPLATE.format(types="、".join(type_names))


MSRA_INSTRUCT = ner_instruct(MSRA_TYPES)
CLUENER_INSTRUCT = ner_instruct(CLUENER_TYPE_NAMES.values())

NER_FORMATS = ("bio", "bio_parallel", "span_json", "cluener")

TAG_RE = re.compile(r"^([BIMES])-(\S+)$")
SEGMENT_TOKEN_RE = re.compile(r"^(\D+|.)(\d+)$", re.DOTALL)  # Weibo: character(s) + segment position


def map_type(raw_type: str, input_format: str = "bio"):
    """The Chinese type name for a raw type, or None when there is no mapping (the caller keeps the raw name)."""
    if input_format == "cluener":
        return CLUENER_TYPE_NAMES.get(raw_type.lower())
    base, dot, kind = raw_type.upper().partition(".")
    if not dot or kind == "NAM":
        return GENERIC_TYPE_NAMES.get(base)
    if kind == "NOM":
        return NOMINAL_TYPE_NAMES.get(base)
    return None


def map_types(entities, input_format="bio"):
    """(entities with type names, raw types kept as they are for want of a mapping)."""
    names = [map_type(raw_type, input_format) for _, raw_type, _ in entities]
    return ([(entity, name or raw_type, begin) for (entity, raw_type, begin), name in zip(entities, names)],
            [raw_type for (_, raw_type, _), name in zip(entities, names) if name is None])


def check_answer_line(entity, raw_type, input_format, path, line, field, type_field=None):
    """Refuse an entity or type that the answer line `entity_type` cannot carry: a line break splits it, and an
    underscore in a raw type name moves the split (parse_ner_answer splits at the last underscore)."""
    if "\n" in entity or "\r" in entity:
        raise DataError(path, line, f"the entity {excerpt(entity)} holds a line break, which would split its answer line",
                        field, "a line break in an entity")
    if map_type(raw_type, input_format) is None and ("_" in raw_type or "\n" in raw_type or "\r" in raw_type):
        raise DataError(path, line, f"the type {excerpt(raw_type)} has no Chinese name, so it is written as it is, and "
                        "its underscore or line break would break the answer line 'entity_type'; rename the type",
                        type_field or field, "a type with an underscore or line break")


def choose_instruct(type_names, input_formats=()) -> str:
    """The instruct for answers of `type_names`: MSRA's or CLUENER's where the types fit, else one listing them."""
    names = list(dict.fromkeys(type_names))
    if "cluener" in input_formats and set(names) <= set(CLUENER_TYPE_NAMES.values()):
        return CLUENER_INSTRUCT
    if set(names) <= set(MSRA_TYPES):
        return MSRA_INSTRUCT
    known = [name for name in TYPE_ORDER if name in names]
    return ner_instruct(known + [name for name in names if name not in known])


def ner_answer(entities) -> str:
    """`实体_类型` lines, one per distinct (entity, type) in order of first appearance, or 没有."""
    seen = dict.fromkeys((entity, name) for entity, name, _ in sorted(entities, key=lambda e: e[2]))
    return "\n".join(f"{entity}_{name}" for entity, name in seen) or NO_ENTITY


def ner_record(text, entities, instruct=MSRA_INSTRUCT) -> dict:
    return {"instruct": instruct, "query": QUERY_PREFIX + text, "answer": ner_answer(entities)}


def truncate(text, entities, max_chars):
    """(text cut to max_chars, entities that lie wholly inside it, number of entities dropped)."""
    if not max_chars or len(text) <= max_chars:
        return text, list(entities), 0
    kept = [e for e in entities if e[2] + len(e[0]) <= max_chars]
    return text[:max_chars], kept, len(entities) - len(kept)


def replace_mentions(examples, copies, seed=0):
    """Mention replacement (Dai & Adel, COLING 2020): `copies` new examples per example with entities, each mention
    swapped for a random entity of its type (the same way throughout a text), so a small model learns to copy names.
    Examples whose mentions have no position or overlap are left out. Returns (new examples, number left out)."""
    pool = {}
    for entity, name, _ in (mention for _, entities in examples for mention in entities):
        pool.setdefault(name, {})[entity] = None  # a dict: the entities in order of first appearance, once each
    pool = {name: list(entities) for name, entities in pool.items()}
    rng = random.Random(seed)
    augmented, left_out = [], 0
    for text, entities in examples:
        if not entities:
            continue
        spans = None if any(begin is None for _, _, begin in entities) else sorted(entities, key=lambda e: e[2])
        if spans is None or any(b[2] < a[2] + len(a[0]) for a, b in itertools.pairwise(spans)):
            left_out += 1
            continue
        for _ in range(copies):
            replacement, new_text, position, new_entities = {}, "", 0, []
            for entity, name, begin in spans:
                new = replacement.setdefault((entity, name), rng.choice(pool[name]))
                new_text += text[position:begin]
                new_entities.append((new, name, len(new_text)))
                new_text += new
                position = begin + len(entity)
            augmented.append((new_text + text[position:], new_entities))
    return augmented, left_out


class TagError(ValueError):
    def __init__(self, index, problem, reason):
        self.index, self.reason = index, reason  # reason: the kind of problem, without the tags
        super().__init__(problem)


def uses_closed_scheme(tags) -> bool:
    """BIOES / BMES (an E-, S- or M- tag): entities must then end with E- or be S-."""
    return any(tag[:2] in ("E-", "S-", "M-") for tag in tags)


def tag_spans(tags, closed=False):
    """([(begin, end exclusive, type)], [TagError of each repaired tag]); closed (BIOES / BMES) raises them instead,
    and for an entity lacking E-."""
    spans, repaired, start, kind = [], [], None, None
    for index, tag in enumerate(tags):
        if tag == "O":
            prefix, tag_kind = "O", None
        else:
            match = TAG_RE.match(tag)
            if not match:
                raise TagError(index, f"malformed tag {excerpt(tag)} (expected O, or B-/I-/M-/E-/S- and a type)",
                               "malformed tag (expected O, or B-/I-/M-/E-/S- and a type)")
            prefix, tag_kind = match.groups()
        if prefix in ("I", "M", "E"):
            if start is None or tag_kind != kind:
                previous = tags[index - 1] if index else "the sentence start"
                error = TagError(index, f"{prefix}- tag does not continue an entity of its type (after {previous})",
                                 f"{prefix}- tag does not continue an entity of its type")
                if closed:
                    raise error
                repaired.append(error)
                if start is not None:
                    spans.append((start, index, kind))
                start, kind = index, tag_kind
                continue
            if prefix == "E":
                spans.append((start, index + 1, kind))
                start = None
            continue
        if start is not None:
            if closed:
                raise TagError(index, f"entity {kind} opened with B- is not closed with E- (next tag {tag})",
                               "entity opened with B- is not closed with E-")
            spans.append((start, index, kind))
            start = None
        if prefix == "B":
            start, kind = index, tag_kind
        elif prefix == "S":
            spans.append((index, index + 1, tag_kind))
    if start is not None:
        if closed:
            raise TagError(len(tags) - 1, f"entity {kind} opened with B- is not closed with E- at the sentence end",
                           "entity opened with B- is not closed with E-")
        spans.append((start, len(tags), kind))
    return spans, repaired


def tagged_example(tokens, tags, closed, bad_lines, path, field, line_of, tag_number=False):
    """(text, [(entity, raw_type, begin)]) of one tagged sentence, tokens joined; errors at line_of(token index)."""
    def error(err):
        return DataError(path, line_of(err.index), f"{err} (tag {err.index + 1})" if tag_number else str(err), field,
                         err.reason)
    try:
        spans, repaired = tag_spans(tags, closed)
    except TagError as err:
        raise error(err) from None
    for err in repaired:
        bad_lines.repair(error(err))
    offsets = [0, *itertools.accumulate(map(len, tokens))]
    text = "".join(tokens)
    entities = [(text[offsets[b]:offsets[e]], kind, offsets[b]) for b, e, kind in spans]
    for (begin, _, _), (entity, kind, _) in zip(spans, entities):
        check_answer_line(entity, kind, "bio", path, line_of(begin), field)
    return text, entities


def split_bio_line(line):
    """(token, tag) of a `token<TAB>tag` / `token tag` line, or None."""
    parts = line.split("\t") if "\t" in line else line.split(" ")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        return None
    return parts[0], parts[1]


def read_bio(path, bad_lines: BadLines = None):
    """(line of the sentence's first token, text, entities) per sentence of a char-per-line tagged file."""
    bad_lines = bad_lines or BadLines()
    numbered = enumerate((raw.rstrip("\r").rstrip(" \t") for raw in read_text(path).split("\n")), start=1)
    sentences = []  # each [(line, token, tag) or (line, None, problem)]; blank lines end one
    for filled, rows in itertools.groupby(numbered, key=lambda row: bool(row[1])):
        if filled:
            sentences.append([(number, *pair) if (pair := split_bio_line(line))
                              else (number, None, f"expected 'character<TAB>tag', got {excerpt(line)}")
                              for number, line in rows])

    rows = [row for sentence in sentences for row in sentence if row[1] is not None]
    # Weibo style when every token is longer than one character and ends in its segment position. The character
    # is one code point, except where the corpus has two U+FFFD for a lost emoji, so take the non-digits before
    # the position (or the first character when it is itself a digit: "115" is "1" at position 15).
    strip_digits = bool(rows) and all(len(token) > 1 and SEGMENT_TOKEN_RE.match(token) for _, token, _ in rows)
    closed = uses_closed_scheme([tag for _, _, tag in rows])

    def example(_, sentence):
        for number, token, problem in sentence:
            if token is None:
                raise DataError(path, number, problem, "tag", "expected 'character<TAB>tag'")
        tokens = [SEGMENT_TOKEN_RE.match(t).group(1) if strip_digits else t for _, t, _ in sentence]
        return tagged_example(tokens, [tag for _, _, tag in sentence], closed, bad_lines, path, "tag",
                              lambda index: sentence[index][0])
    for line, (text, entities) in bad_lines.kept(((sentence[0][0], sentence) for sentence in sentences), example):
        yield line, text, entities


def parallel_tags_path(path) -> Path:
    path = Path(path)
    head, found, tail = path.name.rpartition("sentences")
    if not found:
        raise DataError(path, None, "a bio_parallel file is named *sentences* and has a *tags* file beside it")
    return path.with_name(head + "tags" + tail)


def read_bio_parallel(path, bad_lines: BadLines = None):
    """(line, text, entities) per line of `*sentences*` (space-separated characters) and its `*tags*` file."""
    bad_lines = bad_lines or BadLines()
    tags_path = parallel_tags_path(path)
    sentence_lines, tag_lines = (read_text(p).split("\n") for p in (path, tags_path))
    for lines in (sentence_lines, tag_lines):
        while lines and not lines[-1].strip():
            lines.pop()
    if len(sentence_lines) != len(tag_lines):
        # Not skippable: every line after the first missing one would pair the wrong tags with the wrong text.
        raise DataError(tags_path, min(len(sentence_lines), len(tag_lines)) + 1,
                        f"{len(tag_lines)} lines of tags but {len(sentence_lines)} sentences in {path}; "
                        "the two files must be parallel", "tags")
    split = lambda line: [part for part in re.split(r"[ \t]+", line.strip(" \t\r")) if part]  # noqa: E731
    closed = uses_closed_scheme([tag for line in tag_lines for tag in split(line)])

    def example(number, pair):
        tokens, tags = pair
        if len(tokens) != len(tags):
            raise DataError(tags_path, number, f"{len(tags)} tags for the {len(tokens)} characters of line {number} "
                            f"of {Path(path).name}", "tags", "not one tag per character")
        return tagged_example(tokens, tags, closed, bad_lines, tags_path, "tags", lambda _: number, tag_number=True)
    pairs = enumerate(((split(line), split(tag_line)) for line, tag_line in zip(sentence_lines, tag_lines)), start=1)
    for number, (text, entities) in bad_lines.kept(((n, pair) for n, pair in pairs if any(pair)), example):
        yield number, text, entities


def span_json_example(record, path, line):
    """(text, entities) of one span-JSON record; `end` is exclusive."""
    text = require_str(record, "text", path, line)
    entities = []
    for k, item in enumerate(require_key(record, "entity_list", list, path, line)):
        field = f"entity_list[{k}]"
        require_type(item, dict, path, line, field)
        entity = require_str(item, "entity", path, line, prefix=field)
        raw_type = require_str(item, "entity_type", path, line, prefix=field)
        index = require_key(item, "entity_index", dict, path, line, field)
        begin, end = (require_key(index, key, int, path, line, f"{field}.entity_index") for key in ("begin", "end"))
        if not 0 <= begin < end <= len(text):
            raise DataError(path, line, f"begin={begin}, end={end} is out of range: the text has {len(text)} "
                            f"characters (0 <= begin < end <= {len(text)})", f"{field}.entity_index", "span out of range")
        if text[begin:end] != entity:
            hint = " (it matches with end inclusive, but span_json ends are exclusive)" if text[begin:end + 1] == entity else ""
            raise DataError(path, line, f"begin={begin}, end={end} gives {excerpt(text[begin:end])}, not the entity "
                            f"{excerpt(entity)}{hint}", f"{field}.entity_index", "span does not give the entity")
        check_answer_line(entity, raw_type, "span_json", path, line, f"{field}.entity", f"{field}.entity_type")
        entities.append((entity, raw_type, begin))
    return text, sorted(entities, key=lambda e: e[2])


def cluener_example(record, path, line):
    """(text, entities) of one CLUENER record; its `end` is inclusive."""
    text = require_str(record, "text", path, line)
    entities = []
    for raw_type, by_entity in require_key(record, "label", dict, path, line).items():
        field = f"label.{raw_type}"  # each message names the entity: in the field, it would count every one apart
        require_type(by_entity, dict, path, line, field)
        for entity, spans in by_entity.items():
            if not entity or not (isinstance(spans, list) and spans):
                raise DataError(path, line, f"expected an entity and a non-empty list of [begin, end], got the entity "
                                f"{excerpt(entity)} with {json_shape(spans)}", field,
                                "expected an entity and a non-empty list of [begin, end]")
            for span in spans:
                if not (isinstance(span, list) and len(span) == 2 and all(type(v) is int for v in span)):
                    raise DataError(path, line, f"expected [begin, end] (integers) for the entity {excerpt(entity)}, "
                                    f"got {json_shape(span)}", field, "expected [begin, end] (integers)")
                begin, end = span
                # CLUENER ends are inclusive: say so when the span fits with an exclusive end
                hint = (" (it matches with end exclusive, but CLUENER ends are inclusive)"
                        if 0 <= begin < end <= len(text) and text[begin:end] == entity else "")
                if not 0 <= begin <= end < len(text):
                    raise DataError(path, line, f"[{begin}, {end}] for the entity {excerpt(entity)} is out of range: "
                                    f"the text has {len(text)} characters (0 <= begin <= end < {len(text)}){hint}",
                                    field, "span out of range")
                if text[begin:end + 1] != entity:
                    raise DataError(path, line, f"[{begin}, {end}] gives {excerpt(text[begin:end + 1])}, not the "
                                    f"entity {excerpt(entity)}{hint}", field, "span does not give the entity")
                check_answer_line(entity, raw_type, "cluener", path, line, field)
                entities.append((entity, raw_type, begin))
    return text, sorted(entities, key=lambda e: e[2])


read_span_json, read_cluener = json_reader(span_json_example, spread=True), json_reader(cluener_example, spread=True)


READERS = {
    "bio": read_bio, "bio_parallel": read_bio_parallel, "span_json": read_span_json, "cluener": read_cluener,
    "adgen": read_adgen, "alpaca": read_alpaca, "conversation": read_conversation,
}
FORMATS = tuple(READERS)


def json_format(record, path):
    keys = set(record)
    if keys & {"conversations", "messages"}:
        return "conversation"
    if "entity_list" in keys:
        return "span_json"
    if {"text", "label"} <= keys:
        return "cluener"
    if keys & {"content", "summary"}:
        return "adgen"
    if "instruction" in keys:
        instruction = record["instruction"]
        if not keys & {"input", "history", "system"} and isinstance(instruction, str) and ADGEN_RE.match(instruction):
            return "adgen"
        return "alpaca"
    raise DataError(path, None, f"cannot tell the format from the keys {sorted(keys)}; pass --input_format "
                    f"(one of {', '.join(FORMATS)})")


def detect_format(path) -> str:
    """The input format of a file, from its name (`*sentences*` with a `*tags*` beside it) and its first records."""
    path = Path(path)
    if "sentences" in path.name and parallel_tags_path(path).is_file():
        return "bio_parallel"
    text = read_text(path)
    body = text.lstrip()
    if not body:
        raise DataError(path, None, "the file is empty: no records to convert")
    if body.startswith("["):
        sample = next((record for record in parse_json(text, path) if isinstance(record, dict)), None)
    elif body.startswith("{"):  # the first object among the first 200 lines that parse
        parsed = BadLines(skip=True).kept(enumerate(text_lines(text)[:200], start=1),
                                          lambda number, line: parse_json(line, path, number))
        sample = next((record for _, record in parsed if isinstance(record, dict)), None)
    else:
        lines = [line.rstrip("\r").rstrip(" \t") for line in text.split("\n")[:200] if line.strip()]
        pairs = [split_bio_line(line) for line in lines]
        if any(pair and (pair[1] == "O" or TAG_RE.match(pair[1])) for pair in pairs):
            return "bio"
        raise DataError(path, None, "cannot tell the format (not JSON, not 'character<TAB>tag' lines); "
                        f"pass --input_format (one of {', '.join(FORMATS)})")
    if sample is None:
        raise DataError(path, None, "no JSON object found to tell the format from; pass --input_format")
    return json_format(sample, path)
