"""Reading and fetching pretrained weight files, shared by the text encoders and the FID Inception network.

- `safetensors`: `read_safetensors`, `write_safetensors` (Hugging Face checkpoints).
- `torch_pickle`: `load_torch_state_dict`, a PyTorch .pth state dict as numpy arrays without torch.
- `download`: `download_file` (one URL to a local file, atomically) and `download_from_hub`.

Nothing here knows a model: the callers map tensor names onto their Flax trees.
"""
