"""Prompt in, frames out: TextToVideo (t2v.pipeline.text_to_video), the generation options
(t2v.pipeline.options), the call's keyword adapter (t2v.pipeline.arguments), where sampling
starts (t2v.pipeline.latents), input images and videos (t2v.pipeline.inputs) and video files
(t2v.pipeline.video_io). docs/architecture.md, "Layers".

    from t2v.pipeline import GenerationOptions, TextToVideo
"""

from t2v.pipeline.options import Config, GenerationOptions, load_config
from t2v.pipeline.text_to_video import Generation, TextToVideo, load_pipeline

__all__ = ["Config", "Generation", "GenerationOptions", "TextToVideo", "load_config",
           "load_pipeline"]
