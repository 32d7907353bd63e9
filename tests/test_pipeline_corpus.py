"""The bundled corpus: reproducible from scripts/make_corpus.py, disjoint splits, target rare in the pool."""
import gzip
import importlib.util
import json
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "dsel" / "data" / "bundled"
TASK = ROOT / "dsel" / "eval" / "tasks" / "dsel_science"


def load_script():
    spec = importlib.util.spec_from_file_location("make_corpus", ROOT / "scripts" / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read(path):
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def test_committed_files_are_what_the_script_writes(tmp_path):
    load_script().make_corpus(out=tmp_path / "bundled", tasks=tmp_path / "task")
    written = sorted(p.relative_to(tmp_path / "bundled") for p in (tmp_path / "bundled").rglob("*.gz"))
    committed = sorted(p.relative_to(BUNDLED) for p in BUNDLED.rglob("*.gz"))
    assert written == committed
    for rel in written:
        assert (tmp_path / "bundled" / rel).read_bytes() == (BUNDLED / rel).read_bytes(), rel
    assert (tmp_path / "task" / "facts.jsonl").read_bytes() == (TASK / "facts.jsonl").read_bytes()


def test_splits_are_disjoint_and_target_is_rare_in_pool():
    pool, target = read(BUNDLED / "pool.jsonl.gz"), read(BUNDLED / "target.jsonl.gz")
    valid = [r for p in sorted((BUNDLED / "valid").glob("*.jsonl.gz")) for r in read(p)]
    texts = [r["text"] for r in pool], [r["text"] for r in target], [r["text"] for r in valid]
    assert not set(texts[0]) & set(texts[1]) and not set(texts[0]) & set(texts[2])
    ids = [r["id"] for r in pool + target + valid]
    assert len(ids) == len(set(ids))
    shares = Counter(r["domain"] for r in pool)
    assert len(shares) == 6 and shares["science"] == min(shares.values())
    assert {r["domain"] for r in target} == {"science"}
    assert {p.name.split(".")[0] for p in (BUNDLED / "valid").glob("*.jsonl.gz")} == set(shares)


def test_fact_task_answers_are_stated_in_science_documents():
    facts = [json.loads(line) for line in (TASK / "facts.jsonl").read_text().splitlines()]
    science = " ".join(r["text"] for r in read(BUNDLED / "pool.jsonl.gz") if r["domain"] == "science")
    for item in facts:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        stated = [f"{item['context']} {c}" in science for c in item["choices"]]
        assert stated[item["label"]], item
