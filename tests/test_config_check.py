"""diffusion_jax.config_check and diffusion_jax.config: every config error names key, value and what is allowed,
before any work; every shipped config validates; overrides parse as main's flags do."""


import pytest

from diffusion_jax import build
from diffusion_jax.config import load_config
from diffusion_jax.config_check import check_config
from helpers import ROOT, tiny_config, tiny_latent_config, tiny_text_config, write_fake_fashion_mnist


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return write_fake_fashion_mnist(str(tmp_path_factory.mktemp("fmnist")))


def _set(config, key, value):
  section, _, leaf = key.rpartition(".")
  node = config
  for part in filter(None, section.split(".")):
    node = node[part]
  node[leaf] = value


PIXEL_ERRORS = [
    ("mode", "evaluate", r"config.mode='evaluate' is invalid"),
    ("num_train_steps", -1, r"config.num_train_steps=-1 is invalid"),
    ("batch_size", 12, r"config.batch_size=12 is invalid: must be divisible by the 8 devices"),
    ("keep_checkpoints", 0, r"config.keep_checkpoints=0 is invalid: must be an int >= 1"),
    ("preview_every_steps", 0, r"config.preview_every_steps=0 is invalid"),
    ("data.dataset", "svhn", r"config.data.dataset='svhn' is invalid: not fashion_mnist, mnist, image_folder or a tensorflow-datasets dataset"),
    ("data.image_size", 20, r"config.data.image_size=20 is invalid: dataset 'fashion_mnist' in .* has 16x16 images"),
    ("data.channels", 3, r"config.data.channels=3 is invalid: dataset 'fashion_mnist' in .* has 1 channel"),
    ("diffusion.loss", "l1", r"config.diffusion.loss='l1' is invalid: choose one of \('simple'"),
    ("diffusion.loss", "hybrid", r"config.diffusion.variance='fixed_large' is invalid: loss='hybrid' learns"),
    ("diffusion.num_timesteps", 1, r"config.diffusion.num_timesteps=1 is invalid: must be an int >= 2"),
    ("diffusion.p_uncond", 1.5, r"config.diffusion.p_uncond=1.5 is invalid"),
    ("diffusion.lossy", 1, r"config.diffusion.lossy=None is invalid: unknown key"),
    ("optim.ema_decay", 1.5, r"config.optim.ema_decay=1.5 is invalid: must be in \[0, 1\)"),
    ("optim.warmup_steps", -5, r"config.optim.warmup_steps=-5 is invalid: must be an int >= 0"),
    ("optim.learning_rate", 0.0, r"config.optim.learning_rate=0.0 is invalid"),
    ("optim.grad_accum_steps", 0, r"config.optim.grad_accum_steps=0 is invalid: must be an int >= 1"),
    ("optim.grad_accum_steps", 3, r"config.optim.grad_accum_steps=3 is invalid: the batch of 8 must split into 3 "
     r"micro-batches of whole rows on each of the 8 devices"),
    ("model.dropout", 2.0, r"config.model.dropout=2.0 is invalid: must be in \[0, 1\)"),
    ("model.ch", 0, r"config.model.ch=0 is invalid: must be an int >= 1"),
    ("model.ch_mult", (), r"config.model.ch_mult=\(\) is invalid: must be a tuple of ints"),
    ("model.dtype", "float16", r"config.model.dtype='float16' is invalid"),
    ("model.conv_precision", "float16", r"config.model.conv_precision='float16' is invalid: choose one of "
     r"\('float32', 'bfloat16'\)"),
    ("model.matmul_precision", "half", r"config.model.matmul_precision='half' is invalid: choose one of "
     r"\('float32', 'bfloat16'\)"),
    ("model.attention_impl", "flash", r"config.model.attention_impl='flash' is invalid: choose one of "
     r"\('xla', 'cudnn'\)"),
    ("model.attention_impl", "cudnn", r"config.model.attention_impl='cudnn' is invalid: cuDNN attention runs on NVIDIA "
     r"GPUs and this run's backend is cpu: use 'xla'"),
    ("model.chh", 3, r"config.model is invalid: .*unexpected keyword argument 'chh'"),
    ("model.attn_resolutions", (5,), r"config.data.image_size=16 and config.model do not fit: attn_resolutions"),
    ("model.context_dim", 384, r"config.model.context_dim=384 is invalid: cross-attention needs a context"),
    ("sample.sampler", "plms", r"config.sample.sampler='plms' is invalid"),
    ("sample.num_steps", 51, r"config.sample.num_steps=51 is invalid: .*num_timesteps=50"),
    ("sample.preview_steps", 100, r"config.sample.preview_steps=100 is invalid: .*num_timesteps=50"),
    ("sample.preview_sampler", "x", r"config.sample.preview_sampler='x' is invalid"),
    ("sample.spacing", "log", r"config.sample.spacing='log' is invalid"),
    ("sample.eta", -1.0, r"config.sample.eta=-1.0 is invalid"),
    ("sample.guidance_scale", -1.0, r"config.sample.guidance_scale=-1.0 is invalid: guidance_scale must be"),
    ("sample.prompt", "a bag", r"prompts and labels need a conditional model"),
    ("sample.class_labels", "3", r"prompts and labels need a conditional model"),
    ("eval.bpd_num_images", -1, r"config.eval.bpd_num_images=-1 is invalid"),
]


def tiny_class_config(data_dir):
  config = tiny_config(data_dir)
  config.model.num_classes = 10
  return config


CLASS_ERRORS = [
    ("sample.class_labels", "1,12", r"config.sample.class_labels='1,12' is invalid: \[12\] out of range \[0, 10\)"),
    ("sample.class_labels", "1,2", r"class_labels has 2 labels but sample.num_images=10"),
    ("sample.class_labels", "one", r"give comma-separated class indices"),
    ("sample.prompt", "a bag", r"prompts need a text-conditional model"),
    ("model.num_classes", -1, r"config.model.num_classes=-1 is invalid"),
]

TEXT_ERRORS = [
    ("sample.prompt", "a | b", r"2 prompts but sample.num_images=10"),
    ("text.encoder", "bert", r"config.text.encoder='bert' is invalid"),
    ("model.context_dim", 0, r"config.model.context_dim=0 is invalid: a text-conditional model needs"),
    ("model.num_classes", 10, r"config.model.num_classes=10 is invalid: text models are conditioned on captions"),
    ("text.max_length", 1, r"config.text.max_length=1 is invalid"),
    ("data.dataset", "image_folder", r"config.data.data_dir=.* holds no .png/.jpg/.jpeg files"),
]

LATENT_ERRORS = [
    ("autoencoder.model.ch_mult", (1, 2, 2, 2, 2, 2), r"autoencoder.model.ch_mult=.* f=32 .* does not divide"),
    ("autoencoder.rec_loss", "l3", r"config.autoencoder.rec_loss='l3' is invalid"),
    ("autoencoder.model.matmul_precision", "fp8", r"config.autoencoder.model.matmul_precision='fp8' is invalid: "
     r"choose one of \('float32', 'bfloat16'\)"),
    ("autoencoder.batch_size", 4, r"config.autoencoder.batch_size=4 is invalid: must be divisible by the 8"),
    ("autoencoder.optim.learning_rate", -1.0, r"config.autoencoder.optim.learning_rate=-1.0 is invalid"),
    ("autoencoder.model.zchannels", 2, r"config.autoencoder.model is invalid: .*'zchannels'"),
    ("sample.clip_denoised", True, r"sample.clip_denoised=True is invalid: latents are not in"),
    ("eval.bpd_num_images", 4, r"config.eval.bpd_num_images=4 is invalid: bits/dim is a pixel-space bound"),
]

CASES = ([(tiny_config, *case) for case in PIXEL_ERRORS] + [(tiny_class_config, *case) for case in CLASS_ERRORS]
         + [(tiny_text_config, *case) for case in TEXT_ERRORS] + [(tiny_latent_config, *case) for case in LATENT_ERRORS])


@pytest.mark.parametrize("make_config,key,value,message", CASES,
                         ids=[f"{make.__name__}-{key}={value}" for make, key, value, _ in CASES])
def test_config_errors_name_key_value_and_what_is_allowed(data_dir, make_config, key, value, message):
  config = make_config(data_dir)
  check_config(config)  # the base of every case is valid
  _set(config, key, value)
  with pytest.raises(ValueError, match=message):
    check_config(config)


def test_text_encoder_width_is_checked_when_it_loads(data_dir):
  config = tiny_text_config(data_dir)
  config.model.context_dim = 128
  with pytest.raises(ValueError, match="set --config.model.context_dim=384"):
    build.load_text_encoder(config)


SHIPPED = [("fashion_mnist", ""), ("fashion_mnist", ":full"), ("latent", ""), ("latent", ":full"),
           ("latent", ":class"), ("latent", ":uncond"), ("latent", ":full,class"), ("cifar10_ddpm", "")]


@pytest.mark.parametrize("name,variant", SHIPPED)
def test_every_shipped_config_validates(name, variant):
  config = load_config(name + variant)
  check_config(config)
  assert (config.autoencoder is not None) == (name == "latent")


def test_load_config_parses_overrides_as_main_does():
  config = load_config("latent:class", ["model.ch=16", "sample.prompt=a | b", "sample.num_steps=20",
                                        "autoencoder.model.ch_mult=(1,2)", "optim.learning_rate=3e-4"])
  assert config.model.ch == 16 and config.sample.prompt == "a | b" and config.sample.num_steps == 20
  assert tuple(config.autoencoder.model.ch_mult) == (1, 2) and config.optim.learning_rate == 3e-4
  assert config.model.num_classes == 10
  # A key given again (a script's override on top of a case's): the last wins, tuples too (config_flags merged them;
  # main parses its argv through the same parse_config_flags).
  config = load_config("cifar10_ddpm", ["model.ch_mult=(1,2,2)", "model.attn_resolutions=(8,)", "model.ch_mult=(1,)"])
  assert tuple(config.model.ch_mult) == (1,) and tuple(config.model.attn_resolutions) == (8,)
  from diffusion_jax.config import last_override_wins  # main's argv: the two-token form too, other flags kept
  argv = ["m", "--config=c.py", "--config.a=1", "--config.b", "(1,2)", "--workdir=w", "--config.a=2", "--config.b=(3,)",
          "--config.flag", "--other"]
  assert last_override_wins(argv) == ["m", "--config=c.py", "--workdir=w", "--config.a=2", "--config.b=(3,)",
                                      "--config.flag", "--other"]
  with pytest.raises(Exception, match="modle"):
    load_config("latent", ["modle.ch=3"])
