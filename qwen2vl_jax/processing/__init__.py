"""Preprocessing: images, videos, tokenizer and chat template -> model inputs.

`Processor` follows HF's Qwen2VLProcessor; `process_vision_info` (with `fetch_image`,
`fetch_video`) follows qwen-vl-utils 0.0.14.
"""

from .chat_template import render as render_chat_template
from .image import ImageProcessor, fetch_image, load_image, smart_resize, to_rgb
from .processor import BatchFeature, Processor, extract_vision_info, process_vision_info
from .tokenizer import Qwen2Tokenizer
from .resample import resize_frames, resize_frames_float
from .video import VideoProcessor, decode_video, fetch_video, read_video, smart_nframes

__all__ = [
    "BatchFeature",
    "ImageProcessor",
    "Processor",
    "Qwen2Tokenizer",
    "VideoProcessor",
    "decode_video",
    "extract_vision_info",
    "fetch_image",
    "fetch_video",
    "load_image",
    "process_vision_info",
    "read_video",
    "render_chat_template",
    "resize_frames",
    "resize_frames_float",
    "smart_nframes",
    "smart_resize",
    "to_rgb",
]
