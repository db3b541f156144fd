"""Models: Hugging Face architectures rewritten on tandem's layers, and their loader.

    loader.load_model(dir, dtype, device)  config.json -> registry.model_class_for
        -> construct on device -> safetensors stream -> model.load_weights (name mapping;
           each parameter's weight_loader places the tensor)
    runner: model.forward(input_ids, positions, attn_metadata) -> hidden (T, hidden)
            model.compute_logits(hidden[rows]) -> logits (N, vocab)

    llama.py     LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
    norm_chain.py  batch-1 decode on CUDA with each RMSNorm carried by the matmuls around it
    registry.py  ARCHITECTURES, model_class_for
    loader.py    load_model, read_hf_config

A model exposes what the runner needs to size and bind the KV cache: num_layers,
num_kv_heads, head_dim, vocab_size, attention_layers().
"""
