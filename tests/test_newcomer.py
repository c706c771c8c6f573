"""The README's path for a new user: install script, demo, export, test,
FLOPs, ONNX, each through its real entry point."""
import hashlib
import json
import os
import os.path as osp
import re
import subprocess
import sys

import pytest
import torch

import atomnas_mm  # noqa: F401  (checkpoint allowlist)

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
INSTALL = osp.join(ROOT, 'tools', 'install.sh')
DEMO = osp.join(ROOT, 'configs', 'demo', 'atomnas_fashion_mnist.py')
needs_data = pytest.mark.skipif(
    not osp.isdir('/usr/share/datasets/fashion-mnist'),
    reason='needs the Debian package dataset-fashion-mnist')


def bash_function(name):
    """The text of the bash function ``name`` in tools/install.sh."""
    text = open(INSTALL).read()
    match = re.search(rf'^{name}\(\) {{\n.*?^}}\n', text, re.S | re.M)
    assert match, f'tools/install.sh has no function {name}'
    return match.group(0)


@pytest.mark.slow
def test_install_sh_reports_progress_while_mmcv_compiles(tmp_path):
    """A stand-in build (two objects, 8 s): progress lines with the elapsed
    time, the objects compiled and the file being compiled."""
    src = tmp_path / 'mmcv-2.1.0'
    (src / 'mmcv/ops/csrc/pytorch/cpu').mkdir(parents=True)
    for name in ('nms.cpp', 'roi_align.cpp'):
        (src / 'mmcv/ops/csrc/pytorch' / name).touch()
    build = ('echo "c++ -c ./mmcv/ops/csrc/pytorch/nms.cpp"; sleep 4; '
             'touch build_nms.o; echo "c++ -c ./mmcv/ops/csrc/pytorch/'
             'roi_align.cpp"; sleep 4; touch build_roi_align.o')
    script = (f'set -euo pipefail\n{bash_function("build_with_heartbeat")}'
              f'cd {src}\nbuild_with_heartbeat {tmp_path}/log {src} '
              f"bash -c '{build}'\n")
    out = subprocess.run(['bash', '-c', script], capture_output=True,
                         text=True, timeout=60,
                         env=dict(os.environ, ATOMNAS_HEARTBEAT='1'))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert re.match(r'\[install\] mmcv: 0 min 0\d s, [01] of ~2 objects '
                    r'compiled, now: (nms|roi_align)\.cpp$', lines[0]), lines
    assert lines[-1].startswith('[install] mmcv built in 0 min ')
    # A failing build stops the install with the end of its log.
    fail = script.replace(f"bash -c '{build}'",
                          "bash -c 'echo compiler says no; exit 3'")
    out = subprocess.run(['bash', '-c', fail], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1
    assert 'the mmcv build failed' in out.stdout
    assert out.stdout.rstrip().endswith('compiler says no')


@pytest.mark.slow
def test_install_sh_needs_a_compiler_only_to_compile(tmp_path):
    script = (f'VENV={osp.dirname(osp.dirname(sys.executable))}\n'
              f'{bash_function("check_compiler")}check_compiler\n')
    out = subprocess.run(['bash', '-c', script], capture_output=True,
                         text=True, timeout=60,
                         env=dict(os.environ, CXX=str(tmp_path / 'no-cxx')))
    assert out.returncode == 1
    assert 'needs a C++20 compiler' in out.stdout
    assert 'ATOMNAS_WHEELHOUSE' in out.stdout


def test_readme_names_only_files_that_exist():
    """Every repository path in README's commands and links exists."""
    text = open(osp.join(ROOT, 'README.md')).read()
    paths = set(re.findall(r'(?<![\w/.])((?:tools|configs|docs|tests|'
                           r'benchmarks|requirements)/[\w./-]+\w)', text))
    assert len(paths) > 10
    missing = sorted(p for p in paths if not osp.exists(osp.join(ROOT, p)))
    assert not missing, missing


def files_of(folder, skip):
    return {osp.relpath(osp.join(root, f), folder):
            hashlib.sha1(open(osp.join(root, f), 'rb').read()).hexdigest()
            for root, dirs, files in os.walk(folder)
            if not osp.relpath(root, folder).startswith(skip)
            for f in files}


def run(args, cwd):
    out = subprocess.run([sys.executable] + args, cwd=str(cwd),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return out.stdout + out.stderr


# A short demo search (1024 images, 2 epochs) with a penalty strong enough to
# kill atoms in it; everything else is the demo config, run from a fresh
# directory as the README says.
SHORT_DEMO = [
    'train_cfg.max_epochs=2', 'train_dataloader.batch_size=32',
    'train_dataloader.dataset.indices=1024',
    'val_dataloader.dataset.indices=256', 'train_dataloader.num_workers=0',
    'val_dataloader.num_workers=0',
    'train_dataloader.persistent_workers=False',
    'val_dataloader.persistent_workers=False', 'param_scheduler.0.end=5',
    'param_scheduler.1.T_max=2', 'custom_hooks.0.momentum=0.5',
    'custom_hooks.1.rho=0.05', 'custom_hooks.1.warmup_epochs=0',
    'custom_hooks.2.interval=8', 'custom_hooks.2.threshold=0.3',
    'custom_hooks.2.min_removed_flops=0', 'custom_hooks.3.num_batches=2']


@pytest.mark.slow
@needs_data
def test_demo_search_export_test_measure_deploy(tmp_path):
    """README, 'Demo' then 'Retraining, evaluating and exporting', on the
    demo's own 1-channel 28 px net."""
    run([osp.join(ROOT, 'tools', 'train.py'), DEMO, '--cfg-options']
        + SHORT_DEMO, tmp_path)
    work_dir = tmp_path / 'work_dirs' / 'atomnas_fashion_mnist'
    assert (tmp_path / 'data' / 'fashion-mnist').is_dir()   # the cache
    history = torch.load(str(work_dir / 'epoch_2.pth'), weights_only=True)[
        'meta']['atomnas_history']
    assert len(history) > 1                           # it shrank
    before = files_of(work_dir, 'test')

    run([osp.join(ROOT, 'tools', 'export_searched.py'), str(work_dir),
         '--out', 'export/demo'], tmp_path)
    config = 'export/demo/atomnas_fashion_mnist.py'
    ckpt = 'export/demo/atomnas_fashion_mnist.pth'
    log = run([osp.join(ROOT, 'tools', 'test.py'), config, ckpt], tmp_path)
    assert 'accuracy/top1' in log
    assert files_of(work_dir, 'test') == before       # the search's record
    assert (work_dir / 'test' / 'atomnas_fashion_mnist.py').is_file()

    from mmengine.config import Config
    from mmpretrain import get_model

    from atomnas_mm.models import count_flops_params
    log = run([osp.join(ROOT, 'tools', 'analysis_tools', 'get_flops.py'),
               config], tmp_path)
    assert 'Input shape: (1, 1, 28, 28)' in log
    line = next(x for x in log.splitlines() if x.startswith('AtomNAS (MAdds'))
    flops, _ = count_flops_params(get_model(Config.fromfile(
        str(tmp_path / config))), (1, 1, 28, 28))
    assert line.split()[-2] == f'{flops / 1e6:.2f}', line

    log = run([osp.join(ROOT, 'tools', 'deployment', 'pytorch2onnx.py'),
               config, ckpt, '--out', 'demo.onnx', '--verify'], tmp_path)
    assert 'input [batch, 1, 28, 28]' in log
    errors = re.findall(r'batch \d+: (\S+?)(?:,|$)', log.splitlines()[-1])
    assert len(errors) == 2 and max(map(float, errors)) < 1e-4, log[-300:]

    from atomnas_mm.models import AtomNAS
    with open(tmp_path / 'export' / 'demo' / 'arch.json') as f:
        net = AtomNAS(arch=json.load(f))
    state = torch.load(str(tmp_path / ckpt), weights_only=True)['state_dict']
    assert {k: v.shape for k, v in net.state_dict().items()} == {
        k[len('backbone.'):]: v.shape for k, v in state.items()
        if k.startswith('backbone.')}
    # ... with the backbone FLOPs the search logged last.
    assert count_flops_params(net, (1, 1, 28, 28))[0] == history[-1]['flops']
