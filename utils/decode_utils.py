"""Model answers read back into entities. NER answers are `实体_类型` lines (process.py writes them so), or `没有` for
none. Parsing is forgiving about what models write: blank lines, surrounding spaces, duplicates, either underscore
width, list markers; a line that is not `entity_type` is counted as malformed rather than guessed at, and an answer with
one (or an empty answer) matches no gold answer exactly. Entities are compared after NFKC normalisation, because
ChatGLM-6B's tokenizer cannot write full-width punctuation and digits (it folds them to ASCII).
"""
import re
import unicodedata
from dataclasses import dataclass, field

NONE_ANSWERS = {"没有", "无", "none", "None"}
LIST_MARKER = re.compile(r"^\s*(?:[-*•]|\d+[.、)])\s*")


@dataclass
class ParsedAnswer:
    entities: set = field(default_factory=set)  # {(entity, type)}
    malformed: list = field(default_factory=list)  # lines that are not entity_type
    says_none: bool = False  # a line says there is none (没有)

    @property
    def well_formed(self) -> bool:
        """An answer in the format: entity lines or 没有, nothing else. An empty or malformed answer is none."""
        return not self.malformed and bool(self.entities or self.says_none)


def parse_ner_answer(text: str) -> ParsedAnswer:
    parsed = ParsedAnswer()
    for line in text.replace("\r", "\n").split("\n"):
        line = LIST_MARKER.sub("", line).strip()
        if line in NONE_ANSWERS:
            parsed.says_none = True
        if not line or line in NONE_ANSWERS:
            continue
        entity, separator, entity_type = unicodedata.normalize("NFKC", line).rpartition("_")
        if not separator or not entity.strip() or not entity_type.strip():
            parsed.malformed.append(line)
            continue
        parsed.entities.add((entity.strip(), entity_type.strip()))
    return parsed


def entities_in_text(entities, text) -> set:
    """The (entity, type) pairs whose entity occurs in text (NFKC-normalised, as the entities are)."""
    text = unicodedata.normalize("NFKC", text)
    return {pair for pair in entities if pair[0] in text}
