"""Golden files: a seeded tiny search and seeded zoo features.

They catch any change of behaviour that the other tests let through (the
search's decisions, the zoo's numerics). The tiny search's decisions depend
on float summation order (torch build, thread count, the CPU's vector
unit): it is compared exactly where it was made (``made_with``), elsewhere
within a stated tolerance. After an intended change, look at the diff of
the regenerated files and commit them:

    .venv/bin/python tests/test_golden.py --regenerate
"""
import json
import os.path as osp
import sys

import pytest
import torch

HERE = osp.dirname(osp.abspath(__file__))
GOLDEN = osp.join(HERE, 'golden')
ZOO_SIZE = 64


def zoo_features():
    """``{arch: 8 pooled features}`` of seeded zoo backbones (what a head
    turns into logits), BN in training mode on a seeded batch of 2."""
    from mmpretrain.models import ImageClassifier

    import atomnas_mm  # noqa: F401
    from atomnas_mm.models import ARCHS
    out = {}
    for name in sorted(ARCHS):
        torch.manual_seed(0)
        model = ImageClassifier(
            backbone=dict(type='atomnas_mm.AtomNAS', arch=name),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=10,
                      in_channels=1280))
        model.init_weights()
        model.train()  # BN on batch statistics: activations of order 1
        x = torch.randn(2, 3, ZOO_SIZE, ZOO_SIZE,
                        generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            features = model.extract_feat(x)[-1]
        out[name] = [float(f'{v:.6g}') for v in features[0, :8].tolist()]
    return out


def tiny_search(work_dir):
    """Rows and FLOPs history of a seeded 3-epoch search on toy data."""
    sys.path.insert(0, HERE)
    from harness import build, make_cfg, toys_registered
    cfg = make_cfg(work_dir, max_epochs=3)
    cfg['optim_wrapper'] = dict(optimizer=dict(type='RMSprop', lr=0.05,
                                               momentum=0.9, eps=1e-3))
    cfg['custom_hooks'].insert(1, dict(type='atomnas_mm.BNL1PenaltyHook',
                                       rho=0.2, warmup_iters=0))
    cfg['custom_hooks'][2].update(threshold=0.1)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)  # the summation order, whatever the load
    try:
        with toys_registered():
            runner = build(cfg)
            runner.train()
    finally:
        torch.set_num_threads(threads)
    hook = next(h for h in runner.hooks
                if type(h).__name__ == 'AtomShrinkHook')
    return dict(rows=runner.model.backbone.arch_rows(),
                flops=[h['flops'] for h in hook.history],
                iters=[h['iter'] for h in hook.history])


#: The tiny search runs on one thread: its decisions depend on the float
#: summation order, which depends on the thread count (measured: 2 threads
#: keep one more atom in block 2 than 1 thread).
THREADS = 1


def cpu_model():
    """Vendor, family/model and the matrix/vector extensions of this CPU:
    machines of one ISA level (``AVX512``) still pick different kernels
    (measured: an AMX machine shrinks the same atoms a check later)."""
    info = {}
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key, _, value = line.partition(':')
                info.setdefault(key.strip(), value.strip())
    except OSError:
        import platform
        return platform.processor() or platform.machine()
    isa = sorted(f for f in info.get('flags', '').split()
                 if f.startswith(('avx512', 'amx')) or 'vnni' in f)
    return f"{info.get('vendor_id')} {info.get('cpu family')}/" \
        f"{info.get('model')} {' '.join(isa)}"


def made_with():
    """What the tiny search's float summation order depends on."""
    return dict(torch=torch.__version__, threads=THREADS,
                cpu=torch.backends.cpu.get_cpu_capability(),
                cpu_model=cpu_model())


# Elsewhere than ``made_with``: one atom's decision can flip (measured
# between an AVX512 and another machine: one atom in two blocks, FLOPs
# 1.2% apart; between two AVX512 machines, one with AMX: the same final
# net, an intermediate FLOPs count 1.2% apart).
ATOMS_PER_BLOCK = 2
FLOPS_REL = 0.03


def _load(name):
    with open(osp.join(GOLDEN, name)) as f:
        return json.load(f)


def test_zoo_features_match_golden():
    want = _load('zoo_features.json')
    got = zoo_features()
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-6), name


@pytest.mark.slow
def test_tiny_search_matches_golden(tmp_path):
    want = _load('tiny_search.json')
    got = tiny_search(str(tmp_path))
    assert got['iters'] == want['iters']  # the shrinks happen when they did
    if want['made_with'] == made_with():
        assert got['rows'] == want['rows'] and got['flops'] == want['flops']
        return
    print(f'made with {want["made_with"]}, run with {made_with()}: '
          f'compared within {ATOMS_PER_BLOCK} atoms per block, FLOPs within '
          f'{FLOPS_REL:.0%}')
    assert len(got['rows']) == len(want['rows'])
    for i, (row, ref) in enumerate(zip(got['rows'], want['rows'])):
        assert row[:3] == ref[:3], i  # channels, depth, stride
        assert abs(sum(row[4]) - sum(ref[4])) <= ATOMS_PER_BLOCK, (i, row, ref)
    assert got['flops'] == pytest.approx(want['flops'], rel=FLOPS_REL)


if __name__ == '__main__':
    if sys.argv[1:] != ['--regenerate']:
        sys.exit(f'usage: python {sys.argv[0]} --regenerate')
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        files = {'zoo_features.json': zoo_features(),
                 'tiny_search.json': dict(tiny_search(tmp),
                                          made_with=made_with())}
    for name, data in files.items():
        with open(osp.join(GOLDEN, name), 'w') as f:
            json.dump(data, f, indent=1)
            f.write('\n')
        print(f'wrote {osp.join(GOLDEN, name)}')
