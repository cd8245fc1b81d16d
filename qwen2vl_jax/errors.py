"""User-facing errors.

Everything a user can get wrong (a bad image, a prompt that does not fit, a checkpoint that
does not match its config) raises `InputError` with one line that names the problem. The CLIs
print that line and exit non-zero; library callers can catch it as a ValueError. A line that
lists offenders (tensors, parameters, files) names the first few and how many more there are
(`listing`), so it stays short whatever the count.
"""


class InputError(ValueError):
    """Bad user input: the message is one line, meant to be shown as is."""


class CheckpointError(InputError):
    """A checkpoint or config that cannot be loaded as asked."""


def listing(items, limit: int = 4, *, sep: str = ", ", width: int = 200) -> str:
    """The first few of `items` and how many more: 'a, b, c and 33 more'.

    For error lines that name offenders: every item when there are at most `limit` of them
    and they fit in `width` characters, else as many of the first `limit - 1` as fit (at
    least one) and the count of the rest, so the line stays short however many there are.
    Items are shown with str(); one longer than `width` is cut to it."""
    items = [_cut(str(x), width) for x in items]
    if len(items) <= limit and len(sep.join(items)) <= width:
        return sep.join(items)
    shown: list[str] = []
    for item in items[:max(1, limit - 1)]:
        if shown and len(sep.join([*shown, item])) > width:
            break
        shown.append(item)
    return f"{sep.join(shown)} and {len(items) - len(shown)} more"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(1, width - 3)] + "..."
