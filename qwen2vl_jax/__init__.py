"""qwen2vl-jax: Qwen2-VL in JAX/Flax.

    from qwen2vl_jax import Processor, Qwen2VL
    processor = Processor.from_pretrained(folder)
    model = Qwen2VL.from_pretrained(folder)
"""

from qwen2vl_jax.config import Qwen2VLConfig, TextConfig, VisionConfig
from qwen2vl_jax.errors import CheckpointError, InputError

__all__ = ["Qwen2VL", "Processor", "process_vision_info", "Qwen2VLConfig", "TextConfig", "VisionConfig", "InputError", "CheckpointError"]
__version__ = "0.1.0"


def __getattr__(name):
    # Heavy modules load on first use, so `import qwen2vl_jax` stays cheap for the CLIs.
    if name == "Qwen2VL":
        from qwen2vl_jax.api import Qwen2VL

        return Qwen2VL
    if name in ("Processor", "process_vision_info"):
        from qwen2vl_jax import processing

        return getattr(processing, name)
    raise AttributeError(f"module 'qwen2vl_jax' has no attribute {name!r}")
