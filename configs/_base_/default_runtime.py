# mmpretrain's default runtime with the AtomNAS logging, checkpoint and seed.
# SafeCheckpointHook: mmengine's CheckpointHook with atomic writes, so that a
# kill while a checkpoint is written leaves one that `--resume` finds.
_base_ = 'mmpretrain::_base_/default_runtime.py'

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=100),
    checkpoint=dict(
        type='atomnas_mm.SafeCheckpointHook', interval=1, max_keep_ckpts=3,
        save_best='auto'),
    # Train, validate and test in channels_last (faster convolutions; see
    # docs/benchmarks.md). Off: default_hooks = dict(memory_format=None).
    memory_format=dict(
        type='atomnas_mm.MemoryFormatHook', memory_format='channels_last'))

randomness = dict(seed=1995, deterministic=False)
