"""Inference-only rewrites of a trained model: frozen batch norm folded into the convolutions, the networks in
reduced precision and channels-last, optionally compiled.

    model = optimize_for_inference(model, precision="bf16", compile=True)
    batch, image_sizes, _, input_sizes = model.preprocess(images)
    results = model.inference(model.to_model_layout(batch), image_sizes, input_sizes, mask_format="bool")

The model stays a MaskRCNN with the same call signatures; only its networks change. The three stages between
the networks (proposals, detections, results) always see float32 tensors: the networks' outputs are cast back
to float32 where they leave a network, the pooled RoI features are cast to the network's dtype where they
enter one. Speeds are in bench/results/e2e.md.
"""
from __future__ import annotations

import threading
import weakref

import torch
from torch import Tensor, nn

from .backbone import BasicBlock, Bottleneck, FrozenBatchNorm2d, ResNet

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


# ---- batch-norm folding --------------------------------------------------------------------------


def _foldable_norm(m: nn.Module) -> bool:
    if type(m) is FrozenBatchNorm2d:
        return True
    # a BatchNorm2d in eval mode with running statistics is a fixed affine map too
    return (type(m) is nn.BatchNorm2d and not m.training and m.track_running_stats
            and m.running_mean is not None and m.running_var is not None)


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.Module) -> None:
    """conv followed by bn -> conv alone: weight scaled per output channel, bias = shifted old bias."""
    w64 = conv.weight.double()
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma * (var + bn.eps).rsqrt()
    old_bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(var)
    fmt = torch.channels_last if (conv.weight.dim() == 4 and conv.weight.is_contiguous(
        memory_format=torch.channels_last) and not conv.weight.is_contiguous()) else torch.contiguous_format
    weight = (w64 * scale.reshape(-1, *([1] * (w64.dim() - 1)))).to(conv.weight.dtype)
    conv.weight.data = weight.contiguous(memory_format=fmt)
    bias = ((old_bias - mean) * scale + beta).to(conv.weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.data = bias


def _is_plain_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.padding_mode == "zeros"


@torch.no_grad()
def fold_frozen_batchnorm(model: nn.Module) -> nn.Module:
    """Folds every frozen batch norm that directly follows a convolution into that convolution, in place.

    FrozenBatchNorm2d (and BatchNorm2d in eval mode, whose statistics are fixed too) after a Conv2d in the
    ResNet blocks (convK -> bnK), the stem (conv1 -> bn1), the heads' convs.i -> norms.i and any nn.Sequential
    (conv, norm) pair (the FPN's normed blocks) becomes the convolution's scaled weight and bias; the norm is
    replaced by nn.Identity (GroupNorm, whose statistics are per input, stays). The stem's fused
    batch-norm/ReLU/max-pool then runs as max-pool + ReLU on the biased convolution (same values). The folded
    model is for inference: training it would train the folded weights without the norm. Outputs equal the
    unfolded model's up to float rounding (the scale is applied to the weights in float64, then rounded once).

    Returns: model.
    """
    for parent in list(model.modules()):
        pairs = []
        if isinstance(parent, (ResNet, BasicBlock, Bottleneck)):
            for k in (1, 2, 3):
                conv, bn = getattr(parent, f"conv{k}", None), getattr(parent, f"bn{k}", None)
                if conv is not None and bn is not None:
                    pairs.append((conv, f"bn{k}", bn))
        elif isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            for a, b in zip(names, names[1:]):
                pairs.append((parent._modules[a], b, parent._modules[b]))
        convs, norms = getattr(parent, "convs", None), getattr(parent, "norms", None)
        if isinstance(convs, nn.ModuleList) and isinstance(norms, nn.ModuleList) and len(convs) == len(norms):
            # the box / mask heads' convs.i -> norms.i
            pairs += [(c, str(i), n) for i, (c, n) in enumerate(zip(convs, norms))]
            owners = {id(n): norms for n in norms}
        else:
            owners = {}
        for conv, name, bn in pairs:
            if _is_plain_conv(conv) and _foldable_norm(bn) and bn.running_mean.shape[0] == conv.out_channels:
                _fold(conv, bn)
                setattr(owners.get(id(bn), parent), name, nn.Identity())
    return model


# ---- precision -----------------------------------------------------------------------------------


def _map_floats(obj, fn, only: tuple[torch.dtype, ...]):
    """obj with fn applied to every tensor of a dtype in `only` (lists, tuples and dicts walked)."""
    if isinstance(obj, Tensor):
        return fn(obj) if obj.dtype in only else obj
    if isinstance(obj, (list, tuple)):
        out = [_map_floats(o, fn, only) for o in obj]
        return type(obj)(out) if type(obj) in (list, tuple) else type(obj)(*out)
    if isinstance(obj, dict):
        return {k: _map_floats(v, fn, only) for k, v in obj.items()}
    return obj


_HALF = (torch.float16, torch.bfloat16)


class _CastOutputs:
    """Forward hook: a network's half-precision outputs -> float32, for the stages between the networks.

    With remember=True it keeps the half-precision original of each float32 tensor it made until a _CastInputs
    that has it as source takes them (per thread: one model may serve several threads at once): the backbone's
    feature maps go to the stages in float32 and to the RPN head in half precision, and casting them back would
    round-trip the same values (some 10^7 elements at 800x1333)."""

    def __init__(self, remember: bool = False):
        self.remember = remember
        self._local = threading.local()

    def __call__(self, module, args, output):
        if not self.remember:
            return _map_floats(output, lambda t: t.float(), _HALF)
        originals = self._local.originals = []

        def cast(t: Tensor) -> Tensor:
            f = t.float()
            originals.append((weakref.ref(f), t))
            return f

        return _map_floats(output, cast, _HALF)

    def original(self, t: Tensor, dtype: torch.dtype) -> Tensor | None:
        """The half-precision tensor t was made from in this thread's last call, if t is one of its outputs."""
        for ref, low in getattr(self._local, "originals", ()):
            if ref() is t and low.dtype == dtype:
                return low
        return None

    def forget(self) -> None:
        self._local.originals = []


class _CastInputs:
    """Forward pre-hook: float32 inputs of a network -> its dtype; with a remembering _CastOutputs as source,
    a float32 tensor it made is replaced by its original instead of being cast again."""

    def __init__(self, dtype: torch.dtype, source: _CastOutputs | None = None):
        self.dtype = dtype
        self.source = source

    def _cast(self, t: Tensor) -> Tensor:
        low = self.source.original(t, self.dtype) if self.source is not None else None
        return low if low is not None else t.to(self.dtype)

    def __call__(self, module, args, kwargs):
        f32 = (torch.float32,)
        out = _map_floats(args, self._cast, f32), _map_floats(kwargs, self._cast, f32)
        if self.source is not None:
            self.source.forget()    # the originals are only held from the backbone to the RPN head
        return out


def network_modules(model: nn.Module) -> list[nn.Module]:
    """The networks of a MaskRCNN, the modules the eval path calls with tensors between the stages: the backbone
    (trunk + FPN), the RPN head and every child of the RoI heads that has parameters (box head and predictor,
    mask head, keypoint head, the cascade's heads)."""
    nets = [model.backbone, model.rpn.head]
    stack = list(model.roi_heads.children())
    while stack:
        m = stack.pop(0)
        if isinstance(m, (nn.ModuleList, nn.ModuleDict)):
            stack.extend(m.children())
        elif any(True for _ in m.parameters()):
            nets.append(m)
    return nets


def check_precision(precision: str, device: torch.device | str) -> torch.dtype:
    """The network dtype of `precision` on `device`; raises where it is unknown or not supported there."""
    from ..engine.trainer import cpu_has_native_bf16

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if device.type == "cpu":
        if precision == "fp16":
            raise ValueError("precision 'fp16' needs a CUDA device; on the CPU use 'bf16' (where the CPU has "
                             "native bfloat16) or 'fp32'")
        if precision == "bf16" and not cpu_has_native_bf16():
            raise RuntimeError("precision 'bf16' needs a CPU with native bfloat16 instructions (AVX512-BF16 or "
                               "AMX-BF16 on x86, BF16 on Arm); this CPU has none: use 'fp32'")
    elif device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise RuntimeError(f"precision 'bf16' is not supported by {torch.cuda.get_device_name(device)}: use 'fp16'")
    return PRECISIONS[precision]


def _compile_networks(nets: list[nn.Module], mode: str) -> None:
    # freezing: inductor treats the (inference-only) parameters as constants, so oneDNN prepacks the weights
    # of the convolutions and linear layers once and fuses ReLU / add into them. Inductor reads the flag where
    # the compile happens, at a network's first call (torch.compile's options= does not reach it there), so
    # each compiled call runs inside the config patch.
    patch = {"freezing": True}
    if mode == "max-autotune-no-cudagraphs":
        patch.update({"max_autotune": True, "triton.cudagraphs": False})
    for m in nets:
        m._compiled_call_impl = _FrozenCompiled(torch.compile(m._call_impl, backend="inductor"), patch)


class _FrozenCompiled:
    """A compiled module call run under an inductor config patch (see _compile_networks)."""

    def __init__(self, fn, patch: dict):
        self.fn, self.patch = fn, patch

    def __call__(self, *args, **kwargs):
        import torch._inductor.config as inductor_config

        with inductor_config.patch(self.patch):
            return self.fn(*args, **kwargs)


@torch.no_grad()
def optimize_for_inference(model: nn.Module, *, precision: str = "fp32", channels_last: bool = True,
                           compile: bool | str = False) -> nn.Module:
    """The model rewritten for inference, in place, and returned: eval mode, no gradients, frozen batch norm
    folded into the convolutions (fold_frozen_batchnorm), the networks in `precision` and channels-last.

    Args:
        model: a MaskRCNN (on its device already).
        precision: "fp32"; "bf16" on a CPU with native bfloat16 or on CUDA; "fp16" on CUDA. The networks'
            weights are converted once; what enters a network is cast to its dtype and what leaves it is cast
            back to float32, so the three stages between the networks (and RoIAlign) run in float32.
        channels_last: NHWC activations and convolution weights (see MaskRCNN.channels_last).
        compile: False; True or "default": torch.compile (inductor, freezing) of each network (backbone + FPN,
            RPN head, RoI heads' networks); "max-autotune-no-cudagraphs": the same with inductor's autotuning.
            The first call of each new input shape pays the compile time.
    Returns: model, still called as model(images) or model.preprocess(...) then model.inference(...), with
        model.inference_precision = precision.
    """
    from .mask_rcnn import MaskRCNN

    if not isinstance(model, MaskRCNN):
        raise TypeError(f"optimize_for_inference takes a MaskRCNN, got {type(model).__name__}")
    if compile not in (False, True) and compile not in COMPILE_MODES:
        raise ValueError(f"compile must be False, True or one of {COMPILE_MODES}, got {compile!r}")
    device = model.pixel_mean.device
    dtype = check_precision(precision, device)
    if getattr(model, "inference_precision", None) is not None:
        raise RuntimeError("optimize_for_inference was already applied to this model")
    model.eval()
    model.requires_grad_(False)
    fold_frozen_batchnorm(model)
    model.channels_last = bool(channels_last)
    nets = network_modules(model)
    if dtype != torch.float32:
        # the backbone's hook: the RPN head takes its originals (eager only: compiled code fuses the casts)
        features = _CastOutputs(remember=not compile)
        for m in nets:
            m.to(dtype)
            source = features if m is model.rpn.head else None
            m.register_forward_pre_hook(_CastInputs(dtype, source), with_kwargs=True)
            m.register_forward_hook(features if m is model.backbone else _CastOutputs())
        model.channels_last = bool(channels_last)   # .to() keeps strides, but restore the layout explicitly
    if compile:
        _compile_networks(nets, "default" if compile is True else compile)
    model.inference_precision = precision
    return model
