"""Logprobs in OpenAI's shape: each token's text and exact bytes, and its logprob with the most
likely alternatives (the model's own distribution, see `decode_state.token_logprobs`)."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table) -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenTexts:
    """A token id -> (its text, its bytes): a vocabulary token's byte-level spelling turned back
    into the bytes it stands for (a token may hold part of a character: its text then carries
    U+FFFD where the bytes are cut, as the bytes field says exactly); an added token's bytes
    are its UTF-8."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.added = {int(i) for i in tokenizer.backend.get_added_tokens_decoder()}

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one instance per server, lives as long
    def __call__(self, token: int) -> tuple[str, list[int]]:
        spelled = self.tokenizer.id_to_token(int(token))
        if spelled is None:
            return "", []
        if int(token) in self.added:
            data = spelled.encode("utf-8")
        else:
            table = _byte_of_char()
            data = bytes(table[c] for c in spelled) if all(c in table for c in spelled) else spelled.encode()
        return data.decode("utf-8", errors="replace"), list(data)

    def entry(self, token: int, logprob: float, top) -> dict:
        """One token's entry of `choices[i].logprobs.content`."""
        text, data = self(token)
        alternatives = []
        for t, lp in top or ():
            t_text, t_data = self(t)
            alternatives.append({"token": t_text, "logprob": lp, "bytes": t_data})
        return {"token": text, "logprob": logprob, "bytes": data, "top_logprobs": alternatives}
