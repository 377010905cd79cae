"""Task data from `datasets`: local Parquet/CSV/JSON/Arrow/save_to_disk, hub names (parsed offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from grpo.errors import UserError
from tasks.hub import looks_like_hub_name, parse_hub_source
from tasks.loaders import read_records
from tasks.textmath import GSM8K, MATH
from conftest import REPO

RECORDS = [{"q": f"What is {i} + {i}?", "sol": f"Double it.\n#### {2 * i}"} for i in range(1, 9)]


@pytest.fixture(scope="module")
def local_copies(tmp_path_factory):
    """The same 8 records as parquet, csv, json, arrow and a save_to_disk DatasetDict (train/test)."""
    import datasets

    d = tmp_path_factory.mktemp("data")
    ds = datasets.Dataset.from_list(RECORDS)
    ds.to_parquet(str(d / "x.parquet"))
    ds.to_csv(str(d / "x.csv"), index=False)
    (d / "x.json").write_text(json.dumps(RECORDS))
    ds.save_to_disk(str(d / "single"))
    (arrow,) = (d / "single").glob("*.arrow")
    datasets.DatasetDict({"train": ds.select(range(6)), "test": ds.select(range(6, 8))}).save_to_disk(str(d / "dd"))
    return {"parquet": d / "x.parquet", "csv": d / "x.csv", "json": d / "x.json", "arrow": arrow,
            "dir": d / "single", "dd": d / "dd"}


@pytest.mark.parametrize("kind", ["parquet", "csv", "json", "arrow", "dir"])
def test_local_formats_read_the_same_records(local_copies, kind):
    assert read_records(local_copies[kind]) == RECORDS
    assert read_records(local_copies[kind], limit=3) == RECORDS[:3]


@pytest.mark.parametrize("kind", ["parquet", "csv", "arrow"])
def test_gsm8k_task_from_local_formats_with_column_mapping(local_copies, kind):
    task = GSM8K(path=str(local_copies[kind]), fields={"question": "q", "answer": "sol"}, heldout_fraction=0)
    rows = task.rows("train")
    assert [r["answer"] for r in rows] == [str(2 * i) for i in range(1, 9)]
    assert "What is 1 + 1?" in rows[0]["prompt"][-1]["content"]


def test_heldout_split_of_a_datasets_dict(local_copies):
    task = GSM8K(path=str(local_copies["dd"]), split="train", heldout_split="test",
                 fields={"question": "q", "answer": "sol"})
    assert [r["answer"] for r in task.rows("train")] == ["2", "4", "6", "8", "10", "12"]
    assert [r["answer"] for r in task.rows("heldout")] == ["14", "16"]
    with pytest.raises(UserError, match=r"no split 'validation'; it has \['train', 'test'\]"):
        GSM8K(path=str(local_copies["dd"]), split="validation").rows("train")


def test_json_lines_named_json_and_gzipped_jsonl(tmp_path):
    import gzip

    import datasets

    named_json = tmp_path / "lines.json"
    datasets.Dataset.from_list(RECORDS).to_json(str(named_json))  # datasets writes JSON Lines
    assert read_records(named_json) == RECORDS
    packed = tmp_path / "x.jsonl.gz"
    with gzip.open(packed, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in RECORDS))
    assert read_records(packed, limit=2) == RECORDS[:2]


def test_heldout_path_and_heldout_split_read_the_right_rows(local_copies, tmp_path):
    fields = {"question": "q", "answer": "sol"}
    # a DatasetDict as heldout_path: its heldout_split, not the train split's name
    task = GSM8K(path=str(local_copies["parquet"]), heldout_path=str(local_copies["dd"]), heldout_split="test",
                 split="train", fields=fields)
    assert [r["answer"] for r in task.rows("heldout")] == ["14", "16"]
    assert len(task.rows("train")) == 6  # the two held-out problems left out of training
    with pytest.raises(UserError, match=r"holds splits \['train', 'test'\]; name one with heldout_split="):
        GSM8K(path=str(local_copies["parquet"]), heldout_path=str(local_copies["dd"]), split="train",
              fields=fields).rows("train")
    with pytest.raises(UserError, match="heldout_split names a split of a datasets directory or a hub dataset"):
        GSM8K(path=str(local_copies["parquet"]), heldout_split="test", fields=fields).rows("train")


def test_the_same_question_spaced_differently_stays_on_one_side(tmp_path):
    records = [{"question": f"What is {i} plus {i}?", "answer": f"#### {2 * i}"} for i in range(60)]
    spaced = [{**r, "question": r["question"].replace(" ", "  ") + "\n"} for r in records]
    path = tmp_path / "spaced.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records + spaced))
    task = GSM8K(path=str(path), heldout_fraction=0.3)
    sides = [{" ".join(r["prompt"][-1]["content"].split()) for r in task.rows(s)} for s in ("train", "heldout")]
    assert sides[0] and sides[1] and not sides[0] & sides[1]


def test_unreadable_arrow_is_one_line(tmp_path):
    bad = tmp_path / "bad.arrow"
    bad.write_bytes(b"not arrow at all")
    with pytest.raises(UserError, match=r"bad.arrow: cannot read as arrow"):
        read_records(bad)


def test_hub_names_people_use_parse_offline():
    assert looks_like_hub_name("openai/gsm8k") and looks_like_hub_name("gsm8k")
    for local in ("./data/gsm8k", "/abs/x", "~/x", "data/train.jsonl", "a/b/c", "x.parquet"):
        assert not looks_like_hub_name(local), local
    src = parse_hub_source("openai/gsm8k")
    assert (src.path, src.names, src.split, src.revision) == ("openai/gsm8k", ("main",), "train", None)
    assert parse_hub_source("gsm8k", split="test").names == ("main",)
    assert parse_hub_source("gsm8k", split="test").path == "openai/gsm8k"
    assert parse_hub_source("openai/gsm8k", name="socratic", revision="abc123").names == ("socratic",)
    math = parse_hub_source("hendrycks/competition_math")
    assert math.path == "EleutherAI/hendrycks_math" and len(math.names) == 7 and "no longer" in math.note
    assert parse_hub_source("EleutherAI/hendrycks_math", name=["algebra", "geometry"]).names == ("algebra", "geometry")
    assert parse_hub_source("HuggingFaceH4/MATH-500").split == "test"
    assert parse_hub_source("someone/new-set").names == (None,)
    with pytest.raises(UserError, match="name must be a config name"):
        parse_hub_source("openai/gsm8k", name=[])


def test_hub_call_arguments_streaming_and_limit(monkeypatch):
    """load_dataset gets path, config, split, revision, streaming; a streamed set is read only up to the limit."""
    import datasets

    calls, pulled = [], []

    def gen():
        for r in RECORDS:
            pulled.append(r)
            yield {"problem": r["q"], "solution": f"\\boxed{{{r['sol'][-2:].strip()}}}"}

    def fake_load(path, name=None, split=None, revision=None, streaming=False):
        calls.append((path, name, split, revision, streaming))
        return datasets.IterableDataset.from_generator(gen)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    task = MATH(path="EleutherAI/hendrycks_math", name="algebra", revision="v1", streaming=True, max_records=3,
                heldout_fraction=0)
    assert [r["answer"] for r in task.rows("train")] == ["2", "4", "6"]
    assert calls == [("EleutherAI/hendrycks_math", "algebra", "train", "v1", True)]
    assert len(pulled) <= 4  # streamed: not the whole set
    calls.clear()
    records = read_records("hendrycks/competition_math", streaming=True, limit=10)
    assert [c[1] for c in calls] == ["algebra", "counting_and_probability"]  # 8 + 2 records
    assert len(records) == 10


def test_offline_hub_name_is_one_line_with_the_way_out(tmp_path):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "grpo", "verify", "--audit", "--verifier", "math", "--task", "gsm8k",
                           "--task-args", '{"path": "openai/gsm8k"}', "--out", str(tmp_path / "a")],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and not any("Traceback" in line for line in proc.stderr.splitlines())
    assert ("openai/gsm8k is not a local file or directory, and as a hub dataset: cannot load hub dataset "
            "'openai/gsm8k' config 'main' split 'train'") in lines[0]
    assert "Offline?" in lines[0] and "save_to_disk('DIR')" in lines[0] and "task.args.path: DIR" in lines[0]


@pytest.mark.parametrize("error, says", [
    ("not found", "Dataset 'someone/typo' doesn't exist on the Hub"),
    ("script", "Dataset scripts are no longer supported"),
])
def test_hub_answers_other_than_offline_are_one_line_without_the_offline_hint(monkeypatch, error, says):
    """The hub was reached: a wrong name, a gated or taken-down set (OSErrors) or a loading-script
    set (RuntimeError in datasets 4+) is its own one-line error, not "Offline?" advice."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    def fake_load(path, name=None, split=None, revision=None, streaming=False):
        if error == "not found":
            raise DatasetNotFoundError(f"Dataset '{path}' doesn't exist on the Hub or cannot be accessed.")
        raise RuntimeError(f"Dataset scripts are no longer supported, but found {path.split('/')[-1]}.py")

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    with pytest.raises(UserError) as exc:
        read_records("someone/typo")
    assert says in str(exc.value) and "Offline?" not in str(exc.value)


def test_missing_local_file_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(UserError, match=r"^data file not found: .*/nope.jsonl$"):
        read_records(tmp_path / "nope.jsonl")
