"""Everything between a denoiser and x_0: the noise schedule, the samplers, classifier-free
guidance and the inference tools that wrap the UNet (FreeU, FreeInit, DeepCache, windows,
first frames, prompt weighting and travel; `unet_call` builds the UNet call from FreeU and
DeepCache). Imports t2v.models, never the pipeline, the CLI or training (docs/architecture.md,
"Layers").
"""
