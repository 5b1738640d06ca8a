"""Generated tokens to text deltas, ending at stop strings that may span token boundaries.

Text is decoded incrementally, as vLLM and TGI do: each token decodes a short window of ids that
starts one emitted token back, and what the window adds to its first part is the new text. The
token before gives the decoder its context (a SentencePiece space, a merge), so the deltas join into
what decoding the whole list gives, at a cost per token that does not grow with the output.
Decoding tokens one at a time would break characters split across tokens and tokenizers that
merge spaces. Text is held back while it is (a) an incomplete UTF-8 sequence (decode ends in
U+FFFD) or (b) a prefix of some stop string, so a streamed client never sees text that a later
stop match removes. The stop string itself is never part of the output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    """The text of one choice, fed one token at a time."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        self._decode = decode
        self._stops = [s for s in stops if s]
        self._prefixes = _StopPrefixes(self._stops)
        self._ids: list[int] = []
        self._window = 0  # where the decoding window starts: one emitted token back
        self._read = 0  # ids up to here are in _text
        self._text = ""  # decoded text so far (complete characters only)
        self._emitted = 0  # characters of _text already handed out
        self._searched = 0  # characters of _text already searched for stops
        self.stopped = False  # a stop string was found; the stream takes no more tokens

    def push(self, token_id: int, *, check_stops: bool = True) -> str:
        """Add a token; return the text that became safe to show (maybe "").

        `check_stops=False` (min_tokens not reached yet) lets stop strings pass as plain text.
        """
        if self.stopped:
            raise RuntimeError("stream already stopped")
        self._ids.append(token_id)
        text = self._decoded()
        if text == self._text or text.endswith(REPLACEMENT):
            return ""  # wait for the rest of the character (or for a token that adds text)
        self._text = text
        self._window, self._read = self._read, len(self._ids)
        if check_stops:
            end = self._find_stop()
            if end is not None:
                self.stopped = True
                return self._emit_until(end)
        self._searched = len(text)
        return self._emit_until(len(text) - self._held_back())

    def flush(self) -> str:
        """At the end of generation: everything not yet emitted, also held-back text."""
        if self.stopped:
            return ""
        self._text = self._decoded()
        self._window = self._read = len(self._ids)
        return self._emit_until(len(self._text))

    def _decoded(self) -> str:
        """The text of all ids: `_text` and what the window from `_window` adds past `_read`."""
        before = self._decode(self._ids[self._window:self._read])
        after = self._decode(self._ids[self._window:])
        if after.startswith(before):
            return self._text + after[len(before):]
        return self._decode(self._ids)  # the decoder rewrote earlier text given what follows (e.g. " ." -> ".")

    def _find_stop(self) -> int | None:
        """Start of the earliest stop string in the new text (and what could overlap it)."""
        longest = max((len(s) for s in self._stops), default=0)
        start = max(0, self._searched - longest + 1)
        found = [i for s in self._stops if (i := self._text.find(s, start)) >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """Length of the longest text suffix that a later token could complete into a stop string."""
        return self._prefixes.held(self._text)

    def _emit_until(self, end: int) -> str:
        end = max(end, self._emitted)
        delta = self._text[self._emitted : end]
        self._emitted = end
        return delta


class _StopPrefixes:
    """Per stop string, the longest of its prefixes that the text ends with, advanced over the new
    text only (Knuth-Morris-Pratt): a token costs what its characters cost. (Checking every prefix
    length per token cost 2-4 ms a token for 16 stop strings of 1,000 characters, on the head's
    thread, which every tenant shares.)"""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = list(stops)
        self._fallbacks = [_prefix_function(stop) for stop in self._stops]
        self._matched = [0] * len(self._stops)
        self._text = ""  # the text the states describe

    def held(self, text: str) -> int:
        """The longest suffix of `text` that is a proper prefix of a stop string."""
        if not self._stops:
            return 0
        if text.startswith(self._text):
            new = text[len(self._text):]
        else:  # the decoder rewrote earlier text: start again from the tail that can matter
            self._matched = [0] * len(self._stops)
            new = text[-max(map(len, self._stops)):]
        self._text = text
        held = 0
        for index, (stop, fallback) in enumerate(zip(self._stops, self._fallbacks)):
            matched = self._matched[index]
            for char in new:
                if matched == len(stop):
                    matched = fallback[matched - 1]
                while matched and stop[matched] != char:
                    matched = fallback[matched - 1]
                matched += stop[matched] == char
            self._matched[index] = matched
            held = max(held, matched if matched < len(stop) else fallback[matched - 1])
        return held


def _prefix_function(text: str) -> list[int]:
    """For each i, the length of the longest proper prefix of text[:i + 1] that is also its suffix."""
    lengths = [0] * len(text)
    for i in range(1, len(text)):
        length = lengths[i - 1]
        while length and text[i] != text[length]:
            length = lengths[length - 1]
        lengths[i] = length + (text[i] == text[length])
    return lengths
