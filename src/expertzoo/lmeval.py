"""EleutherAI's lm-evaluation-harness for zoos: the lm-eval model `zoo` (a saved zoo folder, experts and routing
included) and tasks on the GSM8K evaluation half (lmeval_tasks/). lm-eval's CLI only knows its own models, so
`python -m expertzoo.lmeval` is that CLI with the model registered and the task folder on --include_path:

    python -m expertzoo.lmeval --model zoo --model_args path=my-zoo,device=cpu --tasks gsm8k_zoo --limit 50

From Python, importing this module registers the model: `lm_eval.simple_evaluate(model="zoo",
model_args={"path": DIR}, tasks=[...], task_manager=expertzoo.lmeval.task_manager())`.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from .data.domains import prepare_gsm8k_qa
from .errors import ZooError
from .build.load import load
from .io.zoo_folder import CONFIG_FILE

try:
    from lm_eval.api.registry import model_registry
    from lm_eval.models.huggingface import HFLM
except ImportError:  # pragma: no cover - depends on the environment
    raise ZooError("lm-evaluation-harness is not installed; run `pip install 'expertzoo[lmeval]'`") from None

log = logging.getLogger(__name__)
TASKS_DIR = Path(__file__).parent / "lmeval_tasks"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# HFLM options that still mean something for a model handed over already built
HFLM_OPTIONS = ("max_length", "truncation", "logits_cache", "add_bos_token", "prefix_token_id", "softmax_dtype",
                "mixed_precision_dtype", "think_end_token", "enable_thinking", "chat_template_args")


class ZooLM(HFLM):
    """A saved zoo (`path=DIR`) as an lm-eval model: lm-eval's HF model around the zoo's transformers model, whose
    ZooLayers route every forward, so loglikelihood, loglikelihood_rolling and generate_until all use the experts.
    Options: path, device (default cuda if available, else cpu), dtype (float32 | bfloat16 | float16; default: as
    loaded), force=NAME[+NAME] (every token to these experts) or base_only=true (no expert: the base alone),
    batch_size, max_batch_size, and HFLM's max_length, add_bos_token, truncation, ... (HFLM_OPTIONS)."""

    def __init__(self, path: str | None = None, device: str | None = None, dtype: str | None = None,
                 force: str | None = None, base_only: bool = False, batch_size: int | str | None = 1,
                 max_batch_size: int | None = 64, **kwargs: Any):
        if path is None or str(path).strip() == "":
            raise ZooError("the zoo model needs path=DIR (a folder saved by `zoo build` or Zoo.save), "
                           "e.g. --model_args path=my-zoo")
        if kwargs.pop("trust_remote_code", False) not in (False, None):
            raise ZooError("trust_remote_code is never enabled for a zoo; drop it from --model_args")
        unknown = sorted(set(kwargs) - set(HFLM_OPTIONS))
        if unknown:
            raise ZooError(f"the zoo model takes no option {unknown[0]!r}; it takes path, device, dtype, force, "
                           f"base_only, batch_size, max_batch_size, {', '.join(HFLM_OPTIONS)}")
        target = _device(device)
        if dtype not in (None, "auto") and dtype not in DTYPES:
            raise ZooError(f"unknown dtype {dtype!r}; choose one of: auto, {', '.join(DTYPES)}")
        self.zoo_path = Path(str(path)).expanduser()
        self.zoo = load(self.zoo_path)  # a ZooError naming the folder when it is not a readable zoo
        self.zoo.model.to(device=target, dtype=DTYPES.get(dtype))
        if base_only or force:  # every token to these experts, or to none (the base alone), for comparisons
            self.zoo.force_expert([] if base_only else [n.strip() for n in str(force).split("+")])
        super().__init__(pretrained=self.zoo.model, tokenizer=self.zoo.tokenizer, backend="causal",
                         batch_size=1 if batch_size is None else batch_size,
                         max_batch_size=64 if max_batch_size is None else max_batch_size, **kwargs)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "ZooLM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "ZooLM":
        """model_args win over --device/--batch_size/--max_batch_size, which lm-eval's CLI always passes (its
        --device defaults to cuda:0), so `--model_args path=DIR,device=cpu` works as written."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    def get_model_info(self) -> dict:
        """What lm-eval records about the model (merged into results["config"]): the zoo, not a hub model."""
        cfg = self.zoo.zoo_config
        return {"model_num_parameters": sum(p.numel() for p in self.zoo.model.parameters()),
                "model_dtype": str(next(self.zoo.model.parameters()).dtype), "zoo_device": str(self.zoo.device),
                "zoo_path": str(self.zoo_path.resolve()), "zoo_base": cfg.base, "zoo_experts": self.zoo.expert_names,
                "zoo_router": cfg.router.kind, "zoo_forced": self.zoo.ctx.forced, "zoo_forwards": self.zoo.ctx.step}


def _device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(str(device))
    except RuntimeError:
        raise ZooError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        log.warning("device %s is not available here (no CUDA); the zoo runs on cpu", device)  # as lm-eval's HF model
        return torch.device("cpu")
    if target.type == "cuda" and (target.index or 0) >= torch.cuda.device_count():
        raise ZooError(f"device {device!r} does not exist here ({torch.cuda.device_count()} CUDA devices); "
                       "use cuda:0 or cpu")
    return target


# A lazy entry: `get_model("zoo")` imports this module by its package name, also under `python -m expertzoo.lmeval`
if "zoo" not in model_registry:
    model_registry.register("zoo", target="expertzoo.lmeval:ZooLM")


# ---------------------------------------------------------------- tasks (lmeval_tasks/*.yaml call these)

def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def gsm8k_dataset(**_: Any):
    """The GSM8K halves of domains.prepare_gsm8k_qa as a DatasetDict: `test` the evaluation half, `train` (the half
    the math expert may have trained on) only for few-shot examples. lm-eval passes --metadata and model_args
    here; they are not needed."""
    import datasets

    train, test = prepare_gsm8k_qa()
    return datasets.DatasetDict({"train": datasets.Dataset.from_list(_rows(train)),
                                 "test": datasets.Dataset.from_list(_rows(test))})


def answer_bits_per_byte(doc: dict, results: list) -> dict:
    """gsm8k_zoo_bpb: (log-likelihood of " " + worked answer given the question, its UTF-8 bytes); the
    `bits_per_byte` aggregation sums both over the documents."""
    ll, _greedy = results[0]
    return {"bits_per_byte": (ll, len((" " + doc["answer"]).encode("utf-8")))}


def task_manager(include_path: str | Path | list | None = None, *, defaults: bool = True):
    """lm-eval's TaskManager with lmeval_tasks/ (and `include_path`, if given) next to lm-eval's own tasks;
    defaults=False leaves lm-eval's own tasks out (indexing them takes ~20 s)."""
    from lm_eval.tasks import TaskManager

    extra = [] if include_path is None else list(include_path) if isinstance(include_path, (list, tuple)) \
        else [include_path]
    return TaskManager(include_path=[str(TASKS_DIR), *map(str, extra)], include_defaults=defaults)


# ---------------------------------------------------------------- the CLI

def main(argv: list[str] | None = None) -> int:
    """lm-eval's CLI (same arguments) with the `zoo` model registered; lmeval_tasks/ is the --include_path unless
    one is given (then name these tasks by file: --tasks .../lmeval_tasks/gsm8k_zoo.yaml). A batch_size in
    --model_args becomes --batch_size too, so lm-eval's summary and results record the batch size the zoo ran with."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("-h", "--help") and not _given(argv, "--include_path"):
        argv += ["--include_path", str(TASKS_DIR)]
    saved, sys.argv = sys.argv, ["lm-eval", *argv]
    try:
        if _zoo_model(argv):
            args = _model_args(argv)
            _check_path_early(args)
            if "batch_size" in args and not _given(argv, "--batch_size"):
                sys.argv += ["--batch_size", args["batch_size"]]
        cli_evaluate()
    except ZooError as err:
        print(f"expertzoo.lmeval: error: {err}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


def _given(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(f"{flag}=") for a in argv)


def _zoo_model(argv: list[str]) -> bool:
    return any(a == "--model=zoo" or (a == "--model" and argv[i + 1:i + 2] == ["zoo"]) for i, a in enumerate(argv))


def _model_args(argv: list[str]) -> dict[str, str]:
    """--model_args as {key: value}: it takes "k=v,k=v" or several "k=v" words."""
    words: list[str] = []
    for i, a in enumerate(argv):
        if a.startswith("--model_args="):
            words.append(a.partition("=")[2])
        elif a == "--model_args":
            for w in argv[i + 1:]:
                if w.startswith("--"):
                    break
                words.append(w)
    pairs = (p.strip().partition("=") for w in words for p in w.split(","))
    return {key: value for key, _, value in pairs if key}


def _check_path_early(args: dict[str, str]) -> None:
    """A `--model zoo` run whose path= is no zoo folder fails now, not after lm-eval has indexed its tasks."""
    value = args.get("path")
    if value and not (Path(value).expanduser() / CONFIG_FILE).is_file():
        load(Path(value).expanduser())  # raises the ZooError that names the folder


if __name__ == "__main__":
    sys.exit(main())
