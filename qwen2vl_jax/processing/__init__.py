"""Preprocessing: images, videos, tokenizer and chat template -> model inputs (HF parity)."""

from .chat_template import render as render_chat_template
from .image import ImageProcessor, fetch_image, load_image, smart_resize, to_rgb
from .processor import BatchFeature, Processor, extract_vision_info, process_vision_info
from .tokenizer import Qwen2Tokenizer
from .video import VideoProcessor, fetch_video, read_video, resize_frames, smart_nframes

__all__ = [
    "BatchFeature",
    "ImageProcessor",
    "Processor",
    "Qwen2Tokenizer",
    "VideoProcessor",
    "extract_vision_info",
    "fetch_image",
    "fetch_video",
    "load_image",
    "process_vision_info",
    "read_video",
    "render_chat_template",
    "resize_frames",
    "smart_nframes",
    "smart_resize",
    "to_rgb",
]
