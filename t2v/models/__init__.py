"""The networks: tokenizer, text encoder, UNet3D, VAE, their small layers, LoRA on modules,
memory estimates. Imports nothing of t2v but t2v.config, t2v.errors, t2v.noise and t2v.atomic
(docs/architecture.md, "Layers").
"""
