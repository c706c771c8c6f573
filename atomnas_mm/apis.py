"""Make ``mmpretrain.get_model`` / ``list_models`` know the AtomNAS models."""
import os.path as osp

_PACKAGE_DIR = osp.dirname(osp.abspath(__file__))
_registered = None


def find_model_index():
    """Path of atomnas_mm's ``model-index.yml``, or None.

    An installed package has it in ``atomnas_mm/.mim/`` (setup.py copies it
    there), a source checkout at the repository root.
    """
    for root in (osp.join(_PACKAGE_DIR, '.mim'), osp.dirname(_PACKAGE_DIR)):
        path = osp.join(root, 'model-index.yml')
        if osp.isfile(path):
            return path
    return None


def register_model_index(path=None):
    """Register the AtomNAS model index with mmpretrain's ModelHub.

    Config paths in the index are relative to the index's directory. Calling
    it again is a no-op; models whose names ModelHub already knows are kept.

    Args:
        path (str, optional): A ``model-index.yml``; defaults to
            :func:`find_model_index`.

    Returns:
        str | None: The registered index, or None when none was found.
    """
    global _registered
    if _registered is not None and path in (None, _registered):
        return _registered
    path = path or find_model_index()
    if path is None:
        return None
    if not osp.isfile(path):
        raise FileNotFoundError(f'path: {path} does not exist')
    from mmpretrain.apis import ModelHub
    from modelindex.load_model_index import load
    index = load(path)
    index.build_models_with_collections()
    if all(ModelHub.has(m.name.lower()) for m in index.models):
        _registered = path
        return path
    ModelHub.register_model_index(path, config_prefix=osp.dirname(path))
    _registered = path
    return path
