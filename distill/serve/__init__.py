"""A teacher served over vLLM's OpenAI-compatible completions protocol (`python -m distill.serve`).

engine.py (the model, jitted scoring and generation), protocol.py (request fields and the
response layout), http.py (the threaded HTTP server). Clients: distill.teacher_client.
"""
