"""tandem: an LLM inference engine built around the prefill/decode split."""
