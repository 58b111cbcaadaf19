"""Files: atomic writes, safetensors checkpoints, PEFT adapters, expert and zoo folders, base models, expert sources."""
