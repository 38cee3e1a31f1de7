"""Weights from files: every checkpoint layout t2v reads (t2v.loading.weights), safe
readers of pickles and safetensors, foreign LoRA formats. Builds on t2v.models and
weights_convert (docs/architecture.md, "Layers").
"""
