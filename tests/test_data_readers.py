"""The reader layer and the sharded tokenize: every input format gives the same tokens, ids are
unique across folders, metadata passes through, split files read as a whole, bad inputs are one
line, and a killed tokenize resumes without redoing finished shards."""
import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import zstandard

from dsel.cli import main
from dsel.config import load_config
from dsel.data.docids import fields_path, read_doc_ids, read_document_strings
from dsel.data.indexed import IndexedDataset
from dsel.data.tokenize import TokenizeConfig, tokenize_corpus

WORDS = "data selection keeps useful tokens while the lazy fox reads science papers about climbing".split()


def texts(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(2, 30))) for _ in range(n)]


def records(docs):
    return [{"text": t, "uid": f"u{i}", "dom": "ab"[i % 2], "url": f"http://x/{i}"} for i, t in enumerate(docs)]


def jsonl_bytes(rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def tokenize(**settings):
    return tokenize_corpus(load_config(TokenizeConfig, None, [f"{k}={v}" for k, v in settings.items()]))


def outputs(prefix):
    return open(f"{prefix}.bin", "rb").read(), open(f"{prefix}.idx", "rb").read()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny sentencepiece model and the corpus it was trained on."""
    root = tmp_path_factory.mktemp("model")
    docs = texts(60)
    (root / "c.jsonl").write_bytes(jsonl_bytes(records(docs)))
    tokenize(input=root / "c.jsonl", out=root / "c", vocab_size=320)
    return str(root / "c.model"), docs


def test_every_format_gives_identical_bin_idx(model, tmp_path):
    from datasets import Dataset

    model_path, docs = model
    rows = records(docs)
    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(rows))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(rows)))
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(rows)))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet", row_group_size=7)
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"), max_shard_size="2KB")  # several .arrow shards
    assert len(list((tmp_path / "hf").glob("*.arrow"))) > 1
    with fsspec.open("memory://corpus/a.jsonl", "wb") as f:
        f.write(jsonl_bytes(rows))
    inputs = [tmp_path / "a.jsonl.zst", tmp_path / "a.jsonl.gz", tmp_path / "a.parquet", tmp_path / "hf",
              "memory://corpus/a.jsonl", f"file://{tmp_path}/a.jsonl"]
    tokenize(input=tmp_path / "a.jsonl", out=tmp_path / "ref", tokenizer=model_path, id_field="uid")
    reference = outputs(tmp_path / "ref")
    sp = spm.SentencePieceProcessor(model_file=model_path)
    ds = IndexedDataset(tmp_path / "ref")
    assert [ds[i].tolist() for i in range(len(ds))] == [sp.encode(t) + [sp.eos_id()] for t in docs]
    for k, source in enumerate(inputs):
        tokenize(input=source, out=tmp_path / f"o{k}", tokenizer=model_path, id_field="uid", workers=1)
        assert outputs(tmp_path / f"o{k}") == reference, source
        assert read_doc_ids(tmp_path / f"o{k}") == [r["uid"] for r in rows]


def test_split_files_and_workers_match_one_pass(model, tmp_path):
    """Byte-range pieces of a jsonl file, row-group pieces of parquet, 2 workers: same output, same ids."""
    model_path, docs = model
    rows = records(docs)
    text = jsonl_bytes(rows[:30]) + b"\n\n" + jsonl_bytes(rows[30:])  # blank lines count as records
    (tmp_path / "c").mkdir()
    (tmp_path / "c/a.jsonl").write_bytes(text)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c/b.parquet", row_group_size=5)
    tokenize(input=tmp_path / "c", out=tmp_path / "one", tokenizer=model_path, workers=1)
    tokenize(input=tmp_path / "c", out=tmp_path / "split", tokenizer=model_path, workers=2, shard_bytes=500,
             keep_shards=True)
    assert outputs(tmp_path / "split") == outputs(tmp_path / "one")
    assert len(list((tmp_path / "split.shards").glob("*.done.json"))) > 4
    ids = read_doc_ids(tmp_path / "split")
    assert ids == read_doc_ids(tmp_path / "one")
    assert ids == [f"a.jsonl:{i}" for i in range(30)] + [f"a.jsonl:{i}" for i in range(32, 62)] + \
        [f"b.parquet:{i}" for i in range(60)]


def test_ids_unique_across_folders_and_metadata_passes_through(model, tmp_path):
    model_path, docs = model
    for folder, part in (("a", docs[:20]), ("b", docs[20:40])):
        (tmp_path / "in" / folder).mkdir(parents=True)
        (tmp_path / "in" / folder / "part-0.jsonl").write_bytes(jsonl_bytes(records(part)))
    main(["tokenize", f"input={tmp_path / 'in'}", f"out={tmp_path / 'o'}", f"tokenizer={model_path}",
          "domain_field=dom", "keep_fields=[url, uid]"])
    ids = read_doc_ids(tmp_path / "o", expected=40)
    assert ids == [f"a/part-0.jsonl:{i}" for i in range(20)] + [f"b/part-0.jsonl:{i}" for i in range(20)]
    assert read_document_strings(tmp_path / "o.domains.jsonl", 40) == ["ab"[i % 2] for i in range(20)] * 2
    fields = [json.loads(line) for line in open(fields_path(tmp_path / "o"))]
    assert fields[21] == {"url": "http://x/1", "uid": "u1"}
    assert not list(tmp_path.glob("o.shards"))  # removed after the merge
    (tmp_path / "in" / "x.shards").mkdir()  # a work folder of another tokenize inside the input is not read
    (tmp_path / "in" / "x.shards" / "shard-00000.docs.jsonl").write_text('{"p": 0, "r": 0}\n')
    main(["tokenize", f"input={tmp_path / 'in'}", f"out={tmp_path / 'o2'}", f"tokenizer={model_path}"])
    assert read_doc_ids(tmp_path / "o2") == ids
    glob_ids = (tokenize(input=f"{tmp_path}/in/*/part-0.jsonl", out=tmp_path / "g", tokenizer=model_path), read_doc_ids(tmp_path / "g"))[1]
    assert glob_ids == ids


def _bad_inputs(d):
    good = jsonl_bytes(records(texts(50)))
    (d / "trunc.jsonl.gz").write_bytes(gzip.compress(good)[:-30])
    (d / "trunc.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(good)[:-30])
    (d / "plain.jsonl.gz").write_bytes(good)
    (d / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    pq.write_table(pa.table({"text": [1, 2, 3]}), d / "ints.parquet")
    (d / "dict").mkdir()
    (d / "dict" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    return {
        "trunc.jsonl.gz": "trunc.jsonl.gz: truncated compressed file",
        "trunc.jsonl.zst": "trunc.jsonl.zst: ",
        "plain.jsonl.gz": "plain.jsonl.gz: not a valid gzip file",
        "latin1.jsonl": "latin1.jsonl: line 2 is not UTF-8 text (byte 0xe9",
        "ints.parquet": "ints.parquet: column 'text' holds int64, not text",
        "nothing*.jsonl": "nothing*.jsonl: the glob matches no files",
        "dict": "dict: a DatasetDict folder (splits: train, test); give one split's folder",
    }


def test_bad_inputs_are_one_line_naming_the_file(model, tmp_path, capsys):
    for name, message in _bad_inputs(tmp_path).items():
        with pytest.raises(SystemExit) as info:
            main(["tokenize", f"input={tmp_path / name}", f"out={tmp_path / 'out/x'}", f"tokenizer={model[0]}"])
        assert info.value.code == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert "Traceback" not in err and last.startswith("dsel tokenize: error:") and message in last, (name, err)
        assert not (tmp_path / "out/x.bin").exists()


def test_kill_then_rerun_resumes_without_redoing_finished_shards(model, tmp_path):
    model_path, _ = model
    (tmp_path / "in").mkdir()
    for k in range(30):
        (tmp_path / "in" / f"f{k:02d}.jsonl").write_bytes(jsonl_bytes(records(texts(40, seed=k))))
    largest = max(p.stat().st_size for p in (tmp_path / "in").iterdir())  # one file per shard
    args = [f"input={tmp_path / 'in'}", f"tokenizer={model_path}", "workers=1", f"shard_bytes={largest}", "keep_shards=true"]
    main(["tokenize", *args, f"out={tmp_path / 'whole'}"])
    env = {**os.environ, "DSEL_PROGRESS": "0"}
    command = [sys.executable, "-m", "dsel", "tokenize", *args, f"out={tmp_path / 'killed'}"]
    proc = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    shards = tmp_path / "killed.shards"
    deadline = time.time() + 120
    while len(list(shards.glob("*.done.json"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*") if p.name.split(".")[0] + ".done.json"
                in {m.name for m in shards.glob("*.done.json")}}
    assert 3 <= len({n.split(".")[0] for n in finished}) < 30, "the kill came too late to test a resume"
    assert not (tmp_path / "killed.bin").exists()
    subprocess.run(command, env=env, check=True, stderr=subprocess.DEVNULL)
    assert outputs(tmp_path / "killed") == outputs(tmp_path / "whole")
    assert read_doc_ids(tmp_path / "killed") == read_doc_ids(tmp_path / "whole")
    assert {n: (shards / n).stat().st_mtime_ns for n in finished} == finished  # finished shards untouched
    assert not [p for p in shards.iterdir() if ".tmp-" in p.name]


def test_torchrun_ranks_share_the_shards(model, tmp_path):
    model_path, _ = model
    (tmp_path / "in").mkdir()
    for k in range(4):
        (tmp_path / "in" / f"f{k}.jsonl").write_bytes(jsonl_bytes(records(texts(30, seed=k))))
    args = [f"input={tmp_path / 'in'}", f"tokenizer={model_path}", "workers=1", "shard_bytes=3000"]
    main(["tokenize", *args, f"out={tmp_path / 'one'}"])
    env = {**os.environ, "DSEL_PROGRESS": "0"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dsel",
                    "tokenize", *args, f"out={tmp_path / 'two'}"], env=env, check=True, timeout=300,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert outputs(tmp_path / "two") == outputs(tmp_path / "one")
    assert read_doc_ids(tmp_path / "two") == read_doc_ids(tmp_path / "one")
