"""How the model's math runs fast: attention backends (attention.py), each beside its plain reference.

The model (minke/model) states the math and calls these; a kernel choice lives here, not in mla.py.
Nothing here imports from the model or above it.
"""
