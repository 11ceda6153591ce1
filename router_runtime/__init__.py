"""The MoE router runtime: a dynamic-expert routing core behind the Open Inference Protocol v2."""

__version__ = "0.1.0"
