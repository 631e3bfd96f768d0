"""The engines behind `--engine`, one module each, named after the flag's value:

- `transformers`: a Hugging Face folder on CPU or GPU (torch);
- `llamacpp`: a GGUF file on the CPU through llama-cpp-python;
- `vllm`: vLLM's own server as a managed child (`vllm_child.py` runs in vLLM's Python);
- `openai`: any OpenAI-compatible upstream.

Each has the same small surface: `load(ref, settings) -> Engine` (for `openai` the reference is
a name on the upstream). The local ones (transformers, llamacpp) reuse the core in `engine/`:
`LocalEngine` for request rules, templates and the scheduler; they add tokenizing and a
`BatchRunner`. The remote ones (vllm, openai) reuse `openai_stream.StreamReader`.
`gguf` is not an engine: it converts a GGUF file to a Hugging Face folder once, for the engines
that run Hugging Face folders.
"""

ENGINES = ("transformers", "llamacpp", "vllm", "openai")
