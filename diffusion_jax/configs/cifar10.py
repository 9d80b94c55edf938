"""DDPM on CIFAR10: the paper's unconditional CIFAR10 model (Ho et al. 2020, Table 1, L_simple row).

Reproduces the original `scripts/run_cifar.py` recipe: the 35.7M-parameter U-Net (`unet2d16b2`),
T=1000 linear betas, eps-prediction with the unweighted MSE (L_simple), Adam at 2e-4 with a
5000-step warm-up, gradient clipping at 1.0, batch 128, EMA 0.9999, random flips, 800k steps.

    python -m diffusion_jax.main --config=configs/cifar10.py --workdir=/tmp/ddpm_cifar10

Expected (paper): FID 3.17 (50k EMA samples vs the train set), IS 9.46, NLL <= 3.75 bits/dim on the
test set. The paper trained for 10.6 h on a TPU v3-8 (21 steps/s).

This is the base config: every other config in this folder imports it and overrides its deltas.
The choices of each enum key and the rules between keys are `diffusion_jax.options`; the
top-level `configs/*.py` files are thin aliases of these, for `--config=configs/<name>.py`.
"""

import ml_collections
from ml_collections import config_dict


def _data() -> ml_collections.ConfigDict:
    """The data: which images, at what size, and how they are augmented."""
    data = ml_collections.ConfigDict()
    data.dataset = 'cifar10'  # a tfds name, 'digits', 'folder' or 'npz'
    data.data_dir = config_dict.placeholder(
        str
    )  # tfds data_dir; None: $TFDS_DATA_DIR or tfds default
    data.path = config_dict.placeholder(str)  # image folder or .npz file for 'folder' / 'npz'
    data.image_size = 32  # height = width in pixels
    data.num_channels = 3
    data.random_flip = True  # random horizontal flips during training
    # How tfds datasets are read, one of options.LOADERS: 'grain' (random access to ArrayRecord
    # files: resuming costs the same at any step), 'tfdata' (TFRecord files) or 'auto' (grain
    # for ArrayRecord, tf.data otherwise). The built-in sources are read in memory.
    data.loader = 'auto'
    data.train_split = 'train'
    data.eval_split = 'test'
    return data


def _model() -> ml_collections.ConfigDict:
    """The U-Net: `unet2d16b2` of the original code (Appendix B)."""
    model = ml_collections.ConfigDict()
    model.name = 'ddpm_unet'  # one of options.MODELS
    model.ch = 128  # base channel count
    model.ch_mult = (1, 2, 2, 2)  # channel multiplier per resolution level
    model.num_res_blocks = 2  # res blocks per level on the down path (+1 on the up path)
    model.attn_resolutions = (16,)  # feature-map sizes that get a self-attention block
    model.dropout = 0.1
    model.resamp_with_conv = True  # 3x3 conv in down/upsampling (else avg-pool / plain nearest)
    model.num_groups = 32  # GroupNorm groups
    # Options of Improved DDPM's U-Net (the defaults are the paper's network):
    model.num_heads = 1  # attention heads (Improved DDPM: 4)
    model.num_head_channels = 0  # > 0: heads of this many channels each, instead of num_heads
    # The timestep embedding scales and shifts each block's second GroupNorm,
    # GroupNorm(h) * (1 + scale) + shift, instead of being added before it.
    model.use_scale_shift_norm = False
    # What a PyTorch port (Improved DDPM) does differently; they matter only to run its weights:
    model.norm_epsilon = 1e-6  # GroupNorm epsilon (tf.contrib's 1e-6; PyTorch's 1e-5)
    model.time_embedding = 'ddpm'  # options.TIME_EMBEDDINGS: 'ddpm' [sin, cos]; 'iddpm' [cos, sin]
    model.downsample_padding = 'same'  # options.DOWNSAMPLE_PADDINGS: TF 'same' or 'symmetric'
    model.dtype = 'float32'  # compute dtype, one of options.DTYPES
    model.param_dtype = 'float32'  # storage dtype of the parameters
    model.remat = False  # recompute each block in the backward pass: less memory, same results
    # How the 3x3 convs are computed, one of options.CONV_IMPLS: 'auto' (the fastest measured on
    # the backend: options.AUTO_CONV_IMPL), 'xla', 'im2col', 'shifted' or 'winograd' (stride-1
    # convs). Same weights, results.
    model.conv_impl = 'auto'
    # How each Upsample's nearest-neighbour x2 and 3x3 conv are computed, one of
    # options.UPSAMPLE_IMPLS: 'auto' (options.AUTO_UPSAMPLE_IMPL of the backend), 'repeat' (the
    # original's) or 'subpixel' (four 2x2 convs). Same weights, results.
    model.upsample_impl = 'auto'
    # How the 1x1 layers (shortcuts, attention's q, k, v, proj_out) are computed, one of
    # options.NIN_IMPLS: 'auto' (options.AUTO_NIN_IMPL of the backend), 'dense' (the original's
    # matmul) or 'conv' (a 1x1 convolution). Same weights, results.
    model.nin_impl = 'auto'
    # How the convolutions' gradients are computed, one of options.CONV_VJPS: 'auto'
    # (options.AUTO_CONV_VJP of the backend), 'jax' (JAX's transpose rules) or 'nhwc' (forward
    # NHWC convolutions, fast inside XLA:CPU's loops too: microbatches). Same weights, results.
    model.conv_vjp = 'auto'
    # The network sees t * 1000 / T instead of t (Improved DDPM's default), so that its timestep
    # embedding spans the same range for any T. Defines the weights' meaning.
    model.rescale_timesteps = False
    # Class-conditional when > 0: a learned embedding of the label (K classes plus one "null"
    # id, K, for the unconditional branch of classifier-free guidance) is added to the timestep
    # embedding. 0: unconditional, the paper's model. Defines the weights' meaning.
    model.num_classes = 0
    return model


def _diffusion() -> ml_collections.ConfigDict:
    """The forward process and what the network predicts (section 3, L_simple)."""
    diffusion = ml_collections.ConfigDict()
    diffusion.num_timesteps = 1000  # T
    diffusion.beta_schedule = 'linear'  # one of options.BETA_SCHEDULES
    diffusion.beta_start = 1e-4  # first beta of linear / quad
    diffusion.beta_end = 0.02  # last beta of linear / quad, and the value of const
    diffusion.model_mean_type = 'eps'  # one of options.MODEL_MEAN_TYPES
    diffusion.model_var_type = 'fixedlarge'  # one of options.MODEL_VAR_TYPES
    diffusion.loss_type = 'mse'  # one of options.LOSS_TYPES
    return diffusion


def _training() -> ml_collections.ConfigDict:
    """The loop: batch, length, logging, checkpoints and sample grids."""
    training = ml_collections.ConfigDict()
    training.batch_size = 128  # global batch, split over all devices
    # The batch goes through the network in this many slices whose gradients are summed: one
    # optimizer step on the whole batch in the memory of one slice. Must divide the batch.
    training.num_microbatches = 1
    training.num_train_steps = 800_000
    # Train steps per compiled call (a lax.scan of them, as the original's iterations_per_loop):
    # less Python dispatch per step, the same steps. Lowered to a divisor of the log,
    # checkpoint, sample and eval cadences (train.steps_per_call). 1 until measured on a GPU.
    training.steps_per_call = 1
    training.log_every_steps = 100
    training.checkpoint_every_steps = 10_000
    training.keep_checkpoints = 3
    training.sample_every_steps = 20_000  # 0 disables sample grids during training
    training.seed = 0
    # How t is drawn (options.T_SAMPLERS): 'uniform' (the paper) or 'loss_second_moment'
    # (Improved DDPM section 3.3: p_t proportional to the RMS of L_t's last 10 values, losses
    # weighted by 1 / (T p_t); for the variational losses). Fixed for the life of a workdir.
    training.t_sampler = 'uniform'
    training.max_nonfinite_steps = 10  # skipped non-finite steps in a row before the run stops
    training.allow_config_change = False  # resume although model/diffusion/image shape changed
    # Class-conditional models: the probability that a training label is replaced by the null
    # id, which trains the unconditional branch that classifier-free guidance needs.
    training.label_dropout = 0.0
    # Evaluation during training (0: off): every N steps, eval_num_samples images from the EMA
    # parameters with the sampler of config.sampling (set sampler='ddim', num_steps=50 for
    # speed), scored with FID/IS (needs config.eval.inception_weights) or, on digits, the digits
    # classifier's IS/FD, logged to TensorBoard as eval/<metric>.
    training.eval_every_steps = 0
    training.eval_num_samples = 1000
    training.best_metric = (
        ''  # keep the best checkpoint by this, in WORKDIR/best (options.BEST_METRICS)
    )
    return training


def _optim() -> ml_collections.ConfigDict:
    """Adam with warm-up, clipping and the EMA of the parameters (Appendix B)."""
    optim = ml_collections.ConfigDict()
    optim.optimizer = 'adam'  # one of options.OPTIMIZERS
    optim.learning_rate = 2e-4
    optim.warmup_steps = 5000  # linear warm-up from 0
    optim.grad_clip = 1.0  # global-norm clipping of the averaged gradient; 0 disables
    optim.weight_decay = 0.0  # decoupled weight decay (adamw only)
    optim.beta1 = 0.9
    optim.beta2 = 0.999
    optim.eps = 1e-8
    optim.ema_decay = 0.9999  # EMA of the parameters; samples and metrics use the EMA
    # More EMA rates kept beside ema_decay's in the same run (Improved DDPM keeps several);
    # sample or evaluate one with --config.sampling.ema_decay. Fixed for the life of a workdir.
    optim.ema_decays = ()
    return optim


def _sampling() -> ml_collections.ConfigDict:
    """`--mode=sample`: the reverse chain and how many images it draws."""
    sampling = ml_collections.ConfigDict()
    sampling.sampler = 'ancestral'  # one of options.SAMPLERS
    # The timesteps the chain keeps (diffusion_jax.spacing): None (all T), an int spread by
    # `spacing`, 'ddim50' (DDIM's stride), or Improved DDPM's sections '10,15,20' / (10, 15, 20).
    sampling.num_steps = config_dict.placeholder(object)
    sampling.spacing = 'even'  # an int num_steps: 'even' (ours, the default) or 'iddpm' rounding
    sampling.eta = 0.0  # DDIM noise scale (0 = deterministic)
    sampling.clip_denoised = True  # clip the predicted x0 to [-1, 1]
    sampling.num_samples = 64  # --mode=sample: images written to samples/samples_<step>.npz
    sampling.batch_size = 256  # images per device-parallel call; any size (padded to the devices)
    sampling.seed = 0  # image i uses fold_in(PRNGKey(seed), i)
    sampling.checkpoint_step = config_dict.placeholder(int)  # None: the newest checkpoint
    # Which EMA to sample and evaluate: None, optim.ema_decay's; or one of optim.ema_decays.
    sampling.ema_decay = config_dict.placeholder(float)
    sampling.interpolate = ''  # 'I,J': interpolate eval images I and J (paper section 6.3)
    sampling.interpolate_t = config_dict.placeholder(int)  # step to noise them to; None: T // 2
    sampling.interpolate_num = 11  # lambdas evenly spaced in [0, 1], ends included
    # Class-conditional models only. -1: image i gets class i mod K (every class, the same
    # images for any batch or device count); a class id in [0, K): every image of that class.
    sampling.class_label = -1
    # Classifier-free guidance w (Ho & Salimans 2022): eps = (1 + w) eps(x, y) - w eps(x, null).
    # 0: plain conditional sampling. Needs training.label_dropout > 0 to be meaningful.
    sampling.guidance_scale = 0.0
    return sampling


def _eval() -> ml_collections.ConfigDict:
    """`--mode=eval`: the NLL bound, FID and IS (Table 1)."""
    eval_config = ml_collections.ConfigDict()
    eval_config.batch_size = 256
    eval_config.bpd = False  # compute the full T-term NLL bound in bits/dim
    eval_config.num_bpd_images = config_dict.placeholder(int)  # None: the whole eval split
    # The NLL bound of the respaced process, as Improved DDPM reports it for fewer steps:
    # sampling.num_steps' forms, spread by sampling.spacing; None: all T terms.
    eval_config.bpd_num_steps = config_dict.placeholder(object)
    eval_config.num_samples = 50_000  # samples for FID / IS (and the digits metrics); 0: none
    eval_config.inception_weights = config_dict.placeholder(str)  # converted .npz; None: skip FID
    eval_config.inception_sha256 = '6726825d'  # source .pth SHA-256 (prefix); '': accept any
    eval_config.reference_stats = config_dict.placeholder(str)  # FID stats .npz; None: next to data
    eval_config.compute_reference = False  # compute the reference stats if they are missing
    eval_config.reference_split = 'train'  # FID against the train split, as in the paper
    # Class-conditional models: also sample and score at each of these guidance scales w and
    # write the trade-off as a table and a plot (eval/guidance_<step>.png); (): no sweep.
    eval_config.guidance_sweep = ()
    return eval_config


def get_config() -> ml_collections.ConfigDict:
    """Returns the paper's CIFAR10 configuration, one section per function above."""
    return ml_collections.ConfigDict(
        {
            'data': _data(),
            'model': _model(),
            'diffusion': _diffusion(),
            'training': _training(),
            'optim': _optim(),
            'sampling': _sampling(),
            'eval': _eval(),
        }
    )
