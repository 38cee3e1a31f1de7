"""python -m t2v.train: the trainer, its config, data (video folders and procedural clips),
FSDP, model surgery (docs/finetuning.md).
"""
