"""Registries of atomnas_mm: children of mmengine's root registries.

With ``locations`` set, ``type='atomnas_mm.AtomNAS'`` resolves from any scope
(mmpretrain, mmdet) without ``custom_imports``.
"""
from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import OPTIMIZERS as MMENGINE_OPTIMIZERS
from mmengine.registry import PARAM_SCHEDULERS as MMENGINE_PARAM_SCHEDULERS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='atomnas_mm',
                  locations=['atomnas_mm.models', 'atomnas_mm.engine.ema'])
HOOKS = Registry('hook', parent=MMENGINE_HOOKS, scope='atomnas_mm',
                 locations=['atomnas_mm.engine.hooks'])
OPTIMIZERS = Registry('optimizer', parent=MMENGINE_OPTIMIZERS,
                      scope='atomnas_mm',
                      locations=['atomnas_mm.engine.optimizers'])
PARAM_SCHEDULERS = Registry('parameter scheduler',
                            parent=MMENGINE_PARAM_SCHEDULERS,
                            scope='atomnas_mm',
                            locations=['atomnas_mm.engine.schedulers'])
DATASETS = Registry('dataset', parent=MMENGINE_DATASETS, scope='atomnas_mm',
                    locations=['atomnas_mm.datasets'])
# Search policy parts (criterion, trigger, penalty schedule, cost model);
# mmengine has no such root registry.
SEARCH = Registry('search policy', scope='atomnas_mm',
                  locations=['atomnas_mm.search'])
