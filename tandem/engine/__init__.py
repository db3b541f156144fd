"""The engine: `Engine` (the in-process core loop), `LLM` (offline API), the tokenizer, the
incremental detokenizer and the output processor. Owns requests from arrival to the final
`RequestOutput`; delegates scheduling to scheduler/, compute to runner/."""
