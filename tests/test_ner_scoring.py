"""NER exact match on the demo set's real dev answers: a malformed or empty answer matches no gold answer, not even
没有 (its parse is as empty as 没有's)."""
from conftest import REPO_ROOT
from utils.decode_utils import parse_ner_answer
from utils.metrics import ner_metrics
from utils.prompts import source_text
from utils.records import read_instruction_records

DEV = REPO_ROOT / "data" / "demo_ner" / "instruct_data" / "dev.txt"


def test_a_malformed_answer_matches_nothing_not_even_none():
    records = read_instruction_records(DEV)
    gold = [r["answer"] for r in records]
    sources = [source_text(r) for r in records]
    none = sum(answer == "没有" for answer in gold)
    assert 0 < none < len(gold)
    # The gold answers themselves, and 没有 where the gold is 没有: exact.
    assert ner_metrics(gold, gold, sources)["exact_match"] == 1.0
    assert ner_metrics(["没有"] * len(gold), gold)["exact_match"] * len(gold) == none
    # Text that is no answer, nothing at all, or 没有 with a stray line: no match anywhere.
    for prediction in ("我不知道这句话里有什么。", "", "  \n", "没有\n这句话没有实体"):
        metrics = ner_metrics([prediction] * len(gold), gold, sources)
        assert metrics["exact_match"] == 0.0, prediction
    assert parse_ner_answer("乱写").entities == parse_ner_answer("没有").entities == set()
    assert parse_ner_answer("没有").well_formed and not parse_ner_answer("乱写").well_formed
