"""`import atomnas_mm` refuses a wrong mmcv/mmengine/mmpretrain and says why."""
import pytest
import os
import subprocess
import sys


@pytest.mark.slow
def test_wrong_mmcv_version_names_the_fix(tmp_path):
    fake = tmp_path / 'mmcv'
    fake.mkdir()
    (fake / '__init__.py').write_text("__version__ = '2.2.0'\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, '-c', 'import atomnas_mm'],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert 'atomnas_mm needs mmcv>=2.0.0,<2.2.0, found 2.2.0' in out.stderr
    assert 'tools/install.sh' in out.stderr

