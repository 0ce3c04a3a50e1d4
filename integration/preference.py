"""Diversity-aware preference training on group-structured data (DDPO, DORPO, DivPO, DQO-style).

:class:`DiversityPreferenceTrainer` is a ``transformers.Trainer`` whose loss is one call to
:func:`divkernels.group_preference_loss` over a batch of groups. With ``diversity="none"`` it
reproduces the TRL trainer of its loss (TRL 1.x): ``DPOTrainer`` (``loss_type="dpo"``, TRL's
``sigmoid``, and ``"ipo"``), ``ORPOTrainer`` (``"orpo"``) and ``CPOTrainer`` (``"simpo"``, its
``cpo_alpha`` included): the same tokenization, BOS/EOS and truncation rules
(:mod:`divkernels.integration.tokenization`), the same log-probs (summed for DPO/IPO, IPO's
log-ratios per completion token; mean for ORPO/SimPO), the same NLL term (the token-mean
cross-entropy of the prompt + chosen sequences), dropout disabled, TRL's config defaults, and
the same metrics under the same names, averaged over the logging interval. Turning diversity on
is then the only change. ``tests/test_trl_equivalence.py`` checks this step for step.

Data, one row per prompt:

* groups: ``{"prompt", "completions": [...], "rewards": [...]}``; prompts and completions are
  strings or TRL's conversational message lists;
* pairs: TRL's ``{"prompt", "chosen", "rejected"}`` rows, turned into groups by
  :func:`pairs_to_groups` (all responses of a prompt form one group, so deviation is computed over
  all of them; the pairs stay as given).

Under ``torchrun`` / ``accelerate launch`` each process gathers every process's groups
(gradients flow back through the gather), so the loss equals the single-process loss.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments

import divkernels as dk
from divkernels.integration.distributed import (
    gather_rows,
    is_distributed,
    max_over_processes,
    pad_dim,
    row_counts,
    sharded_parameters,
)
from divkernels.integration.embeddings import SentenceEncoder, pool_hidden_states
from divkernels.integration.groups import GroupPreferenceCollator, to_groups, tokenize_rows
from divkernels.integration.models import (
    adapters_disabled,
    create_reference_model,
    disable_dropout,
    is_peft_model,
    load_causal_lm,
    prepare_reference_model,
    unwrapped,
)
from divkernels.integration.tokenization import TOKENIZATION, TRUNCATION_MODES
from divkernels.ops.hidden_loss import linear_backend
from divkernels.ops.linear_logps import token_outputs
from divkernels.reference import POOLINGS
from divkernels.types import (
    DEVIATION_NORMS,
    DIVERSITIES,
    DIVPO_POOLS,
    LOSSES,
    ORPO_WEIGHTINGS,
    PAIR_MODES,
    REFERENCE_LOSSES,
)
from divkernels.validation import check_choice

EMBEDDING_SOURCES = ("encoder", "policy")
Encoder = Callable[[Sequence[str]], torch.Tensor]
# Per-response statistics of the policy forward that the TRL-named metrics average over pairs.
RESPONSE_STATS = ("completion_tokens", "sequence_tokens", "mean_logit_sum", "full_logit_sum", "last_logit_sum",
                  "top1_correct", "entropy_sum")


@dataclass
class DiversityPreferenceConfig(TrainingArguments):
    """``TrainingArguments`` plus the diversity-aware loss, with TRL's defaults (``DPOConfig``,
    ``ORPOConfig``, ``CPOConfig``): ``learning_rate=1e-6``, ``logging_steps=10``,
    ``gradient_checkpointing=True``, ``bf16`` unless ``fp16``, ``max_length=1024``,
    ``truncation_mode="keep_start"``, ``disable_dropout=True``, ``beta=0.1``, ``cpo_alpha=1.0``.

    ``loss_type``: ``"dpo"``, ``"ipo"``, ``"orpo"``, ``"simpo"`` or ``"dpo_listwise"`` (Plackett-Luce over
    each group ranked by reward, with DPO's reference model and tokenization); ``diversity``: ``"none"``,
    ``"deviation"`` (DDPO/DORPO) or ``"logdet_gain"``; ``pairs``: ``"auto"`` (the dataset's
    explicit pairs if it has a ``pairs`` column, else every ``r_i > r_j``), ``"all"``,
    ``"best_worst"`` or ``"divpo"``; ``embedding_source``: ``"encoder"`` (frozen sentence encoder)
    or ``"policy"`` (pooled last hidden states of the response tokens, with gradient);
    ``fused_linear``: policy and reference log-probs (and the logged logit statistics) through
    :func:`divkernels.linear_logps` from the LM head's input, without the logits (what TRL's chunked LM
    head does for its DPOTrainer); ``None`` (the default) takes it whenever :func:`output_head` accepts
    the model (a plain linear head, unsharded, no logit softcapping), else the logits, with a warning.
    """

    # TRL's defaults that differ from TrainingArguments'
    learning_rate: float = field(default=1e-6, metadata={"help": "The initial learning rate (TRL's 1e-6)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps (TRL's 10)."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Recompute activations (TRL's True)."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision; None: True unless fp16 (TRL)."})

    beta: float = field(default=0.1, metadata={"help": "DPO/IPO/SimPO temperature."})
    loss_type: str = field(default="dpo", metadata={"help": "dpo, ipo, orpo, simpo or dpo_listwise."})
    diversity: str = field(default="deviation", metadata={"help": "none, deviation or logdet_gain."})
    pairs: str = field(default="auto", metadata={"help": "auto, all, best_worst, divpo."})
    diversity_alpha: float = field(default=0.0, metadata={"help": "Weight of the -mean logdet regularizer."})
    eps: float = field(default=1.0, metadata={"help": "Ridge of K = S + eps I (DQO: 1)."})
    orpo_lambda: float = field(default=0.1, metadata={"help": "ORPO odds-ratio weight (TRL's ORPO beta)."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO target margin."})
    cpo_alpha: float = field(default=1.0, metadata={
        "help": "Weight of the NLL term added to simpo (TRL's CPOConfig.cpo_alpha; 0 for pure SimPO)."})
    deviation_norm: str = field(default="minmax", metadata={
        "help": "minmax (DDPO/DORPO: (d - d_min) / (mean d - d_min)), mean (ours) or none."})
    min_deviation: float = field(default=0.0, metadata={"help": "Floor on deviation weights."})
    orpo_weighting: str = field(default="dorpo", metadata={
        "help": "dorpo (the authors': weight inside the log-sigmoid, NLL times the mean weight) or pair (ours)."})
    quality_quantile: float = field(default=0.25, metadata={"help": "DivPO pool share (the authors' rho: 0.25)."})
    divpo_pools: str = field(default="ranked", metadata={"help": "ranked (DivPO) or threshold (ours)."})
    embedding_source: str = field(default="encoder", metadata={"help": "encoder or policy."})
    pooling: str = field(default="mean", metadata={"help": "Pooling of policy hidden states: mean or last."})
    max_length: int | None = field(default=1024, metadata={"help": "Tokens of prompt + completion kept (TRL)."})
    truncation_mode: str = field(default="keep_start", metadata={"help": "keep_start or keep_end (TRL, DPO/IPO)."})
    max_prompt_length: int | None = field(default=None, metadata={
        "help": "Ours: keep the prompt's last tokens (None: TRL's rules only)."})
    max_completion_length: int | None = field(default=None, metadata={
        "help": "Ours: keep a completion's first tokens (None: TRL's rules only)."})
    disable_dropout: bool = field(default=True, metadata={"help": "Set every torch.nn.Dropout to p=0 (TRL)."})
    kernel_backend: str = field(default="auto", metadata={"help": "divkernels backend for the loss."})
    fused_linear: bool | None = field(default=None, metadata={
        "help": "Policy and reference log-probs from the last hidden states through the LM head in chunks "
                "(divkernels.linear_logps): the [N, L, V] logits never exist. None: on whenever the model "
                "allows it (a plain Linear head, unsharded, no logit softcapping), else the logits path; "
                "False: always the logits."})
    linear_chunk_size: int | None = field(default=None, metadata={
        "help": "Token rows per LM-head chunk with fused_linear (None: chunk * V <= 2^26)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "The collator reads the raw columns."})

    def __post_init__(self) -> None:
        check_choice("loss_type", self.loss_type, LOSSES)
        check_choice("diversity", self.diversity, DIVERSITIES[:3])  # "partition" needs a judge's links per batch
        check_choice("pairs", self.pairs, ("auto", *PAIR_MODES[:-1]))
        check_choice("deviation_norm", self.deviation_norm, DEVIATION_NORMS)
        check_choice("orpo_weighting", self.orpo_weighting, ORPO_WEIGHTINGS)
        check_choice("divpo_pools", self.divpo_pools, DIVPO_POOLS)
        check_choice("embedding_source", self.embedding_source, EMBEDDING_SOURCES)
        check_choice("pooling", self.pooling, POOLINGS)
        check_choice("truncation_mode", self.truncation_mode, TRUNCATION_MODES)
        if self.linear_chunk_size is not None and self.linear_chunk_size < 1:
            raise ValueError(f"linear_chunk_size must be a positive int or None, got {self.linear_chunk_size}")
        self.bf16 = not self.fp16 if self.bf16 is None else self.bf16
        super().__post_init__()

    @property
    def needs_embeddings(self) -> bool:
        return self.diversity != "none" or self.diversity_alpha > 0 or self.pairs == "divpo"

    @property
    def tokenization(self) -> str:
        """Whose tokenization the loss follows: ``"dpo"`` (TRL's DPOTrainer) or ``"orpo"`` (ORPO/CPO)."""
        return TOKENIZATION[self.loss_type]

    @property
    def nll_weight(self) -> float:
        """CPO's ``cpo_alpha`` as the op takes it: only simpo adds the NLL term (as CPOTrainer's simpo)."""
        return self.cpo_alpha if self.loss_type == "simpo" else 0.0


def _sequence_sums(token_logps: torch.Tensor, entropy: torch.Tensor, argmax: torch.Tensor,
                   row_logit_sums: torch.Tensor, vocab: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   completion_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``[N]`` sums of :func:`sequence_statistics` from per-position values: token log-probs
    ``[N, L - 1]`` (with grad), entropies and argmaxes ``[N, L - 1]`` and logit sums over the
    vocabulary ``[N, L]`` (without)."""
    completion = completion_mask[:, 1:].to(token_logps.dtype)
    predicted = attention_mask[:, 1:].to(token_logps.dtype)
    stats = {
        "completion_logps": (token_logps * completion).sum(-1),
        "completion_tokens": completion.sum(-1),
        "nll_logps": (token_logps * predicted).sum(-1),
        "nll_tokens": predicted.sum(-1),
        "sequence_tokens": attention_mask.sum(-1).to(token_logps.dtype),
    }
    with torch.no_grad():
        stats["mean_logit_sum"] = (row_logit_sums[:, :-1] / vocab * completion).sum(-1)
        stats["full_logit_sum"] = row_logit_sums[:, :-1].sum(-1)
        stats["last_logit_sum"] = row_logit_sums[:, -1]
        stats["top1_correct"] = ((argmax == input_ids[:, 1:]).to(completion.dtype) * completion).sum(-1)
        stats["entropy_sum"] = (entropy * completion).sum(-1)
    return stats


def sequence_statistics(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        completion_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sequence ``[N]`` statistics of a causal LM's ``logits [N, L, V]``, position ``t`` predicting
    token ``t + 1``: the completion's summed log-probs and token count, every predicted token's
    summed log-probs and count (the NLL of TRL's ORPO/CPO covers prompt and completion), and, without
    grad, what TRL's metrics average: completion-token sums of the per-position mean logit, of
    top-1 hits and of the entropy (DPOTrainer), and the sum of all logits over every position but
    the last and at the last position (ORPO's and CPO's ``logits/*``, padding included)."""
    log_probs = logits[:, :-1].float().log_softmax(-1)
    token_logps = log_probs.gather(-1, input_ids[:, 1:, None])[..., 0]
    with torch.no_grad():
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        argmax = logits[:, :-1].argmax(-1)
        row_sums = logits.detach().sum(-1, dtype=torch.float32)
    return _sequence_sums(token_logps, entropy, argmax, row_sums, logits.shape[-1], input_ids, attention_mask,
                          completion_mask)


def fused_sequence_statistics(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                              *, chunk_size: int | None = None, backend: str = "auto") -> dict[str, torch.Tensor]:
    """:func:`sequence_statistics` from the LM head's input ``hidden [N, L, H]`` and its ``weight [V, H]``
    (and ``bias``) without the ``[N, L, V]`` logits: log-probs, entropies and argmaxes per token come from
    :func:`divkernels.ops.linear_logps.token_outputs` chunk by chunk (masked by the sums), and the logit sums from
    ``sum_v z_v = h . sum_v W_v + sum_v b_v`` (the head is linear)."""
    token = token_outputs(hidden[:, :-1], weight, input_ids[:, 1:], attention_mask[:, 1:].bool(), bias=bias,
                               stats=True, chunk_size=chunk_size, backend=backend)
    with torch.no_grad():
        row_sums = hidden.detach().float() @ weight.detach().float().sum(0)
        if bias is not None:
            row_sums = row_sums + bias.detach().float().sum()
    return _sequence_sums(token.logps, token.entropy, token.argmax, row_sums, weight.shape[0], input_ids,
                          attention_mask, completion_mask)


def output_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The LM head of a causal LM (under DDP/accelerate wrappers too), checked to be a plain linear map
    of the last hidden states: what ``fused_linear`` replaces."""
    model = unwrapped(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"fused_linear=True needs a model whose get_output_embeddings() is a torch.nn.Linear, "
                         f"got {type(head).__name__}")
    if sharded_parameters(head):
        raise ValueError("fused_linear=True needs the LM head's whole weight after the forward pass; under FSDP / "
                         "ZeRO-3 it is sharded then: use fused_linear=False with sharded models")
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, name, None) not in (None, 1.0):
            raise ValueError(f"fused_linear=True computes logits as lm_head(hidden); this model changes them "
                             f"afterwards (config.{name}={getattr(config, name)}): use fused_linear=False")
    return head


def head_inputs(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.nn.Linear]:
    """Run ``model`` with the LM head fed an empty slice of its input: returns that input ``[N, L, H]``
    (the last hidden states, with grad) and the head. A forward pre-hook on the head, so the call goes
    through every wrapper (DDP's gradient hooks included) and no logits are computed."""
    head = output_head(model)
    captured: list[torch.Tensor] = []

    def capture(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        captured.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(capture)
    try:
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
    finally:
        handle.remove()
    return captured[-1], head


class DiversityPreferenceTrainer(Trainer):
    """Preference training with :func:`divkernels.group_preference_loss` over groups of responses.

    Args:
        model: a causal LM or its name (loaded with flash-attention 2 when available, else SDPA).
        args: :class:`DiversityPreferenceConfig`.
        train_dataset, eval_dataset: ``datasets.Dataset`` of group rows (see the module
            docstring); for pair rows use :func:`pairs_to_groups` first.
        processing_class: the tokenizer (its pad token, else its EOS token, pads).
        ref_model: reference model for dpo/ipo; None uses a frozen copy of ``model``, or for a
            ``peft`` model the base model with its adapters disabled (no second copy, as TRL does).
        peft_config: a ``peft`` config (e.g. ``LoraConfig``): ``model`` is wrapped with it first, as
            TRL's trainers do with their ``peft_config`` argument.
        encoder: ``texts -> [N, D]`` for ``embedding_source="encoder"``, or a list of them: several
            encoders combine into DDPO/DORPO weights as the authors do (geometric mean of the
            per-encoder min-max scaled deviations; the first encoder serves everything else); None
            loads the bundled all-MiniLM-L6-v2 when the loss needs embeddings.
        **kwargs: passed to ``transformers.Trainer`` (callbacks, ...).
    """

    def __init__(self, model: PreTrainedModel | str, args: DiversityPreferenceConfig, train_dataset: Any = None,
                 processing_class: PreTrainedTokenizerBase | None = None, *, eval_dataset: Any = None,
                 ref_model: PreTrainedModel | None = None,
                 encoder: Encoder | Sequence[Encoder] | None = None, peft_config: Any = None, **kwargs: Any) -> None:
        if not isinstance(args, DiversityPreferenceConfig):
            raise TypeError("args must be a DiversityPreferenceConfig")
        if isinstance(model, str):
            model = load_causal_lm(model)
        if processing_class is None:
            raise ValueError("processing_class (the tokenizer) is required")
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token
        if peft_config is not None:
            from peft import get_peft_model

            if is_peft_model(model):
                raise ValueError("model is already a peft model; pass peft_config=None")
            model = get_peft_model(model, peft_config)
        # with a peft model and no ref_model the reference is the base model, adapters off
        self.reference_is_base = args.loss_type in REFERENCE_LOSSES and ref_model is None and is_peft_model(model)
        if args.loss_type in REFERENCE_LOSSES and ref_model is None and not self.reference_is_base:
            ref_model = create_reference_model(model)
        if args.disable_dropout:
            disable_dropout(model)
            if ref_model is not None:
                disable_dropout(ref_model)
        if args.embedding_source == "encoder" and encoder is None and args.needs_embeddings:
            encoder = SentenceEncoder()
        if train_dataset is not None:
            train_dataset = tokenize_rows(train_dataset, processing_class, args)
        if eval_dataset is not None:
            eval_dataset = tokenize_rows(eval_dataset, processing_class, args)
        collator = GroupPreferenceCollator(processing_class.pad_token_id,
                                           args.max_length if args.tokenization == "dpo" else None,
                                           args.truncation_mode)
        super().__init__(model=model, args=args, data_collator=collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        self.encoders: list[Encoder] = [] if encoder is None else list(encoder) if isinstance(encoder, Sequence) \
            else [encoder]
        self.ref_model = None
        if args.loss_type in REFERENCE_LOSSES and ref_model is not None:
            self.ref_model = prepare_reference_model(ref_model, self.accelerator, args.per_device_train_batch_size)
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._total_train_tokens = 0.0
        self._fused_linear_auto: bool | None = None

    def _fused_linear(self, model: torch.nn.Module) -> bool:
        """``args.fused_linear``; ``None``: whether :func:`output_head` accepts ``model``, decided at the
        first batch (after the accelerator has wrapped or sharded it)."""
        if self.args.fused_linear is not None:
            return self.args.fused_linear
        if self._fused_linear_auto is None:
            try:
                output_head(model)
                self._fused_linear_auto = True
            except ValueError as reason:
                warnings.warn(f"fused_linear=None: the [N, L, V] logits are formed, since {reason}", UserWarning,
                              stacklevel=2)
                self._fused_linear_auto = False
        return self._fused_linear_auto

    def _sequences(self, model: torch.nn.Module, inputs: dict[str, Any],
                   pooled: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Per-response statistics (:func:`sequence_statistics`) and, with ``pooled``, the pooled last
        hidden state of the completion tokens ``[N, H]``."""
        if self._fused_linear(model):
            hidden, head = head_inputs(model, inputs)
            stats = fused_sequence_statistics(hidden, head.weight, head.bias, inputs["input_ids"],
                                              inputs["attention_mask"], inputs["completion_mask"],
                                              chunk_size=self.args.linear_chunk_size,
                                              backend=linear_backend(self.args.kernel_backend))
            self._logits_shape = (hidden.shape[1], head.weight.shape[0])
            pooled_hidden = pool_hidden_states(hidden.float(), inputs["completion_mask"], self.args.pooling) \
                if pooled else None
            return stats, pooled_hidden
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False,
                        output_hidden_states=pooled)
        stats = sequence_statistics(outputs.logits, inputs["input_ids"], inputs["attention_mask"],
                                    inputs["completion_mask"])
        self._logits_shape = tuple(outputs.logits.shape[1:])  # (L, V): ORPO/CPO's logits/* average over both
        hidden = None
        if pooled:
            hidden = pool_hidden_states(outputs.hidden_states[-1].float(), inputs["completion_mask"], self.args.pooling)
        return stats, hidden

    def _group_tensors(self, model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, torch.Tensor | None]:
        """``[B, G]`` log-probs, token counts, rewards, mask and statistics, ``[B, G, D]`` embeddings and
        pair indices of this process."""
        args = self.args
        mask = inputs["response_mask"]
        from_policy = args.needs_embeddings and args.embedding_source == "policy"
        stats, pooled = self._sequences(model, inputs, from_policy)
        tokens = stats["completion_tokens"]
        logps = stats["completion_logps"]
        if args.tokenization == "orpo":  # ORPO/CPO score a completion by its mean token log-prob
            logps = logps / tokens.clamp_min(1.0)
        groups: dict[str, torch.Tensor | None] = {
            "policy": to_groups(logps, mask), "ref": None, "emb": None, "rewards": inputs["rewards"], "mask": mask,
            "pair_index": inputs.get("pair_index"), "nll_logps": to_groups(stats["nll_logps"], mask),
            "nll_tokens": to_groups(stats["nll_tokens"], mask),
            "completion_logps": to_groups(stats["completion_logps"], mask),
        }
        for name in RESPONSE_STATS:
            groups[name] = to_groups(stats[name].detach(), mask)
        if self.ref_model is not None:
            with torch.no_grad():
                groups["ref"] = to_groups(self._sequences(self.ref_model, inputs, False)[0]["completion_logps"], mask)
        elif self.reference_is_base:
            with torch.no_grad(), adapters_disabled(model):
                groups["ref"] = to_groups(self._sequences(model, inputs, False)[0]["completion_logps"], mask)
        if from_policy:
            groups["emb"] = to_groups(pooled, mask)
        elif self.encoders:
            for k, encoder in enumerate(self.encoders):
                groups["emb" if k == 0 else f"emb{k}"] = to_groups(
                    encoder(inputs["completion_texts"]).to(logps.device), mask)
        return groups

    @staticmethod
    def _gather_groups(groups: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
        """Every process's groups, padded to a common G (and P), in rank order; autograd-aware."""
        mask, pair_index = groups["mask"], groups["pair_index"]
        device = mask.device
        sizes = max_over_processes([mask.shape[1], 0 if pair_index is None else pair_index.shape[1]], device)
        counts = row_counts(mask.shape[0], device)
        gathered: dict[str, torch.Tensor | None] = {}
        for name, tensor in groups.items():
            if tensor is None:
                gathered[name] = None
                continue
            if name == "pair_index":
                tensor = pad_dim(tensor, 1, sizes[1], -1)
            else:
                tensor = pad_dim(tensor, 1, sizes[0], False if name == "mask" else 0)
            gathered[name] = gather_rows(tensor, counts)[0]
        return gathered

    def _loss_options(self) -> dict[str, Any]:
        args = self.args
        return {"loss": args.loss_type, "diversity": args.diversity, "beta": args.beta, "orpo_lambda": args.orpo_lambda,
                "simpo_gamma": args.simpo_gamma, "deviation_norm": args.deviation_norm,
                "min_deviation": args.min_deviation, "orpo_weighting": args.orpo_weighting,
                "diversity_alpha": args.diversity_alpha, "eps": args.eps, "quality_quantile": args.quality_quantile,
                "divpo_pools": args.divpo_pools, "cpo_alpha": args.nll_weight, "backend": args.kernel_backend}

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: int | None = None) -> torch.Tensor | tuple[torch.Tensor, dk.LossOutput]:
        args = self.args
        groups = self._group_tensors(model, inputs)
        if is_distributed():
            groups = self._gather_groups(groups)
        pairs = args.pairs
        pair_index = groups["pair_index"]
        if pairs == "auto":
            pairs = "explicit" if pair_index is not None else "all"
        if pairs != "explicit":
            pair_index = None
        emb = groups["emb"]
        extra = [groups[f"emb{k}"] for k in range(1, len(self.encoders)) if f"emb{k}" in groups]
        if emb is not None and extra and args.diversity == "deviation":
            emb = [emb, *extra]
        options = self._loss_options()
        nll = {}
        if args.loss_type == "orpo" and args.orpo_weighting == "dorpo":  # ORPO: prompt + chosen tokens
            nll = {"nll_logps": groups["nll_logps"], "nll_tokens": groups["nll_tokens"]}
        elif options["cpo_alpha"] > 0:  # CPO: the chosen completion's tokens only
            nll = {"nll_logps": groups["completion_logps"], "nll_tokens": groups["completion_tokens"]}
        output = dk.group_preference_loss(
            groups["policy"], groups["rewards"], emb, groups["ref"], groups["mask"], pairs=pairs,
            pair_index=pair_index, token_counts=groups["completion_tokens"] if args.loss_type == "ipo" else None,
            **nll, **options)
        self._record_metrics(model, output, groups)
        return (output.loss, output) if return_outputs else output.loss

    def _record_metrics(self, model: torch.nn.Module, output: dk.LossOutput,
                        groups: dict[str, torch.Tensor | None]) -> None:
        """The metrics of the loss's TRL trainer (each a mean over pairs, per-response statistics weighted
        by how many pairs a response is chosen / rejected in) and ours (``pairs``, ``diversity/*``)."""
        args = self.args
        mode = "train" if model.training else "eval"
        chosen, rejected = output.chosen_counts.detach(), output.rejected_counts.detach()
        num_pairs = chosen.sum().clamp_min(1.0)

        def weighted(name: str, weights: torch.Tensor, per: torch.Tensor) -> torch.Tensor:
            return (weights * groups[name].to(weights.dtype)).sum() / per.clamp_min(1.0)

        values = {name: value for name, value in output.metrics.items() if name != "loss"}
        if args.tokenization == "dpo":  # DPOTrainer: completion tokens of the chosen / of both responses
            chosen_tokens = (chosen * groups["completion_tokens"]).sum()
            rejected_tokens = (rejected * groups["completion_tokens"]).sum()
            values["logits/chosen"] = weighted("mean_logit_sum", chosen, chosen_tokens)
            values["logits/rejected"] = weighted("mean_logit_sum", rejected, rejected_tokens)
            values["mean_token_accuracy"] = weighted("top1_correct", chosen, chosen_tokens)
            values["entropy"] = weighted("entropy_sum", chosen + rejected, chosen_tokens + rejected_tokens)
        else:  # ORPO/CPO: the mean of every logit of the chosen / rejected sequences, padding included
            length, vocab = self._logits_shape
            if args.loss_type == "orpo":  # ORPOTrainer leaves out the last position, CPOTrainer does not
                cells = num_pairs * max(length - 1, 0) * vocab
                values["logits/chosen"] = weighted("full_logit_sum", chosen, cells)
                values["logits/rejected"] = weighted("full_logit_sum", rejected, cells)
            else:
                cells = num_pairs * length * vocab
                for name, counts in (("logits/chosen", chosen), ("logits/rejected", rejected)):
                    values[name] = (weighted("full_logit_sum", counts, cells)
                                    + weighted("last_logit_sum", counts, cells))
            if args.loss_type == "simpo" and "nll_loss" not in values:
                values["nll_loss"] = torch.zeros(())  # CPOTrainer logs it with cpo_alpha = 0 too
        names = list(values)
        device = output.loss.device  # one host sync for every metric
        stacked = torch.stack([values[n].to(device=device, dtype=torch.float32) for n in names]).tolist()
        for name, value in zip(names, stacked, strict=True):
            self._metrics[mode][name].append(value)
        if args.tokenization == "dpo" and mode == "train":  # DPOTrainer's running count of the tokens trained on
            self._total_train_tokens += float(((chosen + rejected) * groups["sequence_tokens"]).sum())
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[torch.Tensor, None, None]:
        """Evaluation computes the loss (and metrics); there are no labels or logits to return."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the loss metrics averaged since the last log (``eval_``-prefixed in evaluation)."""
        mode = "train" if self.model.training else "eval"
        metrics = {name: sum(values) / len(values) for name, values in self._metrics[mode].items() if values}
        if mode == "eval":
            metrics = {f"eval_{name}": value for name, value in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()
