"""The demo model: its recipe (python -m t2v.demo), its evaluation (python -m t2v.eval), the
quality grid, and the shipped weights in t2v/demo/model (docs/demo.md, docs/quality.md).
"""
