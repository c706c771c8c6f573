"""Issue 20, point 4: the modules and tensors a shrink removes are freed
when the shrink returns, not at the next forward (weak references)."""
import gc
import weakref

import pytest
import torch

from atomnas_mm.models import AtomNAS
from atomnas_mm.models.fast_forms import _FORWARD_STATE, _INFERENCE_CACHE
from atomnas_mm.search import apply_plan, plan_shrink
from harness import toy_arch


def net_with_dead_atoms():
    """layer2.1 (residual) all dead: emptied; layer2.0 loses kernel 5."""
    torch.manual_seed(0)
    net = AtomNAS(arch=toy_arch())
    blocks = net.blocks()
    with torch.no_grad():
        blocks[1].dw['k5'].norm.weight.zero_()
        for m in blocks[2].dw.values():
            m.norm.weight.zero_()
    return net


def removed_objects(net):
    """The modules and tensors of the emptied block layer2.1 and the old
    (full-width) tensors of the narrowed layer2.0."""
    emptied, narrowed = net.blocks()[2], net.blocks()[1]
    objs = [emptied.expand, emptied.project, *emptied.dw.values()]
    for cm in [emptied.expand, emptied.project, *emptied.dw.values()]:
        objs += [cm.conv, cm.norm, cm.conv.weight, cm.norm.weight,
                 cm.norm.bias, cm.norm.running_mean, cm.norm.running_var]
    objs += [narrowed.dw['k5'], narrowed.expand.conv.weight,
             narrowed.expand.norm.weight, narrowed.project.conv.weight]
    return objs


@pytest.mark.parametrize('forms', [('train', ), ('eval', ),
                                   ('train', 'eval')])
def test_shrink_frees_removed_modules_when_it_returns(forms):
    net = net_with_dead_atoms()
    x = torch.randn(2, 3, 32, 32)
    if 'train' in forms:  # the per-kernel training form: forward state
        net.train()
        net(x)[-1].sum().backward()
        net.zero_grad(set_to_none=True)
    if 'eval' in forms:  # the cached inference form (folded weights)
        net.eval()
        with torch.no_grad():
            net(x)
    emptied = net.blocks()[2]
    assert emptied in _FORWARD_STATE  # the caches hold the block's modules
    if 'eval' in forms:
        assert emptied in _INFERENCE_CACHE
    refs = [weakref.ref(o) for o in removed_objects(net)]
    apply_plan(net, plan_shrink(net))
    assert net.blocks()[2].project is None  # emptied
    alive = [r() for r in refs if r() is not None]
    assert alive == [], f'{len(alive)} of {len(refs)} removed objects alive'
    gc.collect()  # (no cycles involved: freed by reference counting above)
    # and the net still runs in both forms after the shrink
    net.train()
    net(x)[-1].sum().backward()
    net.eval()
    with torch.no_grad():
        net(x)


class _Probe:
    """Weak references to layer2.1's modules of the live and EMA models,
    taken just before AtomShrinkHook (priority 30) and checked just after
    it, at the end of epoch 1 (when KillAtomsHook empties the block)."""

    def __init__(self):
        self.refs, self.alive, self.emptied = [], None, None


def _probe_hooks(probe):
    from mmengine.hooks import EMAHook, Hook

    def models(runner):
        model = runner.model
        out = [getattr(model, 'module', model)]
        out += [h.ema_model.module for h in runner.hooks
                if isinstance(h, EMAHook)]
        return out

    class Before(Hook):
        priority = 20

        def after_train_epoch(self, runner):
            if runner.epoch == 1:
                for model in models(runner):
                    block = dict(model.named_modules())['backbone.layer2.1']
                    probe.refs += [weakref.ref(m) for m in block.modules()
                                   if m is not block]
                    probe.refs += [weakref.ref(t) for t in block.parameters()]

    class After(Hook):
        priority = 35

        def after_train_epoch(self, runner):
            if runner.epoch == 1:
                blocks = [dict(m.named_modules())['backbone.layer2.1']
                          for m in models(runner)]
                probe.emptied = all(b.project is None for b in blocks)
                probe.alive = [r() for r in probe.refs if r() is not None]

    return [Before(), After()]


@pytest.mark.slow
def test_shrink_hook_frees_the_emptied_block_in_model_and_ema(tmp_path):
    """Through a Runner: trained (per-kernel form) and validated (cached
    inference form) for an epoch, then AtomShrinkHook empties layer2.1 of
    the model and its EMA copy; nothing of it is alive when the hook
    returns."""
    from harness import KillAtomsHook, build, make_cfg
    probe = _Probe()
    runner = build(make_cfg(str(tmp_path), max_epochs=2),
                   [KillAtomsHook({1: {'backbone.layer2.1':
                                       ['k3', 'k5', 'k7']}}),
                    *_probe_hooks(probe)])
    runner.train()
    assert probe.emptied is True
    assert len(probe.refs) > 20
    assert probe.alive == [], \
        f'{len(probe.alive)} of {len(probe.refs)} removed objects alive'
