"""Scoring of the ``fedlora_generation`` lm-eval task: fedlora's own ROUGE-L and exact match."""

from fedlora.eval.generation import exact_match, rouge_l


def process_results(doc: dict, results: list[str]) -> dict:
    answer = results[0].strip()
    return {"rouge_l": rouge_l([answer], [doc["reference"]]), "exact_match": exact_match([answer], [doc["reference"]])}
