"""qwenrt: Qwen2.5-0.5B-Instruct on CPU-only edge boxes, through llama.cpp and OpenVINO."""

__version__ = "0.1.0"
