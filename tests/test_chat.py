"""qwen2vl_jax.chat: the streamed text is the generated answer; model names resolve to folders
(`convert.model_folder`)."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest

from qwen2vl_jax.errors import CheckpointError
from qwen2vl_jax.processing.detokenize import reply_text


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """The shipped demo model, or a random-init folder of its layout when it is not shipped."""
    from qwen2vl_jax.config import DEMO_DIR

    if (DEMO_DIR / "config.json").is_file():
        return DEMO_DIR
    from qwen2vl_jax.train import demo

    folder = tmp_path_factory.mktemp("demo")
    demo.init_folder(folder)
    return folder


def test_chat_streams_the_greedy_answer(demo_dir):
    from qwen2vl_jax import Processor, Qwen2VL
    from qwen2vl_jax.chat import chat
    from qwen2vl_jax.train import synthetic

    model, processor = Qwen2VL.from_pretrained(demo_dir), Processor.from_pretrained(demo_dir)
    image, _ = synthetic.single_shape(random.Random(3))
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What shape is this?"}]}]
    out = io.StringIO()
    reply = chat(model, processor, messages, out=out, max_new_tokens=12)

    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    eos = {*model.generation_config.eos_token_ids, processor.tokenizer.token_to_id("<|im_end|>")}
    want = model.generate(**inputs, max_new_tokens=12, eos_token_ids=tuple(eos))[0].tolist()
    if reply.finish_reason == "stop":
        assert want[len(reply.token_ids)] in eos
    else:
        assert len(reply.token_ids) == 12 and not eos & set(want)
    assert reply.token_ids == want[: len(reply.token_ids)]
    assert reply.text == reply_text(processor.tokenizer, reply.token_ids)  # control tokens out, grounding markup kept
    assert out.getvalue() == reply.text + "\n"
    assert reply.prompt_tokens == inputs["input_ids"].shape[1]
    assert reply.vision_tokens == int(np.isin(inputs["input_ids"], [model.config.image_token_id]).sum()) == 16
    assert min(reply.preprocess_s, reply.first_token_s, reply.decode_s) >= 0
    assert 0 < reply.vision_s <= reply.first_token_s  # the image went through the vision tower
    assert "vision tower" in reply.summary() and "prefill" in reply.summary() and "tokens/s" in reply.summary()
    assert chat(model, processor, messages, out=None, max_new_tokens=12).token_ids == reply.token_ids


def test_model_folder(tmp_path, demo_dir):
    from qwen2vl_jax.checkpoint import MARKER
    from qwen2vl_jax.config import DEMO_DIR
    from qwen2vl_jax.convert.convert import model_folder

    assert model_folder(demo_dir) == demo_dir  # a local folder as it is
    if (DEMO_DIR / "config.json").is_file():
        assert model_folder("demo") == DEMO_DIR
    else:
        with pytest.raises(CheckpointError, match="demo model"):
            model_folder("demo")
    done = tmp_path / "Qwen2-VL-2B-Instruct-jax"  # a hub id converted before is reused, offline
    done.mkdir()
    (done / MARKER).write_text("{}")
    assert model_folder("Qwen/Qwen2-VL-2B-Instruct", tmp_path) == done
