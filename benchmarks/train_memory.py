"""Training memory of the loss: the vocabulary logits made in one piece or in chunks.

    python benchmarks/train_memory.py [--sizes 2b,7b] [--shapes 1x4096,8x2048,1x8192] [--chunk 2048]

For each model size and batch shape (rows x tokens) the loss and its gradient with respect to
the final hidden states and the output embedding are compiled (nothing runs; the parameters
are abstract) and XLA's memory analysis gives the scratch memory the program needs. "one
piece" is the plain loss over [B, L, vocab] f32 logits, as a loss on full logits computes it;
"chunked" is `chunked_token_loss` with --chunk tokens per piece (the training default). The
decoder's own activations are not included: this isolates what the 151,936-token vocabulary
costs. Prints one table.
"""

from __future__ import annotations

import argparse
import sys


def scratch_gib(module, head, hidden, labels, chunk: int) -> float:
    import jax

    from qwen2vl_jax.train import loop

    def loss(p, h, y):
        return loop.chunked_token_loss(module, p, h, y, chunk)[0]

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(head, hidden, labels).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**30


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="2b,7b", help="model presets (default: 2b,7b)")
    p.add_argument("--shapes", default="1x4096,8x2048,1x8192", help="ROWSxTOKENS batch shapes")
    p.add_argument("--chunk", type=int, default=2048, help="tokens per piece for the chunked loss")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from qwen2vl_jax.config import PRESETS
    from qwen2vl_jax.modules.qwen2vl import Qwen2VLModule, init_shapes

    print(f"{'model':6} {'batch':>8} {'one piece':>10} {'chunked':>9}  ratio   (scratch GiB, bf16 compute, "
          f"f32 params, {jax.default_backend()})")
    for size in args.sizes.split(","):
        cfg = PRESETS[size]
        module = Qwen2VLModule(cfg, jnp.bfloat16)
        shapes = init_shapes(cfg)
        head = {"model": {"embed_tokens": shapes["model"]["embed_tokens"]}}
        if not cfg.tie_word_embeddings:
            head["lm_head"] = shapes["lm_head"]
        head = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), head)
        for shape in args.shapes.split(","):
            rows, tokens = (int(x) for x in shape.split("x"))
            hidden = jax.ShapeDtypeStruct((rows, tokens, cfg.text.hidden_size), jnp.bfloat16)
            labels = jax.ShapeDtypeStruct((rows, tokens), jnp.int32)
            whole = scratch_gib(module, head, hidden, labels, rows * tokens)
            chunked = scratch_gib(module, head, hidden, labels, args.chunk)
            print(f"{size:6} {shape:>8} {whole:10.2f} {chunked:9.2f}  {whole / chunked:4.1f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
