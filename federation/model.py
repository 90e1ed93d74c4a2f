"""The model family: Ref-CNN and Approx-CNN (Asan study: Ref-CNN → Approx-CNN → HE-CNN).

Both share one topology so the accuracy cost of each substitution is visible::

    stage k (k = 1..len(channels)):  conv3x3 → norm → act → pool/2
    optional residual units after the last stage:  x + (act(norm(conv3x3(·))))^r (x)
    head:  global average pool → linear   (or flatten → linear)

=============  ===========================  ==========================================
part           Ref-CNN                      Approx-CNN
=============  ===========================  ==========================================
norm           BatchNorm                    scaled weight standardisation (folds into
                                            the conv weights) or none: DP-SGD needs
                                            per-sample gradients, HE needs linear ops
act            ReLU                         polynomial fit of ReLU on [-B, B], degree d
pool           max-pool                     average pool (linear, folds into the next
                                            layer under HE)
=============  ===========================  ==========================================
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from federation.errors import ConfigError
from federation.scatter import ScatterFront, scatter_channels

__all__ = [
    "CLASSES",
    "ActInit",
    "ArchConfig",
    "HeadKind",
    "ModelKind",
    "NormKind",
    "PolyAct",
    "WSConv2d",
    "build_model",
    "relu_poly_coefficients",
]

CLASSES: tuple[str, ...] = ("normal", "cyst", "tumour")
# Fixed input standardisation of windowed CT in [0, 1] (folds into the first conv under HE).
INPUT_MEAN = 0.3
INPUT_STD = 0.3


class ModelKind(enum.StrEnum):
    """Which member of the family."""

    REF = "ref"
    APPROX = "approx"


class HeadKind(enum.StrEnum):
    """How the last feature map reaches the linear classifier."""

    FLATTEN = "flatten"
    GAP = "gap"


class ActInit(enum.StrEnum):
    """Starting polynomial of a learnable activation."""

    RELU = "relu"
    IDENTITY = "identity"


class NormKind(enum.StrEnum):
    """Normalisation of the Approx-CNN's convolutions (both fold into plain conv weights)."""

    WS = "ws"
    NONE = "none"


@dataclass(frozen=True)
class ArchConfig:
    """Architecture of a Ref-CNN or Approx-CNN.

    Parameters
    ----------
    kind
        ``ref`` or ``approx``.
    input_size
        Side of the square single-channel input, in pixels; divisible by ``2**len(channels)``.
    channels
        Output channels of each stage.
    num_classes
        Number of output logits.
    residual
        Add identity residual units after the last stage.
    res_blocks, res_convs
        With ``residual``: how many residual units, and how many ``conv3x3 → act`` pairs
        each body holds (``2``, ``2`` with three stages and a patchify stem is the Asan-like
        ResNet: eight convolutions).
    degree
        Degree of the Approx-CNN's polynomial activation (2 to 4).
    act_bound
        ``B``: the activation polynomial is the least-squares fit of ReLU on ``[-B, B]``.
        A small ``B`` gives a strongly curved polynomial, which trains better than a
        near-linear one (chosen on the validation split, ``privrad select``, flatten head,
        30 epochs: val macro-AUC 0.986 at B = 0.5, 0.970 at 2, 0.959 at 4). Pre-activations
        are not confined to ``[-B, B]``: the polynomial *is* the activation, evaluated
        exactly under HE, so only CKKS headroom bounds their range (checked at export).
    norm
        Normalisation of the Approx-CNN's convolutions.
    head
        ``gap`` (this class's default): global average pool, then the linear layer;
        ``flatten``: the whole last feature map feeds the linear layer, so the classifier
        knows *where* a finding is. Chosen on the validation split (``privrad select``):
        Approx-CNN, 30 epochs, val macro-AUC 0.986 flatten vs 0.938 gap; federated DP-SGD +
        SecAgg+, 10 rounds, 0.980 vs 0.776 (gap sits on a long plateau without BatchNorm).
        ``privrad train`` and ``simulate`` therefore default to ``flatten``.
    learnable_act
        Learn the activation coefficients per channel, initialised to the ReLU fit (chosen
        on the validation split: val macro-AUC 0.986 learnable vs 0.980 fixed, flatten head,
        30 epochs).
    act_init
        Starting polynomial of a learnable activation: ``relu`` (the ReLU fit above) or
        ``identity`` (``x``: the network starts linear and learns its curvature). Chosen on the
        validation split (one 4,000-slice site from scratch, DP-SGD ε = 8 over 10 epochs at
        batch 256: val macro-AUC 0.619 with ``relu``, 0.798 with ``identity``, 0.815 with
        ``identity`` and ``conv_gain`` 2). With ``relu`` the signal fades with depth: the fit's
        slope at 0 is 0.5 and its ``x²`` term compounds when the gain is raised.
    conv_gain
        Initial gain of every weight-standardised convolution (learned from there).
    scatter, scatter_angles
        ``J > 0``: a fixed front end first (:class:`~federation.scatter.ScatterFront`): the
        order-2 wavelet scattering transform at ``J`` scales and ``scatter_angles`` angles,
        their logarithm, each channel of each image standardised. It has no weights (its
        features are computed once per data set and reused: ``federation.train.front_features``);
        the stages (none: a linear classifier on the features, Tramèr & Boneh 2021) start from
        its ``1 + J L + L² J (J - 1) / 2`` channels at ``input_size / 2**J``. From scratch under
        DP-SGD ε = 8, five sites, a linear classifier, 40 rounds × 2 epochs: val macro-AUC
        0.945–0.953 (``docs/experiments/scatter_fed_tune.py``); the end-to-end network, 5 × 2:
        0.800. From the public start, one 32-channel stage on the features: val 0.976 against the
        linear classifier's 0.956–0.960 (20 and 40 rounds at batch 128,
        ``docs/experiments/scatter_pub_tune.py``). Under HE the modulus is no polynomial: the
        compiler refuses the front end until the client's input transform computes it.
    adapt_block
        ``b > 1``: a block-adaptation layer first (:class:`BlockAdapt`): a linear map of each
        ``b × b`` block of pixels onto itself, from a small random start. It can undo the
        keyed-transform tier's secret in-block pixel shuffle and flips exactly; the tier fits
        it without the key (``privacy.keyed.recover_key``, ``adapt_to_key``). Learned with the
        classifier instead (keyed slices, 30 epochs), it reached macro-AUC 0.950 against the
        plain model's 0.971, and 0.910 from an identity start (training stays near it).
        It runs in plaintext only: the HE compiler refuses it.
    stem
        ``s > 1``: the first stage's convolution is a patchify convolution (kernel = stride =
        ``s``, no padding), so a 256×256 slice enters the network at 64×64 (``s`` = 4). Under
        HE it costs nothing extra: the client's ``pixel_unshuffle`` makes it a 1×1
        convolution, and the depth stays that of the stages.
    """

    kind: ModelKind = ModelKind.APPROX
    input_size: int = 64
    channels: tuple[int, ...] = (16, 32, 64)
    num_classes: int = len(CLASSES)
    residual: bool = False
    res_blocks: int = 1
    res_convs: int = 1
    degree: int = 2
    act_bound: float = 0.5
    norm: NormKind = NormKind.WS
    learnable_act: bool = True
    head: HeadKind = HeadKind.GAP
    act_init: ActInit = ActInit.RELU
    conv_gain: float = 1.0
    stem: int = 1
    adapt_block: int = 1
    scatter: int = 0
    scatter_angles: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ModelKind(self.kind))
        object.__setattr__(self, "norm", NormKind(self.norm))
        object.__setattr__(self, "head", HeadKind(self.head))
        object.__setattr__(self, "act_init", ActInit(self.act_init))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if any(c < 1 for c in self.channels) or not (self.channels or self.scatter):
            raise ConfigError(f"`channels` must be positive integers (none only with `scatter`), got {self.channels}")
        if not (0 <= self.scatter <= 4 and 1 <= self.scatter_angles <= 16):
            raise ConfigError(f"`scatter` must be 0 to 4 and `scatter_angles` 1 to 16, got {self.scatter} and "
                              f"{self.scatter_angles}")
        if self.scatter and (self.stem > 1 or self.adapt_block > 1):
            raise ConfigError("`scatter` takes the image itself: it cannot follow a `stem` or an `adapt_block`")
        if self.stem < 1:
            raise ConfigError(f"`stem` must be a positive integer, got {self.stem}")
        if self.adapt_block < 1 or self.input_size % self.adapt_block:
            raise ConfigError(f"`adapt_block` must be a positive divisor of the input size, got {self.adapt_block}")
        factor = self.stem * 2 ** (len(self.channels) + self.scatter)
        if self.input_size < factor or self.input_size % factor:
            raise ConfigError(
                f"`input_size` must be a positive multiple of stem * 2**len(channels)"
                f"{' * 2**scatter' if self.scatter else ''} = {factor}, "
                f"got {self.input_size}"
            )
        if self.num_classes < 2:
            raise ConfigError(f"`num_classes` must be at least 2, got {self.num_classes}")
        if self.res_blocks < 1 or not 1 <= self.res_convs <= 3:
            raise ConfigError(f"`res_blocks` must be ≥ 1 and `res_convs` 1 to 3, got {self.res_blocks} and "
                              f"{self.res_convs}")
        if not 2 <= self.degree <= 4:
            raise ConfigError(f"`degree` must be 2, 3 or 4, got {self.degree}")
        if self.act_bound <= 0:
            raise ConfigError(f"`act_bound` must be positive, got {self.act_bound}")
        if not (self.conv_gain > 0 and math.isfinite(self.conv_gain)):
            raise ConfigError(f"`conv_gain` must be positive and finite, got {self.conv_gain}")
        if self.act_init is ActInit.IDENTITY and not self.learnable_act and self.kind is ModelKind.APPROX:
            raise ConfigError("`act_init` identity needs `learnable_act`: a fixed identity activation "
                              "leaves the network linear")

    def to_dict(self) -> dict[str, Any]:
        """Plain-types form, for checkpoints and JSON."""
        d = dataclasses.asdict(self)
        d["kind"], d["norm"], d["head"] = str(self.kind), str(self.norm), str(self.head)
        d["act_init"] = str(self.act_init)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArchConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown architecture fields: {sorted(unknown)}")
        return cls(**{**d, "channels": tuple(d.get("channels", cls.channels))})


def relu_poly_coefficients(degree: int, bound: float) -> tuple[float, ...]:
    """Least-squares polynomial fit of ReLU on ``[-bound, bound]`` (uniform weight).

    Returns the coefficients ``(c0, c1, ..., c_degree)`` in increasing order.
    """
    x = np.linspace(-bound, bound, 4001)
    coef = np.polynomial.polynomial.polyfit(x, np.maximum(x, 0.0), degree)
    return tuple(float(c) for c in coef)


class PolyAct(nn.Module):
    """Polynomial activation ``sum_k c_k x**k``, initialised to the least-squares ReLU fit on ``[-B, B]``.

    With ``channels`` the coefficients are parameters, one polynomial per channel
    (shape ``(degree + 1, C, 1, 1)``); without, they are a fixed buffer shared by all
    channels. Either way the activation is a polynomial the HE compiler evaluates exactly.
    """

    coefficients: torch.Tensor

    def __init__(self, degree: int = 2, bound: float = 0.5, *, channels: int | None = None,
                 init: ActInit = ActInit.RELU) -> None:
        super().__init__()
        self.degree = degree
        self.bound = bound
        if init is ActInit.IDENTITY:
            coef = torch.zeros(degree + 1)
            coef[1] = 1.0
        else:
            coef = torch.tensor(relu_poly_coefficients(degree, bound), dtype=torch.float32)
        if channels is None:
            self.register_buffer("coefficients", coef)
        else:  # learnable, one polynomial per channel: shape (degree + 1, C, 1, 1)
            self.coefficients = nn.Parameter(coef[:, None, None, None].repeat(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Horner evaluation of the polynomial."""
        c = self.coefficients
        out = c[-1] * x + c[-2]
        for k in range(self.degree - 2, -1, -1):
            out = out * x + c[k]
        return out

    def extra_repr(self) -> str:
        """Show degree and bound in ``print(model)``."""
        return f"degree={self.degree}, bound={self.bound}"


class WSConv2d(nn.Module):
    """Conv2d with scaled weight standardisation (Brock et al., NF-Nets).

    ``w_hat = gain * (w - mean(w)) / (std(w) * sqrt(fan_in))`` per output channel. Unlike
    BatchNorm it uses no batch statistics, so DP-SGD's per-sample gradients are exact,
    and at inference ``w_hat`` is an ordinary conv kernel (:meth:`folded_weight`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: int = 1, *, gain: float = 1.0) -> None:
        super().__init__()
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.gain = nn.Parameter(torch.full((out_channels, 1, 1, 1), float(gain)))
        nn.init.kaiming_normal_(self.weight, nonlinearity="linear")

    def folded_weight(self) -> torch.Tensor:
        """The plain conv kernel this layer computes with."""
        w = self.weight
        fan_in = w[0].numel()
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return self.gain * (w - mean) * torch.rsqrt(var * fan_in + 1e-4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve with the standardised kernel."""
        return F.conv2d(x, self.folded_weight(), self.bias, self.stride, self.padding)


def _conv_unit(cin: int, cout: int, cfg: ArchConfig, *, stem: int = 1) -> list[nn.Module]:
    k, stride, pad = (stem, stem, 0) if stem > 1 else (3, 1, 1)
    if cfg.kind is ModelKind.REF:
        return [nn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    conv: nn.Module = (
        WSConv2d(cin, cout, k, stride, pad, gain=cfg.conv_gain) if cfg.norm is NormKind.WS
        else nn.Conv2d(cin, cout, k, stride=stride, padding=pad)
    )
    return [conv, PolyAct(cfg.degree, cfg.act_bound, channels=cout if cfg.learnable_act else None,
                          init=cfg.act_init)]


class Residual(nn.Module):
    """``x + body(x)``: an identity residual unit."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Add the body's output to its input."""
        out: torch.Tensor = x + self.body(x)
        return out


class BlockAdapt(nn.Module):
    """A learned linear map of every ``b × b`` pixel block onto itself (small random start)."""

    def __init__(self, block: int) -> None:
        super().__init__()
        self.block = block
        n = block * block
        self.mix = nn.Conv2d(n, n, kernel_size=1)  # a plain Conv2d: Opacus has its per-sample gradients
        assert self.mix.bias is not None
        with torch.no_grad():  # small random start: from the identity, training never left it (see README)
            self.mix.weight.normal_(0.0, 0.05)
            self.mix.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unshuffle into blocks, mix each block's pixels, shuffle back."""
        out: torch.Tensor = nn.functional.pixel_shuffle(self.mix(nn.functional.pixel_unshuffle(x, self.block)),
                                                        self.block)
        return out


class PrivradCNN(nn.Module):
    """A member of the family; build it with :func:`build_model`."""

    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.config = cfg
        stages: list[nn.Module] = []
        self.front: nn.Module = nn.Identity()
        cin = 1
        if cfg.scatter:
            self.front = ScatterFront(cfg.input_size, cfg.scatter, cfg.scatter_angles)
            cin = scatter_channels(cfg.scatter, cfg.scatter_angles)
        for n, cout in enumerate(cfg.channels):
            pool = nn.MaxPool2d(2) if cfg.kind is ModelKind.REF else nn.AvgPool2d(2)
            stages.append(nn.Sequential(*_conv_unit(cin, cout, cfg, stem=cfg.stem if n == 0 else 1), pool))
            cin = cout
        if cfg.residual:
            for _ in range(cfg.res_blocks):
                stages.append(Residual(nn.Sequential(*[m for _ in range(cfg.res_convs)
                                                       for m in _conv_unit(cin, cin, cfg)])))
        self.adapt: nn.Module = BlockAdapt(cfg.adapt_block) if cfg.adapt_block > 1 else nn.Identity()
        self.features = nn.Sequential(*stages)
        side = cfg.input_size // cfg.stem // 2 ** (len(cfg.channels) + cfg.scatter)
        gap = cfg.head is HeadKind.GAP
        self.pool: nn.Module = nn.AdaptiveAvgPool2d(1) if gap else nn.Identity()
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(cin if gap else cin * side * side, cfg.num_classes)

    def forward(self, x: torch.Tensor, *, features: bool = False) -> torch.Tensor:
        """Logits for a batch of ``(N, 1, H, W)`` images in ``[0, 1]``.

        ``features=True``: ``x`` is already the fixed front end's output ``self.front(images)``
        (features computed once and reused, :func:`federation.train.front_features`).
        """
        if features:
            if not self.config.scatter:
                raise ValueError("features=True needs a model with a fixed front end (scatter > 0)")
            x = self.features(x)
        elif self.config.scatter:
            x = self.features(self.front(x))   # the front end standardises its own features
        else:
            x = self.features(self.adapt((x - INPUT_MEAN) / INPUT_STD))
        x = self.flatten(self.pool(x))
        out: torch.Tensor = self.classifier(x)
        return out


def build_model(cfg: ArchConfig, *, seed: int | None = None) -> PrivradCNN:
    """Build a fresh model; ``seed`` makes the initial weights reproducible."""
    if seed is not None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return PrivradCNN(cfg)
    return PrivradCNN(cfg)


NDArrays = list[npt.NDArray[Any]]
"""A model's weights as Flower ships them: one array per state-dict tensor."""


def get_weights(model: PrivradCNN) -> NDArrays:
    """The model's state as a list of numpy arrays (state-dict order)."""
    return [v.detach().cpu().numpy().copy() for v in model.state_dict().values()]


def set_weights(model: PrivradCNN, weights: NDArrays) -> None:
    """Load a list of numpy arrays produced by :func:`get_weights`."""
    keys = list(model.state_dict())
    if len(keys) != len(weights):
        raise ConfigError(f"received {len(weights)} arrays, the model has {len(keys)} tensors")
    model.load_state_dict({k: torch.from_numpy(np.asarray(w)) for k, w in zip(keys, weights, strict=True)})
