"""Scores of model answers: entity-level precision, recall and F1 for NER (micro and per type), BLEU-4 and ROUGE for
generation."""
from collections import Counter

from utils.decode_utils import entities_in_text, parse_ner_answer


def prf(true_positives, predicted, gold):
    precision = true_positives / predicted if predicted else 0.0
    recall = true_positives / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": true_positives, "predicted": predicted, "gold": gold}


def entity_counts(predicted_sets, gold_sets):
    tp, predicted, gold = Counter(), Counter(), Counter()
    for pred, ref in zip(predicted_sets, gold_sets):
        tp.update(t for _, t in pred & ref)
        predicted.update(t for _, t in pred)
        gold.update(t for _, t in ref)
    return tp, predicted, gold


def ner_metrics(predictions, references, sources=None) -> dict:
    """Entity-level precision/recall/F1 over (entity, type) pairs, micro and per type, and the malformed lines.
    sources (each prediction's input text): predicted entities not in their input were made up and are dropped; how
    many, and the micro scores with them kept, are reported too (`not_in_text`)."""
    if len(predictions) != len(references) or (sources is not None and len(sources) != len(references)):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references"
                         + (f" and {len(sources)} sources" if sources is not None else ""))
    parsed = [parse_ner_answer(prediction) for prediction in predictions]
    gold_sets = [parse_ner_answer(reference).entities for reference in references]
    predicted_sets = [p.entities for p in parsed]
    if sources is not None:
        predicted_sets = [entities_in_text(entities, source) for entities, source in zip(predicted_sets, sources)]
    tp, predicted, gold = entity_counts(predicted_sets, gold_sets)
    metrics = {
        "micro": prf(sum(tp.values()), sum(predicted.values()), sum(gold.values())),
        "per_type": {t: prf(tp[t], predicted[t], gold[t]) for t in sorted(set(predicted) | set(gold))},
        # A malformed or empty answer matches nothing, not even a gold 没有 (its parse is empty too).
        "exact_match": sum(answer.well_formed and p == g for answer, p, g in zip(parsed, predicted_sets, gold_sets))
                       / len(references) if references else 0.0,
        "malformed_lines": sum(len(p.malformed) for p in parsed),
        "samples": len(references),
    }
    if sources is not None:
        all_tp, all_predicted, _ = entity_counts([p.entities for p in parsed], gold_sets)
        metrics["not_in_text"] = {"dropped": sum(all_predicted.values()) - sum(predicted.values()),
                                  "micro_with_them": prf(sum(all_tp.values()), sum(all_predicted.values()), sum(gold.values()))}
    return metrics


def generation_metrics(predictions, references) -> dict:
    """BLEU-4 (sacrebleu, Chinese tokenisation: one token per CJK character) and ROUGE-1/2/L F-scores (rouge-score)
    on characters, all in percent."""
    import sacrebleu
    from rouge_score import rouge_scorer

    bleu = sacrebleu.corpus_bleu(predictions, [references], tokenize="zh")

    class CharacterTokenizer:
        def tokenize(self, text):
            return [ch for ch in text if not ch.isspace()]

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=CharacterTokenizer())
    totals = Counter()
    for prediction, reference in zip(predictions, references):
        for name, score in scorer.score(reference, prediction).items():
            totals[name] += score.fmeasure
    count = max(len(references), 1)
    return {"bleu-4": bleu.score, **{name: 100 * totals[name] / count for name in ("rouge1", "rouge2", "rougeL")},
            "samples": len(references)}


def format_ner_report(metrics) -> str:
    rows = [("micro", metrics["micro"])] + list(metrics["per_type"].items())
    lines = [f"{'type':<10} {'precision':>9} {'recall':>7} {'f1':>7} {'gold':>6} {'pred':>6}"]
    for name, m in rows:
        lines.append(f"{name:<10} {m['precision']:>9.4f} {m['recall']:>7.4f} {m['f1']:>7.4f} {m['gold']:>6} {m['predicted']:>6}")
    lines.append(f"exact match {metrics['exact_match']:.4f} over {metrics['samples']} samples; malformed lines {metrics['malformed_lines']}")
    if "not_in_text" in metrics:
        check = metrics["not_in_text"]
        lines.append(f"{check['dropped']} predicted entities not in their sentence were dropped (with them: precision "
                     f"{check['micro_with_them']['precision']:.4f}, f1 {check['micro_with_them']['f1']:.4f})")
    return "\n".join(lines)
