"""Reading a Mooncake trace for a replay: good files, and every bad one refused with the file,
the line number and what is wrong."""

from __future__ import annotations

import pytest

from orchestrator.replay.trace_file import load_trace
from router.trace import TraceRequest

GOOD = ('{"timestamp": 0, "input_length": 600, "output_length": 3, "hash_ids": [1, 2]}\n'
        '\n'
        '{"timestamp": 27.5, "input_length": 10, "output_length": 0, "hash_ids": [9]}\n'
        '{"timestamp": 40, "input_length": 512, "output_length": 1, "hash_ids": [1]}\n')


def write(tmp_path, text: str):
    path = tmp_path / "trace.jsonl"
    path.write_text(text)
    return path


def test_reads_every_request_in_file_order_skipping_blank_lines(tmp_path):
    got = load_trace(write(tmp_path, GOOD))
    assert got == [TraceRequest(0.0, 600, 3, (1, 2)), TraceRequest(27.5, 10, 0, (9,)),
                   TraceRequest(40.0, 512, 1, (1,))]


def test_limit_takes_the_first_requests(tmp_path):
    path = write(tmp_path, GOOD)
    assert [r.hash_ids for r in load_trace(path, 2)] == [(1, 2), (9,)]
    assert len(load_trace(path, 10)) == 3


def test_a_bad_line_after_the_limit_is_not_read(tmp_path):
    path = write(tmp_path, GOOD + "not json\n")
    assert len(load_trace(path, 3)) == 3
    with pytest.raises(ValueError, match=r"trace.jsonl:5: not a Mooncake trace line"):
        load_trace(path)


@pytest.mark.parametrize("line, message", [
    ("{not json", "not a Mooncake trace line"),
    ('{"timestamp": 0, "input_length": 5, "output_length": 1}',
     ("not a Mooncake trace line .*KeyError.*hash_ids.*expected timestamp, input_length, "
      "output_length, hash_ids")),
    ('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": 7}',
     "not a Mooncake trace line .*TypeError"),
    ('{"timestamp": 0, "input_length": 0, "output_length": 1, "hash_ids": [1]}',
     "a trace request needs input_length >= 1 and output_length >= 0, got 0 and 1"),
    ('{"timestamp": 0, "input_length": 5, "output_length": -1, "hash_ids": [1]}',
     "a trace request needs input_length >= 1 and output_length >= 0, got 5 and -1"),
    ('{"timestamp": 0, "input_length": 1025, "output_length": 1, "hash_ids": [1, 2]}',
     "2 hash ids cover 1024 tokens, fewer than input_length=1025"),
])
def test_bad_lines_name_the_file_line_and_problem(tmp_path, line, message):
    path = write(tmp_path, GOOD.splitlines(keepends=True)[0] + line + "\n")
    with pytest.raises(ValueError, match=rf"trace.jsonl:2: {message}"):
        load_trace(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ValueError, match=r"trace file '.*nothing.jsonl' not found; give a "
                                         r"Mooncake JSONL trace"):
        load_trace(tmp_path / "nothing.jsonl")
    with pytest.raises(ValueError, match="holds no requests"):
        load_trace(write(tmp_path, "\n\n"))
