"""timm's generic model checks on each distinct registered architecture (``distinct_models``):
forward, backward, TorchScript, feature maps, forward_intermediates (also with gradient
checkpointing), FX feature extraction, torch.export and torch.compile(fullgraph=True).

Small inputs (64 px, batch 1-3). torch.compile with Inductor, and torch.export of the deep aligned
models, are marked slow; the seed model with one middle block keeps a fast variant of each.
Inductor compiles xception41 (the seed model: optimize's compile test); Dynamo captures every model whole.
"""

from __future__ import annotations

import copy

import pytest
import torch
from model_names import distinct_models
from torch import nn

from xception import Preprocessing, create_model

timm = pytest.importorskip("timm")
feature_extraction = pytest.importorskip("torchvision.models.feature_extraction")

SIZE = 64
# Feature-map sides at 64 px: the seed's unpadded stem trims (64 -> 29), the aligned stem halves.
SIDES = {"xception": [29, 15, 8, 4, 2]}
ALIGNED_SIDES = [32, 16, 8, 4, 2]
REDUCTIONS = [2, 4, 8, 16, 32]
SMALL_SEED = {"middle_blocks": 1}  # the fast variants of the slow checks
EXPORT_FAST = ("xception", "xception41", "xception41p")  # torch.export in a few seconds

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def build(randomise_bn):
    """``build(name, **kwargs)``: a model in eval mode with random batch-norm statistics."""
    def make(name: str, **kwargs) -> nn.Module:
        torch.manual_seed(0)
        model = create_model(name, **kwargs).eval()
        randomise_bn(model, torch.Generator().manual_seed(1))
        return model

    return make


@pytest.fixture(scope="module")
def model_of(build):
    """``model_of(name)``: one ``build(name)`` per name for the read-only checks of this module."""
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            cache[name] = build(name)
        return cache[name]

    yield get
    cache.clear()


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def assert_same(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


def fx_extractor(model: nn.Module, nodes: list[str]) -> nn.Module:
    """torchvision's FX feature extractor with timm's leaf modules and autowrapped functions."""
    return feature_extraction.create_feature_extractor(
        model, return_nodes=nodes,
        tracer_kwargs={"leaf_modules": timm.layers.get_notrace_modules(),
                       "autowrap_functions": timm.layers.get_notrace_functions()})


@pytest.mark.parametrize("name", distinct_models())
def test_forward(model_of, name):
    model = model_of(name)
    x = images()
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    assert feats.shape == (2, model.num_features, 2, 2)
    assert pre.shape == (2, model.num_features)
    assert_same(model.get_classifier()(pre), out)
    assert not torch.allclose(out[0], out[1])  # the output depends on the input


@pytest.mark.parametrize("name", distinct_models())
def test_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=42).train()
    assert model.get_classifier().out_features == 42 and model.num_classes == 42
    out = model(images())
    assert out.shape == (2, 42)
    out.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing[:5]


@pytest.mark.filterwarnings("ignore:.torch.jit.script. is deprecated:FutureWarning")
@pytest.mark.parametrize("name", distinct_models())
def test_torchscript(model_of, name):
    model = model_of(name)
    model.class_names = [f"class {i}" for i in range(1000)]  # what the weight loaders attach
    model.preprocessing = Preprocessing()
    scripted = torch.jit.script(model)
    x = images()
    with torch.no_grad():
        assert_same(scripted(x), model(x))
        with pytest.raises(Exception, match="expected 3 input channels, got 1"):
            scripted(torch.randn(1, 1, SIZE, SIZE))
    # the twin or the model itself shares the parameters: a change reaches the scripted model
    with torch.no_grad():
        w = model.get_classifier().bias
        w += 1.0
        try:
            assert_same(scripted(x), model(x))
        finally:
            w -= 1.0


@pytest.mark.parametrize("name", distinct_models())
def test_features_only(name):
    extractor = create_model(name, features_only=True).eval()
    assert extractor.feature_info.channels() == [d["num_chs"] for d in extractor.model.feature_info]
    assert extractor.feature_info.reduction() == REDUCTIONS
    assert extractor.feature_info.channels()[-1] == 2048
    with torch.no_grad():
        maps = extractor(images(1))
    sides = SIDES.get(name, ALIGNED_SIDES)
    want = [(1, c, s, s) for c, s in zip(extractor.feature_info.channels(), sides)]
    assert [tuple(m.shape) for m in maps] == want


@pytest.mark.parametrize("name", distinct_models())
def test_forward_intermediates_equal_forward_features(model_of, name):
    model = model_of(name)
    x = images()
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        feats = model.forward_features(x)
        only = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert torch.equal(final, feats)
    assert [m.shape[1] for m in maps] == [d["num_chs"] for d in model.feature_info]
    assert torch.equal(only[0], maps[1]) and torch.equal(only[1], maps[3])


@pytest.mark.parametrize("name", distinct_models())
def test_forward_intermediates_with_grad_checkpointing(name):
    """In train mode with gradients: checkpointed intermediates equal the plain forward's, and so
    do the gradients through every map."""
    torch.manual_seed(0)
    plain = create_model(name, num_classes=0).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing()
    x = images()
    feats = plain.forward_features(x)
    results = {}
    for key, model in (("plain", plain), ("ckpt", ckpt)):
        final, maps = model.forward_intermediates(x)
        assert_same(final, feats)
        sum(m.square().mean() for m in maps).backward()
        results[key] = maps, {n: p.grad for n, p in model.named_parameters()}
    (plain_maps, plain_grads), (ckpt_maps, ckpt_grads) = results["plain"], results["ckpt"]
    for got, want in zip(ckpt_maps, plain_maps):
        assert_same(got, want)
    assert all(g is not None for g in ckpt_grads.values())
    for n, want in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[n], want, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", distinct_models())
def test_fx_feature_extraction(model_of, name):
    """Every feature_info ``module`` is an FX return node that yields that tap."""
    model = model_of(name)
    nodes = [d["module"] for d in model.feature_info]
    x = images()
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
        out = fx_extractor(model, nodes)(x)
        first = fx_extractor(model, nodes[:1])(x)  # alone: nothing after the tap is traced
    assert list(out) == nodes
    for node, want in zip(nodes, maps):
        assert torch.equal(out[node], want), node
    assert torch.equal(first[nodes[0]], maps[0])
    with pytest.raises(ValueError, match="expected 3 input channels"):  # the check is traced
        fx_extractor(model, nodes[-1:])(torch.randn(1, 1, SIZE, SIZE))


@pytest.mark.filterwarnings("ignore:.torch.jit.script. is deprecated:FutureWarning")
def test_same_padding_and_dilated_pools_script_and_trace(build):
    """The seed's TensorFlow-padded and dilated max-pools, whose pads are computed from the shape."""
    model = build("xception", **SMALL_SEED, pool_padding="same", output_stride=8)
    x = torch.randn(1, 3, 70, 70)  # even pool inputs: the 'same' padding is asymmetric
    nodes = [d["module"] for d in model.feature_info]
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
        out = fx_extractor(model, nodes)(x)
        assert_same(torch.jit.script(model)(x), model(x))
    for node, want in zip(nodes, maps):
        assert torch.equal(out[node], want), node


def export_and_check(model: nn.Module) -> None:
    """torch.export with a dynamic batch: equal to eager at the traced and at another batch size."""
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (images(2),), dynamic_shapes={"x": {0: batch}})
    exported = program.module()
    with torch.no_grad():
        for x in (images(2, seed=1), images(3, seed=2)):
            assert_same(exported(x), model(x))


@pytest.mark.parametrize("name", EXPORT_FAST)
def test_torch_export(build, name):
    export_and_check(build(name, **(SMALL_SEED if name == "xception" else {})))


# The deep aligned models repeat xception41's blocks in other numbers (and 65p those of 41p): one
# of them stands for the rest in the slow graph-capture tests.
DEEP = ("xception65",)


@pytest.mark.slow
@pytest.mark.parametrize("name", DEEP)
def test_torch_export_deep(model_of, name):
    export_and_check(model_of(name))


def compile_and_check(model: nn.Module, backend: str, batches: tuple[int, ...] = (2, 3)) -> None:
    """torch.compile(fullgraph=True), the batch dynamic when there are several sizes: equal to
    eager, one graph for all of them."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for batch in batches:
            x = images(batch, seed=batch)
            if len(batches) > 1:
                torch._dynamo.mark_dynamic(x, 0)
            assert_same(compiled(x), model(x), tol=1e-4)
    torch._dynamo.reset()


# Inductor's code generation is checked on the seed model (optimize(mode="compile") in
# tests/deploy/test_optimize.py): the aligned models use the same layer kinds (conv, BN, ReLU, add)
# and each costs about a minute of compiling on 2 cores. Dynamo's capture is checked here on the
# seed model, xception41 and xception41p: the deeper aligned models repeat their blocks.


@pytest.mark.parametrize("name", EXPORT_FAST)
def test_torch_compile_fullgraph(build, model_of, name):
    """Dynamo captures the whole forward in one graph, with a dynamic batch (no code generation;
    the seed model also through AOT autograd's forward graph)."""
    if name == "xception":
        compile_and_check(build("xception", **SMALL_SEED), backend="aot_eager")
    else:
        compile_and_check(model_of(name), backend="eager")
