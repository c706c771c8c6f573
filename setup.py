"""atomnas_mm: AtomNAS for the OpenMMLab ecosystem."""
import atexit
import os
import os.path as osp
import shutil
import sys
import tempfile

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = osp.dirname(osp.abspath(__file__))


def read_requirements(name):
    """Requirement lines of ``requirements/<name>.txt`` (comments dropped)."""
    with open(osp.join(HERE, 'requirements', f'{name}.txt')) as f:
        lines = (line.split('#')[0].strip() for line in f)
        return [line for line in lines if line]


MIM_ITEMS = ('configs', 'tools', 'model-index.yml')


def add_mim_extension():
    """Link configs/ and tools/ into atomnas_mm/.mim (editable installs).

    mim looks for ``<package>/.mim/{configs,tools,model-index.yml}``. An
    editable install runs the sources, so they get relative symlinks there
    (``.mim`` is git-ignored); links already right are left alone, copies
    left by an old build are replaced. Wheels and plain installs never
    write into the checkout: :class:`BuildPy` copies the files into the
    build folder instead.
    """
    if not ('develop' in sys.argv or any('editable' in a for a in sys.argv)):
        return
    mim_path = osp.join(HERE, 'atomnas_mm', '.mim')
    os.makedirs(mim_path, exist_ok=True)
    for name in MIM_ITEMS:
        src, dst = osp.join(HERE, name), osp.join(mim_path, name)
        if not osp.exists(src):
            continue
        if osp.islink(dst) and osp.realpath(dst) == osp.realpath(src):
            continue
        if osp.islink(dst) or osp.isfile(dst):
            os.remove(dst)
        elif osp.isdir(dst):
            shutil.rmtree(dst)
        os.symlink(osp.relpath(src, mim_path), dst)


class BuildPy(build_py):
    """``build_py`` that puts copies of configs/, tools/ and
    model-index.yml into ``<build_lib>/atomnas_mm/.mim`` (what mim reads in
    a regular install), read from the repository root, not from a
    ``.mim`` folder in the sources."""

    def run(self):
        super().run()
        if getattr(self, 'editable_mode', False):
            return  # the sources run: add_mim_extension linked them
        mim_path = osp.join(self.build_lib, 'atomnas_mm', '.mim')
        if osp.lexists(mim_path):
            shutil.rmtree(mim_path)
        os.makedirs(mim_path)
        for name in MIM_ITEMS:
            src, dst = osp.join(HERE, name), osp.join(mim_path, name)
            if osp.isdir(src):
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns(
                    '__pycache__', '*.pyc'))
            elif osp.isfile(src):
                shutil.copyfile(src, dst)


def out_of_tree_options():
    """Build outputs (egg-info, build/) in a temporary folder removed at
    exit, so that ``pip wheel .`` / ``pip install .`` leave the checkout as
    it was. An explicit ``--egg-base`` / ``--build-base`` still wins."""
    tmp = tempfile.mkdtemp(prefix='atomnas_mm-build-')
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    return {'egg_info': {'egg_base': tmp},
            'build': {'build_base': osp.join(tmp, 'build')}}


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
        cmdclass={'build_py': BuildPy},
        options=out_of_tree_options(),
        python_requires='>=3.8',
        install_requires=[r for r in read_requirements('runtime')
                          if not r.startswith('setuptools')]
        + read_requirements('torch'),
        extras_require={
            'mim': read_requirements('mminstall'),
            'tests': read_requirements('tests'),
        },
        zip_safe=False)
