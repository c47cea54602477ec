"""Reference servers and data used by the tests and benches, not by the library: the prompt server
(``prompt_server``: an OpenAI-compatible endpoint answering vLLM's ``prompt_logprobs`` and ``echo`` + ``logprobs``),
the arithmetic reasoning task (``arithmetic``) and llama.cpp's run of a GGUF export (``llama_cpp``). Nothing in
``distill`` imports this package (an import-linter contract in ``pyproject.toml``)."""
