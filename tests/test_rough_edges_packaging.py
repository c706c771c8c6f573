"""Issue 20, point 8: building leaves the checkout as it was, and
tools/install.sh survives what an old build left behind.

In a copy of the checkout (tracked files plus the .mim links an editable
install made): ``pip wheel .`` and ``pip install --target`` must not add
``atomnas_mm.egg-info/`` or ``build/`` nor replace the links, and the wheel
must carry configs/ and tools/ under ``atomnas_mm/.mim``. Then
``tools/install.sh`` runs in the copy with a throwaway venv (the copy
installed editable in it, the real venv's packages visible through a .pth
file, its stamp up to date), after the damage an old build did (the .mim
links replaced by copies, an ``atomnas_mm.egg-info`` in the checkout): it
repairs the links and links the package for mim without an IndexError.
"""
import hashlib
import os
import os.path as osp
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
pytestmark = pytest.mark.slow


def copy_checkout(dest):
    files = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split('\0')
    for name in filter(None, files):
        if not osp.exists(osp.join(ROOT, name)):
            continue  # deleted in the working tree
        os.makedirs(osp.dirname(osp.join(dest, name)), exist_ok=True)
        with open(osp.join(ROOT, name), 'rb') as src, \
                open(osp.join(dest, name), 'wb') as dst:
            dst.write(src.read())
    mim = osp.join(dest, 'atomnas_mm', '.mim')
    os.makedirs(mim)
    for name in ('configs', 'tools', 'model-index.yml'):  # as -e . makes
        os.symlink(osp.join('..', '..', name), osp.join(mim, name))
    return dest


def tree(folder):
    out = []
    for base, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = osp.join(base, name)
            out.append((osp.relpath(path, folder), osp.islink(path)))
    return sorted(out)


def pip(*args, cwd):
    return subprocess.run([sys.executable, '-m', 'pip', *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_pip_wheel_and_install_leave_the_checkout_unchanged(tmp_path):
    copy = copy_checkout(str(tmp_path / 'checkout'))
    before = tree(copy)
    built = pip('wheel', '--no-deps', '--no-build-isolation', '-q', '.',
                '-w', str(tmp_path / 'wheels'), cwd=copy)
    assert built.returncode == 0, built.stderr[-3000:]
    installed = pip('install', '--no-deps', '--no-build-isolation', '-q',
                    '--target', str(tmp_path / 'site'), '.', cwd=copy)
    assert installed.returncode == 0, installed.stderr[-3000:]
    assert tree(copy) == before  # no egg-info, no build/, links kept

    wheel, = (tmp_path / 'wheels').glob('atomnas_mm-*.whl')
    names = zipfile.ZipFile(wheel).namelist()
    for want in ('atomnas_mm/.mim/model-index.yml',
                 'atomnas_mm/.mim/tools/train.py',
                 'atomnas_mm/.mim/configs/demo/atomnas_fashion_mnist.py'):
        assert want in names
    assert not [n for n in names if '__pycache__' in n]
    mim = tmp_path / 'site' / 'atomnas_mm' / '.mim'
    assert (mim / 'tools' / 'train.py').is_file()
    assert not (mim / 'tools').is_symlink()


def test_install_sh_repairs_what_an_old_build_left(tmp_path):
    copy = copy_checkout(str(tmp_path / 'checkout'))
    venv = osp.join(copy, '.venv')
    base = osp.join(sys.base_prefix, 'bin', 'python3')  # the venv's base
    subprocess.run([base, '-m', 'venv', venv], check=True, timeout=300)
    python = osp.join(venv, 'bin', 'python')
    real_site = sysconfig.get_paths()['purelib']
    # the editable build with the real venv's setuptools (the bundled one
    # needs the wheel package), seen through links to it alone
    tools = tmp_path / 'build_tools'
    tools.mkdir()
    for name in os.listdir(real_site):
        if name.split('-')[0] in ('setuptools', 'pkg_resources',
                                  '_distutils_hack'):
            os.symlink(osp.join(real_site, name), tools / name)
    editable = subprocess.run(
        [python, '-m', 'pip', 'install', '-q', '--no-deps',
         '--no-build-isolation', '--no-index', '-e', copy],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=str(tools)))
    assert editable.returncode == 0, editable.stderr[-3000:]
    site = subprocess.run(
        [python, '-c', 'import sysconfig; print(sysconfig.get_paths()'
         '["purelib"])'], capture_output=True, text=True,
        check=True).stdout.strip()
    # torch & co. from the real venv, after the venv's own packages
    with open(osp.join(site, 'zz_real_venv.pth'), 'w') as f:
        f.write(real_site + '\n')
    stamp = hashlib.sha256()
    for name in sorted(os.listdir(osp.join(copy, 'requirements'))):
        if name.endswith('.txt'):
            stamp.update(open(osp.join(copy, 'requirements', name),
                              'rb').read())
    for name in ('setup.py', 'tools/install.sh'):
        stamp.update(open(osp.join(copy, name), 'rb').read())
    with open(osp.join(venv, '.atomnas_stamp'), 'w') as f:
        f.write(stamp.hexdigest() + '\n')

    # what `pip wheel .` with the old setup.py left: copies, an egg-info
    mim = osp.join(copy, 'atomnas_mm', '.mim')
    for name in ('configs', 'tools'):
        os.remove(osp.join(mim, name))
        os.makedirs(osp.join(mim, name, 'stale'))
    egg = osp.join(copy, 'atomnas_mm.egg-info')
    os.makedirs(egg)
    with open(osp.join(egg, 'PKG-INFO'), 'w') as f:
        f.write('Metadata-Version: 2.1\nName: atomnas_mm\nVersion: 0.1.0\n')

    real_link = osp.realpath(osp.join(real_site, 'atomnas_mm'))
    done = subprocess.run(['bash', osp.join(copy, 'tools', 'install.sh')],
                          cwd=copy, capture_output=True, text=True,
                          timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert '[install] .venv is up to date' in out, out[-3000:]
    assert 'IndexError' not in out and 'Traceback' not in out
    assert f'[install] removed {egg}' in out
    assert f'replaced the stale copy {osp.join(mim, "tools")} by a link' \
        in out
    assert not osp.exists(egg)
    for name in ('configs', 'tools', 'model-index.yml'):
        path = osp.join(mim, name)
        assert osp.islink(path)
        assert osp.realpath(path) == osp.realpath(osp.join(copy, name))
    link = osp.join(site, 'atomnas_mm')
    assert osp.islink(link) and osp.realpath(link) == osp.realpath(
        osp.join(copy, 'atomnas_mm'))
    # the real venv was only read
    assert osp.realpath(osp.join(real_site, 'atomnas_mm')) == real_link


@pytest.mark.skipif(not osp.isdir('/usr/share/datasets/fashion-mnist'),
                    reason='needs the Debian package dataset-fashion-mnist')
def test_a_short_demo_run_prints_nothing_alarming(tmp_path):
    """No pkg_resources deprecation, no mmengine FileClient/HardDiskBackend
    WARNING: stderr is empty and the log has no WARNING line."""
    cache = str(tmp_path / 'cache')
    done = subprocess.run(
        [sys.executable, osp.join(ROOT, 'tools/train.py'),
         osp.join(ROOT, 'configs/demo/atomnas_fashion_mnist.py'),
         '--work-dir', str(tmp_path / 'work'), '--cfg-options',
         'train_cfg.max_epochs=1', 'train_dataloader.batch_size=16',
         'train_dataloader.dataset.indices=32',
         'val_dataloader.dataset.indices=16',
         f'train_dataloader.dataset.cache_dir={cache}',
         f'val_dataloader.dataset.cache_dir={cache}',
         'train_dataloader.num_workers=0', 'val_dataloader.num_workers=0',
         'train_dataloader.persistent_workers=False',
         'val_dataloader.persistent_workers=False'],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == ''
    assert [line for line in done.stdout.splitlines()
            if ' - WARNING - ' in line] == []
