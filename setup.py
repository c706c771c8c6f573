"""atomnas_mm: AtomNAS for the OpenMMLab ecosystem."""
import os
import os.path as osp
import shutil
import sys

from setuptools import find_packages, setup

HERE = osp.dirname(osp.abspath(__file__))


def read_requirements(name):
    """Requirement lines of ``requirements/<name>.txt`` (comments dropped)."""
    with open(osp.join(HERE, 'requirements', f'{name}.txt')) as f:
        lines = (line.split('#')[0].strip() for line in f)
        return [line for line in lines if line]


def add_mim_extension():
    """Put configs/ and tools/ into atomnas_mm/.mim so that mim finds them.

    Symlinks for editable installs, copies for wheels and plain installs.
    """
    if 'develop' in sys.argv or any('editable' in a for a in sys.argv):
        mode = 'symlink'
    elif {'sdist', 'bdist_wheel', 'install', 'build'} & set(sys.argv) or \
            'egg_info' in sys.argv:
        mode = 'copy'
    else:
        return
    mim_path = osp.join(HERE, 'atomnas_mm', '.mim')
    os.makedirs(mim_path, exist_ok=True)
    for name in ('configs', 'tools', 'model-index.yml'):
        src, dst = osp.join(HERE, name), osp.join(mim_path, name)
        if not osp.exists(src):
            continue
        if osp.islink(dst) or osp.isfile(dst):
            os.remove(dst)
        elif osp.isdir(dst):
            shutil.rmtree(dst)
        if mode == 'symlink':
            os.symlink(osp.relpath(src, mim_path), dst)
        elif osp.isdir(src):
            shutil.copytree(src, dst)
        else:
            shutil.copyfile(src, dst)


def version():
    scope = {}
    with open(osp.join(HERE, 'atomnas_mm', 'version.py')) as f:
        exec(f.read(), scope)
    return scope['__version__']


if __name__ == '__main__':
    add_mim_extension()
    setup(
        name='atomnas_mm',
        version=version(),
        description='AtomNAS: fine-grained end-to-end NAS for mmpretrain',
        long_description=open(osp.join(HERE, 'README.md')).read()
        if osp.exists(osp.join(HERE, 'README.md')) else '',
        long_description_content_type='text/markdown',
        license='Apache License 2.0',
        packages=find_packages(exclude=('configs', 'tools', 'tests')),
        include_package_data=True,
        package_data={'atomnas_mm': ['.mim/**/*', '.mim/*']},
        python_requires='>=3.8',
        install_requires=[r for r in read_requirements('runtime')
                          if not r.startswith('setuptools')]
        + read_requirements('torch'),
        extras_require={
            'mim': read_requirements('mminstall'),
            'tests': read_requirements('tests'),
        },
        zip_safe=False)
