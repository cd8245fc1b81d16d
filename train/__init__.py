"""Training (installed as qwen2vl_jax.train): the paper's three stages as a small optax loop.

    data       JSONL conversations -> labelled, bucketed, static-shape batches
    stages     which parameters each stage trains, its learning rate and schedule
    loop       the jitted train step (accumulation, freezing, mesh), checkpoints, host loop
    run        one run start to finish (`fit`), what the CLI and the demo call
    cli        `qwen2vl-train`
    synthetic  a PIL-drawn dataset of shapes, colours, counts, words and moving shapes
    demo       trains the shipped demo model through stages 1 -> 2 -> 3
    eval       accuracy on held-out synthetic questions
"""
