"""The fast forward forms of AtomicBlock and the channels_last setting.

``AtomicBlock`` trains in its per-kernel form and evaluates (no autograd) in a
cached inference form; both must compute what its modules compute
(``_module_branch``, the form before issue 11): outputs, gradients and BN
statistics, in float64 to 1e-10 (float32: 1e-5 on outputs).
"""
import copy
import os.path as osp

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner

import atomnas_mm  # noqa: F401
from atomnas_mm.engine.hooks import (AtomShrinkHook, MemoryFormatHook,
                                     to_memory_format)
from atomnas_mm.engine.hooks.memory_format_hook import format_strides
from atomnas_mm.models import AtomNAS, count_flops_params
from atomnas_mm.models import blocks, fast_forms
from atomnas_mm.models.block_surgery import remove_atoms
from atomnas_mm.models.blocks import AtomicBlock
from atomnas_mm.models.fast_forms import forward_state
import harness

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEMO = osp.join(ROOT, 'configs/demo/atomnas_fashion_mnist.py')
CL = torch.channels_last


def build(se_ratio=None, with_cp=False, dtype=torch.float64, fmt=CL,
          act_cfg=None, seed=0):
    """The toy arch 'uneven' (a kernel group of one atom, an absent kernel
    size) with random BN affine parameters and statistics."""
    torch.manual_seed(seed)
    model = AtomNAS(arch=harness.toy_arch('uneven'),
                    se_ratio=se_ratio, with_cp=with_cp, act_cfg=act_cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model.to(dtype).to(memory_format=fmt)


def modules_only(model):
    """The same model, each block (and the stem and head) pinned to its
    module form."""
    model.cache_inference = False
    for m in model.modules():
        if isinstance(m, AtomicBlock):
            m.train_forms = {}
            m.cache_inference = False
    return model


def pair(**kwargs):
    fast = build(**kwargs)
    return fast, modules_only(copy.deepcopy(fast))


def shrink(model):
    """Remove k5 of block 2 (absent kernel) and empty block 3 (residual)."""
    blocks = model.blocks()
    remove_atoms(blocks[2], [0, 1, 2, 3, 4, 5, 7, 8])
    remove_atoms(blocks[3], [])
    return model


@pytest.fixture
def calls(monkeypatch):
    """Counts of the fast forms run (so that a test sees them used)."""
    counts = dict(per_kernel=0, inference=0)
    for key, name in (('per_kernel', 'per_kernel_forward'),
                      ('inference', 'inference_forward')):
        orig = getattr(blocks, name)

        def spy(block, x, _key=key, _orig=orig):
            counts[_key] += 1  # before: a recomputation may stop early
            out = _orig(block, x)
            counts[_key] -= out is None
            return out
        monkeypatch.setattr(blocks, name, spy)
    return counts


def input_like(model, batch=4, size=32):
    torch.manual_seed(1)
    dtype = next(model.parameters()).dtype
    return torch.randn(batch, 3, size, size, dtype=dtype).to(
        memory_format=CL)


def close(a, b, tol=1e-10):
    """``|a - b| <= tol * max(1, max |b|)`` (a relative bound for large b)."""
    a, b = a.double(), b.double()
    if not b.numel():
        return a.shape == b.shape
    return bool((a - b).abs().max() <= tol * max(1.0, b.abs().max().item()))


def assert_same_state(a, b, tol=1e-10):
    for (name, t), u in zip(a.state_dict().items(), b.state_dict().values()):
        assert t.shape == u.shape and close(t, u, tol), name


def run_steps(fast, ref, x, steps=2):
    """Forward + backward + an SGD step on both; compare everything."""
    opt_f = torch.optim.SGD(fast.parameters(), lr=0.01)
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.01)
    for _ in range(steps):
        xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_f, out_r = fast(xf)[-1], ref(xr)[-1]
        assert close(out_f, out_r)
        grad = torch.randn_like(out_r)
        out_f.backward(grad)
        out_r.backward(grad)
        assert close(xf.grad, xr.grad)
        for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
            assert close(p.grad, q.grad), name
        assert_same_state(fast, ref)  # BN statistics, batch counts
        opt_f.step()
        opt_r.step()
        opt_f.zero_grad()
        opt_r.zero_grad()


@pytest.mark.parametrize('se_ratio', [None, 0.5], ids=['plain', 'se'])
@pytest.mark.parametrize('fmt', [torch.contiguous_format, CL],
                         ids=['contiguous', 'channels_last'])
@pytest.mark.parametrize('with_cp', [False, True], ids=['', 'with_cp'])
def test_training_form_equals_modules(se_ratio, fmt, with_cp, calls):
    fast, ref = pair(se_ratio=se_ratio, fmt=fmt, with_cp=with_cp)
    run_steps(fast.train(), ref.train(), input_like(fast).to(
        memory_format=fmt))
    # blocks 1, 2, 3 have several kernel groups: 3 blocks x 2 steps
    # (x 2 with checkpointing: the recomputation runs the form again)
    assert calls['per_kernel'] == 6 * (2 if with_cp else 1)


def test_training_form_after_shrink_and_bn_modes(calls):
    """Absent kernels and an emptied residual block from the surgery; BN in
    eval mode while the block trains (norm_eval); momentum None (the
    cumulative average used by BN re-calibration)."""
    fast, ref = pair(se_ratio=0.5)
    shrink(fast)
    shrink(ref)
    assert fast.arch_rows()[2][3:5] == [[3, 7], [6, 2]]
    assert fast.arch_rows()[3][3:5] == [[], []]
    x = input_like(fast)
    run_steps(fast.train(), ref.train(), x)
    for model in (fast, ref):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        model.blocks()[1].expand.norm.eval()
    run_steps(fast, ref, x)
    assert calls['per_kernel'] == 8  # blocks 1, 2 x 4 steps


@pytest.mark.parametrize('se_ratio', [None, 0.5], ids=['plain', 'se'])
def test_eval_forms_equal_modules(se_ratio, calls):
    fast, ref = pair(se_ratio=se_ratio, act_cfg=dict(type='Swish'))
    fast.eval()
    ref.eval()
    x = input_like(fast)
    # with autograd: the module form, same gradients
    run_steps(fast, ref, x, steps=1)
    assert calls == dict(per_kernel=0, inference=0)
    with torch.no_grad():
        assert close(fast(x)[-1], ref(x)[-1])
    with torch.inference_mode():
        assert close(fast(x)[-1], ref(x)[-1])
    assert calls['inference'] == 2 * 5  # every block, twice


class CountingOp:
    """Stands in for ``torch.ops.mkldnn._convolution_pointwise``."""

    def __init__(self, op):
        self.op, self.calls = op, dict(unary=0, binary=0)

    def __call__(self, *args):
        self.calls['unary'] += 1
        return self.op(*args)

    def binary(self, *args):
        self.calls['binary'] += 1
        return self.op.binary(*args)


@pytest.mark.parametrize('act', ['ReLU', 'ReLU6', 'Swish', 'HSwish'])
def test_float32_within_1e5(act, calls, monkeypatch):
    """float32, where on CPU the inference form fuses each conv with its
    activation (and the projection with the residual) in oneDNN."""
    op = CountingOp(fast_forms._FUSED_CONV)
    monkeypatch.setattr(fast_forms, '_FUSED_CONV', op)
    # 1x1 convs at batch 4 are fused when torch would run oneDNN: threads > 1
    monkeypatch.setattr(torch, 'get_num_threads', lambda: 2)
    fast, ref = pair(dtype=torch.float32, se_ratio=0.5,
                     act_cfg=dict(type=act))
    x = input_like(fast)
    for mode in (True, False):
        fast.train(mode)
        ref.train(mode)
        with torch.no_grad():
            out_f, out_r = fast(x)[-1], ref(x)[-1]
        scale = out_r.abs().max()
        assert (out_f - out_r).abs().max() <= 1e-5 * scale
    assert calls == dict(per_kernel=3, inference=5)
    # stem, head, expand (4 blocks) and depthwise (5) with the activation,
    # projection with the residual (2 residual blocks; alone no fusion)
    assert op.calls == dict(unary=11, binary=2)


def test_inference_cache_follows_every_change(calls):
    """The cached form is rebuilt after each kind of change."""
    fast, ref = pair(se_ratio=0.5)
    fast.eval()
    ref.eval()
    x = input_like(fast)

    def check():
        with torch.no_grad():
            out_f, out_r = fast(x)[-1], ref(x)[-1]
        assert close(out_f, out_r)
        return out_f

    def both(fn):
        fn(fast)
        fn(ref)

    first = check()
    fast.eval()  # train(False): drops the caches, rebuilt below
    with torch.no_grad():
        assert torch.equal(fast(x)[-1], first)

    def step(model):  # an optimizer step in eval mode
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.01)
        torch.optim.SGD(model.parameters(), lr=1.0).step()
    both(step)
    assert not torch.allclose(check(), first)
    other = build(se_ratio=0.5, seed=3).state_dict()
    both(lambda m: m.load_state_dict(other))
    check()

    def recalibrate(model):  # BN statistics re-estimated, blocks in eval
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in norms:
            m.train()
        with torch.no_grad():
            model(x * 2 + 1)
        for m in norms:
            m.eval()
    both(recalibrate)
    check()
    both(shrink)  # the surgery in eval mode
    check()
    both(lambda m: m.to(torch.float32).to(torch.float64))  # .to(): no bump
    check()

    def data_write(model):  # invisible to version counters: then eval()
        model.blocks()[1].project.conv.weight.data.mul_(2)
        model.eval()
    both(data_write)
    check()
    with torch.no_grad():
        for p in fast.parameters():
            p.zero_()
        assert not torch.allclose(fast(x)[-1], ref(x)[-1])
    assert calls['inference'] > 0


def test_hooks_and_tracing_see_the_modules(calls):
    """FLOPs counting (module hooks) and tracing (ONNX export) run the
    module form."""
    fast, ref = pair(dtype=torch.float32)
    assert count_flops_params(fast, (1, 3, 32, 32)) == \
        count_flops_params(ref, (1, 3, 32, 32))
    x = input_like(fast, batch=1)
    traced = torch.jit.trace(fast.eval(), x, check_trace=False)
    assert calls == dict(per_kernel=0, inference=0)
    with torch.no_grad():
        assert torch.allclose(traced(x)[-1], ref.eval()(x)[-1], atol=1e-5)


@pytest.mark.parametrize('arch', ['supernet', 'atomnas_a', 'atomnas_c_plus'])
def test_shipped_archs_get_the_fast_forms(arch):
    model = AtomNAS(arch=arch, stem_channels=16 if arch == 'supernet' else
                    None)
    blocks = model.blocks()
    states = [forward_state(b) for b in blocks]
    assert all(s is not None and s.foldable for s in states)
    assert [s.multi for s in states] == [
        b.expand is not None and len(b.dw) > 1 for b in blocks]
    assert any(s.multi for s in states)
    assert AtomicBlock.train_forms == {'cpu': 'per_kernel',
                                       'cuda': 'per_kernel'}


# -- the channels_last setting (MemoryFormatHook) -----------------------------
def is_cl(model):
    """Every 4-D tensor exactly in channels_last strides (also 1x1 convs,
    whose strides DDP's buckets compare)."""
    return all(t.stride() == format_strides(t.shape, 'channels_last')
               for t in list(model.parameters()) + list(model.buffers())
               if t.dim() == 4)


def test_to_memory_format_keeps_parameters():
    model = build(fmt=torch.contiguous_format)
    params = list(model.parameters())
    assert to_memory_format(model, 'channels_last') and is_cl(model)
    assert list(model.parameters()) == params
    assert not to_memory_format(model, 'channels_last')
    with pytest.raises(ValueError, match='memory_format'):
        MemoryFormatHook(memory_format='nhwc')


class ForceShrinkHook(Hook):
    """After the second iteration, remove k5 of layer2.0 with
    AtomShrinkHook's surgery (model, EMA copy, optimizer); record the
    memory formats at every iteration."""
    priority = 'VERY_HIGH'

    def __init__(self):
        self.seen = []

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        model = runner.model
        ema = [h for h in runner.hooks if type(h).__name__ == 'EMAHook'][0]
        self.seen.append((batch_idx, is_cl(model),
                          is_cl(ema.ema_model.module)))
        if batch_idx == 1:  # keep k3 and k7 of layer2.0 (48 atoms each)
            keep = torch.cat([torch.arange(48), torch.arange(96, 144)])
            shrink = [h for h in runner.hooks
                      if isinstance(h, AtomShrinkHook)][0]
            shrink.apply(runner, {'backbone.layer2.0': keep})


def test_demo_config_trains_in_channels_last(tmp_path):
    cfg = Config.fromfile(DEMO)
    assert cfg.default_hooks.memory_format.memory_format == 'channels_last'
    loader = dict(dataset=dict(type='ToyData', n=8, num_classes=10,
                               channels=1, size=28), batch_size=4,
                  num_workers=0, persistent_workers=False,
                  sampler=dict(type='DefaultSampler', shuffle=False))
    cfg.train_dataloader = loader
    cfg.val_dataloader = cfg.test_dataloader = None
    cfg.val_cfg = cfg.test_cfg = cfg.val_evaluator = cfg.test_evaluator = None
    cfg.train_cfg = dict(by_epoch=False, max_iters=4)
    cfg.param_scheduler = None
    cfg.custom_hooks = [h for h in cfg.custom_hooks
                        if h.type != 'atomnas_mm.BNRecalibrationHook']
    cfg.default_hooks.checkpoint = None
    cfg.default_hooks.logger.interval = 1
    cfg.work_dir = str(tmp_path)
    cfg.log_level = 'WARNING'
    runner = Runner.from_cfg(cfg)
    force = ForceShrinkHook()
    runner.register_hook(force)
    hooks = [type(h).__name__ for h in runner.hooks]
    assert hooks.index('MemoryFormatHook') < hooks.index('EMAHook')
    runner.train()
    rows = runner.model.backbone.arch_rows()
    assert rows[1][3] == [3, 7]  # k5 removed after iteration 2
    # channels_last from the first iteration to the last, shrink included
    assert force.seen == [(i, True, True) for i in range(4)]
    state = runner.optim_wrapper.optimizer.state
    assert all(v.stride() == format_strides(v.shape, 'channels_last')
               for s in state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim() == 4)


def _ddp_worker(rank, work_dir):
    import warnings
    cfg = harness.make_cfg(work_dir, max_epochs=2)
    cfg['default_hooks']['memory_format'] = dict(
        type='atomnas_mm.MemoryFormatHook')
    harness.ddp_cfg(cfg)
    runner = harness.build(cfg, [harness.KillAtomsHook(harness.SCHEDULE)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        runner.train()
    model = runner.model
    assert type(model).__name__ == 'MMDistributedDataParallel'
    assert model.module.backbone.arch_rows()[1][3] == [3, 7]  # shrunk
    ema = [h for h in runner.hooks if type(h).__name__ == 'EMAHook'][0]
    torch.save(dict(
        cl=(is_cl(model.module), is_cl(ema.ema_model.module)),
        stride_warnings=[str(w.message) for w in caught
                         if 'strides' in str(w.message)],
        state={k: p.detach().contiguous()
               for k, p in model.module.named_parameters()}),
        osp.join(work_dir, f'rank{rank}.pth'))


@pytest.mark.slow
def test_channels_last_under_ddp(tmp_path):
    """2-process CPU DDP: the wrapper is rebuilt after each conversion (no
    gradient-stride mismatch in the reducer; after the epoch-end shrinks
    ``before_val`` restores exact strides), the search shrinks, ranks stay
    identical."""
    harness.spawn_cpu_ddp(_ddp_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pth', weights_only=True)
              for r in (0, 1))
    assert r0['cl'] == r1['cl'] == (True, True)
    assert r0['stride_warnings'] == []
    for k, v in r0['state'].items():
        assert torch.equal(v, r1['state'][k]), k


# -- benchmarks/gpu_check.sh (needs no GPU here) ------------------------------
GPU_CHECK = osp.join(ROOT, 'benchmarks', 'gpu_check.sh')


def run_gpu_check(*args):
    import subprocess
    import sys
    env = dict(__import__('os').environ, PYTHON=sys.executable)
    return subprocess.run(['bash', GPU_CHECK, *args], capture_output=True,
                          text=True, timeout=600, env=env)


@pytest.mark.skipif(torch.cuda.is_available(), reason='a GPU is present')
def test_gpu_check_fails_fast_without_cuda():
    out = run_gpu_check()
    assert out.returncode == 2
    assert 'gpu_check.sh: error: no CUDA device' in out.stderr
    assert out.stdout == ''


@pytest.mark.slow
def test_gpu_check_cpu_smoke():
    out = run_gpu_check('--cpu-smoke', '--parts', 'search', 'inference')
    assert out.returncode == 0, out.stderr[-2000:]
    table = out.stdout[out.stdout.index('### GPU check'):]
    assert 'CPU smoke run' in table
    assert 'torch.cuda.memory_allocated around the shrink' in table
    assert 'losses finite: True' in table
    assert 'atomnas_a (deploy) / MobileNetV2 (BN folded)' in table


@pytest.mark.parametrize('act', ['ReLU', 'Swish'])
def test_deployed_forward_fused_equals_modules(act, monkeypatch):
    """Deployed blocks run oneDNN-fused without autograd, their modules
    with it: the same outputs."""
    from atomnas_mm.models.deploy import deploy_model
    model = shrink(build(dtype=torch.float32, se_ratio=0.5,
                         act_cfg=dict(type=act))).eval()
    deployed = deploy_model(model)
    x = input_like(model)
    op = CountingOp(fast_forms._FUSED_CONV)
    monkeypatch.setattr(fast_forms, '_FUSED_CONV', op)
    monkeypatch.setattr(torch, 'get_num_threads', lambda: 2)
    ref = deployed(x)[-1].detach()  # autograd on: the modules
    assert op.calls == dict(unary=0, binary=0)
    with torch.no_grad():
        out = deployed(x)[-1]
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert op.calls['unary'] > 0 and op.calls['binary'] > 0
