"""Input formats on the real files in ../shared/datasets, plus hand-made broken rows."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mote_ray.errors import MoteError
from mote_ray.inputs import detect_format, parse_hh_dialogue, prompt_id, read_prompts


def test_real_files(datasets_dir):
    d = datasets_dir
    adv, rej = read_prompts([str(d / "advbench/harmful_behaviors.csv")])
    assert len(adv) == 520 and not rej and adv[0].question.startswith("Write a script that can exploit")
    dna, rej = read_prompts([str(d / "do_not_answer/information_hazard.jsonl")])
    assert len(dna) + len(rej) == 248 and all("duplicate of" in r.reason for r in rej)
    hh, _ = read_prompts([str(d / "hh_rlhf_harmless/harmless-base/test.jsonl.gz")])
    assert len(hh) > 2000 and any(r.history for r in hh)
    assert all(not r.history or r.history[0].role == "user" for r in hh)
    alpaca, _ = read_prompts([str(d / "alpaca_instructions/alpaca.json")])
    assert alpaca[0].question == "Give three tips for staying healthy."
    hb, _ = read_prompts([str(d / "harmbench_val/harmbench_behaviors_text_val.csv")])
    assert len(hb) == 80


def test_hh_dialogue_split():
    history, q = parse_hh_dialogue("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how do I x?\n\nAssistant: no")
    assert [(m.role, m.content) for m in history] == [("user", "hi"), ("assistant", "hello")] and q == "how do I x?"
    with pytest.raises(ValueError, match="HH-RLHF"):
        parse_hh_dialogue("just text")


def test_broken_rows_go_to_rejects_with_reasons(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "good one"}\n{"prompt": 12345}\n{"not_a_prompt": "x"}\n{broken json\n'
                 '{"prompt": "   "}\n{"prompt": "Good  One"}\n["a list"]\n')
    rows, rejects = read_prompts([str(f)])
    assert [r.question for r in rows] == ["good one"]
    reasons = {r.row: r.reason for r in rejects}
    assert "not text" in reasons[2] and "no prompt column" in reasons[3] and "invalid JSON" in reasons[4]
    assert reasons[5] == "empty prompt" and reasons[6].startswith("duplicate of") and "not an object" in reasons[7]
    assert all(r.source == str(f) and r.raw for r in rejects)


def test_column_mapping_csv_and_parquet(tmp_path):
    c = tmp_path / "x.csv"
    c.write_text("id,ask,other\n1,How are you?,z\n2,,z\n")
    rows, rejects = read_prompts([str(c)], column="ask")
    assert [r.question for r in rows] == ["How are you?"] and rejects[0].reason == "empty prompt"
    p = tmp_path / "x.parquet"
    pq.write_table(pa.table({"question": ["a?", "b?"]}), p)
    assert [r.question for r in read_prompts([str(p)])[0]] == ["a?", "b?"]


def test_formats_are_detected(tmp_path):
    hh = tmp_path / "d.jsonl.gz"
    with gzip.open(hh, "wt") as g:
        g.write(json.dumps({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "x"}) + "\n")
    assert detect_format(str(hh)) == "hh-rlhf"
    assert detect_format("hf:Anthropic/hh-rlhf") == "hf"
    with pytest.raises(MoteError, match="--format"):
        detect_format(str(tmp_path / "x.txt"))
    with pytest.raises(MoteError, match="not found"):
        read_prompts([str(tmp_path / "missing.csv")])


def test_ids_are_stable_content_hashes():
    from mote_ray.records import Message

    assert prompt_id([], "Hello  World") == prompt_id([], "hello world") != prompt_id([Message(role="user", content="x")], "hello world")


# ------------------------------------------------ every reader against its format's reference parser

def _csv_reference_rows(path):
    """Python's csv module on the raw file; a record is a comment when its first line starts with `#`."""
    import csv

    lines = open(path, encoding="utf-8", newline="").read().splitlines(keepends=True)
    rows, consumed = [], 0
    reader = csv.reader(iter(lines))
    for fields in reader:
        first_line = lines[consumed]
        consumed = reader.line_num
        if first_line.startswith("#") or not fields:
            continue
        rows.append(fields)
    header, data = rows[0], rows[1:]
    return [dict(zip(header, r)) for r in data]


def _reference(path):
    p = str(path)
    if p.endswith(".csv"):
        return _csv_reference_rows(p)
    opener = gzip.open if p.endswith(".gz") else open
    with opener(p, "rt", encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:  # JSON Lines
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return data if isinstance(data, list) else [data]


def test_every_reader_matches_the_reference_parser_on_every_shared_file(datasets_dir):
    from mote_ray.inputs import records

    files = sorted(p for p in datasets_dir.rglob("*") if p.is_file()
                   and p.name.lower().removesuffix(".gz").endswith((".csv", ".json", ".jsonl")))
    assert len(files) >= 20, files
    for f in files:
        ref = _reference(f)
        got = [item for _, item in records(str(f))]
        assert len(got) == len(ref), f"{f}: {len(got)} records, reference parser {len(ref)}"
        for i, (a, b) in enumerate(zip(got, ref), 1):
            assert a == b, f"{f} record {i} differs from the reference parser"
        # Every record read becomes a prompt or a reject with a reason: nothing vanishes.
        rows, rejects = read_prompts([str(f)])
        assert len(rows) + len(rejects) == len(ref), f
        assert all(r.reason for r in rejects)


def test_csv_comment_lines_are_whole_records_only(tmp_path):
    # A quoted multi-line field whose line starts with `#` (a Markdown heading in a HarmBench
    # ContextString) is data; the old reader dropped that line and merged rows.
    f = tmp_path / "hb.csv"
    f.write_text('# version=1\nBehavior,ContextString\nq1,"intro\n# Heading\nbody"\n# a comment record\nq2,\n'
                 'q3,"x",extra\n', encoding="utf-8")
    rows, rejects = read_prompts([str(f)])
    assert [(r.row, r.question) for r in rows] == [(1, "intro\n# Heading\nbody\n\nq1"), (2, "q2")]
    assert [(r.row, r.reason) for r in rejects] == [(3, "CSV record has 3 fields, the header has 2")]
