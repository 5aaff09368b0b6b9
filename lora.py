"""LoRA (Hu et al. 2021), written out: a low-rank update beside each linear layer of the language model's decoder.

    y = W x + b + (alpha / R) * B A x          W: [out, in] frozen; A: [R, in], B: [out, R] trained

B starts at zero, so the adapted model is the base exactly; A starts as PyTorch's own nn.Linear init
(kaiming-uniform, a = sqrt(5), as peft does), from a seeded generator. Only A and B train: the embeddings, norms,
LM head and (in a VLM) the whole vision tower stay frozen. No dropout on the adapter path (peers default to 0 or
0.05; 0 keeps a run deterministic).

How a run uses it (loop.Run.pending_stages and finish_stage), one fresh adapter per stage:
  1. load the stage's start weights (the base, or the merged checkpoint of the stage before), apply_lora
     (before FSDP2 shards the blocks: the adapters are parameters of the blocks they sit in, sharded with them)
  2. train A and B only (the optimizer gets trainable_parameters)
  3. save_checkpoint writes merged(state_dict): W + (alpha / R) B A, plain Hugging Face weights that
     from_pretrained loads with no adapter code; the run reloads that checkpoint and evaluates it, so the numbers
     recorded are the checkpoint's
A resumed run reloads the last merged checkpoint and applies fresh adapters, exactly what an uninterrupted run does
at the start of its next stage: the adapters never need saving, and resuming gives the same numbers.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    """An nn.Linear's frozen weight and bias (the same names, so the state dict keys stay Hugging Face's) plus the
    trained low-rank pair lora_A, lora_B."""

    def __init__(self, linear, rank, alpha, generator=None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.scale = lora_scale(rank, alpha)
        kw = {"dtype": linear.weight.dtype, "device": linear.weight.device}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        if self.lora_A.device.type != "meta":  # a model built on the meta device gets its values loaded later
            a = torch.empty(rank, self.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # nn.Linear's own init
            with torch.no_grad():
                self.lora_A.copy_(a)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


def lora_scale(rank, alpha):
    """The update's factor alpha / R."""
    return alpha / rank


def default_alpha(rank):
    """alpha = 2R: the factor alpha / R stays 2 at every rank, so a learning rate chosen at one rank is a fair start at
    another (Hu et al. fix alpha and do not retune it when they vary R); 2R is the common recipe setting."""
    return 2 * rank


def decoder_blocks(model):
    """The language model's decoder layers: the text decoder of a VLM (never its vision blocks), or a causal LM's."""
    return list(model.get_decoder().layers)


def apply_lora(model, rank, alpha, seed):
    """Freeze every parameter, then put a LoRALinear in place of each nn.Linear inside the decoder blocks, A drawn
    from a generator seeded with `seed` (the same A on every rank and in every process). Returns the number of
    trainable parameters, sum over the adapted linears of R * (in + out)."""
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for block in decoder_blocks(model):
        for name, m in list(block.named_modules()):
            if type(m) is nn.Linear:
                parent, _, leaf = name.rpartition(".")
                setattr(block.get_submodule(parent) if parent else block, leaf, LoRALinear(m, rank, alpha, g))
    return sum(p.numel() for p in trainable_parameters(model))


def trainable_parameters(model):
    """The parameters an optimizer should get: all of them in full fine-tuning, only the adapters under LoRA."""
    return [p for p in model.parameters() if p.requires_grad]


def scale_of(model):
    """The alpha / R of the model's adapters, or None when it has none."""
    return next((m.scale for m in model.modules() if isinstance(m, LoRALinear)), None)


def merged(state_dict, scale):
    """A state dict with every adapter folded into its weight, W + scale * B A, and the lora_A / lora_B keys gone:
    the plain weights that from_pretrained loads. The identity when scale is None (no adapters)."""
    if scale is None:
        return state_dict
    out = {k: v for k, v in state_dict.items() if k.rpartition(".")[2] not in ("lora_A", "lora_B")}
    for k in state_dict:
        layer, dot, leaf = k.rpartition(".")
        if leaf == "lora_A":
            w = out[layer + dot + "weight"]
            delta = state_dict[layer + dot + "lora_B"].float() @ state_dict[k].float()
            out[layer + dot + "weight"] = (w.float() + scale * delta).to(w.dtype)
    return out
