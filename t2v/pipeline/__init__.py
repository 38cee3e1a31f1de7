"""Prompt in, frames out: TextToVideo, the generation options, video files
(docs/architecture.md, "Layers").
"""
