"""tnllm as an lm-evaluation-harness model, registered as `tnllm` when this module is imported.

    python -m tnllm.eval harness --model tnllm --model_args checkpoint=DIR --batch_size 16 \
        --tasks piqa,arc_easy

runs the harness's own command line (every `lm_eval` option) with this model registered; the
plain `lm_eval` command cannot load it, as the harness finds models only among the names it was
built with. From Python, import this module and call `lm_eval.simple_evaluate(model="tnllm", ...)`,
or pass a `TnllmLM` instance as the model.

Requests map onto `tnllm.eval.score` and `tnllm.generate`:
  loglikelihood          `continuation_logprobs`: with `reuse_context` each context is prefilled
                         once and its continuations (a multiple-choice question's choices) run
                         from its state.
  loglikelihood_rolling  every text on its own after the prefix token, its windows carrying the
                         state (`tnllm.eval.perplexity.score_documents`): the whole text is
                         context, exactly, for TNL and cosFormer.
  generate_until         `tnllm.generate.complete_ids`: batches of left-padded prompts, greedy or
                         sampled, stopped at eot_token_id, the text cut at the first stop sequence.
"""
from __future__ import annotations

import inspect
import json
import sys
from typing import List, Optional

from lm_eval.__main__ import cli_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import simple_parse_args_string
from tqdm import tqdm

from tnllm import config as config_lib
from tnllm.checkpoint import load_model
from tnllm.eval.perplexity import score_documents
from tnllm.eval.score import continuation_logprobs
from tnllm.generate import complete_ids, serving_params
from tnllm.sampling import make_sampler
from tnllm.tokenizer import load_tokenizer

GENERATION_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


def _argument(name: str, value) -> int:
    return config_lib.check_positive(f"The tnllm model argument {name}", value)


@register_model("tnllm")
class TnllmLM(TemplateLM):
    """A tnllm checkpoint behind the harness's model interface.

    Args (the harness's --model_args):
      checkpoint: a training work directory or an export.
      batch_size: rows run together (the harness's --batch_size); "auto" is not supported.
      reuse_context: prefill each context once for all its continuations (default: where the
        model's state carries the context, i.e. not for the softmax baseline).
      prefix_token: "eos" (default: what precedes a document in tnllm's training stream) or "bos":
        the token an empty context and every rolling text start with.
      add_bos: start every non-empty context with BOS too (the harness's `hf` model does where
        the tokenizer adds BOS by default, as the released SentencePiece tokenizer's may).
      max_length: tokens per window of loglikelihood_rolling (default config.data.seq_len).
      max_gen_toks: generate_until's default token budget.
      seed: seeds sampled generation.
      attention_impl: overrides the checkpoint's parallel form (auto, reference, blockwise, pallas).
      device, max_batch_size: accepted from the harness and ignored (JAX picks the device).
    """

    def __init__(self, checkpoint: str, batch_size=8, reuse_context: Optional[bool] = None,
                 prefix_token: str = "eos", add_bos: bool = False, max_length: Optional[int] = None,
                 max_gen_toks: int = 256, seed: int = 0, attention_impl: Optional[str] = None,
                 device=None, max_batch_size=None, params=None, config=None):
        super().__init__()
        del device, max_batch_size
        if isinstance(batch_size, str) and batch_size.isdigit():
            batch_size = int(batch_size)
        self.batch_size = _argument("batch_size", batch_size)
        self.max_gen_toks = _argument("max_gen_toks", max_gen_toks)
        if prefix_token not in ("eos", "bos"):
            raise ValueError(f"The tnllm model argument prefix_token must be eos or bos, got "
                             f"{prefix_token!r}.")
        if params is None:
            config, params = load_model(checkpoint)
        self.checkpoint_path = checkpoint
        self.config = config
        self.cfg = config_lib.model_config(config)
        if attention_impl:
            self.cfg = self.cfg.replace(attention_impl=attention_impl)
        self.params = serving_params(params, self.cfg)
        self.tokenizer_ = load_tokenizer(config.data.tokenizer)
        self.prefix = prefix_token
        self.add_bos = bool(add_bos)
        self._max_length = _argument("max_length", max_length or int(config.data.seq_len))
        self.reuse_context = reuse_context
        self.seed = int(seed)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config=None) -> "TnllmLM":
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None) -> "TnllmLM":
        """The model of --model_args; the harness's own settings (--batch_size, --device) fill in
        what they do not name, so `--model_args checkpoint=DIR,batch_size=16` works as well as
        `--batch_size 16`."""
        known = set(inspect.signature(cls.__init__).parameters) - {"self", "params", "config"}
        unknown = sorted(set(arg_dict) - known)
        if unknown:
            raise ValueError(f"The tnllm model has no argument {unknown[0]!r}; it takes "
                             f"{', '.join(sorted(known))}.")
        if "checkpoint" not in arg_dict:
            raise ValueError("The tnllm model needs a checkpoint; pass --model_args "
                             "checkpoint=WORKDIR_OR_EXPORT.")
        extra = {k: v for k, v in (additional_config or {}).items()
                 if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def from_params(cls, params, config, **kwargs) -> "TnllmLM":
        """A model from parameters in memory (`tnllm.checkpoint.load_model`'s pair)."""
        return cls(checkpoint="<in memory>", params=params, config=config, **kwargs)

    # ------------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer_.eos_id if self.prefix == "eos" else self.tokenizer_.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.config.data.tokenizer)

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> List[int]:
        bos = self.add_bos if add_special_tokens is None else add_special_tokens
        return [self.tokenizer_.bos_id] * bool(bos and string) + list(self.tokenizer_.encode(string))

    def tok_decode(self, tokens) -> str:
        return self.tokenizer_.decode(list(tokens))

    # ------------------------------------------------------------------ requests

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        return continuation_logprobs(
            self.params, self.cfg, [(ctx, cont) for _, ctx, cont in requests],
            batch_size=self.batch_size, reuse_context=self.reuse_context,
            progress=not disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        texts = [req.args[0] for req in requests]
        return score_documents(self.params, self.cfg, texts, self.tokenizer_,
                               context=self.max_length, prefix_id=self.prefix_token_id,
                               batch_size=self.batch_size,
                               progress=not disable_tqdm)["per_document"]

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        groups = {}  # requests with the same generation settings run together
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: List[Optional[str]] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", unit="request",
                   disable=disable_tqdm)
        for indices in groups.values():
            until, max_new, sampler = self._generation_settings(requests[indices[0]].args[1])
            prompts = {i: self.tok_encode(requests[i].args[0]) or [self.prefix_token_id]
                       for i in indices}
            # Longest first: prompts of similar lengths share a batch and its padded length.
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            # Rows decode up to max_gen_toks (or EOS) and the text is cut after: stopping at a
            # stop sequence would need it matched inside the compiled loop, which sees token ids
            # only, while a string has many tokenizations (" x" ends "a x" as one token or two).
            for i, completion in zip(order, complete_ids(
                    self.params, self.cfg, self.tokenizer_, [prompts[i] for i in order],
                    max_new_tokens=max_new, eos_id=self.eot_token_id, sampler=sampler,
                    seed=self.seed, batch_size=self.batch_size)):
                out[i] = cut_at_stop(completion.text, until)
                bar.update(1)
        bar.close()
        return out

    def _generation_settings(self, kwargs: dict):
        unknown = sorted(set(kwargs) - set(GENERATION_KEYS))
        if unknown:
            raise ValueError(f"The tnllm model does not know the generation setting {unknown[0]!r}; "
                             f"it takes {', '.join(GENERATION_KEYS)}.")
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = config_lib.check_positive("The generation setting max_gen_toks",
                                            kwargs.get("max_gen_toks", self.max_gen_toks))
        temperature = float(kwargs.get("temperature", 1.0 if kwargs.get("do_sample") else 0.0))
        if not kwargs.get("do_sample", temperature > 0):
            temperature = 0.0
        sampler = make_sampler(temperature, int(kwargs.get("top_k", 0) or 0),
                               float(kwargs.get("top_p", 1.0) or 1.0))
        return until, max_new, sampler


def cut_at_stop(text: str, until) -> str:
    """`text` up to the first occurrence of any stop sequence in `until`."""
    cut = min([text.find(s) for s in until if s and s in text], default=len(text))
    return text[:cut]


def cli(argv: List[str]) -> None:
    """The harness's command line (`lm_eval ...`) with the tnllm model registered."""
    sys.argv = ["lm_eval"] + list(argv)
    try:
        cli_evaluate()
    except (ValueError, FileNotFoundError) as e:  # bad input: one line naming the fix
        raise SystemExit(f"error: {e}") from None
