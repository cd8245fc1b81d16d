"""Trains the shipped demo model: a tiny Qwen2-VL taken from random init through the paper's
three stages on the synthetic shapes dataset, then evaluated on held-out images.

    python -m qwen2vl_jax.train.demo                    # writes qwen2vl_jax/assets/demo/
    python -m qwen2vl_jax.train.demo --work /tmp/demo --out DIR --steps 400,2400,600
    python -m qwen2vl_jax.train.demo --work /tmp/demo --out DIR --from-stage 3   # redo stage 3 only

Steps: write the dataset (train/synthetic.py); train a small byte-level BPE tokenizer on its
text (Qwen2's pre-tokenizer and special tokens, so the library's tokenizer and chat template
read it unchanged); write a converted folder with random weights; run `fit` for stage 1
(vision tower + merger, captions), stage 2 (everything, mixed data) and stage 3 (LLM,
question/answer conversations), each stage starting from the previous one's output; copy
the final folder (without training state) to --out with an example image; evaluate.

The shipped model went further: stage 2 continued from this recipe's output, then on datasets
with where-questions (`synthetic --grounding N`); docs/training.md ("The demo model") lists
those qwen2vl-train commands, their wall times and the eval of each.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from qwen2vl_jax.config import DEMO_DIR, Qwen2VLConfig, TextConfig, VisionConfig
from qwen2vl_jax.processing.chat_template import INSTRUCT_TEMPLATE
from qwen2vl_jax.processing.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from qwen2vl_jax.processing.tokenizer import QWEN2_SPLIT_PATTERN, SPECIAL_TOKENS
from qwen2vl_jax.train import synthetic

VOCAB = 1024  # BPE tokens, before the 14 special tokens
PIXELS = {"min_pixels": 56 * 56, "max_pixels": synthetic.SIZE * synthetic.SIZE}


# The demo's widths: the released architecture, small.
DEMO_VISION = dict(depth=4, embed_dim=128, num_heads=4, mlp_ratio=2.0)
DEMO_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, mrope_section=(4, 6, 6))


def demo_config(vocab_size: int, ids: dict[str, int], vision: dict | None = None, text: dict | None = None) -> Qwen2VLConfig:
    """The same architecture as the released models, at small widths (tied embeddings)."""
    text = {**DEMO_TEXT, **(text or {})}
    return Qwen2VLConfig(
        vision=VisionConfig(**{**DEMO_VISION, **(vision or {})}, out_hidden_size=text["hidden_size"]),
        text=TextConfig(vocab_size=vocab_size, max_position_embeddings=4096, rope_theta=10000.0, **text),
        tie_word_embeddings=True,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
    )


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts, vocab_size: int = VOCAB):
    """Byte-level BPE with Qwen2's split regex; the special tokens come after the BPE vocab,
    as in Qwen2's own tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def tokenizer_corpus(seed: int = 0, n: int = 2000) -> list[str]:
    """The dataset's text plus the chat template's, so role names are whole tokens."""
    base = list(synthetic.corpus(seed, n))
    chat = ["system\nYou are a helpful assistant.", "user\n", "assistant\n", "Picture 1: ", "Video 1: "]
    return base + chat * 50


def write_side_files(folder: Path, tok, config: Qwen2VLConfig) -> None:
    """tokenizer.json, tokenizer_config.json, chat_template.json, preprocessor_config.json,
    generation_config.json and config.json, in the layout of the published checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True} for t, i in ids.items()}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": decoder, "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "padding_side": "left", "model_max_length": 4096,
        "clean_up_tokenization_spaces": False, "errors": "replace", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None, "chat_template": INSTRUCT_TEMPLATE,
    }, indent=2) + "\n")
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": INSTRUCT_TEMPLATE}, indent=2) + "\n")
    (folder / "preprocessor_config.json").write_text(json.dumps({
        **PIXELS, "size": {"shortest_edge": PIXELS["min_pixels"], "longest_edge": PIXELS["max_pixels"]},
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
        "do_rescale": True, "do_normalize": True, "do_resize": True, "do_convert_rgb": True,
        "rescale_factor": 1 / 255, "resample": 3,
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
    }, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"], "do_sample": False, "max_new_tokens": 32,
    }, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config.to_hf(), indent=2) + "\n")


def init_folder(folder: Path, seed: int = 0, vocab: int = VOCAB, vision: dict | None = None,
                text: dict | None = None, corpus_size: int = 2000) -> Qwen2VLConfig:
    """A converted folder with a freshly trained tokenizer and random weights."""
    import jax  # noqa: PLC0415

    from qwen2vl_jax import checkpoint as ck  # noqa: PLC0415
    from qwen2vl_jax.modules.qwen2vl import init_params  # noqa: PLC0415

    tok = train_tokenizer(tokenizer_corpus(seed, corpus_size), vocab)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    config = demo_config(tok.get_vocab_size(with_added_tokens=True), ids, vision, text)
    write_side_files(folder, tok, config)
    params = init_params(config, jax.random.PRNGKey(seed))
    ck.save_params(params, folder, overwrite=True)
    return config


# ----------------------------------------------------------------------------- stages
# Larger learning rates than the paper's, as everything starts from random init.
STAGE_LR = {1: 1e-3, 2: 1e-3, 3: 5e-4}


def copy_model(src: Path, dst: Path) -> None:
    """A converted folder without its training state and logs."""
    from qwen2vl_jax import checkpoint as ck  # noqa: PLC0415

    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    ck.copy_side_files(src, dst)
    shutil.copyfile(src / ck.MARKER, dst / ck.MARKER)
    shutil.copytree(src / ck.PARAMS, dst / ck.PARAMS)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen2vl_jax.train.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/qwen2vl-demo", help="dataset and per-stage outputs")
    p.add_argument("--out", default=str(DEMO_DIR), help="where the finished model goes")
    p.add_argument("--steps", default="300,1800,600", help="steps of stage 1,2,3")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--images", type=int, default=synthetic.Counts.images)
    p.add_argument("--videos", type=int, default=synthetic.Counts.videos)
    p.add_argument("--other", type=int, default=None, help="unrelated questions (default: 3/16 of --images)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from-stage", type=int, default=1, choices=(1, 2, 3),
                   help="start at this stage from the previous one's output in --work (default: 1, from random init)")
    args = p.parse_args(argv)
    from qwen2vl_jax.train.run import TrainOptions, fit  # noqa: PLC0415

    steps = [int(s) for s in args.steps.split(",")]
    work = Path(args.work)
    t0 = time.time()
    say = lambda s: print(f"[demo {time.time() - t0:6.0f}s] {s}", file=sys.stderr, flush=True)  # noqa: E731

    losses = {}
    for stage in range(1, args.from_stage):  # the earlier stages' outputs must be there
        log = work / f"stage{stage}" / "train_log.jsonl"
        if not log.is_file():
            p.error(f"--from-stage {args.from_stage} needs a finished stage {stage} in --work (no {log})")
        losses[stage] = json.loads(log.read_text().splitlines()[-1])["loss"]
    data = work / "data"
    if not (data / "stage3.jsonl").exists():
        synthetic.write_dataset(data, args.seed, synthetic.Counts(images=args.images, videos=args.videos,
                                                                   other=args.other))
    say(f"dataset in {data}")
    if args.from_stage == 1:
        model = work / "init"
        if model.exists():
            shutil.rmtree(model)
        init_folder(model, args.seed)
        say(f"random-init model in {model}")
    else:
        model = work / f"stage{args.from_stage - 1}"
        say(f"starting from {model}")

    for stage, n in zip((1, 2, 3), steps):
        if stage < args.from_stage:
            continue
        out = work / f"stage{stage}"
        if out.exists():
            shutil.rmtree(out)
        result = fit(TrainOptions(model=model, data=data / f"stage{stage}.jsonl", stage=stage, steps=n, out=out,
                                  batch_size=args.batch_size, learning_rate=STAGE_LR[stage], warmup_steps=0.05,
                                  seed=args.seed + stage, log_every=25, progress=False), log=say)
        losses[stage] = result["loss"]
        say(f"stage {stage} done: loss {result['loss']:.4f}")
        model = out

    dst = Path(args.out)
    copy_model(model, dst)
    synthetic.make_example_image(dst / "example.png")
    from qwen2vl_jax.train.eval import evaluate  # noqa: PLC0415

    result = evaluate(dst, data / "eval.jsonl")
    summary = {"loss_after_stage": losses, "eval": {k: v for k, v in result.items() if k != "mistakes"},
               "steps": steps, "batch_size": args.batch_size, "seconds": round(time.time() - t0)}
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    say(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
