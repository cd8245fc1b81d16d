"""Low-rank adapters (LoRA), one module per job.

    layer        the traced product a projection adds: x @ A @ B * scale (dropout while training)
    tree         adapters as parameter leaves: which weights a regex targets, fresh adapters,
                 attaching them beside the base weights, detaching and merging them
    peft_format  PEFT's adapter folder (adapter_config.json + adapter_model.safetensors), read
                 and written with the names peft uses for Qwen2VLForConditionalGeneration

An adapter on a projection at `head` (say model/layers_3/self_attn/q_proj) is held as leaves of
that module, beside its kernel or its packed weight:

    head/lora_a        float [I, r]    PEFT's lora_A.weight [r, I], transposed
    head/lora_b        float [r, O]    PEFT's lora_B.weight [O, r], transposed
    head/lora_scale    float32 []      lora_alpha / r (or / sqrt(r) with rsLoRA)
    head/lora_dropout  float32 []      only while training with dropout: its rate

so every caller that runs the params (offline generation, the server, training) runs the
adapter with them, and the base weights stay as stored.

This file imports nothing, so importing `peft_format` or `tree` does not load the layer code.
"""
