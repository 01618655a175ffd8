"""consistency-lens: read an LLM's hidden states as text that is checked by construction."""

__version__ = "0.1.0"
