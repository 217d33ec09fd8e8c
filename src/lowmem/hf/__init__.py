"""lowmem inside the Hugging Face ecosystem: export a run as a `LlamaForCausalLM` directory
(`lowmem export RUN --to hf DIR`). The other direction, `lowmem train --init-from DIR`, is
lowmem.models.hf (the trainer needs it, below this layer); lowmem's optimizers take any HF causal LM
directly (`lowmem.optim.build("scale", hf_model)`, roles from lowmem.optim.roles), also as
`transformers.Trainer(..., optimizers=(optimizer, None))`. transformers is imported
lazily, only when exporting."""
