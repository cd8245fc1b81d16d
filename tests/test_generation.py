"""Generation: greedy tokens equal to HF `generate` (fp32, tiny random models), batching,
streaming, sampling, stopping, no recompilation inside a bucket, and the CLI end to end."""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

import hf_utils

torch = pytest.importorskip("torch")

from compile_counter import count_compiles  # noqa: E402
from qwen2vl_jax.engine import Engine  # noqa: E402
from qwen2vl_jax.errors import InputError  # noqa: E402
from qwen2vl_jax.inputs import bucket  # noqa: E402
from qwen2vl_jax.sampling import GenerationConfig, Sampling, sample_token  # noqa: E402

CASES = {c.name: c for c in hf_utils.standard_cases()}
N_NEW = 28
EOS = 206


def hf_generate(hf, case, n=N_NEW, **kw) -> np.ndarray:
    with torch.no_grad():
        out = hf.generate(**case.torch_inputs(), max_new_tokens=n, do_sample=False, **kw)
    return out[:, case.input_ids.shape[1]:].numpy()


def until_eos(tokens) -> list[int]:
    tokens = [int(t) for t in tokens]
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def assert_same_tokens(mine: np.ndarray, ref: np.ndarray, min_len: int = 24):
    assert mine.shape[0] == ref.shape[0]
    for r in range(ref.shape[0]):
        want, got = until_eos(ref[r]), until_eos(mine[r])
        assert got == want, f"row {r}:\n ours {got}\n HF   {want}"
        assert len(want) >= min_len or want[-1] == EOS


def split_rows(case: hf_utils.Case) -> list[hf_utils.Case]:
    """Each row of a batch as its own case, with its own images and videos."""
    out, img_i, vid_i, img_p, vid_p = [], 0, 0, 0, 0
    for r in range(case.input_ids.shape[0]):
        ids = case.input_ids[r][case.attention_mask[r].astype(bool)]
        starts = np.flatnonzero(ids == hf_utils.VSTART)
        n_img = int(sum(ids[s + 1] == hf_utils.IMG for s in starts))
        n_vid = int(sum(ids[s + 1] == hf_utils.VID for s in starts))
        ig = case.image_grid_thw[img_i: img_i + n_img] if n_img else None
        vg = case.video_grid_thw[vid_i: vid_i + n_vid] if n_vid else None
        ni = int(np.prod(ig, axis=1).sum()) if n_img else 0
        nv = int(np.prod(vg, axis=1).sum()) if n_vid else 0
        out.append(hf_utils.Case(
            f"{case.name}[{r}]", ids[None], np.ones((1, len(ids)), np.int64), ig, vg,
            case.pixel_values[img_p: img_p + ni] if n_img else None,
            case.pixel_values_videos[vid_p: vid_p + nv] if n_vid else None,
        ))
        img_i, vid_i, img_p, vid_p = img_i + n_img, vid_i + n_vid, img_p + ni, vid_p + nv
    return out


# ------------------------------------------------------------------ greedy parity
@pytest.mark.parametrize("model_name", ["untied", "tied"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_greedy_matches_hf(tiny_hf, tiny_ours, model_name, case_name):
    hf, _ = tiny_hf[model_name]
    case = CASES[case_name]
    ref = hf_generate(hf, case)
    mine = tiny_ours[model_name].generate(**case.inputs(), max_new_tokens=N_NEW)
    assert mine.dtype == np.int32 and mine.shape[1] <= N_NEW
    assert_same_tokens(mine, ref)


MIXED = hf_utils.make_case(
    "mixed_batch",
    [[5, 6, 7, 8, 9, 10, 11],  # text only, shortest: left-padded the most
     [5, ("img", (1, 4, 6)), 11, ("img", (1, 2, 2)), 12],  # two images
     [3, ("vid", (2, 4, 4)), 6, ("img", (1, 6, 4)), 2, 9]],  # a video and an image
    [(1, 4, 6), (1, 2, 2), (1, 6, 4)], [(2, 4, 4)], seed=9,
)


def test_batch_matches_hf_and_rows_alone(tiny_hf, tiny_ours):
    hf, _ = tiny_hf["untied"]
    ours = tiny_ours["untied"]
    batch = ours.generate(**MIXED.inputs(), max_new_tokens=N_NEW)
    assert_same_tokens(batch, hf_generate(hf, MIXED))
    for r, single in enumerate(split_rows(MIXED)):
        alone = ours.generate(**single.inputs(), max_new_tokens=N_NEW)
        assert until_eos(alone[0]) == until_eos(batch[r]), f"row {r}"


def test_right_padded_input_is_the_same_batch(tiny_ours):
    """Rows are re-packed on the host, so the padding side of the input does not matter."""
    ours = tiny_ours["untied"]
    case = CASES["left_padded_batch"]
    left = ours.generate(**case.inputs(), max_new_tokens=8)
    ids, mask = np.zeros_like(case.input_ids), np.zeros_like(case.attention_mask)
    for r in range(ids.shape[0]):
        real = case.input_ids[r][case.attention_mask[r].astype(bool)]
        ids[r, : len(real)], mask[r, : len(real)] = real, 1
    right = ours.generate(**{**case.inputs(), "input_ids": ids, "attention_mask": mask}, max_new_tokens=8)
    np.testing.assert_array_equal(left, right)


def test_stream_equals_generate(tiny_ours):
    ours = tiny_ours["tied"]
    case = CASES["left_padded_batch"]
    whole = ours.generate(**case.inputs(), max_new_tokens=12)
    steps = list(ours.generate(**case.inputs(), max_new_tokens=12, stream=True))
    np.testing.assert_array_equal(np.stack(steps, axis=1), whole)


# ------------------------------------------------------------------ stopping and settings
def test_eos_stops_rows_and_pads(tiny_hf, tiny_ours):
    hf, _ = tiny_hf["untied"]
    case = CASES["left_padded_batch"]
    ref = hf_generate(hf, case, n=12)
    # Row 0 stops at its 5th token and row 1 at its 8th (or earlier, where it meets either id).
    stops = [int(ref[0, 4]), int(ref[1, 7])]
    mine = tiny_ours["untied"].generate(**case.inputs(), max_new_tokens=12, eos_token_ids=stops, pad_token_id=0)
    first = [next(i for i, t in enumerate(row) if t in stops) for row in ref]
    assert first[0] != first[1]  # the rows finish at different steps
    for r, f in enumerate(first):
        np.testing.assert_array_equal(mine[r, : f + 1], ref[r, : f + 1])
        assert (mine[r, f + 1:] == 0).all()  # pad after the row's EOS
    assert mine.shape[1] == max(first) + 1 < 12  # the loop ends when every row is done


def test_repetition_penalty_matches_hf(tiny_hf, tiny_ours):
    hf, _ = tiny_hf["tied"]
    case = CASES["one_image"]
    ref = hf_generate(hf, case, n=16, repetition_penalty=1.7)
    mine = tiny_ours["tied"].generate(**case.inputs(), max_new_tokens=16, repetition_penalty=1.7)
    assert_same_tokens(mine, ref, min_len=16)
    assert not np.array_equal(mine, tiny_ours["tied"].generate(**case.inputs(), max_new_tokens=16))


def test_sampling_seeds_and_limits(tiny_ours):
    ours = tiny_ours["untied"]
    inputs = CASES["left_padded_batch"].inputs()
    greedy = ours.generate(**inputs, max_new_tokens=10)
    a = ours.generate(**inputs, max_new_tokens=10, temperature=1.5, seed=1)
    b = ours.generate(**inputs, max_new_tokens=10, temperature=1.5, seed=1)
    c = ours.generate(**inputs, max_new_tokens=10, temperature=1.5, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, greedy)
    # Sampling that can only pick the top token is greedy.
    np.testing.assert_array_equal(ours.generate(**inputs, max_new_tokens=10, temperature=1.0, top_p=1e-6), greedy)
    np.testing.assert_array_equal(
        ours.generate(**inputs, max_new_tokens=10, temperature=1.0, top_k=2, top_p=1e-6, seed=3), greedy)


def test_sample_token_respects_top_k_and_top_p():
    import jax

    logits = np.log(np.array([[0.05, 0.4, 0.3, 0.2, 0.05]], np.float32))
    seen = np.zeros_like(logits, bool)
    keys = jax.random.split(jax.random.PRNGKey(0), 400)

    def draws(**kw):
        generation = GenerationConfig(do_sample=True, **kw)
        s = Sampling.of(generation)
        return set(np.asarray(jax.vmap(lambda k: sample_token(logits, seen, s, k, False))(keys)).ravel().tolist())

    assert draws(top_k=2) == {1, 2}
    assert draws(top_p=0.6) == {1, 2}  # 0.4 < 0.6, then 0.4 + 0.3 >= 0.6 stops
    assert draws(top_p=0.75) == {1, 2, 3}
    assert draws(top_k=3, top_p=0.5) == {1, 2}  # top-p over the renormalised top 3
    assert draws() == {0, 1, 2, 3, 4}
    # The repetition penalty (HF's rule): a seen token's positive logit is divided by it, a
    # negative one multiplied, so both push the seen token 0 below token 1 here.
    pen = Sampling.of(GenerationConfig(repetition_penalty=2.0))
    first_seen = np.array([[True, False, False]])
    for lg in ([1.0, 0.8, -1.0], [-0.5, -0.8, -3.0]):
        assert int(sample_token(np.array([lg], np.float32), first_seen, pen, keys[0], True)[0]) == 1
    # A low temperature sharpens: token 1 has p = 0.4 at T = 1 and 0.4^4 / sum(p^4) = 0.72 at T = 0.25.
    cold = Sampling.of(GenerationConfig(do_sample=True, temperature=0.25))
    share = np.mean(np.asarray(jax.vmap(lambda k: sample_token(logits, seen, cold, k, False))(keys)) == 1)
    assert 0.62 < share < 0.82, share


def test_generation_config_defaults_from_folder():
    from qwen2vl_jax.config import Qwen2VLConfig

    folder = hf_utils.reference_folder("qwen2-vl-7b-instruct")
    generation = GenerationConfig.from_pretrained(folder, Qwen2VLConfig.from_hf(folder))
    assert generation.eos_token_ids == (151645, 151643)
    assert generation.pad_token_id == 151643 and generation.top_k == 1 and generation.do_sample and generation.greedy
    assert generation.replace(temperature=0.7, top_k=0).greedy is False
    assert generation.replace(temperature=0).greedy


def test_bad_input_is_one_line(tiny_ours):
    ours = tiny_ours["untied"]
    case = CASES["one_image"]
    with pytest.raises(InputError, match="context"):
        ours.generate(**case.inputs(), max_new_tokens=5000)
    with pytest.raises(InputError, match="placeholder"):
        ours.generate(input_ids=case.input_ids, attention_mask=case.attention_mask, max_new_tokens=4)
    with pytest.raises(InputError, match="top_p"):
        ours.generate(**case.inputs(), top_p=0.0)
    with pytest.raises(InputError, match="no tokens"):
        ours.generate(input_ids=np.array([[5, 6]]), attention_mask=np.array([[0, 0]]))


# ------------------------------------------------------------------ compilation
def test_no_recompile_within_a_bucket(tiny_ours):
    model = tiny_ours["tied"]
    engine = Engine(model.module)  # fresh jits, so the counts are this test's own

    def generate(case, generation):
        return engine.generate(model.params, model.inputs(**case.inputs(), max_new_tokens=generation.max_new_tokens), generation)

    generation = GenerationConfig(max_new_tokens=6, eos_token_ids=())
    small = hf_utils.make_case("a", [[5, ("img", (1, 4, 6)), 7]], [(1, 4, 6)], seed=1)
    other = hf_utils.make_case("b", [[9, 8, ("img", (1, 2, 4)), 7, 6, 5, 4]], [(1, 2, 4)], seed=2)
    text_a = hf_utils.make_case("c", [[5, 6, 7]])
    text_b = hf_utils.make_case("d", [list(range(1, 41))])
    assert bucket(9) == bucket(13) == bucket(40) == 64
    generate(small, generation)
    generate(text_a, generation)
    with count_compiles() as c:
        generate(other, generation)  # another image size and prompt length, same buckets
        generate(text_b, generation)  # another prompt length, same bucket
        list(engine.stream(model.params, model.inputs(**text_b.inputs(), max_new_tokens=6), generation))  # step: one more function
        list(engine.stream(model.params, model.inputs(**small.inputs(), max_new_tokens=6), generation))
    assert c["n"] == 1, c
    generate(text_b, generation.replace(temperature=0.9, top_k=5, seed=4))  # sampling: its own variant
    with count_compiles() as c:  # other sampling values, seed and max_new_tokens are traced values
        generate(text_a, generation.replace(temperature=0.5, top_p=0.9, seed=7, max_new_tokens=12))
    assert c["n"] == 0, c
    with count_compiles() as c:  # the counter does see a new bucket
        generate(hf_utils.make_case("e", [list(range(1, 80))]), generation)
    assert c["n"] >= 1


def test_logits_compile_once_per_bucket(tiny_ours):
    model = tiny_ours["untied"]
    small = hf_utils.make_case("a", [[5, ("img", (1, 4, 6)), 7]], [(1, 4, 6)], seed=1)
    other = hf_utils.make_case("b", [[9, 8, ("img", (1, 2, 4)), 7, 6, 5, 4]], [(1, 2, 4)], seed=2)
    model.logits(**small.inputs())
    with count_compiles() as c:
        out = model.logits(**other.inputs())  # another prompt length and image size, same buckets
    assert c["n"] == 0, c
    assert out.shape == (1, other.input_ids.shape[1], model.config.text.vocab_size)


def test_attention_kernel_is_fixed_per_model(tiny_ours, monkeypatch):
    """The kernel is a setting of the loaded model, not read while tracing: changing the
    environment later changes nothing for a model already built, and a bad value is one line."""
    from qwen2vl_jax.api import Qwen2VL

    model = tiny_ours["untied"]
    case = CASES["one_image"]
    before = model.logits(**case.inputs())
    monkeypatch.setenv("QWEN2VL_ATTENTION", "cudnn")  # would fail on CPU if it were read now
    np.testing.assert_array_equal(model.logits(**case.inputs()), before)
    assert model.attention == "auto" and model.module.attention == "auto"
    assert Qwen2VL(model.config, model.params, "float32").attention == "cudnn"
    xla = Qwen2VL(model.config, model.params, "float32", attention="xla")
    np.testing.assert_allclose(xla.logits(**case.inputs()), before, rtol=0, atol=1e-6)
    monkeypatch.setenv("QWEN2VL_ATTENTION", "fast")
    with pytest.raises(InputError, match="QWEN2VL_ATTENTION='fast'"):
        Qwen2VL(model.config, model.params, "float32")


def test_bf16_matmul_rounds_only_the_large_products(tiny_ours, monkeypatch):
    """matmul="bf16": a product of 64 rows or more takes bf16-rounded inputs and accumulates in
    f32 (equal to that product computed in float64); fewer rows are the f32 product bit for bit."""
    import jax
    import jax.numpy as jnp

    from qwen2vl_jax.api import Qwen2VL
    from qwen2vl_jax.modules.attention import BF16_MIN_ROWS, dense_dot

    dot, dims = dense_dot("bf16"), (((1,), (0,)), ((), ()))
    assert dense_dot("f32") is None
    rng = np.random.default_rng(0)
    w = rng.normal(size=(33, 17)).astype(np.float32)
    as_bf16 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)  # noqa: E731
    for rows in (BF16_MIN_ROWS - 1, BF16_MIN_ROWS, 200):
        x = rng.normal(size=(rows, 33)).astype(np.float32)
        got = np.asarray(dot(jnp.asarray(x), jnp.asarray(w), dims))
        assert got.dtype == np.float32
        exact_f32 = np.asarray(jax.lax.dot_general(jnp.asarray(x), jnp.asarray(w), dims))
        if rows < BF16_MIN_ROWS:
            np.testing.assert_array_equal(got, exact_f32)
        else:
            np.testing.assert_allclose(got, as_bf16(x) @ as_bf16(w), rtol=1e-6, atol=1e-5)
            assert np.abs(got - exact_f32).max() > 1e-3  # the inputs were rounded

    # A prompt is bucketed to 64 tokens or more, so every prefill takes the bf16 products; with
    # the threshold out of reach, a fresh bf16 model is the f32 model bit for bit.
    model = tiny_ours["untied"]
    mixed = Qwen2VL(model.config, model.params, "float32", matmul="bf16")
    assert mixed.module.matmul == "bf16" and model.module.matmul == "f32"
    case = CASES["one_image"].inputs()
    f32_logits, bf16_logits = model.logits(**case), mixed.logits(**case)
    err = np.abs(bf16_logits - f32_logits).max() / np.abs(f32_logits).max()
    assert 1e-5 < err <= 2e-2, err  # rounded inputs (measured 6.2e-3 of the largest logit), not broken
    monkeypatch.setattr("qwen2vl_jax.modules.attention.BF16_MIN_ROWS", 10**9)
    unreachable = Qwen2VL(model.config, model.params, "float32", matmul="bf16")
    np.testing.assert_array_equal(unreachable.logits(**case), f32_logits)
    monkeypatch.setenv("QWEN2VL_MATMUL", "bf16")
    assert Qwen2VL(model.config, model.params, "float32").matmul == "bf16"
    monkeypatch.setenv("QWEN2VL_MATMUL", "int8")
    with pytest.raises(InputError, match="QWEN2VL_MATMUL='int8'"):
        Qwen2VL(model.config, model.params, "float32")


def test_generation_result_and_stream_timings(tiny_ours):
    model = tiny_ours["tied"]
    case = CASES["one_image"]
    generation = model.generation_settings(max_new_tokens=5, eos_token_ids=())
    result = model.generate_result(case.inputs(), generation)
    assert result.tokens.shape == (1, 5) and not result.finished.any()
    assert 0 < result.vision_s <= result.first_token_s <= result.total_s
    steps = list(model.stream(case.inputs(), generation))
    assert [s.index for s in steps] == list(range(5))
    np.testing.assert_array_equal(np.stack([s.ids for s in steps], axis=1), result.tokens)
    assert steps[0].vision_s > 0
    text_only = list(model.stream(hf_utils.make_case("t", [[5, 6, 7]]).inputs(), generation))
    assert text_only[0].vision_s == 0.0


# ------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def real_vocab_model(tmp_path_factory):
    """A tiny random model with the real Qwen2-VL vocabulary, token ids, tokenizer, chat
    template and preprocessor config, saved as an HF folder."""
    from transformers import Qwen2VLConfig as HFConfig, Qwen2VLForConditionalGeneration

    assets = hf_utils.reference_folder("tokenizer")
    cfg = HFConfig(**hf_utils.TINY_CONFIGS["real_vocab"].to_hf())
    torch.manual_seed(0)
    hf = Qwen2VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape) / (np.sqrt(p.shape[-1]) if p.ndim > 1 else 5.0))
    folder = tmp_path_factory.mktemp("real_vocab")
    hf.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.json", "preprocessor_config.json",
                 "generation_config.json"):
        shutil.copy(assets / name, folder / name)
    from PIL import Image

    rng = np.random.RandomState(0)
    image = folder / "img.png"
    Image.fromarray(rng.randint(0, 255, (70, 90, 3), np.uint8)).save(image)
    return hf, folder, image


def run_cli(argv) -> tuple[int, str, str]:
    from qwen2vl_jax.cli import generate_main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = generate_main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_cli_json_matches_hf(real_vocab_model):
    from qwen2vl_jax.cli import build_messages
    from qwen2vl_jax.processing import Processor

    hf, folder, image = real_vocab_model
    code, out, err = run_cli(["--model", folder, "--image", image, "--image", image, "--prompt", "Compare them.",
                              "--max-new-tokens", 10, "--json"])
    assert code == 0, err
    result = json.loads(out)
    assert set(result) >= {"text", "token_ids"} and isinstance(result["text"], str)
    inputs = Processor.from_pretrained(folder).apply_chat_template(
        build_messages("Compare them.", [image, image]), add_generation_prompt=True, tokenize=True,
        return_dict=True, return_tensors="np")
    t = {k: torch.tensor(v) for k, v in inputs.items()}
    with torch.no_grad():
        ref = hf.generate(**t, max_new_tokens=10, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    eos = {151645, 151643}
    ref = ref[: next((i + 1 for i, x in enumerate(ref) if x in eos), len(ref))]
    assert result["token_ids"] == ref


def test_cli_streams_text(real_vocab_model):
    _, folder, image = real_vocab_model
    argv = ["--model", folder, "--image", image, "--prompt", "Hi", "--max-new-tokens", 6,
            "--temperature", 0.8, "--top-k", 20, "--seed", 3]
    code, out, err = run_cli(argv)
    assert code == 0, err
    code, js, err = run_cli(argv + ["--json"])
    assert code == 0, err
    whole = json.loads(js)["text"]
    assert whole and out == whole + "\n"  # the streamed pieces add up to the whole reply


def test_cli_sampling_follows_the_seed(real_vocab_model):
    _, folder, _ = real_vocab_model
    runs = []
    for seed in (1, 2):  # (the same seed repeating itself is test_sampling_seeds_and_limits)
        code, out, err = run_cli(["--model", folder, "--prompt", "Hi", "--max-new-tokens", 8,
                                  "--temperature", 1.0, "--seed", seed, "--json"])
        assert code == 0, err
        runs.append(json.loads(out)["token_ids"])
    assert runs[0] != runs[1]


@pytest.mark.parametrize("argv, message", [
    (["--image", "missing.png"], "missing.png: no such file"),
    (["--mesh", "data=3"], "needs 3 devices"),
    (["--mesh", "rows=2"], "unknown mesh axis"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--max-new-tokens", "40000"], "context"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--temperature", "nan"], "--temperature must be"),
    (["--repetition-penalty", "nan"], "--repetition-penalty must be"),
    (["--top-k", "99999999999", "--temperature", "1"], "--top-k must be"),
    (["--seed", "18446744073709551615", "--temperature", "1"], "--seed must be"),
    (["--image", "."], "is a folder"),
])
def test_cli_bad_input(real_vocab_model, argv, message):
    _, folder, _ = real_vocab_model
    code, out, err = run_cli(["--model", folder, "--prompt", "Hi", *argv])
    assert code == 2
    assert err.startswith("qwen2vl-generate: error: ") and message in err and err.count("\n") == 1, err


def test_cli_prints_its_version(capsys):
    """`qwen2vl-generate --version`: `PROG VERSION` of the installed package, status 0, no model
    needed (the same helper gives every tool its --version)."""
    import importlib.metadata

    from qwen2vl_jax.cli import generate_main

    with pytest.raises(SystemExit) as exit_:
        generate_main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"qwen2vl-generate {importlib.metadata.version('qwen2vl-jax')}\n"


def test_sampling_request_drops_argmax_defaults():
    """Published Instruct folders ship top_k=1/top_p=0.001; asking for a temperature samples."""
    base = GenerationConfig(do_sample=True, temperature=0.01, top_k=1, top_p=0.001)
    assert base.greedy
    sampled = base.replace(temperature=0.7)
    assert not sampled.greedy and sampled.top_k == 0 and sampled.top_p == 1.0
    kept = base.replace(temperature=0.7, top_k=5)
    assert kept.top_k == 5 and kept.top_p == 1.0
    assert base.replace(temperature=0).greedy



def test_cli_notes_flags_that_greedy_ignores(real_vocab_model):
    _, folder, _ = real_vocab_model
    # The folder's generation_config.json (the published one) samples with top_k=1: argmax.
    code, out, err = run_cli(["--model", folder, "--prompt", "Hi", "--max-new-tokens", 2, "--top-p", 0.9, "--seed", 1])
    assert code == 0, err
    assert err.startswith("note: --top-p, --seed only act when sampling") and err.count("\n") == 1
    code, out, err = run_cli(["--model", folder, "--prompt", "Hi", "--max-new-tokens", 2, "--top-k", 5, "--seed", 1])
    assert code == 0 and err == ""  # top_k=5 at the folder's temperature samples


def test_cli_stops_quietly_when_the_reader_goes(real_vocab_model, tmp_path):
    """`qwen2vl-generate ... | head -c 3`: a closed pipe ends the run with 141, no traceback."""
    from qwen2vl_jax.cli import generate_main

    _, folder, _ = real_vocab_model

    class ClosedPipe(io.StringIO):
        def __init__(self, fd):
            super().__init__()
            self._fd = fd

        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            return self._fd

    with open(tmp_path / "sink", "w") as sink:
        err = io.StringIO()
        with redirect_stdout(ClosedPipe(sink.fileno())), redirect_stderr(err):
            code = generate_main(["--model", str(folder), "--prompt", "Hi", "--max-new-tokens", "4"])
    assert code == 141 and err.getvalue() == ""


@pytest.mark.parametrize("lead", [(1,), (3,), (2, 8), (17,)])
def test_tied_head_equals_the_table_product_for_any_row_count(lead):
    """Few rows on CPU take another form of the product (modules/text.Embed.attend); every
    row count gives x @ E.T."""
    import jax
    import jax.numpy as jnp

    from qwen2vl_jax.modules.text import Embed

    rng = np.random.default_rng(len(lead))
    table = rng.standard_normal((300, 24)).astype(np.float32)
    x = rng.standard_normal((*lead, 24)).astype(np.float32)
    embed = Embed(300, 24, dtype=jnp.float32)
    got = jax.jit(lambda p, x: embed.apply(p, x, method="attend"))({"params": {"embedding": table}}, x)
    assert got.shape == (*lead, 300)
    np.testing.assert_allclose(np.asarray(got), x @ table.T, rtol=1e-5, atol=1e-5)
