"""A directory of dolma/OLMo token files as one corpus: per-file windows (OLMo's MemMapDataset) and
ids from dolma's `.csv.gz` against a naive reference, read by score, select, pds proxy, train, eval
loss and color finetune; bad file sets are one line."""
import csv
import gzip
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dsel.cli import main
from dsel.data.corpus import open_corpus
from dsel.data.indexed import IndexedDataset, IndexedDatasetWriter
from dsel.data.windows import Windows
from tests._score_util import reference_scores
from tests._train_util import TINY_MODEL, VOCAB, tiny_config

FAKE = "tests._score_util:build_fake_scorer"
EOD = 0


def write_dolma_file(path, docs, ids=None, dtype=np.uint16):
    """A token file as `dolma tokens` writes it: documents back to back, and (with ids) a `.csv.gz`
    of start,end,id,src,loc rows written with the csv module like dolma's MemmapWriter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.concatenate(docs).astype(dtype).tofile(path)
    if ids is not None:
        with gzip.open(str(path)[:-4] + ".csv.gz", "wt", newline="") as f:
            writer, start = csv.writer(f), 0
            for k, (doc, doc_id) in enumerate(zip(docs, ids)):
                writer.writerow([start, start + len(doc), doc_id, "s3://bucket/src.json.gz", k])
                start += len(doc)


def counting_docs(rng, count):
    """Documents counting up modulo the vocabulary (learnable), each ending with EOD."""
    return [np.append((rng.integers(1, VOCAB) + np.arange(rng.integers(5, 30))) % (VOCAB - 1) + 1, EOD)
            for _ in range(count)]


@pytest.fixture
def dolma(tmp_path):
    """Three token files (listed out of order on purpose) -> their documents and ids in sorted file order."""
    rng = np.random.default_rng(0)
    layout = [("b/part-1.npy", True), ("part-2.npy", False), ("a/part-0.npy", True)]
    files = {}
    for rel, with_ids in layout:
        docs = counting_docs(rng, 6)
        ids = [f"{rel[:-4]},doc-{k}" for k in range(len(docs))] if with_ids else None  # a comma, quoted by csv
        write_dolma_file(tmp_path / "dolma" / rel, docs, ids)
        files[rel] = (docs, ids or [f"{rel}:{k}" for k in range(len(docs))])
    ordered = [files[rel] for rel in sorted(files)]
    meta = {"vocab_size": VOCAB, "tokenizer": "t.model", "tokenizer_sha256": "0" * 64, "dtype": "uint16", "eod_id": EOD}
    (tmp_path / "dolma.meta.json").write_text(json.dumps(meta))  # sidecars of a directory hang off its name
    return tmp_path / "dolma", ordered


def reference(ordered, window):
    """Per file in sorted order: its stream cut into windows, tail dropped -> (windows, doc of each window's
    first token, ids of all documents, tokens of each (window, doc) overlap)."""
    rows, doc_of_window, ids, overlaps, first_doc = [], [], [], {}, 0
    for docs, file_ids in ordered:
        stream = np.concatenate(docs)
        owner = np.concatenate([np.full(len(d), first_doc + k) for k, d in enumerate(docs)])
        for j in range(len(stream) // window):
            rows.append(stream[j * window:(j + 1) * window])
            doc_of_window.append(owner[j * window])
            for doc in owner[j * window:(j + 1) * window]:
                key = (len(rows) - 1, int(doc))
                overlaps[key] = overlaps.get(key, 0) + 1
        ids += file_ids
        first_doc += len(docs)
    return np.stack(rows), np.array(doc_of_window), ids, overlaps


@pytest.mark.parametrize("window", [5, 17])
def test_file_set_windows_match_per_file_reference(dolma, window):
    root, ordered = dolma
    rows, doc_of_window, ids, overlaps = reference(ordered, window)
    for path in (root, f"{root}/**/*.npy"):
        windows = Windows(open_corpus(str(path)), window)
        assert len(windows) == len(rows)
        np.testing.assert_array_equal(windows.batch(np.arange(len(rows))), rows)
        shuffled = np.random.default_rng(1).permutation(len(rows))
        np.testing.assert_array_equal(windows.batch(shuffled), rows[shuffled])
        np.testing.assert_array_equal(windows.tokens(len(rows) - 1), rows[-1])
        np.testing.assert_array_equal(windows.doc_of_window, doc_of_window)
        assert windows.source.doc_ids == ids
        w, d, n = windows.document_overlaps()
        assert dict(zip(zip(w.tolist(), d.tolist()), n.tolist())) == overlaps


def test_single_dolma_file_takes_documents_and_ids_from_its_csv(tmp_path):
    docs = counting_docs(np.random.default_rng(2), 5)
    write_dolma_file(tmp_path / "one.npy", docs, [f"id-{k}" for k in range(5)])
    source = open_corpus(str(tmp_path / "one.npy"))  # no eos_id known: the csv gives the documents
    np.testing.assert_array_equal(source.document_starts, np.cumsum([0] + [len(d) for d in docs[:-1]]))
    assert source.doc_ids == [f"id-{k}" for k in range(5)]


def test_score_select_and_pds_proxy_on_a_dolma_directory(dolma, tmp_path):
    root, ordered = dolma
    rows, doc_of_window, ids, _ = reference(ordered, 6)
    main(["score", f"corpus={root}", "window=6", f"scorer={FAKE}", f"out={tmp_path / 'scores'}", "shard_size=5",
          "device=cpu"])
    table = pq.read_table(tmp_path / "scores" / "scores.parquet")
    np.testing.assert_array_equal(table.column("total").to_numpy(), reference_scores(rows)["total"])
    assert table.column("doc_id").to_pylist() == [ids[d] for d in doc_of_window]
    main(["select", f"scores={tmp_path / 'scores'}", f"out={tmp_path / 'select'}", "method=topk", "column=total",
          "fraction=0.5"])
    kept = np.load(tmp_path / "select" / "indices.npy")
    selected = IndexedDataset(tmp_path / "select" / "data" / "selected")
    np.testing.assert_array_equal(selected.stream, rows[kept].ravel())
    lines = (tmp_path / "select" / "data" / "selected.docids.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [ids[doc_of_window[k]] for k in kept]
    main(["pds", "proxy", f"corpus={root}", "window=6", "windows=7", f"out={tmp_path / 'proxy'}"])
    sampled = np.load(tmp_path / "proxy" / "pool_windows.npy")
    np.testing.assert_array_equal(IndexedDataset(tmp_path / "proxy" / "proxy").stream, rows[sampled].ravel())


def test_format_index_refuses_several_files_in_one_line(dolma, tmp_path, capsys):
    root, _ = dolma
    main(["score", f"corpus={root}", "window=6", f"scorer={FAKE}", f"out={tmp_path / 'scores'}", "device=cpu"])
    with pytest.raises(SystemExit) as info:
        main(["select", f"scores={tmp_path / 'scores'}", f"out={tmp_path / 'select'}", "method=topk",
              "column=total", "fraction=0.5", "format=index"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert "format=index" in err.strip().splitlines()[-1] and "3 token files" in err


@pytest.fixture
def megatron_twin(dolma, tmp_path):
    """The dolma documents as one Megatron dataset (the reference colour finetune trains on)."""
    with IndexedDatasetWriter(tmp_path / "megatron", np.uint16) as writer:
        for docs, _ in dolma[1]:
            for doc in docs:
                writer.add_document(doc)
    return tmp_path / "megatron"


@pytest.mark.parametrize("layout", ["directory", "single file"])
def test_train_eval_and_finetune_read_dolma_token_files(dolma, megatron_twin, tmp_path, layout):
    from dsel.models.checkpoint import load_model
    from dsel.train.torch_backend import training_samples

    root, ordered = dolma
    window = TINY_MODEL["seq_len"] + 1
    if layout == "single file":  # every document in one file, documents and ids from its .csv.gz
        docs = [d for file_docs, _ in ordered for d in file_docs]
        root = tmp_path / "single.npy"
        write_dolma_file(root, docs, [str(k) for k in range(len(docs))])
        ordered = [(docs, [str(k) for k in range(len(docs))])]
    rows, _, _, _ = reference(ordered, window)
    samples = training_samples(tiny_config(tmp_path, [root]), TINY_MODEL["seq_len"], VOCAB, 2 * len(rows))
    for epoch in range(2):  # each epoch visits every per-file window once
        got = samples.batch(np.arange(epoch * len(rows), (epoch + 1) * len(rows))).astype(np.uint16)
        assert sorted(map(bytes, got)) == sorted(map(bytes, rows.astype(np.uint16)))
    main(["train", f"data=[{root}]", f"out={tmp_path / 'run'}", "steps=2", "batch_size=4", "device=cpu",
          f"arch={json.dumps(TINY_MODEL)}"])
    model, _ = load_model(tmp_path / "run" / "model")
    main(["eval", "loss", f"model={tmp_path / 'run' / 'model'}", f"data={{dolma: {root}}}", "device=cpu",
          f"out={tmp_path / 'loss.json'}"])
    with torch.no_grad():
        expected = model.sequence_losses(torch.from_numpy(rows.astype(np.int64))).double().mean().item()
    got = json.loads((tmp_path / "loss.json").read_text())["losses"]["dolma"]
    assert got["windows"] == len(rows) and got["loss"] == pytest.approx(expected, rel=1e-5)
    for name, target in (("ours", root), ("twin", megatron_twin)):
        main(["color", "finetune", f"prior={tmp_path / 'run' / 'model'}", f"target={target}",
              f"out={tmp_path / name}", "batch_size=4", "warmup=1", "device=cpu"])
    ours, twin = (load_model(tmp_path / name)[0].state_dict() for name in ("ours", "twin"))
    assert all(torch.equal(ours[k], twin[k]) for k in ours)


@pytest.mark.parametrize("case,message", [
    ("empty", r"no token files \(\.npy, or \.bin without an \.idx\) found"),
    ("mixed", r"holds uint32 tokens but .*a\.npy holds uint16"),
    ("csv", r"part\.csv\.gz: its documents end at token 9 but the token file holds 10 tokens"),
    ("short", r"no token file holds one window of 4 tokens \(the longest holds 3\)"),
])
def test_bad_file_sets_are_one_line(tmp_path, capsys, case, message):
    root = tmp_path / "set"
    root.mkdir()
    if case == "empty":
        (root / "notes.txt").write_text("no tokens here")
    elif case == "mixed":
        np.save(root / "a.npy", np.arange(40, dtype=np.uint16))
        np.save(root / "b.npy", np.arange(40, dtype=np.uint32))
    elif case == "short":
        for name in ("a.npy", "b.npy"):
            write_dolma_file(root / name, [np.array([5, 6, EOD])])
    else:
        write_dolma_file(root / "part.npy", [np.arange(1, 10), np.array([EOD])], ["x", "y"])
        with gzip.open(root / "part.csv.gz", "wt") as f:
            f.write("0,9,x,src,0\n")
    with pytest.raises(SystemExit) as info:
        main(["score", f"corpus={root}", "window=4", f"scorer={FAKE}", f"out={tmp_path / 'out'}", "device=cpu"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err
