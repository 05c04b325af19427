"""How checkpoints arrive: file formats (torch.save zip and pre-1.6 pickles, safetensors), the state
fixes PyTorch's own load applies, and the folders and configs timm and Hugging Face transformers write.

toolkit/checkpoint.py composes these into `load_checkpoint`; nothing here builds a network.
"""
