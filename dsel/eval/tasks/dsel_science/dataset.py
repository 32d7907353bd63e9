"""Loader of the dsel_science_facts task: facts.jsonl next to this file as a `test` split (offline)."""
import json
from pathlib import Path

import datasets


def load_facts(**kwargs) -> datasets.DatasetDict:
    """The fact questions ({"context", "choices", "label"}) as a DatasetDict with a test split."""
    rows = [json.loads(line) for line in (Path(__file__).parent / "facts.jsonl").read_text().splitlines() if line]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
