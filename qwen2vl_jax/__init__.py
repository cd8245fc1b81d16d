"""qwen2vl-jax: Qwen2-VL in JAX/Flax.

    from qwen2vl_jax import Processor, Qwen2VL
    processor = Processor.from_pretrained(folder)
    model = Qwen2VL.from_pretrained(folder)
"""

from qwen2vl_jax.config import Qwen2VLConfig, TextConfig, VisionConfig
from qwen2vl_jax.errors import CheckpointError, InputError

__all__ = ["Qwen2VL", "Processor", "process_vision_info", "Qwen2VLConfig", "TextConfig", "VisionConfig", "InputError", "CheckpointError"]
__version__ = "0.1.0"

# XLA's CPU flags read once, when JAX first makes its backends (so this must run before any
# device is used). The concurrency-optimised scheduler keeps every decoder layer's temporaries
# live at once; a quantized prefill then holds each layer's dequantized weights in one temporary
# page-faulted afresh on every call (2B int8, 290-token prompt: peak RSS 10.8 GB and prefill 2.3x
# fp32's; without it 6.2 GB and 1.0x). Only for the jaxlib versions it was measured on, where the
# flag exists (an unknown flag in XLA_FLAGS stops JAX); a value the user set stays.
_XLA_CPU_FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"
_XLA_CPU_FLAG_VERSIONS = ((0, 10),)


def _set_xla_defaults() -> None:
    import os  # noqa: PLC0415
    from importlib import metadata  # noqa: PLC0415

    flags = os.environ.get("XLA_FLAGS", "")
    if _XLA_CPU_FLAG in flags:
        return
    try:
        version = tuple(int(x) for x in metadata.version("jaxlib").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return
    if version in _XLA_CPU_FLAG_VERSIONS:
        os.environ["XLA_FLAGS"] = f"{flags} --{_XLA_CPU_FLAG}=false".strip()


_set_xla_defaults()


def __getattr__(name):
    # Heavy modules load on first use, so `import qwen2vl_jax` stays cheap for the CLIs.
    if name == "Qwen2VL":
        from qwen2vl_jax.api import Qwen2VL

        return Qwen2VL
    if name in ("Processor", "process_vision_info"):
        from qwen2vl_jax import processing

        return getattr(processing, name)
    raise AttributeError(f"module 'qwen2vl_jax' has no attribute {name!r}")
