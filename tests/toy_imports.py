"""Registers the test toys on import, for configs that a subprocess runs
(``custom_imports = dict(imports=['atomnas_mm', 'toy_imports'])`` with
``tests/`` on ``PYTHONPATH``); in-process tests use
:func:`harness.toys_registered` instead."""
from harness import TOYS

for _registry, _cls in TOYS:
    if _cls.__name__ not in _registry.module_dict:
        _registry.register_module(module=_cls)
