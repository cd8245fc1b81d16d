"""User-facing errors.

Everything a user can get wrong (a bad image, a prompt that does not fit, a checkpoint that
does not match its config) raises `InputError` with one line that names the problem. The CLIs
print that line and exit non-zero; library callers can catch it as a ValueError. A line that
lists offenders (tensors, parameters, files) names the first few and how many more there are
(`listing`), so it stays short whatever the count.
"""

from pathlib import Path


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


def first_line(e: BaseException | str, width: int | None = None) -> str:
    """The first line of an error's message (or of a text), cut to `width` characters if given, without
    what TensorStore appends to its errors (its spec and 'See full TensorStore details: ...');
    an error with an empty message gives its type's name."""
    text = str(e).split("See full TensorStore details")[0].strip()
    if "See full TensorStore details" in str(e):
        text = text.rstrip(".")
    lines = text.splitlines()
    line = lines[0].strip() if lines else (type(e).__name__ if isinstance(e, BaseException) else "")
    return line if width is None else _cut(line, width)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(1, width - 3)] + "..."


def refuse_inside(out, out_name: str, source, source_name: str, *, what: str = "the input") -> None:
    """Refuses an output folder that is the `source` folder or lies inside it, with one line
    naming both: '--out run is inside the --model folder model; ...'. Every tool that writes a
    folder from another (convert, export, train) calls this before it writes anything.

    out_name, source_name: what the user called them (a flag such as --out, or the usage's
    OUT_DIR); `what` says what the source is in the message ("the model it starts from")."""
    out_r, source_r = Path(out).expanduser().resolve(), Path(source).expanduser().resolve()
    if out_r == source_r:
        raise InputError(f"{out_name} {out} is the {source_name} folder; writing it would overwrite {what}: "
                         f"choose another {out_name}")
    if source_r in out_r.parents:
        raise InputError(f"{out_name} {out} is inside the {source_name} folder {source}; nothing is written into "
                         f"{what}: choose an {out_name} outside it")
