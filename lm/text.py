"""Evaluation/calibration corpora for causal LMs: wikitext-2, PTB and C4 as one string per split,
tokenization of a whole corpus, and seeded calibration windows (the GPTQ/QuIP protocol).

Sources: wikitext-2 comes from the `datasets` library (`Salesforce/wikitext`, `wikitext-2-raw-v1`)
when it is cached or reachable, else from `data_dir`; PTB and C4 come from `data_dir` only (the hub
copies GPTQ used are script datasets / 300 MB shards the `datasets` library no longer loads offline).
"""
import gzip
import hashlib
import json
import os
import random

import torch

from engine import UserError

from .checkpoint import quiet_hub

SPLITS = ("train", "validation", "test")
# Local file names per dataset and split, in the formats the datasets are distributed in.
FILES = {
    "wikitext2": {"train": ["wiki.train.raw"], "validation": ["wiki.valid.raw"], "test": ["wiki.test.raw"]},
    "ptb": {"train": ["ptb.train.txt"], "validation": ["ptb.valid.txt"], "test": ["ptb.test.txt"]},
    # allenai/c4 'en' shards (JSON lines with a "text" field); C4 has no test split, GPTQ evaluates on
    # validation, so 'test' reads the validation files too.
    "c4": {
        "train": ["c4-train.json", "c4-train.jsonl", "c4-train.json.gz", "c4-train.00000-of-01024.json",
                  "c4-train.00000-of-01024.json.gz"],
        "validation": ["c4-validation.json", "c4-validation.jsonl", "c4-validation.json.gz",
                       "c4-validation.00000-of-00008.json", "c4-validation.00000-of-00008.json.gz"],
    },
}
FILES["c4"]["test"] = FILES["c4"]["validation"]
DATASETS = tuple(FILES)
C4_EVAL_DOCS = 1100  # GPTQ/QuIP evaluate on the first 1100 validation documents


def read_text_file(path):
    """A plain text file as one string; a missing or empty file is a user error."""
    if not os.path.isfile(path):
        raise UserError(f"text file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise UserError(f"text file {path!r} is empty")
    return text


def _check(dataset, split):
    if dataset not in FILES:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def _local_file(dataset, split, data_dir):
    names = FILES[dataset][split]
    if data_dir is not None:
        for name in names:
            path = os.path.join(data_dir, name)
            if os.path.isfile(path):
                return path
    return None


def _missing(dataset, split, data_dir):
    where = f"in {data_dir!r}" if data_dir is not None else "in a directory passed as --data-dir"
    hint = " (not in the datasets cache either, and no network)" if dataset == "wikitext2" else ""
    return UserError(f"{dataset} {split} split not found{hint}: put {' or '.join(FILES[dataset][split])} {where}")


def _c4_docs(path):
    """The "text" fields of a C4 file: JSON lines (optionally gzipped) or one JSON list."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        raw = f.read()
    try:
        rows = json.loads(raw) if raw.lstrip().startswith("[") else [json.loads(l) for l in raw.splitlines() if l.strip()]
        docs = [row["text"] for row in rows]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path!r} is not C4 JSON (one object with a \"text\" field per line)") from None
    if not any(d.strip() for d in docs):
        raise UserError(f"{path!r} holds no text")
    return docs


def _wikitext_from_datasets(split):
    try:
        import datasets

        with quiet_hub():
            rows = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=split)
    except Exception:  # offline, not cached, hub errors: the caller falls back to local files
        return None
    return "\n\n".join(rows["text"])  # GPTQ/QuIP join the rows this way


def load_text(dataset, split, data_dir=None):
    """One split of a corpus as a single string. Local files in `data_dir` win over the hub."""
    _check(dataset, split)
    path = _local_file(dataset, split, data_dir)
    if path is not None:
        if dataset == "c4":
            docs = _c4_docs(path)
            return " ".join(docs if split == "train" else docs[:C4_EVAL_DOCS])
        return read_text_file(path)
    if dataset == "wikitext2":
        text = _wikitext_from_datasets(split)
        if text is not None:
            return text
    raise _missing(dataset, split, data_dir)


# Whole corpora already tokenized in this process, by (tokenizer, text) digest: a pipeline encodes the same
# training and test text in every sub-run, and a corpus takes about a second to tokenize.
_ENCODED = {}
_ENCODED_KEEP = 4
_CACHE_FROM_CHARS = 100_000


def _tokenizer_digest(tokenizer):
    """What a fast tokenizer's output depends on (its backend's full JSON: vocabulary, normalizer, pre- and
    post-processing, special tokens); None for a slow one, which is not cached."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return hashlib.sha1(f"{type(tokenizer).__name__}\0{backend.to_str()}".encode()).hexdigest()


def encode(tokenizer, text):
    """Token ids of a whole corpus as a 1-D LongTensor (with the tokenizer's usual special tokens,
    e.g. one leading BOS, as GPTQ/QuIP tokenize it). `verbose=False` silences the
    longer-than-model-maximum warning, which does not apply: callers cut the ids into windows."""
    digest = _tokenizer_digest(tokenizer) if len(text) >= _CACHE_FROM_CHARS else None
    key = digest and (digest, hashlib.sha1(text.encode()).hexdigest())
    if key in _ENCODED:
        return _ENCODED[key].clone()
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
    if key:
        while len(_ENCODED) >= _ENCODED_KEEP:
            del _ENCODED[next(iter(_ENCODED))]
        _ENCODED[key] = ids.clone()
    return ids


def calibration_batch(tokenizer, dataset, nsamples, seqlen, seed=0, data_dir=None):
    """(nsamples, seqlen) random windows of the train split, seeded like GPTQ (`random.seed(seed)`
    then `randint` per sample). C4 samples a random document longer than seqlen tokens per window."""
    _check(dataset, "train")
    rng = random.Random(seed)
    rows = []
    if dataset == "c4":
        path = _local_file(dataset, "train", data_dir)
        if path is None:
            raise _missing(dataset, "train", data_dir)
        docs = _c4_docs(path)
        for _ in range(nsamples):
            for _ in range(1000):  # GPTQ retries until a long enough document comes up
                ids = encode(tokenizer, docs[rng.randint(0, len(docs) - 1)])
                if len(ids) > seqlen:
                    break
            else:
                raise UserError(f"no document in {path!r} has more than {seqlen} tokens")
            i = rng.randint(0, len(ids) - seqlen - 1)
            rows.append(ids[i:i + seqlen])
    else:
        return calibration_windows(encode(tokenizer, load_text(dataset, "train", data_dir)), nsamples, seqlen,
                                   seed, f"{dataset} train split")
    return torch.stack(rows) if rows else torch.empty(0, seqlen, dtype=torch.long)


def calibration_windows(ids, nsamples, seqlen, seed=0, what="the calibration text"):
    """(nsamples, seqlen) random windows of the 1-D token stream `ids`, seeded like GPTQ."""
    if len(ids) <= seqlen:
        raise UserError(f"{what} has {len(ids)} tokens, fewer than seqlen + 1 = {seqlen + 1}")
    rng = random.Random(seed)
    rows = [ids[i:i + seqlen] for i in (rng.randint(0, len(ids) - seqlen - 1) for _ in range(nsamples))]
    return torch.stack(rows) if rows else torch.empty(0, seqlen, dtype=torch.long)
