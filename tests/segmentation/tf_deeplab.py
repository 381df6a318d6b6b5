r"""A TensorFlow reference of DeepLabv3+ with the Xception-65 backbone (test helper, not a test).

``deeplab_variables`` makes random values for every variable a TF DeepLab ``xception_65``
DeepLabv3+ checkpoint holds, under the names and shapes the model zoo uses, and
``deeplab_forward_tf`` runs that network's inference pass with plain TensorFlow ops (eager, CPU):
the reference a PyTorch port is checked against.

Import order: torch / torchvision / ``xception`` *before* TensorFlow. Loading triton
(``torchvision`` -> ``torch._dynamo`` imports it) after TensorFlow's libraries segfaults with
TF 2.21; this module therefore imports ``xception`` first, and TensorFlow only on first use
(``tf`` is a :class:`lazy_import.LazyModule`: collecting a test module costs no TF import).

What the network is, fact by fact, as read in the TF DeepLab sources (tensorflow/models,
research/deeplab; "xception.py" is core/xception.py, "fe.py" core/feature_extractor.py, "utils.py"
core/utils.py, "model.py" model.py; slim is tf_slim/layers/layers.py and
tf_slim/nets/resnet_utils.py) and in the model zoo's flags (g3doc/model_zoo.md, local_test.sh:
``--model_variant=xception_65 --atrous_rates=6 --atrous_rates=12 --atrous_rates=18
--output_stride=16 --decoder_output_stride=4``):

Input
    fe.py ``_preprocess_zero_mean_unit_range``: ``x * 2/255 - 1`` on [0, 255] pixels, applied by
    ``extract_features`` (``preprocess_images=True``). ``deeplab_forward_tf`` takes the network
    input *after* that step (``preprocess=True`` applies it).

Variable names and shapes (TF layouts: conv ``[kh, kw, in, out]``, depthwise ``[kh, kw, in, 1]``)
    * Backbone scope ``xception_65`` (fe.py ``name_scope``); blocks are ``<flow>/block<k>/unit_<u>/
      xception_module`` (xception.py ``stack_blocks_dense``: ``block.scope`` then ``unit_%d``;
      ``xception_module``'s default scope name).
    * The stem: ``entry_flow/conv1_1`` 3x3 3->32 stride 2, ``entry_flow/conv1_2`` 3x3 32->64
      (xception.py ``xception``: ``resnet_utils.conv2d_same``).
    * Each separable conv of a module is split (``regularize_depthwise=False``, fe.py default):
      ``separable_conv<i>_depthwise/depthwise_weights`` and ``separable_conv<i>_pointwise/weights``
      (xception.py ``separable_conv2d_same._split_separable_conv2d``: ``scope + '_depthwise'``,
      ``scope + '_pointwise'``; slim ``separable_convolution2d`` with ``num_outputs=None`` creates
      ``depthwise_weights [k, k, in, depth_multiplier=1]``).
    * Blocks (xception.py ``xception_65_factory``; in = previous block's last depth):
      ``entry_flow/block1`` 1 unit [128,128,128] skip 'conv' stride 2;
      ``entry_flow/block2`` 1 unit [256,256,256] 'conv' stride 2;
      ``entry_flow/block3`` 1 unit [728,728,728] 'conv' stride 2;
      ``middle_flow/block1`` 16 units [728,728,728] 'sum' stride 1;
      ``exit_flow/block1`` 1 unit [728,1024,1024] 'conv' stride 2;
      ``exit_flow/block2`` 1 unit [1536,1536,2048] 'none' stride 1, ``unit_rate_list=multi_grid``.
      'conv' units also have ``shortcut/weights [1,1,in,out]`` + ``shortcut/BatchNorm``.
    * Every conv in the backbone, the ASPP and the decoder has a BatchNorm and no bias:
      ``<layer>/BatchNorm/{beta,gamma,moving_mean,moving_variance}`` (slim ``batch_norm`` scope
      'BatchNorm'; slim ``convolution``/``separable_convolution2d`` add ``biases`` only when
      ``normalizer_fn`` is None). gamma exists everywhere: ``batch_norm_scale=True`` for the
      backbone (fe.py ``extract_features`` -> xception.py ``xception_arg_scope``) and
      ``scale=True`` in model.py ``extract_features`` / ``refine_by_decoder``
      (``utils.get_batch_norm_params``).
    * ASPP, no scope prefix (model.py ``extract_features``, ``depth = aspp_convs_filters = 256``):
      ``image_pooling`` 1x1 2048->256, ``aspp0`` 1x1 2048->256, ``aspp{1,2,3}_depthwise``
      [3,3,2048,1] + ``aspp{1,2,3}_pointwise`` [1,1,2048,256] (``utils.split_separable_conv2d``,
      ``aspp_with_separable_conv=True``), ``concat_projection`` 1x1 1280->256.
    * Decoder (model.py ``refine_by_decoder`` / ``_decoder_with_concat_merge``, scope ``decoder``):
      ``decoder/feature_projection0`` 1x1 256->48, ``decoder/decoder_conv0_{depthwise,pointwise}``
      [3,3,304,1] / [1,1,304,256], ``decoder/decoder_conv1_{depthwise,pointwise}`` [3,3,256,1] /
      [1,1,256,256].
    * Logits (model.py ``get_branch_logits``, scope ``logits`` + output name ``semantic``):
      ``logits/semantic/weights [1,1,256,C]`` and ``logits/semantic/biases [C]`` (no BatchNorm,
      no activation, ``atrous_rates=[1]`` since ``aspp_with_batch_norm``).
    * A real checkpoint also holds ``global_step`` (int64) and, if trained with momentum,
      ``.../Momentum`` slots; neither is made here.

Batch norm (inference: moving statistics; ``y = (x - mean) / sqrt(var + eps) * gamma + beta``)
    * Backbone eps = 1e-3 (fe.py ``extract_features`` passes ``batch_norm_epsilon=1e-3`` to
      ``xception_arg_scope``).
    * ASPP, image pooling, concat projection, decoder eps = 1e-5 (model.py ``extract_features`` /
      ``refine_by_decoder``: ``utils.get_batch_norm_params(epsilon=1e-5)``).
    * ``is_training=False`` at inference (model.py ``predict_labels`` -> ``multi_scale_logits``).

Convolutions, padding and ReLU in the backbone (xception.py ``xception_arg_scope``:
conv2d and separable_conv2d get ``normalizer_fn=batch_norm, activation_fn=relu``)
    * Stem: ``conv1_1`` stride 2 = ``fixed_padding``: pad 1 top/left/bottom/right, then VALID
      (resnet_utils ``conv2d_same``, stride > 1: ``pad_beg = (k_eff-1)//2``,
      ``pad_end = k_eff-1-pad_beg``); ``conv1_2`` stride 1 = 'SAME'. Both conv -> BN -> ReLU.
    * ``xception_module`` (xception.py): three separable convs, ``stride`` only on the third
      (``stride if i == 2 else 1``), rate ``rate * unit_rate_list[i]`` (``unit_rate_list`` defaults
      to [1,1,1], ``_DEFAULT_MULTI_GRID``).

      - ``activation_fn_in_separable_conv=False`` (entry flow, middle flow, exit block1): before
        *each* separable conv ``features = relu(features)`` and the separable conv has no
        activation: relu -> depthwise -> BN -> pointwise -> BN (``_separable_conv``, "Original
        network design"). So the unit's output (residual + shortcut) is *not* ReLU'd; the next
        unit's first relu does that, while its shortcut sees the un-ReLU'd input.
      - ``True`` (exit_flow/block2): no leading relu; depthwise -> BN -> ReLU -> pointwise -> BN
        -> ReLU for each of the three. The backbone's output is therefore post-ReLU.
      - Separable conv padding (``separable_conv2d_same``): stride 1 -> 'SAME' (with dilation
        ``rate``: symmetric pad ``rate`` for k=3); stride 2 -> ``fixed_padding(k=3, rate)`` (pad
        1 each side at rate 1) then VALID. The pointwise conv is 1x1 stride 1.
      - ``skip_connection_type``: 'conv': ``slim.conv2d(inputs, depth_list[-1], [1,1],
        stride=stride, activation_fn=None)`` on the module's *input* (not ReLU'd) -> BN, no ReLU
        (padding 'SAME', which pads nothing for 1x1: it samples rows/cols 0, 2, 4, ...), output =
        residual + shortcut; 'sum': residual + inputs; 'none': residual.
    * Output stride (xception.py ``xception``: ``output_stride //= 2`` for the stem's stride-2
      conv, then ``stack_blocks_dense``): a unit reached when ``current_stride == output_stride``
      runs with ``stride=1`` and the current ``rate``, and *then* ``rate *= its nominal stride``;
      otherwise it runs with ``rate=1`` and multiplies ``current_stride``. Hence

      ========================  ===============  ===============
      unit                      OS 16            OS 8
      ========================  ===============  ===============
      entry_flow/block1         stride 2, rate 1 stride 2, rate 1
      entry_flow/block2         stride 2, rate 1 stride 2, rate 1
      entry_flow/block3         stride 2, rate 1 stride 1, rate 1
      middle_flow/block1 (x16)  stride 1, rate 1 stride 1, rate 2
      exit_flow/block1          stride 1, rate 1 stride 1, rate 2
      exit_flow/block2          stride 1, rate 2 stride 1, rate 4
      ========================  ===============  ===============

      (times ``multi_grid[i]`` for exit_flow/block2's three convs; the model zoo uses none.)
      A unit with stride 1 also has a stride-1 shortcut.
    * Feature sizes: every stride-2 step maps n -> ceil(n/2) (= (n-1)//2 + 1).

Decoder tap (fe.py ``networks_to_feature_maps['xception_65'][DECODER_END_POINTS][4]``)
    ``xception_65/entry_flow/block2/unit_1/xception_module/separable_conv2_pointwise``: the end
    point slim collects for that pointwise conv, i.e. after its BatchNorm and (this module having
    ``activation_fn_in_separable_conv=False``) *before any ReLU* (slim collects
    ``outputs`` after ``activation_fn``, which is None here). Stride 4, 256 channels.

ASPP (model.py ``extract_features``; arg_scope: conv -> BN(1e-5) -> ReLU, padding 'SAME', stride 1)
    * Image pooling: with ``crop_size`` None, ``tf.reduce_mean(features, [1, 2], keepdims=True)``;
      with a crop size (eval / vis / export set it to the padded input size) an ``avg_pool2d``
      whose window is ``scale_dimension(crop, 1/OS)`` = the whole feature map: the same global
      mean. Then ``image_pooling`` 1x1 conv -> BN -> ReLU, then ``utils.resize_bilinear`` (
      ``tf.image.resize_bilinear(..., align_corners=True)``) to the feature size (from 1x1: a
      broadcast).
    * ``aspp0``: 1x1 conv -> BN -> ReLU.
    * ``aspp{i}`` (i = 1, 2, 3, rates 6/12/18 at OS 16, 12/24/36 at OS 8 -- flags, not code):
      ``utils.split_separable_conv2d``: depthwise 3x3 dilation ``rate`` 'SAME' -> BN -> ReLU ->
      pointwise 1x1 -> BN -> ReLU (the arg_scope's activation applies to both halves).
    * ``tf.concat([image_pooling, aspp0, aspp1, aspp2, aspp3], 3)`` (in that order: 5 x 256 = 1280)
      -> ``concat_projection`` 1x1 -> BN -> ReLU -> dropout(keep 0.9), identity at inference.

Decoder (model.py ``_get_logits`` -> ``refine_by_decoder`` -> ``_decoder_with_concat_merge``,
``decoder_use_separable_conv=True``)
    * ``crop_size`` = the network input size (``_get_logits`` uses ``tf.shape(images)`` when it is
      None; eval/vis pad images to ``eval_crop_size`` and pass it). Decoder size
      ``scale_dimension(n, 1/4) = int((n - 1)/4 + 1)`` = ceil(n/4), the tap's own size.
    * ``feature_projection0``: 1x1 256->48 -> BN -> ReLU on the tap.
    * Both the ASPP output and the projection are resized to the decoder size with
      ``resize_bilinear(align_corners=True)`` (the projection's resize is an identity), then
      ``tf.concat([aspp, projection], 3)`` (ASPP first: 256 + 48 = 304).
    * ``decoder_conv0``, ``decoder_conv1``: ``split_separable_conv2d`` rate 1: depthwise 3x3 'SAME'
      -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU (304->256, 256->256).

Logits and output
    * ``logits/semantic``: 1x1 conv with bias, no BN, no activation (model.py ``get_branch_logits``).
    * ``multi_scale_logits`` resizes them (align_corners=True) to
      ``scale_dimension(crop, 1/min(decoder_output_stride))``: their own size, an identity.
    * ``predict_labels`` (``prediction_with_upsampled_logits=True``, the default) resizes the
      logits to the input size with ``resize_bilinear(align_corners=True)`` before the argmax:
      ``deeplab_forward_tf`` returns these upsampled logits.

Checked against DeepLab itself (once, by hand; not a test, since it needs DeepLab's source): the
real ``model.multi_scale_logits`` + ``predict_labels``' final resize, from tensorflow/models at
c115444 (Dec 2019) run under TF 2.21 ``tensorflow.compat.v1`` with tf_slim 1.1 standing in for
``tf.contrib.slim`` (its fused batch-norm path), built exactly the 732 variables of
``deeplab_variable_shapes(5)`` (same names, same shapes), and with these functions' values its
logits matched ``deeplab_forward_tf`` to <= 2.5e-5 of the largest logit (float32 and float64
modes), at output stride 16 and 8, with ``crop_size`` None and set, on 67 x 83 and 2 x 66 x 80
inputs (the real graph fed ``(x + 1) * 127.5``, since it preprocesses itself).

Precision: ``dtype=np.float64`` (default) computes everything in float64, with the align-corners
bilinear resize done as two interpolation matrices (``scale = (in - 1) / (out - 1)``, exact in
float64) because TF's ResizeBilinear kernel always returns float32; ``dtype=np.float32`` uses
``tf.compat.v1.image.resize_bilinear(align_corners=True)`` itself. Both return float32 arrays.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from lazy_import import LazyModule

import xception  # noqa: F401  (before TensorFlow: see "Import order" above)

tf = LazyModule("tensorflow")

ENCODER_BN_EPS = 1e-3
HEAD_BN_EPS = 1e-5
BACKBONE = "xception_65"
DECODER_TAP = f"{BACKBONE}/entry_flow/block2/unit_1/xception_module/separable_conv2_pointwise"
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}

# (scope, units, depth_list, skip_connection_type, activation_fn_in_separable_conv, stride)
XCEPTION_65_BLOCKS = (
    ("entry_flow/block1", 1, (128, 128, 128), "conv", False, 2),
    ("entry_flow/block2", 1, (256, 256, 256), "conv", False, 2),
    ("entry_flow/block3", 1, (728, 728, 728), "conv", False, 2),
    ("middle_flow/block1", 16, (728, 728, 728), "sum", False, 1),
    ("exit_flow/block1", 1, (728, 1024, 1024), "conv", False, 2),
    ("exit_flow/block2", 1, (1536, 1536, 2048), "none", True, 1),
)
_BN_LEAVES = ("beta", "gamma", "moving_mean", "moving_variance")
# Calibrated at a larger size than the tests use: statistics taken on small maps (mostly border)
# carry badly to larger ones (a 2 x 25 x 25 calibration gave 1e9-scale logits at 67 x 83), the
# other way round they carry well (logit std 1.1-1.8 from 40 x 50 to 129 x 129, OS 16 and 8).
_CALIBRATION_SHAPE = (2, 129, 129, 3)


def unit_schedule(output_stride: int) -> list[tuple[str, int, int]]:
    """``(unit scope, stride, rate)`` of every backbone unit, as ``stack_blocks_dense`` runs them."""
    if output_stride % 2:
        raise ValueError("output_stride must be even")
    target, current, rate = output_stride // 2, 1, 1  # the stem's stride-2 conv is already done
    out = []
    for scope, units, _depths, _skip, _act, stride in XCEPTION_65_BLOCKS:
        for u in range(1, units + 1):
            if current > target:
                raise ValueError(f"output_stride {output_stride} cannot be reached")
            if current == target:
                out.append((f"{scope}/unit_{u}", 1, rate))
                rate *= stride
            else:
                out.append((f"{scope}/unit_{u}", stride, 1))
                current *= stride
    if current != target:
        raise ValueError(f"output_stride {output_stride} cannot be reached")
    return out


def deeplab_variable_shapes(num_classes: int) -> dict[str, tuple[int, ...]]:
    """Every variable's name and shape, in network order."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(scope: str, k: int, cin: int, cout: int) -> None:
        shapes[f"{scope}/weights"] = (k, k, cin, cout)
        for leaf in _BN_LEAVES:
            shapes[f"{scope}/BatchNorm/{leaf}"] = (cout,)

    def sep(scope: str, cin: int, cout: int) -> None:
        shapes[f"{scope}_depthwise/depthwise_weights"] = (3, 3, cin, 1)
        for leaf in _BN_LEAVES:
            shapes[f"{scope}_depthwise/BatchNorm/{leaf}"] = (cin,)
        conv(f"{scope}_pointwise", 1, cin, cout)

    conv(f"{BACKBONE}/entry_flow/conv1_1", 3, 3, 32)
    conv(f"{BACKBONE}/entry_flow/conv1_2", 3, 32, 64)
    cin = 64
    for scope, units, depths, skip, _act, _stride in XCEPTION_65_BLOCKS:
        for u in range(1, units + 1):
            base = f"{BACKBONE}/{scope}/unit_{u}/xception_module"
            c = cin
            for i, d in enumerate(depths, 1):
                sep(f"{base}/separable_conv{i}", c, d)
                c = d
            if skip == "conv":
                conv(f"{base}/shortcut", 1, cin, depths[-1])
            cin = depths[-1]
    conv("image_pooling", 1, cin, 256)
    conv("aspp0", 1, cin, 256)
    for i in (1, 2, 3):
        sep(f"aspp{i}", cin, 256)
    conv("concat_projection", 1, 5 * 256, 256)
    conv("decoder/feature_projection0", 1, 256, 48)
    sep("decoder/decoder_conv0", 256 + 48, 256)
    sep("decoder/decoder_conv1", 256, 256)
    shapes["logits/semantic/weights"] = (1, 1, 256, num_classes)
    shapes["logits/semantic/biases"] = (num_classes,)
    return shapes


# ------------------------------------------------------------------------------ the network


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Align-corners bilinear interpolation along one axis as an (n_out, n_in) float64 matrix."""
    m = np.zeros((n_out, n_in))
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    for o in range(n_out):
        x = o * scale
        lo = min(int(np.floor(x)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        f = x - lo
        m[o, lo] += 1.0 - f
        m[o, hi] += f
    return m


class _Net:
    """The forward pass; ``bn_hook`` (calibration) may replace each BN's moving statistics."""

    def __init__(self, variables: dict[str, np.ndarray], dtype, bn_hook: Callable | None = None):
        self.dtype = tf.as_dtype(dtype)
        self.v = variables
        self.bn_hook = bn_hook

    def t(self, name: str) -> tf.Tensor:
        return tf.constant(self.v[name], dtype=self.dtype)

    def bn(self, scope: str, x: tf.Tensor, eps: float, stats_of: tf.Tensor | None = None) -> tf.Tensor:
        if self.bn_hook is not None:
            self.bn_hook(f"{scope}/BatchNorm", x if stats_of is None else stats_of)
        p = f"{scope}/BatchNorm/"
        return tf.nn.batch_normalization(
            x, self.t(p + "moving_mean"), self.t(p + "moving_variance"), self.t(p + "beta"), self.t(p + "gamma"), eps
        )

    def resize(self, x: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
        """``tf.image.resize_bilinear(x, size, align_corners=True)``."""
        if self.dtype == tf.float32:
            return tf.compat.v1.image.resize_bilinear(x, size, align_corners=True)
        mh = tf.constant(_resize_matrix(int(x.shape[1]), size[0]), dtype=self.dtype)
        mw = tf.constant(_resize_matrix(int(x.shape[2]), size[1]), dtype=self.dtype)
        x = tf.einsum("oh,nhwc->nowc", mh, x)
        return tf.einsum("pw,nowc->nopc", mw, x)

    @staticmethod
    def fixed_padding(x: tf.Tensor, k: int, rate: int) -> tf.Tensor:
        total = k + (k - 1) * (rate - 1) - 1
        beg = total // 2
        return tf.pad(x, [[0, 0], [beg, total - beg], [beg, total - beg], [0, 0]])

    def conv(self, scope: str, x, stride=1, rate=1, eps=ENCODER_BN_EPS, relu=True, fixed_pad=False):
        """slim.conv2d (or resnet_utils.conv2d_same) with BN; ``fixed_pad`` for strided k > 1."""
        w = self.t(f"{scope}/weights")
        k = int(w.shape[0])
        if fixed_pad and stride > 1:
            x, padding = self.fixed_padding(x, k, rate), "VALID"
        else:
            padding = "SAME"
        y = tf.nn.conv2d(x, w, strides=stride, padding=padding, dilations=rate)
        y = self.bn(scope, y, eps)
        return tf.nn.relu(y) if relu else y

    def sep(self, scope: str, x, stride=1, rate=1, eps=ENCODER_BN_EPS, relu=False, fixed_pad=True):
        """Depthwise (+BN, +ReLU if ``relu``) then pointwise 1x1 (+BN, +ReLU if ``relu``)."""
        w = self.t(f"{scope}_depthwise/depthwise_weights")
        if fixed_pad and stride > 1:
            x, padding = self.fixed_padding(x, int(w.shape[0]), rate), "VALID"
        else:
            padding = "SAME"
        y = tf.nn.depthwise_conv2d(x, w, strides=[1, stride, stride, 1], padding=padding, dilations=[rate, rate])
        y = self.bn(f"{scope}_depthwise", y, eps)
        if relu:
            y = tf.nn.relu(y)
        return self.conv(f"{scope}_pointwise", y, eps=eps, relu=relu)

    def backbone(self, x, output_stride: int, multi_grid=(1, 1, 1)):
        b = BACKBONE
        x = self.conv(f"{b}/entry_flow/conv1_1", x, stride=2, fixed_pad=True)
        x = self.conv(f"{b}/entry_flow/conv1_2", x)
        blocks = {scope: rest for scope, *rest in XCEPTION_65_BLOCKS}
        tap = None
        for unit, stride, rate in unit_schedule(output_stride):
            _units, _depths, skip, act_in_sep, _nominal = blocks[unit.rsplit("/", 1)[0]]
            unit_rates = multi_grid if unit.startswith("exit_flow/block2") else (1, 1, 1)
            base = f"{b}/{unit}/xception_module"
            residual = x
            for i in range(3):
                if not act_in_sep:
                    residual = tf.nn.relu(residual)
                residual = self.sep(
                    f"{base}/separable_conv{i + 1}",
                    residual,
                    stride=stride if i == 2 else 1,
                    rate=rate * unit_rates[i],
                    relu=act_in_sep,
                )
                if f"{base}/separable_conv{i + 1}_pointwise" == DECODER_TAP:
                    tap = residual
            if skip == "conv":
                x = residual + self.conv(f"{base}/shortcut", x, stride=stride, relu=False)
            elif skip == "sum":
                x = residual + x
            else:
                x = residual
        return x, tap

    def aspp(self, features, rates):
        h, w = int(features.shape[1]), int(features.shape[2])
        e = HEAD_BN_EPS
        pooled = tf.reduce_mean(features, axis=[1, 2], keepdims=True)
        wpool = self.t("image_pooling/weights")
        ip = tf.nn.conv2d(pooled, wpool, strides=1, padding="SAME")
        # Calibration takes the pooling BN's statistics from the unpooled map (one pooled value
        # per image gives no spread); the forward pass itself is unchanged.
        stats = tf.nn.conv2d(features, wpool, strides=1, padding="SAME") if self.bn_hook else None
        ip = tf.nn.relu(self.bn("image_pooling", ip, e, stats_of=stats))
        branches = [self.resize(ip, (h, w)), self.conv("aspp0", features, eps=e)]
        for i, rate in enumerate(rates, 1):
            branches.append(self.sep(f"aspp{i}", features, rate=rate, eps=e, relu=True, fixed_pad=False))
        return self.conv("concat_projection", tf.concat(branches, 3), eps=e)

    def forward(self, x, output_stride: int, rates, multi_grid=(1, 1, 1)):
        height, width = int(x.shape[1]), int(x.shape[2])
        features, tap = self.backbone(x, output_stride, multi_grid)
        y = self.aspp(features, rates)
        e = HEAD_BN_EPS
        dec = (int((height - 1) / 4 + 1), int((width - 1) / 4 + 1))  # utils.scale_dimension(n, 1/4)
        proj = self.conv("decoder/feature_projection0", tap, eps=e)
        y = tf.concat([self.resize(y, dec), self.resize(proj, dec)], 3)
        y = self.sep("decoder/decoder_conv0", y, eps=e, relu=True, fixed_pad=False)
        y = self.sep("decoder/decoder_conv1", y, eps=e, relu=True, fixed_pad=False)
        logits = tf.nn.conv2d(y, self.t("logits/semantic/weights"), strides=1, padding="SAME")
        logits = tf.nn.bias_add(logits, self.t("logits/semantic/biases"))
        logits = self.resize(logits, dec)  # multi_scale_logits: to its own size (identity)
        return self.resize(logits, (height, width))  # predict_labels: to the input size


def deeplab_preprocess(images_0_255: np.ndarray) -> np.ndarray:
    """fe.py ``_preprocess_zero_mean_unit_range``: [0, 255] -> [-1, 1]."""
    return (2.0 / 255.0) * np.asarray(images_0_255, dtype=np.float32) - 1.0


def deeplab_forward_tf(
    variables: dict[str, np.ndarray],
    images_nhwc: np.ndarray,
    output_stride: int,
    *,
    atrous_rates: tuple[int, int, int] | None = None,
    multi_grid: tuple[int, int, int] = (1, 1, 1),
    dtype=np.float64,
    preprocess: bool = False,
) -> np.ndarray:
    """Inference logits ``(N, H, W, num_classes)`` float32 at the input resolution.

    ``images_nhwc`` is the network input (already in [-1, 1]; ``preprocess=True`` maps [0, 255]
    pixels first). ``atrous_rates`` defaults to 6/12/18 at output stride 16, 12/24/36 at 8.
    """
    rates = atrous_rates or ASPP_RATES[output_stride]
    if preprocess:
        images_nhwc = deeplab_preprocess(images_nhwc)
    with tf.device("/CPU:0"):
        net = _Net(variables, dtype)
        x = tf.constant(np.asarray(images_nhwc), dtype=net.dtype)
        return net.forward(x, output_stride, rates, multi_grid).numpy().astype(np.float32)


def deeplab_variables(num_classes: int, rng: np.random.Generator, *, calibrate: bool = True) -> dict[str, np.ndarray]:
    """Random float32 values for every variable (names and shapes of ``deeplab_variable_shapes``).

    Weights ~ N(0, sqrt(2 / fan_in)) (fan_in = kh * kw * in, depthwise: kh * kw), biases
    ~ N(0, 0.1), BN gamma ~ U(0.5, 1.5), beta ~ N(0, 0.1), moving_mean ~ N(0, 0.1), moving_variance
    ~ U(0.5, 1.5).

    With those alone nothing really normalises and the activations explode (logit std ~5e12 at
    67 x 83: the 16 residual sums of the middle flow, pointwise convs on un-ReLU'd inputs). So
    with ``calibrate`` (the default) one float32 forward pass, output stride 16, over random
    uniform [-1, 1] images of shape ``_CALIBRATION_SHAPE`` sets every BN's moving statistics, in
    network order, from what that BN actually sees: ``moving_mean = batch mean + N(0, 0.1) *
    batch std``, ``moving_variance = max(batch variance, 5% of the layer's mean variance) *
    U(0.5, 1.5)``, so each BN output is ~ gamma * N(0, 1) + beta (the image-pooling BN takes its
    statistics from the 1x1 conv over the unpooled map). Logit std then stays ~1-2 for inputs
    from 40 x 50 to 129 x 129 at output stride 16 and 8.
    """
    out: dict[str, np.ndarray] = {}
    for name, shape in deeplab_variable_shapes(num_classes).items():
        leaf = name.rsplit("/", 1)[1]
        if leaf in ("weights", "depthwise_weights"):
            fan_in = shape[0] * shape[1] * (1 if leaf == "depthwise_weights" else shape[2])
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        elif leaf == "gamma" or leaf == "moving_variance":
            value = rng.uniform(0.5, 1.5, shape)
        else:  # beta, moving_mean, biases
            value = rng.normal(0.0, 0.1, shape)
        out[name] = value.astype(np.float32)
    if not calibrate:
        return out

    def hook(scope: str, x: tf.Tensor) -> None:
        a = x.numpy().astype(np.float64)
        mean, var = a.mean(axis=(0, 1, 2)), a.var(axis=(0, 1, 2))
        c = mean.shape[0]
        out[f"{scope}/moving_mean"] = (mean + rng.normal(0.0, 0.1, c) * np.sqrt(var)).astype(np.float32)
        # A channel (nearly) constant over the calibration batch would amplify any later change:
        # its variance is floored at a fraction of the layer's mean variance.
        var = np.maximum(var, 0.05 * var.mean() + 1e-6)
        out[f"{scope}/moving_variance"] = (var * rng.uniform(0.5, 1.5, c)).astype(np.float32)

    images = rng.uniform(-1.0, 1.0, _CALIBRATION_SHAPE)
    with tf.device("/CPU:0"):
        net = _Net(out, np.float32, bn_hook=hook)
        net.forward(tf.constant(images, tf.float32), 16, ASPP_RATES[16])
    return out
