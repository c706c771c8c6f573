"""Golden files: a seeded tiny search and seeded zoo features.

They catch any change of behaviour that the other tests let through (the
search's decisions, the zoo's numerics). After an intended change, look at
the diff of the regenerated files and commit them:

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
    from harness import build, make_cfg
    cfg = make_cfg(work_dir, max_epochs=3)
    cfg['optim_wrapper'] = dict(optimizer=dict(type='RMSprop', lr=0.05,
                                               momentum=0.9, eps=1e-3))
    cfg['custom_hooks'].insert(1, dict(type='atomnas_mm.BNL1PenaltyHook',
                                       rho=0.2, warmup_iters=0))
    cfg['custom_hooks'][2].update(threshold=0.1)
    runner = build(cfg)
    runner.train()
    hook = next(h for h in runner.hooks
                if type(h).__name__ == 'AtomShrinkHook')
    return dict(rows=runner.model.backbone.arch_rows(),
                flops=[h['flops'] for h in hook.history],
                iters=[h['iter'] for h in hook.history])


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
    assert tiny_search(str(tmp_path)) == _load('tiny_search.json')


if __name__ == '__main__':
    if sys.argv[1:] != ['--regenerate']:
        sys.exit(f'usage: python {sys.argv[0]} --regenerate')
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        files = {'zoo_features.json': zoo_features(),
                 'tiny_search.json': tiny_search(tmp)}
    for name, data in files.items():
        with open(osp.join(GOLDEN, name), 'w') as f:
            json.dump(data, f, indent=1)
            f.write('\n')
        print(f'wrote {osp.join(GOLDEN, name)}')
