"""Generation engines behind `gymtape serve`: the protocol (``_protocol``), in-process
transformers (``_hf``), a vLLM server over HTTP (``_vllm``), and the models gymtape embeds
(``_models``: SmolLM2-135M; ``_qwen``: the Qwen2/2.5/3 tokenizer)."""
