"""Every default of effjax, documented. Experiment files start from `get_config()` here.

Experiment configs import this module, call `get_config()` and override fields; the command line
overrides any field with `--config.a.b=value`. `effjax/config.py` validates the result: an unknown
field, a wrong type or an impossible combination stops the run with one line naming the field.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.seed = 0  # model init and every other seeded random choice derive from this
  # 'train' trains (evaluating, checkpointing and sampling along the way); 'eval' evaluates the
  # latest checkpoint; 'generate' samples from it; 'compile_only' compiles the train and eval
  # steps for the mesh from abstract shapes and reports per-device memory, running nothing;
  # 'compress' writes a compressed copy of the latest checkpoint (the compress section below).
  c.mode = 'train'

  # ---------------------------------------------------------------- model
  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 384  # >= the tokenizer's vocabulary; a multiple of 128 keeps matmuls aligned
  m.d_model = 256  # residual stream width ('embed')
  m.num_layers = 4  # must be a multiple of the number of blocks in `pattern`
  m.num_heads = 4  # query heads
  m.num_kv_heads = 2  # key/value heads (grouped-query attention); must divide num_heads
  m.head_dim = 0  # 0 -> d_model // num_heads
  m.mlp_dim = 0  # SwiGLU hidden width; 0 -> 8/3 * d_model rounded up to a multiple of 64
  # The layer stack: blocks 'mixer:feed_forward' separated by ','; the pattern repeats over depth
  # (num_layers / len(blocks) times) and each repetition is one step of a scan over layers.
  # Mixers: see effjax.models.registry.MIXERS ('attention' = 'dense', 'flash', 'sliding_window',
  # 'block_sparse'); feed-forwards: FEED_FORWARDS.
  m.pattern = 'attention:mlp'
  # Attention backend: 'auto' (cuDNN on GPU, XLA elsewhere), 'xla' or 'cudnn'
  # (both through jax.nn.dot_product_attention).
  m.attention_impl = 'auto'
  # The mixers 'flash', 'sliding_window' and 'block_sparse' run the block-sparse flash op
  # (effjax/kernels/flash_attention) with this backend: 'auto' (per layer: Mosaic GPU on Hopper
  # for bf16/fp16 compute and layout blocks that are multiples of 128, else Triton on GPU; Mosaic
  # on TPU; the plain-jnp reference elsewhere), 'triton', 'mosaic_gpu', 'mosaic' or 'reference'.
  # The kernels need a head dimension of 64, 128 or 256 and an unsharded sequence
  # (sharding_rules.act_length).
  m.attention_backend = 'auto'
  m.attention_interpret = False  # run the Pallas kernel in interpret mode (slow; CPU testing)
  m.attention_window = 128  # 'sliding_window': keys each query sees, itself included (>= 1)
  # 'block_sparse': a BigBird layout on blocks of block_sparse_block tokens (must divide
  # data.seq_len): each query block sees its own and the previous local_blocks - 1 key blocks, the
  # first global_blocks key blocks (those query blocks see everything before them) and
  # random_blocks random earlier key blocks, drawn with block_sparse_seed.
  m.block_sparse_block = 128
  m.block_sparse_local_blocks = 3
  m.block_sparse_global_blocks = 1
  m.block_sparse_random_blocks = 1
  m.block_sparse_seed = 0
  # Linear-attention and state-space mixers ('gla', 'retnet', 'linear_attention', 'mamba2',
  # 'mamba1'; effjax/models/linear_attention.py, ssm.py). All but 'mamba1' run the chunked-scan op
  # (effjax/kernels/chunked_scan) with this backend: 'auto' (Triton on GPU, Mosaic on TPU, the
  # chunked steps in plain JAX elsewhere), 'triton', 'mosaic', 'xla' or 'reference'.
  m.scan_backend = 'auto'
  m.scan_chunk = 0  # tokens per chunk; 0 = the backend's default (64; 128 for Mosaic)
  m.scan_interpret = False  # run the Pallas kernel in interpret mode (slow; CPU testing)
  m.gla_gate_temperature = 16.0  # 'gla': log-decay = logsigmoid(x W_g + b) / temperature
  m.ssm_state_dim = 64  # N: the state per head (mamba2) or per channel (mamba1, e.g. 16)
  m.ssm_expand = 2  # inner width = ssm_expand * d_model
  m.ssm_head_dim = 64  # mamba2: channels per head P (inner width / P heads)
  m.ssm_conv_width = 4  # taps of the short causal depthwise convolution
  m.ssm_dt_rank = 0  # mamba1: rank of the dt projection; 0 = ceil(d_model / 16)
  m.rope_theta = 10_000.0
  m.norm_eps = 1e-6
  m.tie_embeddings = True  # share the token embedding with the output head
  m.scan_layers = True  # scan the repeated pattern over depth (compile time independent of depth)
  # Rematerialisation policy of each scanned group; see effjax.models.remat.POLICIES:
  # 'none', 'full', 'dots', 'dots_no_batch', 'block_outputs', 'attention_out'.
  m.remat_policy = 'none'
  # Mixed precision: parameters are stored in param_dtype, matmuls run in compute_dtype, the
  # logits come out in output_dtype (the loss is always computed in float32).
  m.param_dtype = 'float32'
  m.compute_dtype = 'float32'
  m.output_dtype = 'float32'
  m.init_std = 0.02  # normal init of embeddings and projections; output projections scaled by depth
  # Mixture of experts: the 'moe' feed-forward (effjax/models/moe.py), e.g. pattern 'attention:moe'.
  m.moe_num_experts = 8  # routed experts per MoE layer; a multiple of the expert-parallel size
  m.moe_top_k = 2  # experts per token (1: Switch, 2: Mixtral); expert choice: average per token
  # 'token_choice' (each token picks its top_k experts; top_k > 1 renormalises their probabilities)
  # or 'expert_choice' (each expert picks its top-capacity tokens; not causal).
  m.moe_routing = 'token_choice'
  # Slots each expert keeps per routing group (one device's tokens) = ceil(factor * tokens * top_k
  # / num_experts); 0 = dropless (token choice only). Over capacity, later tokens drop first.
  m.moe_capacity_factor = 0.0
  m.moe_expert_mlp_dim = 0  # each expert's SwiGLU width (fine-grained experts); 0 -> the mlp_dim
  m.moe_num_shared_experts = 0  # always-on SwiGLU experts of that width, added to the routed output
  m.moe_aux_loss_weight = 0.01  # Switch/GShard load balancing: E * sum_e load_e * mean_prob_e
  m.moe_z_loss_weight = 1e-3  # router z-loss: mean over tokens of logsumexp(router logits)^2
  # Grouped matmul of the experts: 'auto' (Triton on GPU, Mosaic on TPU, jax.lax.ragged_dot
  # elsewhere), 'ragged_dot', 'triton' or 'mosaic' (effjax/kernels/grouped_matmul).
  m.moe_gmm_backend = 'auto'
  m.moe_gmm_interpret = False  # run the Pallas kernel in interpret mode (slow; CPU testing)
  # Early exit (effjax/models/early_exit.py): exit heads after these layers, e.g. '2,4' puts one
  # after the 2nd and one after the 4th block (each 1 <= l < num_layers; '' = none). Exit heads
  # are trained by train.exit_loss_* and used by infer.method early_exit / self_speculative.
  m.exit_layers = ''
  # What an exit head is: 'shared' (the final norm and output projection, no new parameters),
  # 'norm' (its own RMSNorm, the shared projection) or 'own' (its own norm and projection).
  m.exit_head = 'shared'

  # ---------------------------------------------------------------- data
  d = c.data = ml_collections.ConfigDict()
  # 'stdlib': the Python standard library installed with the interpreter, built into a local
  #           tensorflow-datasets dataset (array_record) on first use;
  # 'text_files': local text files matched by `glob`, one document each;
  # 'tfds': a tensorflow-datasets dataset by `tfds_name` that is available as array_record.
  d.source = 'stdlib'
  d.glob = ''  # for 'text_files', e.g. '/data/books/**/*.txt'
  d.tfds_name = ''  # for 'tfds', e.g. 'lm1b:1.1.0'
  d.tfds_text_key = 'text'  # the feature holding the text
  d.tfds_train_split = 'train'
  d.tfds_eval_split = 'test'
  d.data_dir = ''  # where datasets and tokenizer models live; '' -> $EFFJAX_DATA_DIR or ~/.cache/effjax
  d.validation_percent = 2  # percent of documents (by a hash of their name) held out for evaluation
  d.tokenizer = 'byte'  # 'byte' (UTF-8 bytes, 259 ids) or 'sentencepiece' (trained locally)
  d.sentencepiece_vocab_size = 4096
  d.seq_len = 256  # tokens per packed training row
  d.shuffle_seed = 0  # -1 -> use the global seed
  d.num_workers = 0  # grain worker processes (0: in the main process)
  d.max_documents = 0  # 0 = all; >0 caps the documents read (quick experiments and tests)

  # ---------------------------------------------------------------- training
  t = c.train = ml_collections.ConfigDict()
  t.batch_size = 8  # global sequences per optimizer step (over all devices and micro-batches)
  t.grad_accum_steps = 1  # micro-batches per step; batch_size must be divisible by it
  t.steps = 240
  t.log_every = 10
  t.eval_every = 80  # 0 = only at the end
  t.eval_batches = 8  # batches of batch_size for each evaluation
  t.checkpoint_every = 80
  t.keep_checkpoints = 3
  t.async_checkpointing = True
  # On a non-finite loss or gradient: 'skip' drops the update and counts it, 'stop' ends the run
  # with a message naming the step.
  t.nan_policy = 'skip'
  t.max_consecutive_nan_skips = 10  # with 'skip': stop after this many non-finite steps in a row
  t.z_loss = 0.0  # weight of the log(Z)^2 auxiliary loss on the logits
  # >0: the training loss applies the head in chunks of this many sequence positions and never
  # materialises the [batch, seq, vocab] logits (effjax/train/losses.py); must divide data.seq_len.
  t.loss_chunk_size = 0
  t.profile_steps = 0  # >0: trace this many steps with jax.profiler into workdir/profile
  t.peak_tflops = 0.0  # per-device peak for MFU; 0 -> looked up from the device kind
  # Early-exit losses (with model.exit_layers): the loss adds sum_e w_e(step) * CE(exit e).
  # 'constant': w_e = exit_loss_scale; 'linear': w_e = exit_loss_scale * l_e / num_layers (deeper
  # exits weigh more); 'layerskip': LayerSkip's scale, exit l ~ exit_loss_scale * sum_{i<=l} i and
  # the final layer ~ L - 1 + the same, all (final included) normalised to sum to 1.
  t.exit_loss_schedule = 'constant'
  t.exit_loss_scale = 1.0
  t.exit_loss_weights = ''  # explicit per-exit weights 'w1,w2,...' (override the schedule)
  # Which exits train at a step (LayerSkip's curricula): 'none' (all), 'rotational' (exit i at
  # steps where i = step mod exit_curriculum_period), 'gradual' (switched on from the deepest
  # down, all on after exit_curriculum_steps; 0 = train.steps).
  t.exit_curriculum = 'none'
  t.exit_curriculum_period = 2
  t.exit_curriculum_steps = 0
  # Self-distillation of every exit from the final layer: + weight * T^2 * KL(final/T || exit/T),
  # the final layer's distribution held fixed (stop-gradient).
  t.exit_distill_weight = 0.0
  t.exit_distill_temperature = 1.0

  # ---------------------------------------------------------------- optimizer
  o = c.optim = ml_collections.ConfigDict()
  o.name = 'adamw'
  o.learning_rate = 3e-3  # peak
  o.warmup_steps = 20
  # After warmup: 'cosine', 'linear' or 'constant', or 'wsd' (warmup-stable-decay: constant, then a
  # linear decay over the last decay_fraction of the steps).
  o.schedule = 'cosine'
  o.decay_fraction = 0.2  # 'wsd' only
  o.min_lr_ratio = 0.1  # final learning rate as a fraction of the peak
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.weight_decay = 0.1  # decoupled; never applied to norms, biases or (optionally) embeddings
  o.decay_embeddings = True
  o.clip_norm = 1.0  # global-norm gradient clipping; 0 disables
  # Per-group learning rates: 'NAME=FACTOR,...' scales the updates of every parameter whose path
  # holds NAME (module or parameter names: embedding, unembedding, mixer, ff, wq, scale, ...).
  o.lr_multipliers = ''
  o.no_decay = ''  # comma-separated names whose parameters get no weight decay
  # Sophia (optim.name 'sophia_g' or 'sophia_h'; b1, b2 above are its two EMAs, e.g. 0.965, 0.99):
  o.rho = 0.04  # the clipping scale: update = clip(m / max(rho * h, eps), 1)
  o.hessian_interval = 10  # refresh the diagonal Hessian estimate every k steps
  o.hessian_rows = 0  # rows of the first micro-batch the estimate uses (0 = all of them)
  o.hessian_probe = 'rademacher'  # sophia_h's Hutchinson probes: 'rademacher' or 'gaussian'

  # ---------------------------------------------------------------- parallelism
  # Mesh axis sizes; their product must equal the number of devices. One axis may be -1 to take
  # whatever the others leave. 'sequence' is reserved and must be 1 for now. 'expert' shards the
  # MoE experts (expert parallelism) and, like 'data', the batch.
  mesh = c.mesh = ml_collections.ConfigDict()
  mesh.data = -1
  mesh.fsdp = 1
  mesh.tensor = 1
  mesh.expert = 1
  mesh.sequence = 1
  # Logical axis name -> mesh axes (a mesh axis name, a tuple of names, or None for replicated).
  # 'act_*' names are activations; the others are parameter dimensions.
  c.sharding_rules = ml_collections.ConfigDict(dict(
      batch=('data', 'fsdp', 'expert'),
      act_batch=('data', 'fsdp', 'expert'),
      act_length='sequence',
      act_embed=None,
      act_heads='tensor',
      act_kv_heads='tensor',
      act_mlp='tensor',
      act_vocab='tensor',
      layers=None,
      embed='fsdp',
      vocab='tensor',
      heads='tensor',
      kv_heads='tensor',
      head_dim=None,
      mlp='tensor',
      experts='expert',
      inner='tensor',  # mamba1's channels
      state=None,  # SSM state dimension
      conv=None,  # convolution taps
      act_inner='tensor',
      norm=None,
  ))

  # ---------------------------------------------------------------- sampling
  g = c.generate = ml_collections.ConfigDict()
  g.prompt = 'def fibonacci(n):\n'
  g.max_new_tokens = 160
  g.temperature = 0.8  # 0 = greedy
  g.top_k = 40  # 0 = no top-k filtering
  g.at_end = True  # print a sample when training ends
  # --mode=generate: prompts_file (one prompt a line; a literal \n inside a line is a newline)
  # overrides prompt; all prompts decode as one batch (left-padded, per-sequence positions).
  g.prompts_file = ''
  g.top_p = 1.0  # nucleus sampling: keep the smallest set of tokens with this much mass (1 = off)
  g.seed = -1  # sampling seed; -1 -> the global seed
  g.stop_tokens = ''  # comma-separated token ids that end a sequence (besides end-of-document)

  # ---------------------------------------------------------------- inference engine
  # effjax/infer/: how --mode=generate (and bench decode) decodes.
  inf = c.infer = ml_collections.ConfigDict()
  # 'plain' (one full forward per token), 'early_exit' (CALM: a token leaves at the first exit
  # whose confidence beats exit_threshold; deeper layers' caches are filled from its hidden
  # state), 'self_speculative' (LayerSkip: draft with the first layers + an exit head, verify
  # with the rest in one pass), 'speculative' (a separate draft model, exact rejection sampling).
  inf.method = 'plain'
  inf.weights_dtype = ''  # weights cast once for decoding: '' = model.compute_dtype, or a dtype
  # The decoding engine's attention over the cache (dense and flash kinds; --mode=generate and
  # `bench decode --methods`): 'auto' = the Triton kernel of effjax/kernels/decode_attention on
  # GPU, XLA elsewhere; 'triton'; 'xla'. LM.decode (`bench decode` without --methods, the
  # compression reports) takes the kernel on GPU unless model.attention_backend='reference'.
  inf.attention_kernel = 'auto'
  # Weights stored transposed (outputs before inputs) for decoding, comma-separated names; the
  # products are the same. 'wo': on GPU XLA turns the out projection's one-row product into a
  # multiply and a reduction over the weight's major axes, which the transposed layout makes a
  # row reduction (the product 2.6x, the batch-1 step 1.20x faster on an H100; see
  # experiments/decode_attention). '' keeps the layout. Names must be projections computed with
  # layers.matmul (a name that matches no weight, or the embedding / experts, is an error).
  inf.output_major = 'wo'
  # Weight-only quantized kinds ('int8', 'int4', comma-separated) whose projections decoding
  # stores transposed: a single row then takes the output-major GEMV kernels
  # (effjax/kernels/quantized_matmul), one launch per product group with its final output and no
  # split-K partials to sum; more rows (the prompt, batched decoding) multiply the transposed
  # weights through XLA rather than the kernel. gpt_1b at batch 1: int8 1.18x bf16 with 'int8'
  # against 1.01x without (H100), 1.07-1.12x (H200); int4 this way 1.29-1.30x with its kernel
  # reading 32-bit words (H100; 1.06x reading bytes), above its [K, N] kernels' 1.18x. Off by
  # default: at batch 16 the transposed weights through XLA ran int4 0.37x and int8 0.60x bf16
  # (H100), where the [K, N] kernels keep 1.01-1.02x. See experiments/quantized_matmul.
  inf.qmm_output_major = ''
  # True: where the decode-attention kernel runs (infer.attention_kernel on GPU, the full-cache
  # attention kinds), it also rotates q and the new keys (rotary) and writes the new keys and
  # values into the cache, in place, instead of a rotary kernel, a query-padding kernel and two
  # cache writes a layer before it (decoding's engine and LM.decode's timing path). Checked on an
  # H100 against the XLA path (experiments/decode_attention/check_write.py: the caches bit for
  # bit, the same greedy tokens). configs/gpt_1b.py there: batch 1 2.9-3.5% faster at 1k and
  # 3.7-4.7% at 8k (paired runs); batch 16 1.3% slower at 1k, the same at 8k. False: the XLA
  # rotary and cache writes before the kernel. See experiments/decode_attention.
  inf.cache_write_in_kernel = True
  # The decode-attention kernel's tiling: '' = its default (64 cache slots a loop step, the cache
  # cut into ranges so batch x kv heads x ranges is about two programs an SM, 4 warps, 2 pipeline
  # stages), or 'BLOCK_K:SPLIT[:WARPS[:STAGES]]' (BLOCK_K or SPLIT may be 'auto'; SPLIT is capped
  # at the cache's blocks), e.g. '128:auto:4:3'. The decoding engine's paths only.
  inf.decode_attention_tiling = ''
  # True: on a GPU, the one-row products of the float weights infer.output_major stores
  # transposed ('wo' by default) take the Pallas GEMV kernel (effjax/kernels/gemv) instead of
  # XLA's row reduction. Batched steps and other devices keep XLA. Off: on an H100 the batch-1
  # step of configs/gpt_1b.py was 2% slower with it (1.102 against 1.079 ms; the kernel 5.9 us a
  # call, 1.4 TB/s). See experiments/decode_attention.
  inf.output_major_kernel = False
  # True: the decoding engine folds each block's RMSNorm gain into the plain float weights it
  # feeds (attention's q/k/v, a SwiGLU's gate/up) once, and hands those products the raw residual
  # with its RMS factor applied to their outputs (effjax.models.layers.Folded), so no normalised
  # copy of the residual is written before them: a batch-1 step's two norm-application kernels a
  # layer are what this aims at. The same logits up to rounding (CPU tests); not yet timed on a
  # GPU, so off. Quantized, low-rank, LoRA and transposed weights keep their norm. The engine's
  # paths only (generate, bench decode --methods); LM.decode's timing paths do not fold.
  inf.fold_norms = False
  inf.max_len = 0  # cache positions; 0 = longest prompt + generate.max_new_tokens + gamma + 1
  # early_exit: the confidence measure: 'softmax' (top-1 probability), 'margin' (top-1 minus
  # top-2 probability), 'entropy' (1 - entropy / log(vocab)), 'state' (cosine of the hidden state
  # with the previous layer's). A token exits when confidence > threshold (1.0 = never).
  inf.confidence = 'softmax'
  inf.exit_threshold = 0.9
  # > 0: calibrate the threshold on held-out data instead: the lowest threshold at which the
  # exits' greedy token differs from the full model's on at most this fraction of tokens.
  inf.exit_tolerance = 0.0
  inf.calibration_batches = 2  # held-out batches of train.batch_size for the calibration
  # early_exit with several sequences: skip the deeper layers (lax.cond, filling their caches
  # only) when every sequence of the batch has exited; False always computes every layer.
  inf.exit_skip = True
  inf.gamma = 4  # speculative methods: tokens drafted per verification pass
  inf.draft_exit = 0  # self_speculative: the exit layer that drafts; 0 = the first exit
  # speculative: the draft model, a config file (its vocabulary must match) and the workdir of
  # its trained checkpoint ('' = a randomly initialised draft, for benchmarks only).
  inf.draft_config = ''
  inf.draft_workdir = ''

  # ---------------------------------------------------------------- compression
  # --mode=compress (effjax/compress/): reads the latest checkpoint of --workdir (this config must
  # describe it), writes the compressed model to out_workdir (which must not exist yet) with
  # report.json / report.md (bytes, decode tokens/s, held-out loss before and after) and
  # compression.json, which every mode reading out_workdir applies to its config by itself.
  cp = c.compress = ml_collections.ConfigDict()
  # '' (none), post-training quantization 'int8' (weights), 'w8a8' (weights + activations),
  # 'fp8' (e4m3 weights), 'int4' (weights, groups); 'qat_int8' / 'qat_int4' (fake-quantized
  # fine-tuning, straight-through gradients); pruning 'magnitude' or '2:4'; 'lowrank' (SVD);
  # 'lora' (adapters on a frozen base); 'merge' (LoRA / low-rank / QAT back to a dense model);
  # 'distill' (train a student with the model of --workdir as its teacher).
  cp.method = ''
  cp.out_workdir = ''  # where the compressed checkpoint and the report go (required)
  # Parameter names compressed (the projections of every mixer use these names).
  cp.targets = 'wq,wk,wv,wo,w_gate,w_up,w_down'
  cp.int4_group_size = 128  # int4 / qat_int4: input entries sharing a scale (per output channel)
  # The int8 / int4 weight-only product (effjax/kernels/quantized_matmul): 'auto' (a Triton
  # kernel reading the stored bytes once, on GPU for products of at most 64 rows: decoding;
  # dequantize + matmul in XLA otherwise), 'triton' (every product whose shapes the kernel can
  # tile, at any row count; a projection it cannot, such as a 4-wide gate, is said once in the
  # log and takes XLA) or 'xla'. Not recorded with the compressed model: give it when
  # evaluating or decoding one to compare the two paths.
  cp.qmm_backend = 'auto'
  cp.qmm_interpret = False  # run the kernel in Pallas interpret mode (slow; CPU testing)
  # Products sharing an input (attention's q, k, v; SwiGLU's gate, up) as one kernel launch
  # (one x load, one set of programs over all their column tiles); False: a launch each. A
  # weight the kernel cannot tile (Mamba-1's dt_low) takes XLA's product; the rest keep one launch.
  cp.qmm_fuse = True
  # The kinds ('int8', 'int4', comma-separated; '' none) whose single-row products on the kernel
  # path (batch-1 decoding) take the GEMV kernels (elementwise products, no tensor cores) rather
  # than the dot kernels. int4 by default: on an H100 gpt_1b decoded 1.11x faster through them,
  # int8 0.93x (one run; experiments/quantized_matmul). Not recorded with the model either.
  cp.qmm_gemv = 'int4'
  cp.calibration_batches = 2  # w8a8: held-out batches of train.batch_size that fix the scales
  cp.prune_sparsity = 0.5  # 'magnitude': fraction of each target (or all targets) set to zero
  cp.prune_scope = 'layer'  # 'layer' (each layer's matrix) or 'global' (all targets ranked together)
  cp.lowrank_energy = 0.9  # 'lowrank': kept fraction of the squared singular values (0, 1]
  cp.lowrank_ranks = ''  # 'name=rank,...'; set by --mode=compress from the energy (recorded)
  cp.lora_rank = 8
  cp.lora_alpha = 16.0  # the update is (alpha / rank) * A @ B; B starts at zero
  # The frozen base's storage: '' keeps the parameter dtype (float32); 'bfloat16' halves its
  # bytes (it is read in the compute dtype anyway); 'int8' / 'int4' quantize it weight-only
  # as post-training quantization does (per-channel int8, int4 in groups of int4_group_size;
  # the QLoRA recipe with int8 / int4 for NF4). The adapters stay float32.
  cp.lora_base_dtype = ''
  # LoRA's frozen embedding, head and exit heads' projections: '' keeps the parameter dtype;
  # 'bfloat16' halves their bytes (they are read in the compute dtype anyway; merging restores
  # the parameter dtype).
  cp.lora_vocab_dtype = ''
  # 'distill': the student is this config's model with these overrides ('num_layers=2,...');
  # teacher_model is the teacher's model section as JSON (recorded by --mode=compress).
  cp.student_model = ''
  cp.teacher_model = ''
  cp.distill_temperature = 2.0
  cp.distill_weight = 1.0  # loss = CE + weight * T^2 * KL(teacher || student)
  cp.distill_hidden_weight = 0.0  # + weight * MSE of the final hidden states (equal widths)
  # Fine-tuning of the compressed model inside --mode=compress (0 = none; 'distill' needs > 0):
  # this many train steps at this peak learning rate (0 = optim.learning_rate).
  cp.finetune_steps = 0
  cp.finetune_learning_rate = 0.0
  # The report's decoding measurement: tokens/s at batch 1 after a prompt of decode_context.
  cp.decode_context = 64
  cp.decode_steps = 32

  # ---------------------------------------------------------------- multi-host
  # One process per host (or per group of local devices), all running the same command; each
  # reads its own slice of the data and writes the checkpoint shards it owns. See
  # effjax/parallel/distributed.py for where unset values come from.
  dist = c.distributed = ml_collections.ConfigDict()
  # Call jax.distributed.initialize. On Cloud TPU, SLURM and Open MPI everything else is found
  # automatically; num_processes > 1 (here or in $EFFJAX_NUM_PROCESSES) implies it.
  dist.initialize = False
  dist.coordinator_address = ''  # process 0's 'host:port'; '' -> $JAX_COORDINATOR_ADDRESS, cluster
  dist.num_processes = 0  # 0 -> $EFFJAX_NUM_PROCESSES or the cluster
  dist.process_id = -1  # 0 .. num_processes - 1; -1 -> $EFFJAX_PROCESS_ID or the cluster

  return c
