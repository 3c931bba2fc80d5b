"""Reading a JSON array value by value: the same values as json.load whatever the chunk size,
each with its line, syntax errors where json reports them, and no reading ahead of need."""
import io
import json
import random
import re

import pytest

from megatron_patch.data.json_stream import JsonStream, JsonSyntaxError


class CountingReader(io.StringIO):
    """A text handle that counts the characters handed out."""

    def __init__(self, text):
        super().__init__(text)
        self.chars_read = 0

    def read(self, size=-1):
        chunk = super().read(size)
        self.chars_read += len(chunk)
        return chunk


def random_record(rng, index):
    return {"id": f"{index:06d}", "score": rng.choice([0, -3, 12345678901234567890, 2.5e-7, 1.0]),
            "flag": rng.choice([True, False, None]),
            "conversations": [{"from": "human", "value": "<image>\n" + "é\"\\\n\t☃" * rng.randint(0, 9)},
                              {"from": "gpt", "value": "x" * rng.randint(0, 300)}],
            "nested": [[], {}, [1, [2, [3]]]]}


def array_text(records, indent):
    """The array as json.dumps would write it, plus the line each element starts on."""
    rng = random.Random(1)
    parts, lines, line = ["[\n"], [], 2
    for index, record in enumerate(records):
        lines.append(line)
        element = json.dumps(record, indent=indent, ensure_ascii=rng.random() < 0.5)
        separator = ",\n" if index + 1 < len(records) else "\n"
        parts.append(element + separator)
        line += element.count("\n") + 1
    parts.append("]\n")
    return "".join(parts), lines


@pytest.mark.parametrize("chunk_chars", [1, 7, 64, 4096])
@pytest.mark.parametrize("indent", [None, 2])
def test_values_and_lines_match_json_load_at_any_chunk_size(chunk_chars, indent):
    rng = random.Random(0)
    records = [random_record(rng, i) for i in range(40)]
    text, lines = array_text(records, indent)
    items = list(JsonStream(io.StringIO(text), chunk_chars=chunk_chars).array_items())
    assert [value for _, value in items] == json.loads(text) == records
    assert [line for line, _ in items] == lines


@pytest.mark.parametrize("chunk_chars", [5, 4096])
@pytest.mark.parametrize("damage", ['"conversations",', '"flag": tru,', '"unclosed": [1, 2},',
                                    '"score": 1.0.0,', '"x": "\\q",'])
def test_a_syntax_error_is_placed_where_json_places_it(chunk_chars, damage):
    rng = random.Random(2)
    records = [random_record(rng, i) for i in range(12)]
    text, lines = array_text(records, 1)
    anchor = '"id": "000007",'
    text = text.replace(anchor, anchor + "\n" + damage, 1)
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    stream, values = JsonStream(io.StringIO(text), chunk_chars=chunk_chars), []
    with pytest.raises(JsonSyntaxError) as raised:
        for _, value in stream.array_items():
            values.append(value)
    assert (raised.value.line, raised.value.column) == (expected.value.lineno, expected.value.colno)
    assert values == records[:7]  # the records before the damaged one came out


@pytest.mark.parametrize("text, message", [
    ('[{"a": 1}, {"a": 2}', "expected ',' or ']' after an array element, found the end"),
    ('[{"a": 1} {"a": 2}]', "expected ',' or ']' after an array element, found '{'"),
    ('[{"a": 1},', "Expecting value"),
    ('{"a": 1}', "expected '[' opening an array, found '{'"),
])
def test_structural_errors_say_what_was_expected(text, message):
    with pytest.raises(JsonSyntaxError, match=re.escape(message)):
        list(JsonStream(io.StringIO(text), chunk_chars=3).array_items())


def test_only_what_the_next_record_needs_is_read():
    """Memory holds about one chunk, not the file: after the first record of a 1.6 MB array
    only the first 64 KB chunk has been read; a syntax error in the second record is reported
    without reading the rest either (it cannot be an element cut by the chunk's end)."""
    rng = random.Random(3)
    records = [random_record(rng, i) for i in range(4000)]
    text, _ = array_text(records, 1)
    assert len(text) > 1_500_000
    handle = CountingReader(text)
    items = JsonStream(handle, chunk_chars=65536).array_items()
    next(items)
    assert handle.chars_read == 65536

    broken = CountingReader(text.replace('"id": "000001",', '"id": "000001",,', 1))
    with pytest.raises(JsonSyntaxError, match="Expecting property name"):
        list(JsonStream(broken, chunk_chars=65536).array_items())
    assert broken.chars_read == 65536


def test_a_record_larger_than_a_chunk_is_read_whole():
    big = {"id": "big", "value": "y" * 100_000, "list": list(range(10_000))}
    text = json.dumps([{"id": "small"}, big, {"id": "after"}])
    handle = CountingReader(text)
    values = [value for _, value in JsonStream(handle, chunk_chars=1000).array_items()]
    assert values == [{"id": "small"}, big, {"id": "after"}]
    assert handle.chars_read == len(text)
