"""Smoke tests of the benchmark scripts: each runs a tiny ``--quick`` configuration and writes
valid JSON. Timings are never asserted (they are no unit tests); only the structure is.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / 'benchmarks'


def run_script(name: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f'{name}.json'
    subprocess.run([sys.executable, str(BENCHMARKS / f'{name}.py'), '--quick', '--threads', '1',
                    '--out', str(out), *extra], cwd=ROOT, check=True, capture_output=True,
                   text=True, timeout=900)
    return json.loads(out.read_text())


def test_layer_speed_quick(tmp_path: Path) -> None:
    result = run_script('layer_speed', tmp_path, '--clock', 'cpu')
    assert set(result['shapes']) == {'fpn-small', 'roi-small'}
    for shape in result['shapes'].values():
        assert set(shape['timings']) == {'bn', 'bn_floor', 'cbn_exact', 'cbn_detached',
                                         'cbn_sampled', 'cbn_burnin', 'autograd_cbn', 'bn_eval',
                                         'cbn_eval'}
        assert all(t['median_s'] > 0 for t in shape['timings'].values())
        assert isinstance(shape['ratios']['cbn_exact / (bn + floor)']['met'], bool)
    for error in result['sampled_error'].values():
        assert error['sampled_vs_exact_sigma2_bar']['median'] >= 0
    assert result['environment']['torch_threads'] == 1


def test_memory_quick(tmp_path: Path) -> None:
    result = run_script('memory', tmp_path)
    for state in result['state']:
        assert state['history_bytes'] == sum(state['history_bytes_by_field'].values()) > 0
        assert state['call_sites'] == 1
        assert 0 < state['running_record_bytes'] < state['history_bytes'] / state['slots']
        assert state['history_per_slot_over_weight'] >= 1
        assert state['authors_approach_bytes'] > state['history_bytes']
    for peaks in result['step_peak'].values():
        assert peaks['bn']['step_peak_bytes'] > 0
        for variant in ('cbn_exact', 'cbn_detached', 'cbn_sampled', 'autograd_cbn'):
            assert peaks[variant]['total_peak_bytes / bn'] > 0


def test_profile_quick(tmp_path: Path) -> None:
    result = run_script('profile_cbn', tmp_path)
    for shape in result['shapes'].values():
        phases = shape['cbn']['phases_ms']
        assert {'conv_forward', 'norm_forward', 'backward'} <= set(phases)
        assert any(path.endswith('record_statistics/grad_var_wrt_weight') for path in phases)
        assert shape['bn']['step_ms'] > 0


def test_host_overhead_quick(tmp_path: Path) -> None:
    result = run_script('host_overhead', tmp_path, '--clock', 'cpu')
    variants = result['variants']
    assert list(variants) == ['bn', 'cbn_w4_exact', 'cbn_w4_detached', 'cbn_w1', 'floor',
                              'floor_trivial']
    assert variants['floor']['ops']['by_op']['aten.convolution_backward.default'] == 2
    # the floor plus exactly --trivial-ops additions (and the zeros they start from)
    trivial = variants['floor_trivial']['ops']['non_view_by_op']
    assert trivial['aten.add.Tensor'] == variants['floor']['ops']['non_view_by_op'].get(
        'aten.add.Tensor', 0) + result['budget']['trivial_ops_timed']
    assert (variants['floor_trivial']['ops']['non_view']
            == variants['floor']['ops']['non_view'] + result['budget']['trivial_ops_timed'] + 1)
    budget = result['budget']
    assert budget['non_view_ops_added_to_floor'] == {
        name: variants[name]['ops']['non_view'] - variants['floor']['ops']['non_view']
        for name in ('cbn_w4_exact', 'cbn_w4_detached')}
    assert budget['room_to_target_us'] == pytest.approx(
        2.0 * variants['bn']['median_us'] - variants['floor']['median_us'])
    assert set(result['targets']) == {'cbn_w4_exact / bn', 'cbn_w4_detached / bn'}
    assert all(isinstance(t['met'], bool) and t['target_max'] == 2.0 and t['over_floor_bn'] > 0
               for t in result['targets'].values())
    for name, variant in variants.items():
        assert {'label', 'median_us', 'min_us', 'ratio_to_bn', 'timing', 'ops'} <= set(variant)
        ops = variant['ops']
        assert ops['all'] == sum(ops['by_op'].values()) >= ops['non_view']
        assert ops['non_view'] == sum(ops['non_view_by_op'].values())
        assert ops['non_view'] == ops['forward']['non_view'] + ops['backward']['non_view']
        assert ops['by_op']['aten.convolution.default'] == 1
        if variant['cbn']:  # the window was full when the step was counted
            assert variant['cbn']['steps'] > variant['cbn']['window_size']
            assert variant['cbn']['call_sites'] == 1
    assert variants['cbn_w4_exact']['ops']['non_view'] > variants['bn']['ops']['non_view']
    assert result['environment']['torch_threads'] == 1


def test_backbone_step_quick(tmp_path: Path) -> None:
    pytest.importorskip('mmdet')
    result = run_script('backbone_step', tmp_path, '--clock', 'cpu')
    (entry,) = result['sizes']
    assert entry['size'] == 32 and set(entry['ms']) == {'bn', 'floor', 'cbn'}
    assert entry['ratio_to_bn']['bn'] == 1.0 and entry['ratio_to_floor']['floor'] == 1.0
    assert entry['cbn_layers'] == entry['floor_convs'] == 20  # with the downsampling ones
    assert entry['compile'] == {}  # nothing compiled without --fused / --compiled
    if sys.platform != 'win32':  # counted from getrusage: whole pages, per step
        assert set(entry['page_faults_per_step']) == set(entry['ms'])
        assert all(f >= 0 and 2 * f == int(2 * f) for f in entry['page_faults_per_step'].values())
    assert 'allocator_env' in result['environment']


def test_backbone_step_quick_pspnet(tmp_path: Path) -> None:
    """The digits PSPNet from its configs: the floor's weight-gradient convs are those of
    the convs a CBN layer follows (not the heads' classifiers)."""
    pytest.importorskip('mmseg')
    result = run_script('backbone_step', tmp_path, '--model', 'pspnet')
    (entry,) = result['sizes']
    assert entry['size'] == 32 and set(entry['ms']) == {'bn', 'floor', 'cbn'}
    assert entry['cbn_layers'] == entry['floor_convs'] == 23
    assert result['args']['model'] == 'pspnet'


def test_detector_step_quick(tmp_path: Path) -> None:
    pytest.importorskip('mmdet')
    result = run_script('detector_step', tmp_path)
    assert result['cbn_layers'] > 0
    assert set(result['timings']) == {'bn', 'cbn_exact', 'cbn_detached', 'cbn_sampled',
                                      'cbn_burnin'}
    assert set(result['ratios']) == {'cbn_exact / bn', 'cbn_detached / bn', 'cbn_sampled / bn',
                                     'cbn_burnin / bn'}
    assert set(result['cbn_call_sites'].values()) == {1}  # a backward per step ends iterations
    assert result['mmcv_ops'] == 'mmcv'  # the compiled ops are installed here
    assert result['memory'] is None  # peak memory is measured on CUDA only


def test_sync_step_quick(tmp_path: Path) -> None:
    """2 gloo processes: every variant timed; SyncCBN's collectives counted per layer, as many
    floats as the moments and the record hold, apart from DDP's gradient all-reduce."""
    pytest.importorskip('mmdet')
    result = run_script('sync_step', tmp_path)
    assert (result['world_size'], result['backend']) == (2, 'gloo')
    assert result['syncbn_on_cpu']['torch.nn.SyncBatchNorm'] != 'ran'  # why the stand-in
    (run,) = result['runs']
    variants = {'bn', 'cbn', 'synccbn', 'syncbn', 'cbn_w1'}
    assert set(run['timings']) == set(run['communication']) == variants
    assert all(t['median_s'] > 0 and len(t['samples_s']) == 2 for t in run['timings'].values())
    assert set(run['ratios']) == {'synccbn / cbn', 'syncbn / cbn_w1', 'synccbn / syncbn',
                                  'syncbn / bn', 'cbn / bn', 'cbn_w1 / bn'}
    assert run['norm_layers'] == {'bn': 0, 'cbn': 16, 'synccbn': 16, 'syncbn': 16, 'cbn_w1': 16}
    assert run['windows_after_warmup'] == {'bn': [], 'cbn': [4], 'synccbn': [4], 'syncbn': [1],
                                           'cbn_w1': [1]}
    comm = run['communication']
    ddp = {name: c['per_phase']['ddp']['payload_bytes'] for name, c in comm.items()}
    assert len(set(ddp.values())) == 1 and ddp['bn'] > 0  # the same gradients in every variant
    for name in ('bn', 'cbn', 'cbn_w1'):  # per process: nothing but DDP's gradients
        assert set(comm[name]['per_phase']) == {'ddp'} and comm[name]['synccbn_payload_bytes'] == 0
    for name in ('synccbn', 'syncbn'):
        layers = comm[name]['per_layer']
        assert len(layers) == 16 and 'other' not in comm[name]['per_phase']
        for layer in layers.values():
            floats = layer['expected_floats']
            assert layer['forward_payload_bytes'] == 4 * (floats['moments_per_rank']
                                                          + floats['record'])
            assert layer['backward_payload_bytes'] == 4 * floats['backward_sums']
        assert comm[name]['synccbn_payload_bytes'] == sum(
            entry['forward_payload_bytes'] + entry['backward_payload_bytes']
            for entry in layers.values())
    # the SyncBN stand-in (window 1) sends no record
    assert all(layer['expected_floats']['record'] == 0
               for layer in comm['syncbn']['per_layer'].values())
    assert comm['synccbn']['synccbn_payload_bytes'] > comm['syncbn']['synccbn_payload_bytes']


def test_detector_state_bytes_counts_history_and_momentum() -> None:
    """What a detector keeps between steps: parameters, gradients, buffers, SGD momentum and
    the CBN history (one weight-sized G per slot and the small records) with the record of the
    current iteration, in the free slot until the next one."""
    sys.path.insert(0, str(BENCHMARKS))
    from detector_step import state_bytes

    from mmdet_cbn import CrossIterationBatchNorm2d, pair_cbn_layers
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False),
                                CrossIterationBatchNorm2d(8, window_size=3))
    pair_cbn_layers(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = state_bytes(model, optimizer)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(2, 3, 6, 6)).sum().backward()
        optimizer.step()
    params = sum(p.numel() for p in model.parameters()) * 4
    (site,) = model[1].histories
    assert site.slots == 2 and site.filled == 1 and site.written
    history = site.records.numel() * site.records.element_size()
    assert history >= 3 * model[0].weight.numel() * 4  # two slots of G and the running one
    assert state_bytes(model, optimizer) - before == 2 * params + history  # grads, momentum


def test_mmcv_ops_fallback_stands_in_only_where_the_ops_are_missing() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    import mmcv_ops_fallback

    assert mmcv_ops_fallback.install() == 'mmcv'  # compiled ops present: nothing replaced
    with pytest.raises(NotImplementedError, match='deform_conv_forward'):
        mmcv_ops_fallback._missing('deform_conv_forward')()
    with pytest.raises(AttributeError):
        mmcv_ops_fallback._missing('__path__')
    with pytest.raises(NotImplementedError, match='max'):
        mmcv_ops_fallback.roi_align_forward(*[None] * 9, pool_mode=0, aligned=True)


def test_autograd_baseline_computes_the_same_cbn() -> None:
    """The benchmark's authors'-style baseline does the same math as the package's layer with
    the authors' gradient (``detach_compensation=True``)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from layer_speed import AutogradCBN
    finally:
        sys.path.remove(str(BENCHMARKS))
    from mmdet_cbn import CrossIterationBatchNorm2d, pair_cbn_layers

    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False).double()
    model = nn.Sequential(copy.deepcopy(conv),
                          CrossIterationBatchNorm2d(6, window_size=3,
                                                    detach_compensation=True).double())
    pair_cbn_layers(model)
    baseline = AutogradCBN(copy.deepcopy(conv), window=3).double()
    pairs = [(model[0].weight, baseline.conv.weight), (model[1].weight, baseline.weight),
             (model[1].bias, baseline.bias)]
    for _ in range(5):
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
        out, ref = model(x), baseline(x)
        torch.testing.assert_close(out, ref)
        grad = torch.randn_like(out)
        out.backward(grad)
        ref.backward(grad)
        with torch.no_grad():
            for p, q in pairs:
                torch.testing.assert_close(p.grad, q.grad)
                p -= 0.1 * p.grad
                q -= 0.1 * q.grad
                p.grad = q.grad = None
