"""Checkpoint converters and the Hub export.

- `convert_llama_to_transfusion`: the text part of a Transfusion model from a Llama / Mistral / Qwen2 causal LM.
- `convert_transfusion_pytorch`: weights from the `transfusion-pytorch` package, where its modules correspond.
- `export_pipeline`: model + VAE + scheduler + tokenizer → a Hub-ready pipeline folder with a model card.
"""
