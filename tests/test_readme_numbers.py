"""The README's table of measured ratios is the benchmarks' result files, rounded: a number in the
table that no result file holds (a re-run changed it, or it was typed by hand) fails here."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = {"engines": "engines", "generation": "generation", "training": "training", "serving": "serving",
           "mote eval": "mote_eval", "refusal judge": "refusal_judge", "aligners": "aligners"}
# rows whose ratio cell names its values in words, not as `ratio_name`s
WORDED = {"p50 / p95 latency": ["p50_s_c1", "p95_s_c1", "p50_s_c8", "p95_s_c8", "p50_s_c32", "p95_s_c32"]}


def table_rows() -> list[tuple[str, list[str], list[str]]]:
    text = (ROOT / "README.md").read_text()
    table = text.split("Measured here (2 CPUs", 1)[1].split("\n\n", 2)[1]
    rows = []
    for line in table.splitlines()[2:]:  # after the header and the |---| line
        bench, ratio, value = (c.strip() for c in line.strip().strip("|").split("|"))
        names = re.findall(r"`([a-z0-9_]+)`", ratio) or next(v for k, v in WORDED.items() if ratio.startswith(k))
        shown = re.findall(r"\d+(?:\.\d+)?", value.split("(")[0])  # before any parenthesised remark
        rows.append((bench, names, shown))
    return rows


def test_the_table_has_every_benchmark():
    assert {bench for bench, _, _ in table_rows()} == set(RESULTS)


@pytest.mark.parametrize("bench,names,shown", table_rows(), ids=lambda x: x if isinstance(x, str) else None)
def test_each_number_is_its_result_file_rounded(bench, names, shown):
    ratios = json.loads((ROOT / "benchmarks" / "results" / f"{RESULTS[bench]}.json").read_text())["ratios"]
    assert len(shown) == len(names), (bench, names, shown)
    for name, text in zip(names, shown):
        decimals = len(text.split(".")[1]) if "." in text else 0
        assert round(ratios[name], decimals) == float(text), f"{bench} {name}: README {text}, result {ratios[name]}"
