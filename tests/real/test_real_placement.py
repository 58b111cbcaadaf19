"""Mixed placement on the real SmolLM2-135M (marked `real`): a LoRA expert at the MLPs of layers 24-29, an MLP expert
at 18-23, an FFN expert at 12-17 and an attention-projection LoRA at 0-5, each trained a few steps on its own text,
a centroid router fitted per site over the experts there, evaluated, saved, loaded to identical logits, generated."""
from __future__ import annotations

import pytest
import torch

import expertzoo as ez
from expertzoo.data import pad_id, tokenize
from expertzoo.evaluation.evaluate import evaluate
from expertzoo.nn.layer import ZooLayer
from expertzoo.training.fit import fit_router
from expertzoo.training.train import train_expert

pytestmark = pytest.mark.real

MIXED = {
    "base": "smollm2-135m", "sites": ["mlp"], "router": {"kind": "centroid", "top_k": 1},
    "experts": [
        {"name": "code", "kind": "lora", "rank": 8, "alpha": 16, "layers": "24-29"},
        {"name": "math", "kind": "mlp", "hidden": 64, "layers": "18-23"},
        {"name": "prose", "kind": "ffn", "layers": "12-17"},
        {"name": "chat", "kind": "lora", "rank": 4, "sites": ["attn.q_proj", "attn.v_proj"], "layers": "0-5"},
    ],
}
TEXTS = {
    "code": ["def add(a, b):\n    return a + b\n", "import os\nfor name in os.listdir('.'):\n    print(name)\n",
             "class Stack:\n    def __init__(self):\n        self.items = []\n", "x = [i * i for i in range(10)]\n"],
    "math": ["Question: What is 12 times 7? Answer: 12 * 7 = 84. #### 84",
             "Question: Tom has 5 apples and buys 3 more. How many? Answer: 5 + 3 = 8. #### 8",
             "Question: What is 100 divided by 4? Answer: 100 / 4 = 25. #### 25",
             "Question: A box holds 6 eggs. How many eggs are in 4 boxes? Answer: 6 * 4 = 24. #### 24"],
    "prose": ["The river wound slowly through the valley, past the old mill and the quiet farms.",
              "In the autumn the leaves turned gold and red, and the evenings grew cold and long.",
              "She opened the letter with trembling hands and read it twice before she understood.",
              "The village square was empty except for a dog asleep in the shade of the fountain."],
    "chat": ["User: Hello! How are you today?\nAssistant: I'm doing well, thank you for asking.",
             "User: Can you help me plan a trip?\nAssistant: Of course! Where would you like to go?",
             "User: Thanks for your help.\nAssistant: You're welcome, happy to help any time.",
             "User: What's a good name for a cat?\nAssistant: How about Miso, Pepper or Luna?"],
}


@pytest.fixture(scope="module")
def fitted():
    model, tok = ez.load_base("smollm2-135m")
    zoo = ez.build(MIXED, model=model, tokenizer=tok)
    data = {name: tokenize([{"text": t} for t in texts], tok, max_len=64) for name, texts in TEXTS.items()}
    for name in TEXTS:
        train_expert(zoo, name, data[name], steps=3, lr=2e-3, batch_size=2, progress=False)
    fit_router(zoo, data, max_tokens=2000, batch_size=4)
    return zoo, data


def test_each_expert_sits_at_its_own_layers(fitted):
    zoo, _ = fitted
    where = {name: sorted({zoo.model.get_submodule(s).site.layer for s in sites}) for name, sites in
             zoo.placement().items()}
    assert where == {"code": list(range(24, 30)), "math": list(range(18, 24)), "prose": list(range(12, 18)),
                     "chat": list(range(0, 6))}
    assert len(zoo.layers) == 6 + 6 + 6 + 12  # 6 MLPs each, q and v at 6 layers
    assert not isinstance(zoo.model.model.layers[8].mlp, ZooLayer)  # no expert there: the base module, unwrapped
    assert not isinstance(zoo.model.model.layers[0].self_attn.k_proj, ZooLayer)
    assert all(layer.router.fitted.tolist() == [1.0] for layer in zoo.layers)  # one expert per site, fitted


def test_evaluate_save_load_identical_logits_and_generate(fitted, tmp_path):
    zoo, data = fitted
    report = evaluate(zoo, data["math"], pad_id=pad_id(zoo.tokenizer), batch_size=4, progress=False)
    base_nll = None
    with zoo.force_expert([]):
        base_nll = evaluate(zoo, data["math"], pad_id=pad_id(zoo.tokenizer), batch_size=4, progress=False)["nll"]
    assert torch.isfinite(torch.tensor(report["nll"])) and report["nll"] != base_nll
    assert set(report["expert_share"]) == set(TEXTS) and abs(sum(report["expert_share"].values()) - 1) < 1e-6
    zoo.save(tmp_path / "mixed")
    model, tok = ez.load_base("smollm2-135m")
    loaded = ez.load(tmp_path / "mixed", model=model, tokenizer=tok)
    assert loaded.placement() == zoo.placement()
    ids = zoo.tokenizer("def mean(xs):\n    return", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, zoo(input_ids=ids).logits)
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        out, again = zoo.generate(ids, **kw), loaded.generate(ids, **kw)
    assert out.shape == (1, ids.shape[1] + 8) and torch.equal(out, again)
