"""LoRA in and out: `model+adapter` references applied while tensors stream, `extract-lora`, and adapter merges."""
