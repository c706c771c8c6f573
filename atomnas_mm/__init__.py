"""atomnas_mm: AtomNAS (fine-grained NAS) for mmengine / mmpretrain."""
from packaging.version import parse

from .version import __version__

_REQUIRED = {  # package: (min inclusive, max exclusive)
    'mmcv': ('2.0.0', '2.2.0'),
    'mmengine': ('0.10.0', '1.0.0'),
    'mmpretrain': ('1.2.0', '1.3.0'),
}


def _check_versions():
    import importlib
    for name, (low, high) in _REQUIRED.items():
        try:
            version = importlib.import_module(name).__version__
        except ImportError as e:
            raise ImportError(
                f'atomnas_mm needs {name}>={low},<{high}; it is not installed '
                f'({e}). Run `bash tools/install.sh`.') from e
        if not parse(low) <= parse(version) < parse(high):
            raise ImportError(
                f'atomnas_mm needs {name}>={low},<{high}, found {version}. '
                f'Install e.g. `pip install "{name}>={low},<{high}"` or run '
                '`bash tools/install.sh`.')


_check_versions()

from . import checkpoint  # noqa: E402,F401  (weights_only allowlist)
from . import datasets  # noqa: E402,F401
from .engine import *  # noqa: E402,F401,F403
from .models import AtomNAS  # noqa: E402
from .apis import register_model_index  # noqa: E402

register_model_index()  # mmpretrain.list_models('atomnas*') / get_model

__all__ = ['__version__', 'AtomNAS']
