"""Train a LoRA expert on a tiny model with checkpoints every step; `resume` goes on from the last one.
Usage: fit_ckpt.py OUT CKPT_DIR STEPS [resume]. Writes OUT.safetensors with the final expert weights."""
import sys

import torch
from safetensors.torch import save_file

import expertzoo as ez
from expertzoo.data import tokenize
from expertzoo.training.train import train_expert

out, ckpt, steps, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:] == ["resume"]
torch.set_num_threads(1)
model, tok = ez.load_base("tiny:llama")
zoo = ez.build({"base": "tiny:llama", "experts": [{"name": "a", "kind": "lora", "rank": 4}],
                "router": {"kind": "learned", "jitter": 0.1}}, model=model, tokenizer=tok)
docs = [{"text": ("abc" * (2 + i % 5) + " xyz ") * (3 + i % 3)} for i in range(16)]
train_expert(zoo, "a", tokenize(docs, tok, 40), steps=steps, lr=1e-2, batch_size=4, progress=False,
             checkpoint_dir=ckpt, checkpoint_every=1, resume=resume)
save_file({f"{i}": p.detach().contiguous() for i, p in enumerate(zoo.expert_parameters("a"))}, out + ".safetensors")
