"""Serving without Megatron: step scores from an HF export and its ``score_module.pt``.

    scorer = RGMScorer.from_pretrained("export/")            # transformers + torch only
    result = scorer.score(["<think>Add 2 and 3.\\n\\nGet 5.\\n\\n</think>\\boxed{5}"])[0]
    result.step_scores, result.aggregate

The feature is the output of decoder layer ``sprm_layer`` (default -2: the
penultimate layer, i.e. HF's ``hidden_states[-2]``), read at the position
before each step token, exactly as RGMModel reads it.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_rgm import lazy, ops
from megatron_rgm.config import CHAT, ConfigError
from megatron_rgm.head import HEAD_SAFETENSORS, SPRMHead, head_config, load_head
from megatron_rgm.steps import StepSegmenter
from megatron_rgm.tokenizer import encode, load_tokenizer, prompt_ids


@dataclass
class ScoredText:
    """Step scores (probabilities) of one text and their aggregate."""

    step_scores: list[float]
    aggregate: float
    step_positions: list[int]


def _decoder_layers(model) -> torch.nn.ModuleList:
    inner = getattr(model, "model", model)
    if not hasattr(inner, "layers"):
        raise ConfigError(f"{type(model).__name__} has no decoder layers at .model.layers")
    return inner.layers


class HFFeature:
    """Forward hook on decoder layer ``sprm_layer`` of an HF causal LM: its output is the SPRM feature."""

    def __init__(self, model, sprm_layer: int = -2):
        layers = _decoder_layers(model)
        index = sprm_layer % len(layers)
        self.value: torch.Tensor | None = None
        layers[index].register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.value = output[0] if isinstance(output, tuple) else output


def head_logits(head: torch.nn.Module, feature: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """``[S]`` float32 logits of a ``[b, s, h]`` feature at ``step_mask`` (row-major)."""
    selected = feature[step_mask.to(torch.bool)]
    return head(selected.to(head[0].weight.dtype)).squeeze(-1).float()


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """``AutoModelForCausalLM.from_pretrained`` with the rotary buffers recomputed.

    With torch.distributed initialised (as in every Megatron process),
    transformers 5 was seen here leaving the non-persistent rotary ``inv_freq``
    buffers uninitialised (garbage positions, logits off by ~1e-2). They are
    pure functions of the config, so they are rebuilt after loading.
    """
    transformers = lazy.load("transformers", "loading an HF model")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        quantized = getattr(config, "quantization_config", None) or {}
        # The hub's GPT-OSS (MXFP4 experts): its kernels need a GPU and the `kernels` package; dequantized it runs.
        extra = ({"quantization_config": transformers.Mxfp4Config(dequantize=True)}
                 if (quantized.get("quant_method") if isinstance(quantized, dict) else None) == "mxfp4" else {})
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype,
                                                                  trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as e:  # what transformers raises for a directory it cannot load
        if "trust_remote_code" in str(e):
            raise ConfigError(f"{path} needs its own Python code to load (config.json auto_map), which is not "
                              "run: use a Qwen2/Qwen3/Llama export, or pass trust_remote_code=True if you trust "
                              "it") from None
        raise ConfigError(f"{path} is not a loadable HF model ({str(e).strip().splitlines()[0]}): pass an export "
                          "written by mcore-to-hf") from None
    except pickle.UnpicklingError:  # transformers reads *.bin with weights_only=True
        raise ConfigError(f"{path}: its pytorch_model.bin holds more than tensors (refused to unpickle it, which "
                          "could run code): save the weights as safetensors") from None
    rope_init = lazy.load("transformers.modeling_rope_utils", "loading an HF model").ROPE_INIT_FUNCTIONS
    with torch.no_grad():
        for module in model.modules():
            if not (hasattr(module, "inv_freq") and hasattr(module, "rope_type")):
                continue
            init = getattr(module, "compute_default_rope_parameters", None)
            if module.rope_type != "default" or init is None:
                init = rope_init[module.rope_type]
            inv_freq, scaling = init(module.config)
            module.inv_freq.copy_(inv_freq.to(module.inv_freq.dtype))
            if hasattr(module, "original_inv_freq"):
                module.original_inv_freq.copy_(module.inv_freq)
            module.attention_scaling = scaling
    return model


class RGMScorer:
    """An HF causal LM plus its SPRM head.

    Args:
        model: a transformers causal LM (eval mode is set).
        head: the head module (``SPRMHead``).
        tokenizer: the model's tokenizer (for :meth:`score` on texts).
        sprm_layer: decoder layer whose output feeds the head.
        step_strings: strings ending a step (default ``".\\n\\n"``).
        step_rule: how they are found (:mod:`megatron_rgm.steps`; default the reference's ``exact``).
        aggregation: geometric | arithmetic | product | min | last.
    """

    def __init__(self, model, head: torch.nn.Module, tokenizer=None, sprm_layer: int = -2,
                 step_strings=(".\n\n",), aggregation: str = "geometric", step_rule: str = "exact"):
        self.model = model.eval()
        self.head = head.eval()
        self.tokenizer = tokenizer
        self.feature = HFFeature(model, sprm_layer)
        self.step_strings = tuple(step_strings)
        self.step_rule = step_rule
        self.segmenter = (StepSegmenter.from_tokenizer(tokenizer, step_strings, step_rule)
                          if tokenizer is not None else None)
        self.aggregation = aggregation

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        trust_remote_code: bool = False, **kwargs) -> "RGMScorer":
        """Load ``path`` (config, safetensors, tokenizer) and ``path/score_module.pt`` (or ``sprm_head.safetensors``)."""
        root = Path(path)
        if not root.is_dir():
            raise ConfigError(f"{root} is not a directory: pass an HF export written by mcore-to-hf")
        head_file = next((root / n for n in (HEAD_SAFETENSORS, "score_module.pt") if (root / n).exists()), None)
        if head_file is None:
            raise ConfigError(f"{root} has neither score_module.pt nor sprm_head.safetensors: export with "
                              "tools/convert_checkpoint.py mcore-to-hf, or copy the head file beside the weights")
        model = load_causal_lm(str(root), dtype, trust_remote_code)
        model.to(device)
        hidden = model.config.hidden_size
        sd = load_head(head_file, hidden)
        head = SPRMHead(hidden, sd["0.weight"].shape[0] // hidden, 0.0, dtype=dtype)
        head.load_state_dict(sd)
        head.to(device)
        meta = head_config(root)
        kwargs.setdefault("step_strings", meta["sprm_step_tokens"])  # what the head was trained with
        kwargs.setdefault("step_rule", meta["sprm_step_rule"])
        tokenizer = load_tokenizer(root)
        return cls(model, head, tokenizer, sprm_layer=meta["sprm_layer"], **kwargs)

    @torch.no_grad()
    def step_logits(self, input_ids: torch.Tensor, step_mask: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(LM logits ``[b, s, V]``, head logits ``[S]``) for token ids and a step mask ``[b, s]``."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits, head_logits(self.head, self.feature.value, step_mask)

    def score(self, texts: list[str]) -> list[ScoredText]:
        """Step scores and the aggregate of each text (scored one at a time: no padding effects)."""
        self._need_tokenizer("score")
        return self.score_ids([encode(self.tokenizer, text) for text in texts])

    def score_responses(self, problems: list[str], responses: list[str],
                        prompt_template: str = CHAT) -> list[ScoredText]:
        """Step scores of each response to its problem, the prompt rendered as the policy saw it: the tokenizer's
        chat template (default) or a template string (:func:`megatron_rgm.tokenizer.prompt_ids`); the response's
        ids follow the prompt's, as a sampled response's do."""
        self._need_tokenizer("score_responses")
        if len(problems) != len(responses):
            raise ConfigError(f"score_responses got {len(problems)} problems and {len(responses)} responses: pass "
                              "one problem per response")
        prompts = [prompt_ids(self.tokenizer, prompt_template, p) for p in problems]
        return self.score_ids([q + encode(self.tokenizer, r) for q, r in zip(prompts, responses)],
                              [len(q) for q in prompts])

    def _need_tokenizer(self, call: str) -> None:
        if self.segmenter is None:
            raise ConfigError(f"RGMScorer.{call} needs a tokenizer: pass one, or use score_ids / step_logits on ids")

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]], prompt_lengths: list[int] | None = None) -> list[ScoredText]:
        """Step scores and the aggregate of each token-id sequence (one at a time: no padding effects); with
        ``prompt_lengths``, only the response's tokens end steps, as in sampling (a problem may hold a step string)."""
        self._need_tokenizer("score_ids")
        results = []
        device = next(self.model.parameters()).device
        for n, seq in enumerate(sequences):
            ids = torch.tensor([list(seq)], device=device)
            response = None
            if prompt_lengths is not None:
                response = (torch.arange(ids.shape[1], device=device) >= prompt_lengths[n]).unsqueeze(0)
            layout = self.segmenter(ids, response_mask=response)
            _, logits = self.step_logits(ids, layout.mask)
            agg = ops.segment_aggregate(logits.cpu(), layout.cu_steps.cpu(), self.aggregation)
            results.append(ScoredText(torch.sigmoid(logits).tolist(), float(agg[0]), layout.positions.tolist()))
        return results
