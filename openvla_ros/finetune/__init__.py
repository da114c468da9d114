"""LoRA / QLoRA fine-tuning of OpenVLA on RLDS datasets, sharing the core's preprocessing and codec."""
