"""Accuracy of a model on held-out synthetic questions, per question type (shape, colour,
count, word, motion, off-centre shape, unrelated question, where a shape is:
synthetic.EVAL_TASKS).

    python -m qwen2vl_jax.train.eval --model qwen2vl_jax/assets/demo --data DIR/eval.jsonl

Each row of the eval JSONL holds `messages` (one user turn: an image, a video or neither, and a
question), the `task` and the expected `answer`. The model answers greedily; an answer counts
when the whole of it, lower-cased, with punctuation stripped from its words, equals the
expected one. A grounding row also holds the shape's `box` [x1, y1, x2, y2] in pixels of its
image of size `canvas` [width, height]: its answer counts when the first box the model writes
(Qwen2-VL's markup, read into pixels by qwen2vl_jax.grounding) overlaps that box with an
intersection over union (IoU) of at least 0.5; no box is an IoU of 0. Prints one line per task
(for grounding tasks also the mean IoU) and the total (and, with --json, one JSON object).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qwen2vl_jax import grounding, shell
from qwen2vl_jax.errors import InputError
from qwen2vl_jax.jsonio import parse_json

IOU_HIT = 0.5  # a grounding answer counts from this IoU with the true box


def normalize(text: str) -> str:
    """Lower case, words stripped of surrounding punctuation, single spaces."""
    return " ".join(w for w in (w.strip(".,!?;:'\"") for w in text.lower().split()) if w)


def iou(a, b) -> float:
    """Intersection over union of two boxes [x1, y1, x2, y2]."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def box_iou(answer: str, box, canvas) -> float:
    """The IoU of the answer's first box (in pixels of a canvas = [width, height] image) with
    `box`; 0 when it has none."""
    found, _ = grounding.boxes_for_images(answer, [tuple(canvas)])
    return iou(found[0]["box"], box) if found else 0.0


def _truth(row: dict, where: str) -> dict:
    """A grounding row's box and canvas, checked."""
    if "box" not in row:
        return {}
    box, canvas = row["box"], row.get("canvas")
    numbers = lambda v, n: (isinstance(v, list) and len(v) == n  # noqa: E731
                            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v))
    if not (numbers(box, 4) and numbers(canvas, 2)):
        raise InputError(f"{where}: a grounding row needs 'box' [x1, y1, x2, y2] and 'canvas' [width, height] in pixels")
    return {"box": box, "canvas": canvas}


def evaluate(model_dir: str | Path, data: str | Path, batch_size: int = 16, limit: int | None = None,
             max_new_tokens: int | None = None, progress: bool = True) -> dict:
    """-> {"accuracy": float, "tasks": {task: {"correct", "total", "accuracy"}}, "mistakes": [...]}
    (a grounding task's entry also has "iou": the mean IoU of its answers)

    max_new_tokens: by default, enough for the longest expected answer and a few more.
    progress: a bar on stderr, advanced by each batch's questions."""
    from qwen2vl_jax.api import Qwen2VL  # noqa: PLC0415
    from qwen2vl_jax.processing import Processor  # noqa: PLC0415
    from qwen2vl_jax.processing.detokenize import reply_text  # noqa: PLC0415
    from qwen2vl_jax.train.data import read_jsonl  # noqa: PLC0415

    data = Path(data)
    records, problems = read_jsonl(data)
    if problems:
        raise InputError(f"{len(problems)} bad record(s): " + "; ".join(problems[:3]))
    lines = data.read_bytes().split(b"\n")  # as read_jsonl numbers them
    rows = []
    for rec in records:
        where = f"{data.name} line {rec.line}"
        row = parse_json(lines[rec.line - 1].decode("utf-8-sig"), where, expect=None)
        if not isinstance(row, dict) or "task" not in row or "answer" not in row:
            raise InputError(f"{where}: an eval row needs 'task' and 'answer' beside 'messages'")
        rows.append((rec.messages, row["task"], str(row["answer"]), _truth(row, where)))
    if limit:
        rows = rows[:limit]
    processor = Processor.from_pretrained(model_dir)
    model = Qwen2VL.from_pretrained(model_dir)
    if max_new_tokens is None:
        max_new_tokens = 4 + max((len(processor.tokenizer.encode(a)) for _, _, a, _ in rows), default=1)
    tally = defaultdict(lambda: [0, 0])
    ious = defaultdict(list)
    mistakes = []
    with tqdm(total=len(rows), desc=f"evaluating {data.name}", unit="question", disable=not progress) as bar:
        for k in range(0, len(rows), batch_size):
            chunk = rows[k:k + batch_size]
            texts, media = [], {"image": [], "video": []}
            for messages, _, _, _ in chunk:
                texts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
                for m in messages:
                    for item in [] if isinstance(m["content"], str) else m["content"]:
                        if item["type"] in media:
                            media[item["type"]].append({kk: v for kk, v in item.items() if kk != "type"})
            inputs = processor(text=texts, images=media["image"] or None, videos=media["video"] or None,
                               padding=True)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens)
            # the text as chat gives it: control tokens out, grounding markup kept
            answers = [reply_text(processor.tokenizer, ids) for ids in np.asarray(out)]
            for (messages, task, want, truth), got in zip(chunk, answers):
                if truth:
                    ious[task].append(box_iou(got, truth["box"], truth["canvas"]))
                    ok = ious[task][-1] >= IOU_HIT
                else:
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
        "tasks": {t: {"correct": c, "total": n, "accuracy": c / n,
                      **({"iou": float(np.mean(ious[t]))} if t in ious else {})} for t, (c, n) in sorted(tally.items())},
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
                iou_note = f"  (IoU >= {IOU_HIT}; mean IoU {r['iou']:.3f})" if "iou" in r else ""
                print(f"{task:10s} {r['correct']:4d}/{r['total']:<4d} {100 * r['accuracy']:5.1f}%{iou_note}")
            print(f"{'all':10s} {result['correct']:4d}/{result['total']:<4d} {100 * result['accuracy']:5.1f}%")

    return shell.run(p.prog, go)


if __name__ == "__main__":
    sys.exit(main())
