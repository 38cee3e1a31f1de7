"""The command line (python -m t2v.sample) and the web UI (python -m t2v.app).
"""
