"""Model index (metafile) and mim packaging of atomnas_mm."""
import glob
import json
import os
import os.path as osp
import shutil
import subprocess
import sys
import zipfile

import pytest
from modelindex.load_model_index import load

from atomnas_mm.models import PUBLISHED

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
PYTHON = sys.executable
MODELS = {
    'atomnas-a_in1k': 'atomnas_a',
    'atomnas-b_in1k': 'atomnas_b',
    'atomnas-c_in1k': 'atomnas_c',
    'atomnas-a_plus_in1k': 'atomnas_a_plus',
    'atomnas-b_plus_in1k': 'atomnas_b_plus',
    'atomnas-c_plus_in1k': 'atomnas_c_plus',
}
# Enough of the source tree for setup.py (the tree itself stays untouched:
# a wheel build rewrites atomnas_mm/.mim in place).
SOURCES = ('setup.py', 'README.md', 'model-index.yml', 'atomnas_mm',
           'configs', 'tools', 'requirements')


def test_model_index_matches_published():
    index = load(osp.join(ROOT, 'model-index.yml'))
    assert index.check(silent=True) == []
    index.build_models_with_collections()
    models = {m.name: m for m in index.models}
    assert set(models) == set(MODELS)
    assert [c.name for c in index.collections] == ['AtomNAS']
    for name, arch in MODELS.items():
        model = models[name].full_model
        published = PUBLISHED[arch]
        assert model.config == f'configs/retrain/{name}.py'
        assert osp.isfile(osp.join(ROOT, model.config)), model.config
        assert model.metadata.flops == published['flops']
        assert model.metadata.parameters == published['params']
        assert model.metadata.training_data == 'ImageNet-1k'
        (result, ) = model.results
        assert result.task == 'Image Classification'
        assert result.dataset == 'ImageNet-1k'
        assert result.metrics == {'Top 1 Accuracy': published['top1'],
                                  'Top 5 Accuracy': published['top5']}
        assert model.paper['URL'] == 'https://arxiv.org/abs/1912.09640'
        assert 'AtomNAS' in model.paper['Title']
        assert model.weights is None  # no published weights


def copy_sources(dst):
    for name in SOURCES:
        src = osp.join(ROOT, name)
        if osp.isdir(src):
            shutil.copytree(src, osp.join(dst, name), symlinks=False,
                            ignore=shutil.ignore_patterns(
                                '__pycache__', '*.pyc', '.mim', '*.egg-info'))
        elif osp.isfile(src):
            shutil.copyfile(src, osp.join(dst, name))


def source_files(folder):
    files = glob.glob(osp.join(ROOT, folder, '**', '*'), recursive=True)
    return {osp.relpath(f, ROOT) for f in files if osp.isfile(f)
            and '__pycache__' not in f and not f.endswith('.pyc')}


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    """A wheel built the way ``pip install .`` builds it, from a copy."""
    tmp = tmp_path_factory.mktemp('wheel')
    src = tmp / 'src'
    src.mkdir()
    copy_sources(str(src))
    subprocess.run(
        [PYTHON, '-m', 'pip', 'wheel', '.', '--no-deps',
         '--no-build-isolation', '--no-index', '-q', '-w', str(tmp / 'dist')],
        cwd=str(src), check=True, timeout=300)
    (path, ) = glob.glob(str(tmp / 'dist' / 'atomnas_mm-*.whl'))
    return path


@pytest.mark.slow
def test_wheel_ships_mim_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    mim = {n[len('atomnas_mm/.mim/'):] for n in names
           if n.startswith('atomnas_mm/.mim/')}
    for need in ('model-index.yml', 'configs/atomnas/metafile.yml',
                 'configs/retrain/atomnas-a_in1k.py', 'tools/train.py',
                 'tools/test.py',
                 'tools/dataset_converters/imagenet_to_lmdb.py'):
        assert need in mim, need
    # Every shipped config and tool, not just some.
    missing = (source_files('configs') | source_files('tools')) - mim
    assert not missing, sorted(missing)
    assert 'atomnas_mm/visualization.py' in names
    assert not any(n.startswith(('tests/', 'configs/', 'tools/'))
                   for n in names)


MIM_CHECK = r'''
import json
from mim.commands.search import get_model_info
from mim.utils import get_installed_path, is_installed
path = get_installed_path('atomnas_mm')
info = get_model_info('atomnas_mm', to_dict=True)
print(json.dumps(dict(installed=is_installed('atomnas_mm'), path=path,
                      models=info)))
'''


@pytest.mark.slow
def test_mim_finds_installed_package(wheel, tmp_path):
    """mim (offline) finds configs, tools and the model index of the wheel."""
    site = tmp_path / 'site'
    subprocess.run([PYTHON, '-m', 'pip', 'install', '--no-deps', '--no-index',
                    '-q', '--target', str(site), wheel], check=True,
                   timeout=120)
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONWARNINGS='ignore')
    out = subprocess.run([PYTHON, '-c', MIM_CHECK], env=env, cwd=str(tmp_path),
                         check=True, capture_output=True, text=True,
                         timeout=120).stdout
    found = json.loads(out.strip().splitlines()[-1])
    assert found['installed']
    assert found['path'] == str(site / 'atomnas_mm')
    mim_dir = osp.join(found['path'], '.mim')
    assert osp.isfile(osp.join(mim_dir, 'tools', 'train.py'))
    assert set(found['models']) == set(MODELS)
    for name, arch in MODELS.items():
        model = found['models'][name]
        assert osp.isfile(osp.join(mim_dir, model['config'])), model['config']
        assert model['flops'] == PUBLISHED[arch]['flops']
        assert model['imagenet-1k/top_1_accuracy'] == PUBLISHED[arch]['top1']


@pytest.mark.slow
def test_mim_finds_this_environment_s_install(tmp_path):
    """mim finds atomnas_mm in the running environment, as tools/install.sh
    set it up (editable: site-packages/atomnas_mm links to the sources)."""
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    env.pop('PYTHONPATH', None)
    out = subprocess.run([PYTHON, '-c', MIM_CHECK], env=env, cwd=str(tmp_path),
                         check=True, capture_output=True, text=True,
                         timeout=120).stdout
    found = json.loads(out.strip().splitlines()[-1])
    assert found['installed']
    assert osp.isfile(osp.join(found['path'], '.mim', 'tools', 'train.py')), (
        f'mim looks in {found["path"]}, which has no .mim/tools/train.py: '
        'run `bash tools/install.sh`')
    assert set(found['models']) == set(MODELS)
    if osp.islink(found['path']):   # the link install.sh made: pip owns it
        from importlib import metadata
        record = [f for f in metadata.distribution('atomnas_mm').files
                  if f.name == 'RECORD'][0].locate()
        with open(record) as f:
            assert 'atomnas_mm,,' in f.read().splitlines()
        assert osp.realpath(found['path']) == osp.join(ROOT, 'atomnas_mm')


DEMO_OPTIONS = ['train_cfg.max_epochs=1', 'train_dataloader.dataset.indices=128',
                'val_dataloader.dataset.indices=64',
                'train_dataloader.num_workers=0',
                'val_dataloader.num_workers=0',
                'train_dataloader.persistent_workers=False',
                'val_dataloader.persistent_workers=False',
                'custom_hooks.3.num_batches=1']


@pytest.mark.slow
@pytest.mark.skipif(not osp.isdir('/usr/share/datasets/fashion-mnist'),
                    reason='needs the Debian package dataset-fashion-mnist')
def test_mim_train_demo_from_this_environment(tmp_path):
    """`mim train atomnas_mm configs/demo/...` from another directory, with
    the environment tools/install.sh made (the README's editable .venv)."""
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    env.pop('PYTHONPATH', None)
    mim = osp.join(osp.dirname(PYTHON), 'mim')
    work_dir = tmp_path / 'work'
    out = subprocess.run(
        [mim, 'train', 'atomnas_mm', 'configs/demo/atomnas_fashion_mnist.py',
         '--work-dir', str(work_dir), '--cfg-options'] + DEMO_OPTIONS + [
         f'train_dataloader.dataset.cache_dir={tmp_path / "data"}',
         f'val_dataloader.dataset.cache_dir={tmp_path / "data"}'],
        env=env, cwd=str(tmp_path), capture_output=True, text=True,
        timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert osp.join('atomnas_mm', '.mim', 'tools', 'train.py') in out.stdout
    assert (work_dir / 'epoch_1.pth').exists()
    assert (work_dir / 'searched_arch.json').exists()


@pytest.mark.slow
@pytest.mark.skipif(not osp.isdir('/usr/share/datasets/fashion-mnist'),
                    reason='needs the Debian package dataset-fashion-mnist')
def test_mim_train_demo(wheel, tmp_path):
    """`mim train atomnas_mm configs/demo/...` on a `pip install .` install."""
    site = tmp_path / 'site'
    subprocess.run([PYTHON, '-m', 'pip', 'install', '--no-deps', '--no-index',
                    '-q', '--target', str(site), wheel], check=True,
                   timeout=120)
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONWARNINGS='ignore')
    mim = osp.join(osp.dirname(PYTHON), 'mim')
    work_dir = tmp_path / 'work'
    out = subprocess.run(
        [mim, 'train', 'atomnas_mm', 'configs/demo/atomnas_fashion_mnist.py',
         '--work-dir', str(work_dir), '--cfg-options'] + DEMO_OPTIONS + [
         f'train_dataloader.dataset.cache_dir={tmp_path / "data"}',
         f'val_dataloader.dataset.cache_dir={tmp_path / "data"}'],
        env=env, cwd=str(tmp_path), capture_output=True, text=True,
        timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert str(site / 'atomnas_mm' / '.mim' / 'tools' / 'train.py') in \
        out.stdout + out.stderr
    assert (work_dir / 'epoch_1.pth').exists()
    assert (work_dir / 'searched_arch.json').exists()
