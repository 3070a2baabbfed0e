class TokensPrompt(dict):
    """Stand-in for ``vllm.inputs.TokensPrompt`` (a TypedDict in vLLM)."""
