"""LoRA adapters: file formats (`formats`), where they land on our networks (`targets`), the
runtime layer and 16-bit fusing (`lora`), reading files and repos (`source`)."""
