"""Accuracy of a model on held-out synthetic questions, per question type (shape, colour,
count, word, motion, off-centre shape, unrelated question: synthetic.EVAL_TASKS).

    python -m qwen2vl_jax.train.eval --model qwen2vl_jax/assets/demo --data DIR/eval.jsonl

Each row of the eval JSONL holds `messages` (one user turn: an image, a video or neither, and a
question), the `task` and the expected `answer`. The model answers greedily; an answer counts
when the whole of it, lower-cased, with punctuation stripped from its words, equals the
expected one. Prints one line per task and the total (and, with --json, one JSON object).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qwen2vl_jax import shell
from qwen2vl_jax.errors import InputError
from qwen2vl_jax.jsonio import parse_json


def normalize(text: str) -> str:
    """Lower case, words stripped of surrounding punctuation, single spaces."""
    return " ".join(w for w in (w.strip(".,!?;:'\"") for w in text.lower().split()) if w)


def evaluate(model_dir: str | Path, data: str | Path, batch_size: int = 16, limit: int | None = None,
             max_new_tokens: int | None = None, progress: bool = True) -> dict:
    """-> {"accuracy": float, "tasks": {task: {"correct", "total", "accuracy"}}, "mistakes": [...]}

    max_new_tokens: by default, enough for the longest expected answer and a few more.
    progress: a bar on stderr, advanced by each batch's questions."""
    from qwen2vl_jax.api import Qwen2VL  # noqa: PLC0415
    from qwen2vl_jax.processing import Processor  # noqa: PLC0415
    from qwen2vl_jax.train.data import read_jsonl  # noqa: PLC0415

    data = Path(data)
    records, problems = read_jsonl(data)
    if problems:
        raise InputError(f"{len(problems)} bad record(s): " + "; ".join(problems[:3]))
    lines = data.read_bytes().split(b"\n")  # as read_jsonl numbers them
    rows = []
    for rec in records:
        row = parse_json(lines[rec.line - 1].decode("utf-8-sig"), f"{data.name} line {rec.line}", expect=None)
        if not isinstance(row, dict) or "task" not in row or "answer" not in row:
            raise InputError(f"{data.name} line {rec.line}: an eval row needs 'task' and 'answer' beside 'messages'")
        rows.append((rec.messages, row["task"], str(row["answer"])))
    if limit:
        rows = rows[:limit]
    processor = Processor.from_pretrained(model_dir)
    model = Qwen2VL.from_pretrained(model_dir)
    if max_new_tokens is None:
        max_new_tokens = 4 + max((len(processor.tokenizer.encode(a)) for _, _, a in rows), default=1)
    tally = defaultdict(lambda: [0, 0])
    mistakes = []
    with tqdm(total=len(rows), desc=f"evaluating {data.name}", unit="question", disable=not progress) as bar:
        for k in range(0, len(rows), batch_size):
            chunk = rows[k:k + batch_size]
            texts, media = [], {"image": [], "video": []}
            for messages, _, _ in chunk:
                texts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
                for m in messages:
                    for item in [] if isinstance(m["content"], str) else m["content"]:
                        if item["type"] in media:
                            media[item["type"]].append({kk: v for kk, v in item.items() if kk != "type"})
            inputs = processor(text=texts, images=media["image"] or None, videos=media["video"] or None,
                               padding=True)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens)
            answers = processor.batch_decode(np.asarray(out), skip_special_tokens=True)
            for (messages, task, want), got in zip(chunk, answers):
                ok = normalize(got) == normalize(want)
                tally[task][0] += ok
                tally[task][1] += 1
                if not ok and len(mistakes) < 20:
                    question = next(i["text"] for i in messages[-1]["content"] if i["type"] == "text")
                    mistakes.append({"task": task, "question": question, "want": want, "got": got.strip()})
            bar.update(len(chunk))
    correct = sum(c for c, _ in tally.values())
    total = sum(t for _, t in tally.values())
    return {
        "accuracy": correct / max(total, 1),
        "correct": correct,
        "total": total,
        "tasks": {t: {"correct": c, "total": n, "accuracy": c / n} for t, (c, n) in sorted(tally.items())},
        "mistakes": mistakes,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen2vl_jax.train.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the shipped demo model)")
    p.add_argument("--data", required=True, help="eval JSONL (rows with messages, task, answer)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the longest expected answer's tokens and 4 more")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    model = args.model
    if model is None:
        from qwen2vl_jax.config import DEMO_DIR  # noqa: PLC0415

        model = str(DEMO_DIR)

    def go() -> None:
        if args.max_new_tokens is not None and args.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
        result = evaluate(model, args.data, args.batch_size, args.limit, args.max_new_tokens,
                          progress=not args.no_progress)
        if args.json:
            print(json.dumps(result))
        else:
            for task, r in result["tasks"].items():
                print(f"{task:10s} {r['correct']:4d}/{r['total']:<4d} {100 * r['accuracy']:5.1f}%")
            print(f"{'all':10s} {result['correct']:4d}/{result['total']:<4d} {100 * result['accuracy']:5.1f}%")

    return shell.run(p.prog, go)


if __name__ == "__main__":
    sys.exit(main())
