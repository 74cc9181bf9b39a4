"""LoFiT's adapters: the head vectors, the model that carries them, and their files.

| module | job |
|---|---|
| `architectures` | per-model-type tables (attention output projection, LoRA / RED targets) |
| `heads` | head geometry: where each head's slice of the output projection lies |
| `config` | `LofitConfig`, the adapter's settings, validated |
| `wrappers` | small building blocks shared with the baselines' adapters |
| `folding` | the arithmetic of folding an edit into a projection's weight and bias |
| `merged` | merged models that are what their config says (plain transformers reloads them) |
| `base` | what LoFiT and RED adapters share (`AdapterModel`: naming, enabling, merging) |
| `layer` | `LofitProjection`: the head-vector wrapper around one output projection |
| `lm_head` | a contiguous LM-head input, so frozen models generate at full speed |
| `visibility` | the base model's forward signature and save guards, shown through the wrapper |
| `mixed_batch` | one adapter per row of a batch (`adapter_names=`) |
| `fingerprint` | the base model's identity, so an adapter refuses the wrong base |
| `fingerprint_store` | that identity as an adapter stores it: a few bytes per base tensor |
| `persistence` | the adapter's two files (`lofit_config.json`, `lofit_model.safetensors`) |
| `hub` | push to and load from the Hugging Face Hub |
| `model` | `LofitModel` and `get_lofit_model` |
| `composition` | `combine_adapters`: one adapter made of several |
| `base_state` | the base model as the user handed it in, given back as it came |
"""
