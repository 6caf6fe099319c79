"""One integer-list parser (kdtool.options.parse_ints) behind every seed-list flag: `compare
--seeds`, `compare --eval-seeds` and `eval rougel --seeds` give the same one-line errors."""

from __future__ import annotations

import pytest

from kdtool.errors import UserError
from kdtool.options import parse_ints


def test_parse_ints_reads_a_comma_separated_list():
    assert parse_ints("10,20, 30,", "--seeds") == [10, 20, 30]
    assert parse_ints("-1", "--seeds") == [-1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1,x", "--eval-seeds expects comma-separated integers, got '1,x'"),
        ("1.5", "--eval-seeds expects comma-separated integers, got '1.5'"),
        (" , ", "--eval-seeds is empty"),
        ("3,1,3,1,2", "--eval-seeds repeats 1, 3: 3,1,3,1,2"),
    ],
)
def test_parse_ints_mistakes_are_one_line_naming_the_flag(text, message):
    with pytest.raises(UserError) as err:
        parse_ints(text, "--eval-seeds")
    assert str(err.value) == message


COMPARE = ["compare", "--objectives", "sft", "--teacher", "T", "--student", "S", "--data", "d.jsonl"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "rougel", "--model", "M", "--data", "d.jsonl", "--seeds", "4,4"], "--seeds repeats 4"),
        (["eval", "rougel", "--model", "M", "--data", "d.jsonl", "--seeds", ","], "--seeds is empty"),
        ([*COMPARE, "--eval-data", "e", "--output", "o", "--seeds", "1,1"], "--seeds repeats 1"),
        ([*COMPARE, "--eval-data", "e", "--output", "o", "--eval-seeds", "10,x"], "--eval-seeds expects"),
        ([*COMPARE, "--eval-data", "e", "--output", "o", "--eval-seeds", "7,7"], "--eval-seeds repeats 7"),
    ],
)
def test_every_seed_list_flag_is_checked_before_anything_runs(cli, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)  # `compare` would write its output folder here if it got that far
    code, output = cli(*args)
    assert code == 1 and message in output and len(output.strip().splitlines()) == 1, output
    assert not (tmp_path / "o").exists()
