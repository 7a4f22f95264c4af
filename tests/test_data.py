"""Data: sources, tokenizers, packing, split, determinism, iterator resume and per-process sharding."""

import json

import numpy as np
import pytest

from jaxeff.config import ConfigError, DataConfig
from jaxeff.data import build_corpus, eval_batches, load_tokenizer, train_dataset
from jaxeff.data import pipeline
from jaxeff.data.sources import load_documents, stdlib_files
from jaxeff.data.tokenizer import ByteTokenizer


def small_cfg(**kw) -> DataConfig:
    base = dict(seq_len=16, max_documents=30, validation_fraction=0.2, shuffle_seed=3)
    base.update(kw)
    return DataConfig(**base)


def take(it, n):
    return [next(it) for _ in range(n)]


def test_stdlib_corpus_is_real_source_without_tests():
    files = stdlib_files()
    assert len(files) > 300
    assert not any(part in ("test", "tests", "idle_test", "site-packages") for f in files for part in f.parts[-3:-1])
    assert any(f.name == "os.py" for f in files)


def test_byte_tokenizer_round_trip_with_unicode():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo → wörld'"
    ids = tok.encode(text)
    assert ids.max() < 256 and tok.decode(ids.tolist() + [tok.eos_id]) == text
    assert tok.vocab_size == 259 and {tok.pad_id, tok.bos_id, tok.eos_id} == {256, 257, 258}


def test_packing_windows_cover_the_stream_with_shifted_targets():
    cfg = small_cfg()
    tok = ByteTokenizer()
    corpus = build_corpus(cfg, tok)
    w = corpus.train
    stream = w.tokens
    assert stream[0] == tok.bos_id
    # Window i starts at i*S and overlaps the next one by one token (the target of the last input).
    for i in (0, 5, len(w) - 1):
        np.testing.assert_array_equal(w[i], stream[i * 16 : i * 16 + 17])
    assert len(w) == (len(stream) - 1) // 16
    example = pipeline._to_example(w[3])
    np.testing.assert_array_equal(example["inputs"][1:], example["targets"][:-1])


def test_validation_split_is_disjoint_by_document():
    cfg = small_cfg()
    tok = ByteTokenizer()
    docs = load_documents(cfg)
    held = pipeline.split_documents(len(docs), cfg.validation_fraction, cfg.split_seed)
    corpus = build_corpus(cfg, tok)
    assert 0 < held.sum() < len(docs)
    val_bytes = bytes(int(t) for t in corpus.validation.tokens if t < 256)
    train_bytes = bytes(int(t) for t in corpus.train.tokens if t < 256)
    for doc, is_val in zip(docs, held):
        whole = doc.encode()
        assert (whole in val_bytes) == bool(is_val)
        assert (whole in train_bytes) == (not is_val)


def test_shuffle_is_deterministic_by_seed_and_reshuffles_each_epoch():
    tok = ByteTokenizer()
    corpus = build_corpus(small_cfg(), tok)
    a = take(iter(train_dataset(corpus, small_cfg(), 4)), 5)
    b = take(iter(train_dataset(corpus, small_cfg(), 4)), 5)
    c = take(iter(train_dataset(corpus, small_cfg(shuffle_seed=4), 4)), 5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    assert any(not np.array_equal(x["inputs"], z["inputs"]) for x, z in zip(a, c))


def test_each_epoch_visits_every_window_once_in_a_new_order(tmp_path):
    for i in range(6):
        (tmp_path / f"d{i}.txt").write_text(f"doc {i} " * 10)
    cfg = DataConfig(source="text", paths=[str(tmp_path / "*.txt")], seq_len=8, validation_fraction=0.2)
    corpus = build_corpus(cfg, ByteTokenizer())
    n = len(corpus.train)
    ds = iter(train_dataset(corpus, cfg, 1))
    firsts = [tuple(next(ds)["inputs"][0, :8]) for _ in range(2 * n)]
    assert sorted(firsts[:n]) == sorted(firsts[n:]) and firsts[:n] != firsts[n:]


@pytest.mark.parametrize("workers", [0, 2])
def test_iterator_state_resumes_exactly(workers):
    cfg = small_cfg(num_workers=workers)
    corpus = build_corpus(cfg, ByteTokenizer())
    it = iter(train_dataset(corpus, cfg, 4))
    take(it, 3)
    state = it.get_state()
    expected = take(it, 4)
    resumed = iter(train_dataset(corpus, cfg, 4))
    resumed.set_state(state)
    for x, y in zip(expected, take(resumed, 4)):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])


def test_each_process_reads_its_own_rows(monkeypatch):
    cfg = small_cfg()
    corpus = build_corpus(cfg, ByteTokenizer())
    monkeypatch.setattr(pipeline, "process_shard", lambda: (0, 1))
    whole = next(iter(train_dataset(corpus, cfg, 4)))["inputs"]
    parts = []
    for index in range(2):
        monkeypatch.setattr(pipeline, "process_shard", lambda index=index: (index, 2))
        parts.append(next(iter(train_dataset(corpus, cfg, 2)))["inputs"])
    # Process p takes global positions p, p+2, ...: together they hold the single-process batch.
    np.testing.assert_array_equal(np.stack([parts[0], parts[1]], 1).reshape(4, -1), whole)


def test_eval_batches_are_the_same_every_time():
    cfg = small_cfg()
    corpus = build_corpus(cfg, ByteTokenizer())
    a, b = list(eval_batches(corpus, 4, 2)), list(eval_batches(corpus, 4, 2))
    assert len(a) == 2
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])


def test_text_and_jsonl_sources(tmp_path):
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i} " * 20)
    docs = load_documents(DataConfig(source="text", paths=[str(tmp_path / "*.txt")]))
    assert docs == [f"document number {i} " * 20 for i in range(3)]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"row {i}", "id": i}) for i in range(4)) + "\n")
    assert load_documents(DataConfig(source="jsonl", paths=[str(jsonl)])) == [f"row {i}" for i in range(4)]


def test_jsonl_without_text_field_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2 has no string field 'text'"):
        load_documents(DataConfig(source="jsonl", paths=[str(bad)]))


def test_missing_paths_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"data.paths: '.*nothing\*.txt' matches no file"):
        load_documents(DataConfig(source="text", paths=[str(tmp_path / "nothing*.txt")]))
    with pytest.raises(ConfigError, match="data.tokenizer: file"):
        load_tokenizer(str(tmp_path / "missing.json"))


def test_arrayrecord_source(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    path = tmp_path / "docs.array_record"
    writer = ArrayRecordWriter(str(path), "group_size:1")
    texts = [f"record {i}: " + "x" * i for i in range(5)]
    for t in texts:
        writer.write(t.encode())
    writer.close()
    assert load_documents(DataConfig(source="arrayrecord", paths=[str(path)])) == texts


def test_hugging_face_tokenizer_file(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(["def f(x): return x + 1\n" * 50, "import os\n" * 50],
                           trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    tok = load_tokenizer(str(path))
    assert (tok.bos_id, tok.eos_id) == (1, 2) and tok.pad_id == hf.get_vocab_size()
    assert tok.vocab_size == hf.get_vocab_size() + 1
    ids = tok.encode("def f(x): return x + 1")
    assert len(ids) < len("def f(x): return x + 1") and tok.decode(ids) == "def f(x): return x + 1"
