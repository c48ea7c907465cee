"""`gymtape serve`: the OpenAI-compatible on-policy server that records every call to a tape.

Request parsing (``_openai``), prompting and the splice (``_prompting``, ``_splice``), the call
log (``_call_log``), the app (``_server``), the entry point both `gymtape serve` and
``python -m recorder.serve --config FILE`` run (``_entry``), child-process supervision
(``_process``: ``ServeProcess``) and the engines (``engines/``: the protocol, ``hf``, ``vllm``,
the embedded default model; a new engine is one file there). Imports the ``tape`` wing, never
``collect``.
"""
