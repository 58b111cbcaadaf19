"""Train a LoRA expert on a tiny model with train.fit and write its weights; run alone or under torchrun."""
import json
import sys

import torch
from accelerate import PartialState
from safetensors.torch import save_file

import expertzoo as ez
from expertzoo.data import tokenize
from expertzoo.training.train import train_expert

out = sys.argv[1]
torch.set_num_threads(1)
model, tok = ez.load_base("tiny:llama")
zoo = ez.build({"base": "tiny:llama", "experts": [{"name": "a", "kind": "lora", "rank": 4}]}, model=model, tokenizer=tok)
docs = [{"text": ("abc" * (2 + i % 5) + " xyz ") * (3 + i % 3)} for i in range(16)]
losses = train_expert(zoo, "a", tokenize(docs, tok, 40), steps=4, lr=1e-2, batch_size=4, progress=False)
state = PartialState()
seen = torch.tensor([float(state.process_index + 1)])
if state.num_processes > 1:
    torch.distributed.all_reduce(seen)
if state.is_main_process:
    save_file({f"{i}": p.detach().contiguous() for i, p in enumerate(zoo.expert_parameters("a"))}, out + ".safetensors")
    with open(out + ".json", "w") as f:
        json.dump({"losses": losses, "ranks": state.num_processes, "rank_sum": float(seen)}, f)
