"""Token ids -> text as they are generated: the one incremental detokenizer that chat, the CLI
and the server print and stream through.

Each token costs a decode of the last few tokens only (a window that starts at the previous
complete character), not of the whole answer, and a token that ends in the middle of a UTF-8
character yields nothing until the character is complete. Control tokens (<|im_end|>,
<|endoftext|>, the vision markers) are left out of the text; Qwen2-VL's grounding markers
(<|object_ref_*|>, <|box_*|>, <|quad_*|>) stay in it by default, whole, since each is one
token: an answer that grounds something keeps its boxes.
"""

from __future__ import annotations

GROUNDING_TOKENS = ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                    "<|quad_start|>", "<|quad_end|>")


def skipped_ids(tokenizer, keep_grounding: bool = True) -> frozenset[int]:
    """The special tokens' ids a reply's text leaves out (all of them, less the grounding
    markers when keep_grounding)."""
    special = {i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}
    if keep_grounding:
        special -= {i for i in map(tokenizer.backend.token_to_id, GROUNDING_TOKENS) if i is not None}
    return frozenset(special)


def reply_text(tokenizer, ids, keep_grounding: bool = True) -> str:
    """The text of a whole reply's tokens, as `Detokenizer` gives it token by token."""
    skip = skipped_ids(tokenizer, keep_grounding)
    return tokenizer.decode([int(i) for i in ids if int(i) not in skip])


class Detokenizer:
    """`push` one token id at a time and get the text it completes; `text` is everything so far
    and equals a decode of every kept token at once once `flush` has been called."""

    def __init__(self, tokenizer, *, keep_grounding: bool = True, skip: frozenset[int] | None = None):
        self._decode = tokenizer.decode
        self._skip = skipped_ids(tokenizer, keep_grounding) if skip is None else skip
        self.ids: list[int] = []  # the kept tokens (those that make the text)
        self.text = ""
        self._start = 0  # the window decoded for each token: ids[_start:]
        self._done = 0  # ids[_start:_done] have given their text already

    def push(self, token: int) -> str:
        token = int(token)
        if token in self._skip:
            return ""
        self.ids.append(token)
        before = self._decode(self.ids[self._start:self._done])
        after = self._decode(self.ids[self._start:])
        if after.endswith("\ufffd") or len(after) <= len(before):  # a character still incomplete
            return ""
        new = after[len(before):]
        self._start, self._done = self._done, len(self.ids)
        self.text += new
        return new

    def flush(self) -> str:
        """The text of tokens still waiting for the rest of a character (as replacement
        characters, as a whole decode shows them)."""
        if self._done == len(self.ids):
            return ""
        before = self._decode(self.ids[self._start:self._done])
        new = self._decode(self.ids[self._start:])[len(before):]
        self._start = self._done = len(self.ids)
        self.text += new
        return new
