"""``type='atomnas_mm.AtomNAS'`` from mmpretrain and mmdet configs (the
detectors themselves: tests/test_detection.py)."""
import subprocess
import sys
import textwrap

import pytest
import torch
from mmdet.registry import MODELS as DET_MODELS
from mmengine.registry import DefaultScope
from mmpretrain.registry import MODELS as PRETRAIN_MODELS

from atomnas_mm.models import AtomNAS
from atomnas_mm.registry import MODELS

BACKBONE = dict(type='atomnas_mm.AtomNAS', arch='atomnas_a',
                out_indices=(1, 2, 4, 6))


def test_registered_in_own_registry():
    assert MODELS.scope == 'atomnas_mm'
    assert MODELS.get('AtomNAS') is AtomNAS


@pytest.mark.parametrize('scope, registry', [
    ('mmpretrain', PRETRAIN_MODELS), ('mmdet', DET_MODELS)])
def test_build_from_downstream_registry(scope, registry):
    with DefaultScope.overwrite_default_scope(scope):
        backbone = registry.build(BACKBONE)
    assert type(backbone) is AtomNAS
    with torch.no_grad():
        outs = backbone(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [24, 40, 96, 320]


# Run in a fresh interpreter: nothing imports atomnas_mm before the build, so
# mmengine must find it from the ``atomnas_mm.`` prefix alone.
FRESH_BUILD = textwrap.dedent('''
    import sys
    from mmengine.registry import DefaultScope
    from {scope}.registry import MODELS
    assert 'atomnas_mm' not in sys.modules
    with DefaultScope.overwrite_default_scope('{scope}'):
        model = MODELS.build(dict(type='atomnas_mm.AtomNAS',
                                  arch='atomnas_a', out_indices=(2, 7)))
    print(type(model).__module__, type(model).__name__,
          model.arch_rows()[1], sep=';')
''')


@pytest.mark.slow
@pytest.mark.parametrize('scope', ['mmpretrain', 'mmdet'])
def test_build_without_import(scope):
    result = subprocess.run(
        [sys.executable, '-c', FRESH_BUILD.format(scope=scope)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    module, name, row = result.stdout.strip().splitlines()[-1].split(';')
    assert (module, name) == ('atomnas_mm.models.backbones.atomnas',
                              'AtomNAS')
    assert row == '[24, 1, 2, [3, 5, 7], [16, 12, 9], True]'
