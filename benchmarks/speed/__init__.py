"""Speed and memory of LoFiT training and inference against PEFT LoRA and full fine-tuning:
`python -m benchmarks.speed`.

Modules: `run` (the command line and the order of measurements), `targets` (the model, batches and
head sets measured on), `methods` (every method on one model object, stepping through lofit's own
optimizer step), `knobs` (the switches an ablation flips), `ablations`, `timing` (interleaved timing,
memory probes), `inference` (base vs unmerged vs merged), `report` (speed_<target>.json, speed.md).
`gpu.sh` runs the GPU target on one H100/H200.
"""
