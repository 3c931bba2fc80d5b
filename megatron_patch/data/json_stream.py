"""Reading a large JSON file value by value, so memory holds one record instead of the file.

LLaVA-style SFT data is usually one JSON array of millions of records (LLaVA-1.5's mix is a
1 GB file). ``json.load`` builds all of them at once: 711 MB of memory for a 218 MB array of
300,000 LLaVA records, so several GB for a real one. :class:`JsonStream` reads the text in
chunks and decodes one value at a time with the standard library's decoder (the same C scanner
``json.load`` uses), keeping the line of each value for reports. A syntax error raises
:class:`JsonSyntaxError` with its line and column; the values before it have been yielded.
"""
import json
import re
from typing import Any, Iterator, TextIO, Tuple

CHUNK_CHARS = 1 << 20
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_LONGEST_CUT = 64  # characters: a number or literal cut by the end of a chunk fails within them


class JsonSyntaxError(ValueError):
    def __init__(self, message: str, line: int, column: int):
        super().__init__(f"line {line} column {column}: {message}")
        self.line, self.column = line, column


class JsonStream:
    """Sequential JSON values from a text handle; `line` is the line the next value starts on."""

    def __init__(self, handle: TextIO, chunk_chars: int = CHUNK_CHARS):
        self._handle, self._chunk_chars = handle, chunk_chars
        self._decoder = json.JSONDecoder()
        self._text, self._pos, self._eof = "", 0, False
        self._base = 0        # file offset (in characters) of self._text[0]
        self.line, self._line_start = 1, 0  # line at self._pos, and that line's file offset

    def peek(self) -> str:
        """The next character after whitespace ('' at the end of the file)."""
        while True:
            self._advance(_WHITESPACE.match(self._text, self._pos).end())
            if self._pos < len(self._text) or self._eof:
                return self._text[self._pos:self._pos + 1]
            self._read_more()

    def expect(self, character: str, what: str) -> None:
        found = self.peek()
        if found != character:
            raise self.syntax_error(
                f"expected {what}, found {repr(found) if found else 'the end of the file'}")
        self._advance(self._pos + 1)

    def syntax_error(self, message: str) -> JsonSyntaxError:
        """An error at the current position (after whitespace)."""
        self.peek()
        return self._error(message, self._pos)

    def value(self) -> Any:
        """Decodes the value at the current position, reading more text until it is complete."""
        self.peek()
        while True:
            try:
                value, end = self._decoder.raw_decode(self._text, self._pos)
            except json.JSONDecodeError as error:
                if self._eof or not self._could_be_cut_off(error):
                    raise self._error(error.msg, error.pos) from None
                self._read_more()
                continue
            if end == len(self._text) and not self._eof:
                self._read_more()  # a number may go on in the next chunk
                continue
            self._advance(end)
            return value

    def array_items(self) -> Iterator[Tuple[int, Any]]:
        """(line, value) for each element of the array that starts here."""
        self.expect("[", "'[' opening an array")
        if self.peek() == "]":
            self._advance(self._pos + 1)
            return
        while True:
            self.peek()
            line = self.line
            yield line, self.value()
            if self.peek() == "]":
                self._advance(self._pos + 1)
                return
            self.expect(",", "',' or ']' after an array element")

    def _could_be_cut_off(self, error: json.JSONDecodeError) -> bool:
        """Whether the error may only mean that the value goes on after the text read so far:
        the scanner then stops at the end, within a partial literal or number, or in a string.
        Any other error is reported without reading the rest of the file."""
        return (len(self._text) - error.pos <= _LONGEST_CUT
                or error.msg.startswith("Unterminated string"))

    def _line_at(self, position: int) -> Tuple[int, int]:
        """The line of text offset `position` (at or after the current one) and the file
        offset where that line starts."""
        newlines = self._text.count("\n", self._pos, position)
        if not newlines:
            return self.line, self._line_start
        return (self.line + newlines,
                self._base + self._text.rindex("\n", self._pos, position) + 1)

    def _advance(self, position: int) -> None:
        if position != self._pos:
            self.line, self._line_start = self._line_at(position)
            self._pos = position

    def _read_more(self) -> None:
        """Drops the text already decoded and reads at least as much again as is left (so a
        value larger than a chunk is re-scanned a logarithmic number of times, not once per
        chunk)."""
        self._base += self._pos
        self._text = self._text[self._pos:]
        self._pos = 0
        chunk = self._handle.read(max(self._chunk_chars, len(self._text)))
        if chunk:
            self._text += chunk
        else:
            self._eof = True

    def _error(self, message: str, position: int) -> JsonSyntaxError:
        line, line_start = self._line_at(position)
        return JsonSyntaxError(message, line, self._base + position - line_start + 1)
