"""Typed configuration for NeuroPrune and for a training run.

Every field carries its default and a docstring (the string literal right below it); the configuration
reference docs/config.md is generated from these docstrings. Loading, overrides and validation live in
:mod:`neuroprune_ds.config_loader`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True, slots=True)
class NeuroPruneConfig:
    """The NeuroPrune algorithm; docs/algorithm.md gives each field's place in it and why its default."""

    enabled: bool = True
    """Switch NeuroPrune on; false gives plain fine-tuning with the same loop (the dense baseline)."""
    penalty: str = "neuroprune"
    """'neuroprune': degree-weighted L1 on FFN weights and l1^(1/2) groups on attention inputs; 'l1': plain L1
    on the same weights (every factor 1: mlp_lambda on FFN, attn_lambda on Q/K/V), the paper's L1 baseline."""
    mlp_lambda: float = 1e-5
    """alpha: weight of the preferential-attachment weighted L1 penalty on FFN weights."""
    attn_lambda: float = 1e-5
    """beta: weight of the l1^(1/2) group penalty on attention input dimensions across [Q, K, V]."""
    update: str = "gradient"
    """How the penalties enter the update. 'gradient': their subgradient is added to the gradient before the
    optimizer step (Adam then moves a penalised weight by about lr per step whatever lambda is). 'decoupled': a
    proximal soft-threshold step on the fp32 master right after the optimizer step, w <- sign(w) max(|w| - lr *
    lambda * f, 0) with f the group's degree weight or attention scale (the L1 counterpart of AdamW's decoupled
    weight decay; lambda is then the shrinkage per unit of learning rate). stop_at_zero applies to 'gradient'
    only: the threshold itself lands weights on exact zeros. See docs/sparsity.md."""
    recover_steps: int = 0
    """For the final this-many optimizer steps the support is frozen and the penalty is off: penalised
    weights with |w| < epsilon become exactly 0 (with their optimizer moments) and stay 0, so the surviving
    weights recover from the L1 shrinkage. Structure is pruned once more when the phase starts, never in it."""
    lambda_warmup_steps: int = 0
    """Ramp both lambdas linearly from 0 over this many optimizer steps (0: no warm-up)."""
    epsilon: float = 1e-4
    """A weight with |w| < epsilon counts as absent (degree counts, sparsity, export threshold)."""
    c_min: float = 0.05
    """Floor of a neuron's fractional connectivity c in its penalty weight 1 / max(c, c_min)."""
    delta: float = 1e-8
    """Smoothing of the attention group penalty: sqrt(g + delta) keeps its gradient finite at g = 0."""
    stop_at_zero: bool = True
    """A penalised weight whose optimizer step crosses zero is set to exactly 0 and its first Adam moment
    cleared (truncated L1). Without it Adam keeps such a weight oscillating around 0 at a fraction of lr
    (measured at lr 2e-3: only 22% of the weights the penalty has driven to zero sit below epsilon). Costs,
    during the optimizer step, one byte per penalised weight of this rank's fp32 master shard."""
    degree_every: int = 1
    """Recompute the FFN degree weights every this many optimizer steps."""
    mlp_groups: str = "neuron"
    """'neuron': a group is FFN hidden unit i (row i of every input projection, column i of the output
    projection); 'output_rows': every row of every FFN weight is a group (the literal reading)."""
    attention_kinds: list[str] = field(default_factory=lambda: ["self", "cross"])
    """Which attention blocks are penalised and head-pruned: any of 'self', 'cross'."""
    theta: float = 0.15
    """Two heads are similar when the max |difference| of their [Q, K, V] weights is <= theta (theta_mode)."""
    theta_mode: str = "absolute"
    """'absolute': theta is a distance in weight units (the paper's). 'relative': theta times the block's
    weight scale, the largest |w| of its live units' [Q, K, V] weights, so 0 <= distance / scale <= 2 on any
    model (independent random heads sit near 1, copies near 0)."""
    fold: str = "output_projection"
    """'output_projection': add a pruned head's output-projection columns into the head that replaces it;
    'none': drop them."""
    prune_heads: bool = True
    """Run redundant-head pruning on the schedule below."""
    prune_every_steps: int = 0
    """Prune heads every this many optimizer steps; 0 prunes at the end of every epoch."""
    prune_start_step: int = 0
    """No head pruning before this optimizer step."""
    prune_ffn_units_below: float | None = None
    """Prune an FFN unit on the head-pruning schedule when its fractional connectivity (share of its in or of
    its out connections with |w| >= epsilon) is below this: its input rows, input biases and output column
    are then zero in the weights, fp32 master and moments for the rest of training, and the compact export
    removes it. None: FFN units are never pruned by rule (only all-zero units vanish at export)."""
    prune_ffn_units_fraction: float | None = None
    """Structural target: the share of every FFN block's units to remove, on the head-pruning schedule, the
    lowest ffn_unit_score first. The share pruned so far follows the cubic ramp of target_ramp_steps (at each
    pruning step, fraction * (1 - (1 - step / target_ramp_steps)^3)) and is the full fraction when the
    recovery phase starts; pruned units are masked like those of prune_ffn_units_below (both may be set).
    None: no structural target."""
    ffn_unit_score: str = "taylor"
    """How prune_ffn_units_fraction ranks a block's units. 'taylor': the sum over optimizer steps of (w *
    task gradient)^2 over the unit's weights (its input rows and biases and its output column), the
    first-order estimate of the loss change its removal causes (Molchanov et al. 2019); one O(width) sum per
    FFN matrix and step, all-reduced with the step's statistics. 'connectivity': NeuroPrune's fractional
    connectivity (the smaller of in and out), ties broken by the unit's L1 norm; nothing accumulated."""
    target_sparsity: float | None = None
    """Weight sparsity (fraction of penalised weights with |w| < epsilon) to reach; the lambdas are then
    scaled by a controller on the measured sparsity instead of being tuned by hand. None: fixed lambdas."""
    target_ramp_steps: int = 100
    """The controller's target rises from 0 to target_sparsity over this many optimizer steps (cubic)."""
    controller_gain: float = 2.0
    """How fast the target-sparsity controller's correction term reacts. The controller sets log(lambda
    scale) to a feed-forward term, the smoothed quantile of |task gradient| / (lambda * group factor) over
    sampled penalised weights (with update 'decoupled': of |optimizer step| / (lr * lambda * group factor))
    at the fraction that must reach zero, plus a bounded integral term that moves by gain * (target now -
    sparsity predicted 30 steps ahead) per optimizer step, within [-3, 3] (docs/algorithm.md section 6)."""
    target_modules: list[str] | None = None
    """Attention/FFN blocks to include (module paths; an entry matches a path equal to it, ending in
    '.'+entry, or fully matching it as a regular expression). None: every block of the architecture."""
    exclude_modules: list[str] = field(default_factory=list)
    """Blocks to leave alone; same matching rules as target_modules."""


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Which pretrained model to fine-tune."""

    name_or_path: str = ""
    """A local directory with an HF checkpoint, or a hub name (needs network access to the hub)."""
    gguf_file: str | None = None
    """File name of a GGUF checkpoint inside name_or_path (loaded through transformers)."""
    tokenizer: str | None = None
    """Tokenizer directory or hub name; defaults to name_or_path."""
    dtype: str = "fp32"
    """Training precision: 'fp32' or 'bf16' (fp16 does not run on CPU)."""
    trust_remote_code: bool = False
    """Passed to transformers' from_pretrained."""
    gradient_checkpointing: bool = False
    """Activation checkpointing: keep only each layer's input and recompute the layer in the backward pass
    (transformers' non-reentrant checkpointing), trading about one extra forward per step for activation
    memory of one layer instead of all. A DeepSpeed 'activation_checkpointing' section does not reach Hugging
    Face models; this switch does."""


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the training and evaluation examples come from."""

    train: str = ""
    """Training data: a local .json/.jsonl/.csv/.parquet/.txt file, a directory, or a `datasets` hub name."""
    eval: str | None = None
    """Evaluation data, same forms as train; None splits eval_fraction off the training data."""
    dataset_config: str | None = None
    """Configuration name of a hub dataset (e.g. 'sst2' of 'glue')."""
    eval_fraction: float = 0.05
    """Fraction of the training data held out for evaluation when eval is None."""
    text_column: str = "text"
    """Column with the input text (causal_lm, classification)."""
    text_pair_column: str | None = None
    """Optional second text column for sentence-pair classification."""
    label_column: str = "label"
    """Column with the class label (classification)."""
    source_column: str = "source"
    """Column with the source text (seq2seq)."""
    target_column: str = "target"
    """Column with the target text (seq2seq)."""
    source_prefix: str = ""
    """Text put before every source (e.g. 'summarize: ' for T5)."""
    max_length: int = 256
    """Token block length (causal_lm) or maximum input length."""
    max_target_length: int = 64
    """Maximum target length (seq2seq)."""
    max_train_examples: int | None = None
    """Use at most this many training examples (after shuffling with the run seed)."""
    max_eval_examples: int | None = None
    """Use at most this many evaluation examples."""
    num_proc: int | None = None
    """Processes that tokenize (datasets' map num_proc); None: the rank's own process only."""
    pretokenized: bool | None = None
    """The data already holds model inputs (an input_ids column, plus labels for seq2seq and classification;
    e.g. a datasets.save_to_disk directory): nothing is tokenized, causal_lm only packs into blocks. None:
    detected from an input_ids column."""


@dataclass(kw_only=True, slots=True)
class ScheduleConfig:
    """Optimisation and its schedule."""

    epochs: int = 1
    """Passes over the training data (max_steps wins when set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    micro_batch_size: int = 8
    """Examples per rank per forward pass (DeepSpeed's train_micro_batch_size_per_gpu)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 5e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    optimizer: str = "torch"
    """AdamW implementation: 'torch' (torch.optim.AdamW, compiles nothing), 'fused' (DeepSpeed FusedAdam, GPU
    only, states on the accelerator) or 'cpu_adam' (DeepSpeedCPUAdam, for offload_optimizer to CPU; its C++
    op is compiled on first use)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps."""
    lr_scheduler: str = "linear"
    """'linear' (decay to 0), 'cosine' or 'constant' after warm-up."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    eval_every_steps: int = 0
    """Evaluate every this many optimizer steps (0: only at the end)."""
    log_every_steps: int = 10
    """Log metrics every this many optimizer steps."""
    seed: int = 42
    """Seed for model init, data order and dropout."""


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """When to save ZeRO checkpoints and whether to resume."""

    every_steps: int = 0
    """Save every this many optimizer steps (0: only at the end and on preemption signals)."""
    keep_last: int = 2
    """Keep this many most recent checkpoints."""
    resume: str = "auto"
    """'auto' (resume from the latest complete checkpoint in the output dir, if any), 'never', or a path."""
    on_nonfinite: str = "stop"
    """A NaN/inf loss or gradient on any rank: 'stop' every rank at that step with an error (nothing of the
    bad state is saved), or 'skip' that optimizer step on every rank and go on."""


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """A complete fine-tuning run."""

    task: str = "causal_lm"
    """'causal_lm', 'seq2seq' or 'classification'."""
    num_labels: int = 2
    """Number of classes (classification)."""
    output_dir: str = "runs/neuroprune"
    """Checkpoints, metrics.jsonl and TensorBoard events go here."""
    deepspeed: str = "ds_configs/zero3_fp32.json"
    """DeepSpeed JSON config (a path; ds_configs/ ships one per ZeRO stage and dtype)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    neuroprune: NeuroPruneConfig = field(default_factory=NeuroPruneConfig)
