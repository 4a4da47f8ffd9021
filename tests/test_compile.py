"""CBN under ``torch.compile``: a compiled model traces every CBN layer whole (no graph break),
does not recompile from one iteration to the next, and trains as the eager model does; the
fused step (the layer's own compiled step) equals the eager one, and falls back to it."""
import copy
import logging

import pytest
import torch
import torch._dynamo.testing
from torch import nn

import mmdet_cbn.fused as fused_module
from mmdet_cbn import CrossIterationBatchNorm2d, pair_cbn_layers


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch (dynamo's caches are per code object, across tests)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Net(nn.Module):
    """Two conv + CBN blocks (a grouped conv with bias among them) and a head shared by two
    feature maps (two call sites per iteration)."""

    def __init__(self, **cbn_kw):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.norm1 = CrossIterationBatchNorm2d(8, window_size=3, **cbn_kw)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=2)
        self.norm2 = CrossIterationBatchNorm2d(8, window_size=4, **cbn_kw)
        self.head_conv = nn.Conv2d(8, 8, 1)
        self.head_norm = CrossIterationBatchNorm2d(8, window_size=4, **cbn_kw)

    def forward(self, x):
        a = torch.relu(self.norm1(self.conv1(x)))
        b = torch.relu(self.norm2(self.conv2(a)))
        return [self.head_norm(self.head_conv(f)) for f in (a, b)]


def make(dtype, seed=0, **cbn_kw):
    torch.manual_seed(seed)
    model = Net(**cbn_kw).to(dtype)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, CrossIterationBatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    pair_cbn_layers(model)
    return model


def train(model, run, steps, dtype, explicit=False, sizes=((2, 12), (3, 10), (2, 9))):
    """SGD steps with batch and image sizes that change every step; per step the outputs,
    then the parameters' gradients."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    record = []
    for step in range(steps):
        batch, size = sizes[step % len(sizes)]
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(batch, 3, size, size, dtype=dtype, generator=generator)
        if explicit:
            for module in model.modules():
                if isinstance(module, CrossIterationBatchNorm2d):
                    module.new_iteration()
        outs = run(x)
        loss = sum((out * torch.randn(out.shape, dtype=dtype, generator=generator)).sum()
                   for out in outs)
        optimizer.zero_grad()
        loss.backward()
        record.append(([out.detach() for out in outs],
                       [p.grad.clone() for p in model.parameters()]))
        optimizer.step()
    return record


def assert_same_training(got, expected, rtol):
    for step, ((outs, grads), (ref_outs, ref_grads)) in enumerate(zip(got, expected)):
        scale = max(g.abs().max() for g in ref_grads)
        for out, ref in zip(outs, ref_outs):
            torch.testing.assert_close(out, ref, rtol=rtol, atol=rtol * ref.abs().max(),
                                       msg=lambda m: f'step {step} output: {m}')
        for grad, ref in zip(grads, ref_grads):
            torch.testing.assert_close(grad, ref, rtol=rtol, atol=rtol * scale,
                                       msg=lambda m: f'step {step} gradient: {m}')


def assert_same_state(model, reference, rtol):
    """Every floating-point state tensor but the parameters (running statistics, histories)
    within ``rtol`` of the reference's largest magnitude."""
    expected = reference.state_dict()
    params = dict(model.named_parameters())
    for key, value in model.state_dict().items():
        if value.is_floating_point() and value.numel() and key not in params:
            scale = expected[key].abs().max()
            torch.testing.assert_close(value, expected[key], rtol=rtol, atol=rtol * scale,
                                       msg=lambda m: f'{key}: {m}')


@pytest.mark.parametrize('cbn_kw, explicit', [
    (dict(), False), (dict(detach_compensation=True), True),
    (dict(compensation='none', burnin_iters=2), False)])
def test_compiled_model_traces_whole_and_trains_as_eager(cbn_kw, explicit):
    """fullgraph=True (any graph break is an error); after the warm-up iterations (the first
    call, the first windowed call, the first new shape) no recompilation while batch and image
    sizes change; outputs, gradients, running statistics and histories equal eager to 1e-12
    (float64, aot_eager) over 8 SGD steps with partly filled windows and two call sites."""
    dtype = torch.float64
    eager, compiled = make(dtype, **cbn_kw), make(dtype, **cbn_kw)
    counter = torch._dynamo.testing.CompileCounterWithBackend('aot_eager')
    run = torch.compile(compiled, backend=counter, fullgraph=True)
    got = train(compiled, run, 4, dtype, explicit)
    warm = counter.frame_count
    got += train(compiled, run, 8, dtype, explicit)
    assert warm <= 4 and counter.frame_count == warm, 'recompiled after the warm-up'
    expected = train(eager, eager, 4, dtype, explicit) + train(eager, eager, 8, dtype, explicit)
    assert_same_training(got, expected, rtol=1e-12)
    assert_same_state(compiled, eager, rtol=1e-12)
    assert compiled.head_norm.num_call_sites == 2 and compiled.head_norm.steps == 12


def test_compiled_channels_last_model_trains_as_eager():
    """Conv weights in channels-last memory (``model.to(memory_format=torch.channels_last)``),
    which the compiled step reads as they lie: outputs, gradients and state equal eager to
    1e-12 over 6 SGD steps (float64, aot_eager)."""
    dtype = torch.float64
    eager, compiled = (make(dtype).to(memory_format=torch.channels_last) for _ in range(2))
    assert not compiled.conv1.weight.is_contiguous()
    run = torch.compile(compiled, backend='aot_eager', fullgraph=True)
    assert_same_training(train(compiled, run, 6, dtype), train(eager, eager, 6, dtype), 1e-12)
    assert_same_state(compiled, eager, rtol=1e-12)


def test_inductor_compiles_the_whole_model_in_float32():
    """The real backend (aot_eager hides what inductor refuses, e.g. two mutated views of
    one storage as graph inputs): 4 SGD steps within 1e-5 of eager."""
    eager, compiled = make(torch.float32), make(torch.float32)
    got = train(compiled, torch.compile(compiled, fullgraph=True), 4, torch.float32)
    assert_same_training(got, train(eager, eager, 4, torch.float32), rtol=1e-5)
    assert_same_state(compiled, eager, rtol=1e-5)


def test_compiled_eval_model_has_no_graph_break():
    model = make(torch.float32)
    train(model, model, 3, torch.float32)
    model.eval()
    x = torch.randn(2, 3, 12, 12)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch.testing.assert_close(torch.compile(model, backend='aot_eager', fullgraph=True)(x),
                               model(x))


def test_sampled_grad_var_traces_with_a_draw_per_iteration():
    """grad_nu_stride > 1 inside a compiled model: the offsets drawn when the last iteration
    ended enter the graph as numbers (a traced draw would be one constant forever)."""
    model = make(torch.float64, grad_nu_stride=2)
    run = torch.compile(model, backend='aot_eager', fullgraph=True)
    draws = set()
    for step in range(5):
        train(model, run, 1, torch.float64)
        draws.add(model.norm1._next_draw)
    assert len(draws) > 1


@pytest.fixture
def fresh_fusion(monkeypatch):
    """The fused module's process state, restored after the test."""
    monkeypatch.setattr(fused_module, '_compiled', {})
    monkeypatch.setattr(fused_module, '_broken', None)
    monkeypatch.setattr(fused_module, '_announced', set())


def test_fused_step_equals_eager_in_float32(fresh_fusion):
    """The layer's own compiled step (inductor, C++ on this CPU): outputs, gradients and
    state within 1e-5 of the eager step over 6 SGD steps."""
    eager, fused = make(torch.float32), make(torch.float32, fused=True)
    expected = train(eager, eager, 6, torch.float32)
    got = train(fused, fused, 6, torch.float32)
    assert fused_module._broken is None and fused_module._compiled
    assert_same_training(got, expected, rtol=1e-5)
    assert_same_state(fused, eager, rtol=1e-5)


def test_one_fused_kind_serves_many_channel_counts_and_sizes(fresh_fusion, monkeypatch):
    """Layers of one kind (1x1 conv, window 3) with other channel counts, batch and map sizes
    share a handful of graphs (dynamo gives parameters constant sizes, and equal sizes one
    symbol: both would compile a graph per layer and hit the recompile limit; a size test
    traced for a path only the eager step takes would split them too), and train as the eager
    step does; whatever dynamo's own recompile limit."""
    monkeypatch.setattr(torch._dynamo.config, 'recompile_limit', 1)
    real_compile = torch.compile
    monkeypatch.setattr(torch, 'compile', lambda fn, **kw: real_compile(fn, backend='aot_eager',
                                                                        **kw))
    shapes = [(64, 64, 16, 2), (64, 256, 16, 2), (256, 64, 8, 3), (128, 512, 8, 5),
              (16, 16, 16, 1), (32, 64, 32, 2), (64, 64, 7, 40),
              (1024, 64, 2, 2)]  # an unfolded d var / d W (the opaque operator decides)
    before = torch._dynamo.utils.counters['stats']['unique_graphs']
    for in_channels, channels, size, batch in shapes:
        layers = []
        for fused in (False, True):
            torch.manual_seed(0)
            block = nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False),
                                  CrossIterationBatchNorm2d(channels, window_size=3, fused=fused))
            pair_cbn_layers(block)
            layers.append(block)
        for step in range(2):
            x = torch.randn(batch, in_channels, size, size, generator=torch.Generator()
                            .manual_seed(step))
            outs = [block(x) for block in layers]
            for out in outs:
                out.square().mean().backward()
            torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(layers[1][0].weight.grad, layers[0][0].weight.grad,
                                       rtol=1e-4, atol=1e-6)
    graphs = torch._dynamo.utils.counters['stats']['unique_graphs'] - before
    assert fused_module._broken is None and len(fused_module._compiled) == 1
    assert graphs <= 3, graphs  # 4 when a size test of the eager-only paths was traced


def _fallback_gives_eager_results(caplog, reason):
    eager, fused = make(torch.float64), make(torch.float64, fused=True)
    with caplog.at_level(logging.WARNING, logger='mmdet_cbn'):
        got = train(fused, fused, 3, torch.float64)
    assert_same_training(got, train(eager, eager, 3, torch.float64), rtol=1e-12)
    lines = [r.getMessage() for r in caplog.records if 'fused CBN training step' in
             r.getMessage()]
    assert len(lines) == 1 and reason in lines[0], lines


def test_fused_falls_back_without_dynamo(fresh_fusion, monkeypatch, caplog):
    monkeypatch.setattr(torch._dynamo, 'is_dynamo_supported', lambda: False)
    _fallback_gives_eager_results(caplog, 'not supported on this Python')


def test_fused_falls_back_on_an_unsupported_device(fresh_fusion, monkeypatch, caplog):
    monkeypatch.setattr(fused_module, 'FUSED_DEVICES', ('cuda',))
    _fallback_gives_eager_results(caplog, "does not compile for 'cpu' tensors")
    assert fused_module._broken is None  # another device may still fuse


def test_fused_falls_back_on_a_compiler_error(fresh_fusion, monkeypatch, caplog):
    def failing_compile(fn, **kwargs):
        def compiled(*args, **kw):
            raise torch._dynamo.exc.InternalTorchDynamoError('the compiler failed')
        return compiled
    monkeypatch.setattr(torch, 'compile', failing_compile)
    _fallback_gives_eager_results(caplog, 'InternalTorchDynamoError: the compiler failed')
    assert fused_module._broken.startswith('InternalTorchDynamoError')


def test_fused_falls_back_without_a_cpp_compiler(fresh_fusion, monkeypatch, caplog):
    monkeypatch.setattr(torch._inductor.config.cpp, 'cxx', (None, '/nonexistent/c++'))
    _fallback_gives_eager_results(caplog, 'Error')


def test_fused_step_does_not_hide_a_wrong_input(fresh_fusion, monkeypatch):
    """A call the eager step refuses (here a layer left in another dtype than its input) is
    refused with the eager error, and fusion stays on (the compiled step is stood in for by
    the eager one: what matters is what the fallback does with its error)."""
    monkeypatch.setattr(torch, 'compile', lambda fn, **kwargs: fn)
    model = make(torch.float64, fused=True)
    train(model, model, 2, torch.float64)
    model.norm2.float()
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert fused_module._broken is None and not fused_module._announced


def test_deepcopy_of_a_model_gets_its_own_backward_taps():
    """A copied model (EMA, model soups) still learns its iterations from its backward pass."""
    model = make(torch.float64)
    train(model, model, 2, torch.float64)
    twin = copy.deepcopy(model)
    train(twin, twin, 3, torch.float64)
    assert twin.head_norm.steps == 5 and twin.head_norm.num_call_sites == 2
    assert model.head_norm.steps == 2


def test_mmengine_compile_trains_as_eager(tmp_path):
    """mmengine's ``compile`` (it compiles ``model.train_step``; dynamo breaks the graph at the
    backward and the optimizer step, not at CBN) trains as the eager run: same weights, CBN
    state and iteration count after 2 epochs with the burn-in hook."""
    from test_hook import ToyNet, run
    hook = dict(type='CBNBurnInHook', burnin_iters=2)
    train_cfg = dict(by_epoch=True, max_epochs=2)
    torch.manual_seed(0)
    eager = run(tmp_path / 'eager', ToyNet(), train_cfg, hook).model
    torch.manual_seed(0)
    compiled = run(tmp_path / 'compiled', ToyNet(), train_cfg, hook,
                   cfg=dict(compile=dict(backend='aot_eager'))).model
    assert 'train_step' in vars(compiled)  # replaced by the compiled one
    assert compiled.norm.steps == eager.norm.steps == 8
    for key, value in compiled.state_dict().items():
        torch.testing.assert_close(value, eager.state_dict()[key], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f'{key}: {m}')
