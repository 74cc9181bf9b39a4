"""What touches the disk or the Hub: atomic writes, locks, output-path checks, figures, loading base models.

| module | job |
|---|---|
| `atomic` | files and folders replaced atomically; leftovers of killed writes recovered |
| `locking` | one command at a time per output folder |
| `output_paths` | output paths checked against the inputs before anything is written |
| `figures` | PNG figures written atomically (Agg canvas, no pyplot) |
| `bundled` | the bundled default model (SmolLM2-135M-Instruct GGUF) and its safetensors cache |
| `loading` | `load_model`: a causal LM and its tokenizer from a Hub id, a path or a bundled name |
"""
