"""Weight-only quantized parameters, one module per job.

    format     the packed form as stored: the scheme, leaf names, int4 nibbles, dequantizing,
               and the check of a stored tree's packed shapes against the config (numpy only)
    quantize   the offline quantizers: float arrays -> packed leaves (numpy only; convert/ uses them)
    tree       whole parameter trees under a scheme: quantize_params, abstract shapes (jax)
    matmul     the traced product with a packed weight and the packed embedding; the kernel is
               chosen by the model's `backend` setting, never by the process's backend while tracing
    cpu        the CPU form of packed kernels (re-laid once at load) and its kernel

This file imports nothing, so importing `format` or `quantize` does not load jax.
"""
